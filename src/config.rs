//! Typed configuration (DESIGN §6): one TOML file, every key also settable as
//! `DESKLINE_SECTION__KEY` in the environment (the environment wins).
//!
//! Every problem is reported with the key it concerns (`zendesk.url: …`), all of them at once, and
//! start-up stops. Secrets are [`SecretString`]s, so `Debug` and logs never show them.
//!
//! One schema, two sources: the TOML file and the environment are merged into one tree (`Node`)
//! before serde sees it, and an environment value stays a raw string in that tree until the typed
//! schema asks for something (a number, a bool, a list, a table): its type comes from the field it
//! lands in, so a new key needs no entry in any list to be settable from the environment. Lists
//! take `a,b` or a TOML array, tables a TOML inline table.
//!
//! Why not a layering crate such as `figment`: its environment provider guesses a value's type from
//! its text (a numeric token or a `0102` extension becomes a number), comma lists would need a
//! hand-written deserializer per field, and a serde pass stops at the first error either way. To
//! report every error, a failed pass names its key, that value is taken out (its default applies) or
//! replaced by a neutral hole, and the pass runs again; problems caused by an already reported key
//! are not reported twice.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::{
    Deserialize,
    de::{IntoDeserializer, Visitor},
};

use crate::phone::PhoneParser;

/// A configuration problem, always naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file that failed.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// One key is missing, unknown or has a bad value.
    #[error("{key}: {message}")]
    Key {
        /// The dotted key, e.g. `zendesk.url`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// Several problems found at once, each a [`ConfigError::Key`].
    #[error("{} problems:{}", .0.len(), .0.iter().map(|e| format!("\n  {e}")).collect::<String>())]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    #[cfg(test)]
    /// The keys named, in the order reported.
    pub(crate) fn keys(&self) -> Vec<&str> {
        match self {
            Self::Key { key, .. } => vec![key.as_str()],
            Self::Several(all) => all.iter().flat_map(Self::keys).collect(),
            Self::Read { .. } | Self::Syntax { .. } => Vec::new(),
        }
    }
}

fn key_err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration (DESIGN §6): one TOML file, each key overridable as `DESKLINE_SECTION__KEY`.
/// Unknown keys are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: gRPC, metrics, TLS and shutdown.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[zendesk]`: the account, its credentials and the request budget (required).
    pub zendesk: ZendeskConfig,
    /// `[storage]`: data directory, retention, optional PostgreSQL.
    #[serde(default)]
    pub storage: StorageConfig,
    /// `[phone]`: how numbers are normalized.
    #[serde(default)]
    pub phone: PhoneConfig,
    /// `[index]`: the export follower.
    #[serde(default)]
    pub index: IndexConfig,
    /// `[routing]`: the extension directory and the recent-ticket fallback.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[sync]`: what the post-call sync creates and how.
    #[serde(default)]
    pub sync: SyncConfig,
    /// `[webhooks]`: the Zendesk webhook endpoint (off by default).
    #[serde(default)]
    pub webhooks: WebhooksConfig,
}

/// `[server]`: where and how the gRPC service listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `server.listen`: the gRPC address (default `127.0.0.1:50051`).
    pub listen: SocketAddr,
    /// Accepted bearer tokens; empty means no authentication (allowed on loopback only).
    pub tokens: Vec<SecretString>,
    /// `server.metrics_listen`: HTTP address for Prometheus `/metrics` and `/healthz`; `None` = off.
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate chain for gRPC over TLS; set together with `tls_key`. Without both, the
    /// server speaks plain HTTP/2 (fine on loopback or behind a TLS-terminating proxy).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// One deadline for the whole ordered shutdown (RPCs, tasks, snapshot), in seconds.
    pub shutdown_grace_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50051).into(),
            tokens: Vec::new(),
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            shutdown_grace_seconds: 20,
        }
    }
}

/// `[zendesk]`: the account and how to authenticate (API token or OAuth, exactly one).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZendeskConfig {
    /// `zendesk.url`: the account URL, `https://{subdomain}.zendesk.com`; plain `http` only to loopback.
    pub url: String,
    /// `zendesk.email`: the agent email for API token auth (`{email}/token`); needed with `token`.
    pub email: Option<String>,
    /// `zendesk.token`: the API token; or give `token_file`.
    pub token: Option<SecretString>,
    /// `zendesk.token_file`: a file holding the API token (instead of `token`).
    pub token_file: Option<PathBuf>,
    /// `zendesk.oauth_token`: an OAuth bearer token, instead of email + API token.
    pub oauth_token: Option<SecretString>,
    /// `zendesk.oauth_token_file`: a file holding the OAuth token (instead of `oauth_token`).
    pub oauth_token_file: Option<PathBuf>,
    /// `zendesk.requests_per_minute`: the API budget this service may spend (default 200).
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    /// Incremental-export requests per minute: 10 on every plan, 30 with the High Volume add-on.
    #[serde(default = "default_export_rpm")]
    pub export_requests_per_minute: u32,
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// `zendesk.replicas`: how many replicas share the account's budget (with PostgreSQL). While
    /// PostgreSQL is unreachable each replica spends at most the limits divided by this, so that
    /// many replicas together stay within the account's budget (default 3).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// `zendesk.search_export_requests_per_minute`: the search export's own limit, used by the
    /// first start's bootstrap (DESIGN §10): 100 at Zendesk (default); lower it to leave room for
    /// another integration that uses the search export of the same account.
    #[serde(default = "default_search_export_rpm")]
    pub search_export_requests_per_minute: u32,
    /// `zendesk.rate_window_ms`: the window every per-minute limit above counts in: Zendesk's is
    /// a minute (default 60000). Only for a simulator whose clock runs faster (the bootstrap
    /// benchmark divides every time limit by the same factor); 1000 to 60000.
    #[serde(default = "default_rate_window_ms")]
    pub rate_window_ms: u64,
}

