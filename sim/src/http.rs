//! Request handling: admin endpoints, faults, auth, rate limits, routing and the read handlers.
//! The write handlers live in `write.rs`; both return a [`Reply`] that the pipeline finishes.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::Response,
};
use base64::Engine as _;
use parking_lot::{Mutex, RwLock};
use rand::Rng as _;
use serde::Serialize;
use tokio::time::Instant;

use super::{
    Faults, RequestRecord, SimConfig,
    render::{CommentOut, IdentityOut, OrgOut, TicketOut, UserOut},
    store::{self, ChangeLog, Store, now_ms},
    wire,
};

pub(crate) struct App {
    pub(crate) base: String,
    pub(crate) email: String,
    pub(crate) token: String,
    pub(crate) cfg: RwLock<SimConfig>,
    pub(crate) store: RwLock<Store>,
    pub(crate) hooks: Mutex<crate::webhooks::Hooks>,
    pub(crate) requests: Mutex<Vec<RequestRecord>>,
    limits: Mutex<Limits>,
    pub(crate) idempotency: Mutex<rustc_hash::FxHashMap<String, super::write::IdemEntry>>,
    started: Instant,
    /// The seeded fault stream when [`Faults::seed`] is set.
    fault_rng: Mutex<Option<rand::rngs::StdRng>>,
    /// Forced 429s ([`crate::SimHandle::rate_limit_next`]): how many API requests are left to
    /// answer so, and their `Retry-After`.
    pub(crate) forced_429: Mutex<(u32, Duration)>,
}

impl App {
    pub(crate) fn new(base: String, cfg: SimConfig, store: Store) -> Self {
        let fault_rng = Mutex::new(cfg.faults.seed.map(rand::SeedableRng::seed_from_u64));
        App {
            base,
            email: cfg.email.clone(),
            token: cfg.token.clone(),
            cfg: RwLock::new(cfg),
            store: RwLock::new(store),
            hooks: Mutex::new(Default::default()),
            requests: Mutex::new(Vec::new()),
            limits: Mutex::new(Limits::default()),
            idempotency: Mutex::new(Default::default()),
            started: Instant::now(),
            fault_rng,
            forced_429: Mutex::new((0, Duration::ZERO)),
        }
    }
}

/// What a handler answers, before the pipeline adds rate-limit headers and faults.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) body: Vec<u8>,
    pub(crate) content_type: &'static str,
    pub(crate) headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub(crate) fn json(status: StatusCode, v: &impl Serialize) -> Reply {
        Reply {
            status,
            // Serializing our own views cannot fail; an empty body would show up in tests at once.
            body: serde_json::to_vec(v).unwrap_or_default(),
            content_type: "application/json; charset=utf-8",
            headers: Vec::new(),
        }
    }
    pub(crate) fn ok(v: &impl Serialize) -> Reply {
        Reply::json(StatusCode::OK, v)
    }
    pub(crate) fn error(status: StatusCode, error: &str, description: &str) -> Reply {
        Reply::json(status, &wire::Error::new(error, description))
    }
    /// 400 `TooManyValues` for a list parameter over its limit (ZENDESK.md §4).
    pub(crate) fn too_many(param: &str, max: u32) -> Reply {
        Reply::json(
            StatusCode::BAD_REQUEST,
            &wire::Error {
                max_count: Some(max),
                ..wire::Error::new(
                    "TooManyValues",
                    &format!("Parameter {param} cannot specify more than {max} values"),
                )
            },
        )
    }
    pub(crate) fn not_found() -> Reply {
        Reply::error(StatusCode::NOT_FOUND, "RecordNotFound", "Not found")
    }
    pub(crate) fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }
}

/// The parsed query string.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let pairs = q
            .and_then(|q| url::Url::parse(&format!("http://x/?{q}")).ok())
            .map(|u| {
                u.query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Query(pairs)
    }
    pub(crate) fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|p| p.0 == k).map(|p| p.1.as_str())
    }
    pub(crate) fn all<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |p| p.0 == k)
            .map(|p| p.1.as_str())
    }
}

/// Who the request runs as (the user behind the credentials, when the account has one).
#[derive(Clone, Copy)]
pub(crate) struct Caller {
    pub(crate) user_id: Option<i64>,
}

// ---- rate limits ---------------------------------------------------------------------------------

/// Sliding windows of the requests served. A refused request is not recorded (see the module doc).
#[derive(Default)]
struct Limits {
    account: VecDeque<Instant>,
    export: VecDeque<Instant>,
    search_export: VecDeque<Instant>,
}

enum Limited {
    Account(Duration),
    Export(Duration),
    SearchExport(Duration),
}

/// Which endpoint limit a request counts against besides the account budget.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LimitClass {
    Plain,
    /// The incremental exports (10 a minute).
    Export,
    /// The search export (100 a minute).
    SearchExport,
}

/// The account budget as the rate-limit headers report it (ZENDESK.md §6), after the request was
/// counted (or, for a refused one, without it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    /// `X-Rate-Limit`, `ratelimit-limit`: requests per window.
    pub(crate) limit: u32,
    /// `X-Rate-Limit-Remaining`, `ratelimit-remaining`: requests that would be admitted now.
    pub(crate) remaining: u32,
    /// `ratelimit-reset`: seconds (rounded up, at least 1) until the oldest counted request leaves
    /// the sliding window, i.e. until `remaining` next grows. With `remaining` 0 it equals the
    /// `Retry-After` a request sent now would get, so a client may wait exactly this long. With an
    /// empty window it is the whole window.
    pub(crate) reset: u64,
}

