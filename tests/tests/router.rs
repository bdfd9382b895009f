//! The distributed router: a tenant's VMs in different subnets reach each
//! other through their gateways, on one host and across hosts (routed where
//! the packet enters, then VXLAN); TTL and unknown destinations get ICMP
//! errors from the gateway; another tenant's addresses are never reached.

use std::time::Duration;

use serde_json::Value;
use vswitch_tests::*;

fn port(name: &str, net: &str, host: Option<&str>, mac: &str, ip: Option<&str>) -> String {
    let mut s = format!(
        "  [[tenant.port]]\n  name = \"{name}\"\n  network = \"{net}\"\n  mac = \"{mac}\"\n"
    );
    if let Some(h) = host {
        s += &format!("  host = \"{h}\"\n");
    }
    if let Some(ip) = ip {
        s += &format!("  ip = \"{ip}\"\n");
    }
    s + "\n"
}

fn net(name: &str, vni: u32, cidr: &str, gw: &str) -> String {
    format!("  [[tenant.network]]\n  name = \"{name}\"\n  vni = {vni}\n  cidr = \"{cidr}\"\n  gateway = \"{gw}\"\n\n")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn drops(show: &Value, port: &str, reason: &str) -> u64 {
    find_port(show, port)
        .and_then(|p| p["drops"][reason].as_u64())
        .unwrap_or(0)
}

fn iperf(
    lab_exec: impl Fn(&str, &[&str]) -> std::process::Output,
    dir: &TestDir,
    server: &str,
    client: &str,
    ip: &str,
) {
    let mut srv = Bg::spawn_in(
        dir,
        server,
        &format!("iperf-{server}"),
        &["iperf3", "-s", "-1", "-p", "5203"],
    );
    assert!(wait_until(Duration::from_secs(10), || {
        lab_exec(server, &["ss", "-ltn", "sport = :5203"])
            .stdout
            .windows(4)
            .any(|w| w == b"5203")
    }));
    let out = lab_exec(client, &["iperf3", "-c", ip, "-p", "5203", "-t", "2", "-J"]);
    assert!(
        out.status.success(),
        "iperf3 {client} -> {ip}: {}",
        fmt_output(&out)
    );
    let j: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let bytes = j["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        bytes > 10_000_000,
        "{client} -> {ip}: only {bytes} bytes routed"
    );
    srv.wait(Duration::from_secs(10));
}

#[test]
fn routes_between_a_tenants_subnets_on_one_host() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "iperf3"]) {
        return;
    }
    let n = Names::new("rt1");
    let dir = TestDir::new();
    let (w1, d1, g1, gd) = (n.port("w1"), n.port("d1"), n.port("g1"), n.port("gd"));
    let mut t = String::from("[[tenant]]\nname = \"acme\"\n\n");
    t += &net("web", 1001, "10.0.1.0/24", "10.0.1.1");
    t += &net("db", 1002, "10.0.2.0/24", "10.0.2.1");
    t += &port(&w1, "web", None, "02:00:00:00:01:0b", Some("10.0.1.11"));
    t += &port(&d1, "db", None, "02:00:00:00:02:15", Some("10.0.2.21"));
    t += "[[tenant]]\nname = \"globex\"\n\n";
    t += &net("web", 2001, "10.0.1.0/24", "10.0.1.1");
    t += &net("db", 2002, "10.0.2.0/24", "10.0.2.1");
    t += &port(&g1, "web", None, "02:00:00:00:01:0b", Some("10.0.1.11"));
    t += &port(&gd, "db", None, "02:00:00:00:02:16", Some("10.0.2.22"));
    let path = dir.write("vswitch.toml", &t);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[w1.clone(), d1.clone(), g1.clone(), gd.clone()]);

    // Across subnets, through the gateway: one hop (TTL 64 - 1).
    let o = lab.ping(&w1, "10.0.2.21", 3);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ttl=63"), "not routed once: {}", text(&o));
    let o = lab.ping(&d1, "10.0.1.11", 2);
    assert!(o.status.success(), "{}", text(&o));
    // The gateways answer ping, both legs.
    lab.assert_ping(&w1, "10.0.1.1", 2);
    lab.assert_ping(&w1, "10.0.2.1", 2);
    // TTL 1: time exceeded from the gateway.
    let o = lab.exec(
        &w1,
        &["ping", "-n", "-c", "1", "-W", "2", "-t", "1", "10.0.2.21"],
    );
    assert!(
        text(&o).contains("From 10.0.1.1")
            && text(&o).to_lowercase().contains("time to live exceeded"),
        "{}",
        text(&o)
    );
    // No network of the tenant holds it: network unreachable.
    let o = lab.exec(&w1, &["ping", "-n", "-c", "1", "-W", "2", "10.9.9.9"]);
    assert!(
        text(&o).contains("From 10.0.1.1") && text(&o).contains("Destination Net Unreachable"),
        "{}",
        text(&o)
    );
    // Another tenant's VM in an address range acme also has: never reached
    // (acme's router asks acme's db network, where nobody answers).
    let o = lab.ping(&w1, "10.0.2.22", 2);
    assert!(!o.status.success(), "acme reached globex: {}", text(&o));
    let show = sw.show();
    assert!(drops(&show, &w1, "route_arp_pending") >= 1, "{show:#}");
    assert!(
        drops(&show, &w1, "ttl_exceeded") + drops(&show, &w1, "no_route") == 0,
        "ICMP errors were sent, not drops: {show:#}"
    );
    // globex routes its own.
    let o = lab.ping(&g1, "10.0.2.22", 2);
    assert!(o.status.success(), "{}", text(&o));

    // TCP across subnets (super-frames routed whole).
    iperf(|ns, a| lab.exec(ns, a), &dir, &d1, &w1, "10.0.2.21");
}

