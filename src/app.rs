//! Starting, supervising and stopping Deskline's tasks, and the command line (DESIGN §5).
//!
//! A [`Service`] owns one Zendesk account's pieces: the index, the follower, the gRPC server (and,
//! with the post-call sync, the queue and worker). Shutdown is ordered (STYLE.md practice 4): stop
//! accepting RPCs and let in-flight ones finish, stop the background tasks, then write the snapshot.
//!
//! # Supervision
//! Every task lives in one [`JoinSet`] under a name, so the end of each task is observed exactly
//! once (awaiting a finished `JoinHandle` a second time panics in tokio, which used to turn a task's
//! failure into a panic that hid it). When a task ends before shutdown was asked for, that is a
//! failure: the cause chain is logged, the same ordered shutdown runs (the snapshot is saved if it
//! can be), and the process exits non-zero rather than limping on half-alive.
//!
//! # One deadline
//! `server.shutdown_grace_seconds` bounds the *whole* shutdown, not each stage: an orchestrator
//! sends SIGKILL after its own grace period (30 s by default in Kubernetes), and per-stage timeouts
//! added up past it. Each stage ends at a fixed share of the one deadline: in-flight RPCs by half of
//! it, the background tasks by three quarters, the snapshot by the end. So a stuck RPC cannot
//! keep the worker from releasing its jobs, and a stuck task cannot cost the index its snapshot.
//! Whatever is still running at its stage's end is abandoned (aborted, and the runtime is not
//! waited for).

use std::{
    collections::HashMap, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc,
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::{
    net::TcpListener,
    sync::watch,
    task::{JoinError, JoinSet},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::Config,
    follow::{Follower, FollowerOptions},
    grpc::{self, Auth, ServiceState},
    index::{Index, IndexWriter, SharedIndex, snapshot},
    phone::PhoneParser,
    proto::resolver_server::ResolverServer,
    routing::Directory,
    zendesk::Client,
};

/// How long, after the shutdown deadline, the runtime waits for blocking work (a SQLite call, a
/// snapshot write) before the process exits without it.
const RUNTIME_LINGER: Duration = Duration::from_millis(500);

#[derive(Parser)]
#[command(
    name = "deskline",
    version,
    about = "Routes PBX calls by Zendesk ticket ownership, shows caller ID, syncs calls into Zendesk"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// The Zendesk simulator with a generated account (for tests, benchmarks and trying Deskline).
    #[cfg(feature = "sim")]
    Sim(deskline_sim::SimArgs),
    /// The simulator and the service together on loopback, with real answers; serves until Ctrl-C.
    #[cfg(feature = "sim")]
    Demo(crate::demo::DemoArgs),
    /// Validate the config and the Zendesk credentials; compare the directory and field mappings
    /// with Zendesk. Exit status 1 when something would break routing or sync, 2 for a bad config.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Zendesk webhooks (DESIGN §9).
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// Create or update the webhook for `webhooks.public_url` (idempotent) and print its signing
    /// secret and where to put it.
    Install {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Deliver ticket changes through a trigger and `conditional_ticket_events` (for accounts
        /// without ticket event subscriptions) instead of ticket event types.
        #[arg(long)]
        trigger: bool,
    },
}

/// `main` in a few lines: parse, log to stderr, run.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deskline: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve_command(config).await,
            Command::Check { config } => check_command(config).await,
            Command::Webhooks {
                command: WebhooksCommand::Install { config, trigger },
            } => webhooks_install_command(config, trigger).await,
            #[cfg(feature = "sim")]
            Command::Sim(args) => report(deskline_sim::run_cli(args).await),
            #[cfg(feature = "sim")]
            Command::Demo(args) => report(crate::demo::run(args).await),
        }
    });
    // Dropping a runtime waits for every blocking task; one stuck past the shutdown deadline
    // (a SQLite call waiting on a lock) must not hold the process beyond it.
    runtime.shutdown_timeout(RUNTIME_LINGER);
    code
}

