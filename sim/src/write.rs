//! The write endpoints (users, identities, organizations, tickets with `Idempotency-Key`, Talk call
//! records) and search, with Zendesk's validation errors.
//!
//! Idempotency (ZENDESK.md §4): a key seen with the same body (compared as parsed JSON, so key order
//! and whitespace don't matter) within two hours replays the first response with
//! `x-idempotency-lookup: hit` and creates nothing; a different body is a 400
//! `IdempotentRequestError`. Only successful creates are remembered (UNVERIFIED: whether Zendesk also
//! replays a 422): a refused request may be corrected and sent again under the same key. The key map
//! lock is held across the create, so two concurrent requests with one key make one ticket.

use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::{
    http::{App, Caller, Query, Reply, offset_page},
    render::{CommentOut, IdentityOut, OrgOut, TicketOut, UserOut},
    store::{
        self, NewComment, NewTicket, NewUser, Role, Status, StoreError, TicketPatch, UserPatch,
        now_ms,
    },
    wire,
};

const IDEMPOTENCY_TTL: Duration = Duration::from_secs(2 * 3600);

pub(crate) struct IdemEntry {
    request: Value,
    status: StatusCode,
    body: Vec<u8>,
    location: String,
    at: Instant,
}

fn record_invalid(field: &str, code: &str, description: &str) -> Reply {
    Reply::json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &wire::Error::record_invalid(field, Some(code), description),
    )
}

fn store_error(e: StoreError) -> Reply {
    match e {
        StoreError::NotFound => Reply::not_found(),
        StoreError::Invalid {
            field,
            code,
            description,
        } => record_invalid(field, code, &description),
    }
}

fn bad_json(e: impl std::fmt::Display) -> Reply {
    Reply::error(
        StatusCode::BAD_REQUEST,
        "InvalidJSON",
        &format!("The request body is not valid JSON: {e}"),
    )
}

/// The object under `root` (`{"user":{…}}`), or a 400.
fn root_object(body: &[u8], root: &str) -> Result<Map<String, Value>, Reply> {
    let v: Value = serde_json::from_slice(body).map_err(bad_json)?;
    match v.get(root) {
        Some(Value::Object(m)) => Ok(m.clone()),
        _ => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "InvalidValue",
            &format!("Parameter {root} is required and must be an object"),
        )),
    }
}

/// Absent → `None`; `null` → `Some(None)`; a string or number → `Some(Some(text))`.
fn field_str(m: &Map<String, Value>, k: &str) -> Option<Option<String>> {
    match m.get(k)? {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        Value::Number(n) => Some(Some(n.to_string())),
        Value::Bool(b) => Some(Some(b.to_string())),
        _ => Some(None),
    }
}

fn field_id(m: &Map<String, Value>, k: &str) -> Option<Option<i64>> {
    match m.get(k)? {
        Value::Null => Some(None),
        Value::Number(n) => Some(n.as_i64()),
        Value::String(s) => Some(s.trim().parse().ok()),
        _ => Some(None),
    }
}

fn field_bool(m: &Map<String, Value>, k: &str) -> Option<bool> {
    m.get(k).and_then(Value::as_bool)
}

fn field_map(m: &Map<String, Value>, k: &str) -> Option<Map<String, Value>> {
    m.get(k).and_then(Value::as_object).cloned()
}

fn location(app: &App, what: &str, id: i64) -> String {
    format!("{}/api/v2/{what}/{id}.json", app.base)
}

