//! Deskline's own load generator for `RouteCall` (issue 5, item 3), and the small probes
//! `benches/load.sh` needs because grpcurl is not available.
//!
//! h2load repeats one request, which hides the cost of cache misses across a large index. `run`
//! instead cycles through a mix of found and unknown numbers in varied formats, spread over every
//! customer of the simulator's account: it regenerates that account in-process from the same
//! `--users/--tickets/--agents/--seed` (the generator is deterministic), so it knows the stored
//! phones without reading the exports.
//!
//! Subcommands:
//! - `health ADDR`: wait (with a deadline) until `grpc.health.v1` says SERVING;
//! - `probe ADDR CALLER`: one RouteCall; prints `code=<grpc code> bytes=<encoded reply size>`; exits
//!   non-zero unless the code is OK;
//! - `pick ADDR …`: finds a customer number that Deskline routes to an agent (the typical answer),
//!   prints `caller=… bytes=…` and writes the gRPC-framed request to `--body` for h2load;
//! - `run ADDR …`: the mixed workload, closed-loop (`--rps 0`) or open-loop at a fixed rate; prints
//!   one `key=value` line: requests/s, p50/p99/max in µs, and the count of every non-OK status.
//!
//! Latency in open-loop mode is measured from the moment a request's send time is released to its
//! task, so a server that stalls is charged for the requests queued behind the stall (no
//! coordinated omission). The schedule is kept by a pacer thread (see `pace`), not by tokio timers,
//! whose millisecond ticks would add their own lateness to every latency.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use deskline::{
    phone::{E164, PhoneParser},
    proto::{self, resolver_client::ResolverClient},
};
use deskline_sim::{GenConfig, generate};
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct Account {
    #[arg(long, default_value_t = 1_000_000)]
    users: usize,
    #[arg(long, default_value_t = 1_000_000)]
    tickets: usize,
    #[arg(long, default_value_t = 20)]
    agents: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prints `[routing.directory]` mapping every staff member of the account to an extension.
    Directory {
        #[command(flatten)]
        account: Account,
    },
    Health {
        addr: String,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    Probe {
        addr: String,
        caller: String,
    },
    Pick {
        addr: String,
        #[command(flatten)]
        account: Account,
        /// Where to write the gRPC-framed RouteCallRequest (5-byte prefix + protobuf).
        #[arg(long)]
        body: std::path::PathBuf,
    },
    Run {
        addr: String,
        #[command(flatten)]
        account: Account,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Requests in flight at once (spread over the connections).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Total requests per second (0: as fast as the server answers).
        #[arg(long, default_value_t = 0)]
        rps: u64,
        /// Share of numbers that belong to no customer, in percent.
        #[arg(long, default_value_t = 30)]
        unknown_pct: u64,
        /// Distinct queries in the cycle (spread over all customers).
        #[arg(long, default_value_t = 1_000_000)]
        distinct: usize,
        /// Cache of the query cycle (one caller per line): read if it exists, else written, so
        /// repeated runs skip regenerating the account.
        #[arg(long)]
        queries: Option<std::path::PathBuf>,
    },
}

async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
}

fn route_request(caller: &str) -> proto::RouteCallRequest {
    proto::RouteCallRequest {
        caller: caller.to_owned(),
        called: "+380441112233".into(),
        call_id: "load-0001".into(),
    }
}

