//! The tonic service: input validation, bearer-token auth, proto ↔ domain conversion and the one
//! mapping from domain errors to `tonic::Status`. Handlers stay thin (STYLE.md practice 1): they
//! validate, call one function of [`crate::routing`] or [`crate::sync`], and convert the result.
//!
//! The routing and caller-ID handlers take the index's read lock for one lookup and never await
//! while holding it, so they cannot wait on Zendesk or on the follower for longer than one apply.

mod calls;

use std::{sync::Arc, time::Instant};

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status, service::Interceptor};

use crate::{
    index::SharedIndex,
    metrics::{Method, Metrics},
    phone::{PhoneError, PhoneParser, mask},
    proto::{self, resolver_server::Resolver},
    routing::{self, AgentView, Basis, CustomerView, Decision, Directory, OrgView, TicketView},
};

/// Longest number or id we accept in a request field.
const MAX_NUMBER_LEN: usize = 64;
const MAX_CALL_ID_LEN: usize = 128;

/// What a request did wrong, or why it cannot be answered now.
///
/// A failure inside Deskline (the queue's SQLite file, a blocking task) never reaches the client
/// as text: its message would show file paths and SQL to the PBX, and a PBX can do nothing with
/// them. The client gets a short sentence and a reference; the log has the whole cause chain under
/// the same reference ([`ApiError::storage`], [`ApiError::internal`]).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is missing or malformed (`INVALID_ARGUMENT`).
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The proto field at fault, e.g. `phone_number`.
        field: &'static str,
        /// What is wrong with it, for the client.
        message: String,
    },
    /// The thing asked about is not known (`NOT_FOUND`), e.g. an unknown `call_id`.
    #[error("{0}")]
    NotFound(String),
    /// A condition the client may know about (the index is still loading).
    #[error("{0}")]
    Unavailable(String),
    /// Storage failed: try again later. The detail is logged under `reference`.
    #[error("storage unavailable, {what}, try again (ref {reference})")]
    Storage {
        /// What could not be done, e.g. "the call status could not be read".
        what: &'static str,
        /// The reference the log has the cause under.
        reference: String,
    },
    /// A bug or a crashed task. The detail is logged under `reference`.
    #[error("internal error (ref {reference})")]
    Internal {
        /// The reference the log has the cause under.
        reference: String,
    },
}

impl ApiError {
    /// Logs `error`'s cause chain under a new reference and returns what the client may see.
    pub fn storage(what: &'static str, error: &(dyn std::error::Error + 'static)) -> ApiError {
        let reference = new_reference();
        tracing::error!(%reference, error = %cause_chain(error), "storage failed: {what}");
        ApiError::Storage { what, reference }
    }

    /// Logs `error`'s cause chain under a new reference; the client sees only the reference.
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> ApiError {
        let reference = new_reference();
        tracing::error!(%reference, error = %cause_chain(error), "internal error");
        ApiError::Internal { reference }
    }
}

/// 64 random bits, enough to find one line in a log and to be unguessable across calls.
fn new_reference() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// `error: cause: cause …`, as `anyhow`'s `{:#}` prints it.
fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        // thiserror's `{0}` messages already include their source's text.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            ApiError::NotFound(_) => Status::not_found(e.to_string()),
            ApiError::Unavailable(_) | ApiError::Storage { .. } => {
                Status::unavailable(e.to_string())
            }
            ApiError::Internal { .. } => Status::internal(e.to_string()),
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument {
        field,
        message: message.into(),
    }
}

/// Everything the handlers read.
pub struct ServiceState {
    /// The read model routing and caller ID answer from.
    pub index: SharedIndex,
    /// Full name → PBX extension (`routing.directory`).
    pub directory: Directory,
    /// `routing.recent_days`: DESIGN §3 rule 7's window; 0 = off.
    pub recent_days: u32,
    /// Normalises query numbers (canonical fast path, then a cached full parse).
    pub resolver: routing::Resolver,
    /// For call reports (not cached: each report is parsed once).
    pub parser: PhoneParser,
    /// Zendesk account URL without trailing slash, for agent-interface links.
    pub zendesk_url: String,
    /// The post-call queue and a handle that wakes its worker.
    pub sync: Option<SyncApi>,
    /// RPC counts, latencies and routing decisions are recorded here.
    pub metrics: Arc<Metrics>,
}