impl Limits {
    fn expire(&mut self, now: Instant, window: Duration) {
        for q in [&mut self.account, &mut self.export, &mut self.search_export] {
            while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
                q.pop_front();
            }
        }
    }

    fn budget(&self, cfg: &SimConfig, now: Instant) -> Budget {
        Budget {
            limit: cfg.requests_per_minute,
            remaining: cfg
                .requests_per_minute
                .saturating_sub(self.account.len() as u32),
            reset: retry_secs(wait(&self.account, cfg.rate_window, now)),
        }
    }

    /// Admits a request or says how long until it would be admitted. Returns the account budget
    /// left after this request.
    fn admit(&mut self, cfg: &SimConfig, class: LimitClass) -> Result<Budget, Limited> {
        let export = class == LimitClass::Export;
        let search_export = class == LimitClass::SearchExport;
        let now = Instant::now();
        let window = cfg.rate_window;
        self.expire(now, window);
        if self.account.len() >= cfg.requests_per_minute as usize {
            return Err(Limited::Account(wait(&self.account, window, now)));
        }
        if export && self.export.len() >= cfg.export_requests_per_minute as usize {
            return Err(Limited::Export(wait(&self.export, window, now)));
        }
        if search_export
            && self.search_export.len() >= cfg.search_export_requests_per_minute as usize
        {
            return Err(Limited::SearchExport(wait(
                &self.search_export,
                window,
                now,
            )));
        }
        self.account.push_back(now);
        if export {
            self.export.push_back(now);
        }
        if search_export {
            self.search_export.push_back(now);
        }
        Ok(self.budget(cfg, now))
    }

    /// The account budget now, counting nothing (for answers refused before the handler).
    fn peek(&mut self, cfg: &SimConfig) -> Budget {
        let now = Instant::now();
        self.expire(now, cfg.rate_window);
        self.budget(cfg, now)
    }
}

/// How long until the oldest entry of a window leaves it (the whole window when it is empty).
fn wait(q: &VecDeque<Instant>, window: Duration, now: Instant) -> Duration {
    q.front()
        .map(|t| window.saturating_sub(now.duration_since(*t)))
        .unwrap_or(window)
}

/// The Ticketing (Support) APIs, which add the `ratelimit-*` headers; the Talk Partner Edition
/// endpoints (`calls`, `channels/voice`) carry only `X-Rate-Limit*` (ZENDESK.md §6).
fn is_ticketing(segs: &[&str]) -> bool {
    !matches!(segs.first(), Some(&"calls" | &"channels"))
}

impl Reply {
    /// Adds the rate-limit headers of ZENDESK.md §6 (`X-Rate-Limit`, `X-Rate-Limit-Remaining`
    /// everywhere; `ratelimit-limit`, `ratelimit-remaining`, `ratelimit-reset` on Ticketing APIs).
    /// Export responses show the account budget, not the export one, as recorded.
    /// Nothing is added when `enabled` is off (`SimConfig::rate_limit_headers`: tests that need a
    /// client to walk into a 429 storm turn the warning off).
    fn with_budget(self, b: Budget, ticketing: bool, enabled: bool) -> Reply {
        if !enabled {
            return self;
        }
        let r = self
            .with_header("x-rate-limit", b.limit.to_string())
            .with_header("x-rate-limit-remaining", b.remaining.to_string());
        if !ticketing {
            return r;
        }
        r.with_header("ratelimit-limit", b.limit.to_string())
            .with_header("ratelimit-remaining", b.remaining.to_string())
            .with_header("ratelimit-reset", b.reset.to_string())
    }
}

/// Whole seconds, rounded up, at least 1: `Retry-After: 0` would invite a busy loop.
fn retry_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

// ---- the pipeline ------------------------------------------------------------------------------

pub(crate) async fn dispatch(State(app): State<Arc<App>>, req: Request) -> Response {
    let method = req.method().clone();
    let raw_path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let path = raw_path
        .strip_suffix(".json")
        .unwrap_or(&raw_path)
        .to_string();
    let headers = req.headers().clone();

    if let Some(admin) = path.strip_prefix("/__sim/") {
        let body = axum::body::to_bytes(req.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        return finish(admin_handler(&app, &method, admin, &body), None);
    }

    let (faults, cfg) = {
        let c = app.cfg.read();
        (c.faults.clone(), c.clone())
    };
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let record = |status: StatusCode, fault: Option<&'static str>| {
        app.requests.lock().push(RequestRecord {
            at_ms: app.started.elapsed().as_millis() as u64,
            method: method.to_string(),
            path: raw_path.clone(),
            status: status.as_u16(),
            fault,
        });
    };

    if faults.down {
        let r = error_page(StatusCode::SERVICE_UNAVAILABLE, false);
        record(r.status, Some("down"));
        return finish(r, None);
    }
    if app.roll(faults.error_rate) {
        let status = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ][app.pick(3)];
        let r = error_page(status, app.pick(2) == 0);
        record(r.status, Some("error"));
        return finish(r, None);
    }

    let segs: Vec<&str> = path
        .strip_prefix("/api/v2/")
        .map(|p| p.split('/').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let ticketing = is_ticketing(&segs);

    let caller = match authenticate(&app, &cfg, &headers) {
        Ok(c) => c,
        Err(r) => {
            let budget = app.limits.lock().peek(&cfg);
            let r = r.with_budget(budget, ticketing, cfg.rate_limit_headers);
            record(r.status, None);
            return finish(r, None);
        }
    };

    let class = if path.starts_with("/api/v2/incremental/") {
        LimitClass::Export
    } else if path == "/api/v2/search/export" {
        LimitClass::SearchExport
    } else {
        LimitClass::Plain
    };
    // A forced 429 (a test's stand-in for other integrations spending the account), in the place
    // and shape of the account limit's, and like it not counted in the window.
    let forced = {
        let mut f = app.forced_429.lock();
        (f.0 > 0).then(|| {
            f.0 -= 1;
            f.1
        })
    };
    if let Some(retry_after) = forced {
        let budget = app.limits.lock().peek(&cfg);
        let r = rate_limited(Limited::Account(retry_after)).with_budget(
            budget,
            ticketing,
            cfg.rate_limit_headers,
        );
        record(r.status, Some("rate_limit"));
        return finish(r, None);
    }
    let admitted = app.limits.lock().admit(&cfg, class);
    let budget = match admitted {
        Ok(b) => b,
        Err(limited) => {
            let budget = app.limits.lock().peek(&cfg);
            let r = rate_limited(limited).with_budget(budget, ticketing, cfg.rate_limit_headers);
            record(r.status, None);
            return finish(r, None);
        }
    };

    let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
        match axum::body::to_bytes(req.into_body(), 16 << 20).await {
            Ok(b) => b,
            Err(_) => Bytes::new(),
        }
    } else {
        Bytes::new()
    };
    let reply = route(&app, &cfg, caller, &method, &segs, &query, &headers, &body).with_budget(
        budget,
        ticketing,
        cfg.rate_limit_headers,
    );

    if app.roll(faults.drop_rate) {
        record(reply.status, Some("drop"));
        return finish(reply, Some(Mangle::Drop));
    }
    if app.roll(faults.malformed_rate) {
        record(StatusCode::OK, Some("malformed"));
        return finish(reply, Some(Mangle::Truncate));
    }
    record(reply.status, None);
    finish(reply, None)
}

