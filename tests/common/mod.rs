//! Shared wiring for the end-to-end tests: the simulator and the real service in this process, each
//! on its own 127.0.0.1 port, and a real tonic client. Waiting is always on a condition with a
//! deadline, never a bare sleep.
#![allow(dead_code)]

pub mod answers;
pub mod replicas;

use std::{future::Future, time::Duration};

use deskline::{app::Service, config::Config, proto::resolver_client::ResolverClient};
use deskline_sim::{self as sim, NewTicket, NewUser, Role, SimConfig, SimHandle, Status, Store};
use tonic::transport::Channel;

/// Long enough for a slow CI machine, short enough to fail a hung test.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Starts the simulator on 127.0.0.1:0. Tests shorten the one-minute rule through this explicit
/// test setting; the real-Zendesk path never touches it.
pub async fn start_sim(store: Store, tweak: impl FnOnce(&mut SimConfig)) -> SimHandle {
    // The limits are lifted here (the client's budget in `config_text` matches); tests of rate
    // limiting set them back.
    let mut cfg = SimConfig {
        one_minute_rule: Duration::ZERO,
        requests_per_minute: 100_000,
        export_requests_per_minute: 100_000,
        ..SimConfig::default()
    };
    tweak(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::start(listener, cfg, store).await
}

/// A config pointing at the simulator, with `extra` TOML appended (later tables win by section).
pub fn config_text(sim: &SimHandle, data_dir: &std::path::Path, extra: &str) -> String {
    format!(
        "[zendesk]\nurl = \"{}\"\nemail = \"{}\"\ntoken = \"{}\"\nrequests_per_minute = 100000\nexport_requests_per_minute = 100000\ntimeout_seconds = 5\n\
         [storage]\ndata_dir = \"{}\"\n{extra}",
        sim.url(),
        sim.email(),
        sim.token(),
        data_dir.display()
    )
}

pub fn parse_config(text: &str) -> Config {
    Config::from_toml_and_env(text, std::path::Path::new("test.toml"), std::iter::empty()).unwrap()
}

pub async fn start_service(text: &str) -> Service {
    // `RUST_LOG=debug cargo test …` shows the service's logs for a failing test.
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Service::start(parse_config(text), listener).await.unwrap()
}

pub async fn channel(addr: std::net::SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn client(addr: std::net::SocketAddr) -> ResolverClient<Channel> {
    ResolverClient::new(channel(addr).await)
}

/// Polls `f` until it yields `Some`, or panics after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Where a `deskline serve` child listens, as it announced in `{data_dir}/listening.json`.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub grpc: std::net::SocketAddr,
    pub metrics: Option<std::net::SocketAddr>,
    pub webhooks: Option<std::net::SocketAddr>,
}

/// Removes a previous process's `listening.json` in `data_dir` (before starting another there).
pub fn forget_listening(data_dir: &std::path::Path) {
    let _ = std::fs::remove_file(data_dir.join(deskline::app::LISTENING_FILE));
}

/// Waits until `child` announces its bound addresses in `{data_dir}/listening.json` (written
/// once every listener is bound, with its pid, so an earlier process's file is never taken for
/// it). Panics with `log()` when the child exits first or after [`DEADLINE`]. The config may
/// give port 0 everywhere: no port is picked (and released) by the test, so none can be taken
/// by another process in between.
pub async fn wait_listening(
    child: &mut std::process::Child,
    data_dir: &std::path::Path,
    log: impl Fn() -> String,
) -> Listening {
    let path = data_dir.join(deskline::app::LISTENING_FILE);
    let addr = |v: &serde_json::Value, key: &str| -> Option<std::net::SocketAddr> {
        v.get(key)?.as_str()?.parse().ok()
    };
    let started = tokio::time::Instant::now();
    loop {
        let announced = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|v| v.get("pid").and_then(|p| p.as_u64()) == Some(u64::from(child.id())));
        if let Some(v) = announced {
            return Listening {
                grpc: addr(&v, "grpc").expect("listening.json names the gRPC address"),
                metrics: addr(&v, "metrics"),
                webhooks: addr(&v, "webhooks"),
            };
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("deskline exited with {status}:\n{}", log());
        }
        assert!(
            started.elapsed() < DEADLINE,
            "deskline did not announce its addresses in {}:\n{}",
            path.display(),
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_loaded(service: &Service) {
    tokio::time::timeout(DEADLINE, service.wait_loaded())
        .await
        .expect("the index did not load in time");
}

/// A store with the account owner (an admin whose email is the simulator's credentials).
pub fn store_with_owner() -> Store {
    let mut s = Store::new();
    s.create_user(NewUser {
        name: "Owner".into(),
        email: Some(sim::OWNER_EMAIL.into()),
        role: Some(Role::Admin),
        ..NewUser::default()
    })
    .unwrap();
    s
}

/// The ids of [`one_ticket_account`].
#[derive(Clone, Copy, Debug)]
pub struct OneTicketAccount {
    /// The agent "Olena Petrenko".
    pub olena: i64,
    /// The customer "Taras Shevchenko".
    pub customer: i64,
    /// The customer's open ticket, assigned to Olena.
    pub ticket: i64,
}

/// An owner (admin, the simulator's credentials), one agent "Olena Petrenko", one customer "Taras
/// Shevchenko" with `customer_phone` and an open ticket assigned to her.
pub fn one_ticket_account(customer_phone: &str) -> (Store, OneTicketAccount) {
    let mut s = store_with_owner();
    let olena = s
        .create_user(NewUser {
            name: "Olena Petrenko".into(),
            email: Some("olena@deskline.test".into()),
            role: Some(Role::Agent),
            ..NewUser::default()
        })
        .unwrap();
    let customer = s
        .create_user(NewUser {
            name: "Taras Shevchenko".into(),
            phone: Some(customer_phone.into()),
            ..NewUser::default()
        })
        .unwrap();
    let ticket = s
        .create_ticket(NewTicket {
            requester_id: customer,
            assignee_id: Some(olena),
            status: Some(Status::Open),
            ..NewTicket::default()
        })
        .unwrap();
    (
        s,
        OneTicketAccount {
            olena,
            customer,
            ticket,
        },
    )
}
