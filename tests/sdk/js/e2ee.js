// End-to-end encryption with matrix-js-sdk's Rust crypto (@matrix-org/matrix-sdk-crypto-wasm, the
// stack Element Web ships): users set up cross-signing, an encrypted DM and a group of five
// exchange messages that every member decrypts, Alice and Bob verify each other by SAS emoji (so
// Alice's user-signing key signs Bob's master key), and a new device of Alice's restores the DM's
// history from the server-side key backup and decrypts it. Run by tests/api/sdk.rs with
// HEARTH_URL set (and HEARTH_URL_2 for a second, federated server: then Bob, Dave and Eve live
// there). Exits non-zero on the first behaviour that differs. Waits are deadlines on events.
import "./polyfill.js";
import * as sdk from "matrix-js-sdk";
import {
    CryptoEvent,
    VerificationPhase,
    VerificationRequestEvent,
    VerifierEvent,
} from "matrix-js-sdk/lib/crypto-api/index.js";

const firstUrl = process.env.HEARTH_URL;
if (!firstUrl) throw new Error("HEARTH_URL is not set");
const secondUrl = process.env.HEARTH_URL_2 || firstUrl;

function withDeadline(promise, what, ms = 60000) {
    let timer;
    const deadline = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    });
    return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/// Resolves once `check()` is truthy, re-checking whenever `client` emits `event`.
function until(client, events, check, what) {
    return withDeadline(
        new Promise((resolve, reject) => {
            const listener = async () => {
                try {
                    const value = await check();
                    if (value) {
                        for (const event of events) client.off(event, listener);
                        resolve(value);
                    }
                } catch (err) {
                    reject(err);
                }
            };
            for (const event of events) client.on(event, listener);
            listener();
        }),
        what,
    );
}