pub(crate) fn route(
    app: &App,
    caller: Caller,
    method: &Method,
    segs: &[&str],
    headers: &HeaderMap,
    body: &[u8],
) -> Reply {
    let id = |s: &str| s.parse::<i64>().ok();
    match (method, segs) {
        (&Method::POST, ["users"]) => create_user(app, body),
        (&Method::POST, ["users", "create_or_update"]) => create_or_update_user(app, body),
        (&Method::PUT, ["users", u]) => {
            id(u).map_or_else(Reply::not_found, |u| update_user(app, u, body))
        }
        (&Method::POST, ["users", u, "identities"]) => {
            id(u).map_or_else(Reply::not_found, |u| add_identity(app, u, body))
        }
        (&Method::POST, ["organizations"]) => create_org(app, body),
        (&Method::POST, ["organizations", "create_or_update"]) => create_or_update_org(app, body),
        (&Method::PUT, ["organizations", o]) => {
            id(o).map_or_else(Reply::not_found, |o| update_org(app, o, body))
        }
        (&Method::POST, ["tickets"]) => create_ticket_idempotent(app, caller, headers, body),
        (&Method::PUT, ["tickets", t]) => {
            id(t).map_or_else(Reply::not_found, |t| update_ticket(app, caller, t, body))
        }
        (&Method::POST, ["calls"]) => create_call(app, body),
        _ => Reply::error(StatusCode::NOT_FOUND, "InvalidEndpoint", "Not found"),
    }
}

// ---- users ---------------------------------------------------------------------------------------

fn user_json(app: &App, id: i64, status: StatusCode) -> Reply {
    let s = app.store.read();
    match s.user_rec(id) {
        Some(u) => Reply::json(status, &json!({ "user": UserOut::new(&app.base, u) }))
            .with_header("location", location(app, "users", id)),
        None => Reply::not_found(),
    }
}

fn new_user_from(m: &Map<String, Value>) -> Result<NewUser, Reply> {
    let role = match field_str(m, "role").flatten() {
        None => None,
        Some(r) => Some(Role::parse(&r).ok_or_else(|| {
            record_invalid("role", "InvalidValue", &format!("Role: {r} is not valid"))
        })?),
    };
    Ok(NewUser {
        name: field_str(m, "name").flatten().unwrap_or_default(),
        email: field_str(m, "email").flatten(),
        phone: field_str(m, "phone").flatten(),
        role,
        organization_id: field_id(m, "organization_id").flatten(),
        external_id: field_str(m, "external_id").flatten(),
        shared_phone_number: field_bool(m, "shared_phone_number").unwrap_or(false),
        suspended: field_bool(m, "suspended").unwrap_or(false),
        user_fields: field_map(m, "user_fields").unwrap_or_default(),
    })
}

fn user_patch_from(m: &Map<String, Value>) -> Result<UserPatch, Reply> {
    let role = match field_str(m, "role").flatten() {
        None => None,
        Some(r) => Some(Role::parse(&r).ok_or_else(|| {
            record_invalid("role", "InvalidValue", &format!("Role: {r} is not valid"))
        })?),
    };
    Ok(UserPatch {
        name: field_str(m, "name").flatten(),
        email: field_str(m, "email"),
        phone: field_str(m, "phone"),
        role,
        active: None,
        suspended: field_bool(m, "suspended"),
        shared_phone_number: field_bool(m, "shared_phone_number"),
        organization_id: field_id(m, "organization_id"),
        external_id: field_str(m, "external_id"),
        user_fields: field_map(m, "user_fields"),
    })
}

/// `organization: {name}` on a user write links the named organization, creating it if missing
/// (UNVERIFIED on real Zendesk; documented in the create input).
fn org_from_input(s: &mut store::Store, m: &Map<String, Value>) -> Result<Option<i64>, StoreError> {
    let Some(name) = m
        .get("organization")
        .and_then(|o| o.get("name"))
        .and_then(Value::as_str)
    else {
        return Ok(None);
    };
    match s.organization_by_name(name) {
        Some(id) => Ok(Some(id)),
        None => s.create_organization(name, None).map(Some),
    }
}

/// Identities given in the create input (`identities: [{type, value}]`).
fn add_input_identities(
    s: &mut store::Store,
    id: i64,
    m: &Map<String, Value>,
) -> Result<(), StoreError> {
    for i in m
        .get("identities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = i.get("type").and_then(Value::as_str).unwrap_or("");
        let value = i.get("value").and_then(Value::as_str).unwrap_or("");
        // The primary email/phone given as identities duplicate the user's own fields: skip those.
        let u = s.user(id);
        let dup = u.is_some_and(|u| {
            (kind == "email"
                && u.email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(value)))
                || (kind == "phone_number" && u.phone.as_deref() == Some(value))
        });
        if !dup {
            s.add_identity(id, kind, value)?;
        }
    }
    Ok(())
}

