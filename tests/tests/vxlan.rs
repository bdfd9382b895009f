//! Tenant networks across hosts over VXLAN: two host namespaces joined by a
//! veth underlay (198.19.0.0/16), one `vswitchd` per host started by
//! `vslab up`, VMs in their own namespaces; and a host whose switch is the
//! Linux kernel (bridge + vxlan device).

use std::time::Duration;

use rustix::process::Signal;
use serde_json::Value;
use vswitch_tests::*;

const UL_A: &str = "198.19.0.1";
const UL_B: &str = "198.19.0.2";

/// Names of one two-host lab.
struct Lab2 {
    ha: String,
    hb: String,
    ul: String,
}

impl Lab2 {
    fn new(n: &Names) -> Lab2 {
        let ha = n.port("ha");
        Lab2 {
            ul: format!("ul-{ha}"),
            ha,
            hb: n.port("hb"),
        }
    }

    fn hosts_toml(&self) -> String {
        format!(
            "[[host]]\nname = \"{}\"\nunderlay = \"{UL_A}/16\"\n\n[[host]]\nname = \"{}\"\nunderlay = \"{UL_B}/16\"\n\n",
            self.ha, self.hb
        )
    }
}

fn port_toml(name: &str, network: &str, host: &str, mac: &str, ip: Option<&str>) -> String {
    let mut s = format!(
        "  [[tenant.port]]\n  name = \"{name}\"\n  network = \"{network}\"\n  host = \"{host}\"\n  mac = \"{mac}\"\n"
    );
    if let Some(ip) = ip {
        s.push_str(&format!("  ip = \"{ip}\"\n"));
    }
    s.push('\n');
    s
}

