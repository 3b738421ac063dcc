//! Freshness (issue 13): from a change in the simulator to the gRPC answer changing, over N random
//! changes (`FRESHNESS_CHANGES`, default 1000, at `FRESHNESS_RATE` per second, default 20), once
//! with webhooks (export poll 10 min) and once with the export only (one-minute rule 60 s, poll
//! 60 s, as on real Zendesk). Prints p50 / p99 / max of each.
//!
//! `cargo bench --bench webhook_freshness` (set `FRESHNESS_MODES=webhooks` to skip the slow
//! export-only run).
//!
//! Kinds of change, drawn at random: reassign a customer's open ticket (RouteCall extension
//! changes), open a ticket for a customer without one (default routing → agent), add a phone
//! identity (LookupCaller finds the new number).

use std::time::{Duration, Instant};

use deskline::{
    app::Service,
    config::Config,
    proto::{LookupCallerRequest, RouteCallRequest, resolver_client::ResolverClient},
    webhooks::install,
    zendesk::Client,
};
use deskline_sim::{NewTicket, NewUser, Role, SimConfig, Status, Store, TicketPatch};
use rand::{Rng as _, SeedableRng as _};
use secrecy::ExposeSecret as _;

struct Account {
    store: Store,
    olena: i64,
    mykola: i64,
    /// `(customer, number, open ticket)`.
    customers: Vec<(i64, String, Option<i64>)>,
}

fn account(n: usize) -> Account {
    let mut s = Store::new();
    s.create_user(NewUser {
        name: "Owner".into(),
        email: Some(deskline_sim::OWNER_EMAIL.into()),
        role: Some(Role::Admin),
        ..NewUser::default()
    })
    .unwrap();
    let agent = |s: &mut Store, name: &str, email: &str| {
        s.create_user(NewUser {
            name: name.into(),
            email: Some(email.into()),
            role: Some(Role::Agent),
            ..NewUser::default()
        })
        .unwrap()
    };
    let olena = agent(&mut s, "Olena Petrenko", "olena@x.test");
    let mykola = agent(&mut s, "Mykola Ivanenko", "mykola@x.test");
    let mut customers = Vec::new();
    for i in 0..n {
        let number = format!("+38050{:07}", i);
        let c = s
            .create_user(NewUser {
                name: format!("Customer {i}"),
                phone: Some(number.clone()),
                ..NewUser::default()
            })
            .unwrap();
        let t = (i % 2 == 0).then(|| {
            s.create_ticket(NewTicket {
                requester_id: c,
                assignee_id: Some(olena),
                status: Some(Status::Open),
                ..NewTicket::default()
            })
            .unwrap()
        });
        customers.push((c, number, t));
    }
    Account {
        store: s,
        olena,
        mykola,
        customers,
    }
}

