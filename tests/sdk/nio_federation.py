"""Two matrix-nio users on two homeservers, a Hearth and a real Synapse, chatting across them.

Run by federation-tests/interop.rs with HEARTH_URL (Hearth's client listener), SYNAPSE_URL (Synapse's
HTTPS listener, by IP), SYNAPSE_CA (the test CA that signed Synapse's certificate), HEARTH_NAME and
SYNAPSE_NAME (the server names). Each step is checked through what the *other* user receives over
/sync. Exits non-zero with a message on the first behaviour that differs from what the SDK expects.
"""

import asyncio
import os
import ssl
import sys
import time

from nio import (
    AsyncClient,
    InviteMemberEvent,
    JoinResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomInviteResponse,
    RoomLeaveResponse,
    RoomMemberEvent,
    RoomMessageText,
    RoomPutStateResponse,
    RoomSendResponse,
    RoomTopicEvent,
    SyncResponse,
)


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}", file=sys.stderr)
        sys.exit(1)


# Everything each client has received through sync, as (room_id, event) in arrival order.
SEEN = {}


async def sync_once(client, timeout_ms):
    response = await client.sync(timeout=timeout_ms)
    check(isinstance(response, SyncResponse), f"{client.user_id} sync: {response}")
    seen = SEEN.setdefault(client.user_id, [])
    for room_id, info in response.rooms.join.items():
        seen.extend((room_id, event) for event in info.timeline.events)
    for room_id, info in response.rooms.invite.items():
        seen.extend((room_id, event) for event in info.invite_state)
    for room_id, info in response.rooms.leave.items():
        seen.extend((room_id, event) for event in info.timeline.events)


async def sync_until(client, predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate(SEEN.setdefault(client.user_id, []))
        if result:
            return result
        remaining = deadline - time.monotonic()
        check(remaining > 0, f"{client.user_id} did not see {what} within {timeout}s")
        await sync_once(client, int(min(remaining, 5) * 1000))


def first(room_id, cls, **fields):
    def predicate(events):
        for rid, event in events:
            if rid == room_id and isinstance(event, cls) and all(getattr(event, k, None) == v for k, v in fields.items()):
                return event
        return None

    return predicate


async def send_text(client, room_id, body):
    response = await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    check(isinstance(response, RoomSendResponse), f"{client.user_id} send: {response}")


async def register(client, name):
    registered = await client.register(name, f"{name} secret", device_name=f"{name}'s nio")
    check(isinstance(registered, RegisterResponse), f"register {name}: {registered}")
    await sync_once(client, 0)


async def main():
    hearth_name, synapse_name = os.environ["HEARTH_NAME"], os.environ["SYNAPSE_NAME"]
    context = ssl.create_default_context(cafile=os.environ["SYNAPSE_CA"])
    # Synapse is reached by IP (the name resolves only inside the test network); the chain is
    # still checked against the test CA.
    context.check_hostname = False
    alice = AsyncClient(os.environ["HEARTH_URL"], "alice")
    sam = AsyncClient(os.environ["SYNAPSE_URL"], "sam", ssl=context)
    try:
        await register(alice, "alice")
        await register(sam, "sam")
        check(alice.user_id == f"@alice:{hearth_name}", f"alice's user ID: {alice.user_id}")

        # 1. Sam creates a room on Synapse and invites Alice; she sees the invite, joins, chats.
        created = await sam.room_create(name="Synapse side", topic="first topic")
        check(isinstance(created, RoomCreateResponse), f"sam's createRoom: {created}")
        room = created.room_id
        invited = await sam.room_invite(room, alice.user_id)
        check(isinstance(invited, RoomInviteResponse), f"sam invites alice: {invited}")
        await sync_until(alice, first(room, InviteMemberEvent, state_key=alice.user_id), "sam's invite")
        joined = await alice.join(room)
        check(isinstance(joined, JoinResponse), f"alice joins sam's room: {joined}")
        await sync_until(sam, first(room, RoomMemberEvent, state_key=alice.user_id, membership="join"), "alice's join")
        await send_text(alice, room, "hello from Hearth")
        await sync_until(sam, first(room, RoomMessageText, body="hello from Hearth"), "alice's message")
        await send_text(sam, room, "hello from Synapse")
        await sync_until(alice, first(room, RoomMessageText, body="hello from Synapse"), "sam's message")
        put = await sam.room_put_state(room, "m.room.topic", {"topic": "changed on Synapse"})
        check(isinstance(put, RoomPutStateResponse), f"sam sets the topic: {put}")
        await sync_until(alice, first(room, RoomTopicEvent, topic="changed on Synapse"), "sam's topic")
        check(alice.rooms[room].topic == "changed on Synapse", f"alice's room topic: {alice.rooms[room].topic}")

        # 2. Alice creates a room on Hearth and invites Sam; he joins, they chat, she leaves his room.
        created = await alice.room_create(name="Hearth side")
        check(isinstance(created, RoomCreateResponse), f"alice's createRoom: {created}")
        home = created.room_id
        invited = await alice.room_invite(home, sam.user_id)
        check(isinstance(invited, RoomInviteResponse), f"alice invites sam: {invited}")
        await sync_until(sam, first(home, InviteMemberEvent, state_key=sam.user_id), "alice's invite")
        joined = await sam.join(home)
        check(isinstance(joined, JoinResponse), f"sam joins alice's room: {joined}")
        await sync_until(alice, first(home, RoomMemberEvent, state_key=sam.user_id, membership="join"), "sam's join")
        await send_text(sam, home, "Synapse in Hearth's room")
        await sync_until(alice, first(home, RoomMessageText, body="Synapse in Hearth's room"), "sam's message")
        await send_text(alice, home, "Hearth in its own room")
        await sync_until(sam, first(home, RoomMessageText, body="Hearth in its own room"), "alice's message")
        left = await alice.room_leave(room)
        check(isinstance(left, RoomLeaveResponse), f"alice leaves sam's room: {left}")
        await sync_until(sam, first(room, RoomMemberEvent, state_key=alice.user_id, membership="leave"), "alice's leave")
        print("ok: invites, joins, messages, a topic change and a leave across Hearth and Synapse")
    finally:
        await alice.close()
        await sam.close()


asyncio.run(main())
