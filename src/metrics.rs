//! Prometheus metrics and `/healthz` on `server.metrics_listen` (DESIGN §6, issue 4).
//!
//! Two kinds of series live here:
//! - **Counted where they happen**: RPCs (count and latency histogram per method and status code),
//!   routing decisions by [`ReasonKind`], rejected bearer tokens. The RouteCall hot path pays for
//!   two clock reads and a few uncontended atomics: the `OK` series of every method and the
//!   counter of every decision category are created up front and kept as handles, so a successful
//!   call never hashes a label set or takes the family's lock. Only error codes go through the
//!   family lookup, and they are rare by nature.
//! - **Read at scrape time** ([`Live`], a custom collector): index sizes and export ages, queue
//!   depth by state, and the Zendesk counters the [`crate::zendesk::Budget`] already keeps. Copying
//!   them into gauges as they change would put metric work on the writers' paths and could drift;
//!   reading them when Prometheus asks costs one short read lock and one small SQL count per scrape.
//!
//! Invariants:
//! - Every metric name is in [`names`]; nothing else spells one.
//! - Labels come from closed sets (method, status code, reason category, export, queue state, index
//!   record kind) or from the budget's endpoint *templates* (`GET /api/v2/users/{id}`, at most 256
//!   of them, see `budget.rs`). A phone number, a call id or a Zendesk id never becomes a label.
//! - `/healthz` answers 200 `ok` once the index has been loaded (warm-up done or snapshot read), 503
//!   before: the same readiness as `grpc.health.v1`, for load balancers that only speak HTTP.

use std::{collections::BTreeMap, future::Future, net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};
use tonic::{Code, Status};

use crate::{
    index::{Export, SharedIndex},
    routing::ReasonKind,
    sync::{JobStore, SyncState},
    zendesk::{Client, budget::NO_RESPONSE},
};

