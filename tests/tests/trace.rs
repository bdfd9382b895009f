//! `vswitchctl trace`: a synthetic packet walked through the real pipeline
//! names the security-group rules, the router hop and the egress port that
//! decided, changes nothing (no connection, no rule hit, no counter), and
//! agrees with what real traffic then does; `--live` traces real packets;
//! the drop capture shows the security group's denial with its reason.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vswitch_tests::*;

/// Two networks of one tenant joined by its router; `db` admits TCP 5432
/// from the web network and ping, nothing else; `client` may send
/// anything.
fn config(cli: &str, db: &str) -> String {
    let rule = |body: &str| format!("    [[tenant.security_group.rule]]\n{body}\n");
    let mut t = String::from("[[tenant]]\nname = \"acme\"\n\n");
    for (name, vni, net) in [("web", 1001, 1), ("db", 1002, 2)] {
        t += &format!(
            "  [[tenant.network]]\n  name = \"{name}\"\n  vni = {vni}\n  cidr = \"10.0.{net}.0/24\"\n  gateway = \"10.0.{net}.1\"\n\n"
        );
    }
    t += "  [[tenant.security_group]]\n  name = \"db\"\n";
    t += &rule("    direction = \"ingress\"\n    proto = \"tcp\"\n    ports = \"5432\"\n    remote = \"10.0.1.0/24\"");
    t += &rule("    direction = \"ingress\"\n    proto = \"icmp\"\n    icmp_type = 8");
    t += "  [[tenant.security_group]]\n  name = \"client\"\n";
    t += &rule("    direction = \"egress\"");
    for (name, net, ip, group) in [
        (cli, "web", "10.0.1.10", "client"),
        (db, "db", "10.0.2.20", "db"),
    ] {
        t += &format!(
            "  [[tenant.port]]\n  name = \"{name}\"\n  network = \"{net}\"\n  ip = \"{ip}\"\n  security_groups = [\"{group}\"]\n\n"
        );
    }
    t
}

