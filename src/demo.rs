//! `deskline demo`: the simulator and the service together on loopback with a small generated
//! account; prints real answers over gRPC and one synced call, then serves until Ctrl-C so a
//! newcomer can try `grpcurl` (reflection is on).

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use tonic::transport::Channel;

use crate::{
    app::Service,
    config::Config,
    proto::{
        self, GetCallStatusRequest, LookupCallerRequest, ReportCallRequest, RouteCallRequest,
        get_call_status_response::SyncState, resolver_client::ResolverClient,
    },
};
use deskline_sim::{self as sim, GenConfig, SimConfig};

/// The demo's account: big enough to be realistic, small enough to start in a second.
const USERS: usize = 2_000;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Where the gRPC server listens (falls back to a free port when taken).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let store = sim::generate(&GenConfig {
        users: USERS,
        tickets: 3_000,
        agents: 12,
        organizations: 150,
        seed: args.seed,
    });
    let sim = sim::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        SimConfig::default(),
        store,
    )
    .await;
    println!(
        "Zendesk simulator: {} (email {}, token {})",
        sim.url(),
        sim.email(),
        sim.token()
    );

    // The PBX directory: every agent but the last gets an extension, so one shows default routing.
    let mut agents: Vec<(i64, String)> = sim.with_store(|s| {
        s.find_users(usize::MAX, |u, _| u.is_agent() && u.is_active())
            .into_iter()
            .map(|(u, _)| (u.id, u.name.unwrap_or_default()))
            .collect()
    });
    agents.sort();
    let unmapped = agents.last().map(|a| a.1.clone()).unwrap_or_default();
    let mut directory = String::from("[routing.directory]\n");
    for (i, (_, name)) in agents
        .iter()
        .enumerate()
        .take(agents.len().saturating_sub(1))
    {
        directory.push_str(&format!("{} = \"{}\"\n", toml_string(name), 101 + i));
    }
    let data_dir = std::env::temp_dir().join(format!("deskline-demo-{}", std::process::id()));
    let senior = agents.first().map(|a| a.1.clone()).unwrap_or_default();
    let text = format!(
        "[zendesk]\nurl = \"{}\"\nemail = \"{}\"\ntoken = \"{}\"\n[storage]\ndata_dir = {}\n[index]\npoll_seconds = 10\n\
         [sync]\nsenior_manager = {}\n{directory}",
        sim.url(),
        sim.email(),
        sim.token(),
        toml_string(&data_dir.display().to_string()),
        toml_string(&senior),
    );
    let config =
        Config::from_toml_and_env(&text, std::path::Path::new("demo.toml"), std::iter::empty())?;
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let service = Service::start(config, listener).await?;
    tokio::time::timeout(Duration::from_secs(120), service.wait_loaded())
        .await
        .context("the index did not load")?;
    let addr = service.addr();
    println!("Deskline: gRPC on {addr}, index loaded from the simulator's exports\n");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = ResolverClient::new(channel);
    let example = show_answers(&mut client, &sim, &unmapped).await?;
    show_synced_call(
        &mut client,
        &sim,
        agents.first().map(|a| a.1.as_str()).unwrap_or(""),
    )
    .await?;

    println!("\nTry it (reflection is on, no proto file needed):");
    println!(
        "  grpcurl -plaintext -d '{{\"caller\":\"{example}\"}}' {addr} deskline.v1.Resolver/RouteCall"
    );
    println!(
        "  grpcurl -plaintext -d '{{\"number\":\"{example}\"}}' {addr} deskline.v1.Resolver/LookupCaller"
    );
    println!("  grpcurl -plaintext {addr} grpc.health.v1.Health/Check");
    println!("Serving until Ctrl-C.");
    let result = service.run_until_signal().await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn line(r: &proto::RouteCallResponse) -> String {
    let decision = proto::Decision::try_from(r.decision)
        .map(|d| d.as_str_name())
        .unwrap_or("?");
    let agent = r
        .agent
        .as_ref()
        .map(|a| format!(" agent={:?} ext={:?}", a.name, a.extension))
        .unwrap_or_default();
    let ticket = r
        .ticket
        .as_ref()
        .map(|t| format!(" ticket={} ({})", t.id, t.status))
        .unwrap_or_default();
    format!("{decision}{agent}{ticket} reason={:?}", r.reason)
}

