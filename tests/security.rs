//! Security end to end (issue 6 §4): gRPC over TLS with a certificate from the config, a bad
//! certificate refused at start-up naming the key, and `deskline serve` refusing a plain-http
//! Zendesk URL that is not loopback (exit status 2, message naming `zendesk.url`).

mod common;

use std::process::Command;

use common::*;
use deskline::proto::{RouteCallRequest, resolver_client::ResolverClient};
use deskline_sim::{NewUser, Store};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn store() -> Store {
    let mut s = store_with_owner();
    s.create_user(NewUser {
        name: "TLS Customer".into(),
        phone: Some("+380441234567".into()),
        ..NewUser::default()
    })
    .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_the_configured_certificate() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let sim = start_sim(store(), |_| {}).await;
    let service = start_service(&config_text(
        &sim,
        &dir.path().join("data"),
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    ))
    .await;
    wait_loaded(&service).await;
    let addr = service.addr();

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ck.cert.pem()))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS handshake with the configured certificate");
    let r = ResolverClient::new(ch)
        .route_call(RouteCallRequest {
            caller: "+380441234567".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.customer.map(|c| c.name).as_deref(), Some("TLS Customer"));

    // Plain HTTP/2 to the TLS port gets no answer.
    let plain = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => ResolverClient::new(ch)
            .route_call(RouteCallRequest {
                caller: "+380441234567".into(),
                ..Default::default()
            })
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client was answered on the TLS port");

    // A client that does not trust the certificate is refused too.
    let untrusted = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().domain_name("localhost"))
        .unwrap();
    let refused = match untrusted.connect().await {
        Err(_) => true,
        Ok(ch) => ResolverClient::new(ch)
            .route_call(RouteCallRequest {
                caller: "+380441234567".into(),
                ..Default::default()
            })
            .await
            .is_err(),
    };
    assert!(refused, "an untrusted certificate was accepted");
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_certificate_stops_start_up_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(&key, "garbage").unwrap();
    let sim = start_sim(store(), |_| {}).await;
    let text = config_text(
        &sim,
        &dir.path().join("data"),
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = match deskline::app::Service::start(parse_config(&text), listener).await {
        Ok(_) => panic!("started with an unusable certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("server.tls_cert") && e.contains("server.tls_key"),
        "{e}"
    );
    // And a path that does not exist names its key.
    std::fs::remove_file(&key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = match deskline::app::Service::start(parse_config(&text), listener).await {
        Ok(_) => panic!("started without its key file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("server.tls_key"), "{e}");
    sim.shutdown().await;
}

/// `deskline serve` with a plain-http Zendesk URL to a non-loopback host: exit 2, naming the key,
/// before anything is sent (the token would travel in clear text).
#[test]
fn serve_refuses_plain_http_zendesk_outside_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("deskline.toml");
    for url in ["http://acme.zendesk.com", "http://10.1.2.3:8080"] {
        std::fs::write(
            &config,
            format!(
                "[zendesk]\nurl = \"{url}\"\nemail = \"a@b.test\"\ntoken = \"secret-token-123\"\n[storage]\ndata_dir = \"{}\"\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_deskline"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains("zendesk.url"), "{url}: {stderr}");
        assert!(!stderr.contains("secret-token-123"), "{stderr}");
        assert!(
            !dir.path().join("data").exists(),
            "nothing started for {url}"
        );
    }
}
