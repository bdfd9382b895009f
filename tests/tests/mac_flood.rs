//! MAC table cap under a flood of random source MACs, and port security.

use std::time::Duration;

use serde_json::Value;
use vswitch_tests::*;

#[test]
fn mac_flood() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "python3"]) {
        return;
    }
    let n = Names::new("mfl");
    let dir = TestDir::new();
    let (fl, m1, m2, s1, s2) = (
        n.port("f"),
        n.port("m1"),
        n.port("m2"),
        n.port("s1"),
        n.port("s2"),
    );
    let mut cfg = Config::new();
    let t = cfg.tenant("fl");
    t.network("lan", 300, "10.0.2.0/24");
    t.network("sec", 301, "10.0.3.0/24");
    t.port(&fl, "lan", &n.tap("f"), "02:00:00:00:02:03", "10.0.2.3")
        .port_security = Some(false);
    t.port(&m1, "lan", &n.tap("m1"), "02:00:00:00:02:01", "10.0.2.1");
    t.port(&m2, "lan", &n.tap("m2"), "02:00:00:00:02:02", "10.0.2.2");
    t.port(&s1, "sec", &n.tap("s1"), "02:00:00:00:03:01", "10.0.3.1");
    t.port(&s2, "sec", &n.tap("s2"), "02:00:00:00:03:02", "10.0.3.2");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);
    let script = dir.write("send_frames.py", FRAME_SENDER_PY);
    let script = script.to_string_lossy().into_owned();

    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());

    let fdb = sw.fdb("fl", "lan");
    assert_eq!(
        fdb["mac_table_size"],
        8192,
        "default mac_table_size must be reported as 8192: {}",
        brief(&fdb)
    );
    let show = sw.show();
    let net = show["networks"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["tenant"] == "fl" && x["name"] == "lan"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(net["mac_table_size"], 8192, "show network: {net}");

    // warm up so m1/m2 are known before the flood
    lab.assert_ping(&m1, "10.0.2.2", 2);

    // ---- flood: 20,000 random source MACs, paced over ~2 s ----
    let mut ping = lab.spawn(
        &dir,
        &m1,
        "ping-during-flood",
        &["ping", "-n", "-c", "15", "-i", "0.2", "-W", "2", "10.0.2.2"],
    );
    let mut flood = lab.spawn(
        &dir,
        &fl,
        "flood",
        &[
            "python3",
            &script,
            "eth0",
            "20000",
            "02:00:00:ee:ee:ee",
            "1",
            "1000",
            "0.1",
        ],
    );
    let mut max_count = 0u64;
    let mut samples = 0;
    let done = wait_until(Duration::from_secs(30), || {
        let f = sw.fdb("fl", "lan");
        let c = num(&f, "count");
        max_count = max_count.max(c);
        samples += 1;
        assert!(
            c <= 8192,
            "fdb count {c} exceeds mac_table_size 8192 during the flood: {}",
            brief(&f)
        );
        !flood.running()
    });
    assert!(done, "flood sender did not finish in 30 s");
    let st = flood.wait(Duration::from_secs(1));
    assert!(st.success(), "flood sender failed: {}", flood.stderr());
    let sent: u64 = flood
        .stdout()
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert_eq!(sent, 20_000, "flood sender: {}", flood.stderr());

    let ping_st = ping.wait(Duration::from_secs(30));
    assert!(
        ping_st.success(),
        "m1 -> m2 ping during the flood failed ({ping_st}):\n{}\n{}",
        ping.stdout(),
        ping.stderr()
    );

    // after: give the data plane a moment to drain, counts stay capped
    let mut last = Value::Null;
    let evicted = wait_until(Duration::from_secs(10), || {
        last = sw.fdb("fl", "lan");
        assert!(
            num(&last, "count") <= 8192,
            "fdb count exceeds 8192 after the flood: {}",
            brief(&last)
        );
        num(&last["stats"], "evicted") > 0
    });
    assert!(
        evicted,
        "stats.evicted stays 0 after 20,000 random source MACs (max count seen {max_count} in \
         {samples} samples): {}",
        brief(&last)
    );
    assert!(
        max_count > 1000,
        "flood hardly learned anything (max count {max_count}); stats: {}",
        brief(&last)
    );
    assert!(num(&last, "count") <= 8192);
    eprintln!(
        "flood: max fdb count {max_count} over {samples} samples; after: {}",
        brief(&last)
    );
    lab.assert_ping(&m2, "10.0.2.1", 3);

    // ---- port security: 100 frames with foreign source MACs ----
    lab.assert_ping(&s1, "10.0.3.2", 2);
    let before = sw.fdb("fl", "sec");
    let count_before = num(&before, "count");
    let drops_before = spoofed(&sw, &s1);
    let out = lab.exec(
        &s1,
        &[
            "python3",
            &script,
            "eth0",
            "100",
            "02:00:00:00:03:02",
            "7",
            "0",
            "0",
        ],
    );
    assert!(out.status.success(), "spoof sender:\n{}", fmt_output(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let foreign: Vec<&str> = text.lines().skip(1).map(str::trim).collect();
    assert_eq!(foreign.len(), 100, "spoof sender output: {text}");

    let mut seen = 0;
    let ok = wait_until(Duration::from_secs(10), || {
        seen = spoofed(&sw, &s1);
        seen >= drops_before + 100
    });
    assert!(
        ok,
        "port {s1} (port_security on) sent 100 frames with foreign source MACs; \
         drops.src_mac_spoofed went {drops_before} -> {seen}, want +100: {}",
        sw.port(&s1).unwrap_or(Value::Null)
    );
    let after = sw.fdb("fl", "sec");
    assert!(
        num(&after, "count") <= count_before,
        "fdb of network sec grew from spoofed frames: {count_before} -> {}: {}",
        num(&after, "count"),
        brief(&after)
    );
    let entries = after["entries"].as_array().cloned().unwrap_or_default();
    for e in &entries {
        let mac = e["mac"].as_str().unwrap_or("");
        assert!(
            !foreign.contains(&mac),
            "spoofed source MAC {mac} was learned: {e}"
        );
    }
}

fn spoofed(sw: &Switch, port: &str) -> u64 {
    let p = sw
        .port(port)
        .unwrap_or_else(|| panic!("{port} missing in show"));
    num(&p["drops"], "src_mac_spoofed")
}

/// An fdb network object without its (possibly 8192) entries, for messages.
fn brief(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        if let Some(e) = o.remove("entries") {
            let n = e.as_array().map(Vec::len).unwrap_or(0);
            o.insert("entries(len)".into(), n.into());
        }
    }
    v
}
