//! The Zendesk REST client: one connection pool, one [`Budget`], auth, retries and the one place
//! where responses are classified into [`ZendeskError`]s (ZENDESK.md §1, §6, §9).
//!
//! Invariants:
//! - Every attempt, retries included, takes the shared budget before it is sent, so the account's
//!   request budget holds whatever the callers do.
//! - A 429 pauses the whole budget for `Retry-After` (60 s when absent or unreadable; its body may be
//!   plain text and is never parsed as JSON) and is retried: Zendesk did nothing with the request.
//! - Transient failures (408, 409, 5xx, timeouts, dropped connections, a 2xx whose body is cut or is
//!   not the JSON we expect) are retried with jittered exponential backoff only for
//!   [`Retry::Idempotent`] requests. A [`Retry::Once`] request is retried only when it certainly never
//!   left this machine (connection refused); otherwise the caller gets the error and decides, because
//!   it alone can check whether the write landed.
//! - 401/403 are [`ZendeskError::Auth`], other 4xx [`ZendeskError::Permanent`] with Zendesk's own
//!   message; neither is retried.
//! - Credentials never appear in `Debug`, logs or errors: the `Authorization` header is marked
//!   sensitive, error texts are built without URLs, and any message that echoes a secret is scrubbed.
//!   URLs are kept out of errors and logs also because search URLs carry a caller's number; logs and
//!   metrics use endpoint templates (`GET /api/v2/users/{id}`) instead.
//! - Pagination links from Zendesk (`next_page`, `links.next`) are followed on *our* base URL (only
//!   their path and query are used), so the credentials are never sent to another host.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use reqwest::{
    Method, StatusCode, Url,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    Budget, Rejection, ZendeskError,
    budget::{NO_RESPONSE, Outcome, RateLimitHeaders},
    models::*,
    requests::{
        CallCreate, OrganizationCreate, TicketCreateJson, TicketUpdate, UserCreate, UserUpdate,
    },
};
use crate::phone::E164;

/// Where an export read starts: the first call of a cursor export takes a start time, later calls
/// the cursor of the previous page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum ExportStart {
    StartTime(i64),
    Cursor(String),
}

/// Whether a request may be repeated by the client on a transient error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Safe to repeat (reads, `create_or_update`, ticket create with an `Idempotency-Key`).
    Idempotent,
    /// Sent at most once after it may have reached Zendesk (a comment, a plain create): a transient
    /// error is returned to the caller, which knows how to check before trying again. 429s and
    /// connection errors before sending are still retried, since Zendesk did nothing.
    Once,
}

/// The client's own options (the app's config converts into them: `Config::client_options`).
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://{subdomain}.zendesk.com` (or the simulator's loopback URL), no trailing slash.
    pub base_url: String,
    /// API token or OAuth.
    pub credentials: Credentials,
    /// The request budget this process may spend, per minute (`zendesk.requests_per_minute`).
    pub requests_per_minute: u32,
    /// The incremental-export budget per minute (10 on every plan, 30 with High Volume).
    pub export_requests_per_minute: u32,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How many times a retryable error is retried inside the client before it is returned.
    pub max_retries: u32,
    /// Zendesk's rate-limit window: 60 s (`zendesk.rate_window_ms`; shorter only against a
    /// simulator whose clock runs faster, as the bootstrap benchmark's).
    pub rate_window: Duration,
}

#[cfg(test)]
impl ClientOptions {
    /// Options for a client of the simulator `sim` as the unit tests use it: its credentials, an
    /// Enterprise budget (700 a minute, 10 exports), a 5 s timeout, 3 retries, Zendesk's minute.
    pub(crate) fn for_sim(sim: &deskline_sim::SimHandle) -> Self {
        Self {
            base_url: sim.url(),
            credentials: Credentials::ApiToken {
                email: sim.email().to_owned(),
                token: sim.token().to_owned().into(),
            },
            requests_per_minute: 700,
            export_requests_per_minute: 10,
            timeout: Duration::from_secs(5),
            max_retries: 3,
            rate_window: Duration::from_secs(60),
        }
    }
}

/// How the client authenticates to Zendesk (ZENDESK.md §1). `Debug` never prints a token.
#[derive(Clone)]
pub enum Credentials {
    /// `{email}/token` + API token, HTTP Basic.
    ApiToken {
        /// The agent's email.
        email: String,
        /// The API token.
        token: SecretString,
    },
    /// OAuth bearer token.
    OAuth {
        /// The access token.
        token: SecretString,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ApiToken { email, .. } => {
                write!(f, "ApiToken {{ email: {email:?}, token: [REDACTED] }}")
            }
            Self::OAuth { .. } => f.write_str("OAuth { token: [REDACTED] }"),
        }
    }
}

