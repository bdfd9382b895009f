//! Two VMs in one network: ping and TCP (iperf3) through vswitchd.

use std::time::Duration;

use serde_json::Value;
use vswitch_tests::*;

#[test]
fn l2_two_vms() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "iperf3", "ss"]) {
        return;
    }
    let n = Names::new("l2v");
    let dir = TestDir::new();
    let (vm1, vm2) = (n.port("v1"), n.port("v2"));
    let mut cfg = Config::new();
    let t = cfg.tenant("acme");
    t.network("web", 1001, "10.0.1.0/24").gateway = Some("10.0.1.1".into());
    t.port(&vm1, "web", &n.tap("v1"), "02:00:0a:00:01:0a", "10.0.1.10");
    t.port(&vm2, "web", &n.tap("v2"), "02:00:0a:00:01:0b", "10.0.1.11");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);

    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());

    // ping: exit 0, no loss
    let out = lab.exec(&vm1, &["ping", "-n", "-c", "3", "-W", "2", "10.0.1.11"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0% packet loss"),
        "ping vm1 -> vm2:\n{}",
        fmt_output(&out)
    );

    // TCP: iperf3 for 3 s
    let mut server = lab.spawn(&dir, &vm2, "iperf3-server", &["iperf3", "-s", "-1"]);
    assert!(
        wait_tcp_listen(&vm2, 5201, Duration::from_secs(10)),
        "iperf3 server did not listen: {}",
        server.stderr()
    );
    let out = lab.exec_timeout(
        &vm1,
        &["iperf3", "-c", "10.0.1.11", "-t", "3", "-J"],
        Duration::from_secs(25),
    );
    assert!(out.status.success(), "iperf3 client:\n{}", fmt_output(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J prints JSON");
    assert!(
        report.get("error").is_none(),
        "iperf3 error: {}",
        report["error"]
    );
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        bytes > 10_000_000,
        "iperf3 received only {bytes} bytes in 3 s (want > 10 MB)"
    );
    server.wait(Duration::from_secs(10));

    // counters of vm1
    let p = sw.port(&vm1).expect("vm1 in show");
    assert!(num(&p, "rx_packets") > 0, "vm1 rx_packets: {p}");
    assert!(num(&p, "tx_packets") > 0, "vm1 tx_packets: {p}");
    let p2 = sw.port(&vm2).expect("vm2 in show");
    assert!(
        num(&p2, "rx_packets") > 0 && num(&p2, "tx_packets") > 0,
        "vm2: {p2}"
    );
    // TSO super-frames cross the switch whole: the iperf3 sender's frames
    // average far above the 1514-byte wire size, and vm2's tap was written
    // as many frames as vm1's tap was read (no software segmentation).
    let avg = num(&p, "rx_bytes") / num(&p, "rx_packets").max(1);
    assert!(
        avg > 8000,
        "vm1 frames average {avg} bytes: no super-frames crossed the switch: {p}"
    );
    assert!(
        num(&p2, "tx_packets") <= num(&p, "rx_packets") + 64,
        "vm2 got more frames ({}) than vm1 sent ({}): something segmented",
        num(&p2, "tx_packets"),
        num(&p, "rx_packets")
    );
    assert_eq!(p["link"], "up", "vm1: {p}");
    assert_eq!(p["tap"], n.tap("v1").as_str(), "vm1: {p}");
    assert_eq!(p["mac"], "02:00:0a:00:01:0a", "vm1: {p}");

    // the documented shape of `show --json` (docs/cli.md)
    let show = sw.show();
    for key in [
        "config",
        "uptime_secs",
        "workers",
        "offloads",
        "networks",
        "ports",
    ] {
        assert!(show.get(key).is_some(), "show lacks {key:?}: {show}");
    }
    for key in ["csum", "tso4", "tso6", "uso"] {
        assert!(show["offloads"][key].is_boolean(), "offloads.{key}: {show}");
    }
    assert_eq!(
        show["config"],
        path.to_string_lossy().as_ref(),
        "show.config"
    );
    let net = &show["networks"][0];
    for (key, want) in [
        ("tenant", serde_json::json!("acme")),
        ("name", serde_json::json!("web")),
        ("vni", serde_json::json!(1001)),
        ("cidr", serde_json::json!("10.0.1.0/24")),
        ("gateway", serde_json::json!("10.0.1.1")),
        ("ports", serde_json::json!([vm1, vm2])),
        ("mac_table_size", serde_json::json!(8192)),
    ] {
        assert_eq!(net[key], want, "show.networks[0].{key}: {net}");
    }
    assert!(num(net, "mac_entries") >= 2, "mac_entries: {net}");
    for key in [
        "name",
        "tenant",
        "network",
        "tap",
        "mac",
        "ip",
        "port_security",
        "link",
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "drops_total",
        "drops",
    ] {
        assert!(p.get(key).is_some(), "show port lacks {key:?}: {p}");
    }
    assert_eq!(p["ip"], "10.0.1.10", "vm1: {p}");
    assert_eq!(p["port_security"], true, "vm1: {p}");
    assert!(p["drops"].is_object(), "vm1 drops: {p}");
}

/// With two workers each tap has two queues: the VM's flows are spread
/// over them, both workers carry the sender's data, every stream gets
/// through, and a switch killed and restarted re-attaches both queues.
#[test]
fn two_workers_share_each_port_through_tap_queues() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "iperf3", "ss"]) {
        return;
    }
    let n = Names::new("mq");
    let dir = TestDir::new();
    let (vm1, vm2) = (n.port("v1"), n.port("v2"));
    let mut cfg = Config::new();
    cfg.switch_key("workers", "2");
    let t = cfg.tenant("acme");
    t.network("web", 1001, "10.0.1.0/24").gateway = Some("10.0.1.1".into());
    t.port(&vm1, "web", &n.tap("v1"), "02:00:0a:00:01:0a", "10.0.1.10");
    t.port(&vm2, "web", &n.tap("v2"), "02:00:0a:00:01:0b", "10.0.1.11");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);

    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());
    let queues_seen_by_vm = |vm: &str| -> usize {
        let o = lab.exec(vm, &["ls", "/sys/class/net/eth0/queues"]);
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter(|q| q.starts_with("tx-"))
            .count()
    };
    assert_eq!(queues_seen_by_vm(&vm1), 2, "vm1's NIC queues");
    let p = sw.port(&vm1).expect("vm1 in show");
    assert_eq!(num(&p, "tap_queues"), 2, "{p}");
    lab.assert_ping(&vm1, "10.0.1.11", 2);

    // 16 streams: the kernel hashes them over the two queues (all on one
    // queue has odds of 2 in 65,536).
    let before: Vec<u64> = worker_bytes(&sw.show());
    let mut server = lab.spawn(&dir, &vm2, "iperf3-server", &["iperf3", "-s", "-1"]);
    assert!(
        wait_tcp_listen(&vm2, 5201, Duration::from_secs(10)),
        "iperf3 server did not listen: {}",
        server.stderr()
    );
    let out = lab.exec_timeout(
        &vm1,
        &["iperf3", "-c", "10.0.1.11", "-t", "3", "-P", "16", "-J"],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "iperf3 client:\n{}", fmt_output(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J prints JSON");
    let streams = report["end"]["streams"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(streams.len(), 16, "{}", report["end"]);
    for s in &streams {
        let got = s["receiver"]["bytes"].as_u64().unwrap_or(0);
        assert!(got > 100_000, "a stream moved only {got} bytes: {s}");
    }
    server.wait(Duration::from_secs(10));
    let after = worker_bytes(&sw.show());
    let moved: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: u64 = moved.iter().sum();
    assert!(total > 50_000_000, "workers read {moved:?} bytes");
    for (i, m) in moved.iter().enumerate() {
        assert!(
            *m * 10 >= total,
            "worker {i} read {m} of {total} bytes: the flows did not spread over the queues ({moved:?})"
        );
    }

    // A killed switch leaves the multi-queue taps; the next one attaches
    // both queues again.
    let mut sw = sw;
    signal(sw.pid(), rustix::process::Signal::KILL).expect("SIGKILL");
    let _ = sw.wait_exit(Duration::from_secs(5));
    drop(sw);
    let sw = Switch::start_named(&dir, &path, "vswitchd-restarted");
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .exec(&vm1, &["ping", "-n", "-c", "1", "-W", "0.5", "10.0.1.11"])
            .status
            .success()),
        "no traffic after the restart"
    );
    let p = sw.port(&vm1).expect("vm1 in show");
    assert_eq!(num(&p, "tap_queues"), 2, "{p}");
    assert_eq!(
        queues_seen_by_vm(&vm1),
        2,
        "vm1's NIC queues after the restart"
    );
}

/// Bytes each worker has read from taps (`show`'s `worker_stats`).
fn worker_bytes(show: &Value) -> Vec<u64> {
    show["worker_stats"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| num(w, "tap_rx_bytes"))
        .collect()
}
