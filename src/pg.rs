//! PostgreSQL, the store shared by several replicas (DESIGN §8): the connection pool and the
//! schema's migrations.
//!
//! # Driver
//! `tokio-postgres` with a `deadpool-postgres` pool: pure Rust, no compile-time query checking
//! (so no database is needed to build), few dependencies. Statements are prepared once per pooled
//! connection (`prepare_cached`).
//!
//! # TLS
//! `sslmode` in `storage.postgres_url` means what it means to libpq, through rustls
//! (`tokio-postgres-rustls`, aws-lc like the rest of the process): `disable` is plain TCP;
//! `prefer` (the default) encrypts when the server offers TLS and falls back to plain TCP when it
//! does not; `require` fails without TLS. None of the three checks the server's certificate (libpq
//! without a root certificate file): they stop eavesdropping, not an impostor. `verify-ca` also
//! checks that the certificate chains to a trusted CA, `verify-full` that it names the host in the
//! URL too; the CAs are `storage.postgres_ca_file` (PEM) or, unset, the system's. tokio-postgres
//! does not parse the two verify modes, so [`Connect::new`] turns them into `require` and installs
//! the matching verifier. Errors name the key and say why (the cause chain, such as "server does
//! not support TLS" or the certificate error), never the URL.
//!
//! # Migrations
//! [`migrations`] is an append-only list of named steps: the job store's ([`MIGRATIONS`]), then
//! the cluster coordination tables ([`crate::cluster::migrations`]: lease, shared budget, change
//! log, shared snapshot), so a replica's start creates everything replicas share. At start every
//! replica runs [`migrate`]:
//! one transaction that first takes `pg_advisory_xact_lock` ([`LOCK_NAMESPACE`], per schema), so replicas starting
//! together apply each step exactly once (the others wait for the lock, then find the steps
//! recorded in `deskline_migrations`). A step is never edited once released; later work appends
//! its own. A database migrated by a newer release (names this binary does not know) is accepted
//! as long as every step this binary knows is applied: new steps only add.
//!
//! # Failures
//! Every operation runs under [`OP_TIMEOUT`] (the migration under its own [`MIGRATE_TIMEOUT`]: it
//! may wait for other replicas' migrations); a connection that cannot be made or an operation that
//! times out is [`PgError::Unavailable`], which callers treat as "PostgreSQL is down" (the spool in
//! [`crate::sync`] takes over) rather than as a bug.

use std::{collections::HashSet, path::Path, sync::Arc, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres_rustls::MakeRustlsConnect;

/// First key of the advisory lock held while migrating (`'DSKL'`, the namespace `cluster` uses
/// too); the second is `hashtext(current_schema() || ':migrations')`, so two schemas (two accounts,
/// or two tests) migrate without waiting for each other.
pub(crate) const LOCK_NAMESPACE: i32 = 0x4453_4b4c;

/// The longest any single store operation may take before PostgreSQL counts as unavailable.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`migrate`] may take, waiting for the migration lock included. Not [`OP_TIMEOUT`]:
/// replicas starting together queue on that lock, so the last one waits for every other one's
/// whole migration (a first start creates every table), and on a loaded machine that took more
/// than 5 s; the replica then exited instead of finding the schema ready a moment later. A
/// replica cannot serve before its schema is ready, so waiting longer costs nothing; a minute
/// still ends a start that would hang on a lock never released (a stuck session holding it).
pub(crate) const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);

/// One named schema step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

/// The job store's steps. Append only: later work adds its steps at the end.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_sync_queue",
        sql: crate::sync::pg::SCHEMA_0001,
    },
    Migration {
        name: "0002_job_counts",
        sql: crate::sync::pg::SCHEMA_0002,
    },
];