fn create_user(app: &App, body: &[u8]) -> Reply {
    let m = match root_object(body, "user") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let mut n = match new_user_from(&m) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let res = {
        let mut s = app.store.write();
        (|| {
            if let Some(o) = org_from_input(&mut s, &m)? {
                n.organization_id.get_or_insert(o);
            }
            let id = s.create_user(n)?;
            add_input_identities(&mut s, id, &m)?;
            Ok(id)
        })()
    };
    match res {
        Ok(id) => user_json(app, id, StatusCode::CREATED),
        Err(e) => store_error(e),
    }
}

fn create_or_update_user(app: &App, body: &[u8]) -> Reply {
    let m = match root_object(body, "user") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let existing = {
        let s = app.store.read();
        // Matches only by email or external_id, never by phone (ZENDESK.md §3).
        field_str(&m, "email")
            .flatten()
            .and_then(|e| s.user_by_email(&e).map(|u| u.id))
            .or_else(|| {
                field_str(&m, "external_id")
                    .flatten()
                    .and_then(|x| s.user_by_external_id(&x).map(|u| u.id))
            })
    };
    match existing {
        Some(id) => {
            let patch = match user_patch_from(&m) {
                Ok(p) => p,
                Err(r) => return r,
            };
            let res = app.store.write().update_user(id, patch);
            match res {
                Ok(()) => user_json(app, id, StatusCode::OK),
                Err(e) => store_error(e),
            }
        }
        None => create_user(app, body),
    }
}

fn update_user(app: &App, id: i64, body: &[u8]) -> Reply {
    let m = match root_object(body, "user") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let patch = match user_patch_from(&m) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let res = {
        let mut s = app.store.write();
        if s.user_rec(id).is_none_or(|u| !u.active) {
            Err(StoreError::NotFound)
        } else {
            s.update_user(id, patch)
        }
    };
    match res {
        Ok(()) => user_json(app, id, StatusCode::OK),
        Err(e) => store_error(e),
    }
}

fn add_identity(app: &App, user_id: i64, body: &[u8]) -> Reply {
    let m = match root_object(body, "identity") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let kind = field_str(&m, "type").flatten().unwrap_or_default();
    let value = field_str(&m, "value").flatten().unwrap_or_default();
    let mut s = app.store.write();
    if s.user_rec(user_id).is_none_or(|u| !u.active) {
        return Reply::not_found();
    }
    match s.add_identity(user_id, &kind, &value) {
        Ok(iid) => {
            let u = s.user_rec(user_id).expect("checked above");
            match u.identities().find(|i| i.id == iid) {
                Some(i) => Reply::json(
                    StatusCode::CREATED,
                    &json!({ "identity": IdentityOut::new(&app.base, i) }),
                )
                .with_header(
                    "location",
                    format!("{}/api/v2/users/{user_id}/identities/{iid}.json", app.base),
                ),
                None => Reply::not_found(),
            }
        }
        Err(e) => store_error(e),
    }
}

// ---- search --------------------------------------------------------------------------------------

#[derive(Serialize)]
struct UserResult<'a> {
    #[serde(flatten)]
    user: UserOut<'a>,
    result_type: &'static str,
}