fn default_rpm() -> u32 {
    200
}
fn default_export_rpm() -> u32 {
    10
}
fn default_timeout() -> u64 {
    30
}
fn default_replicas() -> u32 {
    3
}
fn default_search_export_rpm() -> u32 {
    100
}
fn default_rate_window_ms() -> u64 {
    60_000
}

/// `[storage]`: where state lives on disk or in PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `storage.data_dir`: the SQLite queue, the index snapshot and the export cursors (default `./deskline-data`).
    pub data_dir: PathBuf,
    /// Finished call jobs are deleted this many days after their last change; a repeated
    /// `call_id` within the window is still answered `duplicate`.
    pub retention_days: u32,
    /// PostgreSQL for several replicas (DESIGN §8); unset means the embedded SQLite queue. Read it
    /// with [`Config::postgres_url`], which also reads `postgres_url_file`.
    pub postgres_url: Option<SecretString>,
    /// `storage.postgres_url_file`: a file holding the PostgreSQL URL (instead of `postgres_url`).
    pub postgres_url_file: Option<PathBuf>,
    /// `storage.postgres_ca_file`: PEM certificates of the CAs trusted for PostgreSQL's server
    /// certificate with `sslmode=verify-ca` or `verify-full` (unset: the system's CAs).
    pub postgres_ca_file: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./deskline-data"),
            retention_days: 30,
            postgres_url: None,
            postgres_url_file: None,
            postgres_ca_file: None,
        }
    }
}

/// `[phone]`: phone number normalization.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhoneConfig {
    /// `phone.default_region`: the region (ISO 3166 code, default `UA`) for numbers without a country code.
    pub default_region: String,
}

impl Default for PhoneConfig {
    fn default() -> Self {
        Self {
            default_region: "UA".into(),
        }
    }
}

/// `[index]`: the incremental-export follower that feeds the index.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// `index.poll_seconds`: the incremental-export poll interval, in seconds (default 60).
    pub poll_seconds: u64,
    /// With PostgreSQL: how long the follower lease lasts without renewal (renewed every third),
    /// so about how long the exports go unfollowed after the follower dies.
    pub follower_lease_seconds: u64,
    /// With PostgreSQL: how often the follower stores the shared snapshot (and prunes the change
    /// log behind it).
    pub shared_snapshot_seconds: u64,
    /// A first start without a snapshot loads routing's data through the search export first and
    /// answers (WARMING) while the rest loads (DESIGN §10). `false`: today's full warm-up first.
    pub bootstrap: bool,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            poll_seconds: 60,
            follower_lease_seconds: 15,
            shared_snapshot_seconds: 300,
            bootstrap: true,
        }
    }
}

/// `[routing]`: inputs of the routing decisions (DESIGN §3).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Full name → PBX extension.
    pub directory: BTreeMap<String, String>,
    /// DESIGN §3 rule 7 fallback window in days; 0 = off.
    pub recent_days: u32,
}

/// What the sync may create in Zendesk (`sync.create`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    /// Create the caller as a Zendesk end user when unknown.
    User,
    /// Create an organization for a new caller (named by `sync.organization_name`).
    Organization,
    /// Create a ticket for the call when none is open.
    Ticket,
    /// Create a Talk Partner Edition call record (needs `sync.talk_app_id`).
    Call,
}

/// Which kind of Zendesk record a `[[sync.fields]]` mapping writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldEntity {
    /// A user field, addressed by key.
    User,
    /// An organization field, addressed by key.
    Organization,
    /// A ticket field, addressed by numeric id.
    Ticket,
}

/// One `[[sync.fields]]` mapping.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    /// The record the field belongs to.
    pub entity: FieldEntity,
    /// The field key for users and organizations, the numeric field id for tickets.
    pub field: String,
    /// `utm_source` … `utm_content`, `scheme_name`, `line_number` or `extra.<key>`.
    pub source: String,
}

/// `[sync]`: what the post-call sync writes to Zendesk (DESIGN §4).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// `sync.create`: which records the sync may create (default user, organization, ticket).
    pub create: Vec<Entity>,
    /// `sync.talk_app_id`: the Zendesk app id for Talk Partner Edition call records; `None` = no call records.
    pub talk_app_id: Option<i64>,
    /// `sync.senior_manager`: full name of the fallback assignee; `None` = no fallback.
    pub senior_manager: Option<String>,
    /// `sync.ticket_priority`: priority of new tickets (default `normal`).
    pub ticket_priority: String,
    /// `sync.ticket_type`: type of new tickets (default `question`).
    pub ticket_type: String,
    /// `sync.comment_public`: call comments public (`true`) or internal notes (default `false`).
    pub comment_public: bool,
    /// `sync.time_zone`: IANA time zone for dates in comments (default `Europe/Kyiv`).
    pub time_zone: String,
    /// `sync.fields`: custom-field mappings (`[[sync.fields]]`); empty by default.
    pub fields: Vec<FieldMapping>,
    /// Template for new organizations' names; `{name}` is the user's name, `{phone}` the number.
    pub organization_name: String,
    /// How long a replica's claim on a job lasts without renewal (DESIGN §8).
    pub lease_seconds: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            create: vec![Entity::User, Entity::Organization, Entity::Ticket],
            talk_app_id: None,
            senior_manager: None,
            ticket_priority: "normal".into(),
            ticket_type: "question".into(),
            comment_public: false,
            time_zone: "Europe/Kyiv".into(),
            fields: Vec::new(),
            organization_name: "{name}".into(),
            lease_seconds: 30,
        }
    }
}

