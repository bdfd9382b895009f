//! DHCP with real clients (ISC dhclient, busybox udhcpc, dhcpcd), durable
//! leases across SIGKILL, and DNS for port names at the gateway.

use std::time::Duration;

use rustix::process::Signal;
use serde_json::Value;
use vswitch_tests::*;

/// One tenant, network 10.20.N.0/24 with DHCP; `ports` are (name, mac, ip).
fn dhcp_config(n: &Names, net: u8, ports: &[(&str, &str, Option<&str>)]) -> String {
    let mut t = format!(
        r#"
[[tenant]]
name = "{p}ten"
  [[tenant.network]]
  name = "lan"
  vni = {vni}
  cidr = "10.20.{net}.0/24"
  gateway = "10.20.{net}.1"
  [tenant.network.dhcp]
  pool = ["10.20.{net}.100-10.20.{net}.150"]
  lease_secs = 600
  dns = ["10.20.{net}.1"]
  domain = "lab.internal"
  mtu = 1400
  routes = [{{ dest = "192.168.77.0/24", via = "10.20.{net}.1" }}]
"#,
        p = n.prefix(),
        vni = 7000 + u32::from(net),
    );
    for (name, mac, ip) in ports {
        t.push_str(&format!(
            "\n  [[tenant.port]]\n  name = \"{}\"\n  network = \"lan\"\n  tap = \"{}\"\n  mac = \"{mac}\"\n",
            n.port(name),
            n.tap(name)
        ));
        if let Some(ip) = ip {
            t.push_str(&format!("  ip = \"{ip}\"\n"));
        }
    }
    t
}

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The namespace's IPv4 address on eth0 with its prefix, if any.
fn addr(lab: &Lab, port: &str) -> Option<String> {
    let o = lab.exec(port, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    out(&o)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(str::to_string)
}

/// Checks what a client configured from the DHCP answer.
fn assert_configured(
    lab: &Lab,
    port: &str,
    net: u8,
    want_ip: Option<&str>,
    client_applies_121: bool,
    client_applies_mtu: bool,
) -> String {
    let a = addr(lab, port).unwrap_or_else(|| panic!("{port}: no IPv4 address after DHCP"));
    let (ip, len) = a.split_once('/').unwrap_or((&a, ""));
    assert_eq!(len, "24", "{port}: prefix from option 1: {a}");
    assert!(
        ip.starts_with(&format!("10.20.{net}.")),
        "{port}: address {a}"
    );
    if let Some(w) = want_ip {
        assert_eq!(ip, w, "{port}: the reservation's address");
    } else {
        let last: u8 = ip
            .rsplit('.')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        assert!(
            (100..=150).contains(&last),
            "{port}: {ip} not from the pool"
        );
    }
    let routes = out(&lab.exec(port, &["ip", "-4", "route"]));
    assert!(
        routes.contains(&format!("default via 10.20.{net}.1")),
        "{port}: routes:\n{routes}"
    );
    if client_applies_121 {
        assert!(
            routes.contains(&format!("192.168.77.0/24 via 10.20.{net}.1")),
            "{port}: option 121 route:\n{routes}"
        );
    }
    if client_applies_mtu {
        let link = out(&lab.exec(port, &["ip", "link", "show", "dev", "eth0"]));
        assert!(
            link.contains("mtu 1400"),
            "{port}: MTU from option 26: {link}"
        );
    }
    let resolv = out(&lab.exec(port, &["cat", "/etc/resolv.conf"]));
    assert!(
        resolv.contains(&format!("nameserver 10.20.{net}.1")),
        "{port}: resolv.conf:\n{resolv}"
    );
    ip.to_string()
}

/// Stops the process named by a pidfile when dropped (a daemonized client).
struct PidfileGuard(std::path::PathBuf);

impl Drop for PidfileGuard {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            let _ = signal(pid, Signal::TERM);
        }
    }
}