/// What `ReportCall` and `GetCallStatus` need.
pub struct SyncApi {
    /// The durable post-call queue.
    pub queue: crate::sync::JobStore,
    /// Wakes the sync worker when a job is queued.
    pub worker: crate::sync::WorkerHandle,
    /// An accepted report's call becomes its customers' last call (rule 7) through this, at once
    /// on this replica.
    pub writer: crate::index::IndexWriter,
    /// With replicas: the shared change log, so the other replicas learn the call too, batched
    /// in the background ([`crate::index::IndexWriter::batched`]: `ReportCall` does not wait on
    /// the log, and a burst of reports costs one append).
    pub shared_calls: Option<tokio::sync::mpsc::Sender<crate::index::Change>>,
}

#[derive(Clone)]
pub(crate) struct ResolverService {
    state: Arc<ServiceState>,
}

impl ResolverService {
    pub(crate) fn new(state: Arc<ServiceState>) -> Self {
        Self { state }
    }
}

use crate::clock::now_ms;

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("too long ({} bytes, at most {max})", value.len()),
        ));
    }
    Ok(())
}

fn phone_error(field: &'static str, e: PhoneError) -> ApiError {
    invalid(field, e.to_string())
}

/// Validates a number field and resolves it against the index. The index lock is held only for the
/// lookup that follows, by the caller.
fn required_number<'a>(field: &'static str, raw: &'a str) -> Result<&'a str, ApiError> {
    if raw.trim().is_empty() {
        return Err(invalid(field, "required"));
    }
    check_len(field, raw, MAX_NUMBER_LEN)?;
    Ok(raw)
}

#[tonic::async_trait]
impl Resolver for ResolverService {
    async fn route_call(
        &self,
        request: Request<proto::RouteCallRequest>,
    ) -> Result<Response<proto::RouteCallResponse>, Status> {
        let started = Instant::now();
        let result = self.route(request);
        self.state.metrics.rpc(Method::RouteCall, started, &result);
        result
    }

    async fn lookup_caller(
        &self,
        request: Request<proto::LookupCallerRequest>,
    ) -> Result<Response<proto::LookupCallerResponse>, Status> {
        let started = Instant::now();
        let result = self.lookup(request);
        self.state
            .metrics
            .rpc(Method::LookupCaller, started, &result);
        result
    }

    async fn report_call(
        &self,
        request: Request<proto::ReportCallRequest>,
    ) -> Result<Response<proto::ReportCallResponse>, Status> {
        let started = Instant::now();
        let result = self.report(request).await;
        self.state.metrics.rpc(Method::ReportCall, started, &result);
        result
    }

    async fn get_call_status(
        &self,
        request: Request<proto::GetCallStatusRequest>,
    ) -> Result<Response<proto::GetCallStatusResponse>, Status> {
        let started = Instant::now();
        let result = self.call_status(request).await;
        self.state
            .metrics
            .rpc(Method::GetCallStatus, started, &result);
        result
    }
}

/// The handlers' bodies; the trait impl above only times them.
impl ResolverService {
    /// Resolves `raw` (the request field `field`) against the index and runs one decision on it,
    /// holding the read lock for that lookup only. Also returns the index age for the answer.
    fn with_number<R>(
        &self,
        field: &'static str,
        raw: &str,
        decide: impl FnOnce(&crate::index::Index, crate::phone::E164) -> R,
    ) -> Result<(R, Freshness), ApiError> {
        let index = crate::index::read_for_lookup(&self.state.index);
        if !index.is_serving() {
            return Err(ApiError::Unavailable(
                "the index has not been loaded yet".into(),
            ));
        }
        let phone = self
            .state
            .resolver
            .resolve(&index, raw)
            .map_err(|e| phone_error(field, e))?;
        let state = if index.is_loaded() {
            proto::IndexState::Ready
        } else {
            proto::IndexState::Warming
        };
        Ok((
            decide(&index, phone),
            Freshness {
                age_ms: index.age_ms(now_ms()).unwrap_or(0),
                state,
            },
        ))
    }