/// Zendesk webhooks (DESIGN §9): off unless `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// HTTP address for Zendesk webhooks; unset = off.
    pub listen: Option<SocketAddr>,
    /// Path of the webhook endpoint.
    pub path: String,
    /// Required with `listen`; read it with [`Config::webhook_signing_secrets`], which also reads
    /// `signing_secret_file`. Several secrets (the two webhooks of `install --trigger`) are
    /// separated by whitespace, one per line in the file; a request signed with any of them passes.
    pub signing_secret: Option<SecretString>,
    /// `webhooks.signing_secret_file`: a file holding the signing secret (instead of `signing_secret`).
    pub signing_secret_file: Option<PathBuf>,
    /// The URL Zendesk must call (used by `deskline webhooks install`).
    pub public_url: Option<String>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            listen: None,
            path: "/zendesk/webhook".into(),
            signing_secret: None,
            signing_secret_file: None,
            public_url: None,
        }
    }
}

/// The gRPC server's certificate chain and private key, as PEM bytes read from the config's paths.
pub(crate) struct TlsPem {
    pub cert: Vec<u8>,
    /// Secret, so `Debug` never prints it.
    pub key: SecretBox<Vec<u8>>,
}

/// The Zendesk client's own credentials type; the config resolves into it ([`Config::credentials`]).
pub use crate::zendesk::Credentials;