/// Every metric Deskline exposes. Counters are registered without their `_total` suffix, which
/// the encoder appends (the exposed name is given in each comment).
pub(crate) mod names {
    /// Gauge `{kind}`: records in the index (`customers`, `agents`, `open_tickets`,
    /// `organizations`, `phones`).
    pub(crate) const INDEX_RECORDS: &str = "deskline_index_records";
    /// Gauge: 1 once the index has been loaded (warm-up done or snapshot read), else 0.
    pub(crate) const INDEX_LOADED: &str = "deskline_index_loaded";
    /// Gauge `{export}`: seconds since each export (`users`, `tickets`, `organizations`) was last
    /// read to its end; absent until it was.
    pub(crate) const INDEX_AGE_SECONDS: &str = "deskline_index_age_seconds";
    /// Counter `deskline_rpc_requests_total{method, code}`.
    pub(crate) const RPC_REQUESTS: &str = "deskline_rpc_requests";
    /// Histogram `{method, code}`: time spent in the handler.
    pub(crate) const RPC_DURATION_SECONDS: &str = "deskline_rpc_duration_seconds";
    /// Counter `deskline_rpc_unauthenticated_total`: requests refused for a missing or wrong token.
    pub(crate) const RPC_UNAUTHENTICATED: &str = "deskline_rpc_unauthenticated";
    /// Counter `deskline_routing_decisions_total{reason}`: RouteCall answers by reason category.
    pub(crate) const ROUTING_DECISIONS: &str = "deskline_routing_decisions";
    /// Gauge `{state}`: post-call jobs by state (`queued`, `in_progress`, `retry_wait`, `done`,
    /// `failed`).
    pub(crate) const SYNC_JOBS: &str = "deskline_sync_jobs";
    /// Gauge: reports in this replica's local spool, accepted while PostgreSQL was unreachable and
    /// not yet forwarded (always 0 with the embedded SQLite store).
    pub(crate) const SYNC_SPOOLED: &str = "deskline_sync_spooled";
    /// Counter `deskline_zendesk_responses_total{endpoint, status}`: Zendesk requests by endpoint
    /// template and HTTP status (`none` when no response came).
    pub(crate) const ZENDESK_RESPONSES: &str = "deskline_zendesk_responses";
    /// Counter `deskline_zendesk_requests_sent_total`: every attempt sent, retries included.
    pub(crate) const ZENDESK_REQUESTS_SENT: &str = "deskline_zendesk_requests_sent";
    /// Counter `deskline_zendesk_rate_limited_total`: 429 responses.
    pub(crate) const ZENDESK_RATE_LIMITED: &str = "deskline_zendesk_rate_limited";
    /// Gauge `{scope}`: requests sent in the last minute (`all`, `export`).
    pub(crate) const ZENDESK_BUDGET_USED: &str = "deskline_zendesk_budget_used";
    /// Gauge `{scope}`: the per-minute limits (`all`, `export`).
    pub(crate) const ZENDESK_BUDGET_LIMIT: &str = "deskline_zendesk_budget_limit";
    /// Gauge: seconds requests are still held back by a 429's `Retry-After`.
    pub(crate) const ZENDESK_PAUSED_SECONDS: &str = "deskline_zendesk_paused_seconds";
    /// Counter `deskline_webhook_deliveries_total{result}`: webhook requests by
    /// [`WebhookResult`](super::WebhookResult).
    pub(crate) const WEBHOOK_DELIVERIES: &str = "deskline_webhook_deliveries";
    /// Gauge: seconds since a webhook event last changed the index; absent until one did.
    pub(crate) const WEBHOOK_LAST_APPLIED_AGE_SECONDS: &str =
        "deskline_webhook_last_applied_age_seconds";
    /// Counter `deskline_export_missed_by_webhooks_total{export}`: export rows newer than what
    /// the index held, i.e. changes webhooks had not delivered (counted only with webhooks on).
    pub(crate) const EXPORT_MISSED_BY_WEBHOOKS: &str = "deskline_export_missed_by_webhooks";
    /// Gauge: 1 while this replica reserves its requests in the budget shared through PostgreSQL,
    /// 0 without PostgreSQL or while it is unreachable (the local fallback budget).
    pub(crate) const ZENDESK_BUDGET_SHARED: &str = "deskline_zendesk_budget_shared";
    /// Gauge `{scope}`: requests of every replica in the shared budget's current window (`all`,
    /// `export`); absent without PostgreSQL or when it does not answer.
    pub(crate) const ZENDESK_CLUSTER_BUDGET_USED: &str = "deskline_zendesk_cluster_budget_used";
    /// Gauge: 1 while this replica holds the follower lease (follows the exports), else 0; only
    /// with PostgreSQL.
    pub(crate) const FOLLOWER_LEASE_HELD: &str = "deskline_follower_lease_held";
    /// Gauge: the follower lease epoch this replica last held (0 if never).
    pub(crate) const FOLLOWER_LEASE_EPOCH: &str = "deskline_follower_lease_epoch";
    /// Gauge: the last change-log seq applied to this replica's index.
    pub(crate) const CHANGELOG_APPLIED_SEQ: &str = "deskline_changelog_applied_seq";
    /// Gauge: changes in the shared log not yet applied to this replica's index.
    pub(crate) const CHANGELOG_BEHIND: &str = "deskline_changelog_behind";
    /// Gauge: age in seconds of the oldest change not yet applied here (0 when caught up).
    pub(crate) const CHANGELOG_LAG_SECONDS: &str = "deskline_changelog_lag_seconds";
    /// Counter `deskline_changelog_local_only_total`: index changes (sync writes, webhooks,
    /// reported calls) applied on this replica only because the change log could not be appended
    /// to: the append that failed or timed out, and every one skipped while the breaker was open.
    pub(crate) const CHANGELOG_LOCAL_ONLY: &str = "deskline_changelog_local_only";
    /// Gauge: 1 while the change log's breaker is open (an append failed; index changes are
    /// applied here only, without waiting, until a probe reaches PostgreSQL again), else 0.
    pub(crate) const CHANGELOG_BREAKER_OPEN: &str = "deskline_changelog_breaker_open";
    /// Counter `deskline_changelog_late_own_skipped_total`: changes of this replica that reached
    /// the log after their append had failed or timed out (so they were applied here already),
    /// not applied a second time.
    pub(crate) const CHANGELOG_LATE_OWN_SKIPPED: &str = "deskline_changelog_late_own_skipped";
    /// Counter `deskline_shared_snapshot_unusable_total`: shared index snapshots this replica
    /// found damaged (size, chunk count or CRC-32 wrong) or could not decode, and skipped.
    pub(crate) const SHARED_SNAPSHOT_UNUSABLE: &str = "deskline_shared_snapshot_unusable";
}