fn peer<'a>(show: &'a Value, name: &str) -> &'a Value {
    show["underlay"]["peers"]
        .as_array()
        .and_then(|v| v.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no peer {name} in {show:#}"))
}

fn drops(v: &Value, reason: &str) -> u64 {
    v["drops"][reason].as_u64().unwrap_or(0)
}

/// Starts tcpdump on `eth0` of `ns`, writing to DIR/NAME.pcap; waits until
/// it listens.
fn capture(dir: &TestDir, ns: &str, label: &str, iface: &str) -> (Bg, std::path::PathBuf) {
    let file = dir.file(&format!("{label}.pcap"));
    let f = file.to_string_lossy().into_owned();
    let bg = Bg::spawn_in(
        dir,
        ns,
        label,
        &[
            "tcpdump",
            "--immediate-mode",
            "-n",
            "-U",
            "-Z",
            "root",
            "-s",
            "0",
            "-i",
            iface,
            "-w",
            &f,
        ],
    );
    let err = dir.file(&format!("{label}.err"));
    assert!(
        wait_until(Duration::from_secs(10), || fs_contains(
            &err,
            "listening on"
        )),
        "tcpdump in {ns} did not start"
    );
    (bg, file)
}

fn fs_contains(p: &std::path::Path, needle: &str) -> bool {
    std::fs::read_to_string(p).is_ok_and(|t| t.contains(needle))
}

fn stop_capture(mut bg: Bg, file: &std::path::Path) -> Vec<Vec<u8>> {
    bg.stop(Signal::INT, Duration::from_secs(5));
    pcap::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// VMs of one network on two hosts talk (ping, TCP), each gets DHCP from
/// its own host's switch, a second tenant with the same subnet, IPs and
/// MACs on the same hosts never sees the first's traffic, `vswitchctl`
/// shows remote FDB entries and per-peer counters, and `vslab down`
/// removes everything.
#[test]
fn vms_on_two_hosts_talk_isolated_by_tenant() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "iperf3", "tcpdump", "udhcpc"]) {
        return;
    }
    let n = Names::new("vxa");
    let dir = TestDir::new();
    let l = Lab2::new(&n);
    let (w1, w2, g1, g2, d1, d2) = (
        n.port("w1"),
        n.port("w2"),
        n.port("g1"),
        n.port("g2"),
        n.port("d1"),
        n.port("d2"),
    );
    let mut t = l.hosts_toml();
    t.push_str("[[tenant]]\nname = \"acme\"\n\n");
    t.push_str("  [[tenant.network]]\n  name = \"web\"\n  vni = 1001\n  cidr = \"10.0.1.0/24\"\n  gateway = \"10.0.1.1\"\n\n");
    t.push_str("  [[tenant.network]]\n  name = \"dyn\"\n  vni = 1002\n  cidr = \"10.0.2.0/24\"\n  gateway = \"10.0.2.1\"\n  [tenant.network.dhcp]\n  pool = [\"10.0.2.100-10.0.2.199\"]\n\n");
    t += &port_toml(&w1, "web", &l.ha, "02:00:00:00:01:01", Some("10.0.1.11"));
    t += &port_toml(&w2, "web", &l.hb, "02:00:00:00:01:02", Some("10.0.1.12"));
    t += &port_toml(&d1, "dyn", &l.ha, "02:00:00:00:02:01", None);
    t += &port_toml(&d2, "dyn", &l.hb, "02:00:00:00:02:02", None);
    t.push_str("[[tenant]]\nname = \"globex\"\n\n");
    t.push_str("  [[tenant.network]]\n  name = \"web\"\n  vni = 2001\n  cidr = \"10.0.1.0/24\"\n  gateway = \"10.0.1.1\"\n\n");
    t += &port_toml(&g1, "web", &l.ha, "02:00:00:00:01:01", Some("10.0.1.11"));
    t += &port_toml(&g2, "web", &l.hb, "02:00:00:00:01:02", Some("10.0.1.12"));
    let path = dir.write("vswitch.toml", &t);
    let all_ns = [&l.ha, &l.hb, &l.ul, &w1, &w2, &g1, &g2, &d1, &d2].map(|s| s.to_string());
    let mut lab = MultiLab::up(&dir, &path, None, &all_ns);

    // Same subnet, IPs and MACs in both tenants: each pings its own peer
    // across the underlay.
    lab.assert_ping(&w1, "10.0.1.12", 3);
    lab.assert_ping(&g1, "10.0.1.12", 3);
    // The VM's MTU leaves room for VXLAN.
    let link = lab.exec(&w1, &["ip", "-o", "link", "show", "eth0"]);
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("mtu 1450"),
        "{}",
        fmt_output(&link)
    );

    // Underlay capture on host a for w1's frames: decoded by tshark as
    // VXLAN with acme's VNI, the outer underlay addresses and the inner
    // ping; globex's identical ping (same MACs and IPs) is not in it.
    let ufile = dir.file("underlay.pcapng");
    let mut ucap = std::process::Command::new(&bins().vswitchctl);
    ucap.arg("--socket").arg(lab.socket(&l.ha)).args([
        "capture", "--stage", "underlay", "--port", &w1, "--filter", "icmp", "-c", "4", "-w",
    ]);
    ucap.arg(&ufile);
    let mut uchild = ucap.spawn().expect("vswitchctl capture --stage underlay");
    std::thread::sleep(Duration::from_millis(300));
    lab.assert_ping(&g1, "10.0.1.12", 2);
    lab.assert_ping(&w1, "10.0.1.12", 2);
    assert!(wait_until(Duration::from_secs(10), || matches!(
        uchild.try_wait(),
        Ok(Some(_))
    )));
    let mut c = std::process::Command::new("tshark");
    c.arg("-n").arg("-r").arg(&ufile).args([
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-e",
        "vxlan.vni",
        "-e",
        "ip.src",
        "-e",
        "ip.dst",
        "-e",
        "icmp.type",
        "-e",
        "frame.comment",
    ]);
    let o = run_timeout(&mut c, Duration::from_secs(60));
    assert!(o.status.success(), "tshark: {}", fmt_output(&o));
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let sent = format!("1001|{UL_A},10.0.1.11|{UL_B},10.0.1.12|8|stage=tx");
    let got = format!("1001|{UL_B},10.0.1.12|{UL_A},10.0.1.11|0|stage=rx");
    assert_eq!(
        lines.iter().filter(|l| **l == sent).count(),
        2,
        "{lines:#?}"
    );
    assert_eq!(lines.iter().filter(|l| **l == got).count(), 2, "{lines:#?}");

    // Isolation: acme's patterned traffic never reaches globex's VMs.
    let (cap_g2, file_g2) = capture(&dir, &g2, "g2", "eth0");
    let (cap_w2, file_w2) = capture(&dir, &w2, "w2", "eth0");
    let out = lab.exec(
        &w1,
        &[
            "ping",
            "-n",
            "-c",
            "5",
            "-i",
            "0.2",
            "-p",
            "a1a1a1a1",
            "10.0.1.12",
        ],
    );
    assert!(out.status.success(), "{}", fmt_output(&out));
    let out = lab.exec(
        &w1,
        &[
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-p",
            "a1a1a1a1",
            "-b",
            "10.0.1.255",
        ],
    );
    let _ = out; // broadcast ping: no reply expected, only the flood matters
    let g2_frames = stop_capture(cap_g2, &file_g2);
    let w2_frames = stop_capture(cap_w2, &file_w2);
    let pat = [0xa1u8; 8];
    assert!(
        w2_frames.iter().filter(|f| contains(f, &pat)).count() >= 5,
        "positive control: w2 saw {} frames, none with acme's pattern",
        w2_frames.len()
    );
    assert!(
        !g2_frames.iter().any(|f| contains(f, &pat)),
        "globex's g2 saw acme's traffic"
    );

    // TCP across hosts.
    let mut srv = Bg::spawn_in(&dir, &w2, "iperf-s", &["iperf3", "-s", "-1", "-p", "5201"]);
    assert!(wait_until(Duration::from_secs(10), || {
        lab.exec(&w2, &["ss", "-ltn", "sport = :5201"])
            .stdout
            .windows(4)
            .any(|w| w == b"5201")
    }));
    let out = lab.exec(
        &w1,
        &["iperf3", "-c", "10.0.1.12", "-p", "5201", "-t", "2", "-J"],
    );
    assert!(out.status.success(), "iperf3: {}", fmt_output(&out));
    let j: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let bytes = j["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 10_000_000, "iperf3 moved only {bytes} bytes");
    srv.wait(Duration::from_secs(10));

    // DHCP: each VM's lease comes from its own host's switch, with the
    // overlay MTU; the two then talk across hosts on leased addresses.
    for (vm, host) in [(&d1, &l.ha), (&d2, &l.hb)] {
        let out = lab.exec(
            vm,
            &[
                "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-O", "mtu",
            ],
        );
        assert!(out.status.success(), "udhcpc in {vm}: {}", fmt_output(&out));
        let leases = lab.ctl(host, &["leases"]);
        let text = leases.to_string();
        assert!(
            text.contains("02:00:00:00:02:0"),
            "no lease on {host}: {leases:#}"
        );
    }
    let ip_of = |vm: &str| -> String {
        let out = lab.exec(vm, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("{vm} has no address: {text}"))
            .to_string()
    };
    let (ip1, ip2) = (ip_of(&d1), ip_of(&d2));
    assert_ne!(ip1, ip2, "both hosts handed out the same address");
    let lease_a = lab.ctl(&l.ha, &["leases"]).to_string();
    let lease_b = lab.ctl(&l.hb, &["leases"]).to_string();
    assert!(
        lease_a.contains(&ip1) && !lease_a.contains(&ip2),
        "host a: {lease_a}"
    );
    assert!(
        lease_b.contains(&ip2) && !lease_b.contains(&ip1),
        "host b: {lease_b}"
    );
    lab.assert_ping(&d1, &ip2, 3);

    // vswitchctl: remote entries point at the VTEP; per-peer counters.
    let fdb = lab.ctl(&l.ha, &["fdb", "--network", "acme/web"]);
    let entries = fdb["networks"][0]["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let remote = entries
        .iter()
        .find(|e| e["mac"] == "02:00:00:00:01:02")
        .unwrap_or_else(|| panic!("no entry for w2's MAC: {fdb:#}"));
    assert_eq!(remote["vtep"], UL_B, "{fdb:#}");
    assert_eq!(remote["port"], format!("vtep:{}", l.hb), "{fdb:#}");
    let show = lab.ctl(&l.ha, &["show"]);
    let p = peer(&show, &l.hb);
    assert!(p["tx_packets"].as_u64().unwrap_or(0) > 1000, "{p:#}");
    assert!(p["rx_packets"].as_u64().unwrap_or(0) > 100, "{p:#}");
    assert_eq!(show["underlay"]["overlay_mtu"], 1450);

    // vslab down stops both switches and removes every namespace.
    let pids = [lab.pid(&l.ha), lab.pid(&l.hb)];
    let out = lab.down();
    assert!(out.status.success(), "{}", fmt_output(&out));
    for ns in &all_ns {
        assert!(!netns_exists(ns), "namespace {ns} left behind");
    }
    for pid in pids.into_iter().flatten() {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "vswitchd {pid} still running"
        );
    }
}