fn texts(t: &Value) -> Vec<String> {
    t["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{}: {}",
                s["stage"].as_str().unwrap_or("?"),
                s["text"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn has(steps: &[String], needle: &str) -> bool {
    steps.iter().any(|s| s.contains(needle))
}

fn total_hits(sw: &Switch) -> u64 {
    sw.ctl(&["sg"])["tenants"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["groups"].as_array().into_iter().flatten())
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .map(|r| r["hits"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn trace_names_the_deciding_rules_changes_nothing_and_agrees_with_traffic() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "ping", "tshark"]) {
        return;
    }
    let n = Names::new("trc");
    let dir = TestDir::new();
    let (cli, db) = (n.port("cli"), n.port("db"));
    let path = dir.write("vswitch.toml", &config(&cli, &db));
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[cli.clone(), db.clone()]);
    lab.assert_ping(&cli, "10.0.2.20", 1);
    let http = dir.write("server.py", HTTP_SERVER);
    let _srv = serve_python(&dir, &db, &http, 5432);
    let _srv22 = serve_python(&dir, &db, &http, 22);

    // Allowed: every decision named, in order, ending at the db port.
    let before_hits = total_hits(&sw);
    let entries = || {
        sw.ctl(&["conntrack"])["entries"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let before_entries = entries();
    let t = sw.ctl(&[
        "trace",
        "--port",
        &cli,
        "tcp 10.0.1.10:40000 > 10.0.2.20:5432",
    ]);
    let st = texts(&t);
    let msg = format!("{t:#}");
    assert!(
        has(
            &st,
            &format!("from port {cli} (tenant acme) into network web (VNI 1001)")
        ),
        "{msg}"
    );
    assert!(has(&st, "port security: source"), "{msg}");
    assert!(
        has(
            &st,
            "security groups egress: new connection, group client rule 1"
        ),
        "{msg}"
    );
    assert!(
        has(&st, "router of tenant acme: web -> db toward 10.0.2.20"),
        "{msg}"
    );
    assert!(
        has(&st, "security groups ingress: new connection, group db rule 1 (ingress ipv4 tcp 5432 from 10.0.1.0/24) allows"),
        "{msg}"
    );
    assert!(has(&st, &format!("output to port {db}")), "{msg}");
    assert_eq!(t["verdict"], format!("delivered: port {db}"), "{msg}");
    // The human form says the same.
    let o = sw.ctl_output_plain(&[
        "trace",
        "--port",
        &cli,
        "tcp 10.0.1.10:40000 > 10.0.2.20:5432",
    ]);
    assert!(o.status.success(), "{}", fmt_output(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("dry run") && text.contains(&format!("=> delivered: port {db}")),
        "{text}"
    );

    // Denied: the ingress groups name no rule, the drop has its reason.
    let t = sw.ctl(&[
        "trace",
        "--port",
        &cli,
        "tcp 10.0.1.10:40001 > 10.0.2.20:22",
    ]);
    let st = texts(&t);
    assert!(
        has(
            &st,
            "security groups ingress: no rule of groups db allows it"
        ),
        "{t:#}"
    );
    assert_eq!(
        t["verdict"],
        format!("dropped at port {db}: sg_ingress_denied"),
        "{t:#}"
    );
    // A spoofed source is stopped by port security before any rule.
    let t = sw.ctl(&["trace", "--port", &cli, "tcp 10.0.1.99:1 > 10.0.2.20:5432"]);
    assert_eq!(
        t["verdict"],
        format!("dropped at port {cli}: ip_src_spoofed"),
        "{t:#}"
    );

    // The traces changed nothing: no connection tracked, no rule hit, no
    // drop counted.
    assert_eq!(total_hits(&sw), before_hits, "a trace counted rule hits");
    assert_eq!(entries(), before_entries, "a trace committed a connection");
    let drops = |p: &str| {
        num(
            &find_port(&sw.show(), p).unwrap_or(Value::Null),
            "drops_total",
        )
    };
    assert_eq!((drops(&cli), drops(&db)), (0, 0));

    // Real traffic does what the traces said: 5432 connects, 22 does not,
    // and that denial is in the drop capture with its reason.
    let probe = |port: &str| {
        python_in(
            &dir,
            &cli,
            "tcp_probe.py",
            TCP_PROBE,
            &["10.0.2.20", port, "2"],
            Duration::from_secs(10),
        )
    };
    assert_eq!(probe("5432"), "ok");
    let file = dir.file("drops.pcapng");
    let mut cap = Command::new(&bins().vswitchctl);
    cap.arg("--socket")
        .arg(sw.socket())
        .args(["capture", "--port", &db, "--stage", "drop", "-c", "1", "-w"]);
    cap.arg(&file);
    let mut child = cap.spawn().expect("vswitchctl capture");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(probe("22"), "timeout");
    assert!(wait_until(Duration::from_secs(10), || matches!(
        child.try_wait(),
        Ok(Some(_))
    )));
    let mut c = Command::new("tshark");
    c.arg("-n").arg("-r").arg(&file).args([
        "-T",
        "fields",
        "-e",
        "frame.comment",
        "-e",
        "tcp.dstport",
        "-e",
        "ip.src",
    ]);
    let o = run_timeout(&mut c, Duration::from_secs(60));
    let lines = String::from_utf8_lossy(&o.stdout);
    assert!(
        lines.contains("stage=drop reason=sg_ingress_denied")
            && lines.contains("22")
            && lines.contains("10.0.1.10"),
        "{lines}"
    );
    assert!(drops(&db) >= 1);

    // Live: the next real packet to 5432 is traced with the same words.
    let mut live = Command::new(&bins().vswitchctl);
    live.arg("--socket")
        .arg(sw.socket())
        .args([
            "--json",
            "trace",
            "--port",
            &cli,
            "--live",
            "1",
            "--filter",
            "tcp dst port 5432",
            "--timeout",
            "10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = live.spawn().expect("vswitchctl trace --live");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(probe("5432"), "ok");
    let o = child.wait_with_output().expect("trace output");
    assert!(o.status.success(), "{}", fmt_output(&o));
    let t: Value = serde_json::from_slice(&o.stdout).expect("json");
    let p = &t["packets"][0];
    assert!(
        p["packet"]
            .as_str()
            .unwrap_or("")
            .contains("> 10.0.2.20:5432 [S]"),
        "{t:#}"
    );
    let st = texts(p);
    assert!(has(&st, "group db rule 1"), "{t:#}");
    assert_eq!(p["verdict"], format!("delivered: port {db}"), "{t:#}");
    assert_eq!(t["timed_out"], false);

    // Refusals name the fix.
    for (args, want) in [
        (
            vec!["trace", "--port", "nope", "icmp 10.0.1.10 > 10.0.2.20"],
            "no port \"nope\"",
        ),
        (
            vec!["trace", "--port", &cli, "tcp 10.0.1.10 > 10.0.2.20:80"],
            "needs a port",
        ),
        (
            vec!["trace", "--port", &cli, "icmp 10.0.1.10 > 10.0.1.77"],
            "ARP for it would go unanswered",
        ),
        (vec!["trace", "--port", &cli], "give a flow"),
    ] {
        let o = sw.ctl_output(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(want),
            "{args:?}: {}",
            fmt_output(&o)
        );
    }
}
