//! `vslab`: a network-namespace lab for a tenant config.
//!
//! Each port becomes a namespace named after it; the port's tap (created by
//! a running `vswitchd`) is moved into it and renamed `eth0`, so the
//! namespace plays the VM. vslab drives iproute2's `ip` (the tool every
//! reader of a lab script already knows) and only ever touches the
//! namespaces named after the config's ports and the taps named in it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Config, Port};

/// A lab step that failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// `ip` failed.
    #[error("port {port:?}: `{cmd}` failed: {stderr}")]
    Ip {
        /// The port being set up.
        port: String,
        /// The command line.
        cmd: String,
        /// What `ip` said.
        stderr: String,
    },
    /// The tap never appeared.
    #[error("port {port:?}: tap {tap:?} did not appear within {secs} s; is vswitchd running with this config file? (start it first: vswitchd --config FILE)")]
    NoTap {
        /// The port.
        port: String,
        /// Its tap name.
        tap: String,
        /// How long we waited.
        secs: u64,
    },
    /// No namespace for `exec`.
    #[error("no lab namespace named {0:?}; run `vslab up FILE` first")]
    NoNamespace(String),
    /// Could not run a program.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The program.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

fn ip(port: &str, args: &[&str]) -> Result<(), LabError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: "ip".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Ip {
            port: port.to_string(),
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn ip_ok(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Brings every port of `cfg` up in its namespace; waits up to `wait` for
/// taps to appear. Returns one progress line per port.
pub fn up(cfg: &Config, wait: Duration, mut progress: impl FnMut(&str)) -> Result<(), LabError> {
    for p in &cfg.ports {
        let line = up_port(cfg, p, wait)?;
        progress(&line);
    }
    Ok(())
}

fn up_port(cfg: &Config, p: &Port, wait: Duration) -> Result<String, LabError> {
    let ns = p.name.as_str();
    if !ns_exists(ns) {
        ip(ns, &["netns", "add", ns])?;
    }
    // `ip netns exec` bind-mounts /etc/netns/NS/* over /etc/*: DHCP client
    // scripts then write the namespace's resolv.conf, never the machine's.
    let etc = Path::new("/etc/netns").join(ns);
    if !etc.join("resolv.conf").exists() {
        std::fs::create_dir_all(&etc)
            .and_then(|()| {
                std::fs::write(
                    etc.join("resolv.conf"),
                    "# vslab: written by the VM's DHCP client\n",
                )
            })
            .map_err(|source| LabError::Spawn {
                cmd: format!("create {}", etc.display()),
                source,
            })?;
    }
    let mut state = "already up";
    if !ip_ok(&["-n", ns, "link", "show", "dev", "eth0"]) {
        let deadline = Instant::now() + wait;
        while !ip_ok(&["link", "show", "dev", &p.tap]) {
            if Instant::now() >= deadline {
                return Err(LabError::NoTap {
                    port: p.name.clone(),
                    tap: p.tap.clone(),
                    secs: wait.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ip(ns, &["link", "set", "dev", &p.tap, "netns", ns])?;
        ip(
            ns,
            &["-n", ns, "link", "set", "dev", &p.tap, "name", "eth0"],
        )?;
        state = "attached";
    }
    let mac = p.mac.to_string();
    ip(
        ns,
        &["-n", ns, "link", "set", "dev", "eth0", "address", &mac],
    )?;
    let mut addr = String::from("no address");
    match (p.ip, cfg.network_of(p)) {
        // The network's DHCP server hands out the address (a reservation
        // for a port with `ip`): run a DHCP client in the namespace.
        (_, Some(net)) if net.dhcp.is_some() => addr = "address by DHCP".into(),
        (Some(ipa), Some(net)) => {
            addr = format!("{ipa}/{}", net.cidr.prefix_len());
            ip(ns, &["-n", ns, "addr", "replace", &addr, "dev", "eth0"])?;
        }
        _ => {}
    }
    ip(ns, &["-n", ns, "link", "set", "dev", "eth0", "up"])?;
    ip(ns, &["-n", ns, "link", "set", "dev", "lo", "up"])?;
    Ok(format!("{ns}: eth0 {mac} {addr} ({state}; tap {})", p.tap))
}

/// Removes the lab of `cfg`: each `eth0` goes back to this namespace under
/// its tap name (so a running switch keeps its tap), then the namespace is
/// deleted. Missing pieces are skipped.
pub fn down(cfg: &Config, mut progress: impl FnMut(&str)) -> Result<(), LabError> {
    let me = std::process::id().to_string();
    for p in &cfg.ports {
        let ns = p.name.as_str();
        if !ns_exists(ns) {
            continue;
        }
        if ip_ok(&["-n", ns, "link", "show", "dev", "eth0"]) {
            let _ = ip(ns, &["-n", ns, "link", "set", "dev", "eth0", "down"]);
            if ip(
                ns,
                &["-n", ns, "link", "set", "dev", "eth0", "name", &p.tap],
            )
            .is_ok()
            {
                let _ = ip(ns, &["-n", ns, "link", "set", "dev", &p.tap, "netns", &me]);
            }
        }
        ip(ns, &["netns", "del", ns])?;
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        progress(&format!("{ns}: removed"));
    }
    Ok(())
}

/// Runs `cmd` in port `name`'s namespace and returns its exit code.
pub fn exec(name: &str, cmd: &[String]) -> Result<i32, LabError> {
    let valid = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !valid || !ns_exists(name) {
        return Err(LabError::NoNamespace(name.to_string()));
    }
    let status = Command::new("ip")
        .args(["netns", "exec", name])
        .args(cmd)
        .status()
        .map_err(|source| LabError::Spawn {
            cmd: "ip netns exec".into(),
            source,
        })?;
    Ok(status.code().unwrap_or(128))
}