fn leases(sw: &Switch) -> Vec<Value> {
    let v = sw.ctl(&["leases"]);
    v["networks"][0]["leases"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn lease_state(sw: &Switch, mac: &str) -> Option<(String, String)> {
    leases(sw).into_iter().find(|l| l["mac"] == mac).map(|l| {
        (
            l["ip"].as_str().unwrap_or("").to_string(),
            l["state"].as_str().unwrap_or("").to_string(),
        )
    })
}

fn stat(sw: &Switch, key: &str) -> u64 {
    sw.ctl(&["leases"])["networks"][0]["stats"][key]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn real_dhcp_clients_obtain_renew_release() {
    if !netns_or_skip() || !tools_or_skip(&["dhclient", "udhcpc", "dhcpcd", "ping"]) {
        return;
    }
    let n = Names::new("dhc");
    let dir = TestDir::new();
    let (d, u, p) = (
        "02:00:00:20:00:0d",
        "02:00:00:20:00:0a",
        "02:00:00:20:00:0c",
    );
    let path = dir.write(
        "vswitch.toml",
        &dhcp_config(
            &n,
            1,
            &[
                ("dcl", d, Some("10.20.1.10")),
                ("ucl", u, None),
                ("pcl", p, None),
            ],
        ),
    );
    let (dcl, ucl, pcl) = (n.port("dcl"), n.port("ucl"), n.port("pcl"));
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[dcl.clone(), ucl.clone(), pcl.clone()]);
    let t = Duration::from_secs(30);

    // ISC dhclient: the reservation. `-1` daemonizes once bound; the guard
    // stops that daemon by its pidfile on every exit path.
    let pf = dir.file("dhclient.pid").to_string_lossy().into_owned();
    let _dhclient = PidfileGuard(dir.file("dhclient.pid"));
    let lf = dir.file("dhclient.leases").to_string_lossy().into_owned();
    let o = lab.exec_timeout(
        &dcl,
        &["dhclient", "-1", "-v", "-pf", &pf, "-lf", &lf, "eth0"],
        t,
    );
    assert!(o.status.success(), "dhclient:\n{}", fmt_output(&o));
    let dip = assert_configured(&lab, &dcl, 1, Some("10.20.1.10"), true, true);
    assert_eq!(lease_state(&sw, d), Some((dip.clone(), "bound".into())));
    // Renew as after a reboot: stop the daemon without releasing (`-x`),
    // start again (INIT-REBOOT from the lease file): same address, another
    // ACK. (A second `-1` would leave the first daemon running.)
    let o = lab.exec_timeout(&dcl, &["dhclient", "-x", "-pf", &pf, "-lf", &lf, "eth0"], t);
    assert!(o.status.success(), "dhclient -x:\n{}", fmt_output(&o));
    let acks = stat(&sw, "ack");
    let o = lab.exec_timeout(
        &dcl,
        &["dhclient", "-1", "-v", "-pf", &pf, "-lf", &lf, "eth0"],
        t,
    );
    assert!(o.status.success(), "dhclient renew:\n{}", fmt_output(&o));
    assert!(stat(&sw, "ack") > acks, "no ACK for the renewal");
    assert_eq!(addr(&lab, &dcl).as_deref(), Some("10.20.1.10/24"));

    // busybox udhcpc: a pool address. It asks for option 121 and 26 only
    // when told to (the server sends what the request list names), and
    // Debian's script applies the MTU but not static routes: a wrapper
    // records what udhcpc received, then runs the stock script.
    let env = dir.file("udhcpc.env").to_string_lossy().into_owned();
    let script = dir.write(
        "udhcpc.sh",
        &format!("#!/bin/sh\necho \"$1 staticroutes=$staticroutes mtu=$mtu\" >> {env}\nexec /etc/udhcpc/default.script \"$@\"\n"),
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let script = script.to_string_lossy().into_owned();
    // In the foreground as a service runs it: -R releases on SIGTERM,
    // SIGUSR1 renews (RENEWING: a unicast REQUEST with ciaddr).
    let udhcpc = [
        "udhcpc",
        "-i",
        "eth0",
        "-f",
        "-R",
        "-t",
        "5",
        "-T",
        "2",
        "-O",
        "staticroutes",
        "-O",
        "mtu",
        "-s",
        &script,
    ];
    let mut ubg = lab.spawn(&dir, &ucl, "udhcpc", &udhcpc);
    let leased = wait_until(t, || {
        addr(&lab, &ucl).is_some_and(|a| a.starts_with("10.20.1."))
    });
    assert!(leased, "udhcpc got no lease: {}", ubg.stderr());
    let uip = assert_configured(&lab, &ucl, 1, None, false, true);
    let got = std::fs::read_to_string(&env).unwrap_or_default();
    // RFC 3442: with option 121 the default route travels inside it too.
    assert!(
        got.contains("bound staticroutes=0.0.0.0/0 10.20.1.1 192.168.77.0/24 10.20.1.1 mtu=1400"),
        "udhcpc received: {got}"
    );
    let acks = stat(&sw, "ack");
    signal(ubg.pid(), Signal::USR1).expect("SIGUSR1 to udhcpc");
    assert!(
        wait_until(t, || stat(&sw, "ack") > acks),
        "udhcpc's renewal got no ACK: {}",
        ubg.stderr()
    );
    assert_eq!(
        lease_state(&sw, u),
        Some((uip.clone(), "bound".into())),
        "udhcpc renewed to another address"
    );

    // dhcpcd (sends a DUID client id): pool address, then release.
    // `ip netns exec` shares the machine's UTS namespace: keep dhcpcd's
    // hostname hook away from the machine's host name.
    let host_before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let dhcpcd = [
        "dhcpcd",
        "-4",
        "-B",
        "-t",
        "20",
        "--noipv4ll",
        "--nohook",
        "hostname",
        "eth0",
    ];
    let mut bg = lab.spawn(&dir, &pcl, "dhcpcd", &dhcpcd);
    let leased = wait_until(t, || {
        addr(&lab, &pcl).is_some_and(|a| a.starts_with("10.20.1."))
    });
    assert!(leased, "dhcpcd got no lease: {}", bg.stderr());
    // Debian's dhcpcd has no MTU hook: check what it received instead.
    let pip = assert_configured(&lab, &pcl, 1, None, true, false);
    let dump = out(&lab.exec(&pcl, &["dhcpcd", "-4", "-U", "eth0"]));
    assert!(dump.contains("interface_mtu=1400"), "dhcpcd lease: {dump}");
    assert_ne!(pip, uip);
    assert_eq!(lease_state(&sw, p), Some((pip.clone(), "bound".into())));
    // A second DUID-keyed client on the same MAC must not get a second address.
    assert_eq!(
        leases(&sw)
            .iter()
            .filter(|l| l["mac"] == p && l["state"] == "bound")
            .count(),
        1
    );

    // Everyone reaches everyone with their DHCP addresses.
    lab.assert_ping(&ucl, &dip, 1);
    lab.assert_ping(&pcl, &uip, 1);

    // Releases.
    let rel = stat(&sw, "release");
    // `dhcpcd -k` asks the running dhcpcd over its control socket to release
    // and exit. (Sending SIGALRM directly races dhcpcd's own interface
    // teardown: it logs "releasing" but the message often never leaves.)
    // The control socket under /run is shared by all namespaces: only this
    // test runs dhcpcd, and `Bg` stops it with SIGTERM on every exit path.
    // dhcpcd unicasts the RELEASE to the server and deletes the address a
    // moment later; with the gateway not yet in the VM's ARP cache the
    // kernel drops the queued RELEASE with the address (seen 1 run in 5).
    // A VM that has talked to its gateway has it cached: resolve it first
    // (the switch answers the ARP; the ICMP itself goes unanswered).
    let _ = lab.exec(&pcl, &["ping", "-c", "1", "-W", "1", "10.20.1.1"]);
    let neigh = out(&lab.exec(&pcl, &["ip", "neigh", "show", "10.20.1.1"]));
    assert!(
        neigh.contains("lladdr"),
        "gateway not resolved by the ARP responder: {neigh}"
    );
    let o = lab.exec_timeout(&pcl, &["dhcpcd", "-4", "-k", "eth0"], t);
    assert!(o.status.success(), "dhcpcd -k:\n{}", fmt_output(&o));
    let st = bg.stop(Signal::TERM, Duration::from_secs(10));
    assert!(st.success(), "dhcpcd exit: {st} {}", bg.stderr());
    let host_after = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert_eq!(
        host_before, host_after,
        "a DHCP client changed the machine's host name"
    );
    let o = lab.exec_timeout(&dcl, &["dhclient", "-r", "-pf", &pf, "-lf", &lf, "eth0"], t);
    assert!(o.status.success(), "dhclient -r:\n{}", fmt_output(&o));
    let st = ubg.stop(Signal::TERM, Duration::from_secs(10));
    assert!(st.success(), "udhcpc exit: {st} {}", ubg.stderr());
    assert!(
        wait_until(Duration::from_secs(5), || stat(&sw, "release") >= rel + 3),
        "releases counted: {} (before {rel}); leases: {:?}\nstats: {}\npcl: {:?}\ndhcpcd: {}",
        stat(&sw, "release"),
        leases(&sw),
        sw.ctl(&["leases"])["networks"][0]["stats"],
        sw.port(&pcl),
        bg.stderr()
    );
    for mac in [d, u, p] {
        assert_ne!(
            lease_state(&sw, mac).map(|l| l.1),
            Some("bound".into()),
            "{mac} still bound after release"
        );
    }
}

#[test]
fn leases_survive_sigkill_and_a_torn_log() {
    if !netns_or_skip() || !tools_or_skip(&["udhcpc"]) {
        return;
    }
    let n = Names::new("dur");
    let dir = TestDir::new();
    let m = "02:00:00:20:02:0a";
    let path = dir.write(
        "vswitch.toml",
        &dhcp_config(&n, 2, &[("c1", m, None), ("c2", "02:00:00:20:02:0b", None)]),
    );
    let (c1, c2) = (n.port("c1"), n.port("c2"));
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[c1.clone(), c2.clone()]);
    let t = Duration::from_secs(30);
    let o = lab.exec_timeout(
        &c1,
        &["udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-T", "2"],
        t,
    );
    assert!(o.status.success(), "udhcpc:\n{}", fmt_output(&o));
    let ip = addr(&lab, &c1).expect("an address");

    // kill -9: no chance to flush anything.
    signal(sw.pid(), Signal::KILL).expect("SIGKILL");
    drop(sw);
    // A torn append at the end of the log (a crash mid-write).
    let log = dir
        .path()
        .join("state/leases")
        .join(format!("{}ten", n.prefix()))
        .join("lan.log");
    let mut bytes = std::fs::read(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert!(!bytes.is_empty(), "the lease log is empty after an ACK");
    bytes.extend_from_slice(&[0xff, 0xd5, 0x4c, 0x52, 200, 0, 0, 0, 1, 2]);
    std::fs::write(&log, &bytes).expect("write torn log");

    // The VM NICs (persistent taps) outlive the switch; the new one
    // re-attaches them and `vslab up` finds the lab in place.
    let sw = Switch::start_named(&dir, &path, "vswitchd-restarted");
    let mut lab = lab;
    lab.up_again(&[c1.clone(), c2.clone()]);
    let (lip, state) = lease_state(&sw, m).expect("the lease was not restored");
    assert_eq!((format!("{lip}/24"), state.as_str()), (ip.clone(), "bound"));
    // The client renews (its address was reset with the NIC) and keeps it.
    let o = lab.exec_timeout(
        &c1,
        &["udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-T", "2"],
        t,
    );
    assert!(
        o.status.success(),
        "udhcpc after restart:\n{}",
        fmt_output(&o)
    );
    assert_eq!(
        addr(&lab, &c1),
        Some(ip),
        "a different address after restart"
    );
    assert!(
        sw.log().contains("damaged records") || sw.log().contains("truncated_tail=true"),
        "the torn record was not reported:\n{}",
        sw.log()
    );
}

#[test]
fn dns_resolves_port_names_within_the_tenant_only() {
    if !netns_or_skip() || !tools_or_skip(&["dig", "getent"]) {
        return;
    }
    let n = Names::new("dns");
    let dir = TestDir::new();
    let (a1, a2, b1) = (n.port("a1"), n.port("a2"), n.port("b1"));
    let text = format!(
        r#"
[[tenant]]
name = "{p}a"
  [[tenant.network]]
  name = "lan"
  vni = 7101
  cidr = "10.30.0.0/24"
  gateway = "10.30.0.1"
  [[tenant.port]]
  name = "{a1}"
  network = "lan"
  tap = "{ta1}"
  mac = "02:00:00:30:00:01"
  ip = "10.30.0.11"
  [[tenant.port]]
  name = "{a2}"
  network = "lan"
  tap = "{ta2}"
  mac = "02:00:00:30:00:02"
  ip = "10.30.0.12"
[[tenant]]
name = "{p}b"
  [[tenant.network]]
  name = "lan"
  vni = 7102
  cidr = "10.30.0.0/24"
  gateway = "10.30.0.1"
  [[tenant.port]]
  name = "{b1}"
  network = "lan"
  tap = "{tb1}"
  mac = "02:00:00:30:00:03"
  ip = "10.30.0.13"
"#,
        p = n.prefix(),
        ta1 = n.tap("a1"),
        ta2 = n.tap("a2"),
        tb1 = n.tap("b1"),
    );
    let path = dir.write("vswitch.toml", &text);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[a1.clone(), a2.clone(), b1.clone()]);
    let dig = |port: &str, args: &[&str]| {
        let mut v = vec!["dig", "+short", "+time=2", "+tries=1", "@10.30.0.1"];
        v.extend_from_slice(args);
        out(&lab.exec(port, &v)).trim().to_string()
    };
    assert_eq!(dig(&a1, &[&a2]), "10.30.0.12");
    assert_eq!(dig(&a1, &["-x", "10.30.0.12"]), format!("{a2}."));
    // b1 is another tenant: a1 cannot resolve it, and b1 cannot resolve a2.
    assert_eq!(dig(&a1, &[&b1]), "");
    assert_eq!(dig(&b1, &[&a2]), "");
    assert_eq!(dig(&b1, &[&b1]), "10.30.0.13");
    let status = out(&lab.exec(&a1, &["dig", "+time=2", "+tries=1", "@10.30.0.1", &b1]));
    assert!(status.contains("status: REFUSED"), "{status}");
    // The system resolver (glibc, via the namespace's resolv.conf).
    std::fs::write(
        format!("/etc/netns/{a1}/resolv.conf"),
        "nameserver 10.30.0.1\n",
    )
    .expect("resolv.conf");
    let o = lab.exec(&a1, &["getent", "hosts", &a2]);
    assert!(
        out(&o).contains("10.30.0.12"),
        "getent hosts {a2}: {}",
        fmt_output(&o)
    );
    let o = lab.exec(&a1, &["getent", "hosts", &b1]);
    assert!(
        !o.status.success(),
        "getent resolved another tenant's name: {}",
        fmt_output(&o)
    );
    drop(sw);
}

/// `python3 - IFNAME SRC_MAC CHADDR`: one DHCPDISCOVER from SRC_MAC whose
/// chaddr is CHADDR.
const FOREIGN_CHADDR_PY: &str = r#"
import socket, struct, sys
ifname, src, chaddr = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), bytes.fromhex(sys.argv[3].replace(":", ""))
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x1234, 0, 0x8000, bytes(4), bytes(4), bytes(4), bytes(4), chaddr + bytes(10), bytes(64), bytes(128))
bootp += b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\xff"
udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, bytes(4), b"\xff\xff\xff\xff")
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
for _ in range(5):
    s.send(b"\xff" * 6 + src + b"\x08\x00" + ip + udp)
