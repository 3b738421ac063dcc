//! Typed configuration (DESIGN §6): one TOML file, every key also settable as
//! `DESKLINE_SECTION__KEY` in the environment (the environment wins).
//!
//! Every problem is reported with the key it concerns (`zendesk.url: …`), and start-up stops.
//! Secrets are [`SecretString`]s, so `Debug` and logs never show them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::Deserialize;

use crate::phone::PhoneParser;

/// A configuration problem, always naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Key { key: String, message: String },
}

fn key_err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub zendesk: ZendeskConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub phone: PhoneConfig,
    #[serde(default)]
    pub index: IndexConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub webhooks: WebhooksConfig,
}

/// Zendesk webhooks (DESIGN §9). Key names as the `config` branch defines them; this minimal
/// version is replaced when that branch lands.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// HTTP address of the webhook endpoint; unset = no webhooks.
    pub listen: Option<SocketAddr>,
    pub path: String,
    pub signing_secret: Option<SecretString>,
    pub signing_secret_file: Option<PathBuf>,
    /// The URL Zendesk must call (`deskline webhooks install`, `deskline check`).
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Accepted bearer tokens; empty means no authentication (allowed on loopback only).
    pub tokens: Vec<SecretString>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZendeskConfig {
    pub url: String,
    pub email: Option<String>,
    pub token: Option<SecretString>,
    pub token_file: Option<PathBuf>,
    pub oauth_token: Option<SecretString>,
    pub oauth_token_file: Option<PathBuf>,
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    /// Incremental-export requests per minute: 10 on every plan, 30 with the High Volume add-on.
    #[serde(default = "default_export_rpm")]
    pub export_requests_per_minute: u32,
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// Finished call jobs are deleted this many days after their last change; a repeated
    /// `call_id` within the window is still answered `duplicate`.
    pub retention_days: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./deskline-data"),
            retention_days: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhoneConfig {
    pub default_region: String,
}

impl Default for PhoneConfig {
    fn default() -> Self {
        Self {
            default_region: "UA".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    pub poll_seconds: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self { poll_seconds: 60 }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Full name → PBX extension.
    pub directory: BTreeMap<String, String>,
}

/// What the sync may create in Zendesk (`sync.create`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    User,
    Organization,
    Ticket,
    Call,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldEntity {
    User,
    Organization,
    Ticket,
}

/// One `[[sync.fields]]` mapping.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    pub entity: FieldEntity,
    /// The field key for users and organizations, the numeric field id for tickets.
    pub field: String,
    /// `utm_source` … `utm_content`, `scheme_name`, `line_number` or `extra.<key>`.
    pub source: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub create: Vec<Entity>,
    pub talk_app_id: Option<i64>,
    pub senior_manager: Option<String>,
    pub ticket_priority: String,
    pub ticket_type: String,
    pub comment_public: bool,
    pub time_zone: String,
    pub fields: Vec<FieldMapping>,
    /// Template for new organizations' names; `{name}` is the user's name, `{phone}` the number.
    pub organization_name: String,
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
        }
    }
}

/// The gRPC server's certificate chain and private key, as PEM bytes read from the config's paths.
pub struct TlsPem {
    pub cert: Vec<u8>,
    /// Secret, so `Debug` never prints it.
    pub key: SecretBox<Vec<u8>>,
}

