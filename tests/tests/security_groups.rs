//! Security groups with real peers: an allowed port is reachable, a denied
//! one times out (no RST leaks), replies pass without an ingress rule, an
//! ICMP port unreachable of an allowed flow reaches the client, a remote
//! group admits its members only (on one host and across two), a reload
//! keeps an allowed iperf3 flow running while a newly denied port closes,
//! and a SYN flood from one VM hits its own connection limit while another
//! VM's connections keep working.

use std::time::Duration;

use serde_json::Value;
use vswitch_tests::*;

fn port(name: &str, host: Option<&str>, ip: &str, groups: &[&str], extra: &str) -> String {
    let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
    let mut s = format!(
        "  [[tenant.port]]\n  name = \"{name}\"\n  network = \"web\"\n  ip = \"{ip}\"\n  security_groups = [{}]\n{extra}",
        g.join(", ")
    );
    if let Some(h) = host {
        s += &format!("  host = \"{h}\"\n");
    }
    s + "\n"
}

const NET: &str = "  [[tenant.network]]\n  name = \"web\"\n  vni = 1001\n  cidr = \"10.0.1.0/24\"\n  gateway = \"10.0.1.1\"\n\n";

/// The groups: `web` admits HTTP from members of `client`, TCP 5201
/// (iperf3) and 8080 from anywhere when `open`, UDP 7000 and ping; its VMs
/// may not open connections themselves. `client` and `other` may send
/// anything, nothing comes in.
fn groups(open: bool) -> String {
    let rule = |body: &str| format!("    [[tenant.security_group.rule]]\n{body}\n");
    let mut s = String::from("  [[tenant.security_group]]\n  name = \"web\"\n");
    s += &rule("    direction = \"ingress\"\n    proto = \"tcp\"\n    ports = \"80\"\n    remote_group = \"client\"");
    s += &rule("    direction = \"ingress\"\n    proto = \"udp\"\n    ports = \"7000\"\n    remote = \"10.0.1.0/24\"");
    s += &rule("    direction = \"ingress\"\n    proto = \"icmp\"\n    icmp_type = 8");
    if open {
        s += &rule("    direction = \"ingress\"\n    proto = \"tcp\"\n    ports = \"5201\"");
        s += &rule("    direction = \"ingress\"\n    proto = \"tcp\"\n    ports = \"8080\"");
    }
    for g in ["client", "other"] {
        s += &format!("  [[tenant.security_group]]\n  name = \"{g}\"\n");
        s += &rule("    direction = \"egress\"");
    }
    s
}

fn hits(sg: &Value, group: &str, rule: u64) -> u64 {
    sg["tenants"][0]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["name"] == group)
        .and_then(|g| {
            g["rules"]
                .as_array()?
                .iter()
                .find(|r| r["number"] == rule)
                .and_then(|r| r["hits"].as_u64())
        })
        .unwrap_or(0)
}

fn sg_port<'a>(sg: &'a Value, port: &str) -> &'a Value {
    sg["ports"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["port"] == port))
        .unwrap_or(&Value::Null)
}

