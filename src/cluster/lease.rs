//! A named lease with fencing: one replica at a time holds `follower` and follows the exports.
//!
//! Protocol (table `cluster_lease`, one row per lease name, never deleted):
//! - **take**: one `INSERT … ON CONFLICT DO UPDATE … WHERE` statement succeeds only if the row is
//!   missing, expired (`expires_at <= clock_timestamp()`), or already ours and live. Taking a free or
//!   expired lease increments `epoch`; taking back our own live lease keeps it. The row lock of the
//!   upsert makes two simultaneous takers serialise: the second re-reads the row and sees it live.
//! - **renew**: `UPDATE … WHERE holder = me AND epoch = mine AND expires_at > clock_timestamp()`. No
//!   row means the lease expired or was taken over: [`ClusterError::LeaseLost`]. An expired lease is
//!   never silently renewed, even if nobody took it, because a writer may already have been fenced.
//! - **release**: sets `expires_at` to now (the row and its epoch stay, so epochs never go back).
//! - **Expiry is on the database clock.** The holder also keeps a local deadline, `sent + remaining`,
//!   where `sent` is taken before the statement left and `remaining` is computed by PostgreSQL:
//!   the local deadline is never later than the real expiry, so [`Lease::held`] turns `None` no
//!   later than another replica can take over (clock *rate* drift over one TTL is negligible).
//! - **Fencing.** A take returns a [`Fence`] with the new epoch. Every write that only the holder may
//!   make (change-log append, cursor store, snapshot store) calls [`Fence::check`] inside its own
//!   transaction: it locks the lease row `FOR SHARE` and requires our holder, our epoch and a live
//!   expiry. A takeover's `UPDATE` must wait for that share lock, so a write checked under epoch N
//!   commits before epoch N+1 exists, and every write checked after the takeover is refused with
//!   [`ClusterError::Fenced`]: a paused or partitioned old holder can never interleave its writes
//!   with the new holder's. The share lock also holds up the holder's own renewal, so a fenced
//!   transaction checks its fence as its last step before commit and stays short.
//! - **Keeping it.** [`Lease::keep`] is the loop a replica runs: take when free, renew every
//!   `ttl / 3`, publish the current fence (or `None`) on a `watch` channel, release on stop.

use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{ClusterError, from_secs, secs};

pub(crate) const MIGRATIONS: &[(&str, &str)] = &[(
    "cluster_0001_lease",
    "CREATE TABLE IF NOT EXISTS cluster_lease (
        name        text PRIMARY KEY,
        holder      text NOT NULL,
        epoch       bigint NOT NULL,
        acquired_at timestamptz NOT NULL,
        expires_at  timestamptz NOT NULL
    );",
)];

/// Proof of holding a lease at a given epoch, carried by writes that only the holder may make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fence {
    pub name: String,
    pub holder: String,
    pub epoch: i64,
}

impl Fence {
    /// Inside the caller's transaction: refuses the write unless this fence is the lease's current,
    /// live holder, and holds a share lock on the lease row until the transaction ends so that no
    /// takeover can commit in between.
    pub(crate) async fn check(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), ClusterError> {
        let live = tx
            .query_opt(
                "SELECT 1 FROM cluster_lease
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()
                 FOR SHARE",
                &[&self.name, &self.holder, &self.epoch],
            )
            .await?;
        match live {
            Some(_) => Ok(()),
            None => Err(ClusterError::Fenced {
                name: self.name.clone(),
                epoch: self.epoch,
            }),
        }
    }
}

/// Who holds a lease, as the database sees it (for metrics and `deskline check`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LeaseStatus {
    /// The live holder, if any.
    pub holder: Option<String>,
    /// Whether the live holder is this replica.
    pub is_self: bool,
    /// The current epoch (of the last take, live or not); 0 if never taken.
    pub epoch: i64,
    /// How long the live holder still has without renewing.
    pub expires_in: Duration,
    /// When the current epoch began (database clock).
    pub acquired_at: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    valid_until: Instant,
}

/// One replica's handle on a named lease.
pub(crate) struct Lease {
    pool: Pool,
    name: String,
    holder: String,
    ttl: Duration,
    held: Mutex<Option<Held>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// A handle on lease `name` for replica `holder` (a unique id per process), lasting `ttl`
    /// after each take or renewal. Renew well within the TTL (every `ttl / 3` is usual).
    pub(crate) fn new(
        pool: Pool,
        name: impl Into<String>,
        holder: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Self {
            pool,
            name: name.into(),
            holder: holder.into(),
            ttl,
            held: Mutex::new(None),
        }
    }

