//! `vslab`: a network-namespace lab for a tenant config (see docs/cli.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vswitch::config::Config;
use vswitch::lab;

/// One namespace per port, playing the VM, attached to vswitchd's taps.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the namespaces and move each port's tap in as eth0; for a
    /// multi-host config also the hosts, their underlay and their switches.
    Up {
        /// Tenant config file.
        file: PathBuf,
        /// Seconds to wait for vswitchd's taps (and lab switches) to appear.
        #[arg(long, default_value_t = 10)]
        wait: u64,
        #[command(flatten)]
        multi: Multi,
    },
    /// Give the taps back and delete the namespaces (multi-host: stop the
    /// lab's switches too).
    Down {
        /// Tenant config file.
        file: PathBuf,
        #[command(flatten)]
        multi: Multi,
    },
    /// Run a command in a port's namespace.
    Exec {
        /// Port name.
        port: String,
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
}

/// Options of a multi-host lab.
#[derive(clap::Args, Debug)]
struct Multi {
    /// Multi-host labs: where each host's vswitchd keeps its socket
    /// (DIR/HOST.sock), log, pid file and state.
    #[arg(long, default_value = lab::DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// Multi-host labs: only these hosts (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    hosts: Option<Vec<String>>,
    /// The vswitchd to run in each host namespace (default: the one next
    /// to vslab).
    #[arg(long)]
    vswitchd: Option<PathBuf>,
}

impl Multi {
    fn options(self) -> lab::LabOptions {
        let vswitchd = self.vswitchd.unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("vswitchd")))
                .unwrap_or_else(|| PathBuf::from("vswitchd"))
        });
        lab::LabOptions {
            run_dir: self.run_dir,
            vswitchd,
            hosts: self.hosts,
        }
    }
}

fn load(file: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(file).map_err(|e| {
        for line in e.to_string().lines() {
            eprintln!("error: {line}");
        }
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Up { file, wait, multi } => match load(&file) {
            Err(code) => return code,
            Ok(cfg) => lab::up(&cfg, Duration::from_secs(wait), &multi.options(), |l| {
                println!("{l}")
            }),
        },
        Cmd::Down { file, multi } => match load(&file) {
            Err(code) => return code,
            Ok(cfg) => lab::down(&cfg, &multi.options(), |l| println!("{l}")),
        },
        Cmd::Exec { port, cmd } => match lab::exec(&port, &cmd) {
            Ok(code) => return ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
