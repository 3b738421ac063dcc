//! Zendesk webhooks (DESIGN §9, ZENDESK.md §10): the index fresh within seconds instead of the
//! exports' 60–120 s. The export follower keeps running and repairs whatever a lost webhook missed.
//!
//! - [`verify`]: the HMAC-SHA256 signature and the 5-minute timestamp window.
//! - [`parse`]: bodies (event subscriptions and the trigger template) to [`parse::Change`]s.
//! - [`apply`]: changes into the index through one function, never older than what it holds.
//! - this module: the HTTP endpoint and the applier task; [`install`]: `deskline webhooks install`.
//!
//! # Why the endpoint answers before applying
//! Zendesk times a webhook out after a few seconds and retries, so the handler only verifies,
//! deduplicates and parses, then hands the change to one applier task over a bounded channel and
//! answers 200. The applier may read the entity from Zendesk (user events carry no phone or name),
//! which takes a round trip; doing it in the handler would turn Zendesk latency into retries. One
//! applier in arrival order also keeps a user's events from racing each other. A full channel
//! answers 503 so that Zendesk retries later rather than the change being lost silently.
//!
//! # Invariants
//! - Every request is verified before its body is parsed; the body is never logged (only the
//!   result, the webhook id and the event type, which are not personal data).
//! - A repeated invocation id, or a repeated event id, is answered 200 and not applied again. The
//!   memory is a moka TTL cache (1 h, 100k ids): bounded whatever Zendesk sends.
//! - Body size is capped ([`MAX_BODY_BYTES`], 413) and reading it is timed out ([`READ_TIMEOUT`],
//!   408); no input makes the handler panic (proptests in `verify` and `parse`).

pub(crate) mod apply;
pub mod install;
pub(crate) mod parse;
pub mod verify;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    routing::post,
};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    index::{IndexWriter, SharedIndex},
    metrics::{Metrics, WebhookResult},
    phone::PhoneParser,
    zendesk::{Client, ZendeskError, models::Ticket},
};
use apply::{IndexChange, Verdict, apply_change};
use parse::Change;

/// Zendesk's event bodies are a few KiB; anything this big is not one of them.
pub(crate) const MAX_BODY_BYTES: usize = 256 * 1024;
/// How long reading one request's body may take.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Changes waiting for the applier before the endpoint answers 503.
const QUEUE: usize = 10_000;

/// The endpoint's state.
struct Endpoint {
    /// A request signed with any of these passes (one per installed webhook).
    secrets: Vec<SecretString>,
    seen: moka::sync::Cache<String, ()>,
    tx: mpsc::Sender<Change>,
    metrics: Arc<Metrics>,
}

/// What the applier needs.
pub(crate) struct Applier {
    rx: mpsc::Receiver<Change>,
    client: Client,
    /// For reads (version checks); changes go through `writer`.
    index: SharedIndex,
    writer: IndexWriter,
    parser: PhoneParser,
    versions: apply::SharedVersions,
    metrics: Arc<Metrics>,
}

/// The router serving `POST {path}` and the applier that must run beside it.
pub(crate) fn endpoint(
    path: &str,
    secrets: Vec<SecretString>,
    client: Client,
    writer: IndexWriter,
    parser: PhoneParser,
    metrics: Arc<Metrics>,
    versions: apply::SharedVersions,
) -> (Router, Applier) {
    let (tx, rx) = mpsc::channel(QUEUE);
    versions.refetch_through(tx.clone());
    let state = Arc::new(Endpoint {
        secrets,
        seen: moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(Duration::from_secs(3600))
            .build(),
        tx,
        metrics: metrics.clone(),
    });
    let router = Router::new().route(path, post(receive)).with_state(state);
    let applier = Applier {
        rx,
        client,
        index: writer.index().clone(),
        writer,
        parser,
        versions,
        metrics,
    };
    (router, applier)
}

/// Serves `router` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    h.get(name).map(|v| v.as_bytes())
}

/// A header value fit for a log line (ids only; never the body).
fn log_id(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(64).collect())
        .unwrap_or_default()
}