/// The gauges of a replica sharing its index through PostgreSQL (`crate::replica` sets them).
#[derive(Debug, Clone, Default)]
pub struct ReplicaGauges {
    /// [`names::FOLLOWER_LEASE_HELD`].
    pub lease_held: prometheus_client::metrics::gauge::Gauge,
    /// [`names::FOLLOWER_LEASE_EPOCH`].
    pub lease_epoch: prometheus_client::metrics::gauge::Gauge,
    /// [`names::CHANGELOG_APPLIED_SEQ`].
    pub applied_seq: prometheus_client::metrics::gauge::Gauge,
    /// [`names::CHANGELOG_BEHIND`].
    pub behind: prometheus_client::metrics::gauge::Gauge,
    /// [`names::CHANGELOG_LAG_SECONDS`].
    pub lag_seconds: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    /// [`names::CHANGELOG_LOCAL_ONLY`].
    pub local_only: Counter,
    /// [`names::CHANGELOG_BREAKER_OPEN`].
    pub breaker_open: prometheus_client::metrics::gauge::Gauge,
    /// [`names::SHARED_SNAPSHOT_UNUSABLE`].
    pub snapshots_unusable: Counter,
    /// [`names::CHANGELOG_LATE_OWN_SKIPPED`].
    pub late_own_skipped: Counter,
}

/// What became of one webhook request (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookResult {
    /// Accepted and it changed the index.
    Applied,
    /// Accepted; the index already held this state or a newer one.
    Stale,
    /// A repeated invocation or event id: acknowledged, not applied again.
    Duplicate,
    /// Accepted but of a type Deskline does not use.
    Ignored,
    /// Accepted, but reading the entity from Zendesk failed (the export repairs it).
    FetchFailed,
    /// The signature did not verify (401).
    BadSignature,
    /// Signature valid but the timestamp is more than 5 minutes off.
    StaleTimestamp,
    /// The body could not be parsed, or was not read in time.
    Malformed,
    /// The body is over the size cap (413).
    TooLarge,
    /// The apply queue was full (503; Zendesk retries).
    Overloaded,
}

impl WebhookResult {
    pub(crate) const ALL: [WebhookResult; 10] = [
        Self::Applied,
        Self::Stale,
        Self::Duplicate,
        Self::Ignored,
        Self::FetchFailed,
        Self::BadSignature,
        Self::StaleTimestamp,
        Self::Malformed,
        Self::TooLarge,
        Self::Overloaded,
    ];
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Stale => "stale",
            Self::Duplicate => "duplicate",
            Self::Ignored => "ignored",
            Self::FetchFailed => "fetch_failed",
            Self::BadSignature => "bad_signature",
            Self::StaleTimestamp => "stale_timestamp",
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::Overloaded => "overloaded",
        }
    }
}

/// The Resolver's RPCs, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    RouteCall,
    LookupCaller,
    ReportCall,
    GetCallStatus,
}

impl Method {
    pub(crate) const ALL: [Method; 4] = [
        Self::RouteCall,
        Self::LookupCaller,
        Self::ReportCall,
        Self::GetCallStatus,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::RouteCall => "RouteCall",
            Self::LookupCaller => "LookupCaller",
            Self::ReportCall => "ReportCall",
            Self::GetCallStatus => "GetCallStatus",
        }
    }
}

/// The canonical gRPC name of a status code (`OK`, `INVALID_ARGUMENT`, …).
pub(crate) fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Latency buckets (seconds): a RouteCall answers in microseconds, a ReportCall waits for a
/// durable commit (milliseconds); the top buckets catch a stalled disk.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 1.0, 5.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

type RpcLabels = [(&'static str, &'static str); 2];

