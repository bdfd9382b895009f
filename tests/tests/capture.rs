//! `vswitchctl capture`: pcapng of a port's rx/tx/drop frames that tcpdump
//! and tshark read, drops annotated with their reason, filters, and a live
//! stream through a pipe.

use std::process::{Command, Stdio};
use std::time::Duration;

use vswitch_tests::*;

fn ctl_capture(sw: &Switch, args: &[&str]) -> Command {
    let mut c = Command::new(&bins().vswitchctl);
    c.arg("--socket").arg(sw.socket()).arg("capture").args(args);
    c
}

/// tshark's view: one line per frame with the given fields.
fn tshark(file: &std::path::Path, fields: &[&str]) -> String {
    let mut c = Command::new("tshark");
    c.arg("-n").arg("-r").arg(file).args(["-T", "fields"]);
    for f in fields {
        c.args(["-e", f]);
    }
    let o = run_timeout(&mut c, Duration::from_secs(60));
    assert!(o.status.success(), "tshark: {}", fmt_output(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn capture_rx_tx_drop_with_reasons_filters_and_live_pipe() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "tcpdump", "tshark"]) {
        return;
    }
    let n = Names::new("cap");
    let dir = TestDir::new();
    let (v1, v2) = (n.port("v1"), n.port("v2"));
    let mut cfg = Config::new();
    let t = cfg.tenant("acme");
    t.network("lan", 700, "10.70.0.0/24");
    t.port(&v1, "lan", &n.tap("1"), "02:00:00:70:00:01", "10.70.0.1");
    t.port(&v2, "lan", &n.tap("2"), "02:00:00:70:00:02", "10.70.0.2");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());
    lab.assert_ping(&v1, "10.70.0.2", 1);

    // rx and tx at v2 while v1 pings it: requests are tx (to the VM),
    // replies rx (from the VM).
    let file = dir.file("v2.pcapng");
    let mut cap = ctl_capture(&sw, &["--port", &v2, "--filter", "icmp", "-c", "6", "-w"]);
    cap.arg(&file);
    let mut child = cap.spawn().expect("vswitchctl capture");
    std::thread::sleep(Duration::from_millis(300));
    lab.assert_ping(&v1, "10.70.0.2", 3);
    assert!(wait_until(Duration::from_secs(10), || matches!(
        child.try_wait(),
        Ok(Some(_))
    )));
    assert!(child.wait().expect("exit").success());
    let lines = tshark(&file, &["frame.comment", "icmp.type", "ip.src"]);
    let rows: Vec<&str> = lines.lines().collect();
    assert_eq!(rows.len(), 6, "{lines}");
    assert_eq!(
        rows.iter()
            .filter(|l| l.starts_with("stage=tx\t8\t10.70.0.1"))
            .count(),
        3,
        "{lines}"
    );
    assert_eq!(
        rows.iter()
            .filter(|l| l.starts_with("stage=rx\t0\t10.70.0.2"))
            .count(),
        3,
        "{lines}"
    );
    // tcpdump reads it too.
    let o = run_timeout(
        Command::new("tcpdump").arg("-nr").arg(&file),
        Duration::from_secs(10),
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ICMP echo request"),
        "{}",
        fmt_output(&o)
    );

    // Drops, with the reason: v1 sends from an address that is not its own.
    let file = dir.file("drops.pcapng");
    let mut cap = ctl_capture(&sw, &["--port", &v1, "--stage", "drop", "-c", "2", "-w"]);
    cap.arg(&file);
    let mut child = cap.spawn().expect("vswitchctl capture");
    std::thread::sleep(Duration::from_millis(300));
    let o = lab.exec(&v1, &["ip", "addr", "add", "10.70.0.99/24", "dev", "eth0"]);
    assert!(o.status.success(), "{}", fmt_output(&o));
    let _ = lab.exec(
        &v1,
        &[
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.70.0.99",
            "10.70.0.2",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || matches!(
        child.try_wait(),
        Ok(Some(_))
    )));
    let lines = tshark(&file, &["frame.comment", "ip.src"]);
    assert!(
        lines
            .lines()
            .any(|l| l == "stage=drop reason=ip_src_spoofed\t10.70.0.99"),
        "{lines}"
    );

    // Live: `vswitchctl capture ... -w - | tcpdump -r -`.
    let mut cap = ctl_capture(
        &sw,
        &[
            "--port",
            &v2,
            "--filter",
            "icmp and src host 10.70.0.1",
            "-c",
            "2",
            "-w",
            "-",
        ],
    );
    cap.stdout(Stdio::piped());
    let mut producer = cap.spawn().expect("vswitchctl capture");
    let stdout = producer.stdout.take().expect("piped");
    let consumer = Command::new("tcpdump")
        .args(["-nr", "-"])
        .stdin(stdout)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(300));
    lab.assert_ping(&v1, "10.70.0.2", 2);
    let o = consumer.wait_with_output().expect("tcpdump output");
    let _ = producer.wait();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        text.matches("ICMP echo request").count(),
        2,
        "{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Bad requests say what is wrong.
    let o = run_timeout(
        &mut ctl_capture(&sw, &["--port", "nope", "-w", "/dev/null"]),
        Duration::from_secs(10),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no port \"nope\""),
        "{}",
        fmt_output(&o)
    );
    let o = run_timeout(
        &mut ctl_capture(
            &sw,
            &["--port", &v1, "--filter", "tcp udp", "-w", "/dev/null"],
        ),
        Duration::from_secs(10),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("filter:"),
        "{}",
        fmt_output(&o)
    );
}
