//! Two tenants with the same CIDR, IPs and MACs see nothing of each other.

use std::thread;
use std::time::Duration;

use rustix::process::Signal;
use vswitch_tests::*;

const PAT_A: [u8; 4] = [0xa1; 4];
const PAT_B: [u8; 4] = [0xb2; 4];

#[test]
fn tenant_isolation() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "tcpdump"]) {
        return;
    }
    let n = Names::new("iso");
    let dir = TestDir::new();
    let (a1, a2, b1, b2) = (n.port("a1"), n.port("a2"), n.port("b1"), n.port("b2"));
    let mut cfg = Config::new();
    let ta = cfg.tenant("tenant-a");
    ta.network("net", 100, "10.0.0.0/24");
    ta.port(&a1, "net", &n.tap("a1"), "02:00:00:00:00:01", "10.0.0.1");
    ta.port(&a2, "net", &n.tap("a2"), "02:00:00:00:00:02", "10.0.0.2");
    let tb = cfg.tenant("tenant-b");
    tb.network("net", 200, "10.0.0.0/24");
    tb.port(&b1, "net", &n.tap("b1"), "02:00:00:00:00:01", "10.0.0.1");
    tb.port(&b2, "net", &n.tap("b2"), "02:00:00:00:00:02", "10.0.0.2");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);

    let _sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());

    // capture on every VM
    let mut caps = Vec::new();
    for port in [&a1, &a2, &b1, &b2] {
        let file = dir.file(&format!("{port}.pcap"));
        let file_s = file.to_string_lossy().into_owned();
        let bg = lab.spawn(
            &dir,
            port,
            &format!("tcpdump-{port}"),
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
                "eth0",
                "-w",
                &file_s,
            ],
        );
        caps.push((port.clone(), file, bg));
    }
    for (port, _, bg) in &mut caps {
        let ok = wait_until(Duration::from_secs(10), || {
            bg.stderr().contains("listening on")
        });
        assert!(ok, "tcpdump in {port} did not start: {}", bg.stderr());
    }

    // both tenants ping concurrently, each with its own payload pattern
    let (ra, rb) = thread::scope(|s| {
        let ha = s.spawn(|| {
            lab.exec(
                &a1,
                &[
                    "ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", "-p", "a1a1a1a1", "10.0.0.2",
                ],
            )
        });
        let hb = s.spawn(|| {
            lab.exec(
                &b1,
                &[
                    "ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", "-p", "b2b2b2b2", "10.0.0.2",
                ],
            )
        });
        (
            ha.join().expect("ping thread a"),
            hb.join().expect("ping thread b"),
        )
    });
    assert!(ra.status.success(), "ping a1 -> a2:\n{}", fmt_output(&ra));
    assert!(rb.status.success(), "ping b1 -> b2:\n{}", fmt_output(&rb));

    for (port, file, bg) in &mut caps {
        let st = bg.stop(Signal::INT, Duration::from_secs(10));
        assert!(
            st.success(),
            "tcpdump in {port} exited with {st}: {}",
            bg.stderr()
        );
        let frames = pcap::read(file).unwrap_or_else(|e| panic!("{e}"));
        let (own, other) = if port.as_str() == a1 || port.as_str() == a2 {
            (PAT_A, PAT_B)
        } else {
            (PAT_B, PAT_A)
        };
        let n_own = pcap::count_with(&frames, &own);
        let n_other = pcap::count_with(&frames, &other);
        assert!(
            n_own >= 5,
            "{port}: capture has {n_own} frames with its own tenant's pattern {own:02x?} \
             (positive control, want >= 5) out of {} frames ({} bytes); tcpdump said: {}",
            frames.len(),
            std::fs::metadata(&*file).map(|m| m.len()).unwrap_or(0),
            bg.stderr()
        );
        assert_eq!(
            n_other, 0,
            "{port}: capture has {n_other} frames carrying the OTHER tenant's pattern {other:02x?}"
        );
    }
}
