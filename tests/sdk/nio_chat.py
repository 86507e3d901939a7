"""Drives Hearth with matrix-nio as real users chatting: a DM between alice and bob, then a group.

Run by tests/api/sdk.rs with HEARTH_URL set. Every step is asserted through what the *other* user
receives over /sync (or fetches back), never through the sender's own response alone. Waits are
deadlines on sync, not sleeps. Exits non-zero (with a message) on the first behaviour that differs
from what the SDK and the spec expect.
"""

import asyncio
import os
import sys
import time

from nio import (
    AsyncClient,
    FullyReadEvent,
    InviteMemberEvent,
    JoinResponse,
    LogoutResponse,
    MessageDirection,
    ReactionEvent,
    ReceiptEvent,
    RedactedEvent,
    RedactionEvent,
    RegisterResponse,
    RoomCreateEvent,
    RoomCreateResponse,
    RoomGetEventResponse,
    RoomMemberEvent,
    RoomMessagesResponse,
    RoomPutStateResponse,
    RoomMessageText,
    RoomPreset,
    RoomReadMarkersResponse,
    RoomRedactResponse,
    RoomSendError,
    RoomSendResponse,
    RoomTypingResponse,
    SyncResponse,
    UpdateReceiptMarkerResponse,
)

ALICE, BOB, CAROL = "@alice:localhost", "@bob:localhost", "@carol:localhost"


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}", file=sys.stderr)
        sys.exit(1)


# Everything each client has received through sync, as (room_id, event) in arrival order: timeline,
# ephemeral and room account-data events of joined rooms, and the stripped state of invites.
SEEN = {}


async def sync_once(client, timeout_ms):
    response = await client.sync(timeout=timeout_ms)
    check(isinstance(response, SyncResponse), f"{client.user_id} sync: {response}")
    seen = SEEN.setdefault(client.user_id, [])
    for room_id, info in response.rooms.join.items():
        for event in info.timeline.events + info.ephemeral + info.account_data:
            seen.append((room_id, event))
    for room_id, info in response.rooms.invite.items():
        seen.extend((room_id, event) for event in info.invite_state)


async def sync_until(client, predicate, timeout=10, what="condition"):
    """Long-polls /sync until predicate(events seen so far) is truthy and returns its value.

    FAILs if the deadline passes first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate(SEEN.setdefault(client.user_id, []))
        if result:
            return result
        remaining = deadline - time.monotonic()
        check(remaining > 0, f"{client.user_id} did not see {what} within {timeout}s")
        await sync_once(client, int(min(remaining, 5) * 1000))


def first(room_id, cls, **fields):
    """A predicate for sync_until: the first event of class `cls` in `room_id` with those attributes."""

    def predicate(events):
        for rid, event in events:
            if rid == room_id and isinstance(event, cls):
                if all(getattr(event, k, None) == v for k, v in fields.items()):
                    return event
        return None

    return predicate


def receipt_from(room_id, user_id, event_id):
    """A predicate for sync_until: the receipt `user_id` sent for `event_id`, from m.receipt events."""

    def predicate(events):
        for rid, event in events:
            if rid == room_id and isinstance(event, ReceiptEvent):
                for receipt in event.receipts:
                    if receipt.user_id == user_id and receipt.event_id == event_id:
                        return receipt
        return None

    return predicate


def joined(client, room_id):
    room = client.rooms.get(room_id)
    return {u for u, member in room.users.items() if not member.invited} if room else set()


async def join(client, room_id):
    """nio's own join (it sends no request body, which Hearth accepts as `{}`)."""
    return await client.join(room_id)


async def send(client, room_id, content, event_type="m.room.message", tx_id=None):
    response = await client.room_send(room_id, event_type, content, tx_id=tx_id)
    check(isinstance(response, RoomSendResponse), f"{client.user_id} send {event_type}: {response}")
    return response.event_id


def text(body):
    return {"msgtype": "m.text", "body": body}


