//! Starting, supervising and stopping Deskline's tasks, and the command line (DESIGN §5).
//!
//! A [`Service`] owns one Zendesk account's pieces: the index, the follower, the gRPC server (and,
//! with the post-call sync, the queue and worker). Shutdown is ordered (STYLE.md practice 4): stop
//! accepting RPCs and let in-flight ones finish, stop the background tasks, then write the snapshot,
//! all under a grace timeout.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
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
    zendesk::{Client, ClientOptions},
};

/// How long each shutdown stage may take before it is cut short.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "deskline",
    version,
    about = "Routes PBX calls by Zendesk ticket ownership, shows caller ID, syncs calls into Zendesk"
)]
pub struct Cli {
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
    Sim(crate::sim::SimArgs),
    /// The simulator and the service together on loopback, with real answers; serves until Ctrl-C.
    Demo(crate::demo::DemoArgs),
    /// Validate the config and the Zendesk credentials; compare the directory and field mappings
    /// with Zendesk. Exit status 1 when something would break routing or sync, 2 for a bad config.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
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
    runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve_command(config).await,
            Command::Check { config } => check_command(config).await,
            Command::Sim(args) => report(crate::sim::run_cli(args).await),
            Command::Demo(args) => report(crate::demo::run(args).await),
        }
    })
}

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
            let problems = findings
                .iter()
                .filter(|f| f.severity == crate::check::Severity::Problem)
                .count();
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
    let service = match Service::start(config, listener).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("deskline: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match service.run_until_signal().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("deskline stopped: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A running Deskline for one Zendesk account.
pub struct Service {
    addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are served (`server.metrics_listen`), if anywhere.
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<crate::metrics::Metrics>,
    index: SharedIndex,
    snapshot_path: PathBuf,
    /// True once the index is loaded and health says SERVING.
    ready: watch::Receiver<bool>,
    /// Stops the gRPC server (first stage of shutdown).
    stop_rpc: CancellationToken,
    /// Stops the background tasks (second stage).
    stop_background: CancellationToken,
    rpc: JoinHandle<anyhow::Result<()>>,
    background: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
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
        let index = load_snapshot(&snapshot_path).await;
        // The one writer of the index (see `index::writer`); everything else reads `index`.
        let writer = IndexWriter::spawn(index);
        let index: SharedIndex = writer.index().clone();
        let client = Client::new(ClientOptions::from_config(&config)?)
            .context("cannot build the Zendesk client")?;

        let (reporter, health) = tonic_health::server::health_reporter();
        let (follower, loaded) = Follower::new(
            client.clone(),
            writer.clone(),
            parser.clone(),
            FollowerOptions::new(
                Duration::from_secs(config.index.poll_seconds),
                snapshot_path.clone(),
            ),
        );
        set_health(&reporter, *loaded.borrow()).await;
        // `ready` turns true once health says SERVING (at once when the snapshot was complete).
        let (ready_tx, ready) = watch::channel(*loaded.borrow());

        let queue = crate::sync::Queue::open(&data_dir)
            .context("cannot open the call queue in storage.data_dir")?;
        let worker = crate::sync::Worker::new(
            queue.clone(),
            client.clone(),
            writer.clone(),
            crate::sync::SyncSettings::from_config(&config)?,
        );
        let worker_handle = worker.handle();

        let metrics = Arc::new(crate::metrics::Metrics::new(
            index.clone(),
            Some(client.clone()),
            Some(queue.clone()),
        ));
        let metrics_listener = match config.server.metrics_listen {
            Some(addr) => Some(crate::metrics::bind(addr).await?),
            None => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };

        let stop_rpc = CancellationToken::new();
        let stop_background = CancellationToken::new();
        let mut background = vec![
            (
                "follower",
                spawn_named("follower", follower.run(stop_background.clone())),
            ),
            (
                "sync",
                spawn_named("sync", worker.run(stop_background.clone())),
            ),
            (
                "health",
                spawn_named(
                    "health",
                    follow_health(reporter, loaded.clone(), ready_tx, stop_background.clone()),
                ),
            ),
        ];
        if let Some(listener) = metrics_listener {
            // Stopped with the background tasks, so a scrape during shutdown still answers.
            let (metrics, stop) = (metrics.clone(), stop_background.clone());
            background.push((
                "metrics",
                spawn_named("metrics", async move {
                    crate::metrics::serve(listener, metrics, stop.cancelled_owned())
                        .await
                        .context("the metrics server failed")
                }),
            ));
        }

        let state = Arc::new(ServiceState {
            index: index.clone(),
            directory: Directory::new(&config.routing.directory),
            resolver: crate::routing::Resolver::new(
                parser.clone(),
                crate::routing::Resolver::CAPACITY,
            ),
            parser,
            zendesk_url: config.zendesk.url.trim_end_matches('/').to_owned(),
            sync: Some(grpc::SyncApi {
                queue,
                worker: worker_handle,
            }),
            metrics: metrics.clone(),
        });
        let auth = Auth::new(config.server.tokens.clone()).with_metrics(metrics.clone());
        let stop = stop_rpc.clone();
        let rpc = spawn_named("grpc", async move {
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
            metrics,
            index,
            snapshot_path,
            ready,
            stop_rpc,
            stop_background,
            rpc,
            background,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound metrics address (port 0 in the config is resolved), `None` when metrics are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    pub fn index(&self) -> &SharedIndex {
        &self.index
    }

    /// Resolves when the index is loaded (warm-up done or snapshot read) and health says SERVING.
    pub async fn wait_loaded(&self) {
        let mut rx = self.ready.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Runs until SIGINT / SIGTERM, or until a task dies (then the error is returned, after the same
    /// ordered shutdown, so the process exits non-zero instead of limping on).
    pub async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let failure = tokio::select! {
            _ = shutdown_signal() => { info!("shutdown requested"); None }
            r = &mut self.rpc => Some(task_failure("grpc", r)),
            (name, r) = first_to_end(&mut self.background) => Some(task_failure(name, r)),
        };
        self.shutdown().await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Ordered shutdown: RPCs, then background tasks, then the snapshot.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop_rpc.cancel();
        if !self.rpc.is_finished() && tokio::time::timeout(GRACE, self.rpc).await.is_err() {
            warn!("in-flight RPCs did not finish within the grace period");
        }
        self.stop_background.cancel();
        for (name, task) in self.background {
            if tokio::time::timeout(GRACE, task).await.is_err() {
                warn!(task = name, "did not stop within the grace period");
            }
        }
        let (index, path) = (self.index, self.snapshot_path);
        let saved = tokio::task::spawn_blocking(move || {
            let idx = index.read();
            // An index that never finished warming up is saved too: its cursors spare a restart
            // the pages already read.
            snapshot::save(&idx, &path)
        })
        .await?;
        saved.context("saving the index snapshot at shutdown")?;
        info!("deskline stopped");
        Ok(())
    }
}

async fn load_snapshot(path: &std::path::Path) -> Index {
    let p = path.to_owned();
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || snapshot::load(&p)).await {
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

/// Health follows readiness: NOT_SERVING until the index is loaded, then SERVING.
async fn follow_health(
    reporter: tonic_health::server::HealthReporter,
    mut loaded: watch::Receiver<bool>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let became_loaded = tokio::select! {
        _ = stop.cancelled() => false,
        r = loaded.wait_for(|l| *l) => r.is_ok(),
    };
    if became_loaded {
        set_health(&reporter, true).await;
        // Only now is the service ready in every sense a client can observe.
        ready.send_replace(true);
    }
    stop.cancelled().await;
    Ok(())
}

fn spawn_named<F>(name: &'static str, fut: F) -> JoinHandle<anyhow::Result<()>>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use tracing::Instrument;
    tokio::spawn(fut.instrument(tracing::info_span!("task", name)))
}

fn task_failure(
    name: &str,
    r: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow::anyhow!("task {name} ended unexpectedly"),
        Ok(Err(e)) => e.context(format!("task {name} failed")),
        Err(e) => anyhow::anyhow!("task {name} panicked: {e}"),
    }
}

/// Waits for the first background task to end (which, before shutdown, is always a failure).
async fn first_to_end(
    tasks: &mut [(&'static str, JoinHandle<anyhow::Result<()>>)],
) -> (
    &'static str,
    Result<anyhow::Result<()>, tokio::task::JoinError>,
) {
    if tasks.is_empty() {
        std::future::pending::<()>().await;
    }
    let (r, i, _) = futures_util::future::select_all(tasks.iter_mut().map(|(_, h)| h)).await;
    (tasks[i].0, r)
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
