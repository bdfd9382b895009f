//! Harness for the vswitch network-namespace integration tests.
//!
//! The tests in `tests/tests/*.rs` run the real `vswitchd` daemon, build VMs
//! as network namespaces with `vslab`, and drive them with programs nobody
//! here wrote (`ping`, `iperf3`, `tcpdump`, `python3`). They follow the rules
//! of `TESTING.md`:
//!
//! - **Skip or fail loudly.** Every test starts with
//!   `if !netns_or_skip() { return; }`. Without root or a usable `ip netns` the
//!   test prints a loud SKIP and passes, unless `VSWITCH_REQUIRE_NETNS=1` is set
//!   (CI), in which case it panics.
//! - **Binaries.** [`bins`] finds `vswitchd`, `vswitchctl` and `vslab` in
//!   `$VSWITCH_BIN_DIR` (relative paths are taken from the workspace root), or builds them once per test process with
//!   `cargo build --release -p vswitch --bins`.
//! - **Unique names.** [`Names`] gives every test a short prefix (3 characters
//!   of its own plus the process id in hex) so port, namespace and tap names
//!   stay within 15 bytes and tests can run in parallel.
//! - **Guards.** [`TestDir`] holds config, socket, logs and captures;
//!   [`Switch`] owns one `vswitchd` (SIGTERM then SIGKILL on drop, only its own
//!   pid; prints the daemon log when the test fails); [`Lab`] owns the
//!   namespaces made by `vslab up` (`vslab down` plus `ip netns del` of any
//!   leftovers on drop); [`Bg`] owns a background process started inside a
//!   namespace (killed by pid on drop).
//! - **Deadlines.** Every wait goes through [`wait_until`] or
//!   [`run_timeout`]; there are no fixed sleeps except short poll intervals.
//! - **Config.** [`Config`] writes the TOML of `docs/config.md`.
//! - **Captures.** [`Capture`] runs `tcpdump -w` in a namespace; [`pcap`]
//!   reads the files it writes.
//! - **Bystanders.** [`Workload`] keeps a ping series and an iperf3 TCP flow
//!   running between two VMs while a test does something hostile, and
//!   reports what they measured.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;

/// Poll interval used by every wait in this crate.
pub const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Skip logic
// ---------------------------------------------------------------------------

fn require_netns() -> bool {
    std::env::var("VSWITCH_REQUIRE_NETNS").is_ok_and(|v| v == "1")
}

fn skip_or_panic(why: &str) -> bool {
    if require_netns() {
        panic!("VSWITCH_REQUIRE_NETNS=1 but namespace tests cannot run: {why}");
    }
    // Written to fd 2 directly (not `eprintln!`) so the test harness's output
    // capture cannot hide it.
    let bar = "#".repeat(66);
    let msg = format!(
        "\n{bar}\n## SKIP: vswitch namespace test NOT RUN: {why}\n\
         ## (run as root with iproute2; VSWITCH_REQUIRE_NETNS=1 turns this into a failure)\n{bar}\n\n"
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
    false
}

/// Whether namespace tests can run here. Prints a loud SKIP and returns false
/// when not root or `ip netns` / `/dev/net/tun` are unusable; panics instead
/// when `VSWITCH_REQUIRE_NETNS=1`.
pub fn netns_or_skip() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        if !rustix::process::geteuid().is_root() {
            return Err("not running as root".into());
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun does not exist".into());
        }
        let ns = format!("vsprobe{:x}", std::process::id());
        let add = Command::new("ip").args(["netns", "add", &ns]).output();
        match add {
            Err(e) => return Err(format!("cannot run `ip`: {e}")),
            Ok(o) if !o.status.success() => {
                return Err(format!(
                    "`ip netns add` failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Ok(_) => {}
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        Ok(())
    });
    match probe {
        Ok(()) => true,
        Err(why) => skip_or_panic(why),
    }
}

/// Like [`netns_or_skip`] for external programs a test needs (`iperf3`,
/// `tcpdump`, `python3`...).
pub fn tools_or_skip(tools: &[&str]) -> bool {
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        if !found {
            return skip_or_panic(&format!("`{t}` is not installed"));
        }
    }
    true
}

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// Paths of the three vswitch binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    pub vswitchd: PathBuf,
    pub vswitchctl: PathBuf,
    pub vslab: PathBuf,
}

/// Workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Locates (building once per process if needed) the vswitch binaries.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = match std::env::var_os("VSWITCH_BIN_DIR") {
            // relative to the workspace root (cargo runs tests in tests/)
            Some(d) => workspace_root().join(d),
            None => {
                let root = workspace_root();
                let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
                let mut cmd = Command::new(cargo);
                cmd.args(["build", "--release", "-p", "vswitch", "--bins"])
                    .current_dir(&root);
                let out = run_timeout(&mut cmd, Duration::from_secs(1800));
                assert!(
                    out.status.success(),
                    "`cargo build --release -p vswitch --bins` failed:\n{}",
                    fmt_output(&out)
                );
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .map(|t| if t.is_relative() { root.join(t) } else { t })
                    .unwrap_or_else(|| root.join("target"));
                target.join("release")
            }
        };
        let b = Bins {
            vswitchd: dir.join("vswitchd"),
            vswitchctl: dir.join("vswitchctl"),
            vslab: dir.join("vslab"),
        };
        for p in [&b.vswitchd, &b.vswitchctl, &b.vslab] {
            assert!(p.is_file(), "binary {} does not exist", p.display());
        }
        b
    })
}