/// `GET /api/v2/search?query=…`: users only. Understands `type:user`, `role:…`, `phone:DIGITS`
/// (`*DIGITS` for a suffix match; stored phones and phone identities compared by their digits),
/// `email:…`, `external_id:…`; other words match names. Users created or changed within the
/// search delay are not found yet, and deleted users never are.
pub(crate) fn search(app: &App, cfg: &super::SimConfig, q: &Query) -> Reply {
    let Some(query) = q.get("query") else {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "InvalidValue",
            "Parameter query is required",
        );
    };
    let mut role = None;
    let mut phone: Option<(String, bool)> = None;
    let mut email = None;
    let mut external = None;
    let mut words = Vec::new();
    let mut only_other_types = false;
    for tok in query.split_whitespace() {
        match tok.split_once(':') {
            Some(("type", t)) => only_other_types = t != "user",
            Some(("role", r)) => role = Role::parse(r),
            Some(("phone", p)) => {
                let suffix = p.starts_with('*');
                phone = Some((store::phone_digits(p), suffix));
            }
            Some(("email", e)) => email = Some(e.trim_matches('"').to_lowercase()),
            Some(("external_id", x)) => external = Some(x.trim_matches('"').to_string()),
            _ => words.push(tok.trim_matches('"').to_lowercase()),
        }
    }
    let s = app.store.read();
    let visible_before = now_ms() - cfg.search_delay.as_millis() as i64;
    let candidates: Vec<u32> = match &phone {
        Some((d, _)) if d.is_empty() => Vec::new(),
        Some((d, suffix)) => s.users_by_digits(d, *suffix),
        None => (0..s.users.len() as u32).collect(),
    };
    let hits: Vec<&store::UserRec> = if only_other_types {
        Vec::new()
    } else {
        candidates
            .into_iter()
            .map(|i| &s.users[i as usize])
            .filter(|u| u.active && s.user_log.entries[u.log_pos as usize].0 <= visible_before)
            .filter(|u| role.is_none_or(|r| u.role == r))
            .filter(|u| {
                email
                    .as_deref()
                    .is_none_or(|e| u.email.as_deref().is_some_and(|x| x.to_lowercase() == e))
            })
            .filter(|u| {
                external
                    .as_deref()
                    .is_none_or(|x| u.external_id().is_some_and(|e| e.eq_ignore_ascii_case(x)))
            })
            .filter(|u| {
                let name = u.name.to_lowercase();
                words.iter().all(|w| name.contains(w.as_str()))
            })
            .collect()
    };
    let (from, per, next, prev) = offset_page(app, "/api/v2/search", q, hits.len().min(1000));
    if from >= 1000 {
        return Reply::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "InvalidValue",
            "Search results are limited to 1000",
        );
    }
    let results: Vec<UserResult> = hits
        .iter()
        .skip(from)
        .take(per)
        .map(|u| UserResult {
            user: UserOut::new(&app.base, u),
            result_type: "user",
        })
        .collect();
    Reply::ok(&json!({
        "results": results,
        "facets": null,
        "next_page": next,
        "previous_page": prev,
        "count": hits.len(),
    }))
}

// ---- organizations -------------------------------------------------------------------------------

fn org_json(app: &App, id: i64, status: StatusCode) -> Reply {
    let s = app.store.read();
    match s.org_rec(id) {
        Some(o) => Reply::json(
            status,
            &json!({ "organization": OrgOut::new(&app.base, o) }),
        )
        .with_header("location", location(app, "organizations", id)),
        None => Reply::not_found(),
    }
}

fn create_org(app: &App, body: &[u8]) -> Reply {
    let m = match root_object(body, "organization") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let name = field_str(&m, "name").flatten().unwrap_or_default();
    let ext = field_str(&m, "external_id").flatten();
    let fields = field_map(&m, "organization_fields").unwrap_or_default();
    let res = app
        .store
        .write()
        .create_organization_with(&name, ext.as_deref(), &fields);
    match res {
        Ok(id) => org_json(app, id, StatusCode::CREATED),
        Err(e) => store_error(e),
    }
}

fn create_or_update_org(app: &App, body: &[u8]) -> Reply {
    let m = match root_object(body, "organization") {
        Ok(m) => m,
        Err(r) => return r,
    };
    // Matches only by id or external_id, never by name (ZENDESK.md §5).
    let existing = {
        let s = app.store.read();
        field_id(&m, "id")
            .flatten()
            .filter(|&id| s.org_rec(id).is_some_and(|o| o.deleted_at.is_none()))
            .or_else(|| {
                let x = field_str(&m, "external_id").flatten()?;
                s.orgs
                    .iter()
                    .find(|o| {
                        o.deleted_at.is_none()
                            && o.external_id
                                .as_deref()
                                .is_some_and(|e| e.eq_ignore_ascii_case(&x))
                    })
                    .map(|o| o.id)
            })
    };
    match existing {
        Some(id) => update_org(app, id, body),
        None => create_org(app, body),
    }
}

