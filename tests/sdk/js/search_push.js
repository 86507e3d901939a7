// Drives Hearth's search and push with matrix-js-sdk as Element Web does: searchRoomEvents and its
// back-pagination, the push rules API (a keyword rule, disabling and re-enabling it), a pusher to a
// push gateway this script runs on loopback, and unread counts per thread with threadSupport (the
// SDK asks for unread_thread_notifications and sends threaded receipts). Run by tests/api/sdk.rs
// with HEARTH_URL set; exits non-zero on the first behaviour that differs.
import "./polyfill.js";
import http from "node:http";
import * as sdk from "matrix-js-sdk";
import { register as registerAt, startedClient as startAt } from "./helpers.js";

const baseUrl = process.env.HEARTH_URL;
if (!baseUrl) throw new Error("HEARTH_URL is not set");
const register = (localpart) => registerAt(baseUrl, localpart);
const startedClient = (account) => startAt(baseUrl, account, { threadSupport: true });

function check(condition, what) {
    if (!condition) throw new Error(what);
}

async function until(test, what, ms = 30000) {
    const end = Date.now() + ms;
    for (;;) {
        const value = await test();
        if (value) return value;
        if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
        await new Promise((resolve) => setTimeout(resolve, 50));
    }
}

// A push gateway: records every notification it is sent.
const pushes = [];
const gateway = http.createServer((request, response) => {
    let body = "";
    request.on("data", (chunk) => (body += chunk));
    request.on("end", () => {
        pushes.push({ path: request.url, body: JSON.parse(body) });
        response.writeHead(200, { "content-type": "application/json" });
        response.end(JSON.stringify({ rejected: [] }));
    });
});
await new Promise((resolve) => gateway.listen(0, "127.0.0.1", resolve));
const gatewayUrl = `http://127.0.0.1:${gateway.address().port}/_matrix/push/v1/notify`;

const aliceAccount = await register("alice");
const bobAccount = await register("bob");
const carolAccount = await register("carol");
const alice = await startedClient(aliceAccount);
const bob = await startedClient(bobAccount);

const { room_id: roomId } = await bob.createRoom({ preset: sdk.Preset.PublicChat, name: "Kitchen" });
await bob.joinRoom(roomId);
await alice.joinRoom(roomId);
// A third member: the room is not a one-to-one, so plain messages use the group rules.
const carol = sdk.createClient({ baseUrl, userId: carolAccount.user_id, accessToken: carolAccount.access_token });
await carol.joinRoom(roomId);

// Search: messages about soup, found by a stemmed word, paged back with the SDK.
for (let n = 0; n < 15; n++) await bob.sendTextMessage(roomId, `soups of the day, number ${n}`);
await bob.sendTextMessage(roomId, "nothing to find here");
const found = await alice.searchRoomEvents({ term: "soup" });
check(found.count === 15, `search count ${found.count}`);
check(found.highlights.includes("soup"), `highlights ${JSON.stringify(found.highlights)}`);
check(found.results.length === 10, `first page ${found.results.length}`);
const first = found.results[0].context.getEvent();
check(first.getContent().body === "soups of the day, number 14", `newest first: ${first.getContent().body}`);
check(first.getRoomId() === roomId, "result room");
// The SDK asks for one event of context on each side.
const timeline = found.results[1].context.getTimeline();
check(timeline.length === 3, `context of ${timeline.length} events`);
const more = await alice.backPaginateRoomEventsSearch(found);
check(more.results.length === 15, `after paging ${more.results.length}`);
const bodies = new Set(more.results.map((r) => r.context.getEvent().getContent().body));
check(bodies.size === 15, "no result twice");
check(!more.next_batch, "no further page");

// Push rules: the server defaults, then a keyword rule that highlights.
const rules = await alice.getPushRules();
check(rules.global.override.some((r) => r.rule_id === ".m.rule.is_user_mention"), "default override rules");
check(rules.global.underride.some((r) => r.rule_id === ".m.rule.message"), "default underride rules");
await alice.addPushRule("global", sdk.PushRuleKind.ContentSpecific, "tomato", {
    pattern: "tomato",
    actions: [sdk.PushRuleActionName.Notify, { set_tweak: sdk.TweakName.Highlight, value: true }],
});
await until(
    () => alice.pushRules?.global?.content?.some((r) => r.rule_id === "tomato"),
    "the new rule to reach alice's client as account data",
);
await alice.setPushRuleEnabled("global", sdk.PushRuleKind.ContentSpecific, "tomato", false);
const disabled = await alice.getPushRules();
check(disabled.global.content.find((r) => r.rule_id === "tomato")?.enabled === false, "rule disabled");
await alice.setPushRuleEnabled("global", sdk.PushRuleKind.ContentSpecific, "tomato", true);

