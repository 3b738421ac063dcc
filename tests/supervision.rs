//! How the real `deskline serve` process ends (issue 10, items 1, 2 and 6), each as a child process
//! against an in-process simulator:
//! - a background task that fails for real (the data directory removed under the running queue)
//!   stops the process: the cause is logged, the snapshot is saved, the exit status is non-zero,
//!   and nothing panics;
//! - SIGTERM with a task that will not stop (a client holding a `grpc.health.v1` Watch stream open,
//!   which graceful HTTP/2 shutdown waits for) still ends the process within
//!   `server.shutdown_grace_seconds` plus a small margin;
//! - a storage failure (another process holding the queue's write lock) reaches the gRPC client as
//!   a short message with a reference, never SQLite's text, and the log has the detail under the
//!   same reference.
//!
//! Waiting is on conditions with deadlines (a port answering, a job state, the process exit).

mod common;

use std::{
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use common::*;
use deskline::proto::{
    self, GetCallStatusRequest, ReportCallRequest, get_call_status_response::SyncState,
};
use deskline_sim::{Faults, SimHandle};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The child process; killed and reaped when dropped, so a failing test leaves nothing behind.
struct Deskline {
    child: Child,
    addr: SocketAddr,
    /// What it announced in `listening.json`.
    listening: Listening,
    log: PathBuf,
    data_dir: PathBuf,
}

impl Drop for Deskline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Deskline {
    /// Starts `deskline serve` and waits until health says SERVING (the index is loaded).
    async fn start(dir: &Path, sim: &SimHandle, extra: &str) -> Self {
        // Port 0: the child binds a free port and announces it (see `wait_listening`). Today's
        // full warm-up on a first start (`index.bootstrap = false`), so SERVING means loaded: with
        // the bootstrap, SERVING comes while WARMING, and a sync job reported then waits for READY
        // rather than reaching Zendesk (which one test takes down right after the start).
        let data_dir = dir.join("data");
        let config = dir.join("deskline.toml");
        let extra = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n[index]\npoll_seconds = 3600\nbootstrap = false\n[sync]\nsenior_manager = \"Olena Petrenko\"\n"
        );
        std::fs::write(&config, config_text(sim, &data_dir, &extra)).unwrap();
        forget_listening(&data_dir);
        let log = dir.join("deskline.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_deskline"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start deskline serve");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let listening = wait_listening(&mut child, &data_dir, read_log).await;
        let addr = listening.grpc;
        let mut d = Self {
            child,
            addr,
            listening,
            log,
            data_dir,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let started = Instant::now();
        loop {
            if let Ok(ch) = endpoint.connect().await {
                let serving = HealthClient::new(ch)
                    .check(HealthCheckRequest::default())
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32);
                if serving {
                    return d;
                }
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("deskline exited with {status}:\n{}", d.log_text());
            }
            assert!(
                started.elapsed() < DEADLINE,
                "deskline did not become SERVING on {addr}:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn terminate(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit, at most `limit`.
    async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "deskline still running after {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

fn report(call_id: &str, number: &str) -> ReportCallRequest {
    ReportCallRequest {
        call_id: call_id.into(),
        direction: proto::Direction::Incoming as i32,
        outcome: proto::Outcome::Answered as i32,
        client_number: number.into(),
        line_number: "+380441110000".into(),
        started_at: Some(prost_types::Timestamp {
            seconds: 1_714_557_600,
            nanos: 0,
        }),
        duration_seconds: 61,
        employee_name: "Olena Petrenko".into(),
        ..Default::default()
    }
}

fn assert_no_panic(log: &str) {
    assert!(
        !log.contains("panicked"),
        "the process panicked instead of stopping in order:\n{log}"
    );
}

/// Item 1: the queue's file disappears with the data directory. The worker's writes fail, the
/// worker gives up, and the supervisor must stop the process in order and non-zero.
#[tokio::test]
async fn a_failing_background_task_stops_the_process_non_zero_without_panic() {
    let (store, _) = one_ticket_account("+380441234567");
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Deskline::start(dir.path(), &sim, "shutdown_grace_seconds = 10").await;
    let mut grpc = client(d.addr).await;

    // A job waiting to retry keeps the worker coming back to the queue soon.
    sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    grpc.report_call(report("gone-1", "+380501234567"))
        .await
        .unwrap();
    eventually("the job to wait for a retry", DEADLINE, || {
        let mut grpc = grpc.clone();
        async move {
            let st = grpc
                .get_call_status(GetCallStatusRequest {
                    call_id: "gone-1".into(),
                })
                .await
                .ok()?
                .into_inner();
            (st.state == SyncState::RetryWait as i32).then_some(())
        }
    })
    .await;

    std::fs::remove_dir_all(&d.data_dir).unwrap();
    let status = d.exit_within(DEADLINE).await;
    let log = d.log_text();
    assert!(!status.success(), "exit status {status}:\n{log}");
    assert_eq!(status.code(), Some(1), "{log}");
    assert_no_panic(&log);
    assert!(log.contains("task sync failed"), "{log}");
    assert!(
        log.contains("was deleted or replaced while open"),
        "the cause chain must reach the log:\n{log}"
    );
    assert!(
        d.data_dir.join("index.snapshot").exists(),
        "the snapshot is saved on the way out:\n{log}"
    );
}

/// Port 0 for every listener: `deskline serve` binds free ports itself and announces them in
/// `{data_dir}/listening.json` with its pid (what the harnesses here read instead of picking a
/// port and releasing it for the child, which another process could take in between); each
/// announced address answers as what it is, and a clean stop removes the file.
#[tokio::test]
async fn port_zero_listeners_are_announced_and_answer() {
    let (store, _) = one_ticket_account("+380441234567");
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Deskline::start(
        dir.path(),
        &sim,
        "metrics_listen = \"127.0.0.1:0\"\n[webhooks]\nlisten = \"127.0.0.1:0\"\n\
         signing_secret = \"whsec-test-secret-0123456789\"",
    )
    .await;
    let Listening {
        grpc,
        metrics,
        webhooks,
    } = d.listening;
    let (metrics, webhooks) = (
        metrics.expect("metrics announced"),
        webhooks.expect("webhooks announced"),
    );
    for a in [grpc, metrics, webhooks] {
        assert!(a.ip().is_loopback() && a.port() != 0, "{a}");
    }
    // Started means health said SERVING on `grpc`; the others answer as what they are.
    let scrape = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(scrape.contains("deskline_index_loaded"), "{scrape}");
    let unsigned = reqwest::Client::new()
        .post(format!("http://{webhooks}/zendesk/webhook"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401, "the webhook endpoint refuses it");

    d.terminate();
    let status = d.exit_within(DEADLINE).await;
    assert!(status.success(), "{status}:\n{}", d.log_text());
    assert!(
        !d.data_dir.join(deskline::app::LISTENING_FILE).exists(),
        "removed at a clean stop"
    );
}

/// Item 2: a client keeps a health Watch stream open, which the gRPC server's graceful shutdown
/// waits for forever. The process must still be gone within the one deadline plus a margin.
#[tokio::test]
async fn sigterm_with_a_stuck_stream_exits_within_the_deadline() {
    const GRACE: Duration = Duration::from_secs(3);
    /// Process exit, runtime linger (0.5 s) and a slow CI machine.
    const MARGIN: Duration = Duration::from_secs(2);
    let (store, _) = one_ticket_account("+380441234567");
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Deskline::start(
        dir.path(),
        &sim,
        &format!("shutdown_grace_seconds = {}", GRACE.as_secs()),
    )
    .await;
    let mut health = HealthClient::new(channel(d.addr).await);
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let sent = Instant::now();
    d.terminate();
    // Balancers watching health are told first.
    let next = tokio::time::timeout(GRACE, watch.message())
        .await
        .expect("no health change after SIGTERM")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let status = d.exit_within(GRACE + MARGIN + Duration::from_secs(5)).await;
    let took = sent.elapsed();
    println!("gone {took:?} after SIGTERM (deadline {GRACE:?})");
    let log = d.log_text();
    assert!(
        took <= GRACE + MARGIN,
        "gone {took:?} after SIGTERM, deadline {GRACE:?} + {MARGIN:?}:\n{log}"
    );
    assert_no_panic(&log);
    assert!(
        log.contains("did not finish within the shutdown deadline"),
        "the stuck stage is named:\n{log}"
    );
    assert!(
        status.success(),
        "a requested stop exits 0: {status}\n{log}"
    );
    // The stuck RPC stage did not eat the later stages' time.
    assert!(log.contains("sync worker stopped"), "{log}");
    assert!(log.contains("deskline stopped"), "{log}");
    drop(watch);
}

/// Item 6: the queue's write lock held by another process (an operator's `sqlite3` shell in a
/// transaction): `ReportCall` fails after SQLite's busy timeout. The client must see a generic
/// message with a reference, the log the SQLite error with the same reference.
#[tokio::test]
async fn a_storage_failure_reaches_the_client_as_a_reference_only() {
    let (store, _) = one_ticket_account("+380441234567");
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let d = Deskline::start(dir.path(), &sim, "").await;
    let mut grpc = client(d.addr).await;

    let mut other = rusqlite::Connection::open(d.data_dir.join("queue.sqlite3")).unwrap();
    let lock = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let err = grpc
        .report_call(report("locked-1", "+380501234567"))
        .await
        .unwrap_err();
    lock.rollback().unwrap();

    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let message = err.message().to_owned();
    for internal in ["database", "locked", "sqlite", "queue.sqlite3", "/"] {
        assert!(
            !message.to_ascii_lowercase().contains(internal),
            "the client sees {internal:?}: {message}"
        );
    }
    let reference = message
        .split("ref ")
        .nth(1)
        .map(|r| r.trim_end_matches(')'))
        .unwrap_or_else(|| panic!("no reference in {message:?}"));
    assert!(reference.len() >= 8, "{message}");
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(reference))
        .unwrap_or_else(|| panic!("reference {reference} not in the log:\n{log}"));
    assert!(line.contains("database is locked"), "{line}");

    // Once the lock is gone the same report is accepted: nothing was stored the first time.
    let ok = grpc
        .report_call(report("locked-1", "+380501234567"))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.duplicate);
}