/// Every step [`migrate`] applies, in order: [`MIGRATIONS`], then the cluster's
/// (`cluster_0001_lease` …), whose SQL is idempotent so databases that already have some of those
/// tables migrate cleanly.
pub(crate) fn migrations() -> Vec<Migration> {
    MIGRATIONS
        .iter()
        .copied()
        .chain(crate::cluster::migrations().map(|&(name, sql)| Migration { name, sql }))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    #[error("storage.postgres_url: {0}")]
    Url(String),
    #[error("storage.postgres_ca_file: {0}")]
    CaFile(String),
    #[error("storage.postgres_url: TLS settings: {0}")]
    Tls(String),
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(String),
    #[error("PostgreSQL error: {0}")]
    Db(tokio_postgres::Error),
    #[error(
        "the database schema is missing step {missing:?}: it was made by another program or an older release that did not migrate"
    )]
    Schema { missing: String },
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(e)
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => classify(e),
            other => PgError::Unavailable(other.to_string()),
        }
    }
}

/// Errors the server answered with are bugs or constraint problems (`Db`), except the classes
/// that mean "not now": connection exceptions (08), operator intervention such as a shutdown (57)
/// and insufficient resources (53). Anything without a server answer (I/O, closed connection) is
/// `Unavailable`.
fn classify(e: tokio_postgres::Error) -> PgError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            if code.starts_with("08") || code.starts_with("57") || code.starts_with("53") {
                PgError::Unavailable(error_chain(&e))
            } else {
                PgError::Db(e)
            }
        }
        None => PgError::Unavailable(error_chain(&e)),
    }
}

/// `e` and its causes (tokio-postgres' own message is only the kind, such as "error performing
/// TLS handshake"; the cause says "server does not support TLS"). No cause holds the URL.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl PgError {
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(self, PgError::Unavailable(_))
    }
}

/// Runs `f` under [`OP_TIMEOUT`]: a query on a half-dead connection must not hang a handler.
pub(crate) async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    timed_for(OP_TIMEOUT, "no answer", f).await
}

/// Runs `f` under `limit`; past it, [`PgError::Unavailable`] saying `what` "within N s".
async fn timed_for<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(PgError::Unavailable(format!(
            "{what} within {} s",
            limit.as_secs()
        ))),
    }
}

/// How a replica reaches PostgreSQL: `storage.postgres_url`'s settings and the TLS connector that
/// honours its `sslmode` (see "TLS" in the module doc). The pool and the change-log subscription's
/// own connection are made from it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Connect {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `tokio_postgres::Config`'s Debug hides the password; the hosts are enough here.
        f.debug_struct("Connect")
            .field("hosts", &self.config.get_hosts())
            .field("ssl_mode", &self.config.get_ssl_mode())
            .finish_non_exhaustive()
    }
}

/// How much of the server's certificate is checked (libpq's `sslmode` meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// `disable`, `prefer`, `require`: encrypted when TLS is used, certificate not checked.
    Nothing,
    /// `verify-ca`: the certificate chains to a trusted CA; any host name.
    Chain,
    /// `verify-full`: the chain, and the certificate names the host connected to.
    ChainAndName,
}

impl Connect {
    /// `url` (`storage.postgres_url`) with its `sslmode`; `ca_file` (`storage.postgres_ca_file`):
    /// the CAs trusted by `verify-ca` and `verify-full` (the system's when unset). No connection
    /// is made here. Errors name the key and never hold the URL.
    pub(crate) fn new(url: &SecretString, ca_file: Option<&Path>) -> Result<Connect, PgError> {
        let (url, verify) = take_verify_mode(url.expose_secret());
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgError::Url(error_chain(&e)))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(3));
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("deskline");
        }
        // Notice a peer that vanished without a FIN (a cut network) within about a minute.
        cfg.keepalives_idle(Duration::from_secs(30));
        Ok(Connect {
            config: cfg,
            tls: tls_connector(verify, ca_file)?,
        })
    }
}