#[test]
fn stateful_allow_lists_remote_groups_reload_and_limits() {
    if !netns_or_skip() || !tools_or_skip(&["curl", "python3", "iperf3", "ss", "ping"]) {
        return;
    }
    let n = Names::new("sg");
    let dir = TestDir::new();
    let (srv, cli, oth, noisy) = (n.port("srv"), n.port("cli"), n.port("oth"), n.port("noi"));
    let tenant = |open: bool| {
        let mut t = String::from("[[tenant]]\nname = \"acme\"\n\n");
        t += NET;
        t += &groups(open);
        t += &port(&srv, None, "10.0.1.20", &["web"], "");
        t += &port(&cli, None, "10.0.1.10", &["client"], "");
        t += &port(&oth, None, "10.0.1.30", &["other"], "");
        t += &port(
            &noisy,
            None,
            "10.0.1.40",
            &["other"],
            "  max_connections = 50\n",
        );
        t
    };
    let path = dir.write("vswitch.toml", &tenant(true));
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(
        &path,
        &[srv.clone(), cli.clone(), oth.clone(), noisy.clone()],
    );
    let http = dir.write("client_addr_server.py", HTTP_SERVER);
    let _web = serve_python(&dir, &srv, &http, 80);
    let _alt = serve_python(&dir, &srv, &http, 9000);
    let _alt2 = serve_python(&dir, &srv, &http, 8080);
    let probe = |from: &str, port: &str| {
        python_in(
            &dir,
            from,
            "tcp_probe.py",
            TCP_PROBE,
            &["10.0.1.20", port, "2"],
            Duration::from_secs(10),
        )
    };

    // A member of `client` reaches HTTP; the reply needs no ingress rule
    // on the client.
    let o = lab.exec(
        &cli,
        &["curl", "-s", "--max-time", "5", "http://10.0.1.20/"],
    );
    assert!(o.status.success(), "{}", fmt_output(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "10.0.1.10");
    // A non-member gets silence, not a RST; so does a port no rule opens.
    assert_eq!(probe(&oth, "80"), "timeout");
    assert_eq!(probe(&cli, "9000"), "timeout");
    // An allowed port with nothing behind it (yet) answers with a RST: the
    // reply of an allowed connection passes.
    assert_eq!(probe(&cli, "5201"), "refused");
    // srv may not open connections itself (no egress rule) ...
    let o = python_in(
        &dir,
        &srv,
        "tcp_probe.py",
        TCP_PROBE,
        &["10.0.1.10", "22", "2"],
        Duration::from_secs(10),
    );
    assert_eq!(o, "timeout");
    // ... but answers ping (ingress ICMP echo; the reply is established).
    lab.assert_ping(&oth, "10.0.1.20", 2);
    // UDP to an allowed port where nothing listens: the ICMP port
    // unreachable is related to the allowed flow and reaches the client.
    let o = python_in(
        &dir,
        &cli,
        "udp_probe.py",
        UDP_PROBE,
        &["10.0.1.20", "7000"],
        Duration::from_secs(10),
    );
    assert_eq!(o, "refused");

    let sg = sw.ctl(&["sg"]);
    assert!(hits(&sg, "web", 1) >= 1, "HTTP rule hits: {sg:#}");
    let s = sg_port(&sg, &srv);
    assert!(
        s["drops"]["sg_ingress_denied"].as_u64().unwrap_or(0) >= 2,
        "{sg:#}"
    );
    assert_eq!(sg_port(&sg, &srv)["groups"][0], "web");
    assert!(
        sg_port(&sg, &srv)["connections"].as_u64().unwrap_or(0) >= 1,
        "{sg:#}"
    );
    let ct = sw.ctl(&["conntrack", "--port", &srv]);
    assert!(
        ct["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["table"] == "sg"),
        "{ct:#}"
    );

    // Reload while an allowed iperf3 flow runs: the new rules close 5201
    // and 8080 for new connections; the running flow keeps going.
    let mut iperf_srv = lab.spawn(&dir, &srv, "iperf-s", &["iperf3", "-s", "-p", "5201"]);
    assert!(wait_until(Duration::from_secs(10), || {
        String::from_utf8_lossy(&lab.exec(&srv, &["ss", "-ltnH"]).stdout).contains(":5201 ")
    }));
    let mut flow = lab.spawn(
        &dir,
        &cli,
        "iperf-c",
        &["iperf3", "-c", "10.0.1.20", "-p", "5201", "-t", "6", "-J"],
    );
    std::thread::sleep(Duration::from_secs(2));
    write_atomic(&path, &tenant(false));
    let r = sw.ctl(&["reload"]);
    assert!(r.is_object(), "{r:#}");
    assert_eq!(
        probe(&cli, "8080"),
        "timeout",
        "8080 closed for new connections"
    );
    assert!(
        flow.wait(Duration::from_secs(20)).success(),
        "{}",
        flow.stderr()
    );
    let j: Value = serde_json::from_str(&flow.stdout()).expect("iperf3 JSON");
    let secs: Vec<f64> = j["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .collect();
    assert!(secs.len() >= 5, "{secs:?}");
    assert!(
        secs.iter().skip(3).all(|b| *b > 1e8),
        "the flow kept moving after the reload: {secs:?}"
    );
    assert_eq!(
        probe(&cli, "5201"),
        "timeout",
        "a new iperf3 connection is denied"
    );
    iperf_srv.stop(rustix::process::Signal::TERM, Duration::from_secs(5));

    // A SYN flood from one VM: its own limit (50) drops the excess, counted
    // on it; the other VMs' connections keep working meanwhile.
    let flood = dir.write("syn_flood.py", SYN_FLOOD);
    let mut f = lab.spawn(
        &dir,
        &noisy,
        "flood",
        &[
            "python3",
            flood.to_str().expect("utf-8"),
            "10.0.1.20",
            "20000",
            "400",
            "4",
        ],
    );
    assert!(wait_until(Duration::from_secs(5), || {
        sw.port(&noisy)
            .and_then(|p| p["drops"]["conn_limit"].as_u64())
            .unwrap_or(0)
            > 100
    }));
    let o = lab.exec(
        &cli,
        &["curl", "-s", "--max-time", "5", "http://10.0.1.20/"],
    );
    assert!(
        o.status.success(),
        "the flood hurt another VM: {}",
        fmt_output(&o)
    );
    let sg = sw.ctl(&["sg", "--port", &noisy]);
    assert_eq!(sg_port(&sg, &noisy)["connections"], 50, "{sg:#}");
    f.wait(Duration::from_secs(15));
    // Flushing the port's connections gives the room back.
    let out = sw.ctl(&["conntrack", "flush", "--port", &noisy]);
    assert!(out["flushed"]["sg"].as_u64().unwrap_or(0) >= 50, "{out:#}");
    let sg = sw.ctl(&["sg", "--port", &noisy]);
    assert_eq!(sg_port(&sg, &noisy)["connections"], 0, "{sg:#}");
    let human = sw.ctl_output(&["sg"]);
    assert!(human.status.success());
}

#[test]
fn remote_groups_hold_across_two_hosts() {
    if !netns_or_skip() || !tools_or_skip(&["curl", "python3", "ss"]) {
        return;
    }
    let n = Names::new("sg2");
    let dir = TestDir::new();
    let (ha, hb) = (n.port("ha"), n.port("hb"));
    let ul = format!("ul-{ha}");
    let (srv, cli, oth) = (n.port("srv"), n.port("cli"), n.port("oth"));
    let mut t = format!(
        "[[host]]\nname = \"{ha}\"\nunderlay = \"198.19.0.1/16\"\n\n[[host]]\nname = \"{hb}\"\nunderlay = \"198.19.0.2/16\"\n\n"
    );
    t += "[[tenant]]\nname = \"acme\"\n\n";
    t += NET;
    t += &groups(true);
    t += &port(&srv, Some(&ha), "10.0.1.20", &["web"], "");
    t += &port(&cli, Some(&hb), "10.0.1.10", &["client"], "");
    t += &port(&oth, Some(&hb), "10.0.1.30", &["other"], "");
    let path = dir.write("vswitch.toml", &t);
    let all = [&ha, &hb, &ul, &srv, &cli, &oth].map(|s| s.to_string());
    let lab = MultiLab::up(&dir, &path, None, &all);
    let http = dir.write("client_addr_server.py", HTTP_SERVER);
    let _web = serve_python(&dir, &srv, &http, 80);
    // The member on the other host gets in (egress judged on host b,
    // ingress on host a) ...
    let o = lab.exec(
        &cli,
        &["curl", "-s", "--max-time", "5", "http://10.0.1.20/"],
    );
    assert!(o.status.success(), "{}", fmt_output(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "10.0.1.10");
    // ... the non-member does not, and hears nothing back.
    let o = python_in(
        &dir,
        &oth,
        "tcp_probe.py",
        TCP_PROBE,
        &["10.0.1.20", "80", "2"],
        Duration::from_secs(10),
    );
    assert_eq!(o, "timeout");
    let sg_a = lab.ctl(&ha, &["sg", "--port", &srv]);
    assert!(
        sg_a["ports"][0]["drops"]["sg_ingress_denied"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "denied on the destination's host: {sg_a:#}"
    );
}
