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
    /// Create the namespaces and move each port's tap in as eth0.
    Up {
        /// Tenant config file.
        file: PathBuf,
        /// Seconds to wait for vswitchd's taps to appear.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Give the taps back and delete the namespaces.
    Down {
        /// Tenant config file.
        file: PathBuf,
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
        Cmd::Up { file, wait } => match load(&file) {
            Err(code) => return code,
            Ok(cfg) => lab::up(&cfg, Duration::from_secs(wait), |l| println!("{l}")),
        },
        Cmd::Down { file } => match load(&file) {
            Err(code) => return code,
            Ok(cfg) => lab::down(&cfg, |l| println!("{l}")),
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