impl Config {
    /// Reads `path`, applies `DESKLINE_*` environment overrides and validates everything.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_and_env(&text, path, std::env::vars())
    }

    /// Parses TOML text with the given environment (testable without touching the process env).
    pub fn from_toml_and_env(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.message().to_owned(),
            })?;
        let mut problems = Problems::default();
        let mut tree = Node::from(toml::Value::Table(root));
        merge_env(&mut tree, env, &mut problems);
        let config = deserialize_collecting(tree, &mut problems);
        if let Some(config) = &config {
            config.check(&mut problems);
        }
        match config {
            Some(config) if problems.list.is_empty() => Ok(config),
            _ => Err(problems.into_error()),
        }
    }

    fn check(&self, out: &mut Problems) {
        let mut report = |r: Result<(), ConfigError>| {
            if let Err(e) = r {
                out.push_error(e);
            }
        };
        report(validate_zendesk_url(&self.zendesk.url));
        report(self.credentials().map(drop));
        report(self.postgres_url().map(drop));
        if let Some(ca) = &self.storage.postgres_ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                report(Err(key_err(
                    "storage.postgres_ca_file",
                    format!("cannot read {}: {e}", ca.display()),
                )));
            }
        }
        report(self.webhook_signing_secrets().map(drop));
        let at_least_one = [
            (
                "zendesk.requests_per_minute",
                u64::from(self.zendesk.requests_per_minute),
            ),
            (
                "zendesk.export_requests_per_minute",
                u64::from(self.zendesk.export_requests_per_minute),
            ),
            ("zendesk.timeout_seconds", self.zendesk.timeout_seconds),
            ("zendesk.replicas", u64::from(self.zendesk.replicas)),
            (
                "zendesk.search_export_requests_per_minute",
                u64::from(self.zendesk.search_export_requests_per_minute),
            ),
            ("index.poll_seconds", self.index.poll_seconds),
            (
                "index.follower_lease_seconds",
                self.index.follower_lease_seconds,
            ),
            (
                "index.shared_snapshot_seconds",
                self.index.shared_snapshot_seconds,
            ),
            (
                "server.shutdown_grace_seconds",
                self.server.shutdown_grace_seconds,
            ),
            (
                "storage.retention_days",
                u64::from(self.storage.retention_days),
            ),
            ("sync.lease_seconds", self.sync.lease_seconds),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                report(Err(key_err(key, "must be at least 1")));
            }
        }
        if !(1_000..=60_000).contains(&self.zendesk.rate_window_ms) {
            report(Err(key_err(
                "zendesk.rate_window_ms",
                format!(
                    "must be 1000 to 60000 (Zendesk counts per minute: 60000), not {}",
                    self.zendesk.rate_window_ms
                ),
            )));
        }
        report(
            PhoneParser::new(&self.phone.default_region)
                .map(drop)
                .map_err(|m| key_err("phone.default_region", m)),
        );
        if !self.server.listen.ip().is_loopback() && self.server.tokens.is_empty() {
            report(Err(key_err(
                "server.tokens",
                format!(
                    "required when server.listen ({}) is not a loopback address: without tokens anyone who can reach the port can read the customer list",
                    self.server.listen
                ),
            )));
        }
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) => report(Err(key_err(
                "server.tls_key",
                "required when server.tls_cert is set",
            ))),
            (None, Some(_)) => report(Err(key_err(
                "server.tls_cert",
                "required when server.tls_key is set",
            ))),
            _ => {}
        }
        for (i, t) in self.server.tokens.iter().enumerate() {
            if t.expose_secret().trim().len() < 16 {
                report(Err(key_err(
                    format!("server.tokens[{i}]"),
                    "a token must have at least 16 characters",
                )));
            }
        }
        for (name, ext) in &self.routing.directory {
            if name.trim().is_empty() {
                report(Err(key_err("routing.directory", "an empty name")));
            } else if ext.trim().is_empty() {
                report(Err(key_err(
                    format!("routing.directory.{name:?}"),
                    "an empty extension",
                )));
            }
        }
        if self.index.follower_lease_seconds == 1 {
            report(Err(key_err(
                "index.follower_lease_seconds",
                "must be at least 2 (the holder renews it every third of it)",
            )));
        }
        if self.sync.lease_seconds == 1 {
            report(Err(key_err(
                "sync.lease_seconds",
                "must be at least 2 (the holder renews it every third of it)",
            )));
        }
        if jiff::tz::TimeZone::get(&self.sync.time_zone).is_err() {
            report(Err(key_err(
                "sync.time_zone",
                format!("unknown time zone {:?}", self.sync.time_zone),
            )));
        }
        if !matches!(
            self.sync.ticket_priority.as_str(),
            "urgent" | "high" | "normal" | "low"
        ) {
            report(Err(key_err(
                "sync.ticket_priority",
                "must be one of urgent, high, normal, low",
            )));
        }
        if !matches!(
            self.sync.ticket_type.as_str(),
            "problem" | "incident" | "question" | "task"
        ) {
            report(Err(key_err(
                "sync.ticket_type",
                "must be one of problem, incident, question, task",
            )));
        }
        if self.sync.create.contains(&Entity::Call) && self.sync.talk_app_id.is_none() {
            report(Err(key_err(
                "sync.talk_app_id",
                "required when sync.create contains \"call\"",
            )));
        }
        for (i, f) in self.sync.fields.iter().enumerate() {
            let key = format!("sync.fields[{i}]");
            let source_ok = crate::sync::UTM_KEYS.contains(&f.source.as_str())
                || f.source == "scheme_name"
                || f.source == "line_number"
                || f.source
                    .strip_prefix("extra.")
                    .is_some_and(|k| !k.is_empty());
            if !source_ok {
                report(Err(key_err(
                    format!("{key}.source"),
                    format!(
                        "unknown source {:?}: expected utm_source, utm_medium, utm_campaign, utm_term, utm_content, scheme_name, line_number or extra.<key>",
                        f.source
                    ),
                )));
            }
            if f.field.trim().is_empty() {
                report(Err(key_err(format!("{key}.field"), "empty")));
            } else if f.entity == FieldEntity::Ticket
                && f.field.parse::<i64>().map_or(true, |id| id <= 0)
            {
                report(Err(key_err(
                    format!("{key}.field"),
                    format!("ticket fields are numeric ids, not {:?}", f.field),
                )));
            }
        }
        let w = &self.webhooks;
        if !w.path.starts_with('/') {
            report(Err(key_err("webhooks.path", "must start with /")));
        }
        if let Some(url) = &w.public_url {
            let ok = reqwest::Url::parse(url).is_ok_and(|u| {
                matches!(u.scheme(), "https" | "http")
                    && u.host_str().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                report(Err(key_err(
                    "webhooks.public_url",
                    format!("not an http(s) URL: {url:?}"),
                )));
            }
        }
        if w.listen.is_some() && w.signing_secret.is_none() && w.signing_secret_file.is_none() {
            report(Err(key_err(
                "webhooks.signing_secret",
                "required when webhooks.listen is set (or webhooks.signing_secret_file)",
            )));
        }
    }

    /// Reads the gRPC TLS certificate and key (`server.tls_cert`, `server.tls_key`) when both are
    /// set. Each read error names its key; whether the PEM is usable is checked when the server
    /// is built (`grpc::tls_config`).
    pub(crate) fn tls_pem(&self) -> Result<Option<TlsPem>, ConfigError> {
        let (Some(cert), Some(key)) = (&self.server.tls_cert, &self.server.tls_key) else {
            return Ok(None);
        };
        let read = |name: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| key_err(name, format!("cannot read {}: {e}", path.display())))
        };
        Ok(Some(TlsPem {
            cert: read("server.tls_cert", cert)?,
            key: SecretBox::new(Box::new(read("server.tls_key", key)?)),
        }))
    }

    /// The Zendesk client's options from `[zendesk]` (credentials resolved, token files read). The
    /// client has its own option types and never sees the app's configuration.
    pub fn client_options(&self) -> Result<crate::zendesk::ClientOptions, ConfigError> {
        Ok(crate::zendesk::ClientOptions {
            base_url: self.zendesk.url.trim_end_matches('/').to_owned(),
            credentials: self.credentials()?,
            requests_per_minute: self.zendesk.requests_per_minute,
            export_requests_per_minute: self.zendesk.export_requests_per_minute,
            timeout: std::time::Duration::from_secs(self.zendesk.timeout_seconds),
            max_retries: 3,
            rate_window: std::time::Duration::from_millis(self.zendesk.rate_window_ms),
        })
    }

    /// Resolves the Zendesk credentials, reading token files.
    pub(crate) fn credentials(&self) -> Result<Credentials, ConfigError> {
        let z = &self.zendesk;
        let oauth = secret_or_file(
            "zendesk.oauth_token",
            z.oauth_token.as_ref(),
            z.oauth_token_file.as_deref(),
        )?;
        let token = secret_or_file("zendesk.token", z.token.as_ref(), z.token_file.as_deref())?;
        match (oauth, token) {
            (Some(_), Some(_)) => Err(key_err(
                "zendesk.oauth_token",
                "set either an OAuth token or email + API token, not both",
            )),
            (Some(token), None) => Ok(Credentials::OAuth { token }),
            (None, Some(token)) => match &z.email {
                Some(email) if email.contains('@') => Ok(Credentials::ApiToken {
                    email: email.clone(),
                    token,
                }),
                Some(_) => Err(key_err("zendesk.email", "not an email address")),
                None => Err(key_err("zendesk.email", "required with zendesk.token")),
            },
            (None, None) => Err(key_err(
                "zendesk.token",
                "missing: set zendesk.email with zendesk.token (or zendesk.token_file), or zendesk.oauth_token",
            )),
        }
    }

    /// `storage.postgres_url` or the contents of `storage.postgres_url_file`; `None` means the
    /// embedded SQLite queue.
    pub(crate) fn postgres_url(&self) -> Result<Option<SecretString>, ConfigError> {
        let s = &self.storage;
        let url = secret_or_file(
            "storage.postgres_url",
            s.postgres_url.as_ref(),
            s.postgres_url_file.as_deref(),
        )?;
        if let Some(url) = &url {
            let u = url.expose_secret();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                let key = if s.postgres_url.is_some() {
                    "storage.postgres_url"
                } else {
                    "storage.postgres_url_file"
                };
                // Never the value: it carries the database password.
                return Err(key_err(key, "must be a postgres:// or postgresql:// URL"));
            }
        }
        Ok(url)
    }

    /// The secrets in `webhooks.signing_secret` or in the file `webhooks.signing_secret_file`,
    /// separated by whitespace (Zendesk's secrets contain none); empty when neither is set.
    pub(crate) fn webhook_signing_secrets(&self) -> Result<Vec<SecretString>, ConfigError> {
        let w = &self.webhooks;
        let all = secret_or_file(
            "webhooks.signing_secret",
            w.signing_secret.as_ref(),
            w.signing_secret_file.as_deref(),
        )?;
        Ok(all.map_or_else(Vec::new, |s| {
            s.expose_secret()
                .split_whitespace()
                .map(|one| SecretString::from(one.to_owned()))
                .collect()
        }))
    }

    /// Whether `sync.create` allows creating `e`.
    pub(crate) fn may_create(&self, e: Entity) -> bool {
        self.sync.create.contains(&e)
    }
}