async fn health(addr: &str, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut last = String::from("no answer");
    while started.elapsed() < timeout {
        match connect(addr).await {
            Ok(ch) => match HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {
                    println!("serving after {:.1} s", started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Ok(r) => last = format!("status {}", r.get_ref().status),
                Err(e) => last = format!("{:?}", e.code()),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("{addr} not SERVING after {timeout:?} ({last})"))
}

async fn probe(addr: &str, caller: &str) -> Result<proto::RouteCallResponse, tonic::Status> {
    let ch = connect(addr)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let r = ResolverClient::new(ch)
        .route_call(route_request(caller))
        .await?;
    Ok(r.into_inner())
}

fn account(a: &Account) -> deskline_sim::Store {
    generate(&GenConfig {
        users: a.users,
        tickets: a.tickets,
        agents: a.agents,
        organizations: a.users / 10,
        seed: a.seed,
    })
}

/// Every staff member's name as a `routing.directory` entry, so routed answers are the norm.
fn directory(a: &Account) {
    let store = account(a);
    println!("[routing.directory]");
    let mut ext = 100;
    for u in store.user_ids().filter_map(|id| store.user(id)) {
        if matches!(u.role.as_deref(), Some("agent" | "admin")) {
            if let Some(name) = u.name {
                ext += 1;
                println!("{name:?} = \"{ext}\"");
            }
        }
    }
}

/// Every stored phone of the generated account's end-users, in the format it was stored in.
fn stored_phones(a: &Account) -> Vec<String> {
    let started = Instant::now();
    let store = account(a);
    let phones: Vec<String> = store
        .user_ids()
        .filter_map(|id| store.user(id))
        .filter(|u| u.role.as_deref() == Some("end-user"))
        .filter_map(|u| u.phone)
        .collect();
    eprintln!(
        "loadgen: regenerated the account ({} end-user phones) in {:.1} s",
        phones.len(),
        started.elapsed().as_secs_f64()
    );
    phones
}

/// SplitMix64: a fixed, dependency-free stream so the query mix is the same in every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One number written the ways a PBX sends them. Non-UA numbers keep an international prefix.
fn format_as(e: E164, style: u64) -> String {
    let s = e.to_string();
    let d = &s[1..];
    if let Some(national) = d.strip_prefix("380").filter(|n| n.len() == 9) {
        let (p, n) = national.split_at(2);
        match style % 6 {
            0 => s.clone(),
            1 => d.to_owned(),
            2 => format!("0{national}"),
            3 => format!("+380 {p} {} {} {}", &n[..3], &n[3..5], &n[5..]),
            4 => format!("0{p} {}-{}-{}", &n[..3], &n[3..5], &n[5..]),
            _ => format!("(0{p}) {n}"),
        }
    } else if style % 2 == 0 {
        s.clone()
    } else {
        // Without `+` a foreign number would be read as a national one of the default region.
        format!("00{d}")
    }
}

/// The query cycle: customers in a shuffled order covering all of them, each in a varied format
/// (one in five as stored in Zendesk), and `unknown_pct`% numbers next to real ones that belong to
/// nobody (same prefix and length, so they are valid and parse).
fn workload(a: &Account, distinct: usize, unknown_pct: u64) -> Vec<proto::RouteCallRequest> {
    let parser = PhoneParser::new("UA").expect("UA is a region");
    let stored = stored_phones(a);
    let parsed: Vec<(E164, &str)> = stored
        .iter()
        .filter_map(|raw| parser.parse_stored(raw).map(|e| (e, raw.as_str())))
        .collect();
    let known: std::collections::HashSet<u64> = parsed.iter().map(|(e, _)| e.digits()).collect();
    let mut rng = Rng(0x5EED ^ a.seed);
    let mut order: Vec<usize> = (0..parsed.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let (mut found, mut unknown) = (0usize, 0usize);
    let mut out = Vec::with_capacity(distinct);
    let mut k = 0;
    while out.len() < distinct && !parsed.is_empty() {
        let (e, raw) = parsed[order[k % order.len()]];
        k += 1;
        let style = rng.next();
        if rng.next() % 100 < unknown_pct {
            // Change the last four digits until the number belongs to nobody.
            let base = e.digits() - e.digits() % 10_000;
            let Some(free) = (0..50)
                .map(|_| base + rng.next() % 10_000)
                .find(|d| !known.contains(d))
                .and_then(E164::from_digits)
            else {
                continue;
            };
            out.push(route_request(&format_as(free, style)));
            unknown += 1;
        } else {
            let caller = if style % 5 == 0 {
                raw.to_owned()
            } else {
                format_as(e, style / 5)
            };
            out.push(route_request(&caller));
            found += 1;
        }
    }
    eprintln!(
        "loadgen: {} queries ({found} of customers over {} customers, {unknown} unknown)",
        out.len(),
        parsed.len().min(k)
    );
    out
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Releases send times at `rps` until `stop`, each to the next task in turn. The thread wakes about
/// every 50 µs and releases every send time that has come, stamped with the moment of release: a
/// task busy with its previous request leaves the stamp waiting in its channel, and that wait counts
/// in the latency (the server's slowness is charged), while the pacer's own lateness (the scheduler
/// running it late on a busy client core) is the generator's and does not.
fn pace(rps: u64, tasks: &[tokio::sync::mpsc::UnboundedSender<Instant>], stop: &AtomicBool) {
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rps as f64);
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        loop {
            let at = start + interval.mul_f64(i as f64);
            if at > now {
                break;
            }
            // A task that is gone (stopped) no longer needs times.
            let _ = tasks[(i % tasks.len() as u64) as usize].send(now);
            i += 1;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[derive(Default)]
struct TaskResult {
    latencies_us: Vec<u32>,
    /// Non-OK statuses by code.
    errors: std::collections::BTreeMap<i32, u64>,
    routed: u64,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    addr: &str,
    account: &Account,
    connections: usize,
    concurrency: usize,
    seconds: u64,
    rps: u64,
    unknown_pct: u64,
    distinct: usize,
    cache: Option<&std::path::Path>,
) -> Result<(), String> {
    let queries = match cache.map(std::fs::read_to_string) {
        Some(Ok(text)) => text.lines().map(route_request).collect(),
        _ => {
            let q = workload(account, distinct, unknown_pct);
            if let Some(path) = cache {
                let text: String = q.iter().map(|r| format!("{}\n", r.caller)).collect();
                std::fs::write(path, text).map_err(|e| e.to_string())?;
            }
            q
        }
    };
    let queries = Arc::new(queries);
    if queries.is_empty() {
        return Err("no queries".into());
    }
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(connect(addr).await.map_err(|e| e.to_string())?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let concurrency = concurrency.max(1);
    // Open loop: a pacer thread releases send times at exactly `rps`, round-robin to the tasks.
    // (tokio's timers tick in whole milliseconds: with per-task intervals, requests left in
    // bursts and up to a millisecond late, which the latencies, measured from the scheduled time,
    // then charged to the server: even a bare echo server showed a 1.5 ms p50 at 2k requests/s.)
    let mut inboxes = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..concurrency {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        inboxes.push(Some(rx));
    }
    let pacer = (rps > 0).then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || pace(rps, &senders, &stop))
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (t, inbox) in inboxes.iter_mut().enumerate() {
        let mut client = ResolverClient::new(channels[t % channels.len()].clone());
        let (queries, next, stop) = (queries.clone(), next.clone(), stop.clone());
        let mut inbox = inbox.take().filter(|_| rps > 0);
        tasks.push(tokio::spawn(async move {
            let mut res = TaskResult::default();
            while !stop.load(Ordering::Relaxed) {
                let sent_at = match inbox.as_mut() {
                    Some(rx) => match rx.recv().await {
                        Some(at) => at,
                        None => break,
                    },
                    None => Instant::now(),
                };
                let q = &queries[next.fetch_add(1, Ordering::Relaxed) % queries.len()];
                match client.route_call(q.clone()).await {
                    Ok(r) => {
                        if r.get_ref().decision == proto::Decision::RouteToAgent as i32 {
                            res.routed += 1;
                        }
                    }
                    Err(s) => *res.errors.entry(s.code() as i32).or_default() += 1,
                }
                res.latencies_us
                    .push(sent_at.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            res
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    if let Some(p) = pacer {
        // Dropping its senders ends the tasks waiting for a send time.
        p.join()
            .map_err(|_| "the pacer thread panicked".to_owned())?;
    }
    let mut all = TaskResult::default();
    for t in tasks {
        let r = t.await.map_err(|e| e.to_string())?;
        all.latencies_us.extend(r.latencies_us);
        all.routed += r.routed;
        for (k, v) in r.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let n = all.latencies_us.len();
    let failed: u64 = all.errors.values().sum();
    println!(
        "requests={n} rps={:.0} p50_us={} p99_us={} max_us={} failed={failed} errors={:?} routed={}",
        n as f64 / elapsed,
        percentile(&all.latencies_us, 0.50),
        percentile(&all.latencies_us, 0.99),
        all.latencies_us.last().copied().unwrap_or(0),
        all.errors,
        all.routed,
    );
    Ok(())
}

/// The first stored phone (in storage order) that Deskline routes to an agent: a typical answer.
async fn pick(addr: &str, account: &Account, body: &std::path::Path) -> Result<(), String> {
    let ch = connect(addr).await.map_err(|e| e.to_string())?;
    let mut client = ResolverClient::new(ch);
    for raw in stored_phones(account).iter().take(10_000) {
        let Ok(r) = client.route_call(route_request(raw)).await else {
            continue;
        };
        let r = r.into_inner();
        if r.decision == proto::Decision::RouteToAgent as i32 && r.customer.is_some() {
            let msg = route_request(raw).encode_to_vec();
            let mut framed = Vec::with_capacity(5 + msg.len());
            framed.push(0u8);
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            std::fs::write(body, framed).map_err(|e| e.to_string())?;
            println!("caller={:?} bytes={}", raw, r.encoded_len());
            return Ok(());
        }
    }
    Err("no routed number among the first 10000 customers".into())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Directory { account } => {
            directory(&account);
            Ok(())
        }
        Cmd::Health { addr, timeout_secs } => {
            health(&addr, Duration::from_secs(timeout_secs)).await
        }
        Cmd::Probe { addr, caller } => match probe(&addr, &caller).await {
            Ok(r) => {
                println!("code=0 bytes={}", r.encoded_len());
                Ok(())
            }
            Err(s) => {
                println!("code={} bytes=0", s.code() as i32);
                Err(format!("{addr}: {:?}: {}", s.code(), s.message()))
            }
        },
        Cmd::Pick {
            addr,
            account,
            body,
        } => pick(&addr, &account, &body).await,
        Cmd::Run {
            addr,
            account,
            connections,
            concurrency,
            seconds,
            rps,
            unknown_pct,
            distinct,
            queries,
        } => {
            run(
                &addr,
                &account,
                connections,
                concurrency,
                seconds,
                rps,
                unknown_pct,
                distinct,
                queries.as_deref(),
            )
            .await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