impl App {
    /// Starts the seeded fault stream over (or drops it for `None`).
    pub(crate) fn reseed_faults(&self, seed: Option<u64>) {
        *self.fault_rng.lock() = seed.map(rand::SeedableRng::seed_from_u64);
    }

    /// True with probability `rate`, from the seeded stream when there is one.
    fn roll(&self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        let rate = rate.clamp(0.0, 1.0);
        match self.fault_rng.lock().as_mut() {
            Some(rng) => rng.random_bool(rate),
            None => rand::rng().random_bool(rate),
        }
    }

    /// A number below `n`, from the seeded stream when there is one.
    fn pick(&self, n: usize) -> usize {
        match self.fault_rng.lock().as_mut() {
            Some(rng) => rng.random_range(0..n),
            None => rand::rng().random_range(0..n),
        }
    }
}

enum Mangle {
    Drop,
    Truncate,
}

fn finish(r: Reply, mangle: Option<Mangle>) -> Response {
    let mut status = r.status;
    let mut body = r.body;
    let mut stream = false;
    match mangle {
        Some(Mangle::Truncate) => {
            status = StatusCode::OK;
            // Cut inside the JSON so no parser accepts it, and make sure it cannot end cleanly.
            let cut = (body.len() / 2).max(1).min(body.len());
            body.truncate(cut);
            body.extend_from_slice(b"\"\x00");
        }
        Some(Mangle::Drop) => stream = true,
        None => {}
    }
    let mut resp = if stream {
        // Headers and a few bytes, then an error: hyper aborts the connection mid-body.
        let head = Bytes::from(body[..body.len().min(16)].to_vec());
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(head),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated drop",
            )),
        ];
        Response::new(Body::from_stream(futures_util::stream::iter(chunks)))
    } else {
        Response::new(Body::from(body))
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(r.content_type),
    );
    for (name, value) in r.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.append(name, v);
        }
    }
    resp
}

fn error_page(status: StatusCode, json: bool) -> Reply {
    if json {
        let (code, desc) = match status.as_u16() {
            500 => (
                "InternalServerError",
                "Something went wrong. Please try again.",
            ),
            502 => ("BadGateway", "Bad gateway"),
            _ => (
                "ServiceUnavailable",
                "Zendesk is temporarily unavailable. Please try again later.",
            ),
        };
        return Reply::error(status, code, desc);
    }
    let reason = status.canonical_reason().unwrap_or("Error");
    let code = status.as_u16();
    Reply {
        status,
        body: format!(
            "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        )
        .into_bytes(),
        content_type: "text/html",
        headers: Vec::new(),
    }
}

/// A 429 with `Retry-After`; the caller adds the budget headers.
fn rate_limited(l: Limited) -> Reply {
    match l {
        // The account-wide limit answers in plain text (ZENDESK.md §6).
        Limited::Account(d) => Reply {
            status: StatusCode::TOO_MANY_REQUESTS,
            body: b"Number of allowed API requests per minute exceeded".to_vec(),
            content_type: "text/plain; charset=utf-8",
            headers: vec![("retry-after", retry_secs(d).to_string())],
        },
        Limited::Export(d) => Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            "APIRateLimitExceeded",
            "Number of allowed incremental export API requests per minute exceeded",
        )
        .with_header("retry-after", retry_secs(d).to_string()),
        // Its wording is UNVERIFIED; the shape is the export limit's.
        Limited::SearchExport(d) => Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            "APIRateLimitExceeded",
            "Number of allowed search export API requests per minute exceeded",
        )
        .with_header("retry-after", retry_secs(d).to_string()),
    }
}