fn rpc_labels(method: Method, code: Code) -> RpcLabels {
    [("method", method.as_str()), ("code", code_label(code))]
}

/// Deskline's metrics: the registry, the handles the handlers update, and what is read at scrape.
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    /// `OK` series per method, indexed by `Method as usize`.
    rpc_ok: [(Counter, Histogram); 4],
    /// Indexed by `ReasonKind as usize`.
    decisions: [Counter; 7],
    unauthenticated: Counter,
    /// Indexed by `WebhookResult as usize`.
    webhooks: [Counter; 10],
    /// Indexed by `Export as usize` order of [`Export::ALL`].
    export_missed: [Counter; 3],
    live: Arc<Live>,
    queue: Option<JobStore>,
    spooled: prometheus_client::metrics::gauge::Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics over one account's index, Zendesk client (its budget's counters) and queue.
    pub fn new(index: SharedIndex, client: Option<Client>, queue: Option<JobStore>) -> Self {
        let mut registry = Registry::default();
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_duration = Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let rpc_ok = Method::ALL.map(|m| {
            let labels = rpc_labels(m, Code::Ok);
            (
                rpc_requests.get_or_create_owned(&labels),
                rpc_duration.get_or_create_owned(&labels),
            )
        });
        let decisions_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let decisions = ReasonKind::ALL
            .map(|k| decisions_family.get_or_create_owned(&[("reason", k.as_str())]));
        let unauthenticated = Counter::default();
        registry.register(
            names::RPC_REQUESTS,
            "gRPC requests by method and status code",
            rpc_requests.clone(),
        );
        registry.register(
            names::RPC_DURATION_SECONDS,
            "Time spent in the gRPC handler, by method and status code",
            rpc_duration.clone(),
        );
        registry.register(
            names::RPC_UNAUTHENTICATED,
            "gRPC requests refused for a missing or wrong bearer token",
            unauthenticated.clone(),
        );
        registry.register(
            names::ROUTING_DECISIONS,
            "RouteCall answers by reason category",
            decisions_family,
        );
        let spooled = prometheus_client::metrics::gauge::Gauge::default();
        if queue.is_some() {
            registry.register(
                names::SYNC_SPOOLED,
                "Reports in the local spool waiting for PostgreSQL",
                spooled.clone(),
            );
        }
        let webhooks_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let webhooks = WebhookResult::ALL
            .map(|r| webhooks_family.get_or_create_owned(&[("result", r.as_str())]));
        registry.register(
            names::WEBHOOK_DELIVERIES,
            "Zendesk webhook requests by result",
            webhooks_family,
        );
        let missed_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let export_missed =
            Export::ALL.map(|e| missed_family.get_or_create_owned(&[("export", e.as_str())]));
        registry.register(
            names::EXPORT_MISSED_BY_WEBHOOKS,
            "Export rows newer than the index held: changes webhooks had not delivered",
            missed_family,
        );
        let live = Arc::new(Live {
            index,
            client,
            queue_counts: Mutex::new(None),
            webhook_applied_ms: std::sync::atomic::AtomicI64::new(0),
            shared_budget: Mutex::new(None),
        });
        registry.register_collector(Box::new(live.clone()));
        Self {
            registry,
            rpc_requests,
            rpc_duration,
            rpc_ok,
            decisions,
            unauthenticated,
            webhooks,
            export_missed,
            live,
            queue,
            spooled,
        }
    }

    /// Registers a replica's gauges (only with PostgreSQL, so a single replica shows none).
    pub fn with_replica(mut self, g: &ReplicaGauges) -> Self {
        let r = &mut self.registry;
        r.register(
            names::FOLLOWER_LEASE_HELD,
            "1 while this replica holds the follower lease and follows the exports",
            g.lease_held.clone(),
        );
        r.register(
            names::FOLLOWER_LEASE_EPOCH,
            "The follower lease epoch this replica last held",
            g.lease_epoch.clone(),
        );
        r.register(
            names::CHANGELOG_APPLIED_SEQ,
            "The last change-log seq applied to this replica's index",
            g.applied_seq.clone(),
        );
        r.register(
            names::CHANGELOG_BEHIND,
            "Changes in the shared log not yet applied to this replica's index",
            g.behind.clone(),
        );
        r.register(
            names::CHANGELOG_LAG_SECONDS,
            "Age of the oldest change not yet applied to this replica's index",
            g.lag_seconds.clone(),
        );
        r.register(
            names::CHANGELOG_LOCAL_ONLY,
            "Index changes applied on this replica only because the change log could not be appended to",
            g.local_only.clone(),
        );
        r.register(
            names::CHANGELOG_BREAKER_OPEN,
            "1 while index changes skip the unreachable change log (applied here only) until PostgreSQL answers again",
            g.breaker_open.clone(),
        );
        r.register(
            names::SHARED_SNAPSHOT_UNUSABLE,
            "Shared index snapshots found damaged or undecodable and skipped by this replica",
            g.snapshots_unusable.clone(),
        );
        r.register(
            names::CHANGELOG_LATE_OWN_SKIPPED,
            "Changes of this replica that reached the change log after their append had failed or timed out (already applied here), not applied again",
            g.late_own_skipped.clone(),
        );
        self
    }

    /// Counts one webhook request by result; an applied one also restarts the age gauge.
    pub(crate) fn webhook(&self, result: WebhookResult) {
        self.webhooks[result as usize].inc();
        if result == WebhookResult::Applied {
            self.live
                .webhook_applied_ms
                .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The count of webhook requests with `result` so far (tests).
    pub fn webhook_count(&self, result: WebhookResult) -> u64 {
        self.webhooks[result as usize].get()
    }

    /// Counts export rows that brought a change webhooks had not delivered.
    pub(crate) fn export_missed(&self, export: Export, n: u64) {
        if let Some(i) = Export::ALL.iter().position(|e| *e == export) {
            self.export_missed[i].inc_by(n);
        }
    }

    /// Records one finished RPC. Successful calls touch only pre-created handles.
    #[inline]
    pub(crate) fn rpc<T>(&self, method: Method, started: Instant, result: &Result<T, Status>) {
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(_) => {
                let (count, latency) = &self.rpc_ok[method as usize];
                count.inc();
                latency.observe(seconds);
            }
            Err(status) => {
                let labels = rpc_labels(method, status.code());
                self.rpc_requests.get_or_create(&labels).inc();
                self.rpc_duration.get_or_create(&labels).observe(seconds);
            }
        }
    }

    /// Counts one RouteCall answer by its reason category.
    #[inline]
    pub(crate) fn decision(&self, kind: ReasonKind) {
        self.decisions[kind as usize].inc();
    }

    /// Counts one request refused by the bearer-token check.
    pub(crate) fn unauthenticated(&self) {
        self.unauthenticated.inc();
    }

    /// Whether the index has been loaded (what `/healthz` reports).
    pub(crate) fn ready(&self) -> bool {
        self.live.index.read().is_loaded()
    }

    /// The Prometheus text exposition (format 0.0.4) of every series, reading the live values now.
    pub async fn render(&self) -> Result<String, std::fmt::Error> {
        if let Some(queue) = &self.queue {
            // The queue is read on a blocking thread, so it is fetched before encoding (which is
            // synchronous); a failed read leaves the series out rather than showing stale depths.
            let counts = match queue.counts().await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: the queue could not be read");
                    None
                }
            };
            *self.live.queue_counts.lock() = counts;
            match queue.spooled().await {
                Ok(n) => {
                    self.spooled.set(n as i64);
                }
                Err(e) => tracing::warn!(error = %e, "metrics: the spool could not be read"),
            }
        }
        if let Some(client) = &self.live.client {
            *self.live.shared_budget.lock() = client.budget().shared_usage().await;
        }
        let mut out = String::with_capacity(8 * 1024);
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The values owned by other parts of the service, read at scrape time.
#[derive(Debug)]
struct Live {
    index: SharedIndex,
    client: Option<Client>,
    /// Filled by [`Metrics::render`] just before encoding.
    queue_counts: Mutex<Option<BTreeMap<SyncState, u64>>>,
    /// Unix ms when a webhook event last changed the index (0: never).
    webhook_applied_ms: std::sync::atomic::AtomicI64,
    /// The shared budget's use across replicas, filled by [`Metrics::render`].
    shared_budget: Mutex<Option<crate::cluster::SharedBudgetUsage>>,
}