/// How Deskline authenticates to Zendesk, resolved from the config (files read).
#[derive(Clone)]
pub enum Credentials {
    /// `{email}/token` + API token, HTTP Basic.
    ApiToken { email: String, token: SecretString },
    /// OAuth bearer token.
    OAuth { token: SecretString },
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

const UTM_KEYS: [&str; 5] = [
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
];

/// Keys whose environment values are not plain strings.
const ARRAY_KEYS: [&str; 3] = ["server.tokens", "sync.create", "sync.fields"];
const SCALAR_KEYS: [&str; 7] = [
    "zendesk.requests_per_minute",
    "zendesk.export_requests_per_minute",
    "zendesk.timeout_seconds",
    "index.poll_seconds",
    "sync.talk_app_id",
    "sync.comment_public",
    "routing.directory",
];

impl Config {
    /// Reads `path`, applies `DESKLINE_*` environment overrides and validates everything.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
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
        let mut root: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.message().to_owned(),
                })?;
        apply_env(&mut root, env)?;
        let de = toml::Value::Table(root);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let message = e.inner().message().to_owned();
            // Name the exact key for missing and unknown fields, not just their table.
            let field = ["missing field `", "unknown field `"]
                .iter()
                .find_map(|p| message.strip_prefix(p))
                .and_then(|rest| rest.split('`').next());
            let key = match (path.as_str(), field) {
                (".", Some(f)) => f.to_owned(),
                (".", None) => "config".to_owned(),
                // For an unknown field the path already ends with it; for a missing one it does not.
                (p, Some(f)) if p == f || p.ends_with(&format!(".{f}")) => p.to_owned(),
                (p, Some(f)) => format!("{p}.{f}"),
                (p, None) => p.to_owned(),
            };
            key_err(key, message)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The webhook signing secret (`webhooks.signing_secret` or `_file`), if one is set.
    pub fn webhook_secret(&self) -> Result<Option<SecretString>, ConfigError> {
        let w = &self.webhooks;
        match (&w.signing_secret, &w.signing_secret_file) {
            (Some(_), Some(_)) => Err(key_err(
                "webhooks.signing_secret",
                "set signing_secret or signing_secret_file, not both",
            )),
            (Some(s), None) => Ok(Some(s.clone())),
            (None, Some(p)) => {
                let key = "webhooks.signing_secret_file";
                let s = std::fs::read_to_string(p)
                    .map_err(|e| key_err(key, format!("cannot read {}: {e}", p.display())))?;
                match s.trim() {
                    "" => Err(key_err(key, format!("{} is empty", p.display()))),
                    s => Ok(Some(SecretString::from(s.to_owned()))),
                }
            }
            (None, None) => Ok(None),
        }
    }

    /// Checks what types alone cannot, naming the key of each problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_zendesk_url(&self.zendesk.url)?;
        self.credentials()?;
        let secret = self.webhook_secret()?;
        if self.webhooks.listen.is_some() && secret.is_none() {
            return Err(key_err(
                "webhooks.signing_secret",
                "required with webhooks.listen (see `deskline webhooks install`)",
            ));
        }
        if !self.webhooks.path.starts_with('/') {
            return Err(key_err("webhooks.path", "must start with /"));
        }
        if self.zendesk.requests_per_minute == 0 {
            return Err(key_err("zendesk.requests_per_minute", "must be at least 1"));
        }
        if self.zendesk.export_requests_per_minute == 0 {
            return Err(key_err(
                "zendesk.export_requests_per_minute",
                "must be at least 1",
            ));
        }
        if self.zendesk.timeout_seconds == 0 {
            return Err(key_err("zendesk.timeout_seconds", "must be at least 1"));
        }
        if self.index.poll_seconds == 0 {
            return Err(key_err("index.poll_seconds", "must be at least 1"));
        }
        if self.server.shutdown_grace_seconds == 0 {
            return Err(key_err(
                "server.shutdown_grace_seconds",
                "must be at least 1",
            ));
        }
        if self.storage.retention_days == 0 {
            return Err(key_err("storage.retention_days", "must be at least 1"));
        }
        PhoneParser::new(&self.phone.default_region)
            .map_err(|m| key_err("phone.default_region", m))?;
        if !self.server.listen.ip().is_loopback() && self.server.tokens.is_empty() {
            return Err(key_err(
                "server.tokens",
                format!(
                    "required when server.listen ({}) is not a loopback address: without tokens anyone who can reach the port can read the customer list",
                    self.server.listen
                ),
            ));
        }
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) => {
                return Err(key_err(
                    "server.tls_key",
                    "required when server.tls_cert is set",
                ));
            }
            (None, Some(_)) => {
                return Err(key_err(
                    "server.tls_cert",
                    "required when server.tls_key is set",
                ));
            }
            _ => {}
        }
        for (i, t) in self.server.tokens.iter().enumerate() {
            if t.expose_secret().trim().len() < 16 {
                return Err(key_err(
                    format!("server.tokens[{i}]"),
                    "a token must have at least 16 characters",
                ));
            }
        }
        for (name, ext) in &self.routing.directory {
            if name.trim().is_empty() {
                return Err(key_err("routing.directory", "an empty name"));
            }
            if ext.trim().is_empty() {
                return Err(key_err(
                    format!("routing.directory.{name:?}"),
                    "an empty extension",
                ));
            }
        }
        jiff::tz::TimeZone::get(&self.sync.time_zone).map_err(|_| {
            key_err(
                "sync.time_zone",
                format!("unknown time zone {:?}", self.sync.time_zone),
            )
        })?;
        if !matches!(
            self.sync.ticket_priority.as_str(),
            "urgent" | "high" | "normal" | "low"
        ) {
            return Err(key_err(
                "sync.ticket_priority",
                "must be one of urgent, high, normal, low",
            ));
        }
        if !matches!(
            self.sync.ticket_type.as_str(),
            "problem" | "incident" | "question" | "task"
        ) {
            return Err(key_err(
                "sync.ticket_type",
                "must be one of problem, incident, question, task",
            ));
        }
        if self.sync.create.contains(&Entity::Call) && self.sync.talk_app_id.is_none() {
            return Err(key_err(
                "sync.talk_app_id",
                "required when sync.create contains \"call\"",
            ));
        }
        for (i, f) in self.sync.fields.iter().enumerate() {
            let key = format!("sync.fields[{i}]");
            let source_ok = UTM_KEYS.contains(&f.source.as_str())
                || f.source == "scheme_name"
                || f.source == "line_number"
                || f.source
                    .strip_prefix("extra.")
                    .is_some_and(|k| !k.is_empty());
            if !source_ok {
                return Err(key_err(
                    format!("{key}.source"),
                    format!(
                        "unknown source {:?}: expected utm_source, utm_medium, utm_campaign, utm_term, utm_content, scheme_name, line_number or extra.<key>",
                        f.source
                    ),
                ));
            }
            if f.field.trim().is_empty() {
                return Err(key_err(format!("{key}.field"), "empty"));
            }
            if f.entity == FieldEntity::Ticket && f.field.parse::<i64>().map_or(true, |id| id <= 0)
            {
                return Err(key_err(
                    format!("{key}.field"),
                    format!("ticket fields are numeric ids, not {:?}", f.field),
                ));
            }
        }
        Ok(())
    }

    /// Reads the gRPC TLS certificate and key (`server.tls_cert`, `server.tls_key`) when both are
    /// set. Each read error names its key; whether the PEM is usable is checked when the server
    /// is built (`grpc::tls_config`).
    pub fn tls_pem(&self) -> Result<Option<TlsPem>, ConfigError> {
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

    /// Resolves the Zendesk credentials, reading token files.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        let z = &self.zendesk;
        let read = |key: &str, path: &Path| -> Result<SecretString, ConfigError> {
            let s = std::fs::read_to_string(path)
                .map_err(|e| key_err(key, format!("cannot read {}: {e}", path.display())))?;
            let s = s.trim();
            if s.is_empty() {
                return Err(key_err(key, format!("{} is empty", path.display())));
            }
            Ok(SecretString::from(s.to_owned()))
        };
        let oauth = match (&z.oauth_token, &z.oauth_token_file) {
            (Some(_), Some(_)) => {
                return Err(key_err(
                    "zendesk.oauth_token",
                    "set oauth_token or oauth_token_file, not both",
                ));
            }
            (Some(t), None) => Some(t.clone()),
            (None, Some(p)) => Some(read("zendesk.oauth_token_file", p)?),
            (None, None) => None,
        };
        let token = match (&z.token, &z.token_file) {
            (Some(_), Some(_)) => {
                return Err(key_err(
                    "zendesk.token",
                    "set token or token_file, not both",
                ));
            }
            (Some(t), None) => Some(t.clone()),
            (None, Some(p)) => Some(read("zendesk.token_file", p)?),
            (None, None) => None,
        };
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

    /// Whether `sync.create` allows creating `e`.
    pub fn may_create(&self, e: Entity) -> bool {
        self.sync.create.contains(&e)
    }
}

