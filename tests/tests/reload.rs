//! Reload (vswitchctl reload and SIGHUP) while traffic flows.

use std::time::Duration;

use rustix::process::Signal;
use serde_json::{json, Value};
use vswitch_tests::*;

#[test]
fn reload_adds_port_during_iperf() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "iperf3", "ss"]) {
        return;
    }
    let n = Names::new("rla");
    let dir = TestDir::new();
    let (vm1, vm2, vm3) = (n.port("v1"), n.port("v2"), n.port("v3"));
    let mut cfg = Config::new();
    let t = cfg.tenant("acme");
    t.network("web", 1001, "10.0.1.0/24");
    t.port(&vm1, "web", &n.tap("v1"), "02:00:0a:00:01:0a", "10.0.1.10");
    t.port(&vm2, "web", &n.tap("v2"), "02:00:0a:00:01:0b", "10.0.1.11");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);

    let sw = Switch::start(&dir, &path);
    let mut lab = Lab::up(&path, &cfg.port_names());

    let mut server = lab.spawn(&dir, &vm2, "iperf3-server", &["iperf3", "-s", "-1"]);
    assert!(
        wait_tcp_listen(&vm2, 5201, Duration::from_secs(10)),
        "iperf3 server did not listen: {}",
        server.stderr()
    );
    let bytes_of = |p: Value| num(&p, "rx_bytes") + num(&p, "tx_bytes");
    let rx0 = bytes_of(sw.port(&vm1).expect("vm1"));
    let mut client = lab.spawn(
        &dir,
        &vm1,
        "iperf3-client",
        &["iperf3", "-c", "10.0.1.11", "-t", "8", "-i", "1", "-J"],
    );
    // wait until the transfer is clearly under way (switch counters rising)
    let flowing = wait_until(Duration::from_secs(10), || {
        bytes_of(sw.port(&vm1).expect("vm1")) > rx0 + 20_000_000
    });
    assert!(flowing, "iperf3 traffic did not start: {}", client.stderr());
    assert!(
        client.running(),
        "iperf3 client ended early: {}",
        client.stdout()
    );

    // add vm3 and reload while iperf3 runs
    cfg.tenant_mut("acme")
        .port(&vm3, "web", &n.tap("v3"), "02:00:0a:00:01:0c", "10.0.1.12");
    cfg.write(&path);
    let data = sw.ctl(&["reload"]);
    assert_eq!(data["added_ports"], json!([vm3]), "reload data: {data}");
    assert_eq!(data["removed_ports"], json!([]), "reload data: {data}");
    assert_eq!(data["changed_ports"], json!([]), "reload data: {data}");
    assert!(
        client.running(),
        "iperf3 client ended before the reload finished: {}",
        client.stdout()
    );

    let st = client.wait(Duration::from_secs(25));
    assert!(
        st.success(),
        "iperf3 client exited with {st}:\n{}\n{}",
        client.stdout(),
        client.stderr()
    );
    server.wait(Duration::from_secs(10));
    let report: Value = serde_json::from_str(&client.stdout()).expect("iperf3 -J JSON");
    assert!(
        report.get("error").is_none(),
        "iperf3 error: {}",
        report["error"]
    );
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "iperf3 received nothing");
    let intervals = report["intervals"].as_array().cloned().unwrap_or_default();
    assert!(
        intervals.len() >= 7,
        "iperf3 intervals: {}",
        intervals.len()
    );
    for (i, iv) in intervals.iter().enumerate() {
        let b = iv["sum"]["bytes"].as_u64().unwrap_or(0);
        assert!(
            b > 0,
            "iperf3 interval {i} carried 0 bytes (traffic stalled around the reload): {}",
            iv["sum"]
        );
    }

    // vm1 kept its counters across the reload
    let p1 = sw.port(&vm1).expect("vm1 after reload");
    assert!(
        bytes_of(p1.clone()) > rx0 + 20_000_000,
        "vm1 counters reset? {p1}"
    );

    // the new port works
    assert!(
        wait_until(Duration::from_secs(10), || host_link_exists(&n.tap("v3"))),
        "tap {} of the added port does not exist",
        n.tap("v3")
    );
    lab.up_again(std::slice::from_ref(&vm3));
    lab.assert_ping(&vm3, "10.0.1.10", 3);
    let show = sw.show();
    let names: Vec<&str> = show["ports"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(names.contains(&vm3.as_str()), "show ports: {names:?}");
}

#[test]
fn sighup_removes_port() {
    if !netns_or_skip() || !tools_or_skip(&["ping"]) {
        return;
    }
    let n = Names::new("rlh");
    let dir = TestDir::new();
    let (h1, h2, h3) = (n.port("h1"), n.port("h2"), n.port("h3"));
    let mut cfg = Config::new();
    let t = cfg.tenant("acme");
    t.network("web", 7, "10.0.4.0/24");
    t.port(&h1, "web", &n.tap("h1"), "02:00:0a:00:04:01", "10.0.4.1");
    t.port(&h2, "web", &n.tap("h2"), "02:00:0a:00:04:02", "10.0.4.2");
    t.port(&h3, "web", &n.tap("h3"), "02:00:0a:00:04:03", "10.0.4.3");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);

    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());
    lab.assert_ping(&h3, "10.0.4.1", 2);
    assert!(
        netns_link_exists(&h3, "eth0"),
        "h3 has no eth0 after vslab up"
    );
    let fdb = sw.fdb("acme", "web");
    assert!(
        has_port_entry(&fdb, &h3),
        "fdb has no entry of {h3} before removal: {fdb}"
    );

    cfg.remove_port(&h3);
    cfg.write(&path);
    sw.signal(Signal::HUP);
    let gone = wait_until(Duration::from_secs(10), || sw.port(&h3).is_none());
    assert!(gone, "{h3} still in show 10 s after SIGHUP: {}", sw.show());
    assert!(sw.port(&h1).is_some() && sw.port(&h2).is_some());
    assert!(
        !host_link_exists(&n.tap("h3")),
        "tap {} still exists on the host",
        n.tap("h3")
    );
    let no_eth0 = wait_until(Duration::from_secs(5), || !netns_link_exists(&h3, "eth0"));
    assert!(
        no_eth0,
        "namespace {h3} still has eth0 (the removed port's tap)"
    );
    let fdb = sw.fdb("acme", "web");
    assert!(
        !has_port_entry(&fdb, &h3),
        "MAC entries of removed port {h3} were not flushed: {fdb}"
    );
    lab.assert_ping(&h1, "10.0.4.2", 2);
}

fn has_port_entry(fdb: &Value, port: &str) -> bool {
    fdb["entries"]
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["port"] == port))
}