// A pusher for alice's device, then alice's client goes away (a closed app).
await alice.setPusher({
    kind: "http",
    app_id: "org.example.sdk",
    pushkey: "alice-phone",
    app_display_name: "SDK test",
    device_display_name: "Phone",
    lang: "en",
    data: { url: gatewayUrl },
});
const { pushers } = await alice.getPushers();
check(pushers.length === 1 && pushers[0].pushkey === "alice-phone", `pushers ${JSON.stringify(pushers)}`);
// Read everything so far, so the counts below start at zero.
const aliceRoom = alice.getRoom(roomId);
await until(() => aliceRoom.getLiveTimeline().getEvents().some((e) => e.getContent().body === "nothing to find here"), "alice's timeline");
const lastSeen = aliceRoom.getLiveTimeline().getEvents().at(-1);
await alice.sendReadReceipt(lastSeen);
await until(() => aliceRoom.getUnreadNotificationCount(sdk.NotificationCountType.Total) === 0, "counts to clear");
alice.stopClient();

const { event_id: tomatoId } = await bob.sendTextMessage(roomId, "who has the tomato?");
const push = await until(() => pushes.find((p) => p.body.notification.event_id === tomatoId), "the push for the keyword");
const notification = push.body.notification;
check(push.path === "/_matrix/push/v1/notify", `push path ${push.path}`);
check(notification.devices[0].pushkey === "alice-phone", "pushkey");
check(notification.devices[0].tweaks.highlight === true, `tweaks ${JSON.stringify(notification.devices[0].tweaks)}`);
check(notification.content.body === "who has the tomato?", "content");
check(notification.room_name === "Kitchen", `room_name ${notification.room_name}`);
check(notification.counts.unread === 1, `badge ${JSON.stringify(notification.counts)}`);
check(notification.prio === "high", `prio ${notification.prio}`);

// Back in the app: the counts come with the sync, threads apart.
// (Carol's client does not sync: no remote echo races the SDK's own sending of thread replies.)
const { event_id: rootId } = await carol.sendTextMessage(roomId, "a thread about bread");
const inThread = { rel_type: "m.thread", event_id: rootId, is_falling_back: true, "m.in_reply_to": { event_id: rootId } };
await carol.sendMessage(roomId, { msgtype: "m.text", body: "rye or wheat?", "m.relates_to": inThread });
const { event_id: lastReplyId } = await carol.sendMessage(roomId, {
    msgtype: "m.text",
    body: "alice, rye?",
    "m.mentions": { user_ids: [aliceAccount.user_id] },
    "m.relates_to": inThread,
});
const alice2 = await startedClient(aliceAccount);
const room = alice2.getRoom(roomId);
await until(() => room.getThreadUnreadNotificationCount(rootId, sdk.NotificationCountType.Total) === 2, "thread count");
check(room.getThreadUnreadNotificationCount(rootId, sdk.NotificationCountType.Highlight) === 1, "thread highlight");
// Main timeline: the tomato message (a highlight) and the thread root.
check(room.getRoomUnreadNotificationCount(sdk.NotificationCountType.Total) === 2,
    `main count ${room.getRoomUnreadNotificationCount(sdk.NotificationCountType.Total)}`);

// Reading the thread clears the thread's counts only: the SDK sends the receipt with the
// reply's thread root as thread_id.
const fetched = await alice2.fetchRoomEvent(roomId, lastReplyId);
const reply = new sdk.MatrixEvent(fetched);
check(reply.threadRootId === rootId, `reply in thread ${reply.threadRootId}`);
await alice2.sendReadReceipt(reply);
await until(() => room.getThreadUnreadNotificationCount(rootId, sdk.NotificationCountType.Total) === 0, "thread count to clear");
check(room.getRoomUnreadNotificationCount(sdk.NotificationCountType.Total) === 2, "main count unchanged");
{
    // What the server says (the SDK also adjusts counts locally): the same.
    const filter = encodeURIComponent(JSON.stringify({ room: { timeline: { unread_thread_notifications: true } } }));
    const response = await fetch(`${baseUrl}/_matrix/client/v3/sync?filter=${filter}`, {
        headers: { authorization: `Bearer ${aliceAccount.access_token}` },
    });
    const joined = (await response.json()).rooms.join[roomId];
    check(joined.unread_notifications.notification_count === 2, `server main count ${JSON.stringify(joined.unread_notifications)}`);
    check(!joined.unread_thread_notifications?.[rootId], `server thread count ${JSON.stringify(joined.unread_thread_notifications)}`);
}

alice2.stopClient();
bob.stopClient();
gateway.close();
console.log("ok");
process.exit(0);
