//! The soak driver behind `scripts/soak.sh` (ignored in normal test runs): `deskline serve` as a
//! child process against an in-process simulator with faults on (5xx pages, dropped connections,
//! truncated bodies, latency), routing load from a few concurrent clients and a steady stream of
//! call reports for `SOAK_SECS` seconds. Every 10 s it samples the child's RSS (`/proc`); at the
//! end it checks that no RouteCall failed, every accepted report is DONE (none FAILED), and
//! RSS did not keep growing after the first third of the run.

mod common;

use std::{
    collections::HashSet,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use deskline::proto::{
    self, GetCallStatusRequest, ReportCallRequest, RouteCallRequest,
    get_call_status_response::SyncState,
};
use deskline_sim::{self as sim, Faults};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ten minutes: run through scripts/soak.sh"]
async fn soak() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let store = sim::generate(&sim::GenConfig {
        users: 20_000,
        tickets: 20_000,
        ..sim::GenConfig::default()
    });
    let numbers: Vec<String> = store
        .user_ids()
        .filter_map(|id| store.user(id).and_then(|u| u.phone))
        .take(2_000)
        .collect();
    let sim = start_sim(store, |c| {
        c.search_delay = Duration::from_secs(5);
        c.faults = Faults {
            latency_ms: 5,
            error_rate: 0.03,
            drop_rate: 0.01,
            malformed_rate: 0.01,
            down: false,
            seed: None,
        };
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path().join("deskline.toml");
    // Today's full warm-up (`index.bootstrap = false`): the RSS samples start from a loaded index,
    // not from a bootstrap still filling it.
    std::fs::write(
        &config,
        config_text(
            &sim,
            &dir.path().join("data"),
            &format!("[server]\nlisten = \"{addr}\"\n[index]\npoll_seconds = 5\nbootstrap = false\n[sync]\nsenior_manager = \"Agent 1\"\n"),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_deskline"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let grpc = eventually("deskline serve to listen", Duration::from_secs(60), || {
        let e = endpoint.clone();
        async move { e.connect().await.ok() }
    })
    .await;
    let grpc = proto::resolver_client::ResolverClient::new(grpc);
    eventually("the index to load", Duration::from_secs(300), || {
        let mut g = grpc.clone();
        async move {
            g.route_call(RouteCallRequest {
                caller: "+380441234567".into(),
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (routed, route_failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let numbers = Arc::new(numbers);
    let mut loaders = Vec::new();
    for w in 0..4 {
        let (mut g, stop, ok, failed, numbers) = (
            grpc.clone(),
            stop.clone(),
            routed.clone(),
            route_failed.clone(),
            numbers.clone(),
        );
        loaders.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let caller = numbers[i % numbers.len()].clone();
                i += 7;
                match g
                    .route_call(RouteCallRequest {
                        caller,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    // A stored number in a format no parser accepts is a correct refusal.
                    Err(e) if e.code() == tonic::Code::InvalidArgument => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    let started = Instant::now();
    let mut ids = Vec::new();
    let mut rss = Vec::new();
    let mut next_sample = Instant::now();
    let mut g = grpc.clone();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_sample {
            rss.push(rss_kib(pid));
            next_sample += Duration::from_secs(10);
        }
        // Two reports a second: half from known customers, half from new numbers.
        n += 1;
        let number = if n % 2 == 0 {
            numbers[(n as usize * 13) % numbers.len()].clone()
        } else {
            format!("+38093{:07}", n)
        };
        let id = format!("soak-{n}");
        let r = g
            .report_call(ReportCallRequest {
                call_id: id.clone(),
                direction: proto::Direction::Incoming as i32,
                outcome: proto::Outcome::Answered as i32,
                client_number: number,
                started_at: Some(prost_types::Timestamp {
                    seconds: 1_714_557_600,
                    nanos: 0,
                }),
                duration_seconds: 30,
                employee_name: "Agent 1".into(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => ids.push(id),
            Err(e) if e.code() == tonic::Code::InvalidArgument => {}
            Err(e) => panic!("ReportCall failed: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    rss.push(rss_kib(pid));

    // Every report synced (faults stay on: the retries must get there).
    let mut done = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while done.len() < ids.len() {
        for id in &ids {
            if done.contains(id) {
                continue;
            }
            let st = g
                .get_call_status(GetCallStatusRequest {
                    call_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            match st.state() {
                SyncState::Done => {
                    done.insert(id.clone());
                }
                SyncState::Failed => panic!("{id} failed: {st:#?}"),
                _ => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} reports synced",
            done.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut injected = std::collections::BTreeMap::new();
    let requests = sim.requests();
    for r in &requests {
        if let Some(f) = r.fault {
            *injected.entry(f).or_insert(0u64) += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let (ok, failed) = (
        routed.load(Ordering::Relaxed),
        route_failed.load(Ordering::Relaxed),
    );
    let third = rss[rss.len() / 3].max(1);
    let last = *rss.last().unwrap();
    let max = *rss.iter().max().unwrap();
    eprintln!(
        "soak {secs} s: {ok} RouteCalls ({:.0}/s), {failed} failed; {} reports, all DONE; \
         {} Zendesk requests, faults injected {injected:?}; RSS KiB every 10 s: {rss:?}",
        ok as f64 / secs as f64,
        ids.len(),
        requests.len()
    );
    assert_eq!(failed, 0, "RouteCalls failed");
    assert!(
        (last as f64) < third as f64 * 1.15 && (max as f64) < third as f64 * 1.25,
        "RSS grew: {rss:?}"
    );
    sim.shutdown().await;
}
