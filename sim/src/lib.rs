//! A Zendesk simulator: an HTTP server that behaves like the Zendesk Support API for every endpoint
//! Deskline uses and the neighbours a general client meets (DESIGN §7, ZENDESK.md), over a generated
//! account of any size.
//!
//! Why a crate of its own: tests, benches and `deskline demo` judge the client against this server,
//! so it must not share the client's idea of Zendesk. It does not depend on `deskline`; its JSON
//! shapes ([`wire`] and the views behind the handlers) are written from ZENDESK.md and the recorded
//! responses it cites. A field the client names wrongly then fails a test instead of being served
//! wrongly too.
//!
//! It aims at fidelity first: the same paths (with or without `.json`), the same JSON shapes with
//! every field and its `null`s, the same status codes and error bodies, the one-minute rule of the
//! exports, search indexing lag, the account and export rate limits with `Retry-After` (and the
//! plain-text 429 body of the account limit), the rate-limit headers a client can plan with, and
//! injectable faults. Where ZENDESK.md is silent it follows the real Zendesk; where it had to guess,
//! the guess is named in the code.
//!
//! Pieces:
//! - [`store`]: the data and its change clock (exports and search read it; every write stamps it).
//! - [`generate()`]: the deterministic account generator.
//! - [`wire`]: the owned Zendesk JSON types (objects, errors, pages) and the time format.
//! - `http`: request handling: admin endpoints, faults, auth, rate limits, routing, read handlers.
//! - `write`: the write handlers and search.
//! - `render`: the borrowed `Serialize` views that give each served object its full Zendesk shape.
//!
//! Order of checks for an API request (each step answers alone, and the later ones never run):
//! latency, `down` (503), injected 5xx, auth (401), forced 429s, rate limits (429), the handler,
//! then the post-handler faults (malformed body, dropped connection) which act after the handler's side
//! effects, as a timeout after Zendesk accepted a write does. Requests refused before the handler
//! (401, 429, injected 5xx, down) are not counted against the budget: Zendesk counts the requests it
//! serves, and a client retrying after a 429 must not push the window further out.
//!
//! Admin endpoints under `/__sim/` (no auth, no limits, no faults) let a script steer a simulator
//! running as its own process: `PUT /__sim/faults` (JSON [`Faults`]) and `GET /__sim/stats`.
#![forbid(unsafe_code)]

mod generate;
mod http;
mod render;
mod search_export;
pub mod store;
#[cfg(test)]
mod tests;
pub mod webhooks;
pub mod wire;
mod write;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

pub use generate::{GenConfig, OWNER_EMAIL, generate, generate_with_open};
pub use store::{
    CallRecord, NewComment, NewTicket, NewUser, Role, Status, Store, StoreError, TicketPatch,
    UserPatch,
};

/// How the simulated account behaves. Limits and delays may be changed at run time with
/// [`SimHandle::set_config`].
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Accepted as `Authorization: Basic base64("{email}/token:{token}")`. The email of any active
    /// agent or admin of the account is accepted too, as Zendesk pairs a token with any user.
    pub email: String,
    pub token: String,
    /// Accepted as `Authorization: Bearer …` when set.
    pub oauth_token: Option<String>,
    /// The account budget (sliding window of [`SimConfig::rate_window`]). Default 700 (Enterprise).
    pub requests_per_minute: u32,
    /// Incremental exports, on top of the account budget. Default 10 (on, as in Zendesk).
    pub export_requests_per_minute: u32,
    /// The search export (`search/export`), on top of the account budget. Default 100.
    pub search_export_requests_per_minute: u32,
    /// How long a search export `after_cursor` stays valid. Default 1 hour. TEST SETTING: tests
    /// shorten it to see an expired cursor.
    pub search_cursor_ttl: Duration,
    /// The rate-limit window; 60 s like Zendesk. TEST SETTING: tests shorten it to see recovery.
    pub rate_window: Duration,
    /// Exports leave out what changed within this long ago and refuse a newer `start_time`.
    /// Default 60 s. TEST SETTING: tests shorten it.
    pub one_minute_rule: Duration,
    /// Search does not see users created or changed within this long ago. Default 60 s.
    pub search_delay: Duration,
    /// Honour `include=identities` on the users export (unverified on real Zendesk). Default true.
    pub export_identities: bool,
    /// Send the rate-limit headers (`X-Rate-Limit*`, `ratelimit-*`) as Zendesk does. Default true.
    /// TEST SETTING: off, a client cannot see the budget coming to an end and meets 429 storms.
    pub rate_limit_headers: bool,
    /// How `users/show_many` treats `include=identities`. TEST SETTING. Default: honoured.
    pub show_many: ShowMany,
    pub faults: Faults,
    /// How webhook deliveries are delayed, duplicated, reordered and dropped.
    pub webhook_faults: webhooks::WebhookFaults,
}

