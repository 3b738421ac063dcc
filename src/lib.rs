//! Deskline puts a PBX / call-tracking platform and one Zendesk account on speaking terms.
//!
//! Modules, each with one room of the house (see `../shared/DESIGN.md` for the contracts):
//! - [`clock`]: the one wall clock (Unix ms) and the one retry schedule.
//! - [`phone`]: any number to E.164 for a default region (libphonenumber port).
//! - [`zendesk`]: the HTTP client: auth, the shared request budget, retries, serde models.
//! - [`index`]: the in-memory read model (customers by phone, open tickets, agents, organizations)
//!   and its snapshot on disk.
//! - [`follow`]: follows Zendesk's incremental exports and feeds the index.
//! - [`webhooks`]: the Zendesk webhook endpoint that keeps the index fresh within seconds, and
//!   `deskline webhooks install`.
//! - [`routing`]: the routing and caller-ID decisions, pure functions over the index.
//! - [`cluster`]: coordination of several replicas through PostgreSQL: lease, shared budget,
//!   change log, shared snapshot.
//! - [`sync`]: the durable post-call queue (SQLite, or PostgreSQL for replicas) and the worker that
//!   writes calls into Zendesk.
//! - [`pg`]: the PostgreSQL pool and the schema migrations shared by replicas.
//! - [`replica`]: one index, many copies: the change log applied in order, one export follower,
//!   the shared snapshot.
//! - [`grpc`]: the tonic service: validation, auth, proto ↔ domain conversion, status mapping.
//! - [`config`], [`app`]: typed configuration; starting, supervising and stopping the tasks.
//! - [`check`], [`demo`]: the operator's `deskline check` and the newcomer's `deskline demo`.
//! - [`metrics`]: Prometheus `/metrics` and `/healthz` on `server.metrics_listen`; every metric name.
//!
//! The Zendesk simulator is its own crate, `deskline-sim` (`sim/` in this workspace), so that it
//! shares no wire types with the client it tests; `deskline sim` and `deskline demo` link it through
//! the default-on `sim` feature.
#![forbid(unsafe_code)]
#![warn(unreachable_pub, missing_docs)]

pub mod app;
pub(crate) mod check;
pub(crate) mod clock;
pub(crate) mod cluster;
pub mod config;
#[cfg(feature = "sim")]
pub(crate) mod demo;
pub(crate) mod follow;
pub mod grpc;
pub mod index;
pub mod metrics;
pub mod pg;
pub mod phone;
pub(crate) mod replica;
pub mod routing;
pub mod sync;
pub mod webhooks;
pub mod zendesk;

/// Generated from `proto/deskline/v1/resolver.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("deskline.v1");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/deskline_descriptor.bin"));
}
