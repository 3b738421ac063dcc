//! PostgreSQL, the store shared by several replicas (DESIGN §8): the connection pool and the
//! schema's migrations.
//!
//! # Driver
//! `tokio-postgres` with a `deadpool-postgres` pool: pure Rust, no compile-time query checking
//! (so no database is needed to build), few dependencies. Statements are prepared once per pooled
//! connection (`prepare_cached`). Connections are plain TCP: run PostgreSQL on a private network or
//! loopback until TLS is added.
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
//! Every operation runs under [`OP_TIMEOUT`]; a connection that cannot be made or an operation that
//! times out is [`PgError::Unavailable`], which callers treat as "PostgreSQL is down" (the spool in
//! [`crate::sync`] takes over) rather than as a bug.

use std::{collections::HashSet, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::NoTls;

/// First key of the advisory lock held while migrating (`'DSKL'`, the namespace `cluster` uses
/// too); the second is `hashtext(current_schema() || ':migrations')`, so two schemas (two accounts,
/// or two tests) migrate without waiting for each other.
pub(crate) const LOCK_NAMESPACE: i32 = 0x4453_4b4c;

/// The longest any single store operation may take before PostgreSQL counts as unavailable.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(5);

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
                PgError::Unavailable(e.to_string())
            } else {
                PgError::Db(e)
            }
        }
        None => PgError::Unavailable(e.to_string()),
    }
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
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(PgError::Unavailable(format!(
            "no answer within {} s",
            OP_TIMEOUT.as_secs()
        ))),
    }
}

/// A pool for `url` (connections are made lazily, so this succeeds while PostgreSQL is down).
pub(crate) fn pool(url: &SecretString, max_size: usize) -> Result<Pool, PgError> {
    let mut cfg: tokio_postgres::Config = url
        .expose_secret()
        .parse()
        .map_err(|e: tokio_postgres::Error| PgError::Url(e.to_string()))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(3));
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("deskline");
    }
    // Notice a peer that vanished without a FIN (a cut network) within about a minute.
    cfg.keepalives_idle(Duration::from_secs(30));
    let mgr = Manager::from_config(
        cfg,
        NoTls,
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
pub(crate) async fn migrate(pool: &Pool) -> Result<usize, PgError> {
    timed(async {
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
        pub(crate) fn config(&self) -> tokio_postgres::Config {
            self.url().parse().expect("a postgres URL")
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