/// The first backoff after a transient error; doubled on each retry, ±50% jitter.
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// No single backoff is longer than this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// 429s waited out in a row inside one `request` before `RateLimited` goes back to the caller. They
/// don't use up `max_retries` (Zendesk did nothing), but a caller should learn that the account is
/// saturated rather than wait forever.
const MAX_RATE_LIMIT_RETRIES: u32 = 8;
/// `Retry-After` when the header is missing or unreadable (ZENDESK §6 says seconds).
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A `Retry-After` above this is treated as this: a garbage value must not stall the account for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Zendesk search returns at most 1000 results per query; asking past that is a 422 (ZENDESK §3).
const SEARCH_RESULT_CAP: usize = 1000;
/// `users/show_many` takes at most 100 ids.
const SHOW_MANY_MAX: usize = 100;
/// A list longer than this many pages is a loop in the links, not an account.
const MAX_PAGES: usize = 10_000;
/// Zendesk accepts `Idempotency-Key`s of up to this many characters (ZENDESK.md §4).
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;
/// Error messages taken from a response body are cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// Cheap to clone; every clone shares one connection pool and one budget.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base_url: String,
    budget: Budget,
    max_retries: u32,
    backoff_base_ms: AtomicU64,
    /// Values that must never show in an error text (token, encoded Basic credentials).
    secrets: Vec<SecretString>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.base_url)
            .field("budget", &self.inner.budget)
            .finish_non_exhaustive()
    }
}

/// What one attempt produced, with whether the request may have reached Zendesk.
struct AttemptError {
    error: ZendeskError,
    maybe_sent: bool,
}