/// `users/show_many` misbehaviour, for the identity fetches' tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShowMany {
    #[default]
    Sideload,
    /// Answers without the `identities` key (sideload not honoured).
    NoIdentitiesKey,
    /// Answers 503.
    Unavailable,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            email: OWNER_EMAIL.to_string(),
            token: "sim-token".to_string(),
            oauth_token: None,
            requests_per_minute: 700,
            export_requests_per_minute: 10,
            search_export_requests_per_minute: 100,
            search_cursor_ttl: Duration::from_secs(3600),
            rate_window: Duration::from_secs(60),
            one_minute_rule: Duration::from_secs(60),
            search_delay: Duration::from_secs(60),
            export_identities: true,
            rate_limit_headers: true,
            show_many: ShowMany::Sideload,
            faults: Faults::default(),
            webhook_faults: webhooks::WebhookFaults::default(),
        }
    }
}

/// Injected misbehaviour, for every API endpoint (not the `/__sim/` admin ones).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Added to every response.
    pub latency_ms: u64,
    /// 0..1: answer 500/502/503 (randomly) with an HTML or JSON body, before auth and limits.
    pub error_rate: f64,
    /// 0..1: after the handler ran, send the headers and a few bytes, then abort the connection.
    pub drop_rate: f64,
    /// 0..1: after the handler ran, answer 200 with a truncated JSON body.
    pub malformed_rate: f64,
    /// Every request answers 503, as if Zendesk were down.
    pub down: bool,
    /// Draw the faults from a stream seeded with this value instead of the thread's random
    /// generator, so a test sees the same faults in the same order of requests on every run.
    /// Takes effect when the simulator starts or when the faults are set.
    pub seed: Option<u64>,
}

/// One request as the simulator saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestRecord {
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
    pub method: String,
    /// Path without the query string, as sent (with `.json` if the client used it).
    pub path: String,
    /// The status sent (for `drop`: the status of the response that was cut).
    pub status: u16,
    /// The injected fault that shaped the answer: `latency` is not listed; `down`, `error`,
    /// `drop`, `malformed` and `rate_limit` (a 429 forced by [`SimHandle::rate_limit_next`]) are.
    pub fault: Option<&'static str>,
}

