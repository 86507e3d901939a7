"""matrix-nio with its end-to-end encryption (vodozemac's Olm and Megolm) driving Hearth.

Alice, Bob and Carol upload their device keys, Alice opens an encrypted DM with Bob and an
encrypted group with both, and every message is decrypted by every other member: nio queries the
keys, claims one-time keys, shares the room key over to-device Olm messages and encrypts with
Megolm, exactly as a bot built on nio does. Run by tests/api/sdk.rs with HEARTH_URL set. Exits
non-zero with a message on the first behaviour that differs.
"""

import asyncio
import os
import sys
import tempfile
import time

from nio import (
    AsyncClient,
    AsyncClientConfig,
    InviteMemberEvent,
    JoinResponse,
    MegolmEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)

URL = os.environ["HEARTH_URL"]
ENCRYPTION = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}", file=sys.stderr)
        sys.exit(1)


async def new_client(name, store):
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False)
    client = AsyncClient(URL, name, store_path=store, config=config)
    registered = await client.register(name, f"{name} secret", device_name=f"{name}'s nio")
    check(isinstance(registered, RegisterResponse), f"register {name}: {registered}")
    check(client.olm is not None, f"{name}: nio's encryption did not load")
    if client.should_upload_keys:
        uploaded = await client.keys_upload()
        check(not hasattr(uploaded, "status_code"), f"{name}: keys upload failed: {uploaded}")
    client.decrypted = {}
    client.pending = []
    return client


async def sync(client):
    response = await client.sync(timeout=1000, full_state=client.next_batch is None)
    check(isinstance(response, SyncResponse), f"{client.user_id}: sync failed: {response}")
    for room_id, room in response.rooms.join.items():
        for event in room.timeline.events:
            if isinstance(event, MegolmEvent):
                client.pending.append((room_id, event))
            elif isinstance(event, RoomMessageText):
                client.decrypted.setdefault(room_id, {})[event.body] = event
    # Room keys can arrive after the messages they open: try the undecrypted ones again.
    still = []
    for room_id, event in client.pending:
        try:
            event = client.decrypt_event(event)
        except Exception:  # nio raises when it has no key yet
            still.append((room_id, event))
            continue
        if isinstance(event, RoomMessageText):
            client.decrypted.setdefault(room_id, {})[event.body] = event
        else:
            still.append((room_id, event))
    client.pending = still
    if client.should_upload_keys:
        await client.keys_upload()
    if client.should_query_keys:
        await client.keys_query()
    return response


async def sync_until(client, done, what, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        await sync(client)
        if done():
            return
        check(time.monotonic() < deadline, f"{client.user_id}: timed out waiting for {what}")


def joined(client, room_id, users):
    room = client.rooms.get(room_id)
    return room is not None and all(user in room.users for user in users)


async def invited_and_join(client, room_id):
    await sync_until(client, lambda: room_id in client.invited_rooms, f"the invite to {room_id}")
    joined_response = await client.join(room_id)
    check(isinstance(joined_response, JoinResponse), f"{client.user_id}: join failed: {joined_response}")


async def send(client, room_id, body):
    response = await client.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": body}, ignore_unverified_devices=True
    )
    check(isinstance(response, RoomSendResponse), f"{client.user_id}: send failed: {response}")


async def expect(client, room_id, body, sender):
    await sync_until(client, lambda: body in client.decrypted.get(room_id, {}), f'"{body}" decrypted')
    event = client.decrypted[room_id][body]
    check(event.sender == sender, f'"{body}" came from {event.sender}, not {sender}')
    check(event.decrypted, f'"{body}" was not an encrypted event')


async def main():
    with tempfile.TemporaryDirectory() as stores:
        clients = []
        try:
            suffix = str(int(time.time() * 1000) % 100000)
            names = [f"alice{suffix}", f"bob{suffix}", f"carol{suffix}"]
            for name in names:
                os.makedirs(os.path.join(stores, name))
                clients.append(await new_client(name, os.path.join(stores, name)))
            alice, bob, carol = clients
            for client in clients:
                await sync(client)

            # An encrypted DM, both ways.
            created = await alice.room_create(is_direct=True, invite=[bob.user_id], initial_state=[ENCRYPTION])
            check(isinstance(created, RoomCreateResponse), f"createRoom failed: {created}")
            dm = created.room_id
            await invited_and_join(bob, dm)
            await sync_until(alice, lambda: joined(alice, dm, [alice.user_id, bob.user_id]), "bob to join the DM")
            check(alice.rooms[dm].encrypted, "nio does not see the DM as encrypted")
            for body in ["secret one", "secret two ✨"]:
                await send(alice, dm, body)
            for body in ["secret one", "secret two ✨"]:
                await expect(bob, dm, body, alice.user_id)
            await send(bob, dm, "got both")
            await expect(alice, dm, "got both", bob.user_id)
            print("dm: every message decrypted")

            # An encrypted group of three.
            created = await alice.room_create(name="Three", invite=[bob.user_id, carol.user_id], initial_state=[ENCRYPTION])
            check(isinstance(created, RoomCreateResponse), f"createRoom failed: {created}")
            group = created.room_id
            await invited_and_join(bob, group)
            await invited_and_join(carol, group)
            everyone = [c.user_id for c in clients]
            for client in clients:
                await sync_until(client, lambda c=client: joined(c, group, everyone), "everyone to join the group")
            for client in clients:
                await send(client, group, f"from {client.user_id}")
            for reader in clients:
                for writer in clients:
                    if reader is not writer:
                        await expect(reader, group, f"from {writer.user_id}", writer.user_id)
            print("group: 6 of 6 messages decrypted")
            print("ok")
        finally:
            for client in clients:
                await client.close()


asyncio.run(main())
