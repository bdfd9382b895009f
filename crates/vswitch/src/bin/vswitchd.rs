//! `vswitchd`: the switch daemon (see docs/cli.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use vswitch::clock::Timestamp;
use vswitch::config::Config;
use vswitch::control;
use vswitch::daemon::Daemon;

/// The vswitch data plane: taps for a tenant config's ports, switched per network.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Tenant config file (TOML, see docs/config.md).
    #[arg(long, short)]
    config: PathBuf,
    /// Control socket path.
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where durable state (DHCP lease logs) lives.
    #[arg(long, default_value = "/var/lib/vswitch")]
    state_dir: PathBuf,
    /// Data-plane threads (overrides [switch].workers; 0 = half the cores, at least 1).
    #[arg(long)]
    workers: Option<usize>,
    /// Which of the config's `[[host]]`s this switch is (multi-host configs).
    #[arg(long)]
    host: Option<String>,
    /// Validate the config file and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let config = match Config::load(&args.config).and_then(|c| c.for_host(args.host.as_deref())) {
        Ok(c) => c,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("error: {line}");
            }
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: ok ({} tenants, {} networks, {} ports{})",
            args.config.display(),
            config.tenants.len(),
            config.networks.len(),
            config.ports.len(),
            match &config.local_host {
                Some(h) => format!(
                    ", {} on host {h} of {}",
                    config.local_ports().count(),
                    config.hosts.len()
                ),
                None => String::new(),
            }
        );
        return ExitCode::SUCCESS;
    }

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the control runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(args, config))
}

async fn run(args: Args, config: Config) -> ExitCode {
    let listener = match control::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: control socket {}: {e}", args.socket.display());
            return ExitCode::from(1);
        }
    };
    let daemon = match Daemon::start(config, args.workers, &args.state_dir) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("error: {}: {e}", args.config.display());
            let _ = std::fs::remove_file(&args.socket);
            return ExitCode::from(1);
        }
    };
    let show = daemon.show();
    tracing::info!(
        config = %args.config.display(),
        socket = %args.socket.display(),
        ports = show["ports"].as_array().map_or(0, Vec::len),
        workers = show["workers"].as_u64(),
        "vswitchd running"
    );

    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("error: cannot install signal handlers");
        daemon.shutdown();
        return ExitCode::from(1);
    };
    let server = tokio::spawn(control::serve(listener, daemon.clone()));
    let metrics = match daemon.config().switch.metrics_listen {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(%addr, "serving Prometheus metrics at /metrics");
                Some(tokio::spawn(vswitch::metrics::serve(l, daemon.clone())))
            }
            Err(e) => {
                eprintln!("error: [switch] metrics_listen {addr}: {e}");
                server.abort();
                daemon.shutdown();
                let _ = std::fs::remove_file(&args.socket);
                return ExitCode::from(1);
            }
        },
    };
    daemon.restore_connections();
    let restart = daemon.restart_requested();
    let mut restarting = false;
    let mut aging = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let d = daemon.clone();
                match tokio::task::spawn_blocking(move || d.reload()).await {
                    Ok(Ok(report)) => tracing::info!(?report, "reloaded on SIGHUP"),
                    Ok(Err(e)) => tracing::error!("reload failed, running config kept: {e}"),
                    Err(e) => tracing::error!("reload task failed: {e}"),
                }
            }
            _ = aging.tick() => daemon.age(Timestamp::now()),
            _ = restart.notified() => {
                restarting = true;
                break;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    server.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    if restarting {
        match daemon.shutdown_for_restart() {
            Ok(n) => tracing::info!(
                connections = n,
                "stopping for a restart: taps kept, connections saved"
            ),
            Err(e) => {
                tracing::error!(error = %e, "stopping for a restart: taps kept, connections NOT saved")
            }
        }
    } else {
        tracing::info!("stopping: removing taps");
        daemon.shutdown();
    }
    let _ = std::fs::remove_file(&args.socket);
    ExitCode::SUCCESS
}
