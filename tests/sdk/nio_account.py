"""Drives Hearth's account API with matrix-nio, a client SDK that bots and apps ship with.

Run by tests/api/sdk.rs with HEARTH_URL set. Exits non-zero (with a message) on the first
behaviour that differs from what the SDK expects.
"""

import asyncio
import os
import sys

from nio import (
    AsyncClient,
    DevicesResponse,
    LoginResponse,
    LogoutResponse,
    ProfileGetAvatarResponse,
    ProfileGetDisplayNameResponse,
    ProfileGetResponse,
    ProfileSetAvatarResponse,
    ProfileSetDisplayNameResponse,
    RegisterResponse,
    WhoamiError,
    WhoamiResponse,
)


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}", file=sys.stderr)
        sys.exit(1)


async def main():
    url = os.environ["HEARTH_URL"]

    # Register (nio runs the m.login.dummy UIA stage itself).
    client = AsyncClient(url, "alice")
    registered = await client.register("alice", "correct horse", device_name="nio laptop")
    check(isinstance(registered, RegisterResponse), f"register: {registered}")
    check(registered.user_id == "@alice:localhost", f"user id: {registered.user_id}")
    await client.close()

    # Log in on a second device with the localpart.
    client = AsyncClient(url, "alice")
    login = await client.login("correct horse", device_name="nio phone")
    check(isinstance(login, LoginResponse), f"login: {login}")
    check(client.logged_in and client.user_id == "@alice:localhost", "logged in as alice")

    whoami = await client.whoami()
    check(isinstance(whoami, WhoamiResponse), f"whoami: {whoami}")
    check(whoami.user_id == "@alice:localhost", f"whoami user: {whoami.user_id}")
    check(whoami.device_id == login.device_id, f"whoami device: {whoami.device_id}")

    # Profile.
    check(isinstance(await client.set_displayname("Alice 🌸"), ProfileSetDisplayNameResponse), "set displayname")
    name = await client.get_displayname()
    check(isinstance(name, ProfileGetDisplayNameResponse) and name.displayname == "Alice 🌸", f"displayname: {name}")
    check(isinstance(await client.set_avatar("mxc://localhost/avatar1"), ProfileSetAvatarResponse), "set avatar")
    avatar = await client.get_avatar()
    check(isinstance(avatar, ProfileGetAvatarResponse) and avatar.avatar_url == "mxc://localhost/avatar1", f"avatar: {avatar}")
    profile = await client.get_profile("@alice:localhost")
    check(isinstance(profile, ProfileGetResponse), f"profile: {profile}")
    check(profile.displayname == "Alice 🌸" and profile.avatar_url == "mxc://localhost/avatar1", f"profile: {profile}")

    # Both devices are listed.
    devices = await client.devices()
    check(isinstance(devices, DevicesResponse), f"devices: {devices}")
    names = sorted(d.display_name for d in devices.devices)
    check(names == ["nio laptop", "nio phone"], f"device names: {names}")

    # Log out: the token stops working.
    token = client.access_token
    check(isinstance(await client.logout(), LogoutResponse), "logout")
    client.access_token = token
    after = await client.whoami()
    check(isinstance(after, WhoamiError) and after.status_code == "M_UNKNOWN_TOKEN", f"whoami after logout: {after}")
    await client.close()
    print("nio account flow OK")


asyncio.run(main())