// ---------------------------------------------------------------------------
// Processes with deadlines
// ---------------------------------------------------------------------------

/// Formats a command's output for a failure message.
pub fn fmt_output(o: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    )
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with captured stdout/stderr. If it has not
/// exited after `timeout`, kills it (by its own pid) and panics.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{what}`: {e}"));
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = t_out.join().unwrap_or_default();
                let stderr = t_err.join().unwrap_or_default();
                panic!(
                    "`{what}` did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for `{what}`: {e}"),
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Polls `cond` every [`POLL`] until it is true (returns true) or `timeout`
/// passes (returns false). The condition is always evaluated at least once,
/// and once more at the deadline.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        thread::sleep(POLL);
    }
}

/// Sends `sig` to `pid` (a process this test started).
pub fn signal(pid: u32, sig: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("invalid pid"))?;
    kill_process(pid, sig).map_err(std::io::Error::from)
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut st = None;
    wait_until(timeout, || {
        st = child.try_wait().ok().flatten();
        st.is_some()
    });
    st
}

// ---------------------------------------------------------------------------
// Names and directories
// ---------------------------------------------------------------------------

/// Per-test unique short names: `<tag><pid hex>` + suffix.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// `tag` must be 1-3 characters of `[a-z0-9]`, unique among the tests of
    /// one test binary (tests of one binary share the pid).
    pub fn new(tag: &str) -> Self {
        static USED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
        assert!(
            (1..=3).contains(&tag.len())
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "tag {tag:?} must be 1-3 chars of [a-z0-9]"
        );
        let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            used.get_or_insert_with(HashSet::new)
                .insert(tag.to_string()),
            "tag {tag:?} used twice in one process"
        );
        Names {
            prefix: format!("{tag}{:x}", std::process::id() & 0xff_ffff),
        }
    }

    /// The prefix itself (at most 9 bytes).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A port (and lab namespace) name: prefix + `s`.
    pub fn port(&self, s: &str) -> String {
        let n = format!("{}{s}", self.prefix);
        assert!(n.len() <= 15, "port name {n:?} longer than 15 bytes");
        n
    }

    /// A tap name: `t` + prefix + `s`.
    pub fn tap(&self, s: &str) -> String {
        let n = format!("t{}{s}", self.prefix);
        assert!(n.len() <= 15, "tap name {n:?} longer than 15 bytes");
        n
    }
}

