//! The uplink and NAT, with real peers: an external namespace (the lab's
//! external network, named after the uplink) runs HTTP, UDP and TCP echo
//! servers; VMs browse out through SNAT and their floating IP; the
//! external host reaches VMs through a floating IP and a port forward; a VM
//! reaches its own floating IP (hairpin); an ICMP port unreachable comes
//! back translated to the VM; two tenants with the same subnet browse out at
//! once; a tiny SNAT port range exhausts cleanly.

use std::time::Duration;

use serde_json::Value;
use vswitch_tests::*;

/// Opens N TCP connections (each from its own source port), then checks
/// that each one that connected still echoes; prints one word per
/// connection: "ok", "noconnect" or "broken".
const MANY_CONNECTIONS: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for i in range(n):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((host, port)); conns.append(s)
    except OSError:
        conns.append(None)
out = []
for s in conns:
    if s is None:
        out.append("noconnect"); continue
    try:
        s.sendall(b"ping"); out.append("ok" if s.recv(16) == b"ping" else "broken")
    except OSError:
        out.append("broken")
print(" ".join(out))
"#;

fn port(name: &str, net: &str, mac: &str, ip: &str) -> String {
    format!("  [[tenant.port]]\n  name = \"{name}\"\n  network = \"{net}\"\n  mac = \"{mac}\"\n  ip = \"{ip}\"\n\n")
}

fn net(name: &str, vni: u32, cidr: &str, gw: &str) -> String {
    format!("  [[tenant.network]]\n  name = \"{name}\"\n  vni = {vni}\n  cidr = \"{cidr}\"\n  gateway = \"{gw}\"\n  snat = true\n\n")
}

