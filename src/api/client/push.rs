//! Push rules and pushers, read side only: every user has the spec's server-default rules (from
//! ruma's [`Ruleset::server_default`]) and no pushers. Clients (matrix-js-sdk, and so Element Web)
//! read `/pushrules/` before their first `/sync` and retry forever on a 404, so these must answer
//! even before rules are writable. Writing rules and pushers is not implemented: those paths stay
//! unrouted (`M_UNRECOGNIZED`) rather than pretending to store anything.

use ruma::{
    api::client::push::{
        PushRule, get_pushers, get_pushrule, get_pushrule_actions, get_pushrule_enabled, get_pushrules_all,
        get_pushrules_global_scope,
    },
    push::{AnyPushRuleRef, RuleKind, Ruleset},
};

use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
};

/// `GET /_matrix/client/v3/pushrules/`
pub async fn all(
    AuthedUser(authed): AuthedUser,
    Ruma(_): Ruma<get_pushrules_all::v3::Request>,
) -> ApiResult<get_pushrules_all::v3::Response> {
    Ok(get_pushrules_all::v3::Response::new(Ruleset::server_default(&authed.user_id)).into())
}

/// `GET /_matrix/client/v3/pushrules/global/`
pub async fn global(
    AuthedUser(authed): AuthedUser,
    Ruma(_): Ruma<get_pushrules_global_scope::v3::Request>,
) -> ApiResult<get_pushrules_global_scope::v3::Response> {
    Ok(get_pushrules_global_scope::v3::Response::new(Ruleset::server_default(&authed.user_id)).into())
}

/// Looks one rule up in the user's rule set; an unknown kind or ID is 404 `M_NOT_FOUND`.
fn with_rule<T>(
    ruleset: &Ruleset,
    kind: &RuleKind,
    rule_id: &str,
    read: impl FnOnce(AnyPushRuleRef<'_>) -> T,
) -> Result<T> {
    let known_kind = matches!(
        kind,
        RuleKind::Override | RuleKind::Underride | RuleKind::Sender | RuleKind::Room | RuleKind::Content
    );
    let rule = if known_kind { ruleset.get(kind.clone(), rule_id) } else { None };
    rule.map(read).ok_or_else(|| Error::not_found("No such push rule"))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn rule(
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_pushrule::v3::Request>,
) -> ApiResult<get_pushrule::v3::Response> {
    let ruleset = Ruleset::server_default(&authed.user_id);
    let rule = with_rule(&ruleset, &req.kind, &req.rule_id, |rule| PushRule::from(rule))?;
    Ok(get_pushrule::v3::Response::new(rule).into())
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn enabled(
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_pushrule_enabled::v3::Request>,
) -> ApiResult<get_pushrule_enabled::v3::Response> {
    let ruleset = Ruleset::server_default(&authed.user_id);
    let enabled = with_rule(&ruleset, &req.kind, &req.rule_id, |rule| rule.enabled())?;
    Ok(get_pushrule_enabled::v3::Response::new(enabled).into())
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn actions(
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_pushrule_actions::v3::Request>,
) -> ApiResult<get_pushrule_actions::v3::Response> {
    let ruleset = Ruleset::server_default(&authed.user_id);
    let actions = with_rule(&ruleset, &req.kind, &req.rule_id, |rule| rule.actions().to_vec())?;
    Ok(get_pushrule_actions::v3::Response::new(actions).into())
}

/// `GET /_matrix/client/v3/pushers`: pushers cannot be set yet, so there are none.
pub async fn pushers(
    AuthedUser(_): AuthedUser,
    Ruma(_): Ruma<get_pushers::v3::Request>,
) -> ApiResult<get_pushers::v3::Response> {
    Ok(get_pushers::v3::Response::new(Vec::new()).into())
}