    fn route(
        &self,
        request: Request<proto::RouteCallRequest>,
    ) -> Result<Response<proto::RouteCallResponse>, Status> {
        let req = request.into_inner();
        let caller = required_number("caller", &req.caller)?;
        check_len("called", &req.called, MAX_NUMBER_LEN)?;
        check_len("call_id", &req.call_id, MAX_CALL_ID_LEN)?;
        let st = &self.state;
        let fallback = routing::Fallback::new(st.recent_days, now_ms() / 1000);
        let (answer, age) = self.with_number("caller", caller, |index, phone| {
            routing::route_with(index, &st.directory, phone, fallback)
        })?;
        st.metrics.decision(answer.kind);
        tracing::debug!(call_id = %req.call_id, caller = %mask(caller), decision = ?answer.decision, basis = ?answer.basis, "route");
        Ok(Response::new(route_to_proto(&st.zendesk_url, answer, age)))
    }

    fn lookup(
        &self,
        request: Request<proto::LookupCallerRequest>,
    ) -> Result<Response<proto::LookupCallerResponse>, Status> {
        let req = request.into_inner();
        let number = required_number("number", &req.number)?;
        let st = &self.state;
        let (answer, age) = self.with_number("number", number, routing::lookup_caller)?;
        Ok(Response::new(caller_to_proto(&st.zendesk_url, answer, age)))
    }

    async fn report(
        &self,
        request: Request<proto::ReportCallRequest>,
    ) -> Result<Response<proto::ReportCallResponse>, Status> {
        let sync = self.sync()?;
        let report = calls::report_from_proto(request.into_inner(), &self.state.parser)?;
        // Acknowledged only once committed: an error here tells the PBX to report again.
        let duplicate = sync.queue.enqueue(&report).await.map_err(|e| {
            tracing::warn!(call_id = %report.call_id, "a call report could not be stored");
            queue_error("the report was not stored", &e)
        })?;
        if !duplicate {
            sync.worker.notify();
            // Rule 7's last call counts from the moment the report is accepted, not when Zendesk
            // has it (a sync can wait minutes on the budget). A first report only: the first wins.
            if let Some(change) = report.call_taken() {
                if let (Some(shared), Some(again)) = (&sync.shared_calls, report.call_taken()) {
                    // Batched with the other reports' into one change-log append. Refused (a
                    // burst beyond the queue) or failing, it only leaves the other replicas to
                    // learn the call when its sync writes it (the worker records it through the
                    // log too).
                    if shared.try_send(again).is_err() {
                        tracing::debug!(call_id = %report.call_id, "last-call record not shared: the queue is full");
                    }
                }
                if sync.writer.apply(change).await.is_err() {
                    // The report is stored and will sync; only the routing memory missed it.
                    tracing::error!(call_id = %report.call_id, "the index writer has stopped: the call is not remembered for routing");
                }
            }
        }
        tracing::info!(call_id = %report.call_id, client = %mask(&report.client_number), duplicate, "call reported");
        Ok(Response::new(proto::ReportCallResponse {
            call_id: report.call_id,
            duplicate,
        }))
    }

    async fn call_status(
        &self,
        request: Request<proto::GetCallStatusRequest>,
    ) -> Result<Response<proto::GetCallStatusResponse>, Status> {
        let sync = self.sync()?;
        let req = request.into_inner();
        if req.call_id.trim().is_empty() {
            return Err(invalid("call_id", "required").into());
        }
        check_len("call_id", &req.call_id, MAX_CALL_ID_LEN)?;
        let status = sync
            .queue
            .status(&req.call_id)
            .await
            .map_err(|e| queue_error("the call status could not be read", &e))?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no call with call_id {:?} was reported",
                    req.call_id
                ))
            })?;
        Ok(Response::new(calls::status_to_proto(status)))
    }
}

