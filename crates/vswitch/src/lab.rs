//! `vslab`: a network-namespace lab for a tenant config.
//!
//! Each port becomes a namespace named after it; the port's tap (created by
//! a running `vswitchd`) is moved into it and renamed `eth0`, so the
//! namespace plays the VM. vslab drives iproute2's `ip` (the tool every
//! reader of a lab script already knows) and only ever touches the
//! namespaces named after the config's ports and hosts and the taps named
//! in it.
//!
//! A multi-host config (`[[host]]` entries) gets the whole lab: a namespace
//! per host, named after it, joined by an underlay (a Linux bridge in the
//! namespace `ul-FIRSTHOST`, one veth per host, the host's end `ul0` with
//! its underlay address), one `vswitchd --host NAME` started inside each
//! host namespace (socket, log, pid and state under the run directory), and
//! each VM attached to its host's switch.
//!
//! A config with `[[uplink]]` entries also gets the external network: a
//! namespace named after the first uplink, holding a bridge `br-ext` that
//! joins every uplink tap, with the uplinks' gateway addresses on it. That
//! namespace is the next hop and the external host (run servers there with
//! `vslab exec UPLINK -- ...`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Config, Host, Port};
use crate::control::{self, Request};

/// Where a multi-host lab keeps each host's switch files, unless told.
pub const DEFAULT_RUN_DIR: &str = "/run/vswitch/lab";

/// How to run a multi-host lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Sockets, logs, pid files and state of the lab's switches.
    pub run_dir: PathBuf,
    /// The `vswitchd` to start in each host namespace.
    pub vswitchd: PathBuf,
    /// Only these hosts (default: all); the others are left to the user
    /// (e.g. a host whose switch is the Linux kernel).
    pub hosts: Option<Vec<String>>,
}

impl LabOptions {
    /// Files of host `h`'s switch.
    pub fn socket(&self, h: &str) -> PathBuf {
        self.run_dir.join(format!("{h}.sock"))
    }
    fn pid_file(&self, h: &str) -> PathBuf {
        self.run_dir.join(format!("{h}.pid"))
    }
    fn log(&self, h: &str) -> PathBuf {
        self.run_dir.join(format!("{h}.log"))
    }
    fn state(&self, h: &str) -> PathBuf {
        self.run_dir.join(format!("{h}.state"))
    }
    fn selected<'a>(&self, cfg: &'a Config) -> Vec<&'a Host> {
        cfg.hosts
            .iter()
            .filter(|h| self.hosts.as_ref().is_none_or(|s| s.contains(&h.name)))
            .collect()
    }
}