/// A temporary directory for one test (config, socket, logs, captures);
/// removed on drop.
#[derive(Debug)]
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vst")
            .tempdir()
            .expect("create temp dir");
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `contents` to `name` inside the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.file(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------
// Config builder
// ---------------------------------------------------------------------------

/// A network of a tenant.
#[derive(Debug, Clone)]
pub struct NetworkCfg {
    pub name: String,
    pub vni: u32,
    pub cidr: String,
    pub gateway: Option<String>,
    pub mac_table_size: Option<u32>,
}

/// A port (VM NIC).
#[derive(Debug, Clone)]
pub struct PortCfg {
    pub name: String,
    pub network: String,
    pub mac: Option<String>,
    pub ip: Option<String>,
    pub tap: Option<String>,
    pub port_security: Option<bool>,
}

/// A tenant with its networks and ports.
#[derive(Debug, Clone)]
pub struct TenantCfg {
    pub name: String,
    pub networks: Vec<NetworkCfg>,
    pub ports: Vec<PortCfg>,
}

impl TenantCfg {
    /// Adds a network.
    pub fn network(&mut self, name: &str, vni: u32, cidr: &str) -> &mut NetworkCfg {
        self.networks.push(NetworkCfg {
            name: name.into(),
            vni,
            cidr: cidr.into(),
            gateway: None,
            mac_table_size: None,
        });
        self.networks.last_mut().expect("just pushed")
    }

    /// Adds a port with an explicit tap name, MAC and IP.
    pub fn port(
        &mut self,
        name: &str,
        network: &str,
        tap: &str,
        mac: &str,
        ip: &str,
    ) -> &mut PortCfg {
        self.ports.push(PortCfg {
            name: name.into(),
            network: network.into(),
            mac: Some(mac.into()),
            ip: Some(ip.into()),
            tap: Some(tap.into()),
            port_security: None,
        });
        self.ports.last_mut().expect("just pushed")
    }
}

/// A tenant config file (`docs/config.md`).
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `[switch]` keys with their TOML values already rendered.
    pub switch: Vec<(String, String)>,
    pub tenants: Vec<TenantCfg>,
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("string serializes")
}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a `[switch]` key to an already-rendered TOML value.
    pub fn switch_key(&mut self, key: &str, toml_value: &str) -> &mut Self {
        self.switch.push((key.into(), toml_value.into()));
        self
    }

    /// Adds a tenant.
    pub fn tenant(&mut self, name: &str) -> &mut TenantCfg {
        self.tenants.push(TenantCfg {
            name: name.into(),
            networks: Vec::new(),
            ports: Vec::new(),
        });
        self.tenants.last_mut().expect("just pushed")
    }

    /// Finds a tenant by name.
    pub fn tenant_mut(&mut self, name: &str) -> &mut TenantCfg {
        self.tenants
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tenant {name}"))
    }

    /// Removes a port by name from whichever tenant holds it.
    pub fn remove_port(&mut self, name: &str) {
        for t in &mut self.tenants {
            t.ports.retain(|p| p.name != name);
        }
    }

    /// All port names, in file order.
    pub fn port_names(&self) -> Vec<String> {
        self.tenants
            .iter()
            .flat_map(|t| t.ports.iter().map(|p| p.name.clone()))
            .collect()
    }

    /// All tap names (ports must have explicit taps).
    pub fn tap_names(&self) -> Vec<String> {
        self.tenants
            .iter()
            .flat_map(|t| t.ports.iter().filter_map(|p| p.tap.clone()))
            .collect()
    }

    /// Renders the TOML text.
    pub fn to_toml(&self) -> String {
        let mut s = String::from("# written by vswitch-tests\n");
        if !self.switch.is_empty() {
            s.push_str("[switch]\n");
            for (k, v) in &self.switch {
                let _ = writeln!(s, "{k} = {v}");
            }
            s.push('\n');
        }
        for t in &self.tenants {
            let _ = writeln!(s, "[[tenant]]\nname = {}\n", q(&t.name));
            for n in &t.networks {
                let _ = writeln!(
                    s,
                    "  [[tenant.network]]\n  name = {}\n  vni = {}\n  cidr = {}",
                    q(&n.name),
                    n.vni,
                    q(&n.cidr)
                );
                if let Some(g) = &n.gateway {
                    let _ = writeln!(s, "  gateway = {}", q(g));
                }
                if let Some(m) = n.mac_table_size {
                    let _ = writeln!(s, "  mac_table_size = {m}");
                }
                s.push('\n');
            }
            for p in &t.ports {
                let _ = writeln!(
                    s,
                    "  [[tenant.port]]\n  name = {}\n  network = {}",
                    q(&p.name),
                    q(&p.network)
                );
                if let Some(m) = &p.mac {
                    let _ = writeln!(s, "  mac = {}", q(m));
                }
                if let Some(i) = &p.ip {
                    let _ = writeln!(s, "  ip = {}", q(i));
                }
                if let Some(t) = &p.tap {
                    let _ = writeln!(s, "  tap = {}", q(t));
                }
                if let Some(b) = p.port_security {
                    let _ = writeln!(s, "  port_security = {b}");
                }
                s.push('\n');
            }
        }
        s
    }

    /// Writes the TOML to `path` (atomically: temp file + rename, so a
    /// reload never reads half a file).
    pub fn write(&self, path: &Path) {
        write_atomic(path, &self.to_toml());
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// Switch guard
// ---------------------------------------------------------------------------

/// A running `vswitchd` started by this test.
#[derive(Debug)]
pub struct Switch {
    child: Option<Child>,
    pid: u32,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Switch {
    /// Starts `vswitchd --config CONFIG --socket DIR/<name>.sock` with its
    /// output in `DIR/<name>.log` and waits until `vswitchctl show` answers.
    pub fn start(dir: &TestDir, config: &Path) -> Self {
        Self::start_named(dir, config, "vswitchd")
    }

    /// Like [`Switch::start`] with a chosen file stem for socket and log.
    pub fn start_named(dir: &TestDir, config: &Path, name: &str) -> Self {
        let b = bins();
        let socket = dir.file(&format!("{name}.sock"));
        let log = dir.file(&format!("{name}.log"));
        let logf = fs::File::create(&log).expect("create daemon log");
        let logf2 = logf.try_clone().expect("clone log fd");
        let child = Command::new(&b.vswitchd)
            .arg("--config")
            .arg(config)
            .arg("--socket")
            .arg(&socket)
            // Durable state (DHCP leases) per test directory: a restart with
            // the same TestDir finds the leases again.
            .arg("--state-dir")
            .arg(dir.file("state"))
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", b.vswitchd.display()));
        let pid = child.id();
        let mut sw = Switch {
            child: Some(child),
            pid,
            config: config.to_path_buf(),
            socket,
            log,
        };
        let mut exited = None;
        let ready = wait_until(Duration::from_secs(20), || {
            if let Some(c) = sw.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    exited = Some(st);
                    return true;
                }
            }
            sw.ctl_output(&["show"]).status.success()
        });
        if let Some(st) = exited {
            sw.child = None;
            panic!(
                "vswitchd exited during start-up with {st}\n--- daemon log ---\n{}",
                sw.log()
            );
        }
        assert!(
            ready,
            "vswitchd did not answer `vswitchctl --json show` within 20s\n--- daemon log ---\n{}",
            sw.log()
        );
        sw
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the daemon to exit by itself (e.g. after `vswitchctl
    /// restart`); its exit status, or `None` if it still runs after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let st = wait_child(self.child.as_mut()?, timeout)?;
        self.child = None;
        Some(st)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The daemon's stdout+stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }

    /// Runs `vswitchctl --socket S --json ARGS` and returns its raw output.
    pub fn ctl_output(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&bins().vswitchctl);
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(args);
        run_timeout(&mut cmd, Duration::from_secs(15))
    }

    /// Runs `vswitchctl --socket S ARGS` (the human form).
    pub fn ctl_output_plain(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&bins().vswitchctl);
        cmd.arg("--socket").arg(&self.socket).args(args);
        run_timeout(&mut cmd, Duration::from_secs(15))
    }

    /// Runs `vswitchctl --socket S --json ARGS`, asserts exit 0 and parses
    /// its one-line JSON output.
    pub fn ctl(&self, args: &[&str]) -> Value {
        let out = self.ctl_output(args);
        assert!(
            out.status.success(),
            "vswitchctl --json {} failed:\n{}\n--- daemon log ---\n{}",
            args.join(" "),
            fmt_output(&out),
            self.log()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "vswitchctl --json {} printed invalid JSON ({e}):\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `show` data.
    pub fn show(&self) -> Value {
        self.ctl(&["show"])
    }

    /// The `show` entry of one port, if present.
    pub fn port(&self, name: &str) -> Option<Value> {
        find_port(&self.show(), name)
    }

    /// The `fdb` data of one network (`TENANT/NETWORK`).
    pub fn fdb(&self, tenant: &str, network: &str) -> Value {
        let tn = format!("{tenant}/{network}");
        let v = self.ctl(&["fdb", "--network", &tn]);
        v["networks"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|n| n["tenant"] == tenant && n["network"] == network)
                    .cloned()
            })
            .unwrap_or_else(|| panic!("fdb --network {tn}: network missing in {v}"))
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: Signal) {
        signal(self.pid, sig).expect("signal vswitchd");
    }

    /// Sends SIGTERM and waits (deadline) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = signal(self.pid, Signal::TERM);
        let st = wait_child(&mut child, timeout);
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        st
    }
}

