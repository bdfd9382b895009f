//! A switch killed with SIGKILL leaves the VMs' NICs (persistent taps) in
//! place; a restarted switch re-attaches them, the VMs reach each other
//! again within 2 seconds, and DHCP leases are intact.

use std::time::{Duration, Instant};

use rustix::process::Signal;
use vswitch_tests::*;

#[test]
fn kill_9_keeps_vm_nics_and_restart_reattaches_within_2s() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "udhcpc"]) {
        return;
    }
    let n = Names::new("rst");
    let dir = TestDir::new();
    let (v1, v2) = (n.port("v1"), n.port("v2"));
    let text = format!(
        r#"[[tenant]]
name = "{p}ten"

  [[tenant.network]]
  name = "lan"
  vni = 3100
  cidr = "10.31.0.0/24"
  gateway = "10.31.0.1"
  [tenant.network.dhcp]
  pool = ["10.31.0.100-10.31.0.150"]

  [[tenant.port]]
  name = "{v1}"
  network = "lan"
  mac = "02:00:00:31:00:01"
  ip = "10.31.0.10"
  tap = "{t1}"

  [[tenant.port]]
  name = "{v2}"
  network = "lan"
  mac = "02:00:00:31:00:02"
  tap = "{t2}"
"#,
        p = n.prefix(),
        t1 = n.tap("1"),
        t2 = n.tap("2"),
    );
    let path = dir.write("vswitch.toml", &text);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[v1.clone(), v2.clone()]);
    let dhcp = |vm: &str| {
        let o = lab.exec_timeout(
            vm,
            &["udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-T", "2"],
            Duration::from_secs(30),
        );
        assert!(o.status.success(), "udhcpc in {vm}:\n{}", fmt_output(&o));
    };
    dhcp(&v1); // its reservation, 10.31.0.10
    dhcp(&v2); // a pool address
    let addr = |vm: &str| -> String {
        let o = lab.exec(vm, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        let t = String::from_utf8_lossy(&o.stdout).to_string();
        t.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{vm} has no address: {t}"))
    };
    let ip2 = addr(&v2);
    lab.assert_ping(&v1, &ip2, 2);
    let ifindex = |vm: &str| -> String {
        let o = lab.exec(vm, &["cat", "/sys/class/net/eth0/ifindex"]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = (ifindex(&v1), ifindex(&v2));

    // Traffic keeps flowing from v1 while the switch dies.
    let mut pinger = Bg::spawn_in(
        &dir,
        &v1,
        "ping-bg",
        &["ping", "-n", "-i", "0.1", "-W", "1", &ip2],
    );
    std::thread::sleep(Duration::from_millis(300));
    signal(sw.pid(), Signal::KILL).expect("SIGKILL");
    drop(sw);

    // The NICs are still there, the same devices (same ifindex) with the
    // VMs' addresses.
    assert_eq!(
        (ifindex(&v1), ifindex(&v2)),
        before,
        "a VM's NIC was replaced"
    );
    assert_eq!(addr(&v2), ip2);

    let t0 = Instant::now();
    let sw = Switch::start_named(&dir, &path, "vswitchd-restarted");
    let back = wait_until(Duration::from_secs(10), || {
        lab.exec(&v1, &["ping", "-n", "-c", "1", "-W", "0.2", &ip2])
            .status
            .success()
    });
    let took = t0.elapsed();
    assert!(back, "v1 never reached v2 again after the restart");
    assert!(
        took <= Duration::from_secs(2),
        "VMs reachable again only after {took:?} (wanted within 2 s)"
    );
    assert_eq!(
        (ifindex(&v1), ifindex(&v2)),
        before,
        "the restart replaced a NIC"
    );
    assert!(
        sw.log().contains("re-attached the port's persistent tap"),
        "{}",
        sw.log()
    );
    pinger.stop(Signal::INT, Duration::from_secs(5));

    // Leases are intact: v2's lease is still bound, and a renewal keeps it.
    let leases = sw.ctl(&["leases"]);
    assert!(
        leases.to_string().contains(&ip2) && leases.to_string().contains("bound"),
        "{leases:#}"
    );
    dhcp(&v2);
    assert_eq!(addr(&v2), ip2, "a different address after the restart");

    // A clean stop removes the NICs.
    let mut sw = sw;
    sw.terminate(Duration::from_secs(10));
    assert!(
        !lab.exec(&v1, &["ip", "link", "show", "eth0"])
            .status
            .success(),
        "SIGTERM left v1's NIC behind"
    );
}

/// Sends a line every 100 ms on one TCP connection for SECS seconds and
/// checks each echo; prints "ok N" or "broken after N: ERROR".
const LONG_ECHO_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
n, end = 0, time.monotonic() + float(sys.argv[3])
try:
    while time.monotonic() < end:
        msg = ("%d\n" % n).encode()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            d = s.recv(64)
            if not d:
                raise OSError("closed by peer")
            got += d
        if got != msg:
            raise OSError("echo mismatch %r" % got)
        n += 1
        time.sleep(0.1)
    print("ok %d" % n)
except OSError as e:
    print("broken after %d: %s" % (n, e))
"#;

#[test]
fn graceful_restart_keeps_nat_and_security_group_connections() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "ss"]) {
        return;
    }
    let n = Names::new("grs");
    let dir = TestDir::new();
    let (v1, ext) = (n.port("v1"), n.port("ext"));
    let text = format!(
        r#"[[uplink]]
name = "{ext}"
tap = "{te}"
address = "203.0.113.2/24"
gateway = "203.0.113.1"

[[tenant]]
name = "{p}ten"

  [[tenant.network]]
  name = "lan"
  vni = 3200
  cidr = "10.32.0.0/24"
  gateway = "10.32.0.1"
  snat = true

  [[tenant.security_group]]
  name = "client"
    [[tenant.security_group.rule]]
    direction = "egress"

  [[tenant.port]]
  name = "{v1}"
  network = "lan"
  ip = "10.32.0.10"
  tap = "{t1}"
  security_groups = ["client"]
"#,
        p = n.prefix(),
        te = n.tap("e"),
        t1 = n.tap("1"),
    );
    let path = dir.write("vswitch.toml", &text);
    let mut sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[v1.clone(), ext.clone()]);
    let echo = dir.write("echo.py", ECHO_SERVER);
    let _srv = serve_python(&dir, &ext, &echo, 7000);
    // The switch learns its next hop before the flow starts.
    let o = lab.ping(&v1, "203.0.113.1", 3);
    assert!(o.status.success(), "{}", fmt_output(&o));
    let client = dir.write("long_echo.py", LONG_ECHO_CLIENT);
    let mut flow = lab.spawn(
        &dir,
        &v1,
        "flow",
        &[
            "python3",
            client.to_str().expect("utf-8"),
            "203.0.113.1",
            "7000",
            "6",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = sw.ctl(&["conntrack"]);
    let tcp = |ct: &serde_json::Value, table: &str| -> Vec<String> {
        ct["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["table"] == table && e["original"]["proto"] == "tcp")
            .map(|e| format!("{} {}", e["original"], e["reply"]))
            .collect()
    };
    assert_eq!(tcp(&before, "nat").len(), 1, "{before:#}");
    assert_eq!(tcp(&before, "sg").len(), 1, "{before:#}");

    // vswitchctl restart: the daemon saves its connections, keeps the taps
    // and exits; a new one restores them and the flow carries on.
    let r = sw.ctl(&["restart"]);
    assert_eq!(r["restarting"], true, "{r:#}");
    let st = sw.wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", sw.log());
    assert!(sw.log().contains("connections saved"), "{}", sw.log());
    drop(sw);
    let sw = Switch::start_named(&dir, &path, "vswitchd-restarted");
    assert!(flow.wait(Duration::from_secs(20)).success());
    let out = flow.stdout();
    assert!(
        out.trim().starts_with("ok ")
            && out
                .trim()
                .trim_start_matches("ok ")
                .parse::<u32>()
                .unwrap_or(0)
                >= 40,
        "the connection did not survive the restart: {out}\n{}",
        sw.log()
    );
    let log = sw.log();
    assert!(log.contains("NAT connections restored"), "{log}");
    assert!(log.contains("security-group connections restored"), "{log}");
    // The same connection, with the same translation, is tracked again.
    let after = sw.ctl(&["conntrack"]);
    assert_eq!(tcp(&after, "nat"), tcp(&before, "nat"), "{after:#}");
    assert_eq!(tcp(&after, "sg"), tcp(&before, "sg"), "{after:#}");
    // The saved state is used once.
    assert!(!dir.file("state").join("connections.json").exists());
}