async fn receive(State(st): State<Arc<Endpoint>>, headers: HeaderMap, body: Body) -> StatusCode {
    let webhook = log_id(&headers, "x-zendesk-webhook-id");
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        st.metrics.webhook(WebhookResult::TooLarge);
        warn!(webhook, "webhook refused: body too large");
        return StatusCode::PAYLOAD_TOO_LARGE;
    }
    let body = match tokio::time::timeout(READ_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES))
        .await
    {
        Err(_) => {
            st.metrics.webhook(WebhookResult::Malformed);
            warn!(webhook, "webhook refused: body not read in time");
            return StatusCode::REQUEST_TIMEOUT;
        }
        Ok(Err(_)) => {
            st.metrics.webhook(WebhookResult::TooLarge);
            warn!(webhook, "webhook refused: body too large or cut off");
            return StatusCode::PAYLOAD_TOO_LARGE;
        }
        Ok(Ok(b)) => b,
    };
    let now = jiff::Timestamp::now().as_second();
    if let Err(e) = verify::verify_any(
        st.secrets.iter().map(|s| s.expose_secret().as_bytes()),
        header(&headers, "x-zendesk-webhook-signature"),
        header(&headers, "x-zendesk-webhook-signature-timestamp"),
        &body,
        now,
    ) {
        let result = match e {
            verify::VerifyError::Stale => WebhookResult::StaleTimestamp,
            _ => WebhookResult::BadSignature,
        };
        st.metrics.webhook(result);
        warn!(webhook, reason = %e, "webhook refused");
        return StatusCode::UNAUTHORIZED;
    }
    let invocation = headers
        .get("x-zendesk-webhook-invocation-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| format!("i:{s}"));
    if invocation.as_ref().is_some_and(|i| st.seen.contains_key(i)) {
        st.metrics.webhook(WebhookResult::Duplicate);
        debug!(webhook, "webhook invocation already seen");
        return StatusCode::OK;
    }
    let parsed = match parse::parse(&body) {
        Ok(p) => p,
        Err(e) => {
            st.metrics.webhook(WebhookResult::Malformed);
            warn!(webhook, reason = %e, "webhook refused: malformed body");
            return StatusCode::BAD_REQUEST;
        }
    };
    let event = parsed.event_id.as_ref().map(|e| format!("e:{e}"));
    if event.as_ref().is_some_and(|e| st.seen.contains_key(e)) {
        st.metrics.webhook(WebhookResult::Duplicate);
        return StatusCode::OK;
    }
    if parsed.change == Change::Ignored {
        st.metrics.webhook(WebhookResult::Ignored);
        return StatusCode::OK;
    }
    match st.tx.try_send(parsed.change) {
        Ok(()) => {
            for id in invocation.into_iter().chain(event) {
                st.seen.insert(id, ());
            }
            debug!(webhook, kind = %parsed.kind, "webhook accepted");
            StatusCode::OK
        }
        Err(_) => {
            st.metrics.webhook(WebhookResult::Overloaded);
            warn!(webhook, "webhook refused: apply queue full");
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl Applier {
    /// Applies changes in arrival order until `shutdown` (what is queued then is left to the
    /// export, which repairs it).
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            let change = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                c = self.rx.recv() => match c {
                    Some(c) => c,
                    None => return Ok(()),
                },
            };
            let result = match self.handle(change).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "webhook change not applied: reading it from Zendesk failed");
                    WebhookResult::FetchFailed
                }
            };
            self.metrics.webhook(result);
        }
    }

    async fn handle(&self, change: Change) -> Result<WebhookResult, ZendeskError> {
        match change {
            Change::Ignored => Ok(WebhookResult::Ignored),
            Change::Ticket(t) => match self.versions.judge_ticket(&self.index, &t) {
                Verdict::Apply => self.ticket(*t).await,
                Verdict::Stale => Ok(WebhookResult::Stale),
                Verdict::Ambiguous => self.fetch_ticket(t.id).await,
            },
            Change::FetchTicket(id) => self.fetch_ticket(id).await,
            Change::FetchUser(id) => self.fetch_user(id).await,
        }
    }

    async fn ticket(&self, t: Ticket) -> Result<WebhookResult, ZendeskError> {
        self.versions.applied_ticket(&t);
        Ok(self.applied(apply_change(&self.writer, &self.parser, IndexChange::Ticket(t)).await))
    }

    /// The writer stops only when the process goes down: the export repairs what was not applied.
    fn applied(&self, r: Result<(), crate::index::WriterStopped>) -> WebhookResult {
        match r {
            Ok(()) => WebhookResult::Applied,
            Err(e) => {
                warn!(error = %e, "webhook change not applied");
                WebhookResult::FetchFailed
            }
        }
    }

    async fn fetch_ticket(&self, id: i64) -> Result<WebhookResult, ZendeskError> {
        let t = match self.client.show_ticket(id).await {
            Ok(t) => t,
            // Gone for good: as deleted.
            Err(e) if e.status() == Some(404) => Ticket {
                id,
                status: Some("deleted".into()),
                ..Ticket::default()
            },
            Err(e) => return Err(e),
        };
        if !self.versions.current_ticket_is_fresh(&self.index, &t) {
            return Ok(WebhookResult::Stale);
        }
        self.ticket(t).await
    }

    async fn fetch_user(&self, id: i64) -> Result<WebhookResult, ZendeskError> {
        let found = self.client.show_many_users(&[id]).await?;
        let Some(user) = found.users.into_iter().find(|u| u.id == id) else {
            let r = apply_change(&self.writer, &self.parser, IndexChange::UserGone(id)).await;
            return Ok(self.applied(r));
        };
        if !self.versions.current_user_is_fresh(&self.index, &user) {
            return Ok(WebhookResult::Stale);
        }
        // A missing `identities` key means "not sideloaded", not "none" (issue 10 item 4).
        let identities = found
            .identities
            .map(|all| all.into_iter().filter(|i| i.user_id == id).collect());
        self.versions.applied_user(&user);
        let r = apply_change(
            &self.writer,
            &self.parser,
            IndexChange::User { user, identities },
        )
        .await;
        Ok(self.applied(r))
    }
}

/// Binds `webhooks.listen`.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("webhooks.listen: cannot listen on {addr}"))
}