/// Exit status and message of `deskline sim` / `deskline demo`.
#[cfg(feature = "sim")]
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deskline: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Loads the config or says which key is wrong; exit status 2 for a bad config.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("deskline: config error: {e}");
        ExitCode::from(2)
    })
}

async fn check_command(config_path: PathBuf) -> ExitCode {
    let config = match load_config(&config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("ok: config {} is valid", config_path.display());
    match crate::check::run(&config).await {
        Err(e) => {
            println!("problem: {e}");
            ExitCode::FAILURE
        }
        Ok(findings) => {
            println!(
                "ok: Zendesk at {} accepted the credentials",
                config.zendesk.url
            );
            for f in &findings {
                println!("{f}");
            }
            let mut problems = findings
                .iter()
                .filter(|f| f.severity == crate::check::Severity::Problem)
                .count();
            if config.webhooks.listen.is_some() || config.webhooks.public_url.is_some() {
                let line = match config
                    .client_options()
                    .map_err(anyhow::Error::from)
                    .and_then(|o| Client::new(o).map_err(anyhow::Error::from))
                {
                    Ok(client) => {
                        crate::webhooks::install::check_line(
                            &client,
                            config.webhooks.public_url.as_deref(),
                        )
                        .await
                    }
                    Err(e) => format!("webhooks: PROBLEM: {e:#}"),
                };
                if line.contains("PROBLEM") {
                    problems += 1;
                }
                println!("{line}");
            }
            let warnings = findings
                .iter()
                .filter(|f| f.severity == crate::check::Severity::Warning)
                .count();
            println!("{problems} problem(s), {warnings} warning(s)");
            if problems > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

async fn webhooks_install_command(config_path: PathBuf, trigger: bool) -> ExitCode {
    use crate::webhooks::install;
    use secrecy::ExposeSecret as _;
    let config = match load_config(&config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(url) = config.webhooks.public_url.clone() else {
        eprintln!("deskline: config error: webhooks.public_url: required to install the webhook");
        return ExitCode::from(2);
    };
    let client = match config
        .client_options()
        .map_err(anyhow::Error::from)
        .and_then(|o| Client::new(o).map_err(anyhow::Error::from))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("deskline: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mode = if trigger {
        install::Mode::Trigger
    } else {
        install::Mode::Events
    };
    match install::install(&client, &url, mode).await {
        Err(e) => {
            eprintln!("deskline: webhook not installed: {e}");
            ExitCode::FAILURE
        }
        Ok(done) => {
            for ((w, created), secret) in done.webhooks.iter().zip(&done.secrets) {
                let verb = if *created { "created" } else { "updated" };
                println!("{verb} webhook {} ({:?}) -> {}", w.id, w.name, w.endpoint);
                println!("signing secret: {}", secret.expose_secret());
            }
            let lines = if done.secrets.len() > 1 {
                "one secret a line"
            } else {
                "one line"
            };
            println!(
                "put the signing secret{} in webhooks.signing_secret_file ({lines}, readable only \
                 by deskline) or DESKLINE_WEBHOOKS__SIGNING_SECRET (separated by spaces)",
                if done.secrets.len() > 1 { "s" } else { "" }
            );
            if let Some(t) = done.trigger_id {
                println!(
                    "trigger {t} ({:?}) notifies the tickets webhook",
                    install::TRIGGER_TITLE
                );
            }
            ExitCode::SUCCESS
        }
    }
}

async fn serve_command(config_path: PathBuf) -> ExitCode {
    let config = match load_config(&config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let listener = match TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "deskline: cannot listen on {} (server.listen): {e}",
                config.server.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let announce_path = config.storage.data_dir.join(LISTENING_FILE);
    let service = match Service::start(config, listener).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("deskline: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = announce(&announce_path, &service) {
        warn!(path = %announce_path.display(), error = %e, "the bound addresses were not written");
    }
    let code = match service.run_until_signal().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("deskline stopped: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Only a process that is gone without stopping (SIGKILL) leaves it; its `pid` tells.
    let _ = std::fs::remove_file(&announce_path);
    code
}

/// The file in `storage.data_dir` where `deskline serve` announces its bound addresses.
pub const LISTENING_FILE: &str = "listening.json";

/// Writes the bound addresses (`server.listen`, `server.metrics_listen`, `webhooks.listen`, port
/// 0 resolved) and this process's id to `path` as JSON, atomically (a temporary file renamed
/// over it), once every listener is bound: whoever started the process (a test harness, a
/// supervisor) reads where to connect without picking a free port itself, which another process
/// could take before Deskline binds it. `{"pid":…,"grpc":"127.0.0.1:…","metrics":…|null,
/// "webhooks":…|null}`.
fn announce(path: &std::path::Path, service: &Service) -> std::io::Result<()> {
    let text = serde_json::json!({
        "pid": std::process::id(),
        "grpc": service.addr().to_string(),
        "metrics": service.metrics_addr().map(|a| a.to_string()),
        "webhooks": service.webhooks_addr().map(|a| a.to_string()),
    })
    .to_string();
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// A running Deskline for one Zendesk account.
pub struct Service {
    addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are served (`server.metrics_listen`), if anywhere.
    metrics_addr: Option<SocketAddr>,
    /// Where the Zendesk webhook endpoint is served (`webhooks.listen`), if anywhere.
    webhooks_addr: Option<SocketAddr>,
    metrics: Arc<crate::metrics::Metrics>,
    index: SharedIndex,
    snapshot_path: PathBuf,
    /// True once the index is loaded and health says SERVING.
    ready: watch::Receiver<bool>,
    /// True once health says SERVING (complete, or WARMING after a bootstrap).
    answering: watch::Receiver<bool>,
    /// Set to NOT_SERVING when shutdown starts, so balancers stop sending new calls here.
    health: tonic_health::server::HealthReporter,
    /// Stops the gRPC server (first stage of shutdown).
    stop_rpc: CancellationToken,
    /// Stops the background tasks (second stage).
    stop_background: CancellationToken,
    tasks: Tasks,
    /// The gRPC server's task in `tasks`.
    rpc: tokio::task::Id,
    /// `server.shutdown_grace_seconds`: the whole shutdown's deadline.
    grace: Duration,
}

impl Service {
    /// Starts everything on an already bound listener (tests bind `127.0.0.1:0`). Serves from the
    /// snapshot at once when there is one; otherwise health is NOT_SERVING until the warm-up ends.
    pub async fn start(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        // TLS first: a bad certificate stops start-up before any task is spawned.
        let tls = match config.tls_pem()? {
            Some(pem) => Some(grpc::tls_config(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "server.tls_cert / server.tls_key: not a usable PEM certificate chain and private key: {e}"
                )
            })?),
            None => None,
        };
        let data_dir = config.storage.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create storage.data_dir {}", data_dir.display()))?;
        let parser = PhoneParser::new(&config.phone.default_region).map_err(anyhow::Error::msg)?;
        let snapshot_path = data_dir.join("index.snapshot");
        // The store first: with PostgreSQL, the client's budget is the account's shared one
        // before its first request (the follower's warm-up included), and the index starts from
        // the shared snapshot and change log instead of the local snapshot (see `replica`).
        let (queue, pg_pool) = open_store(&config, &data_dir, addr).await?;
        let replica_gauges = crate::metrics::ReplicaGauges::default();
        let replica = match &pg_pool {
            Some((pool, connect)) => Some(crate::replica::Replica::new(
                pool.clone(),
                connect.clone(),
                replica_id(addr),
                replica_gauges.clone(),
                crate::replica::ReplicaOptions {
                    lease_ttl: Duration::from_secs(config.index.follower_lease_seconds),
                    snapshot_every: Duration::from_secs(config.index.shared_snapshot_seconds),
                    snapshot_path: data_dir.join("shared-index.snapshot"),
                },
            )),
            None => None,
        };
        let (index, replica_from) = match &replica {
            Some(r) => {
                let start = r
                    .start()
                    .await
                    .context("cannot read the shared index snapshot from PostgreSQL")?;
                match start.from {
                    crate::replica::StartFrom::Snapshot(id) => info!(
                        snapshot_id = id,
                        seq = start.seq,
                        "index from the shared snapshot, then the change log"
                    ),
                    crate::replica::StartFrom::Log => {
                        info!("no shared snapshot: index from the whole change log")
                    }
                    crate::replica::StartFrom::Rebuild => info!(
                        seq = start.seq,
                        "index empty until a new shared snapshot (or this replica's warm-up as \
                         the follower), then the change log"
                    ),
                }
                (start.index, start.seq)
            }
            None => (load_snapshot(&snapshot_path).await, 0),
        };
        // The one writer of the index (see `index::writer`); everything else reads `index`.
        let writer = IndexWriter::spawn(index);
        let index: SharedIndex = writer.index().clone();
        // What the sync worker and the webhooks write through: with replicas, the shared log.
        let shared_writer = match &replica {
            Some(r) => writer.with_publisher(r.publisher()),
            None => writer.clone(),
        };
        let client =
            Client::new(config.client_options()?).context("cannot build the Zendesk client")?;
        if let Some((pool, _)) = pg_pool {
            let budget = client.budget();
            let mut shared = crate::cluster::SharedBudgetConfig::new(
                client.base_url(),
                replica_id(addr),
                budget.limit(),
                budget.export_limit(),
            );
            // A request is answered or given up within the client's timeout; a reservation left
            // unfinished longer is a dead replica's (see `cluster::budget`).
            (shared.window, shared.margin) = budget.window();
            shared.flight_timeout = shared
                .flight_timeout
                .max(2 * Duration::from_secs(config.zendesk.timeout_seconds));
            client.budget().share(
                crate::cluster::SharedBudget::new(pool, shared),
                config.zendesk.replicas,
            );
        }

        let (reporter, health) = tonic_health::server::health_reporter();
        let mut follower_options = FollowerOptions::new(
            Duration::from_secs(config.index.poll_seconds),
            snapshot_path.clone(),
        );
        follower_options.bootstrap = config.index.bootstrap;
        follower_options.search_export_per_minute =
            config.zendesk.search_export_requests_per_minute;
        let (follower, follower_loaded) = Follower::new(
            client.clone(),
            writer.clone(),
            parser.clone(),
            follower_options.clone(),
        );
        // With replicas the index is loaded, or WARMING, when the log says so (the follower's
        // `Loaded` or a bootstrap's `Warming`), whichever replica follows.
        let (loaded, serving) = match &replica {
            Some(_) => (writer.loaded(), writer.serving()),
            None => (follower_loaded, follower.serving()),
        };
        set_health(&reporter, *serving.borrow()).await;
        // `ready` turns true once the index is complete and health says SERVING (at once when
        // the snapshot was complete); `answering` once health says SERVING (maybe WARMING).
        let (ready_tx, ready) = watch::channel(*loaded.borrow());
        let (answering_tx, answering) = watch::channel(*serving.borrow());

        let worker = crate::sync::Worker::new(
            queue.clone(),
            client.clone(),
            shared_writer.clone(),
            crate::sync::SyncSettings::from_config(&config)?,
        );
        let worker_handle = worker.handle();
        let retention = Duration::from_secs(u64::from(config.storage.retention_days) * 86_400);

        let metrics =
            crate::metrics::Metrics::new(index.clone(), Some(client.clone()), Some(queue.clone()));
        let metrics = Arc::new(match &replica {
            Some(_) => metrics.with_replica(&replica_gauges),
            None => metrics,
        });
        let versions = crate::webhooks::apply::SharedVersions::default();
        let follower = if config.webhooks.listen.is_some() {
            follower.with_webhooks(metrics.clone(), versions.clone())
        } else {
            follower
        };
        let metrics_listener = match config.server.metrics_listen {
            Some(addr) => Some(crate::metrics::bind(addr).await?),
            None => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };

        let webhooks = match config.webhooks.listen {
            Some(addr) => {
                let secrets = config.webhook_signing_secrets()?;
                if secrets.is_empty() {
                    anyhow::bail!("webhooks.signing_secret: required with webhooks.listen");
                }
                let listener = crate::webhooks::bind(addr).await?;
                let (router, applier) = crate::webhooks::endpoint(
                    &config.webhooks.path,
                    secrets,
                    client.clone(),
                    shared_writer.clone(),
                    parser.clone(),
                    metrics.clone(),
                    versions.clone(),
                );
                Some((listener, router, applier))
            }
            None => None,
        };
        let webhooks_addr = match &webhooks {
            Some((l, _, _)) => Some(l.local_addr()?),
            None => None,
        };

        let stop_rpc = CancellationToken::new();
        let stop_background = CancellationToken::new();
        let mut tasks = Tasks::default();
        if let Some((listener, router, applier)) = webhooks {
            // The endpoint stops with the gRPC server (first stage), the applier with the
            // background tasks; what is still queued then is left to the export.
            let stop = stop_rpc.clone();
            tasks.spawn("webhooks", async move {
                crate::webhooks::serve(listener, router, stop.cancelled_owned())
                    .await
                    .context("the webhook server failed")
            });
            tasks.spawn("webhooks-apply", applier.run(stop_background.clone()));
        }
        match &replica {
            None => {
                tasks.spawn("follower", follower.run(stop_background.clone()));
            }
            Some(r) => {
                // Only the lease holder follows, on a writer that publishes with its fence.
                drop(follower);
                tasks.spawn(
                    "changes",
                    r.clone()
                        .run_subscriber(writer.clone(), replica_from, stop_background.clone()),
                );
                let webhooks_on = config.webhooks.listen.is_some();
                let (client, parser, metrics, versions) = (
                    client.clone(),
                    parser.clone(),
                    metrics.clone(),
                    versions.clone(),
                );
                let make = move |w: IndexWriter| {
                    let (f, _) =
                        Follower::new(client.clone(), w, parser.clone(), follower_options.clone());
                    if webhooks_on {
                        f.with_webhooks(metrics.clone(), versions.clone())
                    } else {
                        f
                    }
                };
                tasks.spawn(
                    "follower",
                    r.clone()
                        .run_follower(writer.clone(), make, stop_background.clone()),
                );
            }
        }
        tasks.spawn("sync", worker.run(stop_background.clone()));
        tasks.spawn(
            "housekeeping",
            crate::sync::housekeeping(queue.clone(), retention, stop_background.clone()),
        );
        tasks.spawn(
            "health",
            follow_health(
                reporter.clone(),
                serving,
                loaded.clone(),
                answering_tx,
                ready_tx,
                stop_background.clone(),
            ),
        );
        if matches!(queue, crate::sync::JobStore::Postgres(_)) {
            // Only with PostgreSQL: a background task that ends counts as a failure of the service.
            let handle = worker_handle.clone();
            tasks.spawn(
                "spool",
                queue
                    .clone()
                    .forward_spool(stop_background.clone(), move || handle.notify()),
            );
        }
        if let Some(listener) = metrics_listener {
            // Stopped with the background tasks, so a scrape during shutdown still answers.
            let (metrics, stop) = (metrics.clone(), stop_background.clone());
            tasks.spawn("metrics", async move {
                crate::metrics::serve(listener, metrics, stop.cancelled_owned())
                    .await
                    .context("the metrics server failed")
            });
        }

        let state = Arc::new(ServiceState {
            index: index.clone(),
            directory: Directory::new(&config.routing.directory),
            recent_days: config.routing.recent_days,
            resolver: crate::routing::Resolver::new(
                parser.clone(),
                crate::routing::Resolver::CAPACITY,
            ),
            parser,
            zendesk_url: config.zendesk.url.trim_end_matches('/').to_owned(),
            sync: Some(grpc::SyncApi {
                queue,
                worker: worker_handle,
                writer: writer.clone(),
                shared_calls: replica.is_some().then(|| shared_writer.batched()),
            }),
            metrics: metrics.clone(),
        });
        let auth = Auth::new(config.server.tokens.clone()).with_metrics(metrics.clone());
        let stop = stop_rpc.clone();
        let rpc = tasks.spawn("grpc", async move {
            grpc::serve(listener, state, auth, health, tls, stop.cancelled_owned())
                .await
                .context("the gRPC server failed")
        });
        match metrics_addr {
            Some(m) => {
                info!(%addr, metrics = %m, zendesk = %config.zendesk.url, "deskline listening")
            }
            None => info!(%addr, zendesk = %config.zendesk.url, "deskline listening"),
        }
        Ok(Self {
            addr,
            metrics_addr,
            webhooks_addr,
            metrics,
            index,
            snapshot_path,
            ready,
            answering,
            health: reporter,
            stop_rpc,
            stop_background,
            tasks,
            rpc,
            grace: Duration::from_secs(config.server.shutdown_grace_seconds),
        })
    }

    /// The bound gRPC address (port 0 in the config is resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound metrics address (port 0 in the config is resolved), `None` when metrics are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound webhook address (port 0 in the config is resolved), `None` when webhooks are off.
    pub fn webhooks_addr(&self) -> Option<SocketAddr> {
        self.webhooks_addr
    }

    /// The process's metrics registry.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The shared index the service answers from.
    pub fn index(&self) -> &SharedIndex {
        &self.index
    }

    /// Resolves when the index is loaded (warm-up done or snapshot read) and health says SERVING.
    pub async fn wait_loaded(&self) {
        let mut rx = self.ready.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Resolves when health says SERVING: the index is loaded, or warming after a bootstrap.
    pub async fn wait_serving(&self) {
        let mut rx = self.answering.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Runs until SIGINT / SIGTERM, or until a task ends on its own (a failure: its cause is
    /// returned after the same ordered shutdown, so the process exits non-zero).
    pub(crate) async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let failure = tokio::select! {
            _ = shutdown_signal() => { info!("shutdown requested"); None }
            Some(ended) = self.tasks.next() => {
                let e = ended.failure();
                error!(error = format!("{e:#}"), "a task stopped unexpectedly: shutting down");
                Some(e)
            }
        };
        let stopped = self.stop().await;
        match failure {
            Some(e) => Err(e),
            None => stopped,
        }
    }

    /// Ordered shutdown: RPCs, then background tasks, then the snapshot, all within
    /// `server.shutdown_grace_seconds`. Returns the first error a task ended with during the
    /// shutdown, or the snapshot's.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop().await
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let deadline = started + self.grace;
        let rpc_deadline = started + self.grace / 2;
        let tasks_deadline = started + self.grace.mul_f64(0.75);
        set_health(&self.health, false).await;
        let mut first_error: Option<anyhow::Error> = None;
        let mut note = |ended: Ended| {
            if let Err(e) = ended.after_stop() {
                error!(error = format!("{e:#}"), "a task failed while stopping");
                first_error.get_or_insert(e);
            }
        };

        self.stop_rpc.cancel();
        let (tasks, rpc) = (&mut self.tasks, self.rpc);
        let rpc_done = tokio::time::timeout_at(rpc_deadline, async {
            while let Some(ended) = tasks.next().await {
                let was_rpc = ended.id == rpc;
                note(ended);
                if was_rpc {
                    break;
                }
            }
        })
        .await;
        if rpc_done.is_err() {
            warn!(
                grace_seconds = self.grace.as_secs(),
                "in-flight RPCs did not finish within the shutdown deadline: cut off"
            );
        }

        self.stop_background.cancel();
        let background_done = tokio::time::timeout_at(tasks_deadline, async {
            while let Some(ended) = tasks.next().await {
                note(ended);
            }
        })
        .await;
        if background_done.is_err() {
            warn!(
                tasks = ?self.tasks.running(),
                grace_seconds = self.grace.as_secs(),
                "tasks did not stop within the shutdown deadline: abandoned"
            );
            self.tasks.abort_all();
        }

        let (index, path) = (self.index, self.snapshot_path);
        let save = tokio::task::spawn_blocking(move || {
            // The data directory may be what failed (deleted under us): recreate it so the index
            // at least is kept.
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let idx = index.read();
            // An index that never finished warming up is saved too: its cursors spare a restart
            // the pages already read.
            snapshot::save(&idx, &path).map_err(std::io::Error::other)
        });
        match tokio::time::timeout_at(deadline, save).await {
            Ok(saved) => {
                if let Err(e) = saved
                    .context("the snapshot task failed")
                    .and_then(|r| r.context("saving the index snapshot at shutdown"))
                {
                    error!(error = format!("{e:#}"), "the index snapshot was not saved");
                    first_error.get_or_insert(e);
                }
            }
            Err(_) => {
                warn!("the index snapshot was not saved within the shutdown deadline");
            }
        }
        info!(
            took_ms = started.elapsed().as_millis() as u64,
            "deskline stopped"
        );
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The service's tasks, each under a name. A task's end is taken from the set exactly once.
#[derive(Default)]
struct Tasks {
    set: JoinSet<anyhow::Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

/// One task that ended, and how.
struct Ended {
    name: &'static str,
    id: tokio::task::Id,
    outcome: Result<anyhow::Result<()>, JoinError>,
}

impl Tasks {
    /// Spawns `fut` in a span named after the task.
    fn spawn<F>(&mut self, name: &'static str, fut: F) -> tokio::task::Id
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        use tracing::Instrument;
        let id = self
            .set
            .spawn(fut.instrument(tracing::info_span!("task", name)))
            .id();
        self.names.insert(id, name);
        id
    }

    /// The next task to end; `None` when none is left (then it never resolves in a `select!`
    /// branch that requires `Some`).
    async fn next(&mut self) -> Option<Ended> {
        let (id, outcome) = match self.set.join_next_with_id().await? {
            Ok((id, r)) => (id, Ok(r)),
            Err(e) => (e.id(), Err(e)),
        };
        let name = self.names.remove(&id).unwrap_or("unnamed");
        Some(Ended { name, id, outcome })
    }

    fn running(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.names.values().copied().collect();
        names.sort_unstable();
        names
    }

    fn abort_all(&mut self) {
        self.set.abort_all();
        self.names.clear();
    }
}

impl Ended {
    /// Before shutdown every end is a failure, a clean return included.
    fn failure(self) -> anyhow::Error {
        let name = self.name;
        match self.outcome {
            Ok(Ok(())) => anyhow::anyhow!("task {name} ended unexpectedly"),
            Ok(Err(e)) => e.context(format!("task {name} failed")),
            Err(e) => anyhow::anyhow!("task {name} panicked: {e}"),
        }
    }

    /// After its stop was asked for, a clean return is what a task should do.
    fn after_stop(self) -> anyhow::Result<()> {
        match self.outcome {
            Ok(Ok(())) => Ok(()),
            _ => Err(self.failure()),
        }
    }
}

/// The call queue: PostgreSQL (migrated now, with the spool in `data_dir`) when
/// `storage.postgres_url` is set, else the embedded SQLite queue in `data_dir`. A replica needs
/// PostgreSQL to start; one already running rides out an outage on its spool.
async fn open_store(
    config: &Config,
    data_dir: &std::path::Path,
    addr: SocketAddr,
) -> anyhow::Result<(
    crate::sync::JobStore,
    Option<(deadpool_postgres::Pool, crate::pg::Connect)>,
)> {
    let Some(url) = config.postgres_url()? else {
        let queue = crate::sync::Queue::open(data_dir)
            .context("cannot open the call queue in storage.data_dir")?;
        return Ok((queue.into(), None));
    };
    let connect = crate::pg::Connect::new(&url, config.storage.postgres_ca_file.as_deref())?;
    let pool = crate::pg::pool_with(&connect, 16)?;
    let applied = crate::pg::migrate(&pool)
        .await
        .context("storage.postgres_url: cannot prepare the database schema")?;
    let version = crate::pg::schema_version(&pool).await?;
    crate::pg::require_current(&version)?;
    info!(
        migrations_applied_now = applied,
        schema_version = version.applied,
        "PostgreSQL store ready"
    );
    let pg = crate::sync::PgQueue::new(
        pool.clone(),
        Duration::from_secs(config.sync.lease_seconds),
        replica_id(addr),
    );
    let store = crate::sync::JobStore::postgres(pg, data_dir)
        .await
        .context("cannot open the local spool in storage.data_dir")?;
    Ok((store, Some((pool, connect))))
}

/// This replica's name in PostgreSQL (job leases, budget reservations): host, process, address.
fn replica_id(addr: SocketAddr) -> String {
    format!(
        "{}:{}@{addr}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "deskline".into()),
        std::process::id()
    )
}

async fn load_snapshot(path: &std::path::Path) -> Index {
    let p = path.to_owned();
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || snapshot::load(&p)).await {
        Ok(Ok(Some(index)))
            if !index.is_loaded() && *index.cursors() == crate::index::Cursors::default() =>
        {
            // Saved at a shutdown during a bootstrap (no export position yet): a bootstrap is
            // never resumed, only started again (see `follow::bootstrap`).
            info!("the index snapshot is of an unfinished bootstrap: starting afresh");
            Index::new()
        }
        Ok(Ok(Some(index))) => {
            let c = index.counts();
            info!(
                took = ?started.elapsed(),
                customers = c.customers,
                open_tickets = c.open_tickets,
                complete = index.is_loaded(),
                "index snapshot loaded"
            );
            index
        }
        Ok(Ok(None)) => {
            info!("no index snapshot yet: warming up from the exports");
            Index::new()
        }
        Ok(Err(e)) => {
            let aside = path.with_extension("corrupt");
            let _ = std::fs::rename(path, &aside);
            error!(error = %e, moved_to = %aside.display(), "the index snapshot is unreadable: rebuilding from the exports");
            Index::new()
        }
        Err(e) => {
            error!(error = %e, "loading the snapshot failed: rebuilding from the exports");
            Index::new()
        }
    }
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    let status = if serving { Serving } else { NotServing };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <ResolverServer<grpc::ResolverService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Health follows readiness: NOT_SERVING until answers may be given (the index loaded, or
/// warming after a bootstrap, DESIGN §10), then SERVING.
async fn follow_health(
    reporter: tonic_health::server::HealthReporter,
    mut serving: watch::Receiver<bool>,
    mut loaded: watch::Receiver<bool>,
    answering: watch::Sender<bool>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let became_serving = tokio::select! {
        _ = stop.cancelled() => false,
        r = serving.wait_for(|l| *l) => r.is_ok(),
    };
    if !became_serving {
        return Ok(());
    }
    set_health(&reporter, true).await;
    // Only now does a client observe the service answering.
    answering.send_replace(true);
    let became_loaded = tokio::select! {
        _ = stop.cancelled() => false,
        r = loaded.wait_for(|l| *l) => r.is_ok(),
    };
    if became_loaded {
        ready.send_replace(true);
    }
    stop.cancelled().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