/// `url` with `sslmode=verify-full` / `verify-ca` (which tokio-postgres does not parse) turned into
/// `sslmode=require` (TLS required), and how much to verify. Works on both URL and `key=value`
/// forms: the option is recognised only at the start of a parameter.
fn take_verify_mode(url: &str) -> (String, Verify) {
    for (mode, verify) in [
        ("verify-full", Verify::ChainAndName),
        ("verify-ca", Verify::Chain),
    ] {
        let option = format!("sslmode={mode}");
        let found = url.match_indices(&option).find(|(i, _)| {
            let before = url[..*i].chars().next_back();
            let after = url[*i + option.len()..].chars().next();
            matches!(before, None | Some('?' | '&' | ' ' | '\t'))
                && matches!(after, None | Some('&' | ' ' | '\t'))
        });
        if let Some((i, _)) = found {
            let mut out = url.to_owned();
            out.replace_range(i..i + option.len(), "sslmode=require");
            return (out, verify);
        }
    }
    (url.to_owned(), Verify::Nothing)
}

/// The rustls connector for `verify` (aws-lc, the provider the rest of the process uses).
fn tls_connector(verify: Verify, ca_file: Option<&Path>) -> Result<MakeRustlsConnect, PgError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?;
    let config = match verify {
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(tls::NoCertificateCheck(provider)))
            .with_no_client_auth(),
        Verify::Chain | Verify::ChainAndName => {
            let roots = Arc::new(tls::roots(ca_file)?);
            let webpki =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| PgError::Tls(e.to_string()))?;
            if verify == Verify::ChainAndName {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(tls::ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The certificate checks `sslmode` asks for, as rustls verifiers.
mod tls {
    use std::{path::Path, sync::Arc};

    use rustls::{
        CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
        client::{
            WebPkiServerVerifier,
            danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        },
        crypto::CryptoProvider,
        pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    };

    use super::PgError;

    /// The CAs in `ca_file` (PEM), else the system's.
    pub(super) fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, PgError> {
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let bad =
                    |e: &dyn std::fmt::Display| PgError::CaFile(format!("{}: {e}", path.display()));
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| bad(&e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(&e))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(bad(&"no usable PEM certificate in it"));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(PgError::CaFile(
                        "unset, and no system CA certificate was found: sslmode=verify-ca or \
                         verify-full needs one"
                            .into(),
                    ));
                }
            }
        }
        Ok(roots)
    }

    /// `disable`, `prefer`, `require` (libpq without a root certificate): the session is encrypted
    /// but the server is not authenticated. The handshake's signatures are still checked.
    #[derive(Debug)]
    pub(super) struct NoCertificateCheck(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoCertificateCheck {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the chain is checked, the host name is not (the certificate names another).
    #[derive(Debug)]
    pub(super) struct ChainOnly(pub Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            // webpki checks the chain first and the name last: a name error means the chain held.
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

/// A pool for `url` with no CA file (see [`Connect::new`]).
pub(crate) fn pool(url: &SecretString, max_size: usize) -> Result<Pool, PgError> {
    pool_with(&Connect::new(url, None)?, max_size)
}

/// A pool over `connect` (connections are made lazily, so this succeeds while PostgreSQL is down).
pub(crate) fn pool_with(connect: &Connect, max_size: usize) -> Result<Pool, PgError> {
    let mgr = Manager::from_config(
        connect.config.clone(),
        connect.tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(OP_TIMEOUT))
        .create_timeout(Some(Duration::from_secs(3)))
        .recycle_timeout(Some(Duration::from_secs(3)))
        .build()
        .map_err(|e| PgError::Url(e.to_string()))
}

/// Applies the missing [`migrations`] (see the module doc); returns how many were applied now.
/// The whole of it, the wait for another replica's migration included, runs under
/// [`MIGRATE_TIMEOUT`].
pub(crate) async fn migrate(pool: &Pool) -> Result<usize, PgError> {
    migrate_within(pool, MIGRATE_TIMEOUT).await
}

/// [`migrate`] under `limit` (tests shorten it).
async fn migrate_within(pool: &Pool, limit: Duration) -> Result<usize, PgError> {
    let what = "the schema migration (waiting for another replica's included) did not finish";
    timed_for(limit, what, async {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext(current_schema() || ':migrations'))",
            &[&LOCK_NAMESPACE],
        )
        .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS deskline_migrations (
                 name       TEXT PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let applied: HashSet<String> = tx
            .query("SELECT name FROM deskline_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut count = 0;
        for m in migrations().iter().filter(|m| !applied.contains(m.name)) {
            tx.batch_execute(m.sql).await?;
            tx.execute(
                "INSERT INTO deskline_migrations (name) VALUES ($1)",
                &[&m.name],
            )
            .await?;
            tracing::info!(migration = m.name, "applied a schema migration");
            count += 1;
        }
        tx.commit().await?;
        Ok(count)
    })
    .await
}

/// What `deskline check` reports: the applied steps this binary knows, and the number it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemaVersion {
    pub applied: usize,
    pub known: usize,
    /// Known steps not applied (empty when the schema is current).
    pub missing: Vec<String>,
    /// Applied steps this binary does not know (a newer release migrated the database).
    pub newer: Vec<String>,
}

/// Reads the schema version without changing anything.
pub(crate) async fn schema_version(pool: &Pool) -> Result<SchemaVersion, PgError> {
    timed(async {
        let client = pool.get().await?;
        let exists: bool = client
            .query_one("SELECT to_regclass('deskline_migrations') IS NOT NULL", &[])
            .await?
            .get(0);
        let names: Vec<String> = if exists {
            client
                .query("SELECT name FROM deskline_migrations", &[])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            Vec::new()
        };
        let all = migrations();
        let known: HashSet<&str> = all.iter().map(|m| m.name).collect();
        Ok(SchemaVersion {
            applied: all
                .iter()
                .filter(|m| names.iter().any(|n| n == m.name))
                .count(),
            known: all.len(),
            missing: all
                .iter()
                .filter(|m| !names.iter().any(|n| n == m.name))
                .map(|m| m.name.to_owned())
                .collect(),
            newer: names
                .into_iter()
                .filter(|n| !known.contains(n.as_str()))
                .collect(),
        })
    })
    .await
}

/// Fails when a step this binary knows is missing (used after [`migrate`] as a sanity check and
/// by `deskline check`).
pub(crate) fn require_current(v: &SchemaVersion) -> Result<(), PgError> {
    match v.missing.first() {
        Some(m) => Err(PgError::Schema { missing: m.clone() }),
        None => Ok(()),
    }
}

/// For tests (unit and end-to-end): a fresh schema per test in the database named by
/// `DESKLINE_TEST_POSTGRES_URL`, dropped when the value is dropped, so tests run in parallel.
#[doc(hidden)]
pub mod testing {
    use rand::Rng;
    use secrecy::SecretString;
    use tokio_postgres::NoTls;

    pub const ENV: &str = "DESKLINE_TEST_POSTGRES_URL";

    pub struct TestSchema {
        base: String,
        pub name: String,
    }

    impl TestSchema {
        /// `None` (after saying so on stderr) when the variable is unset; panics when it is set
        /// but PostgreSQL cannot be reached, and when `CI=true` and it is unset: CI must fail,
        /// not skip.
        pub async fn new() -> Option<TestSchema> {
            let Ok(base) = std::env::var(ENV) else {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{ENV} must be set in CI (see .ci/run)");
                }
                eprintln!("skipped: {ENV} not set");
                return None;
            };
            let name = format!("dl_test_{:016x}", rand::rng().random::<u64>());
            let (client, conn) = tokio_postgres::connect(&base, NoTls)
                .await
                .unwrap_or_else(|e| panic!("{ENV}={base}: PostgreSQL is unreachable: {e}"));
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE SCHEMA {name}"))
                .await
                .expect("create the test schema");
            Some(TestSchema { base, name })
        }

        /// The URL with `search_path` set to this schema (what a `deskline serve` config takes).
        pub fn url(&self) -> String {
            let sep = if self.base.contains('?') { '&' } else { '?' };
            format!("{}{sep}options=-c%20search_path%3D{}", self.base, self.name)
        }

        /// [`url`](Self::url) with host and port replaced by `addr` (e.g. a [`Proxy`]).
        pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
            let url = self.url();
            let start = url
                .find('@')
                .map(|i| i + 1)
                .unwrap_or_else(|| url.find("://").map(|i| i + 3).expect("a postgres:// URL"));
            let end = url[start..]
                .find(['/', '?'])
                .map_or(url.len(), |i| start + i);
            format!("{}{addr}{}", &url[..start], &url[end..])
        }

        pub(crate) fn secret_url(&self) -> SecretString {
            SecretString::from(self.url())
        }

        /// A migrated pool on this schema.
        pub async fn pool(&self) -> deadpool_postgres::Pool {
            let pool = super::pool(&self.secret_url(), 8).expect("pool");
            super::migrate(&pool).await.expect("migrate");
            pool
        }

        /// A new pool of `size` connections on this schema, not migrating (one per simulated
        /// replica; migrate once with [`pool`](Self::pool) or [`super::migrate`] first).
        pub fn pool_of(&self, size: usize) -> deadpool_postgres::Pool {
            super::pool(&self.secret_url(), size).expect("pool")
        }

        /// The PostgreSQL job store on this schema, migrated, with its spool in `data_dir`: what a
        /// replica's metrics read (benches).
        pub async fn job_store(&self, data_dir: &std::path::Path) -> crate::sync::JobStore {
            let queue = crate::sync::PgQueue::new(
                self.pool().await,
                std::time::Duration::from_secs(30),
                "bench",
            );
            crate::sync::JobStore::postgres(queue, data_dir)
                .await
                .expect("the spool")
        }

        #[cfg(test)]
        /// Connection settings on this schema (what `ChangeLog::subscribe` takes).
        pub(crate) fn config(&self) -> super::Connect {
            super::Connect::new(&self.secret_url(), None).expect("a postgres URL")
        }
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            let (base, name) = (self.base.clone(), self.name.clone());
            // Drop may run outside a runtime (or in one that is shutting down): use a thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let (client, conn) = tokio_postgres::connect(&base, NoTls).await.ok()?;
                    tokio::spawn(conn);
                    client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .await
                        .ok()
                })
            })
            .join();
        }
    }

    /// Folds the job counters' pending changes now, as housekeeping does every minute; returns
    /// how many (0 for SQLite). For benches that measure a scrape in its usual state.
    pub async fn fold_job_counts(store: &crate::sync::JobStore) -> u64 {
        store.compact_counts().await.expect("fold the job counters")
    }

    /// What a [`Proxy`] lets through.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Link {
        Up,
        /// Bytes are held (connections stay open, nothing passes) until restored: a network that
        /// drops packets, or a server that hangs.
        Hung,
        /// New connections are refused and open ones closed.
        Cut,
    }

    /// A TCP proxy to PostgreSQL that a test can cut (refusing new connections and killing open
    /// ones), hang (holding every byte, connections left open) and restore: "PostgreSQL
    /// unreachable" without stopping the shared server.
    pub struct Proxy {
        pub addr: std::net::SocketAddr,
        link: std::sync::Arc<tokio::sync::watch::Sender<Link>>,
        conns: std::sync::Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
        accept: tokio::task::JoinHandle<()>,
    }

    impl Proxy {
        /// Proxies to the host and port of `DESKLINE_TEST_POSTGRES_URL`'s server.
        pub async fn start(schema: &TestSchema) -> Proxy {
            Self::start_with(schema, false).await
        }

        /// [`start`](Self::start), but the proxy answers a client's TLS request with `N` itself
        /// (never forwarding it): to the client, a server without TLS, whatever the real one has.
        pub async fn start_without_tls(schema: &TestSchema) -> Proxy {
            Self::start_with(schema, true).await
        }

        async fn start_with(schema: &TestSchema, refuse_tls: bool) -> Proxy {
            let cfg: tokio_postgres::Config = schema.base.parse().expect("a postgres URL");
            let host = match cfg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "127.0.0.1".to_owned(),
            };
            let port = cfg.get_ports().first().copied().unwrap_or(5432);
            let target = format!("{host}:{port}");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let link = std::sync::Arc::new(tokio::sync::watch::Sender::new(Link::Up));
            let conns: std::sync::Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
                Default::default();
            let accept = tokio::spawn({
                let (link, conns) = (link.clone(), conns.clone());
                async move {
                    while let Ok((inbound, _)) = listener.accept().await {
                        if *link.borrow() == Link::Cut {
                            continue; // dropped: the client sees the connection closed
                        }
                        let (target, rx) = (target.clone(), link.subscribe());
                        conns.lock().push(tokio::spawn(async move {
                            if let Ok(out) = tokio::net::TcpStream::connect(&target).await {
                                let mut inbound = inbound;
                                let mut out = out;
                                if refuse_tls
                                    && refuse_ssl_request(&mut inbound, &mut out).await.is_err()
                                {
                                    return;
                                }
                                let (from_client, to_client) = inbound.into_split();
                                let (from_server, to_server) = out.into_split();
                                tokio::join!(
                                    pump(from_client, to_server, rx.clone()),
                                    pump(from_server, to_client, rx)
                                );
                            }
                        }));
                    }
                }
            });
            Proxy {
                addr,
                link,
                conns,
                accept,
            }
        }

        /// PostgreSQL becomes unreachable through the proxy: connections are refused or closed.
        pub fn cut(&self) {
            self.link.send_replace(Link::Cut);
            for c in self.conns.lock().drain(..) {
                c.abort();
            }
        }

        /// PostgreSQL hangs: connections open (new ones too) but no byte passes either way until
        /// [`restore`](Self::restore), so every query waits for its caller's timeout.
        pub fn hang(&self) {
            self.link.send_replace(Link::Hung);
        }

        /// Bytes pass again (the ones held by [`hang`](Self::hang) first).
        pub fn restore(&self) {
            self.link.send_replace(Link::Up);
        }
    }

    /// Reads the client's first message: an SSLRequest (length 8, code 80877103) is answered `N`;
    /// anything else is passed on to the server.
    async fn refuse_ssl_request(
        client: &mut tokio::net::TcpStream,
        server: &mut tokio::net::TcpStream,
    ) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut first = [0u8; 8];
        client.read_exact(&mut first).await?;
        if first == [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] {
            client.write_all(b"N").await
        } else {
            server.write_all(&first).await
        }
    }

    /// Copies one direction of a proxied connection, holding each read while the link is hung.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut link: tokio::sync::watch::Receiver<Link>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match link.wait_for(|l| *l != Link::Hung).await {
                Ok(l) if *l == Link::Up => {}
                _ => break,
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.cut();
            self.accept.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    #[test]
    fn verify_modes_are_taken_only_as_whole_options() {
        let take = |url: &str| take_verify_mode(url);
        assert_eq!(
            take("postgres://u:pw@db/x?sslmode=verify-full"),
            (
                "postgres://u:pw@db/x?sslmode=require".into(),
                Verify::ChainAndName
            )
        );
        assert_eq!(
            take("postgres://u@db/x?application_name=a&sslmode=verify-ca&connect_timeout=3"),
            (
                "postgres://u@db/x?application_name=a&sslmode=require&connect_timeout=3".into(),
                Verify::Chain
            )
        );
        assert_eq!(
            take("host=db user=u sslmode=verify-full dbname=x"),
            (
                "host=db user=u sslmode=require dbname=x".into(),
                Verify::ChainAndName
            )
        );
        for url in [
            "postgres://u@db/x?sslmode=require",
            "postgres://u@db/x",
            // Inside a password, not an option.
            "postgres://u:xsslmode=verify-full@db/x",
            "postgres://u@db/x?sslmode=verify-fuller",
        ] {
            assert_eq!(take(url), (url.to_owned(), Verify::Nothing), "{url}");
        }
    }

    /// Two replicas starting together on a loaded machine: the second waits for the first's
    /// migration lock longer than [`OP_TIMEOUT`]. It must wait on (and then find the schema to
    /// migrate), not give up: here another session holds the lock `OP_TIMEOUT` + 1 s. A migration
    /// held past its own limit fails with a message that says what it waited for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_waits_for_a_lock_held_longer_than_an_operation_timeout() {
        let Some(db) = TestSchema::new().await else {
            return;
        };
        let holder = db.pool_of(1);
        let holder = holder.get().await.unwrap();
        holder
            .execute(
                "SELECT pg_advisory_lock($1, hashtext(current_schema() || ':migrations'))",
                &[&LOCK_NAMESPACE],
            )
            .await
            .unwrap();
        // Sessions waiting for the lock this session holds.
        let waiting = || async {
            let row = holder
                .query_one(
                    "SELECT count(*) FROM pg_locks w JOIN pg_locks h
                         ON h.locktype = 'advisory' AND h.granted AND h.pid = pg_backend_pid()
                        AND w.classid = h.classid AND w.objid = h.objid AND w.objsubid = h.objsubid
                      WHERE w.locktype = 'advisory' AND NOT w.granted",
                    &[],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0)
        };

        let started = tokio::time::Instant::now();
        let pool = db.pool_of(2);
        let migrating = tokio::spawn(async move { migrate(&pool).await });
        let until = started + Duration::from_secs(10);
        while waiting().await == 0 {
            assert!(
                tokio::time::Instant::now() < until,
                "the migration never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The scenario itself: the other replica's migration outlasts one operation timeout.
        tokio::time::sleep_until(started + OP_TIMEOUT + Duration::from_secs(1)).await;
        assert!(!migrating.is_finished(), "still waiting for the lock");
        holder
            .execute(
                "SELECT pg_advisory_unlock($1, hashtext(current_schema() || ':migrations'))",
                &[&LOCK_NAMESPACE],
            )
            .await
            .unwrap();
        let applied = tokio::time::timeout(Duration::from_secs(30), migrating)
            .await
            .expect("the migration ends once the lock is free")
            .unwrap()
            .unwrap();
        assert_eq!(applied, migrations().len());
        let v = schema_version(&db.pool_of(1)).await.unwrap();
        assert!(v.missing.is_empty(), "{v:?}");

        // Held past the migration's own limit: a failure that says what it waited for.
        holder
            .execute(
                "SELECT pg_advisory_lock($1, hashtext(current_schema() || ':migrations'))",
                &[&LOCK_NAMESPACE],
            )
            .await
            .unwrap();
        let err = migrate_within(&db.pool_of(1), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        let err = err.to_string();
        assert!(
            err.contains("the schema migration") && err.contains("within 1 s"),
            "{err}"
        );
    }

    const PASSWORD: &str = "pw-Secret-4242";

    /// `url` with a password (ignored by the test server's trust authentication) and `sslmode`.
    fn with(url: &str, mode: &str) -> SecretString {
        let at = url.find('@').expect("a user in the URL");
        let (user, rest) = url.split_at(at);
        SecretString::from(format!("{user}:{PASSWORD}{rest}&sslmode={mode}"))
    }

    /// Whether this session's connection is encrypted, as the server says.
    async fn encrypted(url: &SecretString, ca_file: Option<&Path>) -> Result<bool, PgError> {
        let pool = pool_with(&Connect::new(url, ca_file)?, 1)?;
        let c = pool.get().await?;
        let row = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// A server without TLS (a proxy that answers the TLS request `N`): `require` (and the
    /// verify modes) fail with an error that names `storage.postgres_url` and says why, never
    /// the password, both from `deskline check` and when a replica starts; `disable` and
    /// `prefer` connect in plain text.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sslmode_against_a_server_without_tls() {
        let Some(db) = TestSchema::new().await else {
            return;
        };
        drop(db.pool().await);
        let proxy = Proxy::start_without_tls(&db).await;
        let url = db.url_via(proxy.addr);
        for mode in ["disable", "prefer"] {
            assert!(!encrypted(&with(&url, mode), None).await.unwrap(), "{mode}");
        }
        for mode in ["require", "verify-ca", "verify-full"] {
            let url = with(&url, mode);
            let config = crate::config::Config::from_toml_and_env(
                &format!(
                    "[zendesk]\nurl = \"https://acme.zendesk.com\"\nemail = \"ops@acme.com\"\n\
                     token = \"t0ken-value\"\n[storage]\npostgres_url = \"{}\"\n",
                    url.expose_secret()
                ),
                Path::new("t.toml"),
                std::iter::empty(),
            )
            .unwrap();
            let found: Vec<String> = crate::check::storage(&config)
                .await
                .iter()
                .map(|f| f.to_string())
                .collect();
            let text = found.join("\n");
            assert!(
                text.starts_with("problem: storage.postgres_url:")
                    && text.contains("server does not support TLS"),
                "{mode}: {text}"
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut config = config;
            config.storage.data_dir = dir.path().to_owned();
            let err = match crate::app::Service::start(config, listener).await {
                Ok(_) => panic!("{mode}: started without TLS"),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains("storage.postgres_url") && err.contains("server does not support TLS"),
                "{mode}: {err}"
            );
            assert!(
                !text.contains(PASSWORD) && !err.contains(PASSWORD),
                "{text}\n{err}"
            );
        }
    }

    /// The test server with TLS on (skipped, saying so, when it is off): `require` and `prefer`
    /// encrypt, `disable` does not; `verify-full` refuses a certificate no trusted CA signed, and
    /// one that names another host; with the server's own certificate as the CA file,
    /// `verify-ca` accepts it whatever the host name, `verify-full` when connecting by its name.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sslmode_against_the_test_server() {
        let Some(db) = TestSchema::new().await else {
            return;
        };
        let pool = db.pool().await;
        let c = pool.get().await.unwrap();
        let ssl: String = c.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        let cert: String = c.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
        drop(c);
        if ssl != "on" || std::fs::metadata(&cert).is_err() {
            eprintln!(
                "skipped: the test server has no TLS (ssl = {ssl}) or its certificate is not readable here"
            );
            return;
        }
        let url = db.url();
        assert!(encrypted(&with(&url, "require"), None).await.unwrap());
        assert!(encrypted(&with(&url, "prefer"), None).await.unwrap());
        assert!(!encrypted(&with(&url, "disable"), None).await.unwrap());
        let unknown = encrypted(&with(&url, "verify-full"), None)
            .await
            .unwrap_err();
        assert!(unknown.to_string().contains("certificate"), "{unknown}");
        let cert = Path::new(&cert);
        // The certificate names `localhost` (Debian's snakeoil) or something else, never the
        // address the URL uses.
        let by_address = encrypted(&with(&url, "verify-full"), Some(cert))
            .await
            .unwrap_err();
        assert!(
            by_address.to_string().contains("certificate"),
            "{by_address}"
        );
        assert!(
            encrypted(&with(&url, "verify-ca"), Some(cert))
                .await
                .unwrap()
        );
        let by_name = url.replacen("@127.0.0.1:", "@localhost:", 1);
        if by_name != url {
            assert!(
                encrypted(&with(&by_name, "verify-full"), Some(cert))
                    .await
                    .unwrap()
            );
        }
        let missing = Connect::new(
            &with(&url, "verify-full"),
            Some(Path::new("/nonexistent/ca.pem")),
        );
        let missing = missing.unwrap_err().to_string();
        assert!(
            missing.starts_with("storage.postgres_ca_file:"),
            "{missing}"
        );
    }
}
