"""Drives Hearth's content repository with matrix-nio: alice uploads a picture and a file into a
room, bob sees the m.image and m.file events, downloads both (authenticated media) and a thumbnail.

Run by tests/api/sdk.rs with HEARTH_URL set. Exits non-zero (with a message) on the first behaviour
that differs from what the SDK and the spec expect.
"""

import asyncio
import io
import os
import struct
import sys
import time
import zlib

from nio import (
    AsyncClient,
    DownloadError,
    JoinResponse,
    MemoryDownloadResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomMessageFile,
    RoomMessageImage,
    RoomSendResponse,
    SyncResponse,
    ThumbnailResponse,
    UploadResponse,
)


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}", file=sys.stderr)
        sys.exit(1)


def png(width, height):
    """A real PNG (RGB, a gradient), written with zlib alone."""
    rows = b"".join(
        b"\x00" + bytes(((x * 7) % 256, (y * 5) % 256, 120) [i] for x in range(width) for i in range(3))
        for y in range(height)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_size(data):
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "a PNG")
    return struct.unpack(">II", data[16:24])


SEEN = []


async def sync_until(client, predicate, timeout=15):
    """Syncs until an event (of any sync so far) matches `predicate`."""
    deadline = time.monotonic() + timeout
    while True:
        for event in SEEN:
            if predicate(event):
                return event
        check(time.monotonic() < deadline, f"the event did not arrive; seen {[type(e).__name__ for e in SEEN]}")
        response = await client.sync(timeout=2000)
        check(isinstance(response, SyncResponse), f"sync: {response}")
        for room in response.rooms.join.values():
            SEEN.extend(room.timeline.events)


async def main():
    url = os.environ["HEARTH_URL"]
    alice, bob = AsyncClient(url, "alice"), AsyncClient(url, "bob")
    for client, name in ((alice, "alice"), (bob, "bob")):
        registered = await client.register(name, f"{name} secret")
        check(isinstance(registered, RegisterResponse), f"register {name}: {registered}")
        await client.sync(timeout=0)

    created = await alice.room_create(invite=["@bob:localhost"])
    check(isinstance(created, RoomCreateResponse), f"create: {created}")
    room = created.room_id
    joined = await bob.join(room)
    check(isinstance(joined, JoinResponse), f"join: {joined}")
    await alice.sync(timeout=0)

    picture = png(400, 300)
    uploaded, _ = await alice.upload(io.BytesIO(picture), content_type="image/png", filename="sunset.png", filesize=len(picture))
    check(isinstance(uploaded, UploadResponse), f"upload: {uploaded}")
    check(uploaded.content_uri.startswith("mxc://localhost/"), f"content_uri: {uploaded.content_uri}")
    document = os.urandom(300_000)
    file_up, _ = await alice.upload(io.BytesIO(document), content_type="application/pdf", filename="minutes.pdf", filesize=len(document))
    check(isinstance(file_up, UploadResponse), f"upload file: {file_up}")

    sent = await alice.room_send(room, "m.room.message", {
        "msgtype": "m.image", "body": "sunset.png", "url": uploaded.content_uri,
        "info": {"mimetype": "image/png", "w": 400, "h": 300, "size": len(picture)},
    })
    check(isinstance(sent, RoomSendResponse), f"send image: {sent}")
    sent = await alice.room_send(room, "m.room.message", {
        "msgtype": "m.file", "body": "minutes.pdf", "url": file_up.content_uri,
        "info": {"mimetype": "application/pdf", "size": len(document)},
    })
    check(isinstance(sent, RoomSendResponse), f"send file: {sent}")

    image = await sync_until(bob, lambda e: isinstance(e, RoomMessageImage))
    check(image.url == uploaded.content_uri, f"image url: {image.url}")
    got = await bob.download(mxc=image.url)
    check(isinstance(got, MemoryDownloadResponse), f"download: {got}")
    check(got.body == picture, "the picture is byte-identical")
    check(got.content_type == "image/png", f"content type: {got.content_type}")
    check(got.filename == "sunset.png", f"file name: {got.filename}")

    thumb = await bob.thumbnail(*image.url[len("mxc://"):].split("/"), width=96, height=96)
    check(isinstance(thumb, ThumbnailResponse), f"thumbnail: {thumb}")
    check(png_size(thumb.body) == (96, 72), f"thumbnail size: {png_size(thumb.body)}")

    file_event = await sync_until(bob, lambda e: isinstance(e, RoomMessageFile))
    got = await bob.download(mxc=file_event.url)
    check(isinstance(got, MemoryDownloadResponse), f"download file: {got}")
    check(got.body == document, "the file is byte-identical")

    missing = await bob.download(mxc="mxc://localhost/doesnotexist")
    check(isinstance(missing, DownloadError), f"missing media: {missing}")

    await alice.close()
    await bob.close()
    print("ok")


asyncio.run(main())