"#;

#[test]
fn dhcp_refuses_a_foreign_chaddr() {
    if !netns_or_skip() || !tools_or_skip(&["python3"]) {
        return;
    }
    let n = Names::new("chd");
    let dir = TestDir::new();
    let m = "02:00:00:20:03:0a";
    let path = dir.write("vswitch.toml", &dhcp_config(&n, 3, &[("c1", m, None)]));
    let c1 = n.port("c1");
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, std::slice::from_ref(&c1));
    let script = dir.write("chaddr.py", FOREIGN_CHADDR_PY);
    let script = script.to_string_lossy().into_owned();
    let o = lab.exec(&c1, &["python3", &script, "eth0", m, "02:00:00:99:99:99"]);
    assert!(o.status.success(), "{}", fmt_output(&o));
    let counted = wait_until(Duration::from_secs(5), || {
        sw.port(&c1)
            .is_some_and(|p| p["drops"]["dhcp_chaddr_mismatch"].as_u64() == Some(5))
    });
    assert!(counted, "port drops: {:?}", sw.port(&c1));
    assert_eq!(stat(&sw, "chaddr_mismatch"), 5);
    assert_eq!(
        stat(&sw, "offer"),
        0,
        "a DISCOVER for a foreign chaddr got an OFFER"
    );
    assert!(leases(&sw).is_empty(), "{:?}", leases(&sw));
}