/// Asks about numbers of the generated account until it has shown a routed call, each kind of
/// default routing it can find, and caller ID. Returns a routed number for the grpcurl hint.
async fn show_answers(
    client: &mut ResolverClient<Channel>,
    sim: &sim::SimHandle,
    unmapped: &str,
) -> anyhow::Result<String> {
    let phones: Vec<String> = sim.with_store(|s| {
        s.find_users(400, |u, _| {
            u.is_end_user() && u.is_active() && u.phone.is_some()
        })
        .into_iter()
        .filter_map(|(u, _)| u.phone)
        .collect()
    });
    let mut shown = std::collections::BTreeSet::new();
    let mut routed = None;
    println!("RouteCall (numbers as the PBX might send them, in whatever format Zendesk stored):");
    for phone in &phones {
        let r = client
            .route_call(RouteCallRequest {
                caller: phone.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let kind = if r.decision == proto::Decision::RouteToAgent as i32 {
            "routed".to_owned()
        } else {
            r.reason
                .split_whitespace()
                .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
                .take(4)
                .collect::<Vec<_>>()
                .join(" ")
        };
        if shown.insert(kind.clone()) {
            println!("  {phone:>22} -> {}", line(&r));
            if kind == "routed" {
                routed = Some(phone.clone());
            }
        }
        if shown.len() >= 4 && routed.is_some() {
            break;
        }
    }
    let unknown = "+380 99 000 00 01";
    let r = client
        .route_call(RouteCallRequest {
            caller: unknown.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("  {unknown:>22} -> {}", line(&r));
    if !unmapped.is_empty() {
        println!(
            "  (agent {unmapped:?} is left out of the demo directory, so their calls show default routing)"
        );
    }
    let example = routed.unwrap_or_else(|| phones.first().cloned().unwrap_or_default());
    let l = client
        .lookup_caller(LookupCallerRequest {
            number: example.clone(),
        })
        .await?
        .into_inner();
    println!("\nLookupCaller {example:?}:");
    println!(
        "  display_name: {}\n  contact_url:  {}\n  lead_url:     {}",
        l.display_name, l.contact_url, l.lead_url
    );
    Ok(example)
}

/// Reports a call from a number Zendesk has never seen and shows what the sync created.
async fn show_synced_call(
    client: &mut ResolverClient<Channel>,
    sim: &sim::SimHandle,
    agent: &str,
) -> anyhow::Result<()> {
    let number = "+380 93 777 12 34";
    let call_id = format!("demo-{}", std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    client
        .report_call(ReportCallRequest {
            call_id: call_id.clone(),
            direction: proto::Direction::Incoming as i32,
            outcome: proto::Outcome::Answered as i32,
            client_number: number.into(),
            line_number: "+380 44 200 00 00".into(),
            started_at: Some(prost_types::Timestamp {
                seconds: now - 300,
                nanos: 0,
            }),
            duration_seconds: 185,
            wait_seconds: 12,
            recording_url: "https://pbx.example/recordings/demo.mp3".into(),
            employee_name: agent.into(),
            scheme_name: "Sales line".into(),
            utm: [
                ("utm_source".to_owned(), "google".to_owned()),
                ("utm_campaign".to_owned(), "spring".to_owned()),
            ]
            .into(),
            ..Default::default()
        })
        .await?;
    println!(
        "\nReportCall {call_id:?} from {number}, answered by {agent:?}: accepted (stored durably)"
    );
    let started = std::time::Instant::now();
    let status = loop {
        let s = client
            .get_call_status(GetCallStatusRequest {
                call_id: call_id.clone(),
            })
            .await?
            .into_inner();
        if s.state == SyncState::Done as i32 || s.state == SyncState::Failed as i32 {
            break s;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the call was not synced within a minute: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let state = SyncState::try_from(status.state)
        .map(|s| s.as_str_name())
        .unwrap_or("?");
    println!(
        "  GetCallStatus: {state} after {} attempt(s); created user={} organization={} ticket={}; comment added={}",
        status.attempts,
        status.created_user,
        status.created_organization,
        status.created_ticket,
        status.comment_added
    );
    if !status.last_error.is_empty() {
        println!("  last_error: {}", status.last_error);
    }
    sim.with_store(|s| {
        if let Some(u) = s.user(status.user_id) {
            println!(
                "  Zendesk user {}: {:?} phone {:?}",
                u.id,
                u.name.unwrap_or_default(),
                u.phone.unwrap_or_default()
            );
        }
        if let Some(o) = s.organization(status.organization_id) {
            println!(
                "  Zendesk organization {}: {:?}",
                o.id,
                o.name.unwrap_or_default()
            );
        }
        if let Some(t) = s.ticket(status.ticket_id) {
            println!(
                "  Zendesk ticket {}: {:?} priority={} type={} assignee={}",
                t.id,
                t.subject.unwrap_or_default(),
                t.priority.unwrap_or_default(),
                t.kind.unwrap_or_default(),
                t.assignee_id.unwrap_or_default()
            );
            if let Some(c) = s.comments(t.id).last() {
                let body = c.body.clone().unwrap_or_default();
                println!("  its call comment (public={}):", c.public.unwrap_or(false));
                for l in body.lines().take(12) {
                    println!("    | {l}");
                }
            }
        }
    });
    let r = client
        .route_call(RouteCallRequest {
            caller: number.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "  RouteCall {number} right away (read-your-writes, no export needed) -> {}",
        line(&r)
    );
    Ok(())
}
