//! Secrets and personal data stay out of the logs (issue 6 §4). The whole run is captured at debug
//! level into a buffer: warm-up, authenticated routing (and a wrong bearer token), a synced call
//! from a new number, and a Zendesk 401. The buffer must hold no Zendesk API token (plain or inside
//! the Basic header), no gRPC bearer token, and, at info level and above, no full phone number.
//!
//! Its own test binary, because the capturing subscriber is process-global.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use common::*;
use deskline::proto::{
    self, GetCallStatusRequest, ReportCallRequest, RouteCallRequest,
    get_call_status_response::SyncState, resolver_client::ResolverClient,
};
use deskline_sim as sim;
use tonic::{Request, metadata::MetadataValue};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const API_TOKEN: &str = "zd-api-token-Q7x9LmP2vR4s";
const BEARER: &str = "pbx-bearer-token-K3j8Hd5fWq1z";
const CUSTOMER: &str = "+380441234567";
const NEW_NUMBER: &str = "+380671112233";

/// The forms a number could take in a log line.
fn forms(e164: &str) -> Vec<String> {
    let digits = e164.trim_start_matches('+');
    vec![
        digits.to_owned(),
        digits[3..].to_owned(),       // the national significant number
        format!("0{}", &digits[3..]), // the national format
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_logs_no_secret_and_no_full_number_at_info() {
    let buf = Buffer::default();
    let writer = buf.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let (s, _) = one_ticket_account(CUSTOMER);
    let sim = start_sim(s, |c| {
        c.token = API_TOKEN.into();
        c.search_delay = Duration::ZERO;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &sim,
        dir.path(),
        &format!(
            "[server]\ntokens = [\"{BEARER}\"]\n[routing.directory]\n\"Olena Petrenko\" = \"101\"\n[sync]\nsenior_manager = \"Olena Petrenko\"\n"
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = deskline::app::Service::start(parse_config(&text), listener)
        .await
        .unwrap();
    wait_loaded(&service).await;

    let bearer: MetadataValue<_> = format!("Bearer {BEARER}").parse().unwrap();
    let ch = channel(service.addr()).await;
    let mut grpc = ResolverClient::with_interceptor(ch.clone(), move |mut r: Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let routed = grpc
        .route_call(RouteCallRequest {
            caller: CUSTOMER.into(),
            call_id: "log-route-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(routed.decision(), proto::Decision::RouteToAgent);
    // A wrong bearer token: refused, and not echoed into the logs either.
    let wrong: MetadataValue<_> = "Bearer wrong-token-but-long-enough".parse().unwrap();
    let e = ResolverClient::with_interceptor(ch.clone(), move |mut r: Request<()>| {
        r.metadata_mut().insert("authorization", wrong.clone());
        Ok(r)
    })
    .route_call(RouteCallRequest {
        caller: CUSTOMER.into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let report = |id: &str| ReportCallRequest {
        call_id: id.into(),
        direction: proto::Direction::Incoming as i32,
        outcome: proto::Outcome::Answered as i32,
        client_number: NEW_NUMBER.into(),
        started_at: Some(prost_types::Timestamp {
            seconds: 1_714_557_600,
            nanos: 0,
        }),
        employee_name: "Olena Petrenko".into(),
        client_name: "Private Person".into(),
        ..Default::default()
    };
    let status_client = grpc.clone();
    let wait_end = |id: &'static str| {
        let grpc = status_client.clone();
        async move {
            eventually(id, DEADLINE, || {
                let mut g = grpc.clone();
                async move {
                    let st = g
                        .get_call_status(GetCallStatusRequest { call_id: id.into() })
                        .await
                        .ok()?
                        .into_inner();
                    matches!(st.state(), SyncState::Done | SyncState::Failed).then_some(st)
                }
            })
            .await
        }
    };
    grpc.report_call(report("log-call-1")).await.unwrap();
    assert_eq!(wait_end("log-call-1").await.state(), SyncState::Done);

    // Zendesk now refuses the credentials: a 401 on the next call's sync.
    sim.set_config(|c| c.token = "rotated-elsewhere".into());
    grpc.report_call(report("log-call-2")).await.unwrap();
    assert_eq!(wait_end("log-call-2").await.state(), SyncState::Failed);
    service.shutdown().await.unwrap();
    sim.shutdown().await;

    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("DEBUG"),
        "the capture must include debug lines"
    );
    assert!(logs.contains("401"), "the 401 must be logged");
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/token:{API_TOKEN}", sim::OWNER_EMAIL));
    for secret in [API_TOKEN, BEARER, "wrong-token-but-long-enough", &basic] {
        let hits: Vec<&str> = logs.lines().filter(|l| l.contains(secret)).collect();
        assert!(hits.is_empty(), "{secret:?} logged: {hits:#?}");
    }
    // Info and above, outside the simulator (a test instrument that stands in for Zendesk).
    let info: Vec<&str> = logs
        .lines()
        .filter(|l| {
            ["  INFO ", "  WARN ", " ERROR "]
                .iter()
                .any(|lvl| l.contains(lvl))
        })
        .filter(|l| !l.contains("deskline_sim"))
        .collect();
    assert!(info.len() > 5, "too few info lines captured: {info:#?}");
    for number in [CUSTOMER, NEW_NUMBER] {
        for form in forms(number) {
            let hits: Vec<&&str> = info.iter().filter(|l| l.contains(&form)).collect();
            assert!(hits.is_empty(), "{form} at info level: {hits:#?}");
        }
    }
    let _ = std::io::stderr().write_all(
        format!(
            "captured {} log lines ({} at info or above): no secret, no full number\n",
            logs.lines().count(),
            info.len()
        )
        .as_bytes(),
    );
}
