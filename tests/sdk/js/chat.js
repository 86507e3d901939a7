// Drives Hearth with matrix-js-sdk as Element Web does: startClient until the sync state is
// PREPARED, a DM (createRoom with is_direct and an invite), the invitee joining from its own client,
// and a message that must arrive on the other client's timeline. Run by tests/api/sdk.rs with
// HEARTH_URL set; exits non-zero on the first behaviour that differs. Waits are deadlines on events,
// never sleeps. No crypto is initialised.
import "./polyfill.js";
import * as sdk from "matrix-js-sdk";
import { register as registerAt, startedClient as startAt, withDeadline } from "./helpers.js";

const baseUrl = process.env.HEARTH_URL;
if (!baseUrl) throw new Error("HEARTH_URL is not set");
const register = (localpart) => registerAt(baseUrl, localpart);
const startedClient = (account) => startAt(baseUrl, account);

function waitFor(client, event, predicate, what) {
    return withDeadline(
        new Promise((resolve) => {
            const listener = (...args) => {
                if (predicate(...args)) {
                    client.off(event, listener);
                    resolve(args);
                }
            };
            client.on(event, listener);
        }),
        what,
    );
}

const aliceAccount = await register("alice");
const bobAccount = await register("bob");
const alice = await startedClient(aliceAccount);
const bob = await startedClient(bobAccount);

const bobInvited = waitFor(
    bob,
    sdk.RoomMemberEvent.Membership,
    (_event, member) => member.userId === bobAccount.user_id && member.membership === "invite",
    "bob to see his invite",
);
const { room_id: roomId } = await alice.createRoom({
    is_direct: true,
    invite: [bobAccount.user_id],
    preset: sdk.Preset.TrustedPrivateChat,
});
await bobInvited;
const invite = bob.getRoom(roomId)?.getMember(bobAccount.user_id);
if (invite?.membership !== "invite") throw new Error(`bob's room has no invite: ${invite?.membership}`);
if (!invite.events.member?.getContent().is_direct) throw new Error("the invite is not marked is_direct");

const aliceSeesJoin = waitFor(
    alice,
    sdk.RoomMemberEvent.Membership,
    (_event, member) => member.roomId === roomId && member.userId === bobAccount.user_id && member.membership === "join",
    "alice to see bob join",
);
await bob.joinRoom(roomId);
await aliceSeesJoin;

const bobGetsMessage = waitFor(
    bob,
    sdk.RoomEvent.Timeline,
    (event, room) => room?.roomId === roomId && event.getType() === "m.room.message" && event.getContent().body === "hello from js",
    "bob to receive alice's message",
);
const { event_id: eventId } = await alice.sendTextMessage(roomId, "hello from js");
const [received] = await bobGetsMessage;
if (received.getId() !== eventId) throw new Error(`bob got ${received.getId()}, alice sent ${eventId}`);
if (received.getSender() !== aliceAccount.user_id) throw new Error(`wrong sender ${received.getSender()}`);

alice.stopClient();
bob.stopClient();
console.log("ok");
process.exit(0);