impl Client {
    /// Builds the client. Fails (as [`ZendeskError::Local`], nothing was sent) when
    /// the base URL is not an `http(s)` URL or the credentials cannot form a header.
    pub fn new(opts: ClientOptions) -> Result<Self, ZendeskError> {
        let local = |message: String| ZendeskError::Local { message };
        let base_url = opts.base_url.trim_end_matches('/').to_owned();
        let parsed = Url::parse(&base_url)
            .map_err(|e| local(format!("zendesk base URL is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(local(
                "zendesk base URL must be http(s)://host[:port]".to_owned(),
            ));
        }

        let (auth, secrets) = match &opts.credentials {
            Credentials::ApiToken { email, token } => {
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(format!("{email}/token:{}", token.expose_secret()));
                let header = format!("Basic {encoded}");
                (header, vec![token.clone(), SecretString::from(encoded)])
            }
            Credentials::OAuth { token } => (
                format!("Bearer {}", token.expose_secret()),
                vec![token.clone()],
            ),
        };
        let mut auth = HeaderValue::from_str(&auth).map_err(|_| {
            local("zendesk credentials contain characters not allowed in a header".to_owned())
        })?;
        auth.set_sensitive(true);

        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, auth);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("deskline/", env!("CARGO_PKG_VERSION")))
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout.min(Duration::from_secs(10)))
            // Drop idle connections before the server is likely to: a request written onto a
            // connection the server just closed fails "maybe sent", which a `Retry::Once` write
            // must then hand back to its caller.
            .pool_idle_timeout(Duration::from_secs(30))
            // Zendesk's API does not redirect; following one could carry the request elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| local(format!("cannot build the HTTP client: {}", e.without_url())))?;

        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base_url,
                budget: Budget::new(opts.requests_per_minute, opts.export_requests_per_minute)
                    .with_window(opts.rate_window),
                max_retries: opts.max_retries,
                backoff_base_ms: AtomicU64::new(DEFAULT_BACKOFF_BASE.as_millis() as u64),
                secrets,
            }),
        })
    }

    /// The account URL, no trailing slash: agent links are `{base_url}/agent/users/{id}`.
    pub(crate) fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    pub(crate) fn budget(&self) -> &Budget {
        &self.inner.budget
    }

    /// Sets the first backoff delay after a transient error (default 500 ms; doubled per retry,
    /// ±50% jitter). Tests against the simulator shorten it; it applies to every clone.
    pub fn set_backoff_base(&self, base: Duration) {
        self.inner
            .backoff_base_ms
            .store(base.as_millis() as u64, Ordering::Relaxed);
    }

    /// The generic call everything else uses. `path` starts with `/api/v2/`. `export` marks an
    /// incremental-export request (it also takes the export limit).
    pub(crate) async fn request<T: DeserializeOwned + Send + 'static>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        extra_headers: &[(&str, &str)],
        export: bool,
        retry: Retry,
    ) -> Result<T, ZendeskError> {
        let url = self.api_url(path)?;
        let body = body.map(serialize).transpose()?;
        self.send(method, url, body, extra_headers, export, retry)
            .await
    }

    // ---- exports ----
    pub(crate) async fn export_users(
        &self,
        start: &ExportStart,
        include_identities: bool,
        per_page: u32,
    ) -> Result<UsersCursorPage, ZendeskError> {
        let mut params = export_start_params(start);
        params.push(("per_page", per_page.to_string()));
        if include_identities {
            params.push(("include", "identities".to_owned()));
        }
        let url = self.api_url_with("/api/v2/incremental/users/cursor", &params)?;
        self.send(Method::GET, url, None, &[], true, Retry::Idempotent)
            .await
    }

    pub(crate) async fn export_tickets(
        &self,
        start: &ExportStart,
        per_page: u32,
    ) -> Result<TicketsCursorPage, ZendeskError> {
        // Deleted tickets stay in (no `exclude_deleted`): the index must drop them.
        let mut params = export_start_params(start);
        params.push(("per_page", per_page.to_string()));
        let url = self.api_url_with("/api/v2/incremental/tickets/cursor", &params)?;
        self.send(Method::GET, url, None, &[], true, Retry::Idempotent)
            .await
    }

    pub(crate) async fn export_organizations(
        &self,
        start_time: i64,
    ) -> Result<OrganizationsPage, ZendeskError> {
        let url = self.api_url_with(
            "/api/v2/incremental/organizations",
            &[("start_time", start_time.to_string())],
        )?;
        self.send(Method::GET, url, None, &[], true, Retry::Idempotent)
            .await
    }

    /// `users/show_many?ids=…&include=identities`, at most 100 ids (more is refused locally with a
    /// `Permanent` 400, as Zendesk would answer `TooManyValues`).
    pub(crate) async fn show_many_users(
        &self,
        ids: &[i64],
    ) -> Result<UsersWithIdentities, ZendeskError> {
        if ids.is_empty() {
            return Ok(UsersWithIdentities::default());
        }
        if ids.len() > SHOW_MANY_MAX {
            return Err(ZendeskError::Permanent {
                status: 400,
                reason: Rejection::TooManyValues,
                message: format!(
                    "TooManyValues: show_many takes at most {SHOW_MANY_MAX} ids, got {} (not sent)",
                    ids.len()
                ),
            });
        }
        let ids = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let url = self.api_url_with(
            "/api/v2/users/show_many",
            &[("ids", ids), ("include", "identities".to_owned())],
        )?;
        self.send(Method::GET, url, None, &[], false, Retry::Idempotent)
            .await
    }

    /// One page of `GET /api/v2/search/export?query=…&filter[type]=…&page[size]=…` (ZENDESK.md
    /// §8), after `after` when given. It counts against the account budget only: its own limit
    /// (100 a minute) is the caller's to keep (the warm-up bootstrap paces itself), since only the
    /// bootstrap uses it.
    pub async fn search_export<T: DeserializeOwned + Send + 'static>(
        &self,
        filter_type: &str,
        query: &str,
        after: Option<&str>,
        page_size: u32,
    ) -> Result<SearchExportPage<T>, ZendeskError> {
        let mut params = vec![
            ("query", query.to_owned()),
            ("filter[type]", filter_type.to_owned()),
            ("page[size]", page_size.to_string()),
        ];
        if let Some(c) = after {
            params.push(("page[after]", c.to_owned()));
        }
        let url = self.api_url_with("/api/v2/search/export", &params)?;
        self.send(Method::GET, url, None, &[], false, Retry::Idempotent)
            .await
    }

    // ---- reads ----
    /// `GET /api/v2/users/me`: the authenticated user (the credentials check of `deskline check`).
    pub async fn me(&self) -> Result<User, ZendeskError> {
        let env: UserEnvelope = self.get("/api/v2/users/me").await?;
        Ok(env.user)
    }

    /// Every agent and admin (all pages).
    pub(crate) async fn list_agents(&self) -> Result<Vec<User>, ZendeskError> {
        let url = self.api_url_with(
            "/api/v2/users",
            &[
                ("role[]", "agent".to_owned()),
                ("role[]", "admin".to_owned()),
                ("per_page", "100".to_owned()),
            ],
        )?;
        self.collect_pages(url, "users", usize::MAX).await
    }

    /// End-users whose phone matches, via `search.json?query=role:end-user phone:*{digits}`.
    /// Follows the offset pages up to Zendesk's 1000-result cap. Search lags behind writes by up to
    /// a few minutes (ZENDESK §3): an empty answer does not prove there is no such user.
    pub(crate) async fn search_users_by_phone(
        &self,
        phone: E164,
    ) -> Result<Vec<User>, ZendeskError> {
        let query = format!("role:end-user phone:*{}", phone.digits());
        let url = self.api_url_with(
            "/api/v2/search",
            &[("query", query), ("per_page", "100".to_owned())],
        )?;
        let results: Vec<Value> = self
            .collect_pages(url, "results", SEARCH_RESULT_CAP)
            .await?;
        results
            .into_iter()
            .filter(|r| r.get("result_type").and_then(Value::as_str) == Some("user"))
            .map(|r| serde_json::from_value::<User>(r).map_err(malformed))
            .collect()
    }

    pub(crate) async fn show_user(&self, id: i64) -> Result<User, ZendeskError> {
        let env: UserEnvelope = self.get(&format!("/api/v2/users/{id}")).await?;
        Ok(env.user)
    }

    pub(crate) async fn user_identities(
        &self,
        user_id: i64,
    ) -> Result<Vec<Identity>, ZendeskError> {
        let url = self.api_url_with(
            &format!("/api/v2/users/{user_id}/identities"),
            &[("page[size]", "100".to_owned())],
        )?;
        self.collect_pages(url, "identities", usize::MAX).await
    }

    pub(crate) async fn show_ticket(&self, id: i64) -> Result<Ticket, ZendeskError> {
        let env: TicketEnvelope = self.get(&format!("/api/v2/tickets/{id}")).await?;
        Ok(env.ticket)
    }

    /// Tickets requested by the user (`users/{id}/tickets/requested`), all pages.
    pub(crate) async fn requested_tickets(
        &self,
        user_id: i64,
    ) -> Result<Vec<Ticket>, ZendeskError> {
        let url = self.api_url_with(
            &format!("/api/v2/users/{user_id}/tickets/requested"),
            &[("per_page", "100".to_owned())],
        )?;
        self.collect_pages(url, "tickets", usize::MAX).await
    }

    pub(crate) async fn ticket_comments(
        &self,
        ticket_id: i64,
    ) -> Result<Vec<Comment>, ZendeskError> {
        let url = self.api_url_with(
            &format!("/api/v2/tickets/{ticket_id}/comments"),
            &[("per_page", "100".to_owned())],
        )?;
        self.collect_pages(url, "comments", usize::MAX).await
    }

    pub(crate) async fn ticket_fields(&self) -> Result<Vec<FieldDef>, ZendeskError> {
        let url = self.api_url("/api/v2/ticket_fields")?;
        self.collect_pages(url, "ticket_fields", usize::MAX).await
    }

    pub(crate) async fn user_fields(&self) -> Result<Vec<FieldDef>, ZendeskError> {
        let url = self.api_url("/api/v2/user_fields")?;
        self.collect_pages(url, "user_fields", usize::MAX).await
    }

    pub(crate) async fn organization_fields(&self) -> Result<Vec<FieldDef>, ZendeskError> {
        let url = self.api_url("/api/v2/organization_fields")?;
        self.collect_pages(url, "organization_fields", usize::MAX)
            .await
    }

    // ---- writes ----
    /// `POST users/create_or_update` with `{"user": …}`: matches on external_id, so it is safe to
    /// repeat.
    pub(crate) async fn create_or_update_user(
        &self,
        user: &UserCreate,
    ) -> Result<User, ZendeskError> {
        let env: UserEnvelope = self
            .write(
                Method::POST,
                "/api/v2/users/create_or_update",
                enveloped("user", user)?,
                &[],
                Retry::Idempotent,
            )
            .await?;
        Ok(env.user)
    }

    /// `PUT users/{id}` with `{"user": …}`. Setting the same fields twice gives the same user, so it
    /// is retried like a read.
    pub(crate) async fn update_user(
        &self,
        id: i64,
        user: &UserUpdate,
    ) -> Result<User, ZendeskError> {
        let env: UserEnvelope = self
            .write(
                Method::PUT,
                &format!("/api/v2/users/{id}"),
                enveloped("user", user)?,
                &[],
                Retry::Idempotent,
            )
            .await?;
        Ok(env.user)
    }

    /// `POST organizations/create_or_update` with `{"organization": …}` (matches on external_id).
    pub(crate) async fn create_or_update_organization(
        &self,
        organization: &OrganizationCreate,
    ) -> Result<Organization, ZendeskError> {
        let env: OrganizationEnvelope = self
            .write(
                Method::POST,
                "/api/v2/organizations/create_or_update",
                enveloped("organization", organization)?,
                &[],
                Retry::Idempotent,
            )
            .await?;
        Ok(env.organization)
    }

    /// `POST tickets` with `{"ticket": …}` and the `Idempotency-Key` header. Zendesk replays the
    /// first response for a repeated key and body (for 2 hours), so this is retried like a read.
    /// The body is sent exactly as `ticket` holds it (see [`TicketCreateJson`]). A key that is
    /// empty or longer than 255 characters is refused here, unsent.
    pub(crate) async fn create_ticket(
        &self,
        ticket: &TicketCreateJson,
        idempotency_key: &str,
    ) -> Result<Ticket, ZendeskError> {
        let chars = idempotency_key.chars().count();
        if chars == 0 || chars > MAX_IDEMPOTENCY_KEY_CHARS {
            return Err(ZendeskError::Local {
                message: format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters, not {chars} (not sent)"
                ),
            });
        }
        let env: TicketEnvelope = self
            .write(
                Method::POST,
                "/api/v2/tickets",
                enveloped_raw("ticket", ticket.as_str().as_bytes()),
                &[("Idempotency-Key", idempotency_key)],
                Retry::Idempotent,
            )
            .await?;
        Ok(env.ticket)
    }

    /// `PUT tickets/{id}` with `{"ticket": …}` (a comment). Sent once: see [`Retry::Once`].
    pub(crate) async fn update_ticket(
        &self,
        id: i64,
        ticket: &TicketUpdate,
    ) -> Result<Ticket, ZendeskError> {
        let env: TicketEnvelope = self
            .write(
                Method::PUT,
                &format!("/api/v2/tickets/{id}"),
                enveloped("ticket", ticket)?,
                &[],
                Retry::Once,
            )
            .await?;
        Ok(env.ticket)
    }

    /// `POST calls` (Talk Partner Edition) with `{"call": …}`; returns the created record. Sent
    /// once: see [`Retry::Once`].
    pub(crate) async fn create_call(&self, call: &CallCreate) -> Result<Call, ZendeskError> {
        let env: CallEnvelope = self
            .write(
                Method::POST,
                "/api/v2/calls",
                enveloped("call", call)?,
                &[],
                Retry::Once,
            )
            .await?;
        Ok(env.call)
    }

    // ---- internals ----

    /// A write with an already serialized body.
    async fn write<T: DeserializeOwned + Send + 'static>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        extra_headers: &[(&str, &str)],
        retry: Retry,
    ) -> Result<T, ZendeskError> {
        let url = self.api_url(path)?;
        self.send(method, url, Some(body), extra_headers, false, retry)
            .await
    }

    async fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
    ) -> Result<T, ZendeskError> {
        self.request(Method::GET, path, None, &[], false, Retry::Idempotent)
            .await
    }

    /// `base_url` + `path` (which may carry its own query string).
    fn api_url(&self, path: &str) -> Result<Url, ZendeskError> {
        if !path.starts_with("/api/v2/") {
            return Err(ZendeskError::Local {
                message: format!(
                    "request path must start with /api/v2/ (got {:?}, not sent)",
                    endpoint_template(&Method::GET, path).trim_start_matches("GET ")
                ),
            });
        }
        Url::parse(&format!("{}{}", self.inner.base_url, path)).map_err(|e| ZendeskError::Local {
            message: format!("invalid request path: {e} (not sent)"),
        })
    }

    /// [`Self::api_url`] with URL-encoded query parameters.
    fn api_url_with(&self, path: &str, params: &[(&str, String)]) -> Result<Url, ZendeskError> {
        let mut url = self.api_url(path)?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in params {
                q.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// A pagination link from Zendesk, rebased on our base URL: only its path and query are kept,
    /// so the credentials go nowhere else whatever host the link names.
    fn follow_link(&self, link: &str) -> Result<Url, ZendeskError> {
        let parsed = Url::parse(link)
            .or_else(|_| Url::parse(&self.inner.base_url).and_then(|b| b.join(link)))
            .map_err(|_| malformed("a pagination link is not a URL"))?;
        if !parsed.path().starts_with("/api/v2/") {
            return Err(malformed("a pagination link leaves /api/v2/"));
        }
        let mut url = self.api_url(parsed.path())?;
        url.set_query(parsed.query());
        Ok(url)
    }

    /// Follows offset (`next_page`) or cursor (`meta.has_more` + `links.next`) pagination from
    /// `first`, collecting the `key` array of every page, up to `cap` items.
    async fn collect_pages<T: DeserializeOwned + Send + 'static>(
        &self,
        first: Url,
        key: &str,
        cap: usize,
    ) -> Result<Vec<T>, ZendeskError> {
        let mut out = Vec::new();
        let mut url = first;
        for _ in 0..MAX_PAGES {
            let mut page: Value = self
                .send(
                    Method::GET,
                    url.clone(),
                    None,
                    &[],
                    false,
                    Retry::Idempotent,
                )
                .await?;
            let items = match page.get_mut(key).map(Value::take) {
                Some(Value::Array(items)) => items,
                Some(Value::Null) | None => Vec::new(),
                Some(_) => return Err(malformed(format!("`{key}` is not an array"))),
            };
            for item in items {
                if out.len() >= cap {
                    return Ok(out);
                }
                out.push(serde_json::from_value(item).map_err(malformed)?);
            }
            if out.len() >= cap {
                return Ok(out);
            }
            let Some(next) = next_link(&page) else {
                return Ok(out);
            };
            let next = self.follow_link(next)?;
            if next == url {
                return Err(malformed("a pagination link points at the same page"));
            }
            url = next;
        }
        Err(malformed("more pages than any account has"))
    }

    /// Sends with the budget, the retry policy and the classification.
    async fn send<T: DeserializeOwned + Send + 'static>(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        extra_headers: &[(&str, &str)],
        export: bool,
        retry: Retry,
    ) -> Result<T, ZendeskError> {
        let endpoint = endpoint_template(&method, url.path());
        let mut headers = HeaderMap::new();
        for (name, value) in extra_headers {
            let name = HeaderName::from_bytes(name.as_bytes());
            let value = HeaderValue::from_str(value);
            match (name, value) {
                (Ok(n), Ok(v)) => {
                    headers.append(n, v);
                }
                _ => {
                    return Err(ZendeskError::Local {
                        message: "an extra header is not a valid HTTP header (not sent)".to_owned(),
                    });
                }
            }
        }
        if body.is_some() || !matches!(method, Method::GET | Method::HEAD) {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }

        let mut transient_retries = 0u32;
        let mut rate_limit_retries = 0u32;
        loop {
            let permit = self.inner.budget.acquire(export).await;
            let mut req = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let err = match self.attempt::<T>(req, &endpoint).await {
                Ok(v) => {
                    permit.finish(Outcome::Admitted);
                    return Ok(v);
                }
                Err(e) => e,
            };
            if let ZendeskError::RateLimited { retry_after } = &err.error {
                // Paused before the probe (if this was one) is resolved, so nobody slips through.
                self.inner
                    .budget
                    .pause_until(tokio::time::Instant::now() + *retry_after);
            }
            permit.finish(rate_limit_outcome(&err.error));
            match &err.error {
                ZendeskError::RateLimited { retry_after } => {
                    if rate_limit_retries >= MAX_RATE_LIMIT_RETRIES {
                        return Err(err.error);
                    }
                    rate_limit_retries += 1;
                    tracing::info!(
                        endpoint = %endpoint,
                        retry_after_ms = retry_after.as_millis() as u64,
                        "Zendesk rate limit hit; pausing the account's requests"
                    );
                }
                ZendeskError::Transient { .. } => {
                    let may_repeat = retry == Retry::Idempotent || !err.maybe_sent;
                    if !may_repeat || transient_retries >= self.inner.max_retries {
                        return Err(err.error);
                    }
                    let delay = self.backoff(transient_retries);
                    transient_retries += 1;
                    tracing::warn!(
                        endpoint = %endpoint,
                        attempt = transient_retries,
                        delay_ms = delay.as_millis() as u64,
                        error = %err.error,
                        "transient Zendesk error; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                ZendeskError::Auth { .. }
                | ZendeskError::Permanent { .. }
                | ZendeskError::Local { .. } => {
                    return Err(err.error);
                }
            }
        }
    }

    /// One HTTP exchange: the parsed body of a 2xx, or the classified error.
    async fn attempt<T: DeserializeOwned + Send + 'static>(
        &self,
        req: reqwest::RequestBuilder,
        endpoint: &str,
    ) -> Result<T, AttemptError> {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.inner.budget.record_response(endpoint, NO_RESPONSE);
                return Err(AttemptError {
                    maybe_sent: !e.is_connect(),
                    error: self.transport_error(e, None),
                });
            }
        };
        let status = resp.status();
        self.inner.budget.record_response(endpoint, status.as_u16());
        if status != StatusCode::TOO_MANY_REQUESTS {
            // A 429's own headers say "0 left" without a reset; its Retry-After governs instead.
            self.inner
                .budget
                .observe(rate_limit_headers(resp.headers()));
        }
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.bytes().await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            // The body (often plain text) is not needed: Retry-After says all.
            return Err(AttemptError {
                error: ZendeskError::RateLimited {
                    retry_after: parse_retry_after(retry_after.as_deref()),
                },
                maybe_sent: true,
            });
        }
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                return Err(AttemptError {
                    error: self.transport_error(e, Some(status.as_u16())),
                    maybe_sent: true,
                });
            }
        };
        if status.is_success() {
            let parsed = if bytes.len() > BLOCKING_PARSE_BYTES {
                // An export page (over a megabyte) takes milliseconds to decode: off the runtime's
                // workers, which also serve the gRPC answers.
                tokio::task::spawn_blocking(move || parse_body(&bytes))
                    .await
                    .unwrap_or_else(|e| Err(malformed(format!("decoding task failed: {e}"))))
            } else {
                parse_body(&bytes)
            };
            return parsed.map_err(|error| AttemptError {
                error,
                maybe_sent: true,
            });
        }
        let code = status.as_u16();
        let message = self.scrub(&zendesk_message(&bytes, status));
        let reason = rejection(code, &bytes);
        let error = match code {
            401 | 403 => ZendeskError::Auth {
                status: code,
                message,
            },
            // 409: a conflicting concurrent update; Zendesk asks to try again (DESIGN §4).
            408 | 409 | 500..=599 => ZendeskError::Transient {
                status: Some(code),
                message,
            },
            _ => ZendeskError::Permanent {
                status: code,
                reason,
                message,
            },
        };
        Err(AttemptError {
            error,
            maybe_sent: true,
        })
    }

    /// A transport failure as a `Transient` error: no URL (it may carry a phone number), the cause
    /// chain kept for the operator, any secret scrubbed.
    fn transport_error(&self, e: reqwest::Error, status: Option<u16>) -> ZendeskError {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "could not connect"
        } else if e.is_body() || e.is_decode() {
            "response body interrupted"
        } else {
            "request failed"
        };
        let mut message = what.to_owned();
        let e = e.without_url();
        let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        ZendeskError::Transient {
            status,
            message: self.scrub(&message),
        }
    }

    fn backoff(&self, retry: u32) -> Duration {
        let base = Duration::from_millis(self.inner.backoff_base_ms.load(Ordering::Relaxed));
        crate::clock::jittered(crate::clock::exponential(base, retry, MAX_BACKOFF))
    }

    fn scrub(&self, message: &str) -> String {
        let mut out = message.to_owned();
        for s in &self.inner.secrets {
            let s = s.expose_secret();
            // Very short secrets would scrub innocent text; they are not real tokens anyway.
            if s.len() >= 4 && out.contains(s) {
                out = out.replace(s, "[REDACTED]");
            }
        }
        out
    }
}