/// A queue failure as the client sees it: a task that died inside the queue is a bug (INTERNAL),
/// anything else is storage that may come back (UNAVAILABLE).
fn queue_error(what: &'static str, e: &crate::sync::StoreError) -> ApiError {
    use crate::sync::{QueueError, StoreError};
    match e {
        StoreError::Sqlite(QueueError::Task(_)) => ApiError::internal(e),
        _ => ApiError::storage(what, e),
    }
}

impl ResolverService {
    fn sync(&self) -> Result<&SyncApi, Status> {
        self.state.sync.as_ref().ok_or_else(|| {
            Status::unimplemented("the post-call sync is not enabled on this server")
        })
    }
}

fn url(base: &str, kind: &str, id: i64) -> String {
    format!("{base}/agent/{kind}/{id}")
}

fn timestamp(secs: i64) -> Option<prost_types::Timestamp> {
    (secs > 0).then_some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

fn agent_to_proto(a: AgentView) -> proto::Agent {
    proto::Agent {
        zendesk_id: a.id,
        name: a.name,
        email: a.email,
        extension: a.extension.unwrap_or_default(),
    }
}

fn ticket_to_proto(base: &str, t: TicketView) -> proto::Ticket {
    proto::Ticket {
        id: t.id,
        status: t.status.to_owned(),
        subject: t.subject,
        url: url(base, "tickets", t.id),
        assignee_id: t.assignee_id,
        updated_at: timestamp(t.updated_at),
    }
}

fn org_to_proto(base: &str, o: OrgView) -> proto::Organization {
    proto::Organization {
        zendesk_id: o.id,
        url: url(base, "organizations", o.id),
        name: o.name,
    }
}

fn customer_to_proto(base: &str, c: CustomerView) -> proto::Customer {
    proto::Customer {
        zendesk_id: c.id,
        url: url(base, "users", c.id),
        name: c.name,
        phone: c.phone.to_string(),
        organization: c.organization.map(|o| org_to_proto(base, o)),
    }
}

/// Converts a routing answer to its proto form.
pub(crate) fn route_to_proto(
    base: &str,
    a: routing::RouteAnswer,
    fresh: Freshness,
) -> proto::RouteCallResponse {
    let decision = match a.decision {
        Decision::RouteToAgent => proto::Decision::RouteToAgent,
        Decision::DefaultRouting => proto::Decision::DefaultRouting,
    };
    let basis = match a.basis {
        Basis::None => proto::Basis::Unspecified,
        Basis::OpenTicket => proto::Basis::OpenTicket,
        Basis::RecentTicket => proto::Basis::RecentTicket,
        Basis::LastCall => proto::Basis::LastCall,
    };
    proto::RouteCallResponse {
        decision: decision as i32,
        basis: basis as i32,
        agent: a.agent.map(agent_to_proto),
        ticket: a.ticket.map(|t| ticket_to_proto(base, t)),
        customer: a.customer.map(|c| customer_to_proto(base, c)),
        reason: a.reason,
        index_age_ms: fresh.age_ms,
        index_state: fresh.state as i32,
    }
}

/// How complete and how old the index behind an answer is.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// Milliseconds since the exports were last read to their end (`index_age_ms`).
    pub age_ms: i64,
    /// `WARMING` during a first start's bootstrap, else `READY` (`index_state`).
    pub state: proto::IndexState,
}

/// Converts a caller-ID answer to its proto form.
pub(crate) fn caller_to_proto(
    base: &str,
    a: routing::CallerAnswer,
    fresh: Freshness,
) -> proto::LookupCallerResponse {
    let contact_url = a
        .customer
        .as_ref()
        .map(|c| url(base, "users", c.id))
        .unwrap_or_default();
    let lead_url = a
        .open_ticket
        .as_ref()
        .map(|t| url(base, "tickets", t.id))
        .unwrap_or_default();
    proto::LookupCallerResponse {
        found: a.found,
        display_name: a.display_name,
        contact_url,
        lead_url,
        customer: a.customer.map(|c| customer_to_proto(base, c)),
        open_ticket: a.open_ticket.map(|t| ticket_to_proto(base, t)),
        index_age_ms: fresh.age_ms,
        index_state: fresh.state as i32,
    }
}