fn update_org(app: &App, id: i64, body: &[u8]) -> Reply {
    let m = match root_object(body, "organization") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let name = field_str(&m, "name").flatten();
    let ext = field_str(&m, "external_id");
    let fields = field_map(&m, "organization_fields").unwrap_or_default();
    let res = {
        let mut s = app.store.write();
        if s.org_rec(id).is_none_or(|o| o.deleted_at.is_some()) {
            Err(StoreError::NotFound)
        } else {
            s.update_organization(
                id,
                name.as_deref(),
                ext.as_ref().map(|x| x.as_deref()),
                &fields,
            )
        }
    };
    match res {
        Ok(()) => org_json(app, id, StatusCode::OK),
        Err(e) => store_error(e),
    }
}

// ---- tickets -------------------------------------------------------------------------------------

/// The comment object of a ticket write: `body` or `html_body`, `public`, `author_id`.
fn comment_from(v: Option<&Value>) -> Option<NewComment> {
    let c = v?;
    if let Some(s) = c.as_str() {
        return Some(NewComment {
            body: s.to_string(),
            html: false,
            public: None,
            author_id: None,
        });
    }
    let m = c.as_object()?;
    let (body, html) = match (
        m.get("html_body").and_then(Value::as_str),
        m.get("body").and_then(Value::as_str),
    ) {
        (Some(h), _) if !h.trim().is_empty() => (h.to_string(), true),
        (_, Some(b)) if !b.trim().is_empty() => (b.to_string(), false),
        _ => return None,
    };
    Some(NewComment {
        body,
        html,
        public: m.get("public").and_then(Value::as_bool),
        author_id: m.get("author_id").and_then(Value::as_i64),
    })
}

fn custom_fields_from(m: &Map<String, Value>) -> Vec<(i64, Value)> {
    m.get("custom_fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some((
                f.get("id")?.as_i64()?,
                f.get("value").cloned().unwrap_or(Value::Null),
            ))
        })
        .collect()
}

fn parse_status(m: &Map<String, Value>) -> Result<Option<Status>, Reply> {
    match field_str(m, "status").flatten() {
        None => Ok(None),
        Some(v) => Status::parse(&v).map(Some).ok_or_else(|| {
            record_invalid(
                "status",
                "InvalidValue",
                &format!("Status: {v} is not valid"),
            )
        }),
    }
}

fn ticket_with_audit(
    app: &App,
    id: i64,
    status: StatusCode,
    author: i64,
    comment: Option<i64>,
) -> Reply {
    let s = app.store.read();
    let Some(t) = s.ticket_rec(id) else {
        return Reply::not_found();
    };
    let comments = s.comment_recs(id);
    let mut events: Vec<Value> = Vec::new();
    if let Some(c) = comment.and_then(|cid| comments.iter().find(|c| c.id == cid)) {
        let mut ev = serde_json::to_value(CommentOut::new(c)).unwrap_or_default();
        if let Some(o) = ev.as_object_mut() {
            o.remove("via");
        }
        events.push(ev);
    }
    let ticket = serde_json::to_value(TicketOut::new(&app.base, t, false)).unwrap_or_default();
    for f in [
        "status",
        "priority",
        "type",
        "assignee_id",
        "requester_id",
        "subject",
    ] {
        if let Some(v) = ticket.get(f) {
            events.push(json!({
                "id": now_ms(),
                "type": if status == StatusCode::CREATED { "Create" } else { "Change" },
                "value": v,
                "field_name": f,
            }));
        }
    }
    let audit = json!({
        "id": store::COMMENT_BASE * 2 + id,
        "ticket_id": id,
        "created_at": super::render::Ts(t.updated_at),
        "author_id": author,
        "metadata": { "system": {}, "custom": {} },
        "events": events,
        "via": { "channel": "api", "source": { "from": {}, "to": {}, "rel": null } },
    });
    Reply::json(status, &json!({ "ticket": ticket, "audit": audit }))
}

