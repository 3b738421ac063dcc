//! `deskline webhooks install` and the webhook part of `deskline check` (DESIGN §5, §9).
//!
//! Idempotent by design: the webhook is found by its endpoint (`webhooks.public_url`) or, when the
//! URL moved, by its name, and then updated in place; running the command twice changes nothing and
//! creates nothing. Two variants:
//! - **events** (default): one webhook subscribed to the ticket and user event types below.
//! - **trigger**: for accounts where ticket event types are unavailable, the tickets webhook
//!   subscribes to `conditional_ticket_events` and a trigger ("Deskline index") notifies it on every
//!   ticket create or update with [`parse::TRIGGER_TEMPLATE`](super::parse::TRIGGER_TEMPLATE) as
//!   body; a second webhook carries the user events (a `conditional_ticket_events` webhook takes
//!   no other subscription).
//!
//! The signing secret is returned to the caller, which prints it once to stdout for the operator;
//! it is never logged.

use reqwest::Method;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::zendesk::{Client, Retry, ZendeskError};

/// The event types Deskline applies (ZENDESK.md §10).
pub(crate) const TICKET_EVENTS: [&str; 7] = [
    "zen:event-type:ticket.created",
    "zen:event-type:ticket.status_changed",
    "zen:event-type:ticket.agent_assignment_changed",
    "zen:event-type:ticket.requester_changed",
    "zen:event-type:ticket.organization_changed",
    "zen:event-type:ticket.soft_deleted",
    "zen:event-type:ticket.permanently_deleted",
];
/// The user events Deskline needs, all from Zendesk's user-events reference. Suspension has no
/// event type of its own there (the reference lists active, alias, custom field, custom role,
/// default group, details, external id, group, identity, last login, name, notes, organization,
/// photo, role, tags, time zone changes, and created/deleted/merged): a suspension reaches the
/// index through the export follower, within its usual lag.
pub(crate) const USER_EVENTS: [&str; 11] = [
    "zen:event-type:user.created",
    "zen:event-type:user.active_changed",
    "zen:event-type:user.role_changed",
    "zen:event-type:user.identity_created",
    "zen:event-type:user.identity_changed",
    "zen:event-type:user.identity_deleted",
    "zen:event-type:user.deleted",
    "zen:event-type:user.merged",
    // The agent's name is the directory's key (rule 5) and the customer's is caller ID's.
    "zen:event-type:user.name_changed",
    // Caller ID shows the customer's organization.
    "zen:event-type:user.organization_membership_created",
    "zen:event-type:user.organization_membership_deleted",
];
pub(crate) const WEBHOOK_NAME: &str = "Deskline index";
pub(crate) const USERS_WEBHOOK_NAME: &str = "Deskline index (users)";
pub(crate) const TRIGGER_TITLE: &str = "Deskline index";

/// How the webhooks are subscribed (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One webhook subscribed to ticket and user event types (the default).
    Events,
    /// A trigger notifies a `conditional_ticket_events` webhook; a second webhook takes the user events.
    Trigger,
}

/// A Zendesk webhook as `GET/POST /api/v2/webhooks` returns it (the fields Deskline reads).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Webhook {
    /// Zendesk's webhook id (a string, e.g. `01GT…`).
    pub id: String,
    /// Display name; Deskline's are "Deskline index" and "Deskline index (users)".
    pub name: String,
    /// The URL Zendesk calls (`webhooks.public_url`).
    pub endpoint: String,
    /// `active` or `inactive`.
    pub status: String,
    /// Event types subscribed to; empty when Zendesk omits them.
    #[serde(default)]
    pub subscriptions: Vec<String>,
}

/// What `install` did.
#[derive(Debug)]
pub struct Installed {
    /// `(webhook, created)` for each webhook installed.
    pub webhooks: Vec<(Webhook, bool)>,
    /// The trigger's id in trigger mode; `None` in events mode.
    pub trigger_id: Option<i64>,
    /// Each webhook's own signing secret, in the order of `webhooks`.
    pub secrets: Vec<SecretString>,
}

#[derive(Deserialize)]
struct List {
    webhooks: Vec<Webhook>,
}

#[derive(Deserialize)]
struct One {
    webhook: Webhook,
}

#[derive(Deserialize)]
struct Secret {
    signing_secret: SecretInner,
}

#[derive(Deserialize)]
struct SecretInner {
    secret: String,
}

/// Every webhook of the account whose name mentions Deskline (first page: a handful at most).
pub(crate) async fn list(client: &Client) -> Result<Vec<Webhook>, ZendeskError> {
    let l: List = client
        .request(
            Method::GET,
            "/api/v2/webhooks?filter[name_contains]=Deskline",
            None,
            &[],
            false,
            Retry::Idempotent,
        )
        .await?;
    Ok(l.webhooks)
}

