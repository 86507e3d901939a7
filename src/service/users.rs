//! Accounts: registration, login and tokens, devices, passwords, deactivation and profiles, for
//! clients (through the API) and operators (through the CLI).
//!
//! Passwords are hashed with argon2id on the blocking pool. Access and refresh tokens are random,
//! handed to the client once, and stored only as SHA-256 hashes.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use argon2::{
    Argon2,
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
};
use parking_lot::Mutex;
use rand::Rng;
use ruma::{
    DeviceId, OwnedDeviceId, OwnedServerName, OwnedUserId, UserId,
    api::client::uiaa::{AuthData, UserIdentifier},
};
use sha2::{Digest, Sha256};

use crate::{
    config::{Config, RegistrationMode},
    error::{Error, Result},
    matrix::identifiers::{user_id_for_login, user_id_for_registration},
    service::{
        edus::{DeviceListUpdate, Edus},
        now_ms,
        rate_limit::FailureLimit,
        stream::Streams,
        uia::{self, Uia},
    },
    storage::{
        Db, StorageError,
        accounts::{AccessTokenRow, DeviceRow, NewSession, NewUser, RegistrationTokenRow, UserRow},
        stream::StreamWrite,
    },
};

/// Longest password accepted; argon2 would hash more, but nothing legitimate needs it.
const MAX_PASSWORD_LEN: usize = 512;
/// Device last-seen times are written at most this often per device.
const LAST_SEEN_WRITE_INTERVAL_MS: i64 = 60_000;

/// Who a valid access token belongs to.
#[derive(Debug, Clone)]
pub struct Authed {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub is_guest: bool,
    pub token_id: i64,
    /// When the access token expires (tokens of clients using refresh tokens).
    pub expires_ts: Option<i64>,
}

/// A new logged-in session, as returned by register, login and refresh.
#[derive(Debug)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in: Option<Duration>,
}

/// What a registration request asks for.
pub struct Registration {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<OwnedDeviceId>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    pub refresh_token: bool,
    pub is_guest: bool,
    pub auth: Option<AuthData>,
}

pub enum Registered {
    /// `inhibit_login` was set: an account but no session.
    AccountOnly(OwnedUserId),
    LoggedIn(Session),
}

/// How long a cached access token is trusted without reading it again.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);
struct TokenCache {
    entries: lru::LruCache<String, (Instant, AccessTokenRow)>,
    /// Counts [`Users::forget_tokens`] calls.
    generation: u64,
}

/// Most access tokens cached at once.
const TOKEN_CACHE_ENTRIES: std::num::NonZeroUsize = std::num::NonZeroUsize::new(100_000).unwrap();

pub struct Users {
    db: Db,
    uia: Uia,
    server_name: OwnedServerName,
    registration: RegistrationMode,
    guest_access: bool,
    access_token_lifetime: Duration,
    refresh_token_lifetime: Option<Duration>,
    /// Wrong passwords per account (login and the UIA password stage), checked before verifying.
    failed_logins: FailureLimit,
    last_seen_written: Mutex<HashMap<i64, i64>>,
    /// Resolved access tokens by token hash, with when they were read: every request
    /// authenticates, and this spares most of them a query. Cleared whenever this process ends a
    /// session; entries older than [`TOKEN_CACHE_TTL`] are read again, which bounds how long a
    /// change made by another process (the operator commands) takes to apply.
    token_cache: Mutex<TokenCache>,
    /// Where device-list changes are announced (absent for operator commands, which must not
    /// write to the streams of a running server).
    streams: Option<Arc<Streams>>,
    /// Tells the servers sharing a room with a user that their devices changed (federation).
    edus: std::sync::OnceLock<Arc<Edus>>,
}

impl Users {
    pub fn new(db: Db, config: &Config) -> Self {
        let limits = &config.rate_limits;
        Users {
            uia: Uia::new(db.clone()),
            db,
            server_name: config.server_name.clone(),
            registration: config.registration_mode(),
            guest_access: config.registration.guest_access,
            access_token_lifetime: Duration::from_secs(config.auth.refreshable_access_token_lifetime_secs),
            refresh_token_lifetime: config.auth.refresh_token_lifetime_secs.map(Duration::from_secs),
            failed_logins: FailureLimit::new(limits.enabled.then_some(limits.failed_login_per_account)),
            last_seen_written: Mutex::new(HashMap::new()),
            token_cache: Mutex::new(TokenCache { entries: lru::LruCache::new(TOKEN_CACHE_ENTRIES), generation: 0 }),
            streams: None,
            edus: std::sync::OnceLock::new(),
        }
    }

