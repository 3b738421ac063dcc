//! The upper bound for `RouteCall` (issue 5): a bare tonic server built from the same crate
//! versions and the same generated `Resolver` service, whose `RouteCall` returns a pre-built
//! response of a given encoded size and does no other work (no index, no parsing, no metrics, no
//! logging, no interceptor). Deskline cannot be faster than this on the same machine.
//!
//! Because it implements the very same service, `benches/load.sh` sends the same request bytes to
//! both servers with h2load, and `examples/loadgen.rs` drives both with the same client.
//!
//! Run: `cargo run --release --example echo_baseline -- --listen 127.0.0.1:50061 --reply-size 420`
//! (`--reply-size` is the encoded size of a typical `RouteCallResponse`; `loadgen pick` measures it
//! against a running Deskline).

use std::{net::SocketAddr, sync::Arc};

use clap::Parser;
use deskline::proto::{self, resolver_server::Resolver};
use prost::Message;
use tonic::{Request, Response, Status};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// Encoded size of the `RouteCallResponse` to answer with, in bytes.
    #[arg(long, default_value_t = 400)]
    reply_size: usize,
}

/// A routed answer shaped like Deskline's, with `reason` padded so the encoding is exactly `size`
/// bytes (or the smallest size this shape allows, if `size` is smaller).
fn reply_of_size(size: usize) -> proto::RouteCallResponse {
    let base = "https://deskline.zendesk.com";
    let mut r = proto::RouteCallResponse {
        decision: proto::Decision::RouteToAgent as i32,
        basis: proto::Basis::OpenTicket as i32,
        agent: Some(proto::Agent {
            zendesk_id: 361_000_000_001,
            name: "Olena Kovalenko".into(),
            email: "olena.kovalenko@deskline.test".into(),
            extension: "101".into(),
        }),
        ticket: Some(proto::Ticket {
            id: 1_000_123,
            status: "open".into(),
            subject: "Callback request".into(),
            url: format!("{base}/agent/tickets/1000123"),
            assignee_id: 361_000_000_001,
            updated_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        }),
        customer: Some(proto::Customer {
            zendesk_id: 360_000_123_456,
            name: "Customer".into(),
            url: format!("{base}/agent/users/360000123456"),
            phone: "+380501234567".into(),
            organization: None,
        }),
        reason: String::new(),
        index_age_ms: 1234,
        index_state: proto::IndexState::Ready as i32,
    };
    // The reason's length prefix grows by a byte at 128, so converge rather than compute once.
    for _ in 0..4 {
        let missing = size.saturating_sub(r.encoded_len());
        if missing == 0 {
            break;
        }
        let len = r.reason.len() + missing;
        r.reason = "r".repeat(len);
    }
    while r.encoded_len() > size && !r.reason.is_empty() {
        r.reason.pop();
    }
    r
}

struct Echo {
    reply: Arc<proto::RouteCallResponse>,
}

#[tonic::async_trait]
impl Resolver for Echo {
    async fn route_call(
        &self,
        _request: Request<proto::RouteCallRequest>,
    ) -> Result<Response<proto::RouteCallResponse>, Status> {
        Ok(Response::new((*self.reply).clone()))
    }

    async fn lookup_caller(
        &self,
        _request: Request<proto::LookupCallerRequest>,
    ) -> Result<Response<proto::LookupCallerResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn report_call(
        &self,
        _request: Request<proto::ReportCallRequest>,
    ) -> Result<Response<proto::ReportCallResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn get_call_status(
        &self,
        _request: Request<proto::GetCallStatusRequest>,
    ) -> Result<Response<proto::GetCallStatusResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let reply = reply_of_size(args.reply_size);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "echo_baseline: listening on {}, RouteCall answers {} bytes",
        listener.local_addr()?,
        reply.encoded_len()
    );
    let service = proto::resolver_server::ResolverServer::new(Echo {
        reply: Arc::new(reply),
    });
    // Same transport settings as `deskline::grpc::serve` (TCP_NODELAY on every accepted socket;
    // `Server::tcp_nodelay` would be ignored with an incoming stream).
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
