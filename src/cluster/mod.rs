//! Coordination of several Deskline replicas through one PostgreSQL database (DESIGN §8).
//!
//! Each primitive is a small, self-contained protocol over a `deadpool_postgres::Pool`:
//! - [`lease`]: a named lease (the export follower's) with a fencing `epoch`, timed by the
//!   database clock, so one replica at a time follows the exports and a stale one cannot write.
//! - [`budget`]: the account's Zendesk request budget shared by every replica: a sliding window of
//!   reservations, a 429 pause every replica honours, and a single half-open probe after it.
//! - [`changelog`]: the ordered log of index changes with `LISTEN/NOTIFY` delivery, so every
//!   replica's index follows the same sequence of changes within a second.
//! - [`snapshot`]: the latest index snapshot, stored in chunks, that a new replica starts from.
//!
//! Rules shared by all of them:
//! - **Time is the database's.** Expiry, windows and pauses are computed with PostgreSQL's
//!   `clock_timestamp()`, never a replica's wall clock, so clock skew between replicas cannot break
//!   a lease or a budget. A replica only turns a database duration into a local deadline, always
//!   conservatively (measured from before the query was sent).
//! - **Serialisation is explicit.** Where order matters, a transaction takes
//!   `pg_advisory_xact_lock` on a key derived from `current_schema()` and the protocol's name (see
//!   [`LOCK_NAMESPACE`]), so two schemas (two accounts, or two tests) never contend, and the lock is
//!   released by commit or rollback, never leaked by a dead replica.
//! - **Schema as named migrations.** Each module exposes `MIGRATIONS`, idempotent SQL applied by the
//!   shared migration runner (under its own advisory lock); [`MIGRATIONS`] lists them all in order.
//! - **Errors** are [`ClusterError`]; a lost PostgreSQL connection surfaces as an error to the caller,
//!   which decides how to degrade (DESIGN §8 "PostgreSQL down").
//!
//! Tests run against a real PostgreSQL named by `DESKLINE_TEST_POSTGRES_URL` (for example
//! `postgres://postgres@127.0.0.1:5432/test`), each in its own throw-away schema; without it they
//! print `skipped: DESKLINE_TEST_POSTGRES_URL not set` and pass.

pub(crate) mod budget;
pub(crate) mod changelog;
pub(crate) mod lease;
pub(crate) mod snapshot;

#[cfg(test)]
pub(crate) mod testing;

pub(crate) use budget::{
    BudgetKind, Grant, Reservation, SharedBudget, SharedBudgetConfig, SharedBudgetUsage,
};
pub(crate) use changelog::{ChangeLog, SubscriberConfig};
pub(crate) use lease::{Fence, Lease};
pub(crate) use snapshot::SharedSnapshot;

/// The first key of every advisory lock Deskline takes (`'DSKL'`); the second is
/// `hashtext(current_schema() || ':' || name)`. A hash collision between two names only serialises
/// two unrelated transactions, it never lets two holders in at once.
pub(crate) const LOCK_NAMESPACE: i32 = 0x4453_4b4c;

/// Every cluster migration, in the order they must run: (name, idempotent SQL).
pub(crate) const MIGRATIONS: &[&[(&str, &str)]] = &[
    lease::MIGRATIONS,
    budget::MIGRATIONS,
    changelog::MIGRATIONS,
    snapshot::MIGRATIONS,
];

/// [`MIGRATIONS`] flattened, in order, for the shared migration runner.
pub(crate) fn migrations() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    MIGRATIONS.iter().flat_map(|m| m.iter())
}

/// What can go wrong in a cluster primitive.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClusterError {
    #[error("no PostgreSQL connection from the pool")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL")]
    Db(#[from] tokio_postgres::Error),
    /// The lease was taken over or expired before it was renewed: stop acting as its holder.
    #[error("lease {name:?} (epoch {epoch}) is no longer held by {holder:?}")]
    LeaseLost {
        name: String,
        holder: String,
        epoch: i64,
    },
    /// A write carried a fence whose epoch is no longer the lease's current, live one.
    #[error("write refused: lease {name:?} epoch {epoch} is not the current holder's")]
    Fenced { name: String, epoch: i64 },
    /// The changes right after `after` were pruned: reload the latest snapshot, then follow on.
    #[error("change log pruned through seq {pruned_through}; changes after {after} are gone")]
    Pruned { after: i64, pruned_through: i64 },
    #[error("snapshot {id} is damaged: {reason}")]
    CorruptSnapshot { id: i64, reason: String },
    #[error("snapshot stream")]
    Io(#[from] std::io::Error),
}

/// Takes the transaction-scoped advisory lock named `name` within the current schema.
pub(crate) async fn advisory_xact_lock(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
) -> Result<(), ClusterError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(current_schema() || ':' || $2))",
        &[&LOCK_NAMESPACE, &name],
    )
    .await?;
    Ok(())
}

/// Seconds as PostgreSQL `float8`, for `make_interval(secs => $n)`.
pub(crate) fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// A database duration in seconds (possibly negative) as a `Duration`, clamped at zero.
pub(crate) fn from_secs(s: f64) -> std::time::Duration {
    if s.is_finite() && s > 0.0 {
        std::time::Duration::from_secs_f64(s)
    } else {
        std::time::Duration::ZERO
    }
}