fn uplink(name: &str, tap: &str, extra: &str) -> String {
    format!("[[uplink]]\nname = \"{name}\"\ntap = \"{tap}\"\naddress = \"203.0.113.2/24\"\ngateway = \"203.0.113.1\"\n{extra}\n")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `curl -s URL` from `ns`: the body.
fn curl(lab: &Lab, ns: &str, url: &str) -> String {
    let o = lab.exec(ns, &["curl", "-s", "--max-time", "5", url]);
    assert!(o.status.success(), "curl {url} from {ns}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn drops(show: &Value, port: &str, reason: &str) -> u64 {
    find_port(show, port)
        .and_then(|p| p["drops"][reason].as_u64())
        .unwrap_or(0)
}

#[test]
fn snat_floating_ip_port_forward_hairpin_and_icmp_errors() {
    if !netns_or_skip() || !tools_or_skip(&["curl", "python3", "ping", "ss"]) {
        return;
    }
    let n = Names::new("nat");
    let dir = TestDir::new();
    let (ext, w1, d1, g1) = (n.port("ex"), n.port("w1"), n.port("d1"), n.port("g1"));
    let mut t = uplink(&ext, &n.tap("ex"), "");
    t += "[[tenant]]\nname = \"acme\"\n\n";
    t += &net("web", 1001, "10.0.1.0/24", "10.0.1.1");
    t += &net("db", 1002, "10.0.2.0/24", "10.0.2.1");
    t += &port(&w1, "web", "02:00:00:00:01:0b", "10.0.1.11");
    t += &port(&d1, "db", "02:00:00:00:02:15", "10.0.2.21");
    t += &format!("  [[tenant.floating_ip]]\n  address = \"203.0.113.10\"\n  port = \"{w1}\"\n\n");
    t += &format!("  [[tenant.port_forward]]\n  proto = \"tcp\"\n  external = \"203.0.113.2:8081\"\n  port = \"{d1}\"\n  to_port = 80\n\n");
    // Another tenant with the very same subnet and address.
    t += "[[tenant]]\nname = \"globex\"\n\n";
    t += &net("web", 2001, "10.0.1.0/24", "10.0.1.1");
    t += &port(&g1, "web", "02:00:00:00:01:0c", "10.0.1.11");
    let path = dir.write("vswitch.toml", &t);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[w1.clone(), d1.clone(), g1.clone(), ext.clone()]);

    // The external network: 203.0.113.1 (the uplink's next hop) and a
    // server network behind it, 198.51.100.0/24.
    let o = lab.exec(&ext, &["ip", "addr", "add", "198.51.100.1/24", "dev", "lo"]);
    assert!(o.status.success(), "{}", text(&o));
    let srv = dir.write("client_addr_server.py", HTTP_SERVER);
    let _servers: Vec<Bg> = [&ext, &w1, &d1]
        .into_iter()
        .map(|ns| serve_python(&dir, ns, &srv, 80))
        .collect();

    // SNAT: the server sees the uplink address; off-link through the
    // gateway, and on-link.
    assert_eq!(curl(&lab, &d1, "http://198.51.100.1/"), "203.0.113.2");
    assert_eq!(curl(&lab, &d1, "http://203.0.113.1/"), "203.0.113.2");
    // A VM with a floating IP leaves with it.
    assert_eq!(curl(&lab, &w1, "http://198.51.100.1/"), "203.0.113.10");
    // Ping out (ICMP echo through SNAT, identifier mapped back).
    lab.assert_ping(&d1, "198.51.100.1", 2);

    // In: the floating IP reaches w1, the port forward reaches d1:80; the
    // VMs see the external client's own address.
    assert_eq!(curl(&lab, &ext, "http://203.0.113.10/"), "203.0.113.1");
    assert_eq!(curl(&lab, &ext, "http://203.0.113.2:8081/"), "203.0.113.1");
    lab.assert_ping(&ext, "203.0.113.10", 2);
    // The uplink address itself answers ping; other ports of it do not
    // reach anything.
    lab.assert_ping(&ext, "203.0.113.2", 2);
    let o = lab.exec(
        &ext,
        &["curl", "-s", "--max-time", "2", "http://203.0.113.2:81/"],
    );
    assert!(
        !o.status.success(),
        "port 81 reached something: {}",
        text(&o)
    );

    // Hairpin: w1 reaches its own floating IP (source: its floating IP),
    // and d1's port forward (source: w1's floating IP).
    assert_eq!(curl(&lab, &w1, "http://203.0.113.10/"), "203.0.113.10");
    assert_eq!(curl(&lab, &w1, "http://203.0.113.2:8081/"), "203.0.113.10");
    // d1 (SNAT only) reaches w1's floating IP: source the SNAT address.
    assert_eq!(curl(&lab, &d1, "http://203.0.113.10/"), "203.0.113.2");

    // A UDP datagram to a closed external port: the ICMP port unreachable
    // comes back translated (RFC 5508), so the VM's socket sees "refused".
    let probe = dir.write("udp.py", UDP_PROBE);
    let probe = probe.to_str().expect("utf-8 path");
    let o = lab.exec(&d1, &["python3", probe, "198.51.100.1", "9"]);
    assert_eq!(text(&o).trim(), "refused", "{}", text(&o));

    // Two tenants, same subnet and address, browsing out at once: the
    // downloads overlap, each gets its own answer.
    let big = |ns: &str, label: &str| {
        lab.spawn(
            &dir,
            ns,
            label,
            &[
                "curl",
                "-s",
                "--max-time",
                "30",
                "--limit-rate",
                "4M",
                "http://198.51.100.1/big",
            ],
        )
    };
    let mut a = big(&w1, "big-acme");
    let mut b = big(&g1, "big-globex");
    // While both run: two live tracked connections from 10.0.1.11:*, one
    // per tenant zone (the server may have sent everything and closed its
    // side already: socket buffers hold megabytes).
    let both = wait_until(Duration::from_secs(10), || {
        if !(a.running() && b.running()) {
            return false;
        }
        let ct = sw.ctl(&["conntrack"]);
        let zones: std::collections::HashSet<String> = ct["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["original"]["src"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("10.0.1.11:"))
                    && e["original"]["dst"] == "198.51.100.1:80"
                    && e["state"] != "TIME_WAIT"
                    && e["state"] != "CLOSE"
            })
            .filter_map(|e| e["original"]["zone"].as_str().map(str::to_string))
            .collect();
        zones.contains("acme") && zones.contains("globex") && a.running() && b.running()
    });
    assert!(
        both,
        "both tenants' connections at once: {:#}",
        sw.ctl(&["conntrack"])
    );
    assert!(a.wait(Duration::from_secs(35)).success(), "{}", a.stderr());
    assert!(b.wait(Duration::from_secs(35)).success(), "{}", b.stderr());
    assert!(
        a.stdout().starts_with("203.0.113.10\n"),
        "acme leaves with its floating IP"
    );
    assert!(
        b.stdout().starts_with("203.0.113.2\n"),
        "globex leaves with SNAT"
    );
    assert!(a.stdout().len() > 16 << 20 && b.stdout().len() > 16 << 20);

    // What vswitchctl shows.
    let ct = sw.ctl(&["conntrack", "--tenant", "globex"]);
    let entries = ct["entries"].as_array().cloned().unwrap_or_default();
    assert!(!entries.is_empty(), "{ct:#}");
    assert!(
        entries
            .iter()
            .all(|e| e["original"]["zone"] == "globex" || e["reply"]["zone"] == "globex"),
        "{ct:#}"
    );
    let nat = sw.ctl(&["nat"]);
    assert_eq!(nat["uplink"]["address"], "203.0.113.2/24", "{nat:#}");
    // The default range gives NAT 8 stripes; the forward's external port
    // (8081) and its inside port (80) are in different ones, which the
    // inbound and hairpin requests above crossed.
    assert_eq!(nat["stripes"], 8, "{nat:#}");
    assert_eq!(
        nat["floating_ips"][0]["external"], "203.0.113.10",
        "{nat:#}"
    );
    assert!(
        nat["stats"]["hairpin"].as_u64().unwrap_or(0) >= 3,
        "{nat:#}"
    );
    assert!(
        nat["stats"]["icmp_errors"].as_u64().unwrap_or(0) >= 1,
        "{nat:#}"
    );
    let human = sw.ctl_output(&["nat"]);
    assert!(human.status.success());
    let show = sw.show();
    let up = find_port(&show, &ext).expect("the uplink is a port in show");
    assert_eq!(up["kind"], "uplink", "{show:#}");
    assert!(up["rx_packets"].as_u64().unwrap_or(0) > 0, "{show:#}");
    assert!(drops(&show, &ext, "nat_no_match") >= 1, "port 81: {show:#}");
}