    /// Announces device-list changes through `streams`.
    pub fn with_streams(mut self, streams: Arc<Streams>) -> Self {
        self.streams = Some(streams);
        self
    }

    /// Device changes also go to other servers, through `edus`.
    pub fn set_edus(&self, edus: Arc<Edus>) {
        let _ = self.edus.set(edus);
    }

    /// Tells the user's contacts (through sync's `device_lists`) that their devices changed,
    /// and the servers sharing a room with the user, one `m.device_list_update` per device, each
    /// change with a position of its own (its `stream_id`).
    async fn device_list_changed(&self, user_id: &UserId, devices: &[DeviceNews<'_>]) {
        let Some(streams) = &self.streams else { return };
        let record = || streams.persist(vec![StreamWrite::DeviceListChange { user_id: user_id.to_owned() }]);
        if devices.is_empty() {
            if let Err(err) = record().await {
                tracing::warn!(%user_id, %err, "could not record a device-list change");
            }
            return;
        }
        for device in devices {
            let stream_id = match record().await {
                Ok(pos) => pos,
                Err(err) => {
                    tracing::warn!(%user_id, %err, "could not record a device-list change");
                    return;
                }
            };
            let Some(edus) = self.edus.get() else { continue };
            let prev_id = self.db.previous_device_list_change(user_id, stream_id).await.unwrap_or(0);
            let keys = if device.is_deleted {
                None
            } else {
                crate::service::e2ee::signed_device_keys(&self.db, user_id, device.device_id).await.unwrap_or_else(
                    |err| {
                        tracing::warn!(%user_id, %err, "could not read a device's keys");
                        None
                    },
                )
            };
            edus.device_list_update(DeviceListUpdate {
                user_id,
                device_id: device.device_id,
                display_name: device.display_name,
                is_deleted: device.is_deleted,
                stream_id,
                prev_id,
                keys,
            })
            .await;
        }
    }

    /// A device's identity keys changed (uploaded, or signed by the user's self-signing key):
    /// the user's contacts look at them again, other servers get the device's news with its keys.
    pub async fn announce_device_keys(&self, user_id: &UserId, device_id: &DeviceId) {
        let name = match self.db.device(user_id, device_id).await {
            Ok(Some(row)) => row.display_name,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(%user_id, %err, "could not read a device");
                return;
            }
        };
        let news = DeviceNews { device_id: device_id.as_str(), display_name: name.as_deref(), is_deleted: false };
        self.device_list_changed(user_id, &[news]).await;
    }

    /// The user's cross-signing keys or their signatures changed: a device-list change for
    /// local clients (other servers hear of it through `m.signing_key_update`).
    pub async fn announce_user_keys(&self, user_id: &UserId) {
        self.device_list_changed(user_id, &[]).await;
    }

    /// User-interactive auth by password for a sensitive operation of the caller's own account;
    /// `finish_auth` ends the session once the operation succeeded.
    pub async fn authorize_operation(
        &self,
        authed: &Authed,
        operation: &str,
        auth: Option<&AuthData>,
    ) -> Result<uia::Completed> {
        self.authorize_with_password(authed, operation, auth).await
    }

    pub async fn finish_auth(&self, completed: uia::Completed) -> Result<()> {
        self.uia.finish(completed).await
    }