pub(crate) use crate::clock::now_ms;

/// Encodes one gauge family from `(label value, value)` pairs.
fn gauges<V: prometheus_client::encoding::EncodeGaugeValue + Clone>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl IntoIterator<Item = (&'static str, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value_label, v) in values {
        ConstGauge::new(v).encode(family.encode_family(&[(label, value_label)])?)?;
    }
    Ok(())
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (counts, loaded, fresh) = {
            let index = self.index.read();
            (
                index.counts(),
                index.is_loaded(),
                Export::ALL.map(|e| (e.as_str(), index.fresh_at(e))),
            )
        };
        gauges(
            &mut encoder,
            names::INDEX_RECORDS,
            "Records in the in-memory index",
            "kind",
            [
                ("customers", counts.customers as i64),
                ("agents", counts.agents as i64),
                ("open_tickets", counts.open_tickets as i64),
                ("organizations", counts.organizations as i64),
                ("phones", counts.phones as i64),
            ],
        )?;
        ConstGauge::new(i64::from(loaded)).encode(encoder.encode_descriptor(
            names::INDEX_LOADED,
            "1 once the index has been loaded, else 0",
            None,
            MetricType::Gauge,
        )?)?;
        let now = now_ms();
        let applied = self
            .webhook_applied_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if applied > 0 {
            ConstGauge::new(now.saturating_sub(applied).max(0) as f64 / 1000.0).encode(
                encoder.encode_descriptor(
                    names::WEBHOOK_LAST_APPLIED_AGE_SECONDS,
                    "Seconds since a webhook event last changed the index",
                    None,
                    MetricType::Gauge,
                )?,
            )?;
        }
        gauges(
            &mut encoder,
            names::INDEX_AGE_SECONDS,
            "Seconds since each export was last read to its end",
            "export",
            fresh.into_iter().filter_map(|(e, at)| {
                at.map(|at| (e, (now.saturating_sub(at)).max(0) as f64 / 1000.0))
            }),
        )?;

        if let Some(counts) = self.queue_counts.lock().clone() {
            gauges(
                &mut encoder,
                names::SYNC_JOBS,
                "Post-call sync jobs by state",
                "state",
                counts.into_iter().map(|(s, n)| (s.as_str(), n as i64)),
            )?;
        }

        let Some(client) = &self.client else {
            return Ok(());
        };
        let stats = client.budget().stats();
        {
            let mut family = encoder.encode_descriptor(
                names::ZENDESK_RESPONSES,
                "Zendesk requests by endpoint template and HTTP status (none: no response)",
                None,
                MetricType::Counter,
            )?;
            let mut status_text = String::new();
            for ((endpoint, status), n) in &stats.responses {
                status_text.clear();
                if *status == NO_RESPONSE {
                    status_text.push_str("none");
                } else {
                    use std::fmt::Write;
                    write!(status_text, "{status}")?;
                }
                let labels = [("endpoint", endpoint.as_str()), ("status", &status_text)];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        ConstCounter::new(stats.total_sent).encode(encoder.encode_descriptor(
            names::ZENDESK_REQUESTS_SENT,
            "Requests sent to Zendesk, retries included",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(stats.total_rate_limited).encode(encoder.encode_descriptor(
            names::ZENDESK_RATE_LIMITED,
            "429 responses from Zendesk",
            None,
            MetricType::Counter,
        )?)?;
        gauges(
            &mut encoder,
            names::ZENDESK_BUDGET_USED,
            "Zendesk requests sent in the last minute",
            "scope",
            [
                ("all", i64::from(stats.used_last_minute)),
                ("export", i64::from(stats.export_used_last_minute)),
            ],
        )?;
        gauges(
            &mut encoder,
            names::ZENDESK_BUDGET_LIMIT,
            "Zendesk requests allowed per minute",
            "scope",
            [
                ("all", i64::from(stats.limit)),
                ("export", i64::from(stats.export_limit)),
            ],
        )?;
        ConstGauge::new(stats.paused_for.as_secs_f64()).encode(encoder.encode_descriptor(
            names::ZENDESK_PAUSED_SECONDS,
            "Seconds Zendesk requests are still held back by a 429",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(i64::from(client.budget().is_shared())).encode(
            encoder.encode_descriptor(
                names::ZENDESK_BUDGET_SHARED,
                "1 while requests are reserved in the budget shared through PostgreSQL",
                None,
                MetricType::Gauge,
            )?,
        )?;
        if let Some(usage) = self.shared_budget.lock().clone() {
            gauges(
                &mut encoder,
                names::ZENDESK_CLUSTER_BUDGET_USED,
                "Zendesk requests of every replica in the shared budget's window",
                "scope",
                [
                    ("all", i64::from(usage.used)),
                    ("export", i64::from(usage.export_used)),
                ],
            )?;
        }
        Ok(())
    }
}

/// The metrics HTTP routes.
pub(crate) fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(metrics)
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.render().await {
        Ok(body) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be encoded\n",
        )
            .into_response(),
    }
}

async fn healthz_handler(State(metrics): State<Arc<Metrics>>) -> Response {
    if metrics.ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the index has not been loaded yet\n",
        )
            .into_response()
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `server.metrics_listen`, naming the key when it cannot.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (server.metrics_listen): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;

    fn metrics() -> Metrics {
        let index: SharedIndex = Arc::new(parking_lot::RwLock::new(Index::new()));
        Metrics::new(index, None, None)
    }

    fn line_value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[tokio::test]
    async fn counts_rpcs_decisions_and_codes() {
        let m = metrics();
        let ok: Result<(), Status> = Ok(());
        m.rpc(Method::RouteCall, Instant::now(), &ok);
        m.rpc(Method::RouteCall, Instant::now(), &ok);
        m.rpc(
            Method::RouteCall,
            Instant::now(),
            &Err::<(), _>(Status::invalid_argument("caller: required")),
        );
        m.decision(ReasonKind::Routed);
        m.decision(ReasonKind::NoExtension);
        m.unauthenticated();
        let text = m.render().await.unwrap();
        let v = |p: &str| line_value(&text, p);
        assert_eq!(
            v(r#"deskline_rpc_requests_total{method="RouteCall",code="OK"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            v(r#"deskline_rpc_requests_total{method="RouteCall",code="INVALID_ARGUMENT"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"deskline_rpc_duration_seconds_count{method="RouteCall",code="OK"}"#),
            Some(2.0)
        );
        // Pre-created series are there from the start, at zero.
        assert_eq!(
            v(r#"deskline_rpc_requests_total{method="GetCallStatus",code="OK"}"#),
            Some(0.0)
        );
        assert_eq!(
            v(r#"deskline_routing_decisions_total{reason="routed"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"deskline_routing_decisions_total{reason="no_extension"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"deskline_routing_decisions_total{reason="no_customer"}"#),
            Some(0.0)
        );
        assert_eq!(v("deskline_rpc_unauthenticated_total"), Some(1.0));
        assert_eq!(v("deskline_index_loaded"), Some(0.0));
        assert_eq!(v(r#"deskline_index_records{kind="customers"}"#), Some(0.0));
        // No export was read yet: no age is made up.
        assert!(!text.contains("deskline_index_age_seconds{"), "{text}");
        assert!(!m.ready());
    }

    #[tokio::test]
    async fn index_age_per_export_once_read() {
        let m = metrics();
        {
            let mut idx = m.live.index.write();
            idx.mark_fresh(Export::Users, now_ms() - 5_000);
            idx.set_loaded();
        }
        let text = m.render().await.unwrap();
        let age = line_value(&text, r#"deskline_index_age_seconds{export="users"}"#).unwrap();
        assert!((5.0..60.0).contains(&age), "{text}");
        assert!(!text.contains(r#"deskline_index_age_seconds{export="tickets"}"#));
        assert!(m.ready());
    }

    #[test]
    fn every_code_has_a_label() {
        for c in 0..17 {
            let label = code_label(Code::from_i32(c));
            assert!(label.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        }
    }
}