#[derive(Deserialize)]
struct UserEnvelope {
    user: User,
}

#[derive(Deserialize)]
struct TicketEnvelope {
    ticket: Ticket,
}

#[derive(Deserialize)]
struct OrganizationEnvelope {
    organization: Organization,
}

#[derive(Deserialize)]
struct CallEnvelope {
    call: Call,
}

fn serialize(body: &impl Serialize) -> Result<Vec<u8>, ZendeskError> {
    serde_json::to_vec(body).map_err(|e| ZendeskError::Local {
        message: format!("cannot serialize the request body: {e} (not sent)"),
    })
}

/// `{"<key>":<body>}`, compact, as `serde_json` writes it.
fn enveloped(key: &'static str, body: &impl Serialize) -> Result<Vec<u8>, ZendeskError> {
    Ok(enveloped_raw(key, &serialize(body)?))
}

/// `{"<key>":<json>}` around JSON text that is sent unchanged. `key` is one of our own envelope
/// names (plain ASCII, nothing to escape).
fn enveloped_raw(key: &'static str, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + key.len() + 5);
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(json);
    out.push(b'}');
    out
}

fn export_start_params(start: &ExportStart) -> Vec<(&'static str, String)> {
    match start {
        ExportStart::StartTime(t) => vec![("start_time", t.to_string())],
        ExportStart::Cursor(c) => vec![("cursor", c.clone())],
    }
}