    /// Creates a device that has no access token (a dehydrated device), or names an existing one.
    pub async fn create_tokenless_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        display_name: Option<&str>,
    ) -> Result<()> {
        self.db.create_tokenless_device(user_id, device_id.as_str(), display_name, now_ms()).await?;
        Ok(())
    }

    /// Deletes devices the user controls without a session of their own (a dehydrated device
    /// being replaced), telling their contacts as a deletion from `/devices` does.
    pub async fn remove_devices_without_auth(&self, user_id: &UserId, device_ids: &[OwnedDeviceId]) -> Result<()> {
        self.db.delete_devices(user_id, device_ids).await?;
        self.forget_tokens();
        let news: Vec<DeviceNews> = device_ids.iter().map(|id| DeviceNews::deleted(id.as_str())).collect();
        self.device_list_changed(user_id, &news).await;
        Ok(())
    }

    /// Deactivated local accounts (their room memberships are cleaned up by the server).
    pub async fn deactivated_users(&self) -> Result<Vec<OwnedUserId>> {
        Ok(self.db.list_users().await?.into_iter().filter(|u| u.deactivated).map(|u| u.user_id).collect())
    }

    pub fn server_name(&self) -> &OwnedServerName {
        &self.server_name
    }

    pub fn registration_mode(&self) -> RegistrationMode {
        self.registration
    }

    /// Resolves an access token. Expired tokens are a soft logout: the client should refresh.
    pub async fn authenticate(&self, token: &str, ip: Option<IpAddr>) -> Result<Authed> {
        let hash = hash_token(token);
        let (cached, generation) = {
            let mut cache = self.token_cache.lock();
            let entry = cache.entries.get(&hash).filter(|(at, _)| at.elapsed() < TOKEN_CACHE_TTL).cloned();
            (entry, cache.generation)
        };
        let mut row = match cached {
            Some((_, row)) => row,
            None => {
                let read_at = Instant::now();
                let row = self.db.access_token(&hash).await?.ok_or(Error::UnknownToken { soft_logout: false })?;
                // Cached only once nothing is left to do on first use (below).
                if row.used || row.refresh_token_id.is_none() {
                    self.cache_token(generation, hash.clone(), read_at, &row);
                }
                row
            }
        };
        let now = now_ms();
        if row.expires_ts.is_some_and(|expiry| expiry <= now) {
            return Err(Error::UnknownToken { soft_logout: true });
        }
        if !row.used && row.refresh_token_id.is_some() {
            let read_at = Instant::now();
            self.db.mark_access_token_used(row.id, row.refresh_token_id).await?;
            row.used = true;
            self.cache_token(generation, hash, read_at, &row);
        }
        self.note_seen(&row, now, ip).await;
        Ok(Authed {
            user_id: row.user_id,
            device_id: row.device_id,
            is_guest: row.is_guest,
            token_id: row.id,
            expires_ts: row.expires_ts,
        })
    }

    /// Drops every cached token after this process ended sessions (logout, device deletion,
    /// deactivation, a new login or refresh on a device). Rare next to requests, so simply all.
    fn forget_tokens(&self) {
        let mut cache = self.token_cache.lock();
        cache.entries.clear();
        cache.generation += 1;
    }

    /// Caches a token row read while the cache was at `generation`; a row read before sessions
    /// ended (the generation moved on since) may be stale and is not kept.
    fn cache_token(&self, generation: u64, hash: String, read_at: Instant, row: &AccessTokenRow) {
        let mut cache = self.token_cache.lock();
        if cache.generation == generation {
            cache.entries.put(hash, (read_at, row.clone()));
        }
    }

    async fn note_seen(&self, row: &AccessTokenRow, now: i64, ip: Option<IpAddr>) {
        {
            let mut written = self.last_seen_written.lock();
            match written.get(&row.id) {
                Some(&at) if now - at < LAST_SEEN_WRITE_INTERVAL_MS => return,
                _ => {
                    if written.len() > 100_000 {
                        written.retain(|_, at| now - *at < LAST_SEEN_WRITE_INTERVAL_MS);
                    }
                    written.insert(row.id, now);
                }
            }
        }
        let ip = ip.map(|ip| ip.to_string());
        if let Err(err) = self.db.touch_device(&row.user_id, &row.device_id, now, ip.as_deref()).await {
            tracing::warn!(%err, "could not record device last-seen time");
        }
    }

    /// Whether a device still exists (it is deleted by logout, device deletion, deactivation).
    pub async fn device_exists(&self, user_id: &UserId, device_id: &DeviceId) -> Result<bool> {
        Ok(self.db.device(user_id, device_id).await?.is_some())
    }

    /// `GET /register/available`: Ok if `localpart` could be registered now.
    pub async fn check_username_available(&self, localpart: &str) -> Result<()> {
        if self.registration == RegistrationMode::Disabled {
            return Err(Error::forbidden("Registration has been disabled"));
        }
        let user_id = self.valid_new_user_id(localpart)?;
        if self.db.localpart_exists(user_id.localpart()).await? {
            return Err(Error::UserInUse);
        }
        Ok(())
    }

    fn valid_new_user_id(&self, localpart: &str) -> Result<OwnedUserId> {
        user_id_for_registration(localpart, &self.server_name)
            .map_err(|why| Error::InvalidUsername(why.to_string().into()))
    }

    /// `POST /register`, including its user-interactive auth.
    pub async fn register(&self, request: Registration, ip: Option<IpAddr>) -> Result<Registered> {
        if request.is_guest {
            return self.register_guest(request, ip).await;
        }
        let flows: &[&[&'static str]] = match self.registration {
            RegistrationMode::Disabled => return Err(Error::forbidden("Registration has been disabled")),
            RegistrationMode::Open => &[&[uia::DUMMY]],
            RegistrationMode::Token => &[&[uia::REGISTRATION_TOKEN]],
        };
        // Check the name and password before any auth stage, so the client learns early.
        let user_id = match &request.username {
            Some(name) => {
                let user_id = self.valid_new_user_id(name)?;
                if self.db.localpart_exists(user_id.localpart()).await? {
                    return Err(Error::UserInUse);
                }
                Some(user_id)
            }
            None => None,
        };
        if let Some(password) = &request.password {
            check_password_rules(password)?;
        }
        let completed = self
            .uia
            .authorize("register", flows, request.auth.as_ref(), async |_: &UserIdentifier, _: &str| Ok(false))
            .await?;

        let password_hash = match request.password.clone() {
            Some(password) => Some(hash_password(password).await?),
            None => None,
        };
        let user_id = match user_id {
            Some(user_id) => user_id,
            None => self.unused_user_id(|| format!("u{}", random_lowercase(10))).await?,
        };
        let registered = self.create_account(&user_id, password_hash.as_deref(), false, false, &request, ip).await?;
        self.uia.finish(completed).await?;
        // A new account shares no room yet: nobody else needs the device itself.
        self.device_list_changed(&user_id, &[]).await;
        tracing::info!(user_id = %user_id, "registered a new account");
        Ok(registered)
    }

    async fn register_guest(&self, request: Registration, ip: Option<IpAddr>) -> Result<Registered> {
        if !self.guest_access {
            return Err(Error::GuestAccessForbidden);
        }
        let user_id =
            self.unused_user_id(|| rand::thread_rng().gen_range(100_000_000u64..10_000_000_000).to_string()).await?;
        self.create_account(&user_id, None, false, true, &request, ip).await
    }

    async fn unused_user_id(&self, mut candidate: impl FnMut() -> String) -> Result<OwnedUserId> {
        for _ in 0..10 {
            let localpart = candidate();
            if !self.db.localpart_exists(&localpart).await? {
                return UserId::parse(format!("@{localpart}:{}", self.server_name))
                    .map_err(|err| Error::Internal(err.to_string()));
            }
        }
        Err(Error::Internal("could not find a free user ID".to_owned()))
    }

    async fn create_account(
        &self,
        user_id: &UserId,
        password_hash: Option<&str>,
        is_admin: bool,
        is_guest: bool,
        request: &Registration,
        ip: Option<IpAddr>,
    ) -> Result<Registered> {
        let now = now_ms();
        let user = NewUser { user_id, password_hash, is_admin, is_guest, displayname: Some(user_id.localpart()), now };
        let result = if request.inhibit_login {
            self.db.create_account(&user, None).await.map(|()| Registered::AccountOnly(user_id.to_owned()))
        } else {
            let device_id = request.device_id.clone().unwrap_or_else(new_device_id);
            let issued = IssuedTokens::new(request.refresh_token, self, now);
            let ip = ip.map(|ip| ip.to_string());
            let session =
                issued.new_session(&device_id, request.initial_device_display_name.as_deref(), ip.as_deref(), now);
            self.db.create_account(&user, Some(&session)).await.map(|()| {
                Registered::LoggedIn(issued.into_session(user_id.to_owned(), device_id, self.access_token_lifetime))
            })
        };
        result.map_err(|err| match err {
            StorageError::Conflict(_) => Error::UserInUse,
            other => other.into(),
        })
    }

    /// `POST /login` with `m.login.password`.
    pub async fn login_with_password(
        &self,
        identifier: &str,
        password: &str,
        device_id: Option<OwnedDeviceId>,
        initial_device_display_name: Option<&str>,
        wants_refresh_token: bool,
        ip: Option<IpAddr>,
    ) -> Result<Session> {
        let invalid = || Error::forbidden("Invalid username or password");
        let user_id = user_id_for_login(identifier, &self.server_name).ok_or_else(invalid)?;
        // A locked-out account is refused before its password is looked at, so guessing on
        // during the lockout learns nothing, not even from a right guess.
        self.failed_logins.check(user_id.as_str())?;
        let user = self.db.user(&user_id).await?;
        let matches = match &user {
            Some(user) if user.deactivated => return Err(Error::UserDeactivated),
            Some(user) => self.password_matches(user, password).await?,
            // An unknown name costs a hash too: answering sooner would tell which names exist.
            None => verify_password(None, password).await?,
        };
        let Some(user) = user.filter(|_| matches) else {
            self.failed_logins.record_failure(user_id.as_str());
            return Err(invalid());
        };
        let now = now_ms();
        let device_id = device_id.unwrap_or_else(new_device_id);
        let issued = IssuedTokens::new(wants_refresh_token, self, now);
        let ip = ip.map(|ip| ip.to_string());
        let session = issued.new_session(&device_id, initial_device_display_name, ip.as_deref(), now);
        self.db.create_session(&user.user_id, &session).await?;
        self.forget_tokens();
        let news =
            DeviceNews { device_id: device_id.as_str(), display_name: initial_device_display_name, is_deleted: false };
        self.device_list_changed(&user.user_id, &[news]).await;
        tracing::info!(user_id = %user.user_id, device_id = %device_id, "logged in");
        Ok(issued.into_session(user.user_id, device_id, self.access_token_lifetime))
    }

    async fn password_matches(&self, user: &UserRow, password: &str) -> Result<bool> {
        verify_password(user.password_hash.clone(), password).await
    }

    /// `POST /refresh`: a new access/refresh pair for a valid refresh token.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Session> {
        let unknown = Error::UnknownToken { soft_logout: false };
        let row = self.db.refresh_token(&hash_token(refresh_token)).await?.ok_or(unknown)?;
        let now = now_ms();
        if row.expires_ts.is_some_and(|expiry| expiry <= now) {
            return Err(Error::UnknownToken { soft_logout: false });
        }
        // Using this token proves the client received it, so the one it replaced is spent.
        self.db.spend_replaced_refresh_tokens(row.id).await?;
        let issued = IssuedTokens::new(true, self, now);
        self.db
            .exchange_refresh_token(
                &row,
                issued.refresh_hash.as_deref().expect("asked for a refresh token"),
                issued.refresh_expires_ts,
                &issued.access_hash,
                issued.access_expires_ts,
                now,
            )
            .await?;
        self.forget_tokens();
        Ok(issued.into_session(row.user_id, row.device_id, self.access_token_lifetime))
    }

    /// `POST /logout`: ends this device's session and deletes the device.
    pub async fn logout(&self, authed: &Authed) -> Result<()> {
        self.db.delete_devices(&authed.user_id, std::slice::from_ref(&authed.device_id)).await?;
        self.forget_tokens();
        self.device_list_changed(&authed.user_id, &[DeviceNews::deleted(authed.device_id.as_str())]).await;
        Ok(())
    }

    /// `POST /logout/all`.
    pub async fn logout_all(&self, user_id: &UserId) -> Result<()> {
        let before = self.db.devices(user_id).await?;
        self.db.delete_devices_except(user_id, None).await?;
        self.forget_tokens();
        let news: Vec<DeviceNews> = before.iter().map(|row| DeviceNews::deleted(row.device_id.as_str())).collect();
        self.device_list_changed(user_id, &news).await;
        Ok(())
    }

    /// Runs a password UIA for an operation on `authed`'s own account.
    async fn authorize_with_password(
        &self,
        authed: &Authed,
        operation: &str,
        auth: Option<&AuthData>,
    ) -> Result<uia::Completed> {
        let purpose = format!("{operation}:{}", authed.user_id);
        let flows: &[&[&'static str]] = &[&[uia::PASSWORD]];
        self.uia
            .authorize(&purpose, flows, auth, async |identifier: &UserIdentifier, password: &str| {
                // The same per-account budget as login: the password stage must not be a way
                // around the login lockout for whoever holds a stolen access token.
                let key = authed.user_id.as_str();
                self.failed_logins.check(key)?;
                let is_self = matches!(identifier, UserIdentifier::Matrix(id)
                    if user_id_for_login(&id.user, &self.server_name).as_ref() == Some(&authed.user_id));
                let matches = is_self
                    && match self.db.user(&authed.user_id).await? {
                        Some(user) if !user.deactivated => self.password_matches(&user, password).await?,
                        _ => false,
                    };
                if !matches {
                    self.failed_logins.record_failure(key);
                }
                Ok(matches)
            })
            .await
    }

    /// `POST /account/password`.
    pub async fn change_password(
        &self,
        authed: &Authed,
        auth: Option<&AuthData>,
        new_password: String,
        logout_devices: bool,
    ) -> Result<()> {
        check_password_rules(&new_password)?;
        let completed = self.authorize_with_password(authed, "password", auth).await?;
        let hash = hash_password(new_password).await?;
        self.db.set_password_hash(&authed.user_id, &hash).await?;
        if logout_devices {
            self.db.delete_devices_except(&authed.user_id, Some(&authed.device_id)).await?;
            self.forget_tokens();
        }
        self.uia.finish(completed).await
    }

    /// `POST /account/deactivate`.
    pub async fn deactivate(&self, authed: &Authed, auth: Option<&AuthData>) -> Result<()> {
        let completed = self.authorize_with_password(authed, "deactivate", auth).await?;
        self.db.deactivate_user(&authed.user_id).await?;
        self.forget_tokens();
        tracing::info!(user_id = %authed.user_id, "account deactivated by its owner");
        self.uia.finish(completed).await
    }

    pub async fn devices(&self, user_id: &UserId) -> Result<Vec<DeviceRow>> {
        Ok(self.db.devices(user_id).await?)
    }

    /// A local user's devices for another server (`GET /user/devices`), with the position of the
    /// latest device-list change as their `stream_id` (the server-wide one: it only moves
    /// forward, which is all a receiver needs of it). Unknown and remote users are 404.
    pub async fn devices_for_federation(&self, user_id: &UserId) -> Result<(i64, Vec<DeviceRow>)> {
        if user_id.server_name() != self.server_name {
            return Err(Error::not_found("Not a user of this server"));
        }
        match self.db.user(user_id).await? {
            Some(row) if !row.deactivated => {}
            _ => return Err(Error::not_found("Unknown user")),
        }
        // The position of the user's latest change: the `stream_id` their last
        // `m.device_list_update` carried, so a receiver can continue from it.
        let stream_id = self.db.previous_device_list_change(user_id, i64::MAX).await?;
        Ok((stream_id, self.db.devices(user_id).await?))
    }

    pub async fn device(&self, user_id: &UserId, device_id: &DeviceId) -> Result<DeviceRow> {
        self.db.device(user_id, device_id).await?.ok_or_else(|| Error::not_found("Device not found"))
    }

    pub async fn rename_device(&self, user_id: &UserId, device_id: &DeviceId, name: Option<&str>) -> Result<()> {
        if self.db.set_device_display_name(user_id, device_id, name).await? {
            let news = DeviceNews { device_id: device_id.as_str(), display_name: name, is_deleted: false };
            self.device_list_changed(user_id, &[news]).await;
            Ok(())
        } else {
            Err(Error::not_found("Device not found"))
        }
    }

    /// `DELETE /devices/{id}` and `POST /delete_devices`. Unknown device IDs are ignored by the bulk
    /// form (as in Synapse) and a 404 for the single form.
    pub async fn delete_devices(
        &self,
        authed: &Authed,
        device_ids: &[OwnedDeviceId],
        auth: Option<&AuthData>,
        require_exist: bool,
    ) -> Result<()> {
        if require_exist {
            for device_id in device_ids {
                self.device(&authed.user_id, device_id).await?;
            }
        }
        let completed = self.authorize_with_password(authed, "delete_devices", auth).await?;
        self.db.delete_devices(&authed.user_id, device_ids).await?;
        self.forget_tokens();
        let news: Vec<DeviceNews> = device_ids.iter().map(|id| DeviceNews::deleted(id.as_str())).collect();
        self.device_list_changed(&authed.user_id, &news).await;
        self.uia.finish(completed).await
    }

    /// A local user's profile; `NotFound` for unknown or deactivated users.
    pub async fn profile(&self, user_id: &UserId) -> Result<UserRow> {
        match self.db.user(user_id).await? {
            Some(user) if !user.deactivated => Ok(user),
            _ => Err(Error::not_found("Profile not found")),
        }
    }

    pub async fn set_displayname(&self, authed: &Authed, target: &UserId, displayname: Option<&str>) -> Result<()> {
        self.check_profile_owner(authed, target)?;
        let displayname = displayname.filter(|name| !name.is_empty());
        if displayname.is_some_and(|name| name.len() > 256) {
            return Err(Error::InvalidParam("displayname is longer than 256 bytes".to_owned()));
        }
        Ok(self.db.set_displayname(target, displayname).await?)
    }

    pub async fn set_avatar_url(&self, authed: &Authed, target: &UserId, avatar_url: Option<&str>) -> Result<()> {
        self.check_profile_owner(authed, target)?;
        let avatar_url = avatar_url.filter(|url| !url.is_empty());
        if avatar_url.is_some_and(|url| !url.starts_with("mxc://") || url.len() > 1000) {
            return Err(Error::InvalidParam("avatar_url must be an mxc:// URI".to_owned()));
        }
        Ok(self.db.set_avatar_url(target, avatar_url).await?)
    }

    fn check_profile_owner(&self, authed: &Authed, target: &UserId) -> Result<()> {
        if authed.user_id != target {
            return Err(Error::forbidden("You cannot change another user's profile"));
        }
        Ok(())
    }

    /// `GET /register/m.login.registration_token/validity`.
    pub async fn registration_token_is_valid(&self, token: &str) -> Result<bool> {
        Ok(self.db.registration_token(token).await?.is_some_and(|row| row.is_valid(now_ms())))
    }

    // ---- Operator actions (the `hearth` CLI). ----

    /// Creates an account directly, bypassing registration mode and UIA.
    pub async fn operator_create_user(&self, localpart: &str, password: &str, is_admin: bool) -> Result<OwnedUserId> {
        let user_id = self.valid_new_user_id(localpart)?;
        check_password_rules(password)?;
        let hash = hash_password(password.to_owned()).await?;
        let request = Registration {
            username: None,
            password: None,
            device_id: None,
            initial_device_display_name: None,
            inhibit_login: true,
            refresh_token: false,
            is_guest: false,
            auth: None,
        };
        if self.db.localpart_exists(user_id.localpart()).await? {
            return Err(Error::UserInUse);
        }
        self.create_account(&user_id, Some(&hash), is_admin, false, &request, None).await?;
        Ok(user_id)
    }

    pub async fn operator_list_users(&self) -> Result<Vec<UserRow>> {
        Ok(self.db.list_users().await?)
    }

    pub async fn operator_deactivate(&self, user_id: &UserId) -> Result<()> {
        if self.db.deactivate_user(user_id).await? {
            self.forget_tokens();
            Ok(())
        } else {
            Err(Error::not_found("No active account with that ID"))
        }
    }

    /// Sets a new password and logs the user out everywhere.
    pub async fn operator_reset_password(&self, user_id: &UserId, password: &str) -> Result<()> {
        check_password_rules(password)?;
        let hash = hash_password(password.to_owned()).await?;
        if !self.db.set_password_hash(user_id, &hash).await? {
            return Err(Error::not_found("No active account with that ID"));
        }
        self.db.delete_devices_except(user_id, None).await?;
        self.forget_tokens();
        Ok(())
    }

    pub async fn operator_create_registration_token(
        &self,
        token: Option<String>,
        uses_allowed: Option<i64>,
        expiry_ts: Option<i64>,
    ) -> Result<RegistrationTokenRow> {
        let token = token.unwrap_or_else(|| random_string(16));
        if token.is_empty()
            || token.len() > 64
            || !token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
        {
            return Err(Error::InvalidParam("a token is 1-64 characters of A-Z a-z 0-9 . _ ~ -".to_owned()));
        }
        if uses_allowed.is_some_and(|uses| uses < 0) {
            return Err(Error::InvalidParam("uses must not be negative".to_owned()));
        }
        let row = RegistrationTokenRow { token, uses_allowed, pending: 0, completed: 0, expiry_ts };
        self.db.create_registration_token(&row, now_ms()).await.map_err(|err| match err {
            StorageError::Conflict(_) => Error::InvalidParam("that token already exists".to_owned()),
            other => other.into(),
        })?;
        Ok(row)
    }

    pub async fn operator_list_registration_tokens(&self) -> Result<Vec<RegistrationTokenRow>> {
        Ok(self.db.registration_tokens().await?)
    }

    /// Periodic upkeep: forgets abandoned UIA sessions and idle rate-limit keys.
    pub async fn housekeeping(&self) -> Result<()> {
        self.db.expire_uia_sessions(now_ms() - uia::SESSION_LIFETIME_MS).await?;
        // A client retries a to-device send within minutes; a day of transaction IDs covers a
        // restart and long offline spells.
        self.db.prune_to_device_txns(now_ms() - 24 * 60 * 60 * 1000).await?;
        self.failed_logins.forget_idle_keys();
        Ok(())
    }
}

/// Freshly generated tokens for one session, with the hashes that get stored.
struct IssuedTokens {
    access_token: String,
    access_hash: String,
    access_expires_ts: Option<i64>,
    refresh_token: Option<String>,
    refresh_hash: Option<String>,
    refresh_expires_ts: Option<i64>,
}

impl IssuedTokens {
    fn new(with_refresh: bool, users: &Users, now: i64) -> Self {
        let access_token = format!("hat_{}", random_string(40));
        let refresh_token = with_refresh.then(|| format!("hrt_{}", random_string(40)));
        IssuedTokens {
            access_hash: hash_token(&access_token),
            access_token,
            access_expires_ts: with_refresh.then(|| now + users.access_token_lifetime.as_millis() as i64),
            refresh_hash: refresh_token.as_deref().map(hash_token),
            refresh_token,
            refresh_expires_ts: users
                .refresh_token_lifetime
                .filter(|_| with_refresh)
                .map(|lifetime| now + lifetime.as_millis() as i64),
        }
    }

    fn new_session<'a>(
        &'a self,
        device_id: &'a DeviceId,
        display_name: Option<&'a str>,
        ip: Option<&'a str>,
        now: i64,
    ) -> NewSession<'a> {
        NewSession {
            device_id,
            device_display_name: display_name,
            access_token_hash: &self.access_hash,
            access_expires_ts: self.access_expires_ts,
            refresh_token_hash: self.refresh_hash.as_deref(),
            refresh_expires_ts: self.refresh_expires_ts,
            ip,
            now,
        }
    }

    fn into_session(self, user_id: OwnedUserId, device_id: OwnedDeviceId, lifetime: Duration) -> Session {
        Session {
            user_id,
            device_id,
            expires_in: self.refresh_token.as_ref().map(|_| lifetime),
            access_token: self.access_token,
            refresh_token: self.refresh_token,
        }
    }
}

