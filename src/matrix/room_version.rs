//! Room versions Hearth supports and the rules each one implies.

use ruma::{RoomVersionId, room_version_rules::RoomVersionRules};

/// New rooms use this version unless the client asks otherwise (the version Synapse defaults to).
pub const DEFAULT: RoomVersionId = RoomVersionId::V12;

/// Versions Hearth creates and joins.
pub const SUPPORTED: [RoomVersionId; 3] = [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];

pub fn is_supported(version: &RoomVersionId) -> bool {
    SUPPORTED.contains(version)
}

/// The rules of a supported version.
pub fn rules(version: &RoomVersionId) -> Option<RoomVersionRules> {
    if is_supported(version) { version.rules() } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_versions_have_rules_and_default_is_supported() {
        for version in SUPPORTED {
            assert!(rules(&version).is_some(), "{version}");
        }
        assert!(is_supported(&DEFAULT));
        assert!(rules(&RoomVersionId::V9).is_none());
    }
}