#[test]
fn routes_across_hosts_where_the_packet_enters() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "iperf3", "udhcpc"]) {
        return;
    }
    let n = Names::new("rt2");
    let dir = TestDir::new();
    let (ha, hb) = (n.port("ha"), n.port("hb"));
    let ul = format!("ul-{ha}");
    let (w1, d2, d3) = (n.port("w1"), n.port("d2"), n.port("d3"));
    let mut t = format!(
        "[[host]]\nname = \"{ha}\"\nunderlay = \"198.19.0.1/16\"\n\n[[host]]\nname = \"{hb}\"\nunderlay = \"198.19.0.2/16\"\n\n"
    );
    t += "[[tenant]]\nname = \"acme\"\n\n";
    t += &net("web", 1001, "10.0.1.0/24", "10.0.1.1");
    t += &net("db", 1002, "10.0.2.0/24", "10.0.2.1");
    t += "  [tenant.network.dhcp]\n  pool = [\"10.0.2.100-10.0.2.199\"]\n\n";
    t += &port(
        &w1,
        "web",
        Some(&ha),
        "02:00:00:00:01:0b",
        Some("10.0.1.11"),
    );
    t += &port(&d2, "db", Some(&hb), "02:00:00:00:02:16", Some("10.0.2.22"));
    t += &port(&d3, "db", Some(&hb), "02:00:00:00:02:17", None);
    let path = dir.write("vswitch.toml", &t);
    let all = [&ha, &hb, &ul, &w1, &d2, &d3].map(|s| s.to_string());
    let lab = MultiLab::up(&dir, &path, None, &all);
    // d2 is on a DHCP network: its reservation, then a default route.
    for vm in [&d2, &d3] {
        let o = lab.exec(
            vm,
            &["udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-T", "1"],
        );
        assert!(o.status.success(), "udhcpc in {vm}: {}", fmt_output(&o));
    }
    let o = lab.exec(
        &w1,
        &["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.22"],
    );
    assert!(
        o.status.success() && text(&o).contains("ttl=63"),
        "{}",
        text(&o)
    );
    // The reply was routed on host b (where it entered), not hairpinned:
    // host b's router counts nothing odd, host a sent VXLAN with db's VNI.
    let fdb = lab.ctl(&ha, &["fdb", "--network", "acme/db"]);
    assert!(fdb.to_string().contains("02:00:00:00:02:16"), "{fdb:#}");
    iperf(|ns, a| lab.exec(ns, a), &dir, &d2, &w1, "10.0.2.22");

    // d3's address is a pool lease of host b, unknown to host a: host a's
    // router asks over the overlay and learns the answer.
    let out = lab.exec(&d3, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    let ip3 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .expect("d3 has a lease");
    let reached = wait_until(Duration::from_secs(10), || {
        lab.exec(&w1, &["ping", "-n", "-c", "1", "-W", "1", &ip3])
            .status
            .success()
    });
    assert!(
        reached,
        "w1 never reached d3's leased address {ip3} across hosts"
    );
}