    /// Takes the lease if it is free, expired or already ours. `Some(fence)` on success (a new
    /// epoch unless we still held it), `None` while another replica holds it.
    pub(crate) async fn try_take(&self) -> Result<Option<Fence>, ClusterError> {
        let client = self.pool.get().await?;
        let sent = Instant::now();
        let row = client
            .query_opt(
                "INSERT INTO cluster_lease AS l (name, holder, epoch, acquired_at, expires_at)
                 VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (name) DO UPDATE SET
                     holder = EXCLUDED.holder,
                     epoch = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > clock_timestamp()
                                  THEN l.epoch ELSE l.epoch + 1 END,
                     acquired_at = CASE WHEN l.holder = EXCLUDED.holder
                                         AND l.expires_at > clock_timestamp()
                                        THEN l.acquired_at ELSE clock_timestamp() END,
                     expires_at = EXCLUDED.expires_at
                 WHERE l.expires_at <= clock_timestamp() OR l.holder = EXCLUDED.holder
                 RETURNING epoch,
                     extract(epoch FROM expires_at - clock_timestamp())::float8",
                &[&self.name, &self.holder, &secs(self.ttl)],
            )
            .await?;
        Ok(row.map(|row| {
            let epoch: i64 = row.get(0);
            self.set_held(epoch, sent, row.get(1));
            self.fence(epoch)
        }))
    }

    /// Extends our lease by the TTL. [`ClusterError::LeaseLost`] if it expired or was taken over:
    /// the caller must stop acting as holder at once (and may try [`Lease::try_take`] again).
    pub(crate) async fn renew(&self) -> Result<Fence, ClusterError> {
        let Some(held) = *self.held.lock() else {
            return Err(self.lost(0));
        };
        let client = self.pool.get().await?;
        let sent = Instant::now();
        let row = client
            .query_opt(
                "UPDATE cluster_lease
                 SET expires_at = clock_timestamp() + make_interval(secs => $4)
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()
                 RETURNING extract(epoch FROM expires_at - clock_timestamp())::float8",
                &[&self.name, &self.holder, &held.epoch, &secs(self.ttl)],
            )
            .await?;
        match row {
            Some(row) => {
                self.set_held(held.epoch, sent, row.get(0));
                Ok(self.fence(held.epoch))
            }
            None => {
                *self.held.lock() = None;
                Err(self.lost(held.epoch))
            }
        }
    }