/// Bearer-token check for the Resolver service. With no tokens configured every request passes
/// (config validation allows that only on a loopback listener).
#[derive(Clone)]
pub struct Auth {
    tokens: Arc<[SecretString]>,
    metrics: Option<Arc<Metrics>>,
}

impl Auth {
    /// A check accepting any of `tokens`; an empty list lets every request through.
    pub fn new(tokens: Vec<SecretString>) -> Self {
        Self {
            tokens: tokens.into(),
            metrics: None,
        }
    }

    /// Counts refused requests in `metrics` (the handlers never see them).
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn refuse(&self, status: Status) -> Status {
        if let Some(m) = &self.metrics {
            m.unauthenticated();
        }
        status
    }

    /// Compares against every configured token in constant time, so timing reveals neither which
    /// token nor how much of one matched.
    fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0u8);
        for t in self.tokens.iter() {
            ok |= t.expose_secret().as_bytes().ct_eq(presented);
        }
        ok.into()
    }
}

impl Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.tokens.is_empty() {
            return Ok(request);
        }
        let header = request.metadata().get("authorization").ok_or_else(|| {
            self.refuse(Status::unauthenticated(
                "missing authorization metadata: send `authorization: Bearer <token>`",
            ))
        })?;
        let presented = header.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
            self.refuse(Status::unauthenticated(
                "authorization must be `Bearer <token>`",
            ))
        })?;
        if self.accepts(presented) {
            Ok(request)
        } else {
            Err(self.refuse(Status::unauthenticated("invalid token")))
        }
    }
}

/// Largest request message accepted (a call report with its maps fits easily).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Serves the Resolver (with auth), `grpc.health.v1` and reflection on `listener` until `shutdown`.
/// The rustls server configuration for `server.tls_cert` / `server.tls_key`, checked now (a bad
/// PEM or a key that does not match fails here, at start-up, not at the first connection).
pub(crate) fn tls_config(
    pem: &crate::config::TlsPem,
) -> Result<tonic::transport::ServerTlsConfig, tonic::transport::Error> {
    use secrecy::ExposeSecret as _;
    let identity =
        tonic::transport::Identity::from_pem(&pem.cert, pem.key.expose_secret().as_slice());
    let tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    tonic::transport::Server::builder().tls_config(tls.clone())?;
    Ok(tls)
}

/// Serves the Resolver service, gRPC health and reflection on `listener` (TLS when `tls` is set)
/// until `shutdown` completes; `auth` guards the Resolver service only.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ServiceState>,
    auth: Auth,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor sets are compiled in and valid");
    let resolver = proto::resolver_server::ResolverServer::new(ResolverService::new(state))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    // `Server::tcp_nodelay` is ignored by `serve_with_incoming*`: the accepted sockets must get
    // TCP_NODELAY here, or a small reply can wait for the client's delayed ACK (~40 ms on Linux;
    // measured by benches/load.sh as a 40 ms p50 under h2load).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(tonic::service::interceptor::InterceptedService::new(
            resolver, auth,
        ))
        .add_service(health)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_accepts_only_configured_tokens() {
        let auth = Auth::new(vec![SecretString::from("a-very-long-token-1".to_owned())]);
        assert!(auth.accepts(b"a-very-long-token-1"));
        assert!(!auth.accepts(b"a-very-long-token-2"));
        assert!(!auth.accepts(b""));
    }

    #[test]
    fn storage_errors_show_a_reference_not_the_cause() {
        let cause = crate::sync::StoreError::from(crate::sync::QueueError::Sqlite(
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(5),
                Some("database is locked".into()),
            ),
        ));
        let s: Status = queue_error("the report was not stored", &cause).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(!s.message().contains("locked"), "{}", s.message());
        assert!(s.message().contains("(ref "), "{}", s.message());
        assert!(cause_chain(&cause).contains("database is locked"));
        let s: Status = queue_error(
            "x",
            &crate::sync::QueueError::Task("panicked".into()).into(),
        )
        .into();
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(!s.message().contains("panicked"), "{}", s.message());
    }

    #[test]
    fn status_mapping_keeps_the_field() {
        let s: Status = invalid("caller", "required").into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "caller: required");
    }
}