fn check_password_rules(password: &str) -> Result<()> {
    if password.is_empty() {
        return Err(Error::WeakPassword("Password must not be empty".into()));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(Error::InvalidParam(format!("Password is longer than {MAX_PASSWORD_LEN} bytes")));
    }
    Ok(())
}

async fn hash_password(password: String) -> Result<String> {
    with_hashing_slot(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Argon2::default().hash_password(password.as_bytes(), &salt).map(|hash| hash.to_string())
    })
    .await?
    .map_err(|err| Error::Internal(format!("password hashing failed: {err}")))
}

/// Checks `password` against an argon2 hash. Without a hash (an unknown user, an account with no
/// password) it verifies against a dummy hash and fails, so the answer takes as long either way.
async fn verify_password(hash: Option<String>, password: &str) -> Result<bool> {
    static DUMMY_HASH: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    let is_real = hash.is_some();
    let hash = match hash {
        Some(hash) => hash,
        None => DUMMY_HASH.get_or_try_init(|| hash_password(random_string(32))).await?.clone(),
    };
    let password = password.to_owned();
    let matches = with_hashing_slot(move || {
        PasswordHash::new(&hash)
            .is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await?;
    Ok(is_real && matches)
}

/// Runs one argon2 hash or verification on the blocking pool, at most one per core at a time.
/// Each takes ~19 MiB of memory and a core for tens of milliseconds: unbounded, a burst of
/// logins or registrations would start hundreds at once (the blocking pool allows 512) and
/// spike memory by gigabytes while finishing no sooner. The limit is per process because the
/// cores and memory are.
async fn with_hashing_slot<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    static SLOTS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get))
    });
    let _slot = SLOTS.acquire().await.map_err(|err| Error::Internal(err.to_string()))?;
    tokio::task::spawn_blocking(work).await.map_err(|err| Error::Internal(err.to_string()))
}

/// SHA-256 of a token, hex-encoded: what the database stores.
pub fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest.iter() {
        use std::fmt::Write;
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Random `[A-Za-z0-9]` string from the OS-seeded thread RNG.
pub fn random_string(len: usize) -> String {
    rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(len).map(char::from).collect()
}

fn random_lowercase(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

/// Device IDs like Synapse's: ten upper-case letters.
fn new_device_id() -> OwnedDeviceId {
    let mut rng = rand::thread_rng();
    let id: String = (0..10).map(|_| rng.gen_range(b'A'..=b'Z') as char).collect();
    id.into()
}

/// One device's change, for the `m.device_list_update` that tells other servers.
pub struct DeviceNews<'a> {
    pub device_id: &'a str,
    pub display_name: Option<&'a str>,
    pub is_deleted: bool,
}

impl<'a> DeviceNews<'a> {
    fn deleted(device_id: &'a str) -> DeviceNews<'a> {
        DeviceNews { device_id, display_name: None, is_deleted: true }
    }
}