fn authenticate(app: &App, cfg: &SimConfig, headers: &HeaderMap) -> Result<Caller, Reply> {
    use subtle::ConstantTimeEq as _;
    let unauthorized = || {
        Reply::json(
            StatusCode::UNAUTHORIZED,
            &wire::Error {
                error: "Couldn't authenticate you".into(),
                ..wire::Error::default()
            },
        )
        .with_header("www-authenticate", "Basic realm=\"Web Password\"".into())
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let store = app.store.read();
    let staff_id = |email: &str| {
        store
            .user_by_email(email)
            .filter(|u| u.role.is_staff() && !u.suspended)
            .map(|u| u.id)
    };
    if let Some(b) = auth.strip_prefix("Bearer ") {
        let ok = cfg
            .oauth_token
            .as_deref()
            .is_some_and(|t| bool::from(t.as_bytes().ct_eq(b.trim().as_bytes())));
        if !ok {
            return Err(Reply::json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({
                    "error": "invalid_token",
                    "error_description": "The access token provided is expired, revoked, malformed or invalid for other reasons."
                }),
            ));
        }
        return Ok(Caller {
            user_id: staff_id(&cfg.email),
        });
    }
    let b64 = auth.strip_prefix("Basic ").ok_or_else(unauthorized)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(unauthorized)?;
    let (user, secret) = decoded.split_once(':').ok_or_else(unauthorized)?;
    let email = user.strip_suffix("/token").ok_or_else(unauthorized)?;
    if !bool::from(secret.as_bytes().ct_eq(cfg.token.as_bytes())) {
        return Err(unauthorized());
    }
    let uid = staff_id(email);
    if email.eq_ignore_ascii_case(&cfg.email) || uid.is_some() {
        Ok(Caller { user_id: uid })
    } else {
        Err(unauthorized())
    }
}

fn admin_handler(app: &App, method: &Method, path: &str, body: &[u8]) -> Reply {
    match (method, path) {
        (&Method::PUT, "faults") => match serde_json::from_slice::<Faults>(body) {
            Ok(f) => {
                app.reseed_faults(f.seed);
                app.cfg.write().faults = f.clone();
                Reply::ok(&f)
            }
            Err(e) => Reply::error(StatusCode::BAD_REQUEST, "InvalidJSON", &e.to_string()),
        },
        (&Method::GET, "faults") => Reply::ok(&app.cfg.read().faults),
        (&Method::GET, "stats") => {
            let (requests, by_status, faults) = {
                let r = app.requests.lock();
                let mut by: std::collections::BTreeMap<String, u64> = Default::default();
                let mut faults: std::collections::BTreeMap<&str, u64> = Default::default();
                for x in r.iter() {
                    *by.entry(x.status.to_string()).or_default() += 1;
                    if let Some(f) = x.fault {
                        *faults.entry(f).or_default() += 1;
                    }
                }
                (r.len(), by, faults)
            };
            let s = app.store.read();
            Reply::ok(&serde_json::json!({
                "uptime_ms": app.started.elapsed().as_millis() as u64,
                "requests": requests,
                "by_status": by_status,
                "faults_injected": faults,
                "users": s.user_count(),
                "tickets": s.ticket_count(),
                "organizations": s.org_count(),
                "calls": s.calls().len(),
            }))
        }
        _ => Reply::error(StatusCode::NOT_FOUND, "InvalidEndpoint", "Not found"),
    }
}

#[allow(clippy::too_many_arguments)]
fn route(
    app: &App,
    cfg: &SimConfig,
    caller: Caller,
    method: &Method,
    segs: &[&str],
    q: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Reply {
    use super::write;
    let id = |s: &str| s.parse::<i64>().ok();
    if let Some(r) = crate::webhooks::route(app, method, segs, q, body) {
        return r;
    }
    match (method, segs) {
        (&Method::GET, ["incremental", "users", "cursor"]) => users_export(app, cfg, q),
        (&Method::GET, ["incremental", "tickets", "cursor"]) => tickets_export(app, cfg, q),
        (&Method::GET, ["incremental", "organizations"]) => orgs_export(app, cfg, q),
        (&Method::GET, ["users", "show_many"]) => show_many(app, q),
        (&Method::GET, ["users", "me"]) => me(app, caller),
        (&Method::GET, ["users"]) => list_users(app, q),
        (&Method::GET, ["users", u]) => id(u).map_or_else(Reply::not_found, |u| show_user(app, u)),
        (&Method::GET, ["users", u, "identities"]) => {
            id(u).map_or_else(Reply::not_found, |u| user_identities(app, u))
        }
        (&Method::GET, ["users", u, "tickets", "requested"]) => {
            id(u).map_or_else(Reply::not_found, |u| requested_tickets(app, u, q))
        }
        (&Method::GET, ["tickets", "show_many"]) => show_many_tickets(app, q),
        (&Method::GET, ["tickets", t]) => {
            id(t).map_or_else(Reply::not_found, |t| show_ticket(app, t))
        }
        (&Method::GET, ["tickets", t, "comments"]) => {
            id(t).map_or_else(Reply::not_found, |t| ticket_comments(app, t))
        }
        (&Method::GET, ["organizations", "show_many"]) => show_many_orgs(app, q),
        (&Method::GET, ["organizations", o]) => {
            id(o).map_or_else(Reply::not_found, |o| show_org(app, o))
        }
        (&Method::GET, ["ticket_fields"]) => ticket_fields(app),
        (&Method::GET, ["user_fields"]) => {
            field_defs(app, "user_fields", &store::USER_FIELDS, true)
        }
        (&Method::GET, ["organization_fields"]) => {
            field_defs(app, "organization_fields", &store::ORG_FIELDS, true)
        }
        (&Method::GET, ["search"]) => write::search(app, cfg, q),
        (&Method::GET, ["search", "export"]) => crate::search_export::search_export(app, cfg, q),
        (&Method::GET, ["calls", c]) => {
            id(c).map_or_else(Reply::not_found, |c| write::show_call(app, c))
        }
        _ => write::route(app, caller, method, segs, headers, body),
    }
}

// ---- exports -------------------------------------------------------------------------------------

fn invalid_value(desc: &str) -> Reply {
    Reply::error(StatusCode::UNPROCESSABLE_ENTITY, "InvalidValue", desc)
}

fn too_recent() -> Reply {
    invalid_value("Too recent start_time. Use a start_time at least one minute in the past")
}

/// The visible cut-off (Unix ms) and the checked start position.
enum Start {
    Pos(usize),
    Time(i64),
}

fn export_start(cfg: &SimConfig, q: &Query, tag: char, cutoff_ms: i64) -> Result<Start, Reply> {
    if let Some(c) = q.get("cursor") {
        return decode_cursor(c, tag).map(Start::Pos).ok_or_else(|| {
            Reply::error(StatusCode::BAD_REQUEST, "InvalidCursor", "Invalid cursor")
        });
    }
    let Some(st) = q.get("start_time") else {
        return Err(invalid_value("start_time or cursor is required"));
    };
    let t: i64 = st
        .trim()
        .parse()
        .map_err(|_| invalid_value("start_time must be a Unix epoch time in seconds"))?;
    if t < 0 {
        return Err(invalid_value(
            "start_time must be a Unix epoch time in seconds",
        ));
    }
    // A start time that is not at least the one-minute rule in the past is refused.
    if t.saturating_mul(1000) > now_ms() - cfg.one_minute_rule.as_millis() as i64
        || t * 1000 > cutoff_ms
    {
        return Err(too_recent());
    }
    Ok(Start::Time(t))
}

fn encode_cursor(tag: char, pos: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{tag}{pos}"))
}

fn decode_cursor(c: &str, tag: char) -> Option<usize> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c.trim())
        .ok()?;
    let s = std::str::from_utf8(&raw).ok()?;
    s.strip_prefix(tag)?.parse().ok()
}