/// The link to the next page: cursor style (`meta.has_more` with `links.next`) when the page has a
/// `meta`, offset style (`next_page`) otherwise.
fn next_link(page: &Value) -> Option<&str> {
    if let Some(has_more) = page.pointer("/meta/has_more") {
        if has_more.as_bool() != Some(true) {
            return None;
        }
        return page.pointer("/links/next").and_then(Value::as_str);
    }
    page.get("next_page")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn malformed(e: impl std::fmt::Display) -> ZendeskError {
    ZendeskError::Transient {
        status: None,
        message: format!("malformed response: {e}"),
    }
}

/// What an attempt's end says about the account's rate limit (see [`Outcome`]).
fn rate_limit_outcome(e: &ZendeskError) -> Outcome {
    match e {
        ZendeskError::RateLimited { .. } => Outcome::RateLimited,
        // A 5xx or a timeout may come from before the limit is checked; a 409 or a cut 2xx
        // passed it.
        ZendeskError::Transient {
            status: Some(s), ..
        } if *s < 500 && *s != 408 => Outcome::Admitted,
        ZendeskError::Transient { .. } => Outcome::Unknown,
        _ => Outcome::Admitted,
    }
}

/// Zendesk's rate-limit headers (ZENDESK.md §6); unreadable values count as absent.
fn rate_limit_headers(h: &HeaderMap) -> RateLimitHeaders {
    let num = |name: &str| -> Option<u32> {
        h.get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .map(|n| n.min(u64::from(u32::MAX)) as u32)
    };
    let min = |a: Option<u32>, b: Option<u32>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    RateLimitHeaders {
        limit: min(num("ratelimit-limit"), num("x-rate-limit")),
        remaining: min(num("ratelimit-remaining"), num("x-rate-limit-remaining")),
        reset: num("ratelimit-reset").map(|s| Duration::from_secs(u64::from(s))),
    }
}

/// Bodies larger than this are decoded on the blocking pool.
const BLOCKING_PARSE_BYTES: usize = 64 * 1024;

/// Parses a 2xx body into `T`. An empty body (204) reads as `null`. A body that does not parse is a
/// transient error (a cut connection looks like this); the error names the JSON path, never content.
fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ZendeskError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        bytes
    };
    // Tracking the path costs a third more on export pages; it is only needed to explain a failure.
    if let Ok(v) = serde_json::from_slice(bytes) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            malformed(inner)
        } else {
            malformed(format!("at {path}: {inner}"))
        }
    })
}