/// `https://…`, or plain `http://` only to a loopback host (the simulator, tests).
pub(crate) fn validate_zendesk_url(url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| key_err("zendesk.url", format!("not a URL ({e}): {url:?}")))?;
    let host = parsed.host_str().unwrap_or_default();
    match parsed.scheme() {
        "https" => {}
        "http" => {
            let loopback = host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(key_err(
                    "zendesk.url",
                    format!("plain http is allowed only to loopback, not to {host:?}: use https"),
                ));
            }
        }
        other => {
            return Err(key_err(
                "zendesk.url",
                format!("unsupported scheme {other:?}: use https"),
            ));
        }
    }
    if host.is_empty() {
        return Err(key_err("zendesk.url", "no host"));
    }
    Ok(())
}

/// A secret given inline or as a file (`{key}` / `{key}_file`): at most one of them.
fn secret_or_file(
    key: &str,
    inline: Option<&SecretString>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, ConfigError> {
    let name = key.rsplit('.').next().unwrap_or(key);
    match (inline, file) {
        (Some(_), Some(_)) => Err(key_err(key, format!("set {name} or {name}_file, not both"))),
        (Some(s), None) => Ok(Some(s.clone())),
        (None, Some(path)) => {
            let file_key = format!("{key}_file");
            let s = std::fs::read_to_string(path)
                .map_err(|e| key_err(&file_key, format!("cannot read {}: {e}", path.display())))?;
            let s = s.trim();
            if s.is_empty() {
                return Err(key_err(&file_key, format!("{} is empty", path.display())));
            }
            Ok(Some(SecretString::from(s.to_owned())))
        }
        (None, None) => Ok(None),
    }
}

/// The problems found so far, each naming its key. A problem under a key already reported (a
/// missing `zendesk` table makes `zendesk.url` missing too) is a consequence, not news.
#[derive(Default)]
struct Problems {
    list: Vec<(String, String)>,
    /// `section.key` → the environment variable that set it, to say where a bad value came from.
    from_env: Vec<(String, String)>,
}

impl Problems {
    fn push(&mut self, key: String, mut message: String) {
        let within = |outer: &str, key: &str| {
            key.strip_prefix(outer)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        };
        if self.list.iter().any(|(k, _)| within(k, &key)) {
            return;
        }
        if let Some((_, var)) = self.from_env.iter().find(|(k, _)| within(k, &key)) {
            message.push_str(&format!(" (from {var})"));
        }
        self.list.push((key, message));
    }

    fn push_error(&mut self, e: ConfigError) {
        match e {
            ConfigError::Key { key, message } => self.push(key, message),
            ConfigError::Several(all) => all.into_iter().for_each(|e| self.push_error(e)),
            other => self.push("config".into(), other.to_string()),
        }
    }

    fn into_error(self) -> ConfigError {
        let mut all: Vec<ConfigError> = self
            .list
            .into_iter()
            .map(|(key, message)| ConfigError::Key { key, message })
            .collect();
        match all.len() {
            1 => all.remove(0),
            _ => ConfigError::Several(all),
        }
    }
}

/// The merged configuration before serde types it: TOML values, raw environment strings, and holes
/// where a reported problem was.
#[derive(Clone)]
enum Node {
    Table(BTreeMap<String, Node>),
    Array(Vec<Node>),
    /// A TOML scalar: already typed by TOML.
    Leaf(toml::Value),
    /// An environment value: typed by the field it lands in (see [`env_value`]).
    Env(String),
    /// Stands for a value already reported as missing or bad: the neutral value of whatever type is
    /// asked for, so that the rest of the configuration can still be checked.
    Hole,
}

impl From<toml::Value> for Node {
    fn from(v: toml::Value) -> Self {
        match v {
            toml::Value::Table(t) => {
                Node::Table(t.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
            toml::Value::Array(a) => Node::Array(a.into_iter().map(Node::from).collect()),
            scalar => Node::Leaf(scalar),
        }
    }
}

/// Puts `DESKLINE_SECTION__KEY` values into the tree as `section.key` (the environment wins).
fn merge_env(
    tree: &mut Node,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Problems,
) {
    let Node::Table(root) = tree else {
        return;
    };
    for (name, raw) in env {
        let Some((section, key)) = name
            .strip_prefix("DESKLINE_")
            .and_then(|rest| rest.split_once("__"))
        else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let dotted = format!("{section}.{key}");
        match root
            .entry(section.clone())
            .or_insert_with(|| Node::Table(BTreeMap::new()))
        {
            Node::Table(t) => {
                t.insert(key, Node::Env(raw));
                problems.from_env.push((dotted, name));
            }
            _ => problems.push(
                section,
                format!("is not a table in the file, so {name} cannot set {dotted}"),
            ),
        }
    }
}

/// One step of a key path.
#[derive(Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn dotted(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) if s.is_empty() => s.push_str(k),
            Step::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Deserializes the tree into [`Config`], collecting every problem: after each failed pass the bad
/// value is taken out (its default applies) or replaced by a hole, and the pass runs again. `None`
/// when the tree cannot be made to deserialize (every problem found is in `problems` then).
fn deserialize_collecting(mut tree: Node, problems: &mut Problems) -> Option<Config> {
    let mut seen: Vec<(String, String)> = Vec::new();
    // Each pass fixes one value; a config has far fewer.
    for _ in 0..500 {
        let e = match serde_path_to_error::deserialize::<_, Config>(tree.clone()) {
            Ok(config) => return Some(config),
            Err(e) => e,
        };
        let mut path: Vec<Step> = Vec::new();
        for segment in e.path().iter() {
            match segment {
                serde_path_to_error::Segment::Map { key } => path.push(Step::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => path.push(Step::Index(*index)),
                _ => {}
            }
        }
        let message = e.into_inner().0;
        // Serde names a missing field in the message, at its table's path; an unknown one is at the
        // end of the path already (unless at the top).
        for prefix in ["missing field `", "unknown field `"] {
            if let Some(field) = message
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('`').next())
            {
                if path.last() != Some(&Step::Key(field.to_owned())) {
                    path.push(Step::Key(field.to_owned()));
                }
            }
        }
        let key = dotted(&path);
        if seen.contains(&(key.clone(), message.clone())) || !patch(&mut tree, &path) {
            problems.push(key, message);
            return None;
        }
        seen.push((key.clone(), message.clone()));
        problems.push(key, message);
    }
    None
}

/// Makes the value at `path` stop failing: a table entry is removed (its default applies, or it is
/// reported missing next and becomes a hole), a list item or an environment value on the way
/// becomes a hole. `false` when there is nothing left to change.
fn patch(node: &mut Node, path: &[Step]) -> bool {
    let Some((step, rest)) = path.split_first() else {
        return !matches!(std::mem::replace(node, Node::Hole), Node::Hole);
    };
    match (&mut *node, step) {
        (Node::Table(t), Step::Key(k)) => match t.get_mut(k) {
            Some(Node::Hole) if rest.is_empty() => false,
            Some(_) if rest.is_empty() => t.remove(k).is_some(),
            Some(child) => patch(child, rest),
            None => {
                t.insert(k.clone(), Node::Hole);
                rest.is_empty() || patch(t.get_mut(k).expect("just inserted"), rest)
            }
        },
        (Node::Array(a), Step::Index(i)) => a.get_mut(*i).is_some_and(|child| patch(child, rest)),
        (Node::Hole, Step::Key(_)) => {
            *node = Node::Table(BTreeMap::new());
            patch(node, path)
        }
        // A scalar, an environment string or a hole where the path goes deeper: the whole value
        // is the problem.
        (other, _) => !matches!(std::mem::replace(other, Node::Hole), Node::Hole),
    }
}

/// The error of a pass over [`Node`]: just the message; the path is kept by `serde_path_to_error`.
#[derive(Debug)]
struct NodeError(String);

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NodeError {}

impl serde::de::Error for NodeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// What the schema asked for: decides how an environment string or a hole is read.
#[derive(Clone, Copy)]
enum Want {
    Bool,
    Signed,
    Unsigned,
    Float,
    Str,
    Unit,
    Seq,
    Map,
}

macro_rules! wanting {
    ($($method:ident => $want:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, NodeError> {
            self.wanting(Want::$want, v)
        })*
    };
}

impl Node {
    fn wanting<'de, V: Visitor<'de>>(self, want: Want, v: V) -> Result<V::Value, NodeError> {
        match self {
            Node::Table(t) => v.visit_map(Entries {
                iter: t.into_iter(),
                value: None,
            }),
            Node::Array(a) => v.visit_seq(Items(a.into_iter())),
            Node::Leaf(value) => serde::Deserializer::deserialize_any(value, v)
                .map_err(|e| NodeError(e.message().to_owned())),
            Node::Env(raw) => env_value(raw, want, v),
            Node::Hole => match want {
                Want::Bool => v.visit_bool(false),
                Want::Signed => v.visit_i64(0),
                Want::Unsigned => v.visit_u64(0),
                Want::Float => v.visit_f64(0.0),
                Want::Str => v.visit_str(""),
                Want::Unit => v.visit_unit(),
                Want::Seq => v.visit_seq(Items(Vec::new().into_iter())),
                Want::Map => v.visit_map(Entries {
                    iter: BTreeMap::new().into_iter(),
                    value: None,
                }),
            },
        }
    }
}

/// An environment string read as what the field wants: `400`, `true`, `a,b` or a TOML array for a
/// list, a TOML inline table for a table, the text itself for a string.
fn env_value<'de, V: Visitor<'de>>(raw: String, want: Want, v: V) -> Result<V::Value, NodeError> {
    use serde::de::{Error, Unexpected};
    let t = raw.trim();
    let inline = |t: &str| -> Result<Node, NodeError> {
        let table: toml::Table = format!("v = {t}")
            .parse()
            .map_err(|e: toml::de::Error| NodeError(format!("not TOML: {}", e.message())))?;
        Ok(Node::from(table["v"].clone()))
    };
    match want {
        Want::Bool => match t {
            "true" => v.visit_bool(true),
            "false" => v.visit_bool(false),
            _ => Err(NodeError::invalid_value(Unexpected::Str(t), &v)),
        },
        Want::Signed => match t.parse() {
            Ok(n) => v.visit_i64(n),
            Err(_) => Err(NodeError::invalid_value(Unexpected::Str(t), &v)),
        },
        Want::Unsigned => match t.parse() {
            Ok(n) => v.visit_u64(n),
            Err(_) => Err(NodeError::invalid_value(Unexpected::Str(t), &v)),
        },
        Want::Float => match t.parse() {
            Ok(n) => v.visit_f64(n),
            Err(_) => Err(NodeError::invalid_value(Unexpected::Str(t), &v)),
        },
        Want::Str => v.visit_string(raw),
        Want::Unit => v.visit_unit(),
        Want::Seq if t.starts_with('[') => inline(t)?.wanting(want, v),
        Want::Seq => {
            let items = t.split(',').map(str::trim).filter(|s| !s.is_empty());
            v.visit_seq(Items(
                items
                    .map(|s| Node::Env(s.to_owned()))
                    .collect::<Vec<_>>()
                    .into_iter(),
            ))
        }
        Want::Map if t.starts_with('{') => inline(t)?.wanting(want, v),
        Want::Map => Err(NodeError(format!(
            "expected a TOML inline table such as {{ \"key\" = \"value\" }}, not {t:?}"
        ))),
    }
}

impl<'de> serde::Deserializer<'de> for Node {
    type Error = NodeError;

    wanting! {
        deserialize_any => Str,
        deserialize_bool => Bool,
        deserialize_i8 => Signed, deserialize_i16 => Signed, deserialize_i32 => Signed,
        deserialize_i64 => Signed,
        deserialize_u8 => Unsigned, deserialize_u16 => Unsigned, deserialize_u32 => Unsigned,
        deserialize_u64 => Unsigned,
        deserialize_f32 => Float, deserialize_f64 => Float,
        deserialize_char => Str, deserialize_str => Str, deserialize_string => Str,
        deserialize_bytes => Str, deserialize_byte_buf => Str, deserialize_identifier => Str,
        deserialize_unit => Unit, deserialize_ignored_any => Unit,
        deserialize_seq => Seq,
        deserialize_map => Map,
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, NodeError> {
        match self {
            Node::Hole => v.visit_none(),
            node => v.visit_some(node),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, NodeError> {
        match self {
            Node::Leaf(value) => serde::Deserializer::deserialize_enum(value, name, variants, v)
                .map_err(|e| NodeError(e.message().to_owned())),
            Node::Env(raw) => v.visit_enum(IntoDeserializer::<NodeError>::into_deserializer(
                raw.trim().to_owned(),
            )),
            Node::Hole => v.visit_enum(IntoDeserializer::<NodeError>::into_deserializer(
                variants.first().copied().unwrap_or_default(),
            )),
            node => node.wanting(Want::Str, v),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, NodeError> {
        self.wanting(Want::Map, v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, NodeError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, NodeError> {
        self.wanting(Want::Unit, v)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, NodeError> {
        self.wanting(Want::Seq, v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, NodeError> {
        self.wanting(Want::Seq, v)
    }
}

struct Items(std::vec::IntoIter<Node>);

impl<'de> serde::de::SeqAccess<'de> for Items {
    type Error = NodeError;

    fn next_element_seed<T: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, NodeError> {
        self.0.next().map(|node| seed.deserialize(node)).transpose()
    }
}

struct Entries {
    iter: std::collections::btree_map::IntoIter<String, Node>,
    value: Option<Node>,
}

impl<'de> serde::de::MapAccess<'de> for Entries {
    type Error = NodeError;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, NodeError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        seed.deserialize(IntoDeserializer::<NodeError>::into_deserializer(key))
            .map(Some)
    }

    fn next_value_seed<T: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<T::Value, NodeError> {
        seed.deserialize(self.value.take().unwrap_or(Node::Hole))
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod config_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [zendesk]
        url = "https://acme.zendesk.com"
        email = "ops@acme.com"
        token = "s3cr3t-token-value"
    "#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_and_env(
            text,
            Path::new("t.toml"),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.zendesk.requests_per_minute, 200);
        assert_eq!(c.zendesk.replicas, 3);
        assert_eq!(c.index.poll_seconds, 60);
        assert_eq!(c.phone.default_region, "UA");
        assert_eq!(
            c.sync.create,
            vec![Entity::User, Entity::Organization, Entity::Ticket]
        );
        assert_eq!(c.sync.ticket_priority, "normal");
        assert_eq!(c.sync.time_zone, "Europe/Kyiv");
        assert!(!c.sync.comment_public);
    }

    #[test]
    fn env_overrides_and_types() {
        let c = load(
            MIN,
            &[
                ("DESKLINE_ZENDESK__REQUESTS_PER_MINUTE", "400"),
                ("DESKLINE_SYNC__CREATE", "user,ticket"),
                ("DESKLINE_ZENDESK__TOKEN", "123456789"),
                ("DESKLINE_SYNC__COMMENT_PUBLIC", "true"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.zendesk.requests_per_minute, 400);
        assert_eq!(c.sync.create, vec![Entity::User, Entity::Ticket]);
        assert!(c.sync.comment_public);
        assert!(
            matches!(c.credentials().unwrap(), Credentials::ApiToken { token, .. } if token.expose_secret() == "123456789")
        );
    }

    #[test]
    fn postgres_url_and_lease() {
        let c = load(MIN, &[]).unwrap();
        assert!(c.postgres_url().unwrap().is_none(), "SQLite by default");
        assert_eq!(c.sync.lease_seconds, 30);
        let c = load(
            MIN,
            &[
                (
                    "DESKLINE_STORAGE__POSTGRES_URL",
                    "postgres://deskline:pw-9f3@db:5432/deskline",
                ),
                ("DESKLINE_SYNC__LEASE_SECONDS", "10"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.postgres_url().unwrap().unwrap().expose_secret(),
            "postgres://deskline:pw-9f3@db:5432/deskline"
        );
        assert_eq!(c.sync.lease_seconds, 10);
        assert!(!format!("{c:?}").contains("pw-9f3"), "the URL is a secret");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pg-url");
        std::fs::write(&file, "postgres://x@y/z\n").unwrap();
        let with_file = format!(
            "{MIN}\n[storage]\npostgres_url_file = \"{}\"\n",
            file.display()
        );
        let c = load(&with_file, &[]).unwrap();
        assert_eq!(
            c.postgres_url().unwrap().unwrap().expose_secret(),
            "postgres://x@y/z"
        );
        // Both set: refused at load, naming the key (validation reads the URL).
        let both = load(
            &with_file,
            &[("DESKLINE_STORAGE__POSTGRES_URL", "postgres://a@b/c")],
        )
        .unwrap_err();
        assert!(
            both.to_string().starts_with("storage.postgres_url:"),
            "{both}"
        );
        let err = load(MIN, &[("DESKLINE_SYNC__LEASE_SECONDS", "1")]).unwrap_err();
        assert!(err.to_string().starts_with("sync.lease_seconds:"), "{err}");
        let err = load(MIN, &[("DESKLINE_INDEX__FOLLOWER_LEASE_SECONDS", "1")]).unwrap_err();
        assert!(
            err.to_string().starts_with("index.follower_lease_seconds:"),
            "{err}"
        );
        let c = load(MIN, &[]).unwrap();
        assert_eq!(
            (
                c.index.follower_lease_seconds,
                c.index.shared_snapshot_seconds
            ),
            (15, 300)
        );
    }

    #[test]
    fn errors_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                &format!("{MIN}\n[index]\npoll_secs = 5"),
                &[],
                "index.poll_secs",
            ),
            (
                &format!("{MIN}\n[index]\npoll_seconds = \"x\""),
                &[],
                "index.poll_seconds",
            ),
            ("[server]\n", &[], "zendesk"),
            (
                MIN,
                &[("DESKLINE_ZENDESK__URL", "http://acme.zendesk.com")],
                "zendesk.url",
            ),
            (
                MIN,
                &[("DESKLINE_PHONE__DEFAULT_REGION", "Narnia")],
                "phone.default_region",
            ),
            (
                MIN,
                &[("DESKLINE_SYNC__TIME_ZONE", "Mars/Olympus")],
                "sync.time_zone",
            ),
            (
                MIN,
                &[("DESKLINE_SYNC__CREATE", "user,spaceship")],
                "sync.create",
            ),
            (
                MIN,
                &[("DESKLINE_ZENDESK__REQUESTS_PER_MINUTE", "0")],
                "zendesk.requests_per_minute",
            ),
            (&format!("{MIN}replicas = 0\n"), &[], "zendesk.replicas"),
            (
                MIN,
                &[("DESKLINE_ZENDESK__REPLICAS", "-2")],
                "zendesk.replicas",
            ),
            (
                MIN,
                &[("DESKLINE_SERVER__LISTEN", "0.0.0.0:50051")],
                "server.tokens",
            ),
            (
                MIN,
                &[("DESKLINE_SYNC__CREATE", "user,call")],
                "sync.talk_app_id",
            ),
            (
                &format!(
                    "{MIN}\n[[sync.fields]]\nentity = \"ticket\"\nfield = \"utm\"\nsource = \"utm_source\""
                ),
                &[],
                "sync.fields[0].field",
            ),
            (
                &format!(
                    "{MIN}\n[[sync.fields]]\nentity = \"user\"\nfield = \"utm\"\nsource = \"utm_nope\""
                ),
                &[],
                "sync.fields[0].source",
            ),
        ];
        for (text, env, key) in cases {
            let err = load(text, env).unwrap_err().to_string();
            // The key exactly, once (an unknown field used to be named twice).
            let named =
                err.starts_with(key) && matches!(err[key.len()..].chars().next(), Some(':' | '['));
            assert!(named, "expected {key}, got {err}");
        }
    }

    #[test]
    fn secrets_stay_out_of_errors_and_debug() {
        let c = load(MIN, &[]).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", c.credentials().unwrap()).contains("s3cr3t"));
        let err = load(MIN, &[("DESKLINE_ZENDESK__EMAIL", "not-an-email")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("zendesk.email") && !err.contains("s3cr3t"),
            "{err}"
        );
    }

    #[test]
    fn loopback_http_is_allowed() {
        assert!(validate_zendesk_url("http://127.0.0.1:8080").is_ok());
        assert!(validate_zendesk_url("http://localhost:8080").is_ok());
        assert!(validate_zendesk_url("http://10.0.0.1").is_err());
        assert!(validate_zendesk_url("ftp://x.zendesk.com").is_err());
    }

    #[test]
    fn tls_needs_both_paths_and_names_the_key() {
        let missing = |extra: &str| match load(&format!("{MIN}\n[server]\n{extra}"), &[]) {
            Err(ConfigError::Key { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(missing("tls_cert = \"/x/cert.pem\""), "server.tls_key");
        assert_eq!(missing("tls_key = \"/x/key.pem\""), "server.tls_cert");
        let c = load(
            &format!("{MIN}\n[server]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\""),
            &[],
        )
        .unwrap();
        match c.tls_pem() {
            Err(ConfigError::Key { key, .. }) => assert_eq!(key, "server.tls_cert"),
            other => panic!("{:?}", other.map(|p| p.is_some())),
        }
        assert!(load(MIN, &[]).unwrap().tls_pem().unwrap().is_none());
    }
}
