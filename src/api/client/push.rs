//! Push rules, pushers and the notification list (`service::push`). Rules are the user's own
//! (`m.push_rules` account data, the spec's server defaults until they change one); clients
//! (matrix-js-sdk, and so Element Web) read `/pushrules/` before their first `/sync`.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::client::push::{
        PushRule, delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions,
        get_pushrule_enabled, get_pushrules_all, get_pushrules_global_scope, set_pusher, set_pushrule,
        set_pushrule_actions, set_pushrule_enabled,
    },
    push::{AnyPushRuleRef, RemovePushRuleError, RuleKind, Ruleset},
};

use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
    service::push::{Push, limit_of, rules::insert_error},
};

/// `GET /_matrix/client/v3/pushrules/`
pub async fn all(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(_): Ruma<get_pushrules_all::v3::Request>,
) -> ApiResult<get_pushrules_all::v3::Response> {
    let rules = push.rules.ruleset(&authed.user_id).await?;
    Ok(get_pushrules_all::v3::Response::new((*rules).clone()).into())
}

/// `GET /_matrix/client/v3/pushrules/global/`
pub async fn global(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(_): Ruma<get_pushrules_global_scope::v3::Request>,
) -> ApiResult<get_pushrules_global_scope::v3::Response> {
    let rules = push.rules.ruleset(&authed.user_id).await?;
    Ok(get_pushrules_global_scope::v3::Response::new((*rules).clone()).into())
}

fn known_kind(kind: &RuleKind) -> bool {
    matches!(kind, RuleKind::Override | RuleKind::Underride | RuleKind::Sender | RuleKind::Room | RuleKind::Content)
}

/// Looks one rule up in the user's rule set; an unknown kind or ID is 404 `M_NOT_FOUND`.
fn with_rule<T>(
    ruleset: &Ruleset,
    kind: &RuleKind,
    rule_id: &str,
    read: impl FnOnce(AnyPushRuleRef<'_>) -> T,
) -> Result<T> {
    let rule = if known_kind(kind) { ruleset.get(kind.clone(), rule_id) } else { None };
    rule.map(read).ok_or_else(|| Error::not_found("No such push rule"))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn rule(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_pushrule::v3::Request>,
) -> ApiResult<get_pushrule::v3::Response> {
    let ruleset = push.rules.ruleset(&authed.user_id).await?;
    let rule = with_rule(&ruleset, &req.kind, &req.rule_id, |rule| PushRule::from(rule))?;
    Ok(get_pushrule::v3::Response::new(rule).into())
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn enabled(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_pushrule_enabled::v3::Request>,
) -> ApiResult<get_pushrule_enabled::v3::Response> {
    let ruleset = push.rules.ruleset(&authed.user_id).await?;
    let enabled = with_rule(&ruleset, &req.kind, &req.rule_id, |rule| rule.enabled())?;
    Ok(get_pushrule_enabled::v3::Response::new(enabled).into())
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn actions(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_pushrule_actions::v3::Request>,
) -> ApiResult<get_pushrule_actions::v3::Response> {
    let ruleset = push.rules.ruleset(&authed.user_id).await?;
    let actions = with_rule(&ruleset, &req.kind, &req.rule_id, |rule| rule.actions().to_vec())?;
    Ok(get_pushrule_actions::v3::Response::new(actions).into())
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn set_rule(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_pushrule::v3::Request>,
) -> ApiResult<set_pushrule::v3::Response> {
    let set_pushrule::v3::Request { rule, before, after, .. } = req;
    push.rules
        .change(&authed.user_id, |rules| rules.insert(rule, after.as_deref(), before.as_deref()).map_err(insert_error))
        .await?;
    Ok(set_pushrule::v3::Response::new().into())
}

/// `DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn delete_rule(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_pushrule::v3::Request>,
) -> ApiResult<delete_pushrule::v3::Response> {
    if !known_kind(&req.kind) {
        return Err(Error::not_found("No such push rule"));
    }
    push.rules
        .change(&authed.user_id, |rules| {
            rules.remove(req.kind.clone(), &req.rule_id).map_err(|err| match err {
                RemovePushRuleError::ServerDefault => {
                    Error::InvalidParam("Server-default rules cannot be deleted".to_owned())
                }
                _ => Error::not_found("No such push rule"),
            })
        })
        .await?;
    Ok(delete_pushrule::v3::Response::new().into())
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn set_enabled(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_pushrule_enabled::v3::Request>,
) -> ApiResult<set_pushrule_enabled::v3::Response> {
    change_rule(&push, &authed.user_id, &req.kind, &req.rule_id, |rules| {
        rules.set_enabled(req.kind.clone(), &req.rule_id, req.enabled).is_ok()
    })
    .await?;
    Ok(set_pushrule_enabled::v3::Response::new().into())
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn set_actions(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_pushrule_actions::v3::Request>,
) -> ApiResult<set_pushrule_actions::v3::Response> {
    let actions = req.actions.clone();
    change_rule(&push, &authed.user_id, &req.kind, &req.rule_id, |rules| {
        rules.set_actions(req.kind.clone(), &req.rule_id, actions).is_ok()
    })
    .await?;
    Ok(set_pushrule_actions::v3::Response::new().into())
}

/// Changes one existing rule; `change` says whether it found it (404 `M_NOT_FOUND` if not).
async fn change_rule(
    push: &Push,
    user: &ruma::UserId,
    kind: &RuleKind,
    rule_id: &str,
    change: impl FnOnce(&mut Ruleset) -> bool,
) -> Result<()> {
    if !known_kind(kind) || rule_id.is_empty() {
        return Err(Error::not_found("No such push rule"));
    }
    push.rules
        .change(user, |rules| if change(rules) { Ok(()) } else { Err(Error::not_found("No such push rule")) })
        .await
}

/// `GET /_matrix/client/v3/pushers`
pub async fn pushers(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(_): Ruma<get_pushers::v3::Request>,
) -> ApiResult<get_pushers::v3::Response> {
    Ok(get_pushers::v3::Response::new(push.pushers(&authed.user_id).await?).into())
}

/// `POST /_matrix/client/v3/pushers/set`
pub async fn set_pusher(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_pusher::v3::Request>,
) -> ApiResult<set_pusher::v3::Response> {
    push.set_pusher(&authed.user_id, authed.device_id.as_str(), req.action).await?;
    Ok(set_pusher::v3::Response::new().into())
}

/// `GET /_matrix/client/v3/notifications`
pub async fn notifications(
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_notifications::v3::Request>,
) -> ApiResult<get_notifications::v3::Response> {
    let only_highlight = req.only.as_deref() == Some("highlight");
    let (notifications, next) =
        push.list(&authed.user_id, req.from.as_deref(), limit_of(req.limit), only_highlight).await?;
    let mut response = get_notifications::v3::Response::new(notifications);
    response.next_token = next;
    Ok(response.into())
}