fn per_page(q: &Query, default: usize, max: usize) -> usize {
    q.get("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(default)
        .clamp(1, max)
}

/// One cursor page over a change log: the live entries from `start`, at most `n`, before `end`.
/// Returns the record indices and the position after the last entry looked at.
fn cursor_page(
    log: &ChangeLog,
    start: usize,
    end: usize,
    n: usize,
    live: impl Fn(u32, usize) -> bool,
    mut keep: impl FnMut(u32) -> bool,
) -> (Vec<u32>, usize) {
    let mut out = Vec::with_capacity(n.min(end.saturating_sub(start)));
    let mut p = start.min(end);
    while p < end && out.len() < n {
        let idx = log.entries[p].1;
        if live(idx, p) && keep(idx) {
            out.push(idx);
        }
        p += 1;
    }
    (out, p)
}

#[derive(Serialize)]
struct UsersKey<'a> {
    users: Vec<UserOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identities: Option<Vec<IdentityOut<'a>>>,
}
#[derive(Serialize)]
struct TicketsKey<'a> {
    tickets: Vec<TicketOut<'a>>,
}

fn cutoff(cfg: &SimConfig) -> i64 {
    now_ms() - cfg.one_minute_rule.as_millis() as i64
}

fn users_export(app: &App, cfg: &SimConfig, q: &Query) -> Reply {
    let cut = cutoff(cfg);
    let start = match export_start(cfg, q, 'u', cut) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let n = per_page(q, 1000, 1000);
    let with_ids = cfg.export_identities
        && q.get("include")
            .is_some_and(|v| v.split(',').any(|x| x == "identities"));
    let s = app.store.read();
    let log = &s.user_log;
    let end = log.visible_end(cut);
    let from = match start {
        Start::Pos(p) => p,
        Start::Time(t) => log.first_at_or_after(t * 1000),
    };
    let (idx, next) = cursor_page(
        log,
        from,
        end,
        n,
        |i, p| s.users[i as usize].log_pos as usize == p,
        |_| true,
    );
    let users: Vec<UserOut> = idx
        .iter()
        .map(|&i| UserOut::new(&app.base, &s.users[i as usize]))
        .collect();
    let identities = with_ids.then(|| {
        idx.iter()
            .flat_map(|&i| s.users[i as usize].identities())
            .map(|i| IdentityOut::new(&app.base, i))
            .collect()
    });
    let cursor = encode_cursor('u', next);
    let include = if with_ids { "&include=identities" } else { "" };
    Reply::ok(&wire::CursorPage {
        records: UsersKey { users, identities },
        after_url: Some(format!(
            "{}/api/v2/incremental/users/cursor.json?cursor={cursor}&per_page={n}{include}",
            app.base
        )),
        after_cursor: Some(cursor),
        before_url: None,
        before_cursor: None,
        end_of_stream: next >= end,
    })
}

fn tickets_export(app: &App, cfg: &SimConfig, q: &Query) -> Reply {
    let cut = cutoff(cfg);
    let start = match export_start(cfg, q, 't', cut) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let n = per_page(q, 1000, 1000);
    let exclude_deleted = q.get("exclude_deleted") == Some("true");
    let s = app.store.read();
    let log = &s.ticket_log;
    let end = log.visible_end(cut);
    let from = match start {
        Start::Pos(p) => p,
        Start::Time(t) => log.first_at_or_after(t * 1000),
    };
    let (idx, next) = cursor_page(
        log,
        from,
        end,
        n,
        |i, p| s.tickets[i as usize].log_pos as usize == p,
        |i| !(exclude_deleted && s.tickets[i as usize].status == store::Status::Deleted),
    );
    let tickets = idx
        .iter()
        .map(|&i| TicketOut::new(&app.base, &s.tickets[i as usize], true))
        .collect();
    let cursor = encode_cursor('t', next);
    let excl = if exclude_deleted {
        "&exclude_deleted=true"
    } else {
        ""
    };
    Reply::ok(&wire::CursorPage {
        records: TicketsKey { tickets },
        after_url: Some(format!(
            "{}/api/v2/incremental/tickets/cursor.json?cursor={cursor}&per_page={n}{excl}",
            app.base
        )),
        after_cursor: Some(cursor),
        before_url: None,
        before_cursor: None,
        end_of_stream: next >= end,
    })
}