/// The namespace holding a multi-host lab's underlay bridge.
pub fn underlay_namespace(cfg: &Config) -> Option<String> {
    cfg.hosts.first().map(|h| format!("ul-{}", h.name))
}

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
    /// A lab switch did not start.
    #[error("host {host:?}: vswitchd did not start: {why}\n{log}")]
    Switch {
        /// The host.
        host: String,
        /// What happened.
        why: String,
        /// The end of its log.
        log: String,
    },
    /// `--hosts` names a host the config does not have.
    #[error("--hosts: {0:?} is not a [[host]] of the config")]
    UnknownHost(String),
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
pub fn up(
    cfg: &Config,
    wait: Duration,
    opts: &LabOptions,
    mut progress: impl FnMut(&str),
) -> Result<(), LabError> {
    if cfg.hosts.is_empty() {
        for p in &cfg.ports {
            let line = up_port(cfg, p, None, wait)?;
            progress(&line);
        }
        for line in up_external(cfg, wait, opts)? {
            progress(&line);
        }
        return Ok(());
    }
    if let Some(sel) = &opts.hosts {
        if let Some(bad) = sel.iter().find(|h| cfg.host(h).is_none()) {
            return Err(LabError::UnknownHost(bad.clone()));
        }
    }
    let ul = underlay_namespace(cfg).unwrap_or_default();
    if !ns_exists(&ul) {
        ip(&ul, &["netns", "add", &ul])?;
    }
    if !ip_ok(&["-n", &ul, "link", "show", "dev", "br0"]) {
        ip(&ul, &["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
    }
    ip(&ul, &["-n", &ul, "link", "set", "dev", "br0", "up"])?;
    progress(&format!("{ul}: underlay bridge br0"));
    std::fs::create_dir_all(&opts.run_dir).map_err(|source| LabError::Spawn {
        cmd: format!("create {}", opts.run_dir.display()),
        source,
    })?;
    for h in opts.selected(cfg) {
        progress(&up_host(cfg, h, &ul, wait, opts)?);
    }
    for p in &cfg.ports {
        let Some(h) = p.host.as_deref() else { continue };
        if opts.hosts.as_ref().is_none_or(|s| s.iter().any(|x| x == h)) {
            let line = up_port(cfg, p, Some(h), wait)?;
            progress(&line);
        }
    }
    for line in up_external(cfg, wait, opts)? {
        progress(&line);
    }
    Ok(())
}

/// The external network: a namespace (named after the first uplink) with
/// a bridge `br-ext` joining every selected host's uplink tap, and the
/// uplinks' gateway addresses on the bridge, so the namespace plays the
/// next hop and the external hosts behind it.
fn up_external(cfg: &Config, wait: Duration, opts: &LabOptions) -> Result<Vec<String>, LabError> {
    let Some(ns) = external_namespace(cfg) else {
        return Ok(Vec::new());
    };
    let ns = ns.as_str();
    let mut lines = Vec::new();
    if !ns_exists(ns) {
        ip(ns, &["netns", "add", ns])?;
    }
    ip(ns, &["-n", ns, "link", "set", "dev", "lo", "up"])?;
    if !ip_ok(&["-n", ns, "link", "show", "dev", "br-ext"]) {
        ip(ns, &["-n", ns, "link", "add", "br-ext", "type", "bridge"])?;
    }
    ip(ns, &["-n", ns, "link", "set", "dev", "br-ext", "up"])?;
    let selected = |h: &Option<String>| match (h, &opts.hosts) {
        (Some(h), Some(sel)) => sel.contains(h),
        _ => true,
    };
    for u in cfg.uplinks.iter().filter(|u| selected(&u.host)) {
        if !ip_ok(&["-n", ns, "link", "show", "dev", &u.tap]) {
            let deadline = Instant::now() + wait;
            let mut show = vec!["link", "show", "dev", &u.tap];
            let mut mv = vec!["link", "set", "dev", &u.tap, "netns", ns];
            if let Some(h) = u.host.as_deref() {
                show.splice(0..0, ["-n", h]);
                mv.splice(0..0, ["-n", h]);
            }
            while !ip_ok(&show) {
                if Instant::now() >= deadline {
                    return Err(LabError::NoTap {
                        port: u.name.clone(),
                        tap: u.tap.clone(),
                        secs: wait.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            ip(ns, &mv)?;
        }
        let mac = u.peer_mac().to_string();
        ip(
            ns,
            &["-n", ns, "link", "set", "dev", &u.tap, "address", &mac],
        )?;
        ip(
            ns,
            &[
                "-n", ns, "link", "set", "dev", &u.tap, "master", "br-ext", "up",
            ],
        )?;
        let mut line = format!(
            "{ns}: uplink {} ({}) of {} joined br-ext",
            u.name, u.tap, u.addr
        );
        if let Some(gw) = u.gateway {
            let a = format!("{gw}/{}", u.addr.prefix_len());
            ip(ns, &["-n", ns, "addr", "replace", &a, "dev", "br-ext"])?;
            line.push_str(&format!("; next hop {a} on br-ext"));
        }
        lines.push(line);
    }
    Ok(lines)
}

/// Host `h`'s namespace, its underlay link and its switch.
fn up_host(
    cfg: &Config,
    h: &Host,
    ul: &str,
    wait: Duration,
    opts: &LabOptions,
) -> Result<String, LabError> {
    let ns = h.name.as_str();
    if !ns_exists(ns) {
        ip(ns, &["netns", "add", ns])?;
    }
    ip(ns, &["-n", ns, "link", "set", "dev", "lo", "up"])?;
    let mtu = cfg.underlay.mtu.to_string();
    let outer = format!("ul-{ns}");
    if !ip_ok(&["-n", ns, "link", "show", "dev", "ul0"]) {
        ip(
            ns,
            &[
                "-n", ul, "link", "add", &outer, "mtu", &mtu, "type", "veth", "peer", "name",
                "ul0", "mtu", &mtu, "netns", ns,
            ],
        )?;
    }
    ip(
        ns,
        &[
            "-n", ul, "link", "set", "dev", &outer, "master", "br0", "up",
        ],
    )?;
    let addr = format!("{}/{}", h.addr, h.prefix);
    ip(ns, &["-n", ns, "addr", "replace", &addr, "dev", "ul0"])?;
    ip(ns, &["-n", ns, "link", "set", "dev", "ul0", "up"])?;

    let sock = opts.socket(ns);
    if switch_pid(opts, ns).is_some() {
        return Ok(format!(
            "{ns}: underlay {addr}; vswitchd already running (socket {})",
            sock.display()
        ));
    }
    let log = std::fs::File::create(opts.log(ns)).map_err(|source| LabError::Spawn {
        cmd: format!("create {}", opts.log(ns).display()),
        source,
    })?;
    let config = std::fs::canonicalize(&cfg.path).unwrap_or_else(|_| cfg.path.clone());
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(&opts.vswitchd)
        .arg("--config")
        .arg(&config)
        .args(["--host", ns])
        .arg("--socket")
        .arg(&sock)
        .arg("--state-dir")
        .arg(opts.state(ns))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // Its own process group: a Ctrl-C meant for vslab does not stop it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        cmd: opts.vswitchd.display().to_string(),
        source,
    })?;
    // `ip netns exec` execs the program: the child's pid is vswitchd's.
    let _ = std::fs::write(opts.pid_file(ns), child.id().to_string());
    let deadline = Instant::now() + wait;
    let fail = |why: String| LabError::Switch {
        host: ns.to_string(),
        why,
        log: std::fs::read_to_string(opts.log(ns)).unwrap_or_default(),
    };
    loop {
        if control::request(&sock, &Request::Show {}).is_ok() {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let _ = std::fs::remove_file(opts.pid_file(ns));
            return Err(fail(format!("it exited ({st})")));
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "no answer on {} within {} s",
                sock.display(),
                wait.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(format!(
        "{ns}: underlay {addr}; vswitchd pid {} (socket {}, log {})",
        child.id(),
        sock.display(),
        opts.log(ns).display()
    ))
}

/// The pid of host `h`'s lab switch, if it is running.
fn switch_pid(opts: &LabOptions, h: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(opts.pid_file(h))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Only a process that is still a vswitchd (pids get reused).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|&b| b == 0).next()?;
    Path::new(std::str::from_utf8(argv0).ok()?)
        .file_name()
        .is_some_and(|n| n == "vswitchd")
        .then_some(pid)
}

fn up_port(cfg: &Config, p: &Port, host: Option<&str>, wait: Duration) -> Result<String, LabError> {
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
        // The tap is where its switch runs: this namespace, or the host's.
        let mut show = vec!["link", "show", "dev", &p.tap];
        let mut mv = vec!["link", "set", "dev", &p.tap, "netns", ns];
        if let Some(h) = host {
            show.splice(0..0, ["-n", h]);
            mv.splice(0..0, ["-n", h]);
        }
        while !ip_ok(&show) {
            if Instant::now() >= deadline {
                return Err(LabError::NoTap {
                    port: p.name.clone(),
                    tap: p.tap.clone(),
                    secs: wait.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ip(ns, &mv)?;
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
            // What DHCP would have told it: room for VXLAN's headers.
            if let Some(mtu) = cfg.overlay_mtu() {
                let mtu = mtu.to_string();
                ip(ns, &["-n", ns, "link", "set", "dev", "eth0", "mtu", &mtu])?;
            }
            // And the way to the tenant's other networks.
            if let Some(gw) = net.gateway {
                ip(ns, &["-n", ns, "link", "set", "dev", "eth0", "up"])?;
                let gw = gw.to_string();
                ip(
                    ns,
                    &[
                        "-n", ns, "route", "replace", "default", "via", &gw, "dev", "eth0",
                    ],
                )?;
            }
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
pub fn down(
    cfg: &Config,
    opts: &LabOptions,
    mut progress: impl FnMut(&str),
) -> Result<(), LabError> {
    if !cfg.hosts.is_empty() {
        return down_hosts(cfg, opts, progress);
    }
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
    if let Some(ns) = external_namespace(cfg).filter(|n| ns_exists(n)) {
        // The uplink taps go back here, so a running switch keeps them.
        for u in &cfg.uplinks {
            if ip_ok(&["-n", &ns, "link", "show", "dev", &u.tap]) {
                let _ = ip(
                    &ns,
                    &["-n", &ns, "link", "set", "dev", &u.tap, "nomaster", "down"],
                );
                let _ = ip(
                    &ns,
                    &["-n", &ns, "link", "set", "dev", &u.tap, "netns", &me],
                );
            }
        }
        ip(&ns, &["netns", "del", &ns])?;
        progress(&format!("{ns}: removed"));
    }
    Ok(())
}

/// Stops each host's switch (by the pid it recorded, SIGTERM, then SIGKILL
/// after 5 s), then deletes the VMs', hosts' and underlay namespaces.
fn down_hosts(
    cfg: &Config,
    opts: &LabOptions,
    mut progress: impl FnMut(&str),
) -> Result<(), LabError> {
    for h in opts.selected(cfg) {
        let ns = h.name.as_str();
        if let Some(pid) = switch_pid(opts, ns) {
            let pid_t = rustix::process::Pid::from_raw(pid);
            if let Some(p) = pid_t {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if switch_pid(opts, ns).is_some() {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
            progress(&format!("{ns}: vswitchd (pid {pid}) stopped"));
        }
        let _ = std::fs::remove_file(opts.pid_file(ns));
        let _ = std::fs::remove_file(opts.socket(ns));
    }
    for p in &cfg.ports {
        let ours = p
            .host
            .as_ref()
            .is_some_and(|h| opts.hosts.as_ref().is_none_or(|s| s.contains(h)));
        if ours && ns_exists(&p.name) {
            ip(&p.name, &["netns", "del", &p.name])?;
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&p.name));
            progress(&format!("{}: removed", p.name));
        }
    }
    for h in opts.selected(cfg) {
        if ns_exists(&h.name) {
            ip(&h.name, &["netns", "del", &h.name])?;
            progress(&format!("{}: removed", h.name));
        }
    }
    // The underlay and the external network go when the whole lab goes.
    if let (None, Some(ext)) = (&opts.hosts, external_namespace(cfg)) {
        if ns_exists(&ext) {
            ip(&ext, &["netns", "del", &ext])?;
            progress(&format!("{ext}: removed"));
        }
    }
    if let (None, Some(ul)) = (&opts.hosts, underlay_namespace(cfg)) {
        if ns_exists(&ul) {
            ip(&ul, &["netns", "del", &ul])?;
            progress(&format!("{ul}: removed"));
        }
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

/// The lab's external namespace: named after the config's first uplink; it
/// plays the external network (a bridge joining every host's uplink, with
/// the uplinks' gateway addresses on it).
pub fn external_namespace(cfg: &Config) -> Option<String> {
    cfg.uplinks.first().map(|u| u.name.clone())
}