async fn upsert(
    client: &Client,
    existing: &[Webhook],
    name: &str,
    endpoint: &str,
    subscriptions: &[&str],
) -> Result<(Webhook, bool), ZendeskError> {
    let found = existing
        .iter()
        .find(|w| w.name == name && w.endpoint == endpoint)
        .or_else(|| existing.iter().find(|w| w.name == name));
    let body = json!({ "webhook": { "name": name, "endpoint": endpoint, "http_method": "POST",
        "request_format": "json", "status": "active", "subscriptions": subscriptions } });
    match found {
        Some(w) => {
            let path = format!("/api/v2/webhooks/{}", w.id);
            let _: Value = client
                .request(
                    Method::PATCH,
                    &path,
                    Some(&body),
                    &[],
                    false,
                    Retry::Idempotent,
                )
                .await?;
            let one: One = client
                .request(Method::GET, &path, None, &[], false, Retry::Idempotent)
                .await?;
            Ok((one.webhook, false))
        }
        None => {
            let one: One = client
                .request(
                    Method::POST,
                    "/api/v2/webhooks",
                    Some(&body),
                    &[],
                    false,
                    Retry::Once,
                )
                .await?;
            Ok((one.webhook, true))
        }
    }
}

async fn secret(client: &Client, id: &str) -> Result<SecretString, ZendeskError> {
    let s: Secret = client
        .request(
            Method::GET,
            &format!("/api/v2/webhooks/{id}/signing_secret"),
            None,
            &[],
            false,
            Retry::Idempotent,
        )
        .await?;
    Ok(SecretString::from(s.signing_secret.secret))
}

/// Creates or updates the webhook(s) (and trigger) for `public_url`.
pub async fn install(
    client: &Client,
    public_url: &str,
    mode: Mode,
) -> Result<Installed, ZendeskError> {
    let existing = list(client).await?;
    let mut webhooks = Vec::new();
    let mut trigger_id = None;
    match mode {
        Mode::Events => {
            let all: Vec<&str> = TICKET_EVENTS.iter().chain(&USER_EVENTS).copied().collect();
            webhooks.push(upsert(client, &existing, WEBHOOK_NAME, public_url, &all).await?);
        }
        Mode::Trigger => {
            let (tickets, created) = upsert(
                client,
                &existing,
                WEBHOOK_NAME,
                public_url,
                &["conditional_ticket_events"],
            )
            .await?;
            trigger_id = Some(upsert_trigger(client, &tickets.id).await?);
            webhooks.push((tickets, created));
            webhooks.push(
                upsert(
                    client,
                    &existing,
                    USERS_WEBHOOK_NAME,
                    public_url,
                    &USER_EVENTS,
                )
                .await?,
            );
        }
    }
    let mut secrets = Vec::new();
    for (w, _) in &webhooks {
        secrets.push(secret(client, &w.id).await?);
    }
    Ok(Installed {
        webhooks,
        trigger_id,
        secrets,
    })
}

async fn upsert_trigger(client: &Client, webhook_id: &str) -> Result<i64, ZendeskError> {
    #[derive(Deserialize)]
    struct T {
        id: i64,
        title: String,
    }
    #[derive(Deserialize)]
    struct Ts {
        triggers: Vec<T>,
    }
    #[derive(Deserialize)]
    struct OneT {
        trigger: T,
    }
    let body = json!({ "trigger": {
        "title": TRIGGER_TITLE, "active": true,
        "conditions": { "all": [], "any": [
            { "field": "update_type", "operator": "is", "value": "Create" },
            { "field": "update_type", "operator": "is", "value": "Change" } ] },
        "actions": [ { "field": "notification_webhook",
                       "value": [ webhook_id, super::parse::TRIGGER_TEMPLATE ] } ] } });
    let all: Ts = client
        .request(
            Method::GET,
            "/api/v2/triggers",
            None,
            &[],
            false,
            Retry::Idempotent,
        )
        .await?;
    let t: OneT = match all.triggers.iter().find(|t| t.title == TRIGGER_TITLE) {
        Some(t) => {
            client
                .request(
                    Method::PUT,
                    &format!("/api/v2/triggers/{}", t.id),
                    Some(&body),
                    &[],
                    false,
                    Retry::Idempotent,
                )
                .await?
        }
        None => {
            client
                .request(
                    Method::POST,
                    "/api/v2/triggers",
                    Some(&body),
                    &[],
                    false,
                    Retry::Once,
                )
                .await?
        }
    };
    Ok(t.trigger.id)
}

/// For `deskline check`: one line about the webhook for `public_url`.
pub async fn check_line(client: &Client, public_url: Option<&str>) -> String {
    let Some(url) = public_url else {
        return "webhooks: webhooks.public_url not set; webhook not checked".into();
    };
    match list(client).await {
        Err(e) => format!("webhooks: cannot list webhooks: {e}"),
        Ok(list) => match list.iter().find(|w| w.name == WEBHOOK_NAME) {
            None => format!(
                "webhooks: PROBLEM: no webhook named {WEBHOOK_NAME:?}; run `deskline webhooks install`"
            ),
            Some(w) if w.endpoint != url => format!(
                "webhooks: PROBLEM: webhook {} points at {} instead of {url}; run `deskline webhooks install`",
                w.id, w.endpoint
            ),
            Some(w) if w.status != "active" => format!(
                "webhooks: PROBLEM: webhook {} is {}, not active",
                w.id, w.status
            ),
            Some(w) => format!(
                "webhooks: ok: webhook {} is active and points at {url}",
                w.id
            ),
        },
    }
}
