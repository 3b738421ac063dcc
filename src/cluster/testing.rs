//! Test support for the cluster primitives: a throw-away schema migrated by the shared runner
//! ([`crate::pg::migrate`], so tests exercise the same steps a replica's start applies), and a
//! deadline-bounded wait.

use crate::pg::testing::TestSchema;

/// A fresh schema with every migration applied, or `None` (after saying so) when the environment
/// names no PostgreSQL. The schema is dropped with the value, also when the test panics.
pub(crate) async fn migrated() -> Option<TestSchema> {
    let db = TestSchema::new().await?;
    drop(db.pool().await);
    Some(db)
}

/// Waits for `cond` to hold, checking every few milliseconds, and fails the test at `deadline`.
pub(crate) async fn wait_for<F, Fut>(what: &str, deadline: std::time::Duration, mut cond: F)
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