/// The time-based organizations export. Records sharing a second are never split, so a page may
/// overrun `per_page`; `end_time` is the last record's second, and the next page starts there
/// (re-sending that second: clients de-duplicate by id, as with the real export). A full page made of
/// one second only ends at the next second instead, so a client always makes progress.
fn orgs_export(app: &App, cfg: &SimConfig, q: &Query) -> Reply {
    let cut = cutoff(cfg);
    let t = match export_start(cfg, q, 'o', cut) {
        Ok(Start::Time(t)) => t,
        Ok(Start::Pos(_)) => {
            return invalid_value("cursor is not supported on this export; use start_time");
        }
        Err(r) => return r,
    };
    let n = per_page(q, 1000, 1000);
    let s = app.store.read();
    let log = &s.org_log;
    let end = log.visible_end(cut);
    let mut p = log.first_at_or_after(t * 1000);
    let mut idx: Vec<u32> = Vec::new();
    let mut last_sec = None;
    while p < end {
        let (ms, i) = log.entries[p];
        let sec = ms / 1000;
        if idx.len() >= n && last_sec != Some(sec) {
            break;
        }
        if s.orgs[i as usize].log_pos as usize == p {
            idx.push(i);
            last_sec = Some(sec);
        }
        p += 1;
    }
    let full = idx.len() >= n;
    let first_sec = idx.first().map(|&i| s.orgs[i as usize].updated_at);
    let end_time = match (first_sec, last_sec) {
        (Some(a), Some(b)) if full && a == b => b + 1,
        (_, Some(b)) => b,
        _ => t,
    };
    let organizations: Vec<OrgOut> = idx
        .iter()
        .map(|&i| OrgOut::new(&app.base, &s.orgs[i as usize]))
        .collect();
    #[derive(Serialize)]
    struct Orgs<'a> {
        organizations: Vec<OrgOut<'a>>,
    }
    let count = organizations.len();
    Reply::ok(&wire::TimePage {
        records: Orgs { organizations },
        count,
        next_page: Some(format!(
            "{}/api/v2/incremental/organizations.json?start_time={end_time}",
            app.base
        )),
        end_of_stream: !full,
        end_time,
    })
}

// ---- users ---------------------------------------------------------------------------------------

/// The values of a comma-separated list parameter (`ids=1,2,3`), in order, without repeats; a 400
/// `TooManyValues` past 100, as every `show_many` answers (ZENDESK.md §4).
fn list_param<T: std::str::FromStr + PartialEq>(q: &Query, name: &str) -> Result<Vec<T>, Reply> {
    let mut out: Vec<T> = Vec::new();
    for v in q.get(name).unwrap_or("").split(',').map(str::trim) {
        if let Ok(v) = v.parse::<T>() {
            if !out.contains(&v) {
                out.push(v);
            }
        }
    }
    if out.len() > 100 {
        return Err(Reply::too_many(name, 100));
    }
    Ok(out)
}

/// A one-page list: everything in `records`, no next or previous page.
fn single_page<R: Serialize>(records: R, count: usize) -> Reply {
    Reply::ok(&wire::OffsetPage {
        records,
        next_page: None,
        previous_page: None,
        count,
    })
}

/// `GET /users/show_many?ids=…[&include=identities]`: the existing users among `ids` (deleted ones
/// included, as the export shows them), in the order asked.
fn show_many(app: &App, q: &Query) -> Reply {
    #[derive(Serialize)]
    struct Users<'a> {
        users: Vec<UserOut<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        identities: Option<Vec<IdentityOut<'a>>>,
    }
    let ids: Vec<i64> = match list_param(q, "ids") {
        Ok(ids) => ids,
        Err(r) => return r,
    };
    let mode = app.cfg.read().show_many;
    if mode == crate::ShowMany::Unavailable {
        return Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "show_many held",
        );
    }
    let with_ids = mode == crate::ShowMany::Sideload
        && q.get("include")
            .is_some_and(|v| v.split(',').any(|x| x == "identities"));
    let s = app.store.read();
    let recs: Vec<_> = ids.iter().filter_map(|&id| s.user_rec(id)).collect();
    let users: Vec<UserOut> = recs.iter().map(|u| UserOut::new(&app.base, u)).collect();
    let identities = with_ids.then(|| {
        recs.iter()
            .flat_map(|u| u.identities())
            .map(|i| IdentityOut::new(&app.base, i))
            .collect()
    });
    let count = users.len();
    single_page(Users { users, identities }, count)
}

/// `GET /tickets/show_many?ids=…`: the tickets among `ids` in the order asked; missing and deleted
/// ones are left out (a deleted ticket is a 404 on its own too).
fn show_many_tickets(app: &App, q: &Query) -> Reply {
    #[derive(Serialize)]
    struct Tickets<'a> {
        tickets: Vec<TicketOut<'a>>,
    }
    let ids: Vec<i64> = match list_param(q, "ids") {
        Ok(ids) => ids,
        Err(r) => return r,
    };
    let s = app.store.read();
    let tickets: Vec<TicketOut> = ids
        .iter()
        .filter_map(|&id| s.ticket_rec(id))
        .filter(|t| t.status != store::Status::Deleted)
        .map(|t| TicketOut::new(&app.base, t, false))
        .collect();
    let count = tickets.len();
    single_page(Tickets { tickets }, count)
}