    /// Gives the lease up now (if still ours), so another replica can take it without waiting for
    /// the TTL. The epoch stays, so the next holder's is higher.
    pub(crate) async fn release(&self) -> Result<(), ClusterError> {
        let Some(held) = self.held.lock().take() else {
            return Ok(());
        };
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE cluster_lease SET expires_at = clock_timestamp()
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()",
                &[&self.name, &self.holder, &held.epoch],
            )
            .await?;
        Ok(())
    }

    /// Our fence if we hold the lease by the local conservative deadline (no database round trip).
    /// `None` as soon as that deadline passes: stop following before anyone else can start.
    pub(crate) fn held(&self) -> Option<Fence> {
        let mut held = self.held.lock();
        match *held {
            Some(h) if Instant::now() < h.valid_until => Some(self.fence(h.epoch)),
            Some(_) => {
                *held = None;
                None
            }
            None => None,
        }
    }

    /// How long our hold lasts by the local deadline (zero if not held).
    pub(crate) fn remaining(&self) -> Duration {
        self.held.lock().map_or(Duration::ZERO, |h| {
            h.valid_until.saturating_duration_since(Instant::now())
        })
    }

    /// The lease as the database sees it now.
    pub(crate) async fn status(&self) -> Result<LeaseStatus, ClusterError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT holder, epoch, acquired_at, expires_at > clock_timestamp(),
                        extract(epoch FROM expires_at - clock_timestamp())::float8
                 FROM cluster_lease WHERE name = $1",
                &[&self.name],
            )
            .await?;
        Ok(match row {
            None => LeaseStatus {
                holder: None,
                is_self: false,
                epoch: 0,
                expires_in: Duration::ZERO,
                acquired_at: None,
            },
            Some(row) => {
                let live: bool = row.get(3);
                let holder: String = row.get(0);
                LeaseStatus {
                    is_self: live && holder == self.holder,
                    holder: live.then_some(holder),
                    epoch: row.get(1),
                    expires_in: from_secs(row.get(4)),
                    acquired_at: live.then(|| row.get(2)),
                }
            }
        })
    }

    /// Holds the lease for as long as it can until `stop`: takes it whenever it is free, renews it
    /// every `ttl / 3`, and publishes our fence on `fence` (`None` while another replica holds it,
    /// or as soon as our local deadline passes without a renewal, e.g. while PostgreSQL is
    /// unreachable). On `stop` it publishes `None` first, then releases the lease so another
    /// replica takes over at once. Meant to run as the follower's supervisor task: follow while the
    /// channel says `Some`, and pass that fence to every fenced write.
    pub(crate) async fn keep(
        &self,
        fence: tokio::sync::watch::Sender<Option<Fence>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let period = (self.ttl / 3).max(Duration::from_millis(10));
        loop {
            let holding = self.held().is_some();
            // A call that hangs (PostgreSQL unreachable) must not outlive our local deadline.
            let attempt = if holding {
                tokio::time::timeout(period, self.renew()).await
            } else {
                tokio::time::timeout(period, self.try_take())
                    .await
                    .map(|r| {
                        r.and_then(|f| {
                            f.ok_or_else(|| self.lost(0)) // held by someone else
                        })
                    })
            };
            let current = match attempt {
                Ok(Ok(f)) => Some(f),
                Ok(Err(ClusterError::LeaseLost { .. })) => {
                    if holding {
                        tracing::warn!(lease = %self.name, "lease lost to another replica");
                    }
                    None
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.name, error = %e,
                        source = ?std::error::Error::source(&e), "lease renewal failed");
                    self.held()
                }
                Err(_) => {
                    tracing::warn!(lease = %self.name, "lease renewal timed out");
                    self.held()
                }
            };
            let wake = match current {
                Some(_) => period.min(self.remaining()),
                None => period,
            };
            fence.send_if_modified(|old| {
                let changed = *old != current;
                *old = current;
                changed
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wake) => {}
            }
        }
        fence.send_replace(None);
        if let Err(e) = self.release().await {
            tracing::warn!(lease = %self.name, error = %e, "could not release the lease");
        }
    }

    fn set_held(&self, epoch: i64, sent: Instant, remaining_secs: f64) {
        *self.held.lock() = Some(Held {
            epoch,
            valid_until: sent + from_secs(remaining_secs),
        });
    }

    fn fence(&self, epoch: i64) -> Fence {
        Fence {
            name: self.name.clone(),
            holder: self.holder.clone(),
            epoch,
        }
    }

    fn lost(&self, epoch: i64) -> ClusterError {
        ClusterError::LeaseLost {
            name: self.name.clone(),
            holder: self.holder.clone(),
            epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::migrated;

    #[tokio::test]
    async fn two_holders_takeover_after_expiry_and_stale_holder_fenced() {
        let Some(db) = migrated().await else {
            return;
        };
        let ttl = Duration::from_millis(800);
        let a = Lease::new(db.pool_of(2), "follower", "replica-a", ttl);
        let b = Lease::new(db.pool_of(2), "follower", "replica-b", ttl);

        let fa = a.try_take().await.unwrap().expect("free lease is taken");
        assert_eq!(fa.epoch, 1);
        assert!(
            b.try_take().await.unwrap().is_none(),
            "a live lease is not taken"
        );
        let st = b.status().await.unwrap();
        assert_eq!(st.holder.as_deref(), Some("replica-a"));
        assert!(!st.is_self);
        assert!(a.status().await.unwrap().is_self);

        // Renewing keeps it past several TTLs; B never gets in meanwhile.
        let t0 = Instant::now();
        while t0.elapsed() < ttl * 2 {
            assert_eq!(a.renew().await.unwrap().epoch, 1);
            assert!(b.try_take().await.unwrap().is_none());
            tokio::time::sleep(ttl / 4).await;
        }
        // Taking back our own live lease is idempotent (same epoch).
        assert_eq!(a.try_take().await.unwrap().unwrap().epoch, 1);

        // A stops renewing: B takes over after the TTL, with a higher epoch.
        let stopped = Instant::now();
        let fb = loop {
            if let Some(f) = b.try_take().await.unwrap() {
                break f;
            }
            assert!(stopped.elapsed() < ttl * 5, "no takeover");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(fb.epoch > fa.epoch);
        // A's local view expired no later than the takeover.
        assert!(
            a.held().is_none(),
            "stale holder still believes it holds the lease"
        );
        // A learns it lost the lease when renewing.
        assert!(matches!(
            a.renew().await,
            Err(ClusterError::LeaseLost { .. })
        ));

        // Fencing: a write under A's epoch is refused, B's goes through.
        let pool = db.pool_of(1);
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        assert!(matches!(
            fa.check(&tx).await,
            Err(ClusterError::Fenced { .. })
        ));
        drop(tx);
        let tx = client.transaction().await.unwrap();
        fb.check(&tx).await.unwrap();
        tx.commit().await.unwrap();

        // Release hands over at once, and the epoch keeps rising.
        b.release().await.unwrap();
        assert!(b.held().is_none());
        let fa2 = a.try_take().await.unwrap().expect("released lease is free");
        assert_eq!(fa2.epoch, fb.epoch + 1);
        assert!(a.status().await.unwrap().is_self);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keep_hands_over_when_the_holder_dies_and_at_once_when_it_stops() {
        let Some(db) = migrated().await else {
            return;
        };
        let ttl = Duration::from_millis(1200);
        let a = std::sync::Arc::new(Lease::new(db.pool_of(1), "follower", "a", ttl));
        let b = std::sync::Arc::new(Lease::new(db.pool_of(1), "follower", "b", ttl));
        let start = |lease: &std::sync::Arc<Lease>| {
            let (tx, rx) = tokio::sync::watch::channel(None);
            let stop = tokio_util::sync::CancellationToken::new();
            let (lease, s) = (lease.clone(), stop.clone());
            let task = tokio::spawn(async move { lease.keep(tx, s).await });
            (rx, stop, task)
        };
        async fn until_some(
            rx: &mut tokio::sync::watch::Receiver<Option<Fence>>,
            within: Duration,
        ) -> Fence {
            let f = tokio::time::timeout(within, rx.wait_for(Option::is_some))
                .await
                .expect("lease not taken in time")
                .unwrap();
            f.clone().unwrap()
        }

        let (mut rx_a, _stop_a, task_a) = start(&a);
        let fa = until_some(&mut rx_a, Duration::from_secs(3)).await;
        let (mut rx_b, stop_b, task_b) = start(&b);
        // A keeps renewing: B stays out for several TTLs (an observation window).
        tokio::time::sleep(ttl * 3).await;
        assert!(rx_b.borrow().is_none());
        assert_eq!(rx_a.borrow().as_ref(), Some(&fa));

        // A dies without releasing: B takes over after the TTL, with a higher epoch, and A's local
        // view has expired by then.
        task_a.abort();
        let died = Instant::now();
        let fb = until_some(&mut rx_b, ttl * 4).await;
        assert!(
            died.elapsed() >= ttl / 2,
            "taken over before A's lease could expire"
        );
        assert!(fb.epoch > fa.epoch);
        assert!(a.held().is_none());

        // B stops: it publishes None and releases, so a new keeper takes over well before a TTL.
        stop_b.cancel();
        task_b.await.unwrap();
        assert!(rx_b.borrow().is_none());
        let stopped = Instant::now();
        let (mut rx_a2, stop_a2, task_a2) = start(&a);
        let fa2 = until_some(&mut rx_a2, ttl).await;
        assert!(
            stopped.elapsed() < ttl,
            "the stopped holder did not release"
        );
        assert_eq!(fa2.epoch, fb.epoch + 1);
        stop_a2.cancel();
        task_a2.await.unwrap();
    }

    #[tokio::test]
    async fn takeover_waits_for_a_fenced_write_in_flight() {
        let Some(db) = migrated().await else {
            return;
        };
        let ttl = Duration::from_millis(300);
        let a = Lease::new(db.pool_of(1), "follower", "replica-a", ttl);
        let b = Lease::new(db.pool_of(1), "follower", "replica-b", ttl);
        let fa = a.try_take().await.unwrap().unwrap();
        // A checks its fence inside a transaction that stays open past the TTL.
        let pool = db.pool_of(1);
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        fa.check(&tx).await.unwrap();
        let taking = tokio::spawn(async move {
            loop {
                if let Some(f) = b.try_take().await.unwrap() {
                    return (f, Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        tokio::time::sleep(ttl * 2).await;
        assert!(
            !taking.is_finished(),
            "takeover committed while a fenced write was open"
        );
        let committed = Instant::now();
        tx.commit().await.unwrap();
        let (fb, taken_at) = taking.await.unwrap();
        assert!(taken_at >= committed);
        assert_eq!(fb.epoch, fa.epoch + 1);
        assert_eq!(a.status().await.unwrap().epoch, fb.epoch);
    }
}