/// `Retry-After` as seconds (integer or decimal) or an HTTP date; 60 s when absent or unreadable,
/// at least 1 s, at most an hour.
fn parse_retry_after(value: Option<&str>) -> Duration {
    let Some(v) = value.map(str::trim) else {
        return DEFAULT_RETRY_AFTER;
    };
    let parsed = if let Ok(secs) = v.parse::<f64>() {
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e6)))
    } else {
        jiff::fmt::rfc2822::parse(v).ok().map(|zdt| {
            let secs = (zdt.timestamp() - jiff::Timestamp::now()).as_secs().max(0);
            Duration::from_secs(secs as u64)
        })
    };
    parsed
        .unwrap_or(DEFAULT_RETRY_AFTER)
        .clamp(Duration::from_secs(1), MAX_RETRY_AFTER)
}

/// `GET /api/v2/users/{id}`: the method and the path with every id-like segment (any segment with a
/// digit, except the `v2` version) replaced, query and `.json` dropped. Low cardinality for metrics
/// and logs; never an id or a phone number.
pub(crate) fn endpoint_template(method: &Method, path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.strip_suffix(".json").unwrap_or(path);
    let mut out = String::with_capacity(path.len() + 8);
    out.push_str(method.as_str());
    out.push(' ');
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let is_version =
            i == 2 && seg.starts_with('v') && seg[1..].bytes().all(|b| b.is_ascii_digit());
        if !is_version && seg.bytes().any(|b| b.is_ascii_digit()) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
    }
    out
}

