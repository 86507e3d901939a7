//! User-interactive authentication (Client-Server API, "User-Interactive Authentication API").
//!
//! A UIA session is stored in the database (so it survives restarts and, later, works across
//! processes) and bound to a *purpose* ("register", "deactivate:@alice:example.org", …): a session
//! opened for one operation is never accepted for another. Stages implemented: `m.login.dummy`,
//! `m.login.registration_token` and `m.login.password`.

use ruma::api::client::uiaa::{AuthData, UserIdentifier};
use serde_json::json;

use crate::{
    error::{Error, Result, UiaChallenge},
    service::now_ms,
    storage::Db,
};

pub const DUMMY: &str = "m.login.dummy";
pub const REGISTRATION_TOKEN: &str = "m.login.registration_token";
pub const PASSWORD: &str = "m.login.password";

/// Sessions older than this are forgotten.
pub const SESSION_LIFETIME_MS: i64 = 24 * 60 * 60 * 1000;

/// A finished UIA session; pass it to [`Uia::finish`] once the protected operation succeeded.
#[derive(Debug)]
pub struct Completed {
    session_id: String,
    registration_token: Option<String>,
}

pub struct Uia {
    db: Db,
}

impl Uia {
    pub fn new(db: Db) -> Self {
        Uia { db }
    }

    /// Runs one round: records the stage `auth` completes (if any) and either returns the finished
    /// session or a 401 challenge listing what remains. `verify_password(identifier, password)`
    /// answers `m.login.password` stages.
    pub async fn authorize(
        &self,
        purpose: &str,
        flows: &[&[&'static str]],
        auth: Option<&AuthData>,
        verify_password: impl AsyncFnOnce(&UserIdentifier, &str) -> Result<bool>,
    ) -> Result<Completed> {
        let now = now_ms();
        let Some(auth) = auth else {
            let session_id = self.open(purpose, now).await?;
            return Err(challenge(flows, Vec::new(), session_id, None));
        };
        let session_id = match auth.session() {
            Some(id) => id.to_owned(),
            // A client may start with a stage without asking for the flows first.
            None => self.open(purpose, now).await?,
        };
        let Some(session) = self.db.uia_session(&session_id).await? else {
            return Err(Error::Unknown(format!("Unknown session ID: {session_id}")));
        };
        if session.created_ts + SESSION_LIFETIME_MS < now {
            self.db.delete_uia_session(&session_id).await?;
            return Err(Error::Unknown(format!("Unknown session ID: {session_id}")));
        }
        if session.purpose != purpose {
            return Err(Error::forbidden("Requested operation has changed during the UI authentication session."));
        }
        let mut completed = session.completed;
        let mut registration_token = session.registration_token;

        let stage = match auth {
            AuthData::FallbackAcknowledgement(_) => None,
            AuthData::Dummy(_) => Some(DUMMY),
            AuthData::RegistrationToken(stage) => {
                if !offers(flows, REGISTRATION_TOKEN) {
                    return Err(not_offered(REGISTRATION_TOKEN));
                }
                if registration_token.is_none() {
                    if !self.db.reserve_registration_token(&session_id, &stage.token, now).await? {
                        let failure = ("M_UNAUTHORIZED", "Invalid registration token".to_owned());
                        return Err(challenge(flows, completed, session_id, Some(failure)));
                    }
                    registration_token = Some(stage.token.clone());
                }
                Some(REGISTRATION_TOKEN)
            }
            AuthData::Password(stage) => {
                if !offers(flows, PASSWORD) {
                    return Err(not_offered(PASSWORD));
                }
                if !verify_password(&stage.identifier, &stage.password).await? {
                    let failure = ("M_FORBIDDEN", "Invalid password".to_owned());
                    return Err(challenge(flows, completed, session_id, Some(failure)));
                }
                Some(PASSWORD)
            }
            other => {
                return Err(not_offered(other.auth_type().map_or_else(|| "unknown".to_owned(), |t| t.to_string())));
            }
        };
        if let Some(stage) = stage {
            if !offers(flows, stage) {
                return Err(not_offered(stage));
            }
            if !completed.iter().any(|done| done == stage) {
                completed.push(stage.to_owned());
                self.db.set_uia_completed(&session_id, &completed).await?;
            }
        }
        let done = flows.iter().any(|flow| flow.iter().all(|stage| completed.iter().any(|c| c == stage)));
        if done {
            Ok(Completed { session_id, registration_token })
        } else {
            Err(challenge(flows, completed, session_id, None))
        }
    }

    /// Closes a session whose operation succeeded; a registration token it used counts as used.
    pub async fn finish(&self, completed: Completed) -> Result<()> {
        if let Some(token) = &completed.registration_token {
            self.db.complete_registration_token(token).await?;
        }
        self.db.delete_uia_session(&completed.session_id).await?;
        Ok(())
    }

    async fn open(&self, purpose: &str, now: i64) -> Result<String> {
        let session_id = crate::service::users::random_string(24);
        self.db.create_uia_session(&session_id, purpose, now).await?;
        Ok(session_id)
    }
}

fn offers(flows: &[&[&'static str]], stage: &str) -> bool {
    flows.iter().any(|flow| flow.contains(&stage))
}

fn not_offered(stage: impl std::fmt::Display) -> Error {
    Error::Unknown(format!("Authentication stage {stage} is not offered here"))
}

fn challenge(
    flows: &[&[&'static str]],
    completed: Vec<String>,
    session: String,
    failure: Option<(&'static str, String)>,
) -> Error {
    Error::Uia(Box::new(UiaChallenge {
        flows: flows.iter().map(|flow| flow.iter().map(|s| (*s).to_owned()).collect()).collect(),
        completed,
        session,
        params: json!({}),
        failure,
    }))
}