/// Host B's switch is the Linux kernel (bridge + vxlan device); host A runs
/// vswitchd. Ping and TCP both ways, and tshark on the underlay decodes the
/// packets as VXLAN with the configured VNI and the VMs' addresses inside.
#[test]
fn interoperates_with_kernel_vxlan() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "iperf3", "tshark", "tcpdump"]) {
        return;
    }
    let n = Names::new("vxk");
    let dir = TestDir::new();
    let l = Lab2::new(&n);
    let (w1, k2) = (n.port("w1"), n.port("k2"));
    let mut t = l.hosts_toml();
    t.push_str("[[tenant]]\nname = \"acme\"\n\n  [[tenant.network]]\n  name = \"web\"\n  vni = 4242\n  cidr = \"10.0.1.0/24\"\n  gateway = \"10.0.1.1\"\n\n");
    t += &port_toml(&w1, "web", &l.ha, "02:00:00:00:01:01", Some("10.0.1.11"));
    t += &port_toml(&k2, "web", &l.hb, "02:00:00:00:01:02", Some("10.0.1.12"));
    let path = dir.write("vswitch.toml", &t);
    let all_ns = [&l.ha, &l.hb, &l.ul, &w1, &k2, &n.port("k3")].map(|s| s.to_string());
    // vslab brings up host A only; host B is built here by hand.
    let lab = MultiLab::up(&dir, &path, Some(&[l.ha.as_str()]), &all_ns);
    let hb = &l.hb;
    let sh = |args: &[&str]| {
        let out = run_timeout(
            std::process::Command::new("ip").args(args),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "ip {args:?}: {}", fmt_output(&out));
    };
    sh(&["netns", "add", hb]);
    sh(&["netns", "add", &k2]);
    let outer = format!("ul-{hb}");
    sh(&[
        "-n", &l.ul, "link", "add", &outer, "type", "veth", "peer", "name", "ul0", "netns", hb,
    ]);
    sh(&["-n", &l.ul, "link", "set", &outer, "master", "br0", "up"]);
    sh(&["-n", hb, "addr", "add", &format!("{UL_B}/16"), "dev", "ul0"]);
    sh(&["-n", hb, "link", "set", "ul0", "up"]);
    sh(&["-n", hb, "link", "set", "lo", "up"]);
    sh(&[
        "-n",
        hb,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "4242",
        "local",
        UL_B,
        "dstport",
        "4789",
        "nolearning",
    ]);
    sh(&["-n", hb, "link", "add", "br0", "type", "bridge"]);
    sh(&["-n", hb, "link", "set", "vx0", "master", "br0", "up"]);
    sh(&["-n", hb, "link", "set", "br0", "up"]);
    // Head-end replication list and the remote VM, as an operator of a
    // kernel VTEP writes them.
    let bridge = |args: &[&str]| {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", hb, "bridge"]).args(args);
        let out = run_timeout(&mut c, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "bridge {args:?}: {}",
            fmt_output(&out)
        );
    };
    bridge(&[
        "fdb",
        "append",
        "00:00:00:00:00:00",
        "dev",
        "vx0",
        "dst",
        UL_A,
    ]);
    bridge(&[
        "fdb",
        "append",
        "02:00:00:00:01:01",
        "dev",
        "vx0",
        "dst",
        UL_A,
    ]);
    sh(&[
        "-n", hb, "link", "add", "k2", "type", "veth", "peer", "name", "eth0", "netns", &k2,
    ]);
    sh(&["-n", hb, "link", "set", "k2", "master", "br0", "up"]);
    sh(&[
        "-n",
        &k2,
        "link",
        "set",
        "eth0",
        "address",
        "02:00:00:00:01:02",
        "mtu",
        "1450",
        "up",
    ]);
    sh(&["-n", &k2, "addr", "add", "10.0.1.12/24", "dev", "eth0"]);
    sh(&["-n", &k2, "link", "set", "lo", "up"]);

    let (tshark_cap, file) = capture(&dir, hb, "underlay", "ul0");
    // w1 resolves k2 (a directory address on host B): vswitchd answers the
    // ARP itself, so no ARP from w1 crosses the underlay (checked below).
    let o = lab.exec(&w1, &["ip", "neigh", "flush", "dev", "eth0"]);
    assert!(o.status.success(), "{}", fmt_output(&o));
    lab.assert_ping(&w1, "10.0.1.12", 3);
    // Positive control: an address nobody knows is asked across.
    let _ = lab.exec(&w1, &["ping", "-n", "-c", "1", "-W", "1", "10.0.1.77"]);
    lab.assert_ping(&k2, "10.0.1.11", 3);
    // A VM behind the kernel host that no config knows: vswitchd learns its
    // MAC on host B's VTEP (a dynamic entry, under the same cap as local
    // learning) and traffic flows both ways.
    let k3 = n.port("k3");
    sh(&["netns", "add", &k3]);
    sh(&[
        "-n", hb, "link", "add", "k3", "type", "veth", "peer", "name", "eth0", "netns", &k3,
    ]);
    sh(&["-n", hb, "link", "set", "k3", "master", "br0", "up"]);
    sh(&[
        "-n",
        &k3,
        "link",
        "set",
        "eth0",
        "address",
        "02:00:00:00:01:33",
        "mtu",
        "1450",
        "up",
    ]);
    sh(&["-n", &k3, "addr", "add", "10.0.1.33/24", "dev", "eth0"]);
    lab.assert_ping(&k3, "10.0.1.11", 3);
    lab.assert_ping(&w1, "10.0.1.33", 2);
    let fdb = lab.ctl(&l.ha, &["fdb", "--network", "acme/web"]);
    let learned = fdb["networks"][0]["entries"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["mac"] == "02:00:00:00:01:33").cloned())
        .unwrap_or_else(|| panic!("k3's MAC not learned: {fdb:#}"));
    assert_eq!(learned["kind"], "dynamic", "{learned:#}");
    assert_eq!(learned["vtep"], UL_B, "{learned:#}");
    // The capture stops before the bulk TCP below: a second of iperf3 is a
    // gigabyte of pcap, which tshark on a loaded CI machine cannot read in time.
    let _ = stop_capture(tshark_cap, &file);
    // TCP both ways.
    for (server, client, ip) in [(&k2, &w1, "10.0.1.12"), (&w1, &k2, "10.0.1.11")] {
        let mut srv = Bg::spawn_in(
            &dir,
            server,
            &format!("iperf-{server}"),
            &["iperf3", "-s", "-1", "-p", "5202"],
        );
        assert!(wait_until(Duration::from_secs(10), || {
            lab.exec(server, &["ss", "-ltn", "sport = :5202"])
                .stdout
                .windows(4)
                .any(|w| w == b"5202")
        }));
        let out = lab.exec(client, &["iperf3", "-c", ip, "-p", "5202", "-t", "1", "-J"]);
        assert!(
            out.status.success(),
            "iperf3 {client} -> {ip}: {}",
            fmt_output(&out)
        );
        let j: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
        let bytes = j["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 1_000_000, "{client} -> {ip}: only {bytes} bytes");
        srv.wait(Duration::from_secs(10));
    }
    // tshark decodes UDP 4789 as VXLAN by default.
    let out = run_timeout(
        std::process::Command::new("tshark").args([
            "-n",
            "-r",
            &file.to_string_lossy(),
            "-Y",
            "vxlan && icmp",
            "-T",
            "fields",
            "-e",
            "vxlan.vni",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
        ]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tshark: {}", fmt_output(&out));
    let from_us = format!("4242\t{UL_A},10.0.1.11\t{UL_B},10.0.1.12");
    let from_kernel = format!("4242\t{UL_B},10.0.1.12\t{UL_A},10.0.1.11");
    assert!(
        text.contains(&from_us),
        "no VXLAN from vswitchd decoded:\n{text}"
    );
    assert!(
        text.contains(&from_kernel),
        "no VXLAN from the kernel decoded:\n{text}"
    );
    let out = run_timeout(
        std::process::Command::new("tshark").args([
            "-n",
            "-r",
            &file.to_string_lossy(),
            "-Y",
            "vxlan && arp.src.proto_ipv4 == 10.0.1.11 && arp.opcode == 1",
        ]),
        Duration::from_secs(60),
    );
    let arps = String::from_utf8_lossy(&out.stdout).into_owned();
    let out = run_timeout(
        std::process::Command::new("tshark").args([
            "-n",
            "-r",
            &file.to_string_lossy(),
            "-Y",
            "vxlan && arp.src.proto_ipv4 == 10.0.1.11 && arp.opcode == 1",
            "-T",
            "fields",
            "-e",
            "arp.dst.proto_ipv4",
        ]),
        Duration::from_secs(60),
    );
    let asked = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        asked.lines().any(|l| l == "10.0.1.77"),
        "positive control: {arps}"
    );
    assert!(
        !asked.lines().any(|l| l == "10.0.1.12"),
        "w1's ARP request for a known address crossed the underlay:\n{arps}"
    );
    // Our UDP source ports carry flow entropy (49152-65535).
    let out = run_timeout(
        std::process::Command::new("tshark").args([
            "-n",
            "-r",
            &file.to_string_lossy(),
            "-Y",
            &format!("vxlan && ip.src == {UL_A}"),
            "-T",
            "fields",
            "-e",
            "udp.srcport",
        ]),
        Duration::from_secs(60),
    );
    let ports: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(
        !ports.is_empty() && ports.iter().all(|p| (49152..=65535).contains(p)),
        "{ports:?}"
    );
}

/// VXLAN from a namespace that is not a peer reaches no VM; VXLAN from a
/// peer with a VNI no network uses, a VNI the peer does not host, or an
/// inner source MAC that belongs to a local VM is dropped and counted.
#[test]
fn underlay_injection_is_dropped_and_counted() {
    if !netns_or_skip() || !tools_or_skip(&["tcpdump", "python3"]) {
        return;
    }
    let n = Names::new("vxi");
    let dir = TestDir::new();
    let l = Lab2::new(&n);
    let (w1, w2, s1, x) = (n.port("w1"), n.port("w2"), n.port("s1"), n.port("x"));
    let mut t = l.hosts_toml();
    t.push_str("[[tenant]]\nname = \"acme\"\n\n  [[tenant.network]]\n  name = \"web\"\n  vni = 1001\n  cidr = \"10.0.1.0/24\"\n\n  [[tenant.network]]\n  name = \"solo\"\n  vni = 1003\n  cidr = \"10.0.3.0/24\"\n\n");
    t += &port_toml(&w1, "web", &l.ha, "02:00:00:00:01:01", Some("10.0.1.11"));
    t += &port_toml(&w2, "web", &l.hb, "02:00:00:00:01:02", Some("10.0.1.12"));
    t += &port_toml(&s1, "solo", &l.ha, "02:00:00:00:03:01", Some("10.0.3.11"));
    let path = dir.write("vswitch.toml", &t);
    let all_ns = [&l.ha, &l.hb, &l.ul, &w1, &w2, &s1, &x].map(|s| s.to_string());
    let lab = MultiLab::up(&dir, &path, None, &all_ns);
    lab.assert_ping(&w1, "10.0.1.12", 2);

    // An attacker on the underlay.
    let sh = |args: &[&str]| {
        let out = run_timeout(
            std::process::Command::new("ip").args(args),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "ip {args:?}: {}", fmt_output(&out));
    };
    sh(&["netns", "add", &x]);
    let outer = format!("ul-{x}");
    sh(&[
        "-n", &l.ul, "link", "add", &outer, "type", "veth", "peer", "name", "ul0", "netns", &x,
    ]);
    sh(&["-n", &l.ul, "link", "set", &outer, "master", "br0", "up"]);
    sh(&["-n", &x, "addr", "add", "198.19.0.9/16", "dev", "ul0"]);
    sh(&["-n", &x, "link", "set", "ul0", "up"]);

    let (cap_w1, f_w1) = capture(&dir, &w1, "w1", "eth0");
    let (cap_s1, f_s1) = capture(&dir, &s1, "s1", "eth0");
    // VXLAN packets: inner frames to w1's MAC and broadcast, with a marker.
    let inject = |ns: &str, src_ip: &str, vni: u32, inner_src: &str, count: u32| {
        let script = format!(
            r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{src_ip}", 0))
def mac(m): return bytes(int(x, 16) for x in m.split(":"))
for i in range({count}):
    for dst in ("02:00:00:00:01:01", "ff:ff:ff:ff:ff:ff", "02:00:00:00:03:01"):
        inner = mac(dst) + mac("{inner_src}") + b"\x08\x00" + b"\x45" + b"\x00" * 19 + b"INJECTED" * 8
        hdr = struct.pack("!BBBBI", 0x08, 0, 0, 0, {vni} << 8)
        s.sendto(hdr + inner, ("{UL_A}", 4789))
"#
        );
        let out = lab.exec(ns, &["python3", "-c", &script]);
        assert!(
            out.status.success(),
            "inject from {ns}: {}",
            fmt_output(&out)
        );
    };
    let before = lab.ctl(&l.ha, &["show"]);
    let not_peer0 = before["underlay"]["rx_not_peer"].as_u64().unwrap_or(0);
    // From a non-peer, with the right VNI.
    inject(&x, "198.19.0.9", 1001, "02:00:00:00:0e:0e", 50);
    // From the real peer: unknown VNI, a VNI it does not host, and a local
    // VM's MAC as inner source.
    inject(&l.hb, UL_B, 999_999, "02:00:00:00:0e:0e", 10);
    inject(&l.hb, UL_B, 1003, "02:00:00:00:0e:0e", 10);
    inject(&l.hb, UL_B, 1001, "02:00:00:00:01:01", 10);
    let after = lab.ctl(&l.ha, &["show"]);
    let frames_w1 = stop_capture(cap_w1, &f_w1);
    let frames_s1 = stop_capture(cap_s1, &f_s1);
    assert!(
        !frames_w1
            .iter()
            .chain(&frames_s1)
            .any(|f| contains(f, b"INJECTED")),
        "an injected frame reached a VM"
    );
    let not_peer = after["underlay"]["rx_not_peer"].as_u64().unwrap_or(0) - not_peer0;
    assert_eq!(not_peer, 150, "{:#}", after["underlay"]);
    let p = peer(&after, &l.hb);
    let p0 = peer(&before, &l.hb);
    let d = |r: &str| drops(p, r) - drops(p0, r);
    assert_eq!(d("underlay_unknown_vni"), 30, "{p:#}");
    assert_eq!(d("underlay_not_member"), 30, "{p:#}");
    assert_eq!(d("src_mac_hijack"), 30, "{p:#}");
    // The real VMs still talk.
    lab.assert_ping(&w1, "10.0.1.12", 2);
}

/// A DF packet larger than the overlay MTU gets "fragmentation needed" with
/// next-hop MTU 1450; at the limit it passes, above it fails cleanly.
#[test]
fn overlay_mtu_and_fragmentation_needed() {
    if !netns_or_skip() || !tools_or_skip(&["ping"]) {
        return;
    }
    let n = Names::new("vxm");
    let dir = TestDir::new();
    let l = Lab2::new(&n);
    let (w1, w2) = (n.port("w1"), n.port("w2"));
    let mut t = l.hosts_toml();
    t.push_str("[[tenant]]\nname = \"acme\"\n\n  [[tenant.network]]\n  name = \"web\"\n  vni = 1001\n  cidr = \"10.0.1.0/24\"\n  gateway = \"10.0.1.1\"\n\n");
    t += &port_toml(&w1, "web", &l.ha, "02:00:00:00:01:01", Some("10.0.1.11"));
    t += &port_toml(&w2, "web", &l.hb, "02:00:00:00:01:02", Some("10.0.1.12"));
    let path = dir.write("vswitch.toml", &t);
    let all_ns = [&l.ha, &l.hb, &l.ul, &w1, &w2].map(|s| s.to_string());
    let lab = MultiLab::up(&dir, &path, None, &all_ns);
    let ping = |size: &str| {
        lab.exec(
            &w1,
            &[
                "ping",
                "-n",
                "-M",
                "do",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "2",
                "-s",
                size,
                "10.0.1.12",
            ],
        )
    };
    // 1422 + 28 = 1450: fits.
    let out = ping("1422");
    assert!(out.status.success(), "{}", fmt_output(&out));
    // 1423 does not fit the VM's own MTU (1450): refused locally.
    let out = ping("1423");
    assert!(!out.status.success());
    assert!(
        fmt_output(&out).to_lowercase().contains("message too long"),
        "{}",
        fmt_output(&out)
    );
    // A VM whose MTU is wrong (1500): the switch answers with frag-needed.
    let out = lab.exec(&w1, &["ip", "link", "set", "eth0", "mtu", "1500"]);
    assert!(out.status.success());
    let out = ping("1472");
    assert!(
        !out.status.success(),
        "a 1500-byte packet crossed a 1450 overlay"
    );
    let text = fmt_output(&out);
    assert!(
        text.contains("mtu = 1450") || text.contains("mtu=1450"),
        "{text}"
    );
    let route = lab.exec(&w1, &["ip", "route", "get", "10.0.1.12"]);
    assert!(
        String::from_utf8_lossy(&route.stdout).contains("mtu 1450"),
        "{}",
        fmt_output(&route)
    );
    let show = lab.ctl(&l.ha, &["show"]);
    let port = find_port(&show, &w1).expect("w1 in show");
    assert!(drops(&port, "overlay_mtu_exceeded") >= 1, "{port:#}");
    // With the learned path MTU, 1422-byte payloads pass again.
    let out = ping("1422");
    assert!(out.status.success(), "{}", fmt_output(&out));
}
