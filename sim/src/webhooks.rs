//! Webhooks the way Zendesk delivers them (ZENDESK.md §10): the Webhooks API, triggers that notify
//! a webhook, and a dispatcher that turns every change of the store into signed POSTs.
//!
//! Why it works by diffing: every store write already stamps its record through `touch_user` /
//! `touch_ticket`, so the store only marks the record dirty (while delivery runs) and the dispatcher
//! compares it with the copy it kept of what it last saw. Whatever path made the change (the API,
//! a test's `with_store`, the admin endpoints) then yields the same events Zendesk would send,
//! built from the record's state at that moment (string ids in `detail`, like Zendesk).
//!
//! Delivery follows what Zendesk documents and what a receiver must survive: a random delay per
//! request, retries of failed requests (non-2xx or transport error) with backoff, and configurable
//! faults ([`WebhookFaults`]): duplicated invocations, extra delays that reorder deliveries, and
//! silently dropped ones. Each POST carries `x-zendesk-webhook-id`,
//! `x-zendesk-webhook-invocation-id` (the same on a retry or duplicate), and the signature headers:
//! `base64(HMAC-SHA256(secret, timestamp + body))`.
//!
//! Triggers (for `conditional_ticket_events` webhooks): an active trigger whose `actions` contain
//! `{"field":"notification_webhook","value":[webhook_id, body_template]}` fires on every ticket
//! create or update; the template's placeholders (`{{ticket.id}}`, `{{ticket.status}}`,
//! `{{ticket.assignee.id}}`, `{{ticket.requester.id}}`, `{{ticket.organization.id}}`,
//! `{{ticket.updated_at_with_timestamp}}`, `{{ticket.title}}`) are replaced with the ticket's
//! values. Conditions are not evaluated (every ticket change fires): a simplification named here.

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use rand::Rng as _;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::{
    http::{App, Reply},
    store::{Dirty, Role, Status, Store},
    wire,
};

/// The simulated account id in `account_id` and `x-zendesk-account-id`.
pub const ACCOUNT_ID: i64 = 9_242_270;

/// How webhook delivery misbehaves (set with [`crate::SimHandle::set_config`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookFaults {
    /// Each request waits a random time in `min_delay_ms..=max_delay_ms` before it is sent.
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// 0..1: the invocation is sent twice (same invocation id).
    pub duplicate_rate: f64,
    /// 0..1: the invocation waits up to `reorder_delay_ms` more, so later ones overtake it.
    pub reorder_rate: f64,
    pub reorder_delay_ms: u64,
    /// 0..1: the invocation is never sent (a lost webhook; the export must repair it).
    pub drop_rate: f64,
    /// Attempts per invocation (the first plus retries) before giving up.
    pub max_attempts: u32,
    /// Backoff before the first retry, doubled each time.
    pub retry_base_ms: u64,
}

impl Default for WebhookFaults {
    fn default() -> Self {
        Self {
            min_delay_ms: 10,
            max_delay_ms: 150,
            duplicate_rate: 0.0,
            reorder_rate: 0.0,
            reorder_delay_ms: 500,
            drop_rate: 0.0,
            max_attempts: 5,
            retry_base_ms: 100,
        }
    }
}

/// What the dispatcher did, for tests (`SimHandle::webhook_stats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeliveryStats {
    /// Events produced by changes (before faults).
    pub events: u64,
    /// POSTs answered 2xx.
    pub delivered: u64,
    /// POSTs that failed (non-2xx or transport error).
    pub failed: u64,
    pub duplicated: u64,
    pub dropped: u64,
    /// Invocations that failed every attempt.
    pub gave_up: u64,
    /// POSTs planned but not finished yet (waiting, in flight or between retries).
    pub pending: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct WebhookRec {
    id: String,
    name: String,
    endpoint: String,
    status: String,
    subscriptions: Vec<String>,
    secret: String,
    created_at: i64,
    updated_at: i64,
}