/// `GET /organizations/show_many?ids=…` or `?external_ids=…` (matched case-insensitively): the live
/// organizations among them, in the order asked.
fn show_many_orgs(app: &App, q: &Query) -> Reply {
    #[derive(Serialize)]
    struct Orgs<'a> {
        organizations: Vec<OrgOut<'a>>,
    }
    let s = app.store.read();
    let recs: Vec<&store::OrgRec> = if q.get("ids").is_some() || q.get("external_ids").is_none() {
        let ids: Vec<i64> = match list_param(q, "ids") {
            Ok(ids) => ids,
            Err(r) => return r,
        };
        ids.iter().filter_map(|&id| s.org_rec(id)).collect()
    } else {
        let ext: Vec<String> = match list_param(q, "external_ids") {
            Ok(v) => v,
            Err(r) => return r,
        };
        ext.iter()
            .filter_map(|x| {
                s.orgs.iter().find(|o| {
                    o.deleted_at.is_none()
                        && o.external_id
                            .as_deref()
                            .is_some_and(|e| e.eq_ignore_ascii_case(x))
                })
            })
            .collect()
    };
    let organizations: Vec<OrgOut> = recs
        .into_iter()
        .filter(|o| o.deleted_at.is_none())
        .map(|o| OrgOut::new(&app.base, o))
        .collect();
    let count = organizations.len();
    single_page(Orgs { organizations }, count)
}

fn me(app: &App, caller: Caller) -> Reply {
    let s = app.store.read();
    let rec = caller.user_id.and_then(|id| s.user_rec(id)).or_else(|| {
        s.users
            .iter()
            .find(|u| u.role == store::Role::Admin && u.active)
    });
    match rec {
        Some(u) => Reply::ok(&serde_json::json!({ "user": UserOut::new(&app.base, u) })),
        None => Reply::not_found(),
    }
}

fn show_user(app: &App, id: i64) -> Reply {
    let s = app.store.read();
    match s.user_rec(id) {
        Some(u) => Reply::ok(&serde_json::json!({ "user": UserOut::new(&app.base, u) })),
        None => Reply::not_found(),
    }
}

fn user_identities(app: &App, id: i64) -> Reply {
    let s = app.store.read();
    let Some(u) = s.user_rec(id) else {
        return Reply::not_found();
    };
    let idents: Vec<IdentityOut> = u
        .identities()
        .map(|i| IdentityOut::new(&app.base, i))
        .collect();
    Reply::ok(&serde_json::json!({
        "identities": idents,
        "next_page": null,
        "previous_page": null,
        "count": idents.len(),
    }))
}

/// Offset pagination (`page`, `per_page` ≤ 100) with `next_page`, `previous_page`, `count`.
pub(crate) fn offset_page(
    app: &App,
    path: &str,
    q: &Query,
    total: usize,
) -> (usize, usize, serde_json::Value, serde_json::Value) {
    let per = per_page(q, 100, 100);
    let page = q
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let from = (page - 1).saturating_mul(per);
    let link = |p: usize| {
        let mut extra = String::new();
        for (k, v) in &q.0 {
            if k != "page" && k != "per_page" {
                extra.push('&');
                extra.push_str(&form_encode(k));
                extra.push('=');
                extra.push_str(&form_encode(v));
            }
        }
        serde_json::Value::String(format!(
            "{}{path}.json?page={p}&per_page={per}{extra}",
            app.base
        ))
    };
    let next = if from + per < total {
        link(page + 1)
    } else {
        serde_json::Value::Null
    };
    let prev = if page > 1 {
        link(page - 1)
    } else {
        serde_json::Value::Null
    };
    (from, per, next, prev)
}

pub(crate) fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn list_users(app: &App, q: &Query) -> Reply {
    let roles: Vec<store::Role> = q
        .all("role[]")
        .chain(q.all("role"))
        .filter_map(store::Role::parse)
        .collect();
    let s = app.store.read();
    let matching: Vec<&store::UserRec> = s
        .users
        .iter()
        .filter(|u| roles.is_empty() || roles.contains(&u.role))
        .collect();
    let (from, per, next, prev) = offset_page(app, "/api/v2/users", q, matching.len());
    let users: Vec<UserOut> = matching
        .iter()
        .skip(from)
        .take(per)
        .map(|u| UserOut::new(&app.base, u))
        .collect();
    Reply::ok(&serde_json::json!({
        "users": users,
        "next_page": next,
        "previous_page": prev,
        "count": matching.len(),
    }))
}

fn requested_tickets(app: &App, id: i64, q: &Query) -> Reply {
    let s = app.store.read();
    if s.user_rec(id).is_none() {
        return Reply::not_found();
    }
    let matching: Vec<&store::TicketRec> = s
        .tickets
        .iter()
        .filter(|t| t.requester_id == id && t.status != store::Status::Deleted)
        .collect();
    let (from, per, next, prev) = offset_page(
        app,
        &format!("/api/v2/users/{id}/tickets/requested"),
        q,
        matching.len(),
    );
    let tickets: Vec<TicketOut> = matching
        .iter()
        .skip(from)
        .take(per)
        .map(|t| TicketOut::new(&app.base, t, false))
        .collect();
    Reply::ok(&serde_json::json!({
        "tickets": tickets,
        "next_page": next,
        "previous_page": prev,
        "count": matching.len(),
    }))
}