async function call(baseUrl, method, path, token, body) {
    const response = await fetch(`${baseUrl}${path}`, {
        method,
        headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
        body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = await response.json();
    return { status: response.status, json };
}

async function register(baseUrl, localpart) {
    const password = `pw-${localpart}-secret`;
    const { status, json } = await call(baseUrl, "POST", "/_matrix/client/v3/register", null, {
        username: localpart,
        password,
        auth: { type: "m.login.dummy" },
    });
    if (status !== 200) throw new Error(`register ${localpart}: ${status} ${JSON.stringify(json)}`);
    return { ...json, baseUrl, localpart, password };
}

async function login(account, deviceId) {
    const { status, json } = await call(account.baseUrl, "POST", "/_matrix/client/v3/login", null, {
        type: "m.login.password",
        identifier: { type: "m.id.user", user: account.localpart },
        password: account.password,
        device_id: deviceId,
    });
    if (status !== 200) throw new Error(`login ${account.localpart}: ${status} ${JSON.stringify(json)}`);
    return { ...account, ...json };
}

async function startedClient(account) {
    const client = sdk.createClient({
        baseUrl: account.baseUrl,
        userId: account.user_id,
        accessToken: account.access_token,
        deviceId: account.device_id,
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const prepared = new Promise((resolve, reject) => {
        client.on(sdk.ClientEvent.Sync, (state, _previous, data) => {
            if (state === sdk.SyncState.Prepared) resolve();
            if (state === sdk.SyncState.Error) reject(new Error(`sync error: ${data?.error}`));
        });
    });
    await client.startClient({ initialSyncLimit: 50 });
    await withDeadline(prepared, `${account.user_id} to reach PREPARED`);
    client.account = account;
    return client;
}

async function bootstrapCrossSigning(client) {
    const account = client.account;
    await client.getCrypto().bootstrapCrossSigning({
        authUploadDeviceSigningKeys: async (makeRequest) => {
            await makeRequest({
                type: "m.login.password",
                identifier: { type: "m.id.user", user: account.localpart },
                password: account.password,
            });
        },
    });
    const status = await client.getCrypto().getCrossSigningStatus();
    if (!status.publicKeysOnDevice || !status.privateKeysCachedLocally.masterKey) {
        throw new Error(`cross-signing not set up for ${account.user_id}: ${JSON.stringify(status)}`);
    }
}

function joinedMembers(client, roomId) {
    return client.getRoom(roomId)?.getJoinedMembers().map((m) => m.userId) ?? [];
}

/// Waits until every client sees every one of `users` joined to the room.
async function everyoneJoined(clients, roomId, users) {
    for (const client of clients) {
        await until(
            client,
            [sdk.RoomMemberEvent.Membership, sdk.ClientEvent.Room],
            () => users.every((u) => joinedMembers(client, roomId).includes(u)),
            `${client.getUserId()} to see everyone joined to ${roomId}`,
        ).catch((err) => {
            const room = client.getRoom(roomId);
            const members = room?.getMembers().map((m) => `${m.userId}=${m.membership}`);
            throw new Error(`${err.message}; it sees ${room?.getMyMembership()} and members ${members}`);
        });
    }
}

/// Waits until `client` has decrypted a message with `body` in the room, and checks that it
/// was encrypted on the wire and comes from `sender`.
async function decrypted(client, roomId, body, sender) {
    const find = () => {
        const events = client.getRoom(roomId)?.getLiveTimeline().getEvents() ?? [];
        return events.find((e) => e.isEncrypted() && !e.isDecryptionFailure() && e.getContent()?.body === body);
    };
    const event = await until(
        client,
        [sdk.MatrixEventEvent.Decrypted, sdk.RoomEvent.Timeline],
        find,
        `${client.getUserId()} to decrypt "${body}"`,
    );
    if (event.getSender() !== sender) throw new Error(`"${body}" came from ${event.getSender()}, not ${sender}`);
    if (event.getWireType() !== "m.room.encrypted") throw new Error(`"${body}" was not encrypted on the wire`);
    return event;
}

const encryption = { type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } };

async function acceptInvite(client, roomId) {
    await until(
        client,
        [sdk.RoomMemberEvent.Membership, sdk.ClientEvent.Room],
        () => client.getRoom(roomId)?.getMyMembership() === "invite",
        `${client.getUserId()} to be invited to ${roomId}`,
    );
    // Through the inviter's server, as Element does: a v12 room ID names no server.
    const inviter = client.getRoom(roomId).getMember(client.getUserId())?.events.member?.getSender();
    const viaServers = inviter ? [inviter.split(":").slice(1).join(":")] : [];
    await client.joinRoom(roomId, { viaServers });
}

// Users: Alice, Bob and Carol on the first server; Dave and Eve with Bob on the second (the same
// server unless HEARTH_URL_2 is set).
const suffix = Math.random().toString(36).slice(2, 8);
const aliceAccount = await register(firstUrl, `alice${suffix}`);
const bobAccount = await register(secondUrl, `bob${suffix}`);
const carolAccount = await register(firstUrl, `carol${suffix}`);
const daveAccount = await register(secondUrl, `dave${suffix}`);
const eveAccount = await register(secondUrl, `eve${suffix}`);
const alice = await startedClient(aliceAccount);
const bob = await startedClient(bobAccount);
await bootstrapCrossSigning(alice);
await bootstrapCrossSigning(bob);

// An encrypted DM, both ways.
const { room_id: dm } = await alice.createRoom({
    is_direct: true,
    invite: [bobAccount.user_id],
    preset: sdk.Preset.TrustedPrivateChat,
    initial_state: [encryption],
});
await acceptInvite(bob, dm);
await everyoneJoined([alice, bob], dm, [aliceAccount.user_id, bobAccount.user_id]);
const dmMessages = ["hello bob, this is secret", "a second secret", "🔐 with emoji"];
for (const text of dmMessages) await alice.sendTextMessage(dm, text);
for (const text of dmMessages) await decrypted(bob, dm, text, aliceAccount.user_id);
await bob.sendTextMessage(dm, "hi alice, got them all");
await decrypted(alice, dm, "hi alice, got them all", bobAccount.user_id);
console.log("dm: every message decrypted");

// Alice and Bob verify each other's devices by comparing emoji (SAS over to-device messages).
const bobRequestArrives = withDeadline(
    new Promise((resolve) => bob.once(CryptoEvent.VerificationRequestReceived, resolve)),
    "bob to receive the verification request",
);
const aliceRequest = await alice.getCrypto().requestDeviceVerification(bobAccount.user_id, bobAccount.device_id);
const bobRequest = await bobRequestArrives;
await bobRequest.accept();
await until(aliceRequest, [VerificationRequestEvent.Change], () => aliceRequest.phase === VerificationPhase.Ready, "the request to be ready");
const confirmSas = (verifier) => {
    const shown = verifier.getShowSasCallbacks();
    if (shown) shown.confirm();
    else verifier.once(VerifierEvent.ShowSas, (sas) => sas.confirm());
};
const aliceVerifier = await aliceRequest.startVerification("m.sas.v1");
confirmSas(aliceVerifier);
const aliceDone = aliceVerifier.verify();
const bobVerifier = await until(bobRequest, [VerificationRequestEvent.Change], () => bobRequest.verifier, "bob's verifier");
confirmSas(bobVerifier);
await withDeadline(Promise.all([aliceDone, bobVerifier.verify()]), "the SAS verification to finish");
const bobDeviceStatus = await alice.getCrypto().getDeviceVerificationStatus(bobAccount.user_id, bobAccount.device_id);
if (!bobDeviceStatus?.isVerified()) throw new Error(`alice does not trust bob's device: ${JSON.stringify(bobDeviceStatus)}`);
// Alice's user-signing key signed Bob's master key, and the server shows her that signature.
await until(
    alice,
    [sdk.ClientEvent.Sync],
    async () => {
        const { json } = await call(firstUrl, "POST", "/_matrix/client/v3/keys/query", aliceAccount.access_token, {
            device_keys: { [bobAccount.user_id]: [] },
        });
        return json.master_keys?.[bobAccount.user_id]?.signatures?.[aliceAccount.user_id];
    },
    "alice's signature of bob's master key on the server",
);
await until(
    alice,
    [CryptoEvent.UserTrustStatusChanged, sdk.ClientEvent.Sync],
    async () => (await alice.getCrypto().getUserVerificationStatus(bobAccount.user_id)).isCrossSigningVerified(),
    "alice to trust bob's identity",
).catch(async (err) => {
    const status = await alice.getCrypto().getUserVerificationStatus(bobAccount.user_id);
    const { json } = await call(firstUrl, "POST", "/_matrix/client/v3/keys/query", aliceAccount.access_token, {
        device_keys: { [bobAccount.user_id]: [], [aliceAccount.user_id]: [] },
    });
    throw new Error(`${err.message}: ${JSON.stringify(status)} keys ${JSON.stringify(json)}`);
});
console.log("verification: alice and bob verified each other");

// A group of five: everyone's messages decrypted by everyone else.
const carol = await startedClient(carolAccount);
const dave = await startedClient(daveAccount);
const eve = await startedClient(eveAccount);
const group = [alice, bob, carol, dave, eve];
const groupUsers = group.map((c) => c.getUserId());
const { room_id: groupRoom } = await alice.createRoom({
    name: "Five",
    invite: groupUsers.slice(1),
    preset: sdk.Preset.PrivateChat,
    initial_state: [encryption],
});
for (const client of group.slice(1)) await acceptInvite(client, groupRoom);
await everyoneJoined(group, groupRoom, groupUsers);
for (const client of group) await client.sendTextMessage(groupRoom, `group message from ${client.getUserId()}`);
for (const reader of group) {
    for (const writer of group) {
        if (reader === writer) continue;
        await decrypted(reader, groupRoom, `group message from ${writer.getUserId()}`, writer.getUserId());
    }
}
console.log("group: 20 of 20 messages decrypted");

// Key backup: Alice backs her room keys up, then a new device of hers (with her first device
// gone) restores them and reads the DM's history.
const aliceCrypto = alice.getCrypto();
await aliceCrypto.resetKeyBackup();
const backupVersion = await aliceCrypto.getActiveSessionBackupVersion();
if (!backupVersion) throw new Error("no active key backup after resetKeyBackup");
await until(
    alice,
    [CryptoEvent.KeyBackupSessionsRemaining, sdk.ClientEvent.Sync],
    async () => {
        const { json } = await call(firstUrl, "GET", `/_matrix/client/v3/room_keys/version/${backupVersion}`, aliceAccount.access_token);
        return json.count >= 2;
    },
    "alice's room keys in the backup",
);
const backupKey = await aliceCrypto.getSessionBackupPrivateKey();
for (const client of group) client.stopClient();

const aliceNew = await startedClient(await login(aliceAccount, `NEWDEVICE${suffix}`));
const newCrypto = aliceNew.getCrypto();
await newCrypto.storeSessionBackupPrivateKey(backupKey, backupVersion);
const restored = await newCrypto.restoreKeyBackup();
if (restored.imported < 2) throw new Error(`restored only ${restored.imported} of ${restored.total} keys`);
for (const text of dmMessages) await decrypted(aliceNew, dm, text, aliceAccount.user_id);
await decrypted(aliceNew, dm, "hi alice, got them all", bobAccount.user_id);
aliceNew.stopClient();
console.log(`backup: ${restored.imported} keys restored, the DM's history decrypted on a new device`);

console.log("ok");
process.exit(0);