impl WebhookRec {
    fn view(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "description": null, "endpoint": self.endpoint,
            "http_method": "POST", "request_format": "json", "status": self.status,
            "subscriptions": self.subscriptions, "authentication": null,
            "created_at": wire::format_time(self.created_at),
            "created_by": "1", "updated_at": wire::format_time(self.updated_at), "updated_by": "1",
        })
    }
}

#[derive(Clone, Debug)]
struct TriggerRec {
    id: i64,
    title: String,
    active: bool,
    conditions: Value,
    actions: Value,
}

impl TriggerRec {
    fn view(&self) -> Value {
        json!({ "id": self.id, "title": self.title, "active": self.active,
                "conditions": self.conditions, "actions": self.actions })
    }
    /// `(webhook id, body template)` of its `notification_webhook` action.
    fn notification(&self) -> Option<(String, String)> {
        self.actions.as_array()?.iter().find_map(|a| {
            if a.get("field")?.as_str()? != "notification_webhook" {
                return None;
            }
            let v = a.get("value")?.as_array()?;
            Some((
                v.first()?.as_str()?.to_owned(),
                v.get(1)?.as_str()?.to_owned(),
            ))
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct TicketSeen {
    status: Status,
    assignee: i64,
    requester: i64,
    org: i64,
}

#[derive(Clone, PartialEq, Eq)]
struct UserSeen {
    role: Role,
    active: bool,
    name: Box<str>,
    /// 0: none.
    organization: i64,
    /// `(identity id, value)` of its live identities.
    identities: Vec<(i64, Box<str>)>,
}

/// The webhooks, triggers and the dispatcher's memory, next to the store in [`App`].
#[derive(Default)]
pub(crate) struct Hooks {
    webhooks: Vec<WebhookRec>,
    triggers: Vec<TriggerRec>,
    next_id: u64,
    tickets: FxHashMap<i64, TicketSeen>,
    users: FxHashMap<i64, UserSeen>,
    pub(crate) stats: DeliveryStats,
}

fn ticket_seen(s: &Store, id: i64) -> Option<TicketSeen> {
    s.ticket_rec(id).map(|t| TicketSeen {
        status: t.status,
        assignee: t.assignee_id,
        requester: t.requester_id,
        org: t.organization_id,
    })
}

fn user_seen(s: &Store, id: i64) -> Option<UserSeen> {
    s.user_rec(id).map(|u| UserSeen {
        role: u.role,
        active: u.active,
        name: u.name.clone(),
        organization: u.organization_id,
        identities: u.identities().map(|i| (i.id, i.value.into())).collect(),
    })
}

impl Hooks {
    /// Remembers the store as it is, so only later changes produce events.
    pub(crate) fn baseline(&mut self, s: &Store) {
        self.tickets = s
            .ticket_ids()
            .filter_map(|id| Some((id, ticket_seen(s, id)?)))
            .collect();
        self.users = s
            .user_ids()
            .filter_map(|id| Some((id, user_seen(s, id)?)))
            .collect();
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        // Zendesk webhook ids are 26-character ULID-like strings.
        format!("01SIMWEBHOOK{:014}", self.next_id)
    }
}

fn sid(id: i64) -> Value {
    Value::String(id.to_string())
}

fn opt_sid(id: i64) -> Value {
    if id == 0 { Value::Null } else { sid(id) }
}

fn upper(s: Status) -> String {
    s.as_str().to_ascii_uppercase()
}

fn ticket_detail(s: &Store, id: i64) -> Value {
    let Some(t) = s.ticket_rec(id) else {
        return json!({ "id": sid(id) });
    };
    json!({
        "actor_id": "-1", "assignee_id": opt_sid(t.assignee_id), "brand_id": "1",
        "created_at": wire::format_time(t.created_at), "custom_status": "1",
        "description": t.description(), "external_id": null, "form_id": "1", "group_id": null,
        "id": sid(t.id), "is_public": t.is_public,
        "organization_id": opt_sid(t.organization_id),
        "priority": t.priority.checked_sub(1).map(|p| crate::store::PRIORITIES[p as usize].to_ascii_uppercase()),
        "requester_id": sid(t.requester_id), "status": upper(t.status), "subject": &*t.subject,
        "submitter_id": sid(t.submitter_id), "tags": [],
        "type": t.kind.checked_sub(1).map(|k| crate::store::TYPES[k as usize].to_ascii_uppercase()),
        "updated_at": wire::format_time(t.updated_at), "via": { "channel": "web_service" },
    })
}

fn user_detail(s: &Store, id: i64) -> Value {
    let Some(u) = s.user_rec(id) else {
        return json!({ "id": sid(id) });
    };
    json!({
        "created_at": wire::format_time(u.created_at),
        "email": u.email.as_deref().filter(|_| u.active),
        "external_id": u.external_id(), "default_group_id": null, "id": sid(u.id),
        "organization_id": sid(u.organization_id), "role": u.role.as_str(),
        "updated_at": wire::format_time(u.updated_at),
    })
}

/// One event before it is wrapped for a webhook.
struct Event {
    kind: String,
    subject: String,
    detail: Value,
    event: Value,
    /// The ticket, for trigger templates.
    ticket: Option<i64>,
}

fn diff_ticket(s: &Store, id: i64, before: Option<TicketSeen>, seq: &str, out: &mut Vec<Event>) {
    let Some(now) = ticket_seen(s, id) else {
        return;
    };
    let mut kinds: Vec<(&str, Value)> = Vec::new();
    match before {
        None => kinds.push(("ticket.created", json!({}))),
        Some(b) => {
            if b.status != now.status {
                if now.status == Status::Deleted {
                    kinds.push(("ticket.soft_deleted", json!({})));
                } else {
                    kinds.push((
                        "ticket.status_changed",
                        json!({ "current": upper(now.status), "previous": upper(b.status) }),
                    ));
                }
            }
            if b.assignee != now.assignee {
                kinds.push((
                    "ticket.agent_assignment_changed",
                    json!({ "current": opt_sid(now.assignee), "previous": opt_sid(b.assignee) }),
                ));
            }
            if b.requester != now.requester {
                kinds.push((
                    "ticket.requester_changed",
                    json!({ "current": sid(now.requester), "previous": sid(b.requester) }),
                ));
            }
            if b.org != now.org {
                kinds.push((
                    "ticket.organization_changed",
                    json!({ "current": opt_sid(now.org), "previous": opt_sid(b.org) }),
                ));
            }
            // Anything else (a comment, the subject): Zendesk sends other ticket event types
            // Deskline does not subscribe to; the trigger path below still fires.
            if kinds.is_empty() {
                kinds.push(("ticket.comment_added", json!({})));
            }
        }
    }
    let detail = ticket_detail(s, id);
    for (pos, (kind, mut ev)) in kinds.into_iter().enumerate() {
        ev["meta"] = json!({ "sequence": { "id": seq, "position": pos + 1 } });
        out.push(Event {
            kind: format!("zen:event-type:{kind}"),
            subject: format!("zen:ticket:{id}"),
            detail: detail.clone(),
            event: ev,
            ticket: Some(id),
        });
    }
}

fn diff_user(s: &Store, id: i64, before: Option<&UserSeen>, out: &mut Vec<Event>) {
    let Some(now) = user_seen(s, id) else {
        return;
    };
    let mut kinds: Vec<(&str, Value)> = Vec::new();
    match before {
        None => kinds.push(("user.created", json!({}))),
        Some(b) => {
            if b.active && !now.active {
                match s.merged_into.get(&id) {
                    Some(w) => kinds.push(("user.merged", json!({ "current": sid(*w) }))),
                    None => kinds.push(("user.deleted", json!({}))),
                }
            } else if b.active != now.active {
                kinds.push((
                    "user.active_changed",
                    json!({ "current": now.active, "previous": b.active }),
                ));
            }
            // A suspension sends no event: Zendesk's user-events reference has no type for it.
            if b.name != now.name {
                kinds.push((
                    "user.name_changed",
                    json!({ "current": &*now.name, "previous": &*b.name }),
                ));
            }
            if b.organization != now.organization {
                // The membership payload's `event` shape is UNVERIFIED; Deskline reads the user
                // again on any user event, so only the type matters to it.
                if b.organization != 0 {
                    kinds.push((
                        "user.organization_membership_deleted",
                        json!({ "previous": { "organization_id": sid(b.organization) } }),
                    ));
                }
                if now.organization != 0 {
                    kinds.push((
                        "user.organization_membership_created",
                        json!({ "current": { "organization_id": sid(now.organization) } }),
                    ));
                }
            }
            if b.role != now.role {
                kinds.push((
                    "user.role_changed",
                    json!({ "current": now.role.as_str(), "previous": b.role.as_str() }),
                ));
            }
            if now.active {
                for (iid, v) in &now.identities {
                    match b.identities.iter().find(|(i, _)| i == iid) {
                        None => kinds.push((
                            "user.identity_created",
                            json!({ "current": { "id": sid(*iid), "value": &**v } }),
                        )),
                        Some((_, old)) if old != v => kinds.push((
                            "user.identity_changed",
                            json!({ "current": { "id": sid(*iid), "value": &**v },
                                    "previous": { "id": sid(*iid), "value": &**old } }),
                        )),
                        Some(_) => {}
                    }
                }
                for (iid, v) in &b.identities {
                    if !now.identities.iter().any(|(i, _)| i == iid) {
                        kinds.push((
                            "user.identity_deleted",
                            json!({ "previous": { "id": sid(*iid), "value": &**v } }),
                        ));
                    }
                }
            }
            if kinds.is_empty() {
                kinds.push(("user.details_changed", json!({})));
            }
        }
    }
    let detail = user_detail(s, id);
    for (kind, ev) in kinds {
        out.push(Event {
            kind: format!("zen:event-type:{kind}"),
            subject: format!("zen:user:{id}"),
            detail: detail.clone(),
            event: ev,
            ticket: None,
        });
    }
}

/// Replaces a trigger template's placeholders with the ticket's values.
fn render_template(s: &Store, template: &str, ticket: i64) -> String {
    let Some(t) = s.ticket_rec(ticket) else {
        return template.to_owned();
    };
    let id0 = |v: i64| if v == 0 { String::new() } else { v.to_string() };
    // Placeholders render as text; JSON-escape the free-text ones.
    let esc = |v: &str| {
        let q = serde_json::to_string(v).unwrap_or_default();
        q[1..q.len() - 1].to_owned()
    };
    let status = t.status.as_str();
    let status = format!("{}{}", status[..1].to_ascii_uppercase(), &status[1..]);
    template
        .replace("{{ticket.id}}", &t.id.to_string())
        .replace("{{ticket.status}}", &status)
        .replace("{{ticket.assignee.id}}", &id0(t.assignee_id))
        .replace("{{ticket.requester.id}}", &id0(t.requester_id))
        .replace("{{ticket.organization.id}}", &id0(t.organization_id))
        .replace(
            "{{ticket.updated_at_with_timestamp}}",
            &wire::format_time(t.updated_at),
        )
        .replace("{{ticket.title}}", &esc(&t.subject))
}

/// One POST to make: the webhook's endpoint and secret and the body.
struct Invocation {
    webhook_id: String,
    endpoint: String,
    secret: String,
    invocation_id: String,
    body: Vec<u8>,
}

fn random_hex(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

fn uuid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Drains the store's dirty marks into invocations (store and hooks locked briefly).
fn collect(app: &App) -> Vec<Invocation> {
    let mut store = app.store.write();
    if store.dirty.is_empty() {
        return Vec::new();
    }
    let dirty = std::mem::take(&mut store.dirty);
    let s = &*store;
    let mut hooks = app.hooks.lock();
    let mut events = Vec::new();
    for d in dirty {
        match d {
            Dirty::Ticket(id) => {
                let before = hooks.tickets.get(&id).copied();
                diff_ticket(s, id, before, &random_hex(32), &mut events);
                if let Some(now) = ticket_seen(s, id) {
                    hooks.tickets.insert(id, now);
                }
            }
            Dirty::User(id) => {
                let before = hooks.users.get(&id).cloned();
                diff_user(s, id, before.as_ref(), &mut events);
                if let Some(now) = user_seen(s, id) {
                    hooks.users.insert(id, now);
                }
            }
        }
    }
    hooks.stats.events += events.len() as u64;
    let now = wire::format_time(crate::store::now_ms() / 1000);
    let mut out = Vec::new();
    for e in &events {
        for w in hooks.webhooks.iter().filter(|w| w.status == "active") {
            // `conditional_ticket_events` webhooks get tickets through triggers only.
            if !w.subscriptions.iter().any(|s| s == &e.kind) {
                continue;
            }
            let body = json!({
                "type": e.kind, "account_id": ACCOUNT_ID, "id": uuid(), "time": now,
                "zendesk_event_version": "2022-11-06", "subject": e.subject,
                "detail": e.detail, "event": e.event,
            });
            out.push(Invocation {
                webhook_id: w.id.clone(),
                endpoint: w.endpoint.clone(),
                secret: w.secret.clone(),
                invocation_id: random_hex(20),
                body: serde_json::to_vec(&body).unwrap_or_default(),
            });
        }
    }
    // Triggers: once per changed ticket (not per event), like one trigger run per update.
    let mut fired: Vec<i64> = Vec::new();
    for e in &events {
        let Some(t) = e.ticket else { continue };
        if fired.contains(&t) {
            continue;
        }
        fired.push(t);
        for tr in hooks.triggers.iter().filter(|t| t.active) {
            let Some((wid, template)) = tr.notification() else {
                continue;
            };
            let Some(w) = hooks
                .webhooks
                .iter()
                .find(|w| w.id == wid && w.status == "active")
            else {
                continue;
            };
            out.push(Invocation {
                webhook_id: w.id.clone(),
                endpoint: w.endpoint.clone(),
                secret: w.secret.clone(),
                invocation_id: random_hex(20),
                body: render_template(s, &template, t).into_bytes(),
            });
        }
    }
    out
}

/// `base64(HMAC-SHA256(secret, timestamp + body))`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.as_bytes());
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The dispatcher: waits for changes, turns them into invocations and sends each on its own task.
pub(crate) async fn run(app: Arc<App>, changed: Arc<tokio::sync::Notify>, stop: CancellationToken) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.notified() => {}
        }
        for inv in collect(&app) {
            let faults = app.cfg.read().webhook_faults.clone();
            let (drop, dup, reorder) = {
                let mut rng = rand::rng();
                let roll = |r: f64, rng: &mut rand::rngs::ThreadRng| {
                    r > 0.0 && rng.random_bool(r.clamp(0.0, 1.0))
                };
                (
                    roll(faults.drop_rate, &mut rng),
                    roll(faults.duplicate_rate, &mut rng),
                    roll(faults.reorder_rate, &mut rng),
                )
            };
            if drop {
                app.hooks.lock().stats.dropped += 1;
                continue;
            }
            let inv = Arc::new(inv);
            let copies = if dup { 2 } else { 1 };
            if dup {
                app.hooks.lock().stats.duplicated += 1;
            }
            for _ in 0..copies {
                let (app, http, inv, faults, stop) = (
                    app.clone(),
                    http.clone(),
                    inv.clone(),
                    faults.clone(),
                    stop.clone(),
                );
                app.hooks.lock().stats.pending += 1;
                tokio::spawn(async move {
                    let _done = Pending(app.clone());
                    let mut delay = {
                        let mut rng = rand::rng();
                        let hi = faults.max_delay_ms.max(faults.min_delay_ms);
                        rng.random_range(faults.min_delay_ms..=hi)
                            + if reorder {
                                rng.random_range(0..=faults.reorder_delay_ms)
                            } else {
                                0
                            }
                    };
                    for attempt in 0..faults.max_attempts.max(1) {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        }
                        let ok = send(&http, &inv).await;
                        let mut hooks = app.hooks.lock();
                        if ok {
                            hooks.stats.delivered += 1;
                            return;
                        }
                        hooks.stats.failed += 1;
                        delay = faults.retry_base_ms.saturating_mul(1 << attempt.min(10));
                    }
                    app.hooks.lock().stats.gave_up += 1;
                });
            }
        }
    }
}

/// Counts a spawned delivery as finished however its task ends.
struct Pending(Arc<App>);

impl Drop for Pending {
    fn drop(&mut self) {
        let mut hooks = self.0.hooks.lock();
        hooks.stats.pending = hooks.stats.pending.saturating_sub(1);
    }
}

async fn send(http: &reqwest::Client, inv: &Invocation) -> bool {
    let ts = wire::format_time(crate::store::now_ms() / 1000);
    let sig = sign(inv.secret.as_bytes(), &ts, &inv.body);
    http.post(&inv.endpoint)
        .header("content-type", "application/json")
        .header("user-agent", "Zendesk Webhook")
        .header("x-zendesk-account-id", ACCOUNT_ID.to_string())
        .header("x-zendesk-webhook-id", &inv.webhook_id)
        .header("x-zendesk-webhook-invocation-id", &inv.invocation_id)
        .header("x-zendesk-webhook-signature", sig)
        .header("x-zendesk-webhook-signature-timestamp", ts)
        .body(inv.body.clone())
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

// ---- the Webhooks and Triggers APIs ------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(default)]
struct WebhookIn {
    name: Option<String>,
    endpoint: Option<String>,
    status: Option<String>,
    subscriptions: Option<Vec<String>>,
    http_method: Option<String>,
    request_format: Option<String>,
}

#[derive(Deserialize)]
struct WebhookBody {
    webhook: WebhookIn,
}

fn invalid(detail: &str) -> Reply {
    // The Webhooks API answers in the JSON:API-style envelope (ZENDESK.md §9).
    Reply::json(
        axum::http::StatusCode::BAD_REQUEST,
        &json!({ "errors": [{ "code": "InvalidInput", "title": "Invalid input", "detail": detail }] }),
    )
}

fn webhook_not_found() -> Reply {
    Reply::json(
        axum::http::StatusCode::NOT_FOUND,
        &json!({ "errors": [{ "code": "WebhookNotFound", "title": "Webhook not found" }] }),
    )
}

/// Handles `/api/v2/webhooks…` and `/api/v2/triggers…`; `None` for any other path.
pub(crate) fn route(
    app: &App,
    method: &axum::http::Method,
    segs: &[&str],
    q: &crate::http::Query,
    body: &[u8],
) -> Option<Reply> {
    use axum::http::{Method, StatusCode};
    let now = crate::store::now_ms() / 1000;
    let mut hooks = app.hooks.lock();
    Some(match (method, segs) {
        (&Method::GET, ["webhooks"]) => {
            let filter = q.get("filter[name_contains]").map(str::to_lowercase);
            let list: Vec<Value> = hooks
                .webhooks
                .iter()
                .filter(|w| {
                    filter
                        .as_deref()
                        .is_none_or(|f| w.name.to_lowercase().contains(f))
                })
                .map(WebhookRec::view)
                .collect();
            Reply::ok(&json!({ "webhooks": list, "meta": { "has_more": false,
                "after_cursor": null, "before_cursor": null }, "links": { "next": null, "prev": null } }))
        }
        (&Method::POST, ["webhooks"]) => {
            let Ok(WebhookBody { webhook: w }) = serde_json::from_slice(body) else {
                return Some(invalid("webhook is required"));
            };
            let (Some(name), Some(endpoint)) = (w.name, w.endpoint) else {
                return Some(invalid("name and endpoint are required"));
            };
            if w.http_method.as_deref().is_some_and(|m| m != "POST")
                || w.request_format.as_deref().is_some_and(|f| f != "json")
            {
                return Some(invalid("only POST with json is simulated"));
            }
            let id = hooks.new_id();
            let rec = WebhookRec {
                id,
                name,
                endpoint,
                status: w.status.unwrap_or_else(|| "active".into()),
                subscriptions: w.subscriptions.unwrap_or_default(),
                secret: random_hex(40),
                created_at: now,
                updated_at: now,
            };
            let v = rec.view();
            hooks.webhooks.push(rec);
            Reply::json(StatusCode::CREATED, &json!({ "webhook": v }))
        }
        (&Method::GET, ["webhooks", id]) => match hooks.webhooks.iter().find(|w| w.id == *id) {
            Some(w) => Reply::ok(&json!({ "webhook": w.view() })),
            None => webhook_not_found(),
        },
        (&Method::PATCH | &Method::PUT, ["webhooks", id]) => {
            let Ok(WebhookBody { webhook: p }) = serde_json::from_slice(body) else {
                return Some(invalid("webhook is required"));
            };
            let Some(w) = hooks.webhooks.iter_mut().find(|w| w.id == *id) else {
                return Some(webhook_not_found());
            };
            if let Some(v) = p.name {
                w.name = v;
            }
            if let Some(v) = p.endpoint {
                w.endpoint = v;
            }
            if let Some(v) = p.status {
                w.status = v;
            }
            if let Some(v) = p.subscriptions {
                w.subscriptions = v;
            }
            w.updated_at = now;
            Reply {
                status: StatusCode::NO_CONTENT,
                body: Vec::new(),
                content_type: "application/json",
                headers: Vec::new(),
            }
        }
        (&Method::DELETE, ["webhooks", id]) => {
            let before = hooks.webhooks.len();
            hooks.webhooks.retain(|w| w.id != *id);
            if hooks.webhooks.len() == before {
                return Some(webhook_not_found());
            }
            Reply {
                status: StatusCode::NO_CONTENT,
                body: Vec::new(),
                content_type: "application/json",
                headers: Vec::new(),
            }
        }
        (m @ (&Method::GET | &Method::POST), ["webhooks", id, "signing_secret"]) => {
            let reset = m == Method::POST;
            let Some(w) = hooks.webhooks.iter_mut().find(|w| w.id == *id) else {
                return Some(webhook_not_found());
            };
            if reset {
                w.secret = random_hex(40);
            }
            Reply::ok(&json!({ "signing_secret": { "algorithm": "SHA256", "secret": w.secret } }))
        }
        (&Method::GET, ["triggers"]) => {
            let list: Vec<Value> = hooks.triggers.iter().map(TriggerRec::view).collect();
            Reply::ok(&json!({ "triggers": list, "count": list.len(), "next_page": null }))
        }
        (&Method::POST, ["triggers"]) | (&Method::PUT, ["triggers", _]) => {
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return Some(invalid("trigger is required"));
            };
            let t = &v["trigger"];
            let existing = match segs {
                [_, id] => match id.parse::<i64>() {
                    Ok(id) => match hooks.triggers.iter().position(|t| t.id == id) {
                        Some(p) => Some(p),
                        None => return Some(Reply::not_found()),
                    },
                    Err(_) => return Some(Reply::not_found()),
                },
                _ => None,
            };
            let Some(title) = t["title"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| existing.map(|p| hooks.triggers[p].title.clone()))
            else {
                return Some(invalid("title is required"));
            };
            let rec = TriggerRec {
                id: existing.map_or_else(
                    || hooks.triggers.len() as i64 + 360_000_001,
                    |p| hooks.triggers[p].id,
                ),
                title,
                active: t["active"].as_bool().unwrap_or(true),
                conditions: t
                    .get("conditions")
                    .cloned()
                    .unwrap_or(json!({"all": [], "any": []})),
                actions: t.get("actions").cloned().unwrap_or(json!([])),
            };
            let v = rec.view();
            match existing {
                Some(p) => {
                    hooks.triggers[p] = rec;
                    Reply::ok(&json!({ "trigger": v }))
                }
                None => {
                    hooks.triggers.push(rec);
                    Reply::json(StatusCode::CREATED, &json!({ "trigger": v }))
                }
            }
        }
        _ => return None,
    })
}