fn show_ticket(app: &App, id: i64) -> Reply {
    let s = app.store.read();
    match s
        .ticket_rec(id)
        .filter(|t| t.status != store::Status::Deleted)
    {
        Some(t) => Reply::ok(&serde_json::json!({ "ticket": TicketOut::new(&app.base, t, false) })),
        None => Reply::not_found(),
    }
}

fn ticket_comments(app: &App, id: i64) -> Reply {
    let s = app.store.read();
    if s.ticket_rec(id)
        .is_none_or(|t| t.status == store::Status::Deleted)
    {
        return Reply::not_found();
    }
    let recs = s.comment_recs(id);
    let comments: Vec<CommentOut> = recs.iter().map(CommentOut::new).collect();
    Reply::ok(&serde_json::json!({
        "comments": comments,
        "next_page": null,
        "previous_page": null,
        "count": comments.len(),
    }))
}

fn show_org(app: &App, id: i64) -> Reply {
    let s = app.store.read();
    match s.org_rec(id).filter(|o| o.deleted_at.is_none()) {
        Some(o) => Reply::ok(&serde_json::json!({ "organization": OrgOut::new(&app.base, o) })),
        None => Reply::not_found(),
    }
}

/// When the account's fields were made: a fixed time, so field lists are stable across runs.
const FIELDS_CREATED: i64 = 1_700_000_000;

fn field_def(
    app: &App,
    path: &str,
    pos: usize,
    f: &store::FieldRec,
    keyed: bool,
) -> wire::TicketField {
    wire::TicketField {
        id: f.id,
        url: Some(format!("{}/api/v2/{path}/{}.json", app.base, f.id)),
        kind: Some(f.kind.into()),
        key: keyed.then(|| f.key.into()),
        title: Some(f.title.into()),
        description: Some(String::new()),
        position: Some(pos as i64),
        active: Some(true),
        required: Some(false),
        removable: Some(true),
        system_field_options: None,
        created_at: Some(wire::format_time(FIELDS_CREATED)),
        updated_at: Some(wire::format_time(FIELDS_CREATED)),
    }
}

fn field_defs(app: &App, path: &str, defs: &[store::FieldRec], keyed: bool) -> Reply {
    let list: Vec<wire::TicketField> = defs
        .iter()
        .enumerate()
        .map(|(i, f)| field_def(app, path, i, f, keyed))
        .collect();
    let mut body = serde_json::Map::new();
    let count = list.len();
    body.insert(path.into(), serde_json::to_value(&list).unwrap_or_default());
    single_page(body, count)
}

/// `GET /ticket_fields`: the system fields every account lists first (`type` is the field's own
/// name: `subject`, `description`, `status`, `tickettype`, `priority`, `group`, `assignee`,
/// `custom_status`; not removable; fixed choices in `system_field_options`), then the custom ones.
/// A client that maps field titles to ids must skip the system fields by `type`.
fn ticket_fields(app: &App) -> Reply {
    /// A system field: its `type`, title, whether agents must fill it, its fixed choices.
    struct System(
        &'static str,
        &'static str,
        bool,
        &'static [(&'static str, &'static str)],
    );
    // Choices a client may set. UNVERIFIED: whether `status` lists `new`/`closed` (system-set
    // states) on a real account; they are left out here.
    const SYSTEM: [System; 8] = [
        System("subject", "Subject", true, &[]),
        System("description", "Description", true, &[]),
        System(
            "status",
            "Status",
            true,
            &[
                ("Open", "open"),
                ("Pending", "pending"),
                ("On-hold", "hold"),
                ("Solved", "solved"),
            ],
        ),
        System(
            "tickettype",
            "Type",
            false,
            &[
                ("Question", "question"),
                ("Incident", "incident"),
                ("Problem", "problem"),
                ("Task", "task"),
            ],
        ),
        System(
            "priority",
            "Priority",
            false,
            &[
                ("Low", "low"),
                ("Normal", "normal"),
                ("High", "high"),
                ("Urgent", "urgent"),
            ],
        ),
        System("group", "Group", false, &[]),
        System("assignee", "Assignee", true, &[]),
        System("custom_status", "Ticket status", true, &[]),
    ];
    let mut list: Vec<wire::TicketField> = SYSTEM
        .iter()
        .enumerate()
        .map(|(pos, System(kind, title, required, options))| {
            let id = store::SYSTEM_FIELD_BASE + 1 + pos as i64;
            wire::TicketField {
                id,
                url: Some(format!("{}/api/v2/ticket_fields/{id}.json", app.base)),
                kind: Some((*kind).into()),
                key: None,
                title: Some((*title).into()),
                description: Some(String::new()),
                position: Some(pos as i64),
                active: Some(true),
                required: Some(*required),
                removable: Some(false),
                system_field_options: (!options.is_empty()).then(|| {
                    options
                        .iter()
                        .map(|(name, value)| wire::FieldOption {
                            name: (*name).into(),
                            value: (*value).into(),
                        })
                        .collect()
                }),
                created_at: Some(wire::format_time(FIELDS_CREATED)),
                updated_at: Some(wire::format_time(FIELDS_CREATED)),
            }
        })
        .collect();
    let first = list.len();
    list.extend(
        store::TICKET_FIELDS
            .iter()
            .enumerate()
            .map(|(i, f)| field_def(app, "ticket_fields", first + i, f, false)),
    );
    #[derive(Serialize)]
    struct Fields {
        ticket_fields: Vec<wire::TicketField>,
    }
    let count = list.len();
    single_page(
        Fields {
            ticket_fields: list,
        },
        count,
    )
}