#[test]
fn a_tiny_port_range_exhausts_cleanly() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "ss"]) {
        return;
    }
    let n = Names::new("nx");
    let dir = TestDir::new();
    let (ext, v1) = (n.port("ex"), n.port("v1"));
    let mut t = uplink(&ext, &n.tap("ex"), "snat_ports = \"40000-40003\"\n");
    t += "[[tenant]]\nname = \"acme\"\n\n";
    t += &net("web", 1001, "10.0.1.0/24", "10.0.1.1");
    t += &port(&v1, "web", "02:00:00:00:01:0b", "10.0.1.11");
    let path = dir.write("vswitch.toml", &t);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[v1.clone(), ext.clone()]);
    let echo = dir.write("echo.py", ECHO_SERVER);
    let _srv = serve_python(&dir, &ext, &echo, 7000);
    let many = dir.write("many.py", MANY_CONNECTIONS);
    let o = lab.exec(
        &v1,
        &[
            "python3",
            many.to_str().expect("utf-8"),
            "203.0.113.1",
            "7000",
            "5",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // Four connections get the four ports and keep working; the fifth
    // finds none.
    assert_eq!(text(&o).trim(), "ok ok ok ok noconnect", "{}", text(&o));
    let show = sw.show();
    assert!(drops(&show, &v1, "nat_ports_exhausted") >= 1, "{show:#}");
    let nat = sw.ctl(&["nat"]);
    assert!(
        nat["stats"]["ports_exhausted"].as_u64().unwrap_or(0) >= 1,
        "{nat:#}"
    );
    // The external side saw only ports of the range.
    let ct = sw.ctl(&["conntrack"]);
    for e in ct["entries"].as_array().into_iter().flatten() {
        let dst = e["reply"]["dst"].as_str().unwrap_or("");
        let p: u16 = dst
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(
            (40000..=40003).contains(&p),
            "port {p} outside the range: {ct:#}"
        );
    }
}

#[test]
fn each_host_nats_its_own_vms_through_its_own_uplink() {
    if !netns_or_skip() || !tools_or_skip(&["curl", "python3", "ss"]) {
        return;
    }
    let n = Names::new("nm");
    let dir = TestDir::new();
    let (ha, hb) = (n.port("ha"), n.port("hb"));
    let ul = format!("ul-{ha}");
    let (ua, ub, a1, b1) = (n.port("ua"), n.port("ub"), n.port("a1"), n.port("b1"));
    let mut t = format!(
        "[[host]]\nname = \"{ha}\"\nunderlay = \"198.19.0.1/16\"\n\n[[host]]\nname = \"{hb}\"\nunderlay = \"198.19.0.2/16\"\n\n"
    );
    for (u, h, addr) in [(&ua, &ha, "203.0.113.2/24"), (&ub, &hb, "203.0.113.3/24")] {
        t += &format!(
            "[[uplink]]\nname = \"{u}\"\nhost = \"{h}\"\ntap = \"{}\"\naddress = \"{addr}\"\ngateway = \"203.0.113.1\"\n\n",
            n.tap(&u[u.len() - 2..])
        );
    }
    t += "[[tenant]]\nname = \"acme\"\n\n";
    t += &net("web", 1001, "10.0.1.0/24", "10.0.1.1");
    t += &format!("  [[tenant.port]]\n  name = \"{a1}\"\n  network = \"web\"\n  host = \"{ha}\"\n  ip = \"10.0.1.11\"\n\n");
    t += &format!("  [[tenant.port]]\n  name = \"{b1}\"\n  network = \"web\"\n  host = \"{hb}\"\n  ip = \"10.0.1.12\"\n\n");
    t += &format!("  [[tenant.floating_ip]]\n  address = \"203.0.113.10\"\n  port = \"{a1}\"\n\n");
    let path = dir.write("vswitch.toml", &t);
    // The external namespace is named after the first uplink.
    let all = [&ha, &hb, &ul, &ua, &a1, &b1].map(|s| s.to_string());
    let lab = MultiLab::up(&dir, &path, None, &all);
    let srv = dir.write("client_addr_server.py", HTTP_SERVER);
    let _servers: Vec<Bg> = [&ua, &a1]
        .into_iter()
        .map(|ns| serve_python(&dir, ns, &srv, 80))
        .collect();
    let curl = |ns: &str, url: &str| {
        let o = lab.exec(ns, &["curl", "-s", "--max-time", "5", url]);
        assert!(o.status.success(), "curl {url} from {ns}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // Each VM leaves through its own host's uplink.
    assert_eq!(curl(&b1, "http://203.0.113.1/"), "203.0.113.3");
    assert_eq!(curl(&a1, "http://203.0.113.1/"), "203.0.113.10");
    // The floating IP lives on a1's host.
    assert_eq!(curl(&ua, "http://203.0.113.10/"), "203.0.113.1");
    // b1 reaches a1's floating IP: out of host b's uplink, over the
    // external network, into host a's.
    assert_eq!(curl(&b1, "http://203.0.113.10/"), "203.0.113.3");
    let nat_b = lab.ctl(&hb, &["nat"]);
    assert!(
        nat_b["floating_ips"].as_array().is_some_and(Vec::is_empty),
        "{nat_b:#}"
    );
    let ct_b = lab.ctl(&hb, &["conntrack"]);
    assert!(
        ct_b["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["nat"] == "snat"),
        "host b only SNATs: {ct_b:#}"
    );
}