/// Zendesk's error text, read tolerantly: JSON `error` / `description` / `details` (flattened to
/// `RecordInvalid: Record validation errors (status: Status closed prevents ticket update)`),
/// OAuth's `error_description`, the JSON:API `errors` list, else the body as text (tags dropped,
/// whitespace collapsed), always cut to a sane length.
fn zendesk_message(body: &[u8], status: StatusCode) -> String {
    let fallback = || {
        status
            .canonical_reason()
            .map_or_else(|| format!("HTTP {}", status.as_u16()), str::to_owned)
    };
    let message = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => {
            json_message(&obj).unwrap_or_else(|| Value::Object(obj).to_string())
        }
        Ok(Value::String(s)) => s,
        Ok(other) if !other.is_null() => other.to_string(),
        _ => text_message(&String::from_utf8_lossy(body)),
    };
    let message = truncate(message.trim(), MAX_MESSAGE_CHARS);
    if message.is_empty() {
        fallback()
    } else {
        message
    }
}

fn json_message(obj: &serde_json::Map<String, Value>) -> Option<String> {
    let text = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Value::Object(o) => {
                // Some endpoints nest it: {"error": {"title": …, "message": …}}.
                let parts: Vec<&str> = ["title", "message"]
                    .iter()
                    .filter_map(|k| o.get(*k).and_then(Value::as_str))
                    .collect();
                (!parts.is_empty()).then(|| parts.join(": "))
            }
            _ => None,
        }
    };
    let mut head: Vec<String> = Vec::new();
    head.extend(text(obj.get("error")));
    head.extend(text(obj.get("description")).or_else(|| text(obj.get("error_description"))));
    head.extend(text(obj.get("message")));
    let mut message = head.join(": ");

    if let Some(Value::Object(details)) = obj.get("details") {
        let mut parts = Vec::new();
        for (field, v) in details {
            let items: Vec<&Value> = match v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for item in items {
                let d = match item {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o
                        .get("description")
                        .or_else(|| o.get("error"))
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    _ => None,
                };
                if let Some(d) = d {
                    parts.push(format!("{field}: {d}"));
                }
            }
        }
        if !parts.is_empty() {
            if message.is_empty() {
                message = parts.join("; ");
            } else {
                message = format!("{message} ({})", parts.join("; "));
            }
        }
    }

    if message.is_empty()
        && let Some(Value::Array(errors)) = obj.get("errors")
    {
        let parts: Vec<String> = errors
            .iter()
            .filter_map(|e| {
                let t: Vec<&str> = ["code", "title", "detail"]
                    .iter()
                    .filter_map(|k| e.get(*k).and_then(Value::as_str))
                    .collect();
                (!t.is_empty()).then(|| t.join(": "))
            })
            .collect();
        message = parts.join("; ");
    }
    (!message.is_empty()).then_some(message)
}