/// What the answer for a number must become.
enum Expect {
    Extension(&'static str),
    Found,
}

async fn answer_is(c: &mut ResolverClient<tonic::transport::Channel>, n: &str, e: &Expect) -> bool {
    match e {
        Expect::Extension(x) => c
            .route_call(RouteCallRequest {
                caller: n.into(),
                ..Default::default()
            })
            .await
            .is_ok_and(|r| r.into_inner().agent.is_some_and(|a| a.extension == *x)),
        Expect::Found => c
            .lookup_caller(LookupCallerRequest { number: n.into() })
            .await
            .is_ok_and(|r| r.into_inner().found),
    }
}

async fn run(webhooks: bool, changes: usize, rate: f64) -> Vec<Duration> {
    let acc = account(changes);
    let (olena, mykola) = (acc.olena, acc.mykola);
    let sim = deskline_sim::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        SimConfig {
            one_minute_rule: if webhooks {
                Duration::ZERO
            } else {
                Duration::from_secs(60)
            },
            requests_per_minute: 100_000,
            export_requests_per_minute: 100_000,
            ..SimConfig::default()
        },
        acc.store,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "[zendesk]\nurl = \"{}\"\nemail = \"{}\"\ntoken = \"{}\"\nrequests_per_minute = 100000\nexport_requests_per_minute = 100000\n[storage]\ndata_dir = \"{}\"\n[routing.directory]\n\"Olena Petrenko\" = \"101\"\n\"Mykola Ivanenko\" = \"102\"\n",
        sim.url(),
        sim.email(),
        sim.token(),
        dir.path().display()
    );
    let load = |t: &str| {
        Config::from_toml_and_env(t, std::path::Path::new("bench.toml"), std::iter::empty())
            .unwrap()
    };
    let zd = Client::new(load(&base).client_options().unwrap()).unwrap();
    let text = if webhooks {
        let i = install::install(&zd, "http://127.0.0.1:9/", install::Mode::Events)
            .await
            .unwrap();
        format!(
            "{base}[index]\npoll_seconds = 600\n[webhooks]\nlisten = \"127.0.0.1:0\"\nsigning_secret = \"{}\"\n",
            i.secrets[0].expose_secret()
        )
    } else {
        format!("{base}[index]\npoll_seconds = 60\n")
    };
    let service = Service::start(
        load(&text),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    if let Some(addr) = service.webhooks_addr() {
        let url = format!("http://{addr}/zendesk/webhook");
        install::install(&zd, &url, install::Mode::Events)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), service.wait_loaded())
        .await
        .expect("warm-up");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ResolverClient::new(channel);

    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut pending: Vec<(String, Expect, Instant)> = Vec::new();
    let mut done = Vec::new();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    let mut made = 0;
    let deadline = Instant::now() + Duration::from_secs(60 + changes as u64 * 2);
    while made < changes || !pending.is_empty() {
        // Every change due by now (the polling below can take a while when many are pending).
        while made < changes && Instant::now() >= next {
            let (customer, number, ticket) = acc.customers[made].clone();
            let kind = rng.random_range(0..3);
            let expect = sim.with_store(|s| match (kind, ticket) {
                (2, _) => {
                    let n = format!("+38067{:07}", made);
                    s.add_phone_identity(customer, &n).unwrap();
                    (n, Expect::Found)
                }
                (_, Some(t)) => {
                    s.update_ticket(
                        t,
                        TicketPatch {
                            assignee_id: Some(Some(mykola)),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    (number, Expect::Extension("102"))
                }
                (_, None) => {
                    s.create_ticket(NewTicket {
                        requester_id: customer,
                        assignee_id: Some(olena),
                        status: Some(Status::Open),
                        ..NewTicket::default()
                    })
                    .unwrap();
                    (number, Expect::Extension("101"))
                }
            });
            pending.push((expect.0, expect.1, Instant::now()));
            made += 1;
            next += interval;
        }
        let mut still = Vec::new();
        for (n, e, t0) in pending.drain(..) {
            if answer_is(&mut c, &n, &e).await {
                done.push(t0.elapsed());
            } else {
                still.push((n, e, t0));
            }
        }
        pending = still;
        assert!(
            Instant::now() < deadline,
            "changes not seen: {}",
            pending.len()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    service.shutdown().await.unwrap();
    sim.shutdown().await;
    done
}

fn report(name: &str, mut d: Vec<Duration>) {
    d.sort();
    let p = |q: f64| d[((d.len() as f64 * q).ceil() as usize).clamp(1, d.len()) - 1];
    println!(
        "{name:>9}: n={} p50={:?} p99={:?} max={:?}",
        d.len(),
        p(0.50),
        p(0.99),
        d[d.len() - 1]
    );
}

fn main() {
    let changes = std::env::var("FRESHNESS_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rate = std::env::var("FRESHNESS_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20.0);
    let modes = std::env::var("FRESHNESS_MODES").unwrap_or_else(|_| "webhooks,export".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    for mode in modes.split(',') {
        let webhooks = mode == "webhooks";
        let d = rt.block_on(run(webhooks, changes, rate));
        report(mode, d);
    }
}