fn create_ticket_idempotent(app: &App, caller: Caller, headers: &HeaderMap, body: &[u8]) -> Reply {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        return create_ticket(app, caller, body);
    };
    if key.len() > 255 {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "IdempotentRequestError",
            "Idempotency key is too long",
        );
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_json(e),
    };
    let mut map = app.idempotency.lock();
    map.retain(|_, e| e.at.elapsed() < IDEMPOTENCY_TTL);
    if let Some(e) = map.get(key) {
        if e.request != request {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "IdempotentRequestError",
                "The request body does not match the original request for this idempotency key",
            );
        }
        return Reply {
            status: e.status,
            body: e.body.clone(),
            content_type: "application/json; charset=utf-8",
            headers: vec![
                ("location", e.location.clone()),
                ("x-idempotency-lookup", "hit".into()),
            ],
        };
    }
    let reply = create_ticket(app, caller, body);
    if reply.status.is_success() {
        let location = reply
            .headers
            .iter()
            .find(|h| h.0 == "location")
            .map(|h| h.1.clone())
            .unwrap_or_default();
        map.insert(
            key.to_string(),
            IdemEntry {
                request,
                status: reply.status,
                body: reply.body.clone(),
                location,
                at: Instant::now(),
            },
        );
    }
    reply.with_header("x-idempotency-lookup", "miss".into())
}

fn create_ticket(app: &App, caller: Caller, body: &[u8]) -> Reply {
    let m = match root_object(body, "ticket") {
        Ok(m) => m,
        Err(r) => return r,
    };
    // The OAS requires `comment`; a recorded create with only `description` was accepted too.
    let comment = comment_from(m.get("comment")).or_else(|| {
        field_str(&m, "description")
            .flatten()
            .filter(|d| !d.trim().is_empty())
            .map(|d| NewComment {
                body: d,
                html: false,
                public: None,
                author_id: None,
            })
    });
    let Some(comment) = comment else {
        return record_invalid("description", "BlankValue", "Description: cannot be blank");
    };
    let status = match parse_status(&m) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut s = app.store.write();
    let requester_id = match field_id(&m, "requester_id").flatten() {
        Some(id) => id,
        None => match m.get("requester").and_then(Value::as_object) {
            Some(r) => {
                let email = r.get("email").and_then(Value::as_str);
                let found = email.and_then(|e| s.user_by_email(e).map(|u| u.id));
                match found {
                    Some(id) => id,
                    None => {
                        let name = r
                            .get("name")
                            .and_then(Value::as_str)
                            .or(email)
                            .unwrap_or("")
                            .to_string();
                        match s.create_user(NewUser {
                            name,
                            email: email.map(Into::into),
                            ..Default::default()
                        }) {
                            Ok(id) => id,
                            Err(e) => return store_error(e),
                        }
                    }
                }
            }
            None => match caller.user_id {
                Some(id) => id,
                None => {
                    return record_invalid("requester", "InvalidValue", "Requester: is invalid");
                }
            },
        },
    };
    let subject = field_str(&m, "subject")
        .flatten()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| {
            let plain = if comment.html {
                store::strip_tags(&comment.body)
            } else {
                comment.body.clone()
            };
            plain.chars().take(50).collect()
        });
    let author = comment
        .author_id
        .or(field_id(&m, "submitter_id").flatten())
        .or(caller.user_id);
    if let Some(org) = field_id(&m, "organization_id").flatten() {
        if s.org_rec(org).is_none() {
            return record_invalid(
                "organization_id",
                "InvalidValue",
                "Organization: is invalid",
            );
        }
    }
    let n = NewTicket {
        subject,
        comment: comment.body.clone(),
        comment_public: comment.public.unwrap_or(true),
        requester_id,
        submitter_id: author,
        assignee_id: field_id(&m, "assignee_id").flatten(),
        organization_id: field_id(&m, "organization_id").flatten(),
        status,
        priority: field_str(&m, "priority").flatten(),
        kind: field_str(&m, "type").flatten(),
        custom_fields: custom_fields_from(&m),
        tags: m
            .get("tags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(Into::into))
            .collect(),
        via: Some(if m.get("via_id").is_some() {
            "voice".into()
        } else {
            "api".into()
        }),
    };
    let html = comment.html;
    let res = s.create_ticket(n);
    let id = match res {
        Ok(id) => id,
        Err(e) => return store_error(e),
    };
    if html {
        if let Some(first) = s.comments.get_mut(&id).and_then(|c| c.first_mut()) {
            first.html = true;
        }
    }
    let first = s
        .comments
        .get(&id)
        .and_then(|c| c.first())
        .map(|c| (c.id, c.author_id));
    drop(s);
    let (cid, author) = first.unwrap_or((0, requester_id));
    ticket_with_audit(app, id, StatusCode::CREATED, author, Some(cid))
        .with_header("location", location(app, "tickets", id))
}