/// A running simulator. Dropping it without [`SimHandle::shutdown`] leaves the server running until
/// the runtime stops.
pub struct SimHandle {
    app: Arc<http::App>,
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Serves the simulated account on `listener` until [`SimHandle::shutdown`].
pub async fn start(listener: tokio::net::TcpListener, cfg: SimConfig, store: Store) -> SimHandle {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let changed = Arc::new(tokio::sync::Notify::new());
    let mut store = store;
    store.changed = Some(changed.clone());
    store.dirty.clear();
    let app = Arc::new(http::App::new(format!("http://{addr}"), cfg, store));
    app.hooks.lock().baseline(&app.store.read());
    let stop = CancellationToken::new();
    tokio::spawn(webhooks::run(app.clone(), changed, stop.clone()));
    let router = axum::Router::new()
        .fallback(http::dispatch)
        .with_state(app.clone());
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(token.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "simulator server failed");
        }
    });
    SimHandle {
        app,
        addr,
        stop,
        task,
    }
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        self.app.base.clone()
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn email(&self) -> &str {
        &self.app.email
    }
    pub fn token(&self) -> &str {
        &self.app.token
    }
    pub fn set_faults(&self, f: Faults) {
        self.app.reseed_faults(f.seed);
        self.app.cfg.write().faults = f;
    }
    /// Answers the next `count` API requests (whoever sends them) with the account limit's 429 and
    /// `Retry-After: retry_after` (whole seconds, rounded up), as if other integrations had spent
    /// the account; the window is left as it is. Recorded with fault `rate_limit`.
    pub fn rate_limit_next(&self, count: u32, retry_after: Duration) {
        *self.app.forced_429.lock() = (count, retry_after);
    }
    /// Changes the configuration at run time (limits, delays, faults). The email and token the
    /// handle reports stay the ones it started with.
    pub fn set_config(&self, f: impl FnOnce(&mut SimConfig)) {
        f(&mut self.app.cfg.write());
    }
    /// Reads or changes the data (writes stamp the change clock, so exports and search see them).
    /// Holds the store lock: keep `f` short and don't block in it.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.app.store.write())
    }
    /// Whether the incremental exports now include every change made so far: the newest change
    /// is older than the one-minute rule (ZENDESK.md §2), so a reader that starts now and reads
    /// to the end of the stream sees the account as it is.
    pub fn exports_include_every_change(&self) -> bool {
        let newest = {
            let s = self.app.store.read();
            [&s.user_log, &s.ticket_log, &s.org_log]
                .iter()
                .filter_map(|log| log.entries.last().map(|e| e.0))
                .max()
                .unwrap_or(0)
        };
        newest < store::now_ms() - self.app.cfg.read().one_minute_rule.as_millis() as i64
    }
    /// What the webhook dispatcher did so far.
    pub fn webhook_stats(&self) -> webhooks::DeliveryStats {
        self.app.hooks.lock().stats.clone()
    }
    /// Every API request so far (admin requests excluded), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.app.requests.lock().clone()
    }
    /// Forgets the recorded requests (the rate-limit windows are untouched).
    pub fn clear_requests(&self) {
        self.app.requests.lock().clear();
    }
    /// Stops accepting, lets in-flight requests finish (at most 5 s), then returns.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// `deskline sim`: the simulator with a generated account, as its own process.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// End-users to generate.
    #[arg(long, default_value_t = 2_000)]
    pub users: usize,
    #[arg(long, default_value_t = 3_000)]
    pub tickets: usize,
    /// Agents and admins to generate (the first is the admin the API email belongs to).
    #[arg(long, default_value_t = 20)]
    pub agents: usize,
    /// Organizations to generate (default: one per ten users).
    #[arg(long)]
    pub organizations: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The API email accepted with the token.
    #[arg(long, default_value = OWNER_EMAIL)]
    pub email: String,
    #[arg(long, default_value = "sim-token")]
    pub token: String,
    /// Also accept this OAuth bearer token.
    #[arg(long)]
    pub oauth_token: Option<String>,
    /// The account's request budget per minute.
    #[arg(long, default_value_t = 700)]
    pub requests_per_minute: u32,
    /// Incremental-export requests per minute.
    #[arg(long, default_value_t = 10)]
    pub export_requests_per_minute: u32,
    /// The exports' one-minute rule, in seconds.
    #[arg(long, default_value_t = 60)]
    pub one_minute_rule_secs: u64,
    /// Search indexing delay for new or changed users, in seconds.
    #[arg(long, default_value_t = 60)]
    pub search_delay_secs: u64,
    /// Latency added to every response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of requests answered with a 5xx (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share of responses cut off mid-body (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Ignore `include=identities` on the users export.
    #[arg(long)]
    pub no_export_identities: bool,
}

impl SimArgs {
    pub fn sim_config(&self) -> SimConfig {
        SimConfig {
            email: self.email.clone(),
            token: self.token.clone(),
            oauth_token: self.oauth_token.clone(),
            requests_per_minute: self.requests_per_minute,
            export_requests_per_minute: self.export_requests_per_minute,
            one_minute_rule: Duration::from_secs(self.one_minute_rule_secs),
            search_delay: Duration::from_secs(self.search_delay_secs),
            export_identities: !self.no_export_identities,
            faults: Faults {
                latency_ms: self.latency_ms,
                error_rate: self.error_rate,
                drop_rate: self.drop_rate,
                ..Faults::default()
            },
            ..SimConfig::default()
        }
    }
    pub fn gen_config(&self) -> GenConfig {
        GenConfig {
            users: self.users,
            tickets: self.tickets,
            agents: self.agents,
            organizations: self.organizations.unwrap_or(self.users / 10),
            seed: self.seed,
        }
    }
}

/// Generates the account, binds, prints `url=… email=… token=…` as the first line of stdout, and
/// serves until Ctrl-C.
pub async fn run_cli(args: SimArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    let gen_cfg = args.gen_config();
    let started = std::time::Instant::now();
    let store = tokio::task::spawn_blocking(move || generate(&gen_cfg))
        .await
        .context("generator failed")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let (users, tickets, orgs) = (store.user_count(), store.ticket_count(), store.org_count());
    let sim = start(listener, args.sim_config(), store).await;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "url={} email={} token={}",
            sim.url(),
            sim.email(),
            sim.token()
        )?;
        out.flush()?;
    }
    tracing::info!(
        users,
        tickets,
        organizations = orgs,
        generated_ms = started.elapsed().as_millis() as u64,
        "simulator serving; Ctrl-C to stop"
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    sim.shutdown().await;
    Ok(())
}