/// What a 4xx means (ZENDESK.md §9), from the `error` code and `details`, never from the
/// human-readable descriptions except the closed-ticket one, which carries no code of its own.
fn rejection(status: u16, body: &[u8]) -> Rejection {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Body {
        error: Value,
        details: serde_json::Map<String, Value>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Detail {
        error: Option<String>,
        description: Option<String>,
    }
    let body: Body = serde_json::from_slice(body).unwrap_or_default();
    let code = body.error.as_str().unwrap_or("");
    let details = |field: &str| -> Vec<Detail> {
        match body.details.get(field) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|i| serde_json::from_value(i.clone()).ok())
                .collect(),
            _ => Vec::new(),
        }
    };
    if status == 404 || code == "RecordNotFound" {
        return Rejection::NotFound;
    }
    match code {
        "IdempotentRequestError" => return Rejection::IdempotencyConflict,
        "TooManyValues" => return Rejection::TooManyValues,
        _ => {}
    }
    if status == 422 {
        let closed = details("status").iter().any(|d| {
            d.description
                .as_deref()
                .is_some_and(|t| t.to_ascii_lowercase().contains("closed"))
        });
        if closed {
            return Rejection::TicketClosed;
        }
        for field in body.details.keys() {
            let duplicate = details(field)
                .iter()
                .any(|d| matches!(d.error.as_deref(), Some("DuplicateValue" | "taken")));
            if duplicate {
                return Rejection::Duplicate {
                    field: field.clone(),
                };
            }
        }
    }
    Rejection::Other
}

/// Plain text or an HTML error page, reduced to readable text.
fn text_message(body: &str) -> String {
    let mut out = String::with_capacity(body.len().min(4 * MAX_MESSAGE_CHARS));
    let mut in_tag = false;
    let mut skip_until: Option<&str> = None;
    let lower = body.to_ascii_lowercase();
    let mut i = 0;
    let bytes = body.as_bytes();
    while i < bytes.len() {
        if let Some(end) = skip_until {
            match lower[i..].find(end) {
                Some(p) => {
                    i += p + end.len();
                    skip_until = None;
                    continue;
                }
                None => break,
            }
        }
        let c = body[i..].chars().next().unwrap_or(' ');
        if c == '<' {
            if lower[i..].starts_with("<script") {
                skip_until = Some("</script>");
            } else if lower[i..].starts_with("<style") {
                skip_until = Some("</style>");
            } else {
                in_tag = true;
            }
            out.push(' ');
        } else if c == '>' && in_tag {
            in_tag = false;
        } else if !in_tag {
            out.push(c);
        }
        i += c.len_utf8();
        if out.len() > 8 * MAX_MESSAGE_CHARS {
            break;
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((idx, _)) => format!("{}…", &s[..idx]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
