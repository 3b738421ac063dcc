//! A Prometheus scrape with a long queue history (issue 10, item 5): 100,000 finished jobs (95 %
//! `done`, 5 % `failed`) plus a few in flight, in a real queue file.
//!
//! Cases, all in the same run:
//! - `scrape`: the whole `/metrics` body (`Metrics::render`), which reads the per-state counters
//!   kept by the queue's triggers on its read-only connection;
//! - `counts`: that counter read alone (`Queue::counts`);
//! - `old_group_by`: what every scrape ran before, `SELECT state, COUNT(*) FROM jobs GROUP BY
//!   state`, on its own connection to the same file (before, it also ran on the connection that
//!   commits every `ReportCall`, so it queued behind them as well: not measured here).
//!
//! The same three cases on PostgreSQL (`queue_scrape_100k_postgres`, a replica's store: the kept
//! counters are `job_counts` plus the changes not folded yet, see `sync::pg`), when
//! `DESKLINE_TEST_POSTGRES_URL` names a server (a throw-away schema in it); skipped, saying so,
//! without. The jobs go in through the real schema, so its triggers record them; then the
//! counters are folded as housekeeping does every minute. `scrape_1k_unfolded` measures the
//! scrape with 1,000 changes not folded yet (the most a read leaves before folding in the
//! background).
//!
//! Run: `DESKLINE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench
//! queue_scrape`. Target: `scrape` under 10 ms. A summary line per store with the medians and the
//! ratio is printed at the end.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use deskline::{
    index::{Index, SharedIndex},
    metrics::Metrics,
    pg::testing::{TestSchema, fold_job_counts},
    sync::Queue,
};

const FINISHED: usize = 100_000;

/// A report as the queue stores it (about 450 bytes of JSON), so the table has a realistic size.
fn report_json(i: usize) -> String {
    format!(
        r#"{{"call_id":"bench-{i}","direction":"incoming","outcome":"answered","client_number":"+38050{i:07}","client_e164":"+38050{i:07}","line_number":"+380441110000","started_at":1714557600,"duration_seconds":61,"wait_seconds":3,"recording_url":"https://pbx.example/rec/{i}.mp3","employee_name":"Olena Petrenko","employee_extension":"101","scheme_name":"Sales","utm":{{"utm_source":"google","utm_medium":"cpc"}},"extra":{{}},"client_name":""}}"#
    )
}

/// A queue file with `FINISHED` finished jobs and 20 queued ones, written through the real schema
/// (its triggers keep the counters as the rows go in).
fn queue_with_history(dir: &std::path::Path) -> Queue {
    let queue = Queue::open(dir).unwrap();
    let mut conn = rusqlite::Connection::open(queue.path()).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO jobs (call_id, phone, report, state, attempts, ticket_id, user_id,
                                   created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?7)",
            )
            .unwrap();
        let now = 1_764_000_000_000i64;
        for i in 0..FINISHED + 20 {
            let state = match i {
                _ if i >= FINISHED => "queued",
                _ if i % 20 == 0 => "failed",
                _ => "done",
            };
            insert
                .execute(rusqlite::params![
                    format!("bench-{i}"),
                    380_500_000_000i64 + i as i64,
                    report_json(i),
                    state,
                    1_000 + i as i64,
                    2_000 + i as i64,
                    now - (FINISHED - i.min(FINISHED)) as i64 * 20_000,
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    queue
}

fn old_group_by(conn: &rusqlite::Connection) -> Vec<(String, i64)> {
    let mut stmt = conn
        .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn median(mut f: impl FnMut(), runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[runs / 2]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let queue = queue_with_history(dir.path());
    let index: SharedIndex = Arc::new(parking_lot::RwLock::new(Index::new()));
    let metrics = Metrics::new(index, None, Some(queue.clone().into()));
    let old = rusqlite::Connection::open(queue.path()).unwrap();

    // The counters agree with the history before anything is timed.
    let counts = rt.block_on(queue.counts()).unwrap();
    let total: u64 = counts.values().sum();
    assert_eq!(total as usize, FINISHED + 20);
    for (state, n) in old_group_by(&old) {
        let kept = counts.iter().find(|(s, _)| s.as_str() == state).unwrap().1;
        assert_eq!(*kept, n as u64, "{state}");
    }
    let body = rt.block_on(metrics.render()).unwrap();
    assert!(
        body.contains(r#"deskline_sync_jobs{state="done"} 95000"#),
        "{body}"
    );

    let mut g = c.benchmark_group("queue_scrape_100k");
    g.bench_function("scrape", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(metrics.render().await.unwrap()) })
    });
    g.bench_function("counts", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(queue.counts().await.unwrap()) })
    });
    g.bench_function("old_group_by", |b| b.iter(|| black_box(old_group_by(&old))));
    g.finish();

    let scrape = median(
        || {
            rt.block_on(metrics.render()).unwrap();
        },
        101,
    );
    let group_by = median(
        || {
            old_group_by(&old);
        },
        101,
    );
    println!(
        "queue_scrape {FINISHED} finished jobs: scrape median {:.3} ms (target < 10 ms); \
         old GROUP BY alone {:.3} ms; old / new {:.1}x",
        scrape.as_secs_f64() * 1e3,
        group_by.as_secs_f64() * 1e3,
        group_by.as_secs_f64() / scrape.as_secs_f64()
    );
}