/// Finds a port by name in `show` data.
pub fn find_port(show: &Value, name: &str) -> Option<Value> {
    show["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
}

/// A number field of a JSON value (0 if missing).
pub fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

impl Drop for Switch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = signal(self.pid, Signal::TERM);
                if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                    eprintln!("vswitchd pid {} ignored SIGTERM for 10s; SIGKILL", self.pid);
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        if thread::panicking() {
            eprintln!(
                "--- vswitchd log ({}) ---\n{}\n--- end of vswitchd log ---",
                self.log.display(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Lab guard
// ---------------------------------------------------------------------------

/// The namespaces `vslab up FILE` made for a running switch.
#[derive(Debug)]
pub struct Lab {
    config: PathBuf,
    namespaces: Vec<String>,
}

impl Lab {
    /// Runs `vslab up CONFIG` for the ports named in it (`ports` are the
    /// namespaces this guard removes on drop).
    pub fn up(config: &Path, ports: &[String]) -> Self {
        let mut lab = Lab {
            config: config.to_path_buf(),
            namespaces: Vec::new(),
        };
        lab.up_again(ports);
        lab
    }

    /// Runs `vslab up` again (e.g. after a reload added ports) and adds
    /// `ports` to the namespaces this guard cleans up.
    pub fn up_again(&mut self, ports: &[String]) {
        for p in ports {
            if !self.namespaces.contains(p) {
                self.namespaces.push(p.clone());
            }
        }
        let mut cmd = Command::new(&bins().vslab);
        cmd.arg("up").arg(&self.config).args(["--wait", "10"]);
        let out = run_timeout(&mut cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "vslab up {} failed:\n{}",
            self.config.display(),
            fmt_output(&out)
        );
    }

    /// `vslab exec PORT -- ARGS...` with a deadline.
    pub fn exec(&self, port: &str, args: &[&str]) -> Output {
        self.exec_timeout(port, args, Duration::from_secs(30))
    }

    /// `vslab exec PORT -- ARGS...` with a chosen deadline.
    pub fn exec_timeout(&self, port: &str, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new(&bins().vslab);
        cmd.args(["exec", port, "--"]).args(args);
        run_timeout(&mut cmd, timeout)
    }

    /// Pings `ip` from `port` (`ping -c COUNT -W 2 -i 0.2`); returns the output.
    pub fn ping(&self, port: &str, ip: &str, count: u32) -> Output {
        let c = count.to_string();
        self.exec(port, &["ping", "-n", "-c", &c, "-i", "0.2", "-W", "2", ip])
    }

    /// Asserts that `port` pings `ip` with exit 0 and 0% loss.
    pub fn assert_ping(&self, port: &str, ip: &str, count: u32) {
        let out = self.ping(port, ip, count);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(" 0% packet loss"),
            "ping {ip} from {port} failed:\n{}",
            fmt_output(&out)
        );
    }

    /// Spawns a long-running program inside `port`'s namespace with
    /// `ip netns exec` (which execs, so the pid is the program's own), stdout
    /// and stderr going to `DIR/<label>.out` / `.err`.
    pub fn spawn(&self, dir: &TestDir, port: &str, label: &str, args: &[&str]) -> Bg {
        Bg::spawn_in(dir, port, label, args)
    }
}

/// True if the named network namespace exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut cmd = Command::new(&bins().vslab);
        cmd.arg("down").arg(&self.config);
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_timeout(&mut cmd, Duration::from_secs(30))
        }));
        match res {
            Ok(out) if !out.status.success() => {
                eprintln!("vslab down failed:\n{}", fmt_output(&out));
            }
            Ok(_) => {}
            Err(_) => eprintln!("vslab down did not finish"),
        }
        for ns in &self.namespaces {
            if netns_exists(ns) {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
            // vslab's per-namespace resolv.conf (gone already for ports
            // still in the config; not for ports a test removed from it).
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

// ---------------------------------------------------------------------------
// Multi-host lab guard
// ---------------------------------------------------------------------------

/// A multi-host lab made by `vslab up FILE --run-dir DIR` (hosts, underlay,
/// one `vswitchd` per host namespace, VMs). On drop: `vslab down` (which
/// stops the lab's switches by their recorded pids), then `ip netns del` of
/// any namespace left; the switches' logs are printed if the test failed.
#[derive(Debug)]
pub struct MultiLab {
    config: PathBuf,
    run_dir: PathBuf,
    hosts: Option<Vec<String>>,
    namespaces: Vec<String>,
}

impl MultiLab {
    /// `vslab up CONFIG --run-dir DIR/run [--hosts H,...]`; `namespaces`
    /// lists every namespace the lab makes (hosts, VMs, `ul-FIRSTHOST`).
    pub fn up(dir: &TestDir, config: &Path, hosts: Option<&[&str]>, namespaces: &[String]) -> Self {
        let lab = MultiLab {
            config: config.to_path_buf(),
            run_dir: dir.file("run"),
            hosts: hosts.map(|h| h.iter().map(|s| s.to_string()).collect()),
            namespaces: namespaces.to_vec(),
        };
        let mut cmd = Command::new(&bins().vslab);
        cmd.arg("up").arg(&lab.config).args(["--wait", "15"]);
        lab.common_args(&mut cmd);
        let out = run_timeout(&mut cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "vslab up {} failed:\n{}",
            lab.config.display(),
            fmt_output(&out)
        );
        lab
    }

    fn common_args(&self, cmd: &mut Command) {
        cmd.arg("--run-dir").arg(&self.run_dir);
        cmd.arg("--vswitchd").arg(&bins().vswitchd);
        if let Some(h) = &self.hosts {
            cmd.arg("--hosts").arg(h.join(","));
        }
    }

    /// Host `h`'s control socket.
    pub fn socket(&self, h: &str) -> PathBuf {
        self.run_dir.join(format!("{h}.sock"))
    }

    /// Host `h`'s switch log.
    pub fn log(&self, h: &str) -> String {
        fs::read_to_string(self.run_dir.join(format!("{h}.log"))).unwrap_or_default()
    }

    /// The pid host `h`'s switch recorded.
    pub fn pid(&self, h: &str) -> Option<u32> {
        fs::read_to_string(self.run_dir.join(format!("{h}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `vswitchctl --socket HOST.sock --json ARGS...`, parsed.
    pub fn ctl(&self, h: &str, args: &[&str]) -> Value {
        let mut cmd = Command::new(&bins().vswitchctl);
        cmd.arg("--socket")
            .arg(self.socket(h))
            .arg("--json")
            .args(args);
        let out = run_timeout(&mut cmd, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "vswitchctl {args:?} on {h} failed:\n{}",
            fmt_output(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("vswitchctl {args:?}: bad JSON ({e}):\n{}", fmt_output(&out))
        })
    }

    /// `ip netns exec NS ARGS...` with a deadline of 30 s.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        run_timeout(&mut cmd, Duration::from_secs(30))
    }

    /// Asserts that `ns` pings `ip` with 0% loss.
    pub fn assert_ping(&self, ns: &str, ip: &str, count: u32) {
        let c = count.to_string();
        let out = self.exec(ns, &["ping", "-n", "-c", &c, "-i", "0.2", "-W", "2", ip]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(" 0% packet loss"),
            "ping {ip} from {ns} failed:\n{}",
            fmt_output(&out)
        );
    }

    /// `vslab down` now (the drop does it otherwise); returns its output.
    pub fn down(&mut self) -> Output {
        let mut cmd = Command::new(&bins().vslab);
        cmd.arg("down").arg(&self.config);
        self.common_args(&mut cmd);
        run_timeout(&mut cmd, Duration::from_secs(60))
    }
}

impl Drop for MultiLab {
    fn drop(&mut self) {
        if thread::panicking() {
            for e in fs::read_dir(&self.run_dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = fs::read_to_string(&p).unwrap_or_default();
                    eprintln!("---- {} ----\n{text}", p.display());
                }
            }
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.down()));
        match res {
            Ok(out) if !out.status.success() => {
                eprintln!("vslab down failed:\n{}", fmt_output(&out))
            }
            Ok(_) => {}
            Err(_) => eprintln!("vslab down did not finish"),
        }
        for ns in &self.namespaces {
            if netns_exists(ns) {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

// ---------------------------------------------------------------------------
// Background process guard
// ---------------------------------------------------------------------------

/// A background process this test started inside a namespace; SIGKILLed (by
/// its pid) on drop if still running.
#[derive(Debug)]
pub struct Bg {
    child: Child,
    label: String,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
}

impl Bg {
    /// `ip netns exec NS ARGS...` with output to `DIR/<label>.out|.err`.
    pub fn spawn_in(dir: &TestDir, ns: &str, label: &str, args: &[&str]) -> Bg {
        let out = dir.file(&format!("{label}.out"));
        let err = dir.file(&format!("{label}.err"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("create .out"))
            .stderr(fs::File::create(&err).expect("create .err"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label}: {e}"));
        Bg {
            child,
            label: label.into(),
            out,
            err,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.status = Some(st);
                false
            }
            _ => true,
        }
    }

    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            let _ = signal(self.pid(), sig);
        }
    }

    /// Waits for exit; panics (after killing it) if it takes over `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        match wait_child(&mut self.child, timeout) {
            Some(st) => {
                self.status = Some(st);
                st
            }
            None => {
                let _ = self.child.kill();
                let st = self.child.wait().ok();
                self.status = st;
                panic!(
                    "{} did not exit within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.label,
                    self.stdout(),
                    self.stderr()
                );
            }
        }
    }

    /// Sends `sig` and waits for exit.
    pub fn stop(&mut self, sig: Signal, timeout: Duration) -> ExitStatus {
        self.signal(sig);
        self.wait(timeout)
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.running() {
            // SIGTERM first: daemons such as dhcpcd stop their helper
            // processes on it, SIGKILL would orphan them.
            let _ = signal(self.child.id(), Signal::TERM);
            if !wait_until(Duration::from_secs(3), || !self.running()) {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------

/// Whether `ip link show DEV` succeeds on the host (test process namespace).
pub fn host_link_exists(dev: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", dev])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether `ip link show DEV` succeeds inside namespace `ns`.
pub fn netns_link_exists(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", dev])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Waits until a TCP listener on `port` exists inside namespace `ns`.
pub fn wait_tcp_listen(ns: &str, port: u16, timeout: Duration) -> bool {
    let filter = format!("sport = :{port}");
    wait_until(timeout, || {
        Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Hltn", &filter])
            .output()
            .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
            .unwrap_or(false)
    })
}

/// `ip netns exec NS ARGS...` with a deadline (for namespaces that are not
/// lab ports, such as hosts and underlay attackers of a [`MultiLab`]).
pub fn ns_exec(ns: &str, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    run_timeout(&mut cmd, timeout)
}

// ---------------------------------------------------------------------------
// Captures and background traffic
// ---------------------------------------------------------------------------

/// A `tcpdump -w` running inside a namespace (a [`Bg`]: killed on drop).
#[derive(Debug)]
pub struct Capture {
    bg: Bg,
    file: PathBuf,
    ns: String,
}

/// What a [`Capture`] saw.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// Every frame of the pcap file.
    pub frames: Vec<Vec<u8>>,
    /// tcpdump's "packets dropped by kernel" (0 if it did not say).
    pub dropped_by_kernel: u64,
}

impl Captured {
    /// How many frames contain `needle`.
    pub fn count_with(&self, needle: &[u8]) -> usize {
        pcap::count_with(&self.frames, needle)
    }
}

impl Capture {
    /// Starts `tcpdump -i IFACE -w DIR/LABEL.pcap FILTER...` in `ns` (whole
    /// frames, 8 MiB kernel buffer, immediate mode) and waits up to 10 s
    /// until it listens.
    pub fn start(dir: &TestDir, ns: &str, label: &str, iface: &str, filter: &[&str]) -> Capture {
        Self::start_snap(dir, ns, label, iface, 0, filter)
    }

    /// Like [`Capture::start`], keeping the first `snaplen` bytes of each
    /// frame (0: all). For floods: in immediate mode every slot of tcpdump's
    /// ring is as large as the snap length, so whole-frame captures of an
    /// offloading interface (64 KB slots) hold few frames and drop.
    pub fn start_snap(
        dir: &TestDir,
        ns: &str,
        label: &str,
        iface: &str,
        snaplen: u32,
        filter: &[&str],
    ) -> Capture {
        let file = dir.file(&format!("{label}.pcap"));
        let f = file.to_string_lossy().into_owned();
        let snap = snaplen.to_string();
        let mut args = vec![
            "tcpdump",
            "--immediate-mode",
            "-n",
            "-U",
            "-Z",
            "root",
            "-s",
            &snap,
            "-B",
            "8192",
            "-i",
            iface,
            "-w",
            &f,
        ];
        args.extend_from_slice(filter);
        let bg = Bg::spawn_in(dir, ns, label, &args);
        assert!(
            wait_until(Duration::from_secs(10), || bg
                .stderr()
                .contains("listening on")),
            "tcpdump in {ns} did not start: {}",
            bg.stderr()
        );
        Capture {
            bg,
            file,
            ns: ns.to_string(),
        }
    }

    /// Stops tcpdump (SIGINT, 10 s deadline) and reads what it wrote.
    pub fn stop(mut self) -> Captured {
        let st = self.bg.stop(Signal::INT, Duration::from_secs(10));
        let err = self.bg.stderr();
        assert!(st.success(), "tcpdump in {}: {st} {err}", self.ns);
        let frames = pcap::read(&self.file).unwrap_or_else(|e| panic!("{e}"));
        let dropped_by_kernel = err
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Captured {
            frames,
            dropped_by_kernel,
        }
    }
}

/// Background traffic between two VMs: a ping series (`-i 0.1`) and an
/// `iperf3` TCP flow from `client` to `server_ip` (served in `server`),
/// both lasting about `secs` seconds. Its processes are [`Bg`]s: killed on
/// drop.
#[derive(Debug)]
pub struct Workload {
    ping: Bg,
    iperf_server: Bg,
    iperf_client: Bg,
    secs: u32,
}

/// What a [`Workload`] measured.
#[derive(Debug, Clone)]
pub struct WorkloadReport {
    /// Echo requests sent.
    pub ping_sent: u64,
    /// Echo replies received.
    pub ping_received: u64,
    /// ping's exit status was 0.
    pub ping_ok: bool,
    /// ping's output (for messages).
    pub ping_output: String,
    /// iperf3's exit status was 0.
    pub iperf_ok: bool,
    /// Bytes the iperf3 server received (`end.sum_received.bytes`).
    pub iperf_bytes: u64,
    /// iperf3's output (for messages).
    pub iperf_output: String,
}

impl WorkloadReport {
    /// Lost echo requests in percent (100 when none were sent).
    pub fn ping_loss_pct(&self) -> f64 {
        if self.ping_sent == 0 {
            return 100.0;
        }
        100.0 * self.ping_sent.saturating_sub(self.ping_received) as f64 / self.ping_sent as f64
    }
}

impl Workload {
    /// Starts `iperf3 -s -1` in `server` (waits until it listens), then
    /// `iperf3 -c SERVER_IP -t SECS -J` and `ping -c SECS*10 -i 0.1` in
    /// `client`. `label` names the output files in `dir`.
    pub fn start(
        dir: &TestDir,
        label: &str,
        client: &str,
        server: &str,
        server_ip: &str,
        secs: u32,
    ) -> Workload {
        let iperf_server = Bg::spawn_in(
            dir,
            server,
            &format!("{label}-iperf-s"),
            &["iperf3", "-s", "-1", "-p", "5201"],
        );
        assert!(
            wait_tcp_listen(server, 5201, Duration::from_secs(10)),
            "iperf3 server in {server} did not listen"
        );
        let t = secs.to_string();
        let iperf_client = Bg::spawn_in(
            dir,
            client,
            &format!("{label}-iperf-c"),
            &["iperf3", "-c", server_ip, "-p", "5201", "-t", &t, "-J"],
        );
        let c = (secs * 10).to_string();
        let ping = Bg::spawn_in(
            dir,
            client,
            &format!("{label}-ping"),
            &["ping", "-n", "-c", &c, "-i", "0.1", "-W", "1", server_ip],
        );
        Workload {
            ping,
            iperf_server,
            iperf_client,
            secs,
        }
    }

    /// Whether the ping series and the iperf3 flow are both still running.
    pub fn running(&mut self) -> bool {
        self.ping.running() && self.iperf_client.running()
    }

    /// Waits (deadline: the workload's length + 20 s) for ping and iperf3
    /// and reports what they measured.
    pub fn finish(mut self) -> WorkloadReport {
        let limit = Duration::from_secs(u64::from(self.secs) + 20);
        let ping_ok = self.ping.wait(limit).success();
        let iperf_ok = self.iperf_client.wait(limit).success();
        // The server exits after its one test (`-1`); a failed client may
        // leave it waiting: the drop kills it then.
        let _ = wait_until(Duration::from_secs(5), || !self.iperf_server.running());
        let ping_output = self.ping.stdout();
        let (mut ping_sent, mut ping_received) = (0, 0);
        if let Some(line) = ping_output.lines().find(|l| l.contains("transmitted")) {
            let nums: Vec<u64> = line
                .split(',')
                .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                .collect();
            if let [sent, received, ..] = nums[..] {
                (ping_sent, ping_received) = (sent, received);
            }
        }
        let iperf_output = self.iperf_client.stdout();
        let iperf_bytes = serde_json::from_str::<Value>(&iperf_output)
            .ok()
            .and_then(|j| j["end"]["sum_received"]["bytes"].as_u64())
            .unwrap_or(0);
        WorkloadReport {
            ping_sent,
            ping_received,
            ping_ok,
            ping_output: format!("{ping_output}{}", self.ping.stderr()),
            iperf_ok,
            iperf_bytes,
            iperf_output: format!(
                "{}{}",
                iperf_output.chars().take(4000).collect::<String>(),
                self.iperf_client.stderr()
            ),
        }
    }
}

/// A python3 program that sends Ethernet frames on an AF_PACKET socket:
/// `python3 FILE IFNAME COUNT DST_MAC SEED PAUSE_EVERY PAUSE_SECS [SRC_MAC]`.
/// Without SRC_MAC every frame gets a random unicast, locally administered
/// source MAC. Prints the number sent, then every source MAC when COUNT <= 1000.
pub const FRAME_SENDER_PY: &str = r#"
import random, socket, sys, time
ifname, count, dst, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
every, pause = int(sys.argv[5]), float(sys.argv[6])
rng = random.Random(seed)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
dstb = bytes.fromhex(dst.replace(":", ""))
macs = []
sent = 0
for i in range(count):
    src = bytearray(rng.getrandbits(8) for _ in range(6))
    src[0] = (src[0] & 0xFC) | 0x02
    macs.append(":".join("%02x" % b for b in src))
    frame = dstb + bytes(src) + b"\x88\xb5" + b"vswitch-tests" + bytes(33)
    for attempt in range(1000):
        try:
            s.send(frame)
            sent += 1
            break
        except OSError:
            time.sleep(0.001)
    if every and i % every == every - 1:
        time.sleep(pause)
print(sent)
if count <= 1000:
    for m in macs:
        print(m)
"#;

// ---------------------------------------------------------------------------
// pcap reader
// ---------------------------------------------------------------------------

/// A minimal reader for classic pcap files (`tcpdump -w`).
pub mod pcap {
    use std::path::Path;

    /// Reads every frame of a classic pcap file (either byte order, micro- or
    /// nanosecond timestamps). A truncated last record (capture stopped
    /// mid-write) is ignored.
    pub fn read(path: &Path) -> Result<Vec<Vec<u8>>, String> {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        parse(&data).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses pcap bytes.
    pub fn parse(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        if data.len() < 24 {
            return Err(format!(
                "file too short for a pcap header ({} bytes)",
                data.len()
            ));
        }
        let magic = [data[0], data[1], data[2], data[3]];
        let le = match magic {
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
            _ => return Err(format!("not a classic pcap file (magic {magic:02x?})")),
        };
        let u32_at = |off: usize| -> u32 {
            let b = [data[off], data[off + 1], data[off + 2], data[off + 3]];
            if le {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            }
        };
        let linktype = u32_at(20);
        if linktype != 1 {
            return Err(format!("link type {linktype}, expected 1 (Ethernet)"));
        }
        let mut frames = Vec::new();
        let mut off = 24;
        while off + 16 <= data.len() {
            let incl = u32_at(off + 8) as usize;
            let start = off + 16;
            if start + incl > data.len() {
                break;
            }
            frames.push(data[start..start + incl].to_vec());
            off = start + incl;
        }
        Ok(frames)
    }

    /// Whether `hay` contains `needle`.
    pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
        !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
    }

    /// How many frames contain `needle`.
    pub fn count_with(frames: &[Vec<u8>], needle: &[u8]) -> usize {
        frames.iter().filter(|f| contains(f, needle)).count()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_le_usec() {
            let mut d = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
            d.extend_from_slice(&[0; 8]);
            d.extend_from_slice(&65535u32.to_le_bytes());
            d.extend_from_slice(&1u32.to_le_bytes());
            for frame in [&[1u8, 2, 3][..], &[0xa1, 0xa1, 0xa1, 0xa1, 9][..]] {
                d.extend_from_slice(&[0; 8]);
                d.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                d.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                d.extend_from_slice(frame);
            }
            d.extend_from_slice(&[0; 5]); // truncated record
            let f = parse(&d).expect("parses");
            assert_eq!(f.len(), 2);
            assert_eq!(f[0], vec![1, 2, 3]);
            assert_eq!(count_with(&f, &[0xa1; 4]), 1);
        }

        #[test]
        fn rejects_garbage() {
            assert!(parse(&[0u8; 40]).is_err());
            assert!(parse(&[0u8; 3]).is_err());
        }
    }
}

// ---------------------------------------------------------------------------
// Small Python peers (no nc/socat/hping3 on the machine)
// ---------------------------------------------------------------------------

/// An HTTP server answering every GET with the client's address as it
/// sees it (`/big` adds a 16 MB body so rate-limited downloads overlap in
/// time).
pub const HTTP_SERVER: &str = r#"
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        if self.path == "/big":
            body = body + b"\n" + b"x" * (16 << 20)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
S(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// A TCP echo server (threads, one per connection).
pub const ECHO_SERVER: &str = r#"
import socket, threading, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
def serve(c):
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Sends one UDP datagram on a connected socket and reports what came
/// back: "refused" (ICMP port unreachable reached the socket), "data" or
/// "timeout".
pub const UDP_PROBE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"x")
try:
    s.recv(100); print("data")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"#;

/// Connects to ADDR PORT with a timeout (seconds, default 2) and prints
/// "ok", "refused" (a RST came back) or "timeout" (nothing came back).
pub const TCP_PROBE: &str = r#"
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[3]) if len(sys.argv) > 3 else 2.0)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("ok")
except ConnectionRefusedError:
    print("refused")
except (socket.timeout, TimeoutError):
    print("timeout")
"#;

/// A SYN flood of the polite kind: N non-blocking connects to consecutive
/// ports of ADDR from FIRST on (each one SYN plus the kernel's retries),
/// left pending for SECS seconds.
pub const SYN_FLOOD: &str = r#"
import socket, sys, time
addr, first, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = []
for i in range(n):
    s = socket.socket(); s.setblocking(False)
    try:
        s.connect((addr, first + i))
    except BlockingIOError:
        pass
    except OSError:
        pass
    socks.append(s)
time.sleep(secs)
print(len(socks))
"#;

/// Starts `python3 SCRIPT PORT` in namespace `ns` and waits until it
/// listens.
pub fn serve_python(dir: &TestDir, ns: &str, script: &Path, port: u16) -> Bg {
    let script = script.to_str().expect("utf-8 path");
    let label = format!("srv-{ns}-{port}");
    let mut bg = Bg::spawn_in(dir, ns, &label, &["python3", script, &port.to_string()]);
    let p = format!(":{port} ");
    let ok = wait_until(Duration::from_secs(10), || {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "ss", "-ltnH"]);
        let o = run_timeout(&mut cmd, Duration::from_secs(10));
        String::from_utf8_lossy(&o.stdout).contains(&p)
    });
    assert!(
        ok,
        "nothing listens on {port} in {ns} (running: {}):\n{}",
        bg.running(),
        bg.stderr()
    );
    bg
}

/// Runs a Python snippet (one of the consts above, written to DIR) in `ns`
/// with `args`; its trimmed stdout.
pub fn python_in(
    dir: &TestDir,
    ns: &str,
    name: &str,
    script: &str,
    args: &[&str],
    timeout: Duration,
) -> String {
    let path = dir.write(name, script);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "python3"])
        .arg(&path)
        .args(args);
    let out = run_timeout(&mut cmd, timeout);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_string()
}