/// `https://…`, or plain `http://` only to a loopback host (the simulator, tests).
pub fn validate_zendesk_url(url: &str) -> Result<(), ConfigError> {
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

fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("DESKLINE_") else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let dotted = format!("{section}.{key}");
        let value =
            env_value(&dotted, &raw).map_err(|m| key_err(format!("{dotted} (from {name})"), m))?;
        let table = root
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| key_err(&section, "is not a table"))?;
        table.insert(key, value);
    }
    Ok(())
}

fn env_value(key: &str, raw: &str) -> Result<toml::Value, String> {
    let trimmed = raw.trim();
    let inline = |s: &str| -> Result<toml::Value, String> {
        let t: toml::Table = format!("v = {s}")
            .parse()
            .map_err(|e: toml::de::Error| e.message().to_owned())?;
        Ok(t["v"].clone())
    };
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        return inline(trimmed);
    }
    if ARRAY_KEYS.contains(&key) {
        let items = trimmed.split(',').map(str::trim).filter(|s| !s.is_empty());
        return Ok(toml::Value::Array(
            items.map(|s| toml::Value::String(s.to_owned())).collect(),
        ));
    }
    if SCALAR_KEYS.contains(&key) {
        return inline(trimmed);
    }
    Ok(toml::Value::String(raw.to_owned()))
}

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