fn update_ticket(app: &App, caller: Caller, id: i64, body: &[u8]) -> Reply {
    let m = match root_object(body, "ticket") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let status = match parse_status(&m) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let patch = TicketPatch {
        subject: field_str(&m, "subject").flatten(),
        status,
        assignee_id: field_id(&m, "assignee_id"),
        requester_id: field_id(&m, "requester_id").flatten(),
        organization_id: field_id(&m, "organization_id"),
        priority: field_str(&m, "priority"),
        kind: field_str(&m, "type"),
        custom_fields: custom_fields_from(&m),
        updated_at: None,
        system_update: false,
    };
    let comment = comment_from(m.get("comment")).map(|mut c| {
        c.author_id = c.author_id.or(caller.user_id);
        c
    });
    let res = app
        .store
        .write()
        .update_ticket_with_comment(id, patch, comment);
    match res {
        Ok(cid) => ticket_with_audit(app, id, StatusCode::OK, caller.user_id.unwrap_or(0), cid),
        Err(StoreError::Invalid {
            field: "status",
            description,
            ..
        }) if description.contains("closed") => {
            // The recorded body (ZENDESK.md §4) has no error code inside the detail.
            Reply::json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &wire::Error::record_invalid(
                    "status",
                    None,
                    "Status closed prevents ticket update",
                ),
            )
        }
        Err(e) => store_error(e),
    }
}

// ---- Talk Partner Edition call records ----------------------------------------------------------

/// Every field of a recorded call object; unspecified ones stay `null`.
const CALL_FIELDS: [&str; 56] = [
    "id",
    "account_id",
    "ticket_id",
    "end_user_id",
    "organization_id",
    "brand_id",
    "app_id",
    "agent_id",
    "from_line",
    "from_line_nickname",
    "to_line",
    "to_line_nickname",
    "call_started_at",
    "call_ended_at",
    "direction",
    "duration",
    "dnis",
    "phone_name",
    "call_type",
    "end_user_location",
    "callback",
    "callback_source",
    "callback_number",
    "wait_time",
    "time_to_answer",
    "queue_time",
    "exceeded_queue_time",
    "queue_name",
    "ivr_time_spent",
    "ivr_hops",
    "ivr_action",
    "ivr_routed_to",
    "ivr_destination_group_name",
    "talk_time",
    "hold_time",
    "consultation_time",
    "wrap_up_time",
    "completion_status",
    "call_abandoned_position",
    "customer_requested_voicemail",
    "voicemail",
    "outside_business_hours",
    "overflowed",
    "overflowed_to",
    "call_disposition",
    "recording_url",
    "recording_time",
    "not_recording_time",
    "call_recording_consent_action",
    "recording_control_interactions",
    "transcript",
    "external_id",
    "created_at",
    "updated_at",
    "call_recording_consent",
    "default_group",
];

