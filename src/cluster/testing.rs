//! Test support: a throw-away schema in the PostgreSQL named by `DESKLINE_TEST_POSTGRES_URL`.
//!
//! Each test gets its own randomly named schema (set as `search_path` on every connection), so
//! tests run in parallel in one database; the schema is dropped when the [`TestDb`] is dropped,
//! also when the test panics.

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

pub const URL_VAR: &str = "DESKLINE_TEST_POSTGRES_URL";

pub struct TestDb {
    url: String,
    pub schema: String,
    /// Connection settings with `search_path` set to the test's schema.
    pub config: tokio_postgres::Config,
}

impl TestDb {
    /// A fresh schema with every cluster migration applied, or `None` (after saying so) when the
    /// environment names no PostgreSQL.
    pub async fn new() -> Option<TestDb> {
        let Ok(url) = std::env::var(URL_VAR) else {
            println!("skipped: {URL_VAR} not set");
            return None;
        };
        let schema = format!("deskline_test_{:016x}", rand::random::<u64>());
        let admin = tokio_postgres::Config::from_str(&url).expect("bad test PostgreSQL URL");
        let (client, conn) = admin
            .connect(NoTls)
            .await
            .expect("test PostgreSQL unreachable");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("create test schema");
        let mut config = admin.clone();
        config.options(format!("-c search_path={schema}"));
        let db = TestDb {
            url,
            schema,
            config,
        };
        apply_migrations(&db.pool(4)).await;
        Some(db)
    }

    /// A new pool on the test schema (one per simulated replica).
    pub fn pool(&self, size: usize) -> Pool {
        let mgr = Manager::from_config(
            self.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(mgr).max_size(size).build().expect("pool")
    }
}

/// Applies [`super::MIGRATIONS`] the way the shared runner will: in one transaction under an advisory
/// lock, so replicas starting together do not race on `CREATE TABLE IF NOT EXISTS`.
pub async fn apply_migrations(pool: &Pool) {
    let mut client = pool.get().await.expect("connection");
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext('migrations'))",
        &[&super::LOCK_NAMESPACE],
    )
    .await
    .expect("migration lock");
    for (name, sql) in super::migrations() {
        tx.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("migration {name}: {e:?}"));
    }
    tx.commit().await.expect("commit migrations");
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Async drop does not exist; a separate thread with its own runtime works even while the
        // test's runtime is shutting down or unwinding from a panic.
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await
            })
            .map_err(std::io::Error::other)
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}", self.schema);
        }
    }
}

/// Waits for `cond` to hold, checking every few milliseconds, and fails the test at `deadline`.
pub async fn wait_for<F, Fut>(what: &str, deadline: std::time::Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
