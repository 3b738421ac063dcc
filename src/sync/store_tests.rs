//! One queue test suite, run against both stores: the embedded SQLite queue and PostgreSQL (a
//! fresh schema per test in `DESKLINE_TEST_POSTGRES_URL`; skipped, saying so, without it).
//!
//! Each test is a generic function over a [`Backend`]; `suite!` instantiates it for both. What
//! differs between the stores is only how an interrupted job comes back: SQLite re-queues it when
//! the (single) process reopens the file, PostgreSQL when its lease runs out, on any replica.

use std::{
    collections::{BTreeMap, HashSet},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use super::{
    JobStore, PgQueue, StoreError, SyncState,
    queue::{Progress, Queue, now_ms},
    test_support::report,
};
use crate::{
    pg::testing::{Proxy, TestSchema},
    phone::E164,
};

/// Short, so tests of lease expiry wait about a second.
const LEASE: Duration = Duration::from_millis(1000);

pub(super) struct Backend {
    dir: tempfile::TempDir,
    pg: Option<(TestSchema, deadpool_postgres::Pool)>,
    /// The SQLite store is one process: its "replicas" share one handle.
    sqlite: parking_lot::Mutex<Option<JobStore>>,
    replicas: AtomicUsize,
}

impl Backend {
    async fn sqlite() -> Backend {
        Backend {
            dir: tempfile::tempdir().unwrap(),
            pg: None,
            sqlite: parking_lot::Mutex::new(None),
            replicas: AtomicUsize::new(0),
        }
    }

    async fn postgres() -> Option<Backend> {
        let schema = TestSchema::new().await?;
        let pool = schema.pool().await;
        Some(Backend {
            dir: tempfile::tempdir().unwrap(),
            pg: Some((schema, pool)),
            sqlite: parking_lot::Mutex::new(None),
            replicas: AtomicUsize::new(0),
        })
    }

    /// A store over the same data, as a (re)started process sees it: SQLite reopens the file
    /// (which re-queues interrupted jobs), PostgreSQL starts another replica.
    async fn open(&self) -> JobStore {
        let n = self.replicas.fetch_add(1, Ordering::Relaxed);
        match &self.pg {
            None => {
                let mut slot = self.sqlite.lock();
                *slot = None; // the previous handle is "the crashed process"
                let q: JobStore = Queue::open(self.dir.path()).unwrap().into();
                *slot = Some(q.clone());
                q
            }
            Some((_, pool)) => JobStore::postgres(
                PgQueue::new(pool.clone(), LEASE, format!("test-replica-{n}")),
                &self.dir.path().join(format!("replica-{n}")),
            )
            .await
            .unwrap(),
        }
    }

    /// Jobs per state as `GROUP BY` over the rows says (the truth the kept counters must equal).
    async fn truth(&self) -> BTreeMap<SyncState, u64> {
        let rows: Vec<(String, i64)> = match &self.pg {
            None => {
                let conn =
                    rusqlite::Connection::open(self.dir.path().join("queue.sqlite3")).unwrap();
                let mut stmt = conn
                    .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                    .unwrap();
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
            Some((_, pool)) => pool
                .get()
                .await
                .unwrap()
                .query("SELECT state, COUNT(*) FROM jobs GROUP BY state", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        };
        let mut out: BTreeMap<SyncState, u64> =
            SyncState::ALL.into_iter().map(|s| (s, 0)).collect();
        for (state, n) in rows {
            out.insert(SyncState::parse(&state).unwrap(), n as u64);
        }
        out
    }

    /// Another replica running beside `first` (SQLite: the same handle, one process).
    async fn replica(&self, first: &JobStore) -> JobStore {
        match &self.pg {
            None => first.clone(),
            Some(_) => self.open().await,
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, failing after `deadline`.
async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(b) = super::Backend::postgres().await else { return };
                    super::$name(b).await
                }
            )*
        }
    };
}

suite!(
    duplicate_call_id_changes_nothing,
    reports_survive_reopen_and_an_interrupted_job_resumes_from_its_steps,
    state_machine,
    one_job_per_number_at_a_time,
    a_retrying_job_keeps_later_jobs_of_its_number_waiting,
    own_users_survive_reopen,
    concurrent_enqueue_of_one_id_stores_one_job,
    concurrent_claims_take_each_job_once_and_each_number_once,
    kept_counts_equal_the_rows_after_every_change,
);

async fn duplicate_call_id_changes_nothing(b: Backend) {
    let q = b.open().await;
    let first = report("c1", 380441234567);
    assert!(!q.enqueue(&first).await.unwrap());
    let mut second = report("c1", 380501112233);
    second.employee_name = "Someone Else".into();
    assert!(q.enqueue(&second).await.unwrap());
    let job = q.claim().await.unwrap().unwrap();
    assert_eq!(job.report, first, "the first report wins");
    assert!(q.claim().await.unwrap().is_none());
    let counts = q.counts().await.unwrap();
    assert_eq!(counts[&SyncState::InProgress], 1);
    assert_eq!(counts.values().sum::<u64>(), 1);
}

async fn reports_survive_reopen_and_an_interrupted_job_resumes_from_its_steps(b: Backend) {
    {
        let q = b.open().await;
        q.enqueue(&report("c1", 380441234567)).await.unwrap();
        q.enqueue(&report("c2", 380441234568)).await.unwrap();
        let job = q.claim().await.unwrap().unwrap();
        let p = Progress {
            user_id: 7,
            created_user: true,
            ..Progress::default()
        };
        q.save_progress(&job, &p).await.unwrap();
        // Dropped without finishing or renewing: a crash.
    }
    let q = b.open().await;
    let st = q.status("c1").await.unwrap().unwrap();
    assert_eq!((st.attempts, st.user_id, st.created_user), (1, 7, true));
    // c2 was never claimed; c1 comes back: at once in SQLite (reopen re-queues it), after its
    // lease in PostgreSQL (c2 meanwhile).
    let mut claimed = Vec::new();
    let end = tokio::time::Instant::now() + LEASE * 5;
    let job = loop {
        match q.claim().await.unwrap() {
            Some(j) if j.report.call_id == "c1" => break j,
            Some(j) => claimed.push(j.report.call_id),
            None => {
                assert!(
                    tokio::time::Instant::now() < end,
                    "the interrupted job never came back"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(job.attempts, 2);
    assert_eq!(
        job.progress.user_id, 7,
        "the retry resumes from the recorded step"
    );
    if claimed.is_empty() {
        assert_eq!(q.claim().await.unwrap().unwrap().report.call_id, "c2");
    } else {
        assert_eq!(claimed, ["c2"]);
    }
    assert!(q.status("nope").await.unwrap().is_none());
}

async fn state_machine(b: Backend) {
    let q = b.open().await;
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        q.enqueue(&report(id, 380441234560 + i as u64))
            .await
            .unwrap();
    }
    let a = q.claim().await.unwrap().unwrap();
    assert_eq!(
        q.status("a").await.unwrap().unwrap().state,
        SyncState::InProgress
    );
    q.finish(&a).await.unwrap();
    let bj = q.claim().await.unwrap().unwrap();
    q.fail(&bj, "Zendesk rejected the request (HTTP 422): bad".into())
        .await
        .unwrap();
    let c = q.claim().await.unwrap().unwrap();
    let due = now_ms() + 60_000;
    q.retry_at(&c, due, "HTTP 503".into()).await.unwrap();

    let st = q.status("a").await.unwrap().unwrap();
    assert_eq!((st.state, st.last_error.as_str()), (SyncState::Done, ""));
    let st = q.status("b").await.unwrap().unwrap();
    assert_eq!(st.state, SyncState::Failed);
    assert!(st.last_error.contains("HTTP 422"));
    let st = q.status("c").await.unwrap().unwrap();
    assert_eq!(st.state, SyncState::RetryWait);
    assert_eq!(st.next_attempt_at, Some((due + 999) / 1000));
    assert_eq!(q.next_due_ms().await.unwrap(), Some(due));
    // Not due yet: nothing to claim.
    assert!(q.claim().await.unwrap().is_none());
    // A due retry is claimable again, with the attempt counted. (`retry_at` ends a claim, so a
    // second job shows it rather than re-scheduling `c`.)
    let c2 = report("d", 380441234599);
    q.enqueue(&c2).await.unwrap();
    let d = q.claim().await.unwrap().unwrap();
    q.retry_at(&d, now_ms() - 1, "HTTP 503".into())
        .await
        .unwrap();
    let again = q.claim().await.unwrap().unwrap();
    assert_eq!((again.report.call_id.as_str(), again.attempts), ("d", 2));
    q.release(&again).await.unwrap();
    assert_eq!(
        q.status("d").await.unwrap().unwrap().state,
        SyncState::Queued
    );

    let counts = q.counts().await.unwrap();
    assert_eq!(counts[&SyncState::Done], 1);
    assert_eq!(counts[&SyncState::Failed], 1);
    assert_eq!(counts[&SyncState::Queued], 1);
    assert_eq!(counts[&SyncState::RetryWait], 1);
}

async fn one_job_per_number_at_a_time(b: Backend) {
    let q = b.open().await;
    q.enqueue(&report("n1-a", 380441234567)).await.unwrap();
    q.enqueue(&report("n1-b", 380441234567)).await.unwrap();
    q.enqueue(&report("n2-a", 380501112233)).await.unwrap();
    let first = q.claim().await.unwrap().unwrap();
    let second = q.claim().await.unwrap().unwrap();
    assert_eq!(first.report.call_id, "n1-a");
    assert_eq!(second.report.call_id, "n2-a", "n1-b waits for n1-a");
    assert!(q.claim().await.unwrap().is_none());
    // Nor can another replica take it.
    let r2 = b.replica(&q).await;
    assert!(r2.claim().await.unwrap().is_none());
    q.finish(&first).await.unwrap();
    let third = r2.claim().await.unwrap().unwrap();
    assert_eq!(third.report.call_id, "n1-b");
}

/// A job waiting to retry still holds its number: a later report for the same number must not
/// overtake it (it could create a second ticket, or reuse the first job's possibly created one
/// and comment twice).
async fn a_retrying_job_keeps_later_jobs_of_its_number_waiting(b: Backend) {
    let q = b.open().await;
    q.enqueue(&report("n1-a", 380441234567)).await.unwrap();
    q.enqueue(&report("n1-b", 380441234567)).await.unwrap();
    let first = q.claim().await.unwrap().unwrap();
    q.retry_at(&first, now_ms() + 1_500, "HTTP 503".into())
        .await
        .unwrap();
    assert!(
        q.claim().await.unwrap().is_none(),
        "n1-b must wait for n1-a's retry"
    );
    let again = eventually(Duration::from_secs(5), "n1-a falls due", || async {
        q.claim().await.unwrap()
    })
    .await;
    assert_eq!(again.report.call_id, "n1-a");
    q.finish(&again).await.unwrap();
    assert_eq!(q.claim().await.unwrap().unwrap().report.call_id, "n1-b");
}

async fn own_users_survive_reopen(b: Backend) {
    let phone = E164::from_digits(380441234567).unwrap();
    {
        let q = b.open().await;
        assert_eq!(q.own_user(phone).await.unwrap(), None);
        q.remember_user(phone, 42).await.unwrap();
    }
    let q = b.open().await;
    assert_eq!(q.own_user(phone).await.unwrap(), Some(42));
}

async fn concurrent_enqueue_of_one_id_stores_one_job(b: Backend) {
    let first = b.open().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let q = b.replica(&first).await;
        tasks.push(tokio::spawn(async move {
            q.enqueue(&report("same", 380441234567)).await.unwrap()
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        if !t.await.unwrap() {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(first.counts().await.unwrap()[&SyncState::Queued], 1);
}

/// Several claimers at once (replicas with PostgreSQL): every job is taken exactly once, jobs of
/// one number strictly one after the other and in order.
async fn concurrent_claims_take_each_job_once_and_each_number_once(b: Backend) {
    let first = b.open().await;
    let numbers = 6u64;
    let per_number = 5u64;
    for k in 0..per_number {
        for n in 0..numbers {
            first
                .enqueue(&report(&format!("n{n}-{k}"), 380441230000 + n))
                .await
                .unwrap();
        }
    }
    let busy = std::sync::Arc::new(parking_lot::Mutex::new(HashSet::<u64>::new()));
    let done = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let q = b.replica(&first).await;
        let (busy, done) = (busy.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut idle = 0;
            while idle < 20 {
                let Some(job) = q.claim().await.unwrap() else {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                idle = 0;
                let phone = job.report.client_e164.digits();
                assert!(busy.lock().insert(phone), "two jobs of one number at once");
                tokio::time::sleep(Duration::from_millis(5)).await;
                busy.lock().remove(&phone);
                done.lock().push(job.report.call_id.clone());
                q.finish(&job).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let done = done.lock().clone();
    assert_eq!(done.len() as u64, numbers * per_number, "{done:?}");
    assert_eq!(done.iter().collect::<HashSet<_>>().len(), done.len());
    for n in 0..numbers {
        let order: Vec<&String> = done
            .iter()
            .filter(|id| id.starts_with(&format!("n{n}-")))
            .collect();
        let expected: Vec<String> = (0..per_number).map(|k| format!("n{n}-{k}")).collect();
        assert_eq!(
            order,
            expected.iter().collect::<Vec<_>>(),
            "number {n} ran out of order"
        );
    }
}

/// The per-state counts a scrape reads are kept as jobs change (SQLite: triggers on a counter
/// table; PostgreSQL: triggers appending changes, folded later) and equal a `GROUP BY` over the
/// rows after every kind of change, before and after folding, across replicas.
async fn kept_counts_equal_the_rows_after_every_change(b: Backend) {
    let q = b.open().await;
    let r2 = b.replica(&q).await;
    let check = |what: &'static str| {
        let (q, b) = (&q, &b);
        async move {
            let kept = q.counts().await.unwrap();
            assert_eq!(kept, b.truth().await, "after {what}");
            q.compact_counts().await.unwrap();
            assert_eq!(q.counts().await.unwrap(), kept, "after {what}, folded");
        }
    };
    check("nothing").await;
    for i in 0..6u64 {
        q.enqueue(&report(&format!("j{i}"), 380441230000 + i))
            .await
            .unwrap();
    }
    assert!(r2.enqueue(&report("j0", 380441230000)).await.unwrap());
    check("enqueue and a duplicate").await;
    let a = q.claim().await.unwrap().unwrap();
    let bj = r2.claim().await.unwrap().unwrap();
    let c = q.claim().await.unwrap().unwrap();
    let d = r2.claim().await.unwrap().unwrap();
    let e = q.claim().await.unwrap().unwrap();
    check("claims").await;
    q.finish(&a).await.unwrap();
    r2.fail(&bj, "HTTP 422".into()).await.unwrap();
    q.retry_at(&c, now_ms() - 1, "HTTP 503".into())
        .await
        .unwrap();
    r2.release(&d).await.unwrap();
    q.save_progress(
        &e,
        &Progress {
            user_id: 3,
            ..Progress::default()
        },
    )
    .await
    .unwrap();
    check("finish, fail, retry, release, progress").await;
    q.finish(&e).await.unwrap();
    let again = eventually(Duration::from_secs(5), "a job claimable", || async {
        q.claim().await.unwrap()
    })
    .await;
    q.finish(&again).await.unwrap();
    check("more done").await;
    let truth = b.truth().await;
    let finished = truth[&SyncState::Done] + truth[&SyncState::Failed];
    assert_eq!(finished, 4, "{truth:?}");
    assert_eq!(q.purge_finished(now_ms() + 1_000).await.unwrap(), finished);
    check("purge").await;
    let counts = q.counts().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 6 - finished);
    assert_eq!(counts[&SyncState::Done] + counts[&SyncState::Failed], 0);
}

// ---- PostgreSQL only: leases and the spool ----

/// A holder whose lease ran out and was taken over can no longer write: its progress, finish
/// and renewals fail with `LeaseLost`, and the new holder's writes stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lost_lease_fences_the_old_holder() {
    let Some(b) = Backend::postgres().await else {
        return;
    };
    let a = b.open().await;
    let r2 = b.open().await;
    a.enqueue(&report("c1", 380441234567)).await.unwrap();
    let old = a.claim().await.unwrap().unwrap();
    a.renew(&old).await.unwrap();
    assert!(r2.claim().await.unwrap().is_none(), "the lease is live");
    let new = eventually(LEASE * 5, "the lease runs out", || async {
        r2.claim().await.unwrap()
    })
    .await;
    assert_eq!((new.seq, new.attempts), (old.seq, 2));
    let p = Progress {
        user_id: 99,
        ..Progress::default()
    };
    assert!(matches!(
        a.save_progress(&old, &p).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(a.renew(&old).await, Err(StoreError::LeaseLost)));
    assert!(matches!(a.finish(&old).await, Err(StoreError::LeaseLost)));
    r2.save_progress(
        &new,
        &Progress {
            user_id: 5,
            ..Progress::default()
        },
    )
    .await
    .unwrap();
    r2.finish(&new).await.unwrap();
    let st = a.status("c1").await.unwrap().unwrap();
    assert_eq!((st.state, st.user_id), (SyncState::Done, 5));
}

/// PostgreSQL unreachable: reports are accepted into the spool (QUEUED, duplicates known to the
/// spool answered as such), nothing is claimable; once it is back the forwarder moves each report
/// exactly once, and a report PostgreSQL already had keeps PostgreSQL's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_reports_are_spooled_and_forwarded_once() {
    let Some(schema) = TestSchema::new().await else {
        return;
    };
    let _pool = schema.pool().await; // migrated
    let proxy = Proxy::start(&schema).await;
    let dir = tempfile::tempdir().unwrap();
    let pool =
        crate::pg::pool(&secrecy::SecretString::from(schema.url_via(proxy.addr)), 4).unwrap();
    let q = JobStore::postgres(PgQueue::new(pool, LEASE, "spooler"), dir.path())
        .await
        .unwrap();
    // Accepted before the outage.
    assert!(!q.enqueue(&report("before", 380441234567)).await.unwrap());

    proxy.cut();
    assert!(!q.enqueue(&report("s1", 380441234567)).await.unwrap());
    assert!(!q.enqueue(&report("s2", 380501112233)).await.unwrap());
    assert!(
        q.enqueue(&report("s1", 380441234567)).await.unwrap(),
        "a repeat of a spooled report is a duplicate"
    );
    // Known to PostgreSQL only: not knowable now (see the module doc of `store`).
    let mut other = report("before", 380441234567);
    other.employee_name = "Late Repeat".into();
    assert!(!q.enqueue(&other).await.unwrap());
    assert_eq!(
        q.status("s1").await.unwrap().unwrap().state,
        SyncState::Queued
    );
    assert_eq!(q.spooled().await.unwrap(), 3);
    assert!(q.claim().await.unwrap_err().is_unavailable());

    let stop = tokio_util::sync::CancellationToken::new();
    let forwarder = tokio::spawn(q.clone().forward_spool(stop.clone(), || {}));
    proxy.restore();
    eventually(Duration::from_secs(15), "the spool drains", || async {
        (q.spooled().await.ok()? == 0).then_some(())
    })
    .await;
    stop.cancel();
    forwarder.await.unwrap().unwrap();

    let direct = JobStore::postgres(
        PgQueue::new(schema.pool().await, LEASE, "checker"),
        &dir.path().join("checker"),
    )
    .await
    .unwrap();
    let counts = direct.counts().await.unwrap();
    assert_eq!(counts[&SyncState::Queued], 3, "before, s1, s2: once each");
    let mut seen = Vec::new();
    while let Some(job) = direct.claim().await.unwrap() {
        seen.push((job.report.call_id.clone(), job.report.employee_name.clone()));
        direct.finish(&job).await.unwrap();
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("before".to_owned(), "Olena Petrenko".to_owned()),
            ("s1".to_owned(), "Olena Petrenko".to_owned()),
            ("s2".to_owned(), "Olena Petrenko".to_owned()),
        ]
    );
}

/// `deskline check` reads the schema version without changing it: a fresh schema is "missing" its
/// steps (the next `serve` migrates), a migrated one is current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_check_reports_reachability_and_schema_version() {
    let Some(schema) = TestSchema::new().await else {
        return;
    };
    let config = |url: &str| {
        crate::config::Config::from_toml_and_env(
            &format!(
                "[zendesk]\nurl = \"https://acme.zendesk.com\"\nemail = \"ops@acme.com\"\ntoken = \"t0ken-value\"\n\
                 [storage]\npostgres_url = \"{url}\"\n"
            ),
            std::path::Path::new("t.toml"),
            std::iter::empty(),
        )
        .unwrap()
    };
    let text = |c| async move {
        crate::check::storage(&c)
            .await
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = text(config(&schema.url())).await;
    assert!(before.contains("schema version 0 of 7"), "{before}");
    let _pool = schema.pool().await;
    let after = text(config(&schema.url())).await;
    assert!(
        after.starts_with("note: PostgreSQL reachable; schema version 7 (current)"),
        "{after}"
    );
    assert!(
        after.contains("note: follower lease: free (epoch 0)"),
        "{after}"
    );
    assert!(
        after.contains("note: shared index: no snapshot yet"),
        "{after}"
    );
    // Migrating again changes nothing.
    assert_eq!(crate::pg::migrate(&_pool).await.unwrap(), 0);
    let down = text(config("postgres://postgres@127.0.0.1:1/test")).await;
    assert!(down.starts_with("problem: storage.postgres_url:"), "{down}");
}

/// A deployment from before the kept counters (schema step 0001 only, jobs in every state):
/// migrating fills the counters from the rows, and they follow the changes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_counters_start_from_an_existing_deployments_rows() {
    let Some(schema) = TestSchema::new().await else {
        return;
    };
    let pool = crate::pg::pool(&schema.secret_url(), 2).unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE deskline_migrations (name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO deskline_migrations (name) VALUES ('0001_sync_queue');
         {}
         INSERT INTO jobs (call_id, phone, report, state, created_at, updated_at)
             SELECT 'old-' || i, 380441230000 + i, '{{}}',
                    (ARRAY['queued', 'in_progress', 'retry_wait', 'done', 'done', 'failed'])[1 + i % 6],
                    0, 0
             FROM generate_series(0, 599) AS i;",
        super::pg::SCHEMA_0001
    ))
    .await
    .unwrap();
    drop(c);
    crate::pg::migrate(&pool).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let q = JobStore::postgres(PgQueue::new(pool.clone(), LEASE, "upgraded"), dir.path())
        .await
        .unwrap();
    let counts = q.counts().await.unwrap();
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        // BTreeMap order of SyncState: queued, in_progress, retry_wait, done, failed.
        vec![100, 100, 100, 200, 100],
        "{counts:?}"
    );
    q.enqueue(&report("new", 380501112233)).await.unwrap();
    assert_eq!(q.counts().await.unwrap()[&SyncState::Queued], 101);
}

/// Replicas starting together: every one migrates at once, each step is applied exactly once and
/// none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_migrations_apply_each_step_once() {
    let Some(schema) = TestSchema::new().await else {
        return;
    };
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = crate::pg::pool(&schema.secret_url(), 2).unwrap();
        tasks.push(tokio::spawn(async move {
            crate::pg::migrate(&pool).await.unwrap()
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap();
    }
    assert_eq!(applied, crate::pg::migrations().len());
    let pool = crate::pg::pool(&schema.secret_url(), 1).unwrap();
    let v = crate::pg::schema_version(&pool).await.unwrap();
    assert!(v.missing.is_empty() && v.newer.is_empty(), "{v:?}");
}