fn create_call(app: &App, body: &[u8]) -> Reply {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_json(e),
    };
    let Some(call) = v.get("call").and_then(Value::as_object) else {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "InvalidValue",
            "Parameter call is required and must be an object",
        );
    };
    let mut details = Map::new();
    for f in [
        "app_id",
        "from_line",
        "to_line",
        "call_started_at",
        "direction",
    ] {
        if call
            .get(f)
            .is_none_or(|x| x.is_null() || x.as_str().is_some_and(|s| s.trim().is_empty()))
        {
            details.insert(f.into(), detail("BlankValue", &format!("{f} is required")));
        }
    }
    if let Some(d) = call.get("direction").and_then(Value::as_str) {
        if d != "inbound" && d != "outbound" {
            details.insert(
                "direction".into(),
                detail("InvalidValue", "direction must be inbound or outbound"),
            );
        }
    }
    for f in ["call_started_at", "call_ended_at"] {
        if let Some(t) = call.get(f).and_then(Value::as_str) {
            if crate::wire::parse_time(t).is_none() {
                details.insert(
                    f.into(),
                    detail("InvalidValue", &format!("{f} is not a valid ISO-8601 time")),
                );
            }
        }
    }
    if !details.is_empty() {
        return Reply::json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &wire::Error {
                details: Some(details),
                ..wire::Error::record_invalid("", None, "")
            },
        );
    }
    let mut out: Map<String, Value> = CALL_FIELDS
        .iter()
        .map(|f| (f.to_string(), Value::Null))
        .collect();
    for (k, val) in call {
        if k != "id" && k != "created_at" && k != "updated_at" {
            out.insert(k.clone(), val.clone());
        }
    }
    // Times are stored normalised to UTC `…Z`, as the recorded API did.
    for f in ["call_started_at", "call_ended_at"] {
        if let Some(t) = out
            .get(f)
            .and_then(Value::as_str)
            .and_then(crate::wire::parse_time)
        {
            out.insert(f.into(), crate::wire::format_time(t).into());
        }
    }
    out.insert("account_id".into(), 1.into());
    let mut s = app.store.write();
    // The one-shot form: a `comment` with no `ticket_id` creates a ticket for the end-user.
    if let Some(c) = v.get("comment").and_then(Value::as_object) {
        let title = c
            .get("title")
            .and_then(Value::as_str)
            .unwrap_or("Call")
            .to_string();
        let ticket_id = out.get("ticket_id").and_then(Value::as_i64);
        let text = call_comment_text(&title, c, &out);
        match ticket_id {
            Some(t) => {
                let nc = NewComment {
                    body: text,
                    html: false,
                    public: Some(false),
                    author_id: out.get("agent_id").and_then(Value::as_i64),
                };
                if let Err(e) = s.add_comment(t, nc) {
                    return store_error(e);
                }
            }
            None => {
                if let Some(requester_id) = out.get("end_user_id").and_then(Value::as_i64) {
                    let n = NewTicket {
                        subject: title,
                        comment: text,
                        comment_public: false,
                        requester_id,
                        assignee_id: out.get("agent_id").and_then(Value::as_i64),
                        via: Some("voice".into()),
                        ..Default::default()
                    };
                    match s.create_ticket(n) {
                        Ok(t) => {
                            out.insert("ticket_id".into(), t.into());
                        }
                        Err(e) => return store_error(e),
                    }
                }
            }
        }
    }
    let rec = s.add_call(out);
    let (id, call) = (rec.id, Value::Object(rec.call.clone()));
    drop(s);
    Reply::json(StatusCode::CREATED, &json!({ "call": call }))
        .with_header("location", location(app, "calls", id))
}

/// The `details.<field>` list of one validation error.
fn detail(code: &str, description: &str) -> Value {
    json!([wire::ErrorDetail {
        description: description.into(),
        error: Some(code.into()),
    }])
}

fn call_comment_text(title: &str, c: &Map<String, Value>, call: &Map<String, Value>) -> String {
    let mut text = title.to_string();
    for f in c
        .get("call_fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if let Some(v) = call.get(f).filter(|v| !v.is_null()) {
            let v = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            text.push_str(&format!("\n{f}: {v}"));
        }
    }
    text
}

pub(crate) fn show_call(app: &App, id: i64) -> Reply {
    let s = app.store.read();
    match s.calls().iter().find(|c| c.id == id) {
        Some(c) => Reply::ok(&json!({ "call": c.call })),
        None => Reply::not_found(),
    }
}