/// The PostgreSQL store with the same history: 100,000 finished jobs and 20 queued.
fn bench_postgres(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some(schema) = rt.block_on(TestSchema::new()) else {
        println!("queue_scrape postgres: skipped (DESKLINE_TEST_POSTGRES_URL not set)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(schema.job_store(dir.path()));
    let pool = rt.block_on(schema.pool());
    let report = report_json(0);
    rt.block_on(async {
        let c = pool.get().await.unwrap();
        c.execute(
            "INSERT INTO jobs (call_id, phone, report, state, attempts, ticket_id, user_id,
                               created_at, updated_at)
             SELECT 'bench-' || i, 380500000000 + i, $1,
                    CASE WHEN i >= $2::bigint THEN 'queued' WHEN i % 20 = 0 THEN 'failed' ELSE 'done' END,
                    1, 1000 + i, 2000 + i, 1764000000000 - ($2::bigint - least(i, $2::bigint)) * 20000,
                    1764000000000 - ($2::bigint - least(i, $2::bigint)) * 20000
             FROM generate_series(0::bigint, $2::bigint + 19) AS i",
            &[&report, &(FINISHED as i64)],
        )
        .await
        .unwrap();
        c.batch_execute("ANALYZE jobs").await.unwrap();
    });
    let folded = rt.block_on(fold_job_counts(&store));
    assert_eq!(
        folded as usize,
        FINISHED + 20,
        "one change per job inserted"
    );
    let index: SharedIndex = Arc::new(parking_lot::RwLock::new(Index::new()));
    let metrics = Metrics::new(index, None, Some(store.clone()));
    let old = || {
        rt.block_on(async {
            let c = pool.get().await.unwrap();
            c.query("SELECT state, COUNT(*) FROM jobs GROUP BY state", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect::<Vec<_>>()
        })
    };

    let body = rt.block_on(metrics.render()).unwrap();
    assert!(
        body.contains(r#"deskline_sync_jobs{state="done"} 95000"#),
        "{body}"
    );
    for (state, n) in old() {
        assert!(
            body.contains(&format!("deskline_sync_jobs{{state=\"{state}\"}} {n}\n")),
            "{state} {n}: {body}"
        );
    }

    let mut g = c.benchmark_group("queue_scrape_100k_postgres");
    g.bench_function("scrape", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(metrics.render().await.unwrap()) })
    });
    g.bench_function("old_group_by", |b| b.iter(|| black_box(old())));
    g.finish();
    let scrape = median(
        || {
            rt.block_on(metrics.render()).unwrap();
        },
        101,
    );
    let group_by = median(
        || {
            old();
        },
        101,
    );
    // 500 finished jobs back to queued: 1,000 changes waiting to be folded (not above the
    // threshold, so reads leave them).
    rt.block_on(async {
        let c = pool.get().await.unwrap();
        c.execute(
            "UPDATE jobs SET state = 'queued' WHERE seq IN (
                 SELECT seq FROM jobs WHERE state = 'done' ORDER BY seq LIMIT 500)",
            &[],
        )
        .await
        .unwrap();
    });
    let unfolded = median(
        || {
            rt.block_on(metrics.render()).unwrap();
        },
        101,
    );
    let body = rt.block_on(metrics.render()).unwrap();
    assert!(
        body.contains(r#"deskline_sync_jobs{state="queued"} 520"#),
        "{body}"
    );
    println!(
        "queue_scrape postgres {FINISHED} finished jobs: scrape median {:.3} ms (target < 10 ms); \
         with 1,000 changes not folded {:.3} ms; old GROUP BY alone {:.3} ms; old / new {:.1}x",
        scrape.as_secs_f64() * 1e3,
        unfolded.as_secs_f64() * 1e3,
        group_by.as_secs_f64() * 1e3,
        group_by.as_secs_f64() / scrape.as_secs_f64()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = bench, bench_postgres
}
criterion_main!(benches);