async def main():
    url = os.environ["HEARTH_URL"]

    # 1. Three users register (nio runs the m.login.dummy stage) and do an initial sync.
    clients = []
    for name in ("alice", "bob", "carol"):
        client = AsyncClient(url, name)
        registered = await client.register(name, f"{name} secret", device_name=f"{name}'s nio")
        check(isinstance(registered, RegisterResponse), f"register {name}: {registered}")
        check(client.logged_in and client.user_id == f"@{name}:localhost", f"{name} user id: {client.user_id}")
        await sync_once(client, 0)
        check(client.next_batch, f"{name}: initial sync gave no next_batch")
        clients.append(client)
    alice, bob, carol = clients

    # 2. DM: alice creates a direct, trusted private chat inviting bob. Bob's sync shows the invite,
    # flagged is_direct, and after he joins both see the other as a joined member.
    created = await alice.room_create(is_direct=True, preset=RoomPreset.trusted_private_chat, invite=[BOB])
    check(isinstance(created, RoomCreateResponse), f"create DM: {created}")
    dm = created.room_id
    invited = first(dm, InviteMemberEvent, state_key=BOB, membership="invite")
    invite = await sync_until(bob, invited, what="the DM invite")
    check(dm in bob.invited_rooms, f"bob's invited rooms: {list(bob.invited_rooms)}")
    check(invite.sender == ALICE, f"invite sender: {invite.sender}")
    check(invite.content.get("is_direct") is True, f"invite is_direct: {invite.content}")
    joined_dm = await join(bob, dm)
    check(isinstance(joined_dm, JoinResponse) and joined_dm.room_id == dm, f"bob joins DM: {joined_dm}")
    await sync_until(bob, lambda _: joined(bob, dm) == {ALICE, BOB}, what="alice and himself joined")
    await sync_until(alice, first(dm, RoomMemberEvent, state_key=BOB, membership="join"), what="bob's join")
    check(joined(alice, dm) == {ALICE, BOB}, f"alice's DM members: {joined(alice, dm)}")

    # 3. A formatted message with emoji (astral plane, ZWJ sequence, skin tone) arrives intact. A
    # retry with the same transaction ID (as after a lost response) is the same event, not a second.
    hello = {
        "msgtype": "m.text",
        "body": "Hi Bob 👋🏽 — **welcome** to 👩‍👩‍👧 Hearth!",
        "format": "org.matrix.custom.html",
        "formatted_body": "Hi Bob 👋🏽 — <strong>welcome</strong> to 👩‍👩‍👧 <em>Hearth</em>!",
    }
    hello_id = await send(alice, dm, hello, tx_id="hello-1")
    check(await send(alice, dm, hello, tx_id="hello-1") == hello_id, "a retried transaction made a new event")
    got = await sync_until(bob, first(dm, RoomMessageText, event_id=hello_id), what="alice's first message")
    check(got.sender == ALICE, f"message sender: {got.sender}")
    check(got.body == hello["body"], f"body: {got.body!r}")
    check(got.format == hello["format"], f"format: {got.format!r}")
    check(got.formatted_body == hello["formatted_body"], f"formatted_body: {got.formatted_body!r}")

    # 4. Typing: bob starts typing, alice's sync shows it; bob stops, alice sees the list empty.
    typing = await bob.room_typing(dm, True, timeout=30000)
    check(isinstance(typing, RoomTypingResponse), f"typing on: {typing}")
    await sync_until(alice, lambda _: alice.rooms[dm].typing_users == [BOB], what="bob typing")
    typing = await bob.room_typing(dm, False)
    check(isinstance(typing, RoomTypingResponse), f"typing off: {typing}")
    await sync_until(alice, lambda _: alice.rooms[dm].typing_users == [], what="bob stop typing")

    # 5. Read receipts: bob marks alice's next message read; alice gets an m.receipt naming him and
    # that event, and the private m.fully_read marker lands in bob's room account data only.
    question_id = await send(alice, dm, text("Did you read this? 📖"))
    await sync_until(bob, first(dm, RoomMessageText, event_id=question_id), what="the question")
    check(sum(e.event_id == hello_id for _, e in SEEN[BOB] if hasattr(e, "event_id")) == 1, "bob got hello twice")
    marked = await bob.room_read_markers(dm, fully_read_event=question_id, read_event=question_id)
    check(isinstance(marked, RoomReadMarkersResponse), f"read markers: {marked}")

    receipt = await sync_until(alice, receipt_from(dm, BOB, question_id), what="bob's read receipt")
    check(receipt.receipt_type == "m.read", f"receipt type: {receipt.receipt_type}")
    check(receipt.thread_id is None, f"/read_markers receipt should be unthreaded: {receipt.thread_id}")
    check(isinstance(receipt.timestamp, int) and receipt.timestamp > 0, f"receipt ts: {receipt.timestamp}")
    check(alice.rooms[dm].read_receipts[BOB].event_id == question_id, "alice's room state has bob's receipt")
    await sync_until(bob, first(dm, FullyReadEvent, event_id=question_id), what="his m.fully_read marker")
    check(not first(dm, FullyReadEvent)(SEEN[ALICE]), "alice was sent bob's private m.fully_read marker")

    # 6. Edits: alice replaces her first message; bob receives the m.replace event with m.new_content,
    # and fetching the original shows its content untouched with the edit bundled in unsigned.
    new_body = "Hi Bob 👋🏽 — welcome to Hearth! (edited ✏️)"
    edit = {
        "msgtype": "m.text",
        "body": f"* {new_body}",
        "m.new_content": text(new_body),
        "m.relates_to": {"rel_type": "m.replace", "event_id": hello_id},
    }
    edit_id = await send(alice, dm, edit)
    got = await sync_until(bob, first(dm, RoomMessageText, event_id=edit_id), what="the edit")
    content = got.source["content"]
    check(content.get("m.new_content") == text(new_body), f"m.new_content: {content.get('m.new_content')}")
    check(content.get("m.relates_to") == edit["m.relates_to"], f"m.relates_to: {content.get('m.relates_to')}")
    original = await bob.room_get_event(dm, hello_id)
    check(isinstance(original, RoomGetEventResponse), f"get edited event: {original}")
    check(original.event.body == hello["body"], f"original content was replaced: {original.event.source}")
    bundled = original.event.source.get("unsigned", {}).get("m.relations", {}).get("m.replace", {})
    check(bundled.get("event_id") == edit_id, f"bundled m.replace: {original.event.source.get('unsigned')}")

    # 7. Reactions: bob reacts 👍 to the first message and alice receives it; the same annotation a
    # second time (new transaction) is refused with M_DUPLICATE_ANNOTATION.
    thumbs = {"m.relates_to": {"rel_type": "m.annotation", "event_id": hello_id, "key": "👍"}}
    reaction_id = await send(bob, dm, thumbs, "m.reaction")
    got = await sync_until(alice, first(dm, ReactionEvent, event_id=reaction_id), what="bob's reaction")
    check(got.sender == BOB and got.reacts_to == hello_id and got.key == "👍", f"reaction: {got.source}")
    again = await bob.room_send(dm, "m.reaction", thumbs)
    check(isinstance(again, RoomSendError), f"duplicate reaction accepted: {again}")
    check(again.status_code == "M_DUPLICATE_ANNOTATION", f"duplicate reaction error: {again}")

    # 8. Redaction: alice redacts a message bob has seen; bob receives the m.room.redaction, and
    # fetching the message (single event and /messages) now gives it redacted, content stripped.
    oops_id = await send(alice, dm, text("oops, wrong chat 🙈"))
    await sync_until(bob, first(dm, RoomMessageText, event_id=oops_id), what="the message to be redacted")
    redacted = await alice.room_redact(dm, oops_id, reason="wrong chat")
    check(isinstance(redacted, RoomRedactResponse), f"redact: {redacted}")
    got = await sync_until(bob, first(dm, RedactionEvent, redacts=oops_id), what="the redaction")
    check(got.sender == ALICE and got.reason == "wrong chat", f"redaction: {got.source}")
    fetched = await bob.room_get_event(dm, oops_id)
    check(isinstance(fetched, RoomGetEventResponse), f"get redacted event: {fetched}")
    check(isinstance(fetched.event, RedactedEvent), f"fetched event not redacted: {fetched.event}")
    check(fetched.event.source["content"] == {}, f"redacted content: {fetched.event.source['content']}")
    check(fetched.event.redacter == ALICE and fetched.event.reason == "wrong chat", f"redacted: {fetched.event}")
    page = await bob.room_messages(dm, start=bob.next_batch, limit=5)
    check(isinstance(page, RoomMessagesResponse), f"DM messages: {page}")
    in_page = [e for e in page.chunk if e.event_id == oops_id]
    check(len(in_page) == 1 and isinstance(in_page[0], RedactedEvent), f"/messages shows: {in_page}")
    # Alice's own stream, past her redaction, holds exactly one 👍 from bob: the duplicate never landed.
    await sync_until(alice, first(dm, RedactionEvent, redacts=oops_id), what="her own redaction")
    reactions = [e for r, e in SEEN[ALICE] if r == dm and isinstance(e, ReactionEvent)]
    check([e.event_id for e in reactions] == [reaction_id], f"alice saw reactions: {reactions}")

    # 9. Group: a named public room; bob and carol join by room ID; all three talk at once, and every
    # member's sync shows the three messages in one and the same order. Carol then marks the last one
    # read with a (main-thread) receipt, which both others receive.
    name = "Hearth regulars 🔥"
    created = await alice.room_create(name=name, preset=RoomPreset.public_chat)
    check(isinstance(created, RoomCreateResponse), f"create group: {created}")
    group = created.room_id
    for client in (bob, carol):
        joined_group = await join(client, group)
        check(isinstance(joined_group, JoinResponse), f"{client.user_id} joins group: {joined_group}")
    everyone = {ALICE, BOB, CAROL}
    for client in clients:
        await sync_until(client, lambda _, c=client: joined(c, group) == everyone, what="all three joined")
        check(client.rooms[group].name == name, f"{client.user_id} sees room name {client.rooms[group].name!r}")
    # Alice sets the topic (a state event with an empty state key); the others see it.
    topic = "Where Hearth people hang out"
    put = await alice.room_put_state(group, "m.room.topic", {"topic": topic})
    check(isinstance(put, RoomPutStateResponse), f"set topic: {put}")
    for client in (bob, carol):
        await sync_until(client, lambda _, c=client: c.rooms[group].topic == topic, what="the new topic")
    greetings = {c.user_id: f"hello from {c.user}" for c in clients}
    await asyncio.gather(*(send(c, group, text(greetings[c.user_id])) for c in clients))

    def greeting_order(events):
        order = [(e.sender, e.body, e.event_id) for r, e in events if r == group and isinstance(e, RoomMessageText)]
        return order if len(order) == 3 else None

    orders = [await sync_until(c, greeting_order, what="the three greetings") for c in clients]
    check(sorted(o[:2] for o in orders[0]) == sorted(greetings.items()), f"greetings: {orders[0]}")
    check(orders[0] == orders[1] == orders[2], f"members disagree on order: {orders}")
    last_id = orders[0][-1][2]
    marked = await carol.update_receipt_marker(group, last_id)
    check(isinstance(marked, UpdateReceiptMarkerResponse), f"carol's receipt: {marked}")
    for client in (alice, bob):
        receipt = await sync_until(client, receipt_from(group, CAROL, last_id), what="carol's receipt")
        check(receipt.receipt_type == "m.read" and receipt.thread_id == "main", f"carol's receipt: {receipt}")

    # 10. Pagination: alice sends 30 numbered messages; bob, once his sync has the last one, pages
    # back from his sync token 10 at a time following `end`: 30..1 exactly, then on to the room's
    # creation, where `end` is omitted. No event comes twice.
    for n in range(1, 31):
        await send(alice, group, text(f"message {n}"))
    await sync_until(bob, first(group, RoomMessageText, body="message 30"), what="message 30")
    token, numbered, event_ids, pages, reached_create = bob.next_batch, [], [], 0, False
    while token:
        pages += 1
        check(pages <= 10, f"still paging after {pages - 1} pages")
        page = await bob.room_messages(group, start=token, limit=10, direction=MessageDirection.back)
        check(isinstance(page, RoomMessagesResponse), f"page {pages}: {page}")
        check(len(page.chunk) <= 10, f"page {pages}: {len(page.chunk)} events for limit=10")
        event_ids += [e.event_id for e in page.chunk]
        reached_create = reached_create or any(isinstance(e, RoomCreateEvent) for e in page.chunk)
        numbered += [e.body for e in page.chunk if isinstance(e, RoomMessageText) and e.body.startswith("message ")]
        if pages == 1:
            check(numbered == [f"message {n}" for n in range(30, 20, -1)], f"first page: {numbered}")
        check(page.end != token, f"page {pages}: end token did not move")
        token = page.end
    check(numbered == [f"message {n}" for n in range(30, 0, -1)], f"paginated: {numbered}")
    check(len(event_ids) == len(set(event_ids)), "an event came twice while paginating")
    check(reached_create, "pagination never reached m.room.create")

    # 11. Everyone logs out.
    for client in clients:
        check(isinstance(await client.logout(), LogoutResponse), f"{client.user_id} logout")
        await client.close()
    print("nio chat flow OK")


asyncio.run(main())
