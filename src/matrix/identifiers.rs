//! Rules for identifiers a user chooses: the localpart of a new user ID.

use ruma::{OwnedUserId, ServerName, UserId};

/// Longest user ID the spec allows, in bytes (sigil, localpart, colon and server name).
const MAX_USER_ID_LEN: usize = 255;

/// Why a requested username cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUsername {
    #[error("user ID cannot be empty")]
    Empty,
    #[error("user ID can only contain characters a-z, 0-9, or '._=-/+'")]
    BadCharacter,
    #[error("user ID cannot begin with '_' (reserved for application services)")]
    ReservedPrefix,
    #[error("numeric user IDs are reserved for guest accounts")]
    Numeric,
    #[error("user ID is longer than 255 characters")]
    TooLong,
}

/// Checks a localpart requested at registration and builds the user ID.
///
/// Per the spec's user identifier grammar, localparts use only `a-z 0-9 . _ = - / +`. Like Synapse,
/// Hearth also refuses a leading `_` (application-service namespaces) and all-digit names (the
/// names it gives guests).
pub fn user_id_for_registration(localpart: &str, server_name: &ServerName) -> Result<OwnedUserId, InvalidUsername> {
    if localpart.is_empty() {
        return Err(InvalidUsername::Empty);
    }
    if !localpart.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+')) {
        return Err(InvalidUsername::BadCharacter);
    }
    if localpart.starts_with('_') {
        return Err(InvalidUsername::ReservedPrefix);
    }
    if localpart.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidUsername::Numeric);
    }
    if 1 + localpart.len() + 1 + server_name.as_str().len() > MAX_USER_ID_LEN {
        return Err(InvalidUsername::TooLong);
    }
    UserId::parse(format!("@{localpart}:{server_name}")).map_err(|_| InvalidUsername::BadCharacter)
}

/// Resolves what a client typed at login (`alice`, `@alice:example.org`, `@Alice:example.org`) to
/// a local user ID. Matching is case-insensitive, as Synapse's is, since new names are lowercase.
pub fn user_id_for_login(input: &str, server_name: &ServerName) -> Option<OwnedUserId> {
    let input = input.trim();
    let localpart = match input.strip_prefix('@') {
        Some(rest) => {
            let (localpart, server) = rest.split_once(':')?;
            if !server.eq_ignore_ascii_case(server_name.as_str()) {
                return None;
            }
            localpart
        }
        None => input,
    };
    if localpart.is_empty() {
        return None;
    }
    UserId::parse(format!("@{}:{server_name}", localpart.to_lowercase())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> &'static ServerName {
        <&ServerName>::try_from("example.org").unwrap()
    }

    #[test]
    fn registration_accepts_spec_characters() {
        for name in ["alice", "a.b_c=d-e/f+g", "user1", "0day"] {
            assert_eq!(user_id_for_registration(name, server()).unwrap().localpart(), name);
        }
    }

    #[test]
    fn registration_rejects_bad_names() {
        assert_eq!(user_id_for_registration("", server()), Err(InvalidUsername::Empty));
        assert_eq!(user_id_for_registration("Alice", server()), Err(InvalidUsername::BadCharacter));
        assert_eq!(user_id_for_registration("al ice", server()), Err(InvalidUsername::BadCharacter));
        assert_eq!(user_id_for_registration("al:ice", server()), Err(InvalidUsername::BadCharacter));
        assert_eq!(user_id_for_registration("émile", server()), Err(InvalidUsername::BadCharacter));
        assert_eq!(user_id_for_registration("_bridge", server()), Err(InvalidUsername::ReservedPrefix));
        assert_eq!(user_id_for_registration("12345", server()), Err(InvalidUsername::Numeric));
        assert_eq!(user_id_for_registration(&"a".repeat(250), server()), Err(InvalidUsername::TooLong));
    }

    #[test]
    fn login_accepts_localpart_or_full_id_in_any_case() {
        let expected = "@alice:example.org";
        for input in ["alice", "Alice", "@alice:example.org", "@ALICE:Example.org", " alice "] {
            assert_eq!(user_id_for_login(input, server()).unwrap().as_str(), expected, "{input}");
        }
        assert!(user_id_for_login("@alice:other.org", server()).is_none());
        assert!(user_id_for_login("@alice", server()).is_none());
        assert!(user_id_for_login("", server()).is_none());
    }
}
