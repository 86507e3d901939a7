// What the matrix-js-sdk scripts share: deadlines on promises, registration through the dummy
// flow, and a client started until its sync state is PREPARED.
import * as sdk from "matrix-js-sdk";

export function withDeadline(promise, what, ms = 30000) {
    let timer;
    const deadline = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    });
    return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

export async function register(baseUrl, localpart) {
    const response = await fetch(`${baseUrl}/_matrix/client/v3/register`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ username: localpart, password: `pw-${localpart}-secret`, auth: { type: "m.login.dummy" } }),
    });
    const body = await response.json();
    if (response.status !== 200) throw new Error(`register ${localpart}: ${response.status} ${JSON.stringify(body)}`);
    return body;
}

// Starts a client for `account` with `startOptions` and waits until it is PREPARED.
export async function startedClient(baseUrl, account, startOptions = {}) {
    const client = sdk.createClient({
        baseUrl,
        userId: account.user_id,
        accessToken: account.access_token,
        deviceId: account.device_id,
    });
    const prepared = new Promise((resolve, reject) => {
        client.on(sdk.ClientEvent.Sync, (state, _previous, data) => {
            if (state === sdk.SyncState.Prepared) resolve();
            if (state === sdk.SyncState.Error) reject(new Error(`sync error: ${data?.error}`));
        });
    });
    await client.startClient({ initialSyncLimit: 10, ...startOptions });
    await withDeadline(prepared, `${account.user_id} to reach PREPARED`);
    return client;
}
