//! SIGTERM stops the switch cleanly and removes its taps.

use std::time::Duration;

use vswitch_tests::*;

#[test]
fn sigterm_removes_taps() {
    if !netns_or_skip() {
        return;
    }
    let n = Names::new("stm");
    let dir = TestDir::new();
    let mut cfg = Config::new();
    let t = cfg.tenant("acme");
    t.network("web", 1001, "10.0.6.0/24");
    t.port(
        &n.port("p1"),
        "web",
        &n.tap("p1"),
        "02:00:0a:00:06:01",
        "10.0.6.1",
    );
    t.port(
        &n.port("p2"),
        "web",
        &n.tap("p2"),
        "02:00:0a:00:06:02",
        "10.0.6.2",
    );
    let path = dir.file("vswitch.toml");
    cfg.write(&path);
    let taps = cfg.tap_names();

    let mut sw = Switch::start(&dir, &path);
    for tap in &taps {
        assert!(
            host_link_exists(tap),
            "tap {tap} missing while vswitchd runs"
        );
    }
    let show = sw.show();
    for (port, tap) in cfg.port_names().iter().zip(&taps) {
        let p = find_port(&show, port).unwrap_or_else(|| panic!("{port} not in show: {show}"));
        assert_eq!(p["tap"], tap.as_str(), "show port {port}: {p}");
    }

    let st = sw.terminate(Duration::from_secs(10));
    let st = st.unwrap_or_else(|| panic!("vswitchd did not exit within 10 s of SIGTERM"));
    assert_eq!(
        st.code(),
        Some(0),
        "vswitchd exit status after SIGTERM: {st}"
    );
    for tap in &taps {
        assert!(
            !host_link_exists(tap),
            "tap {tap} still exists after SIGTERM"
        );
    }
    // the control socket no longer answers
    let out = sw.ctl_output(&["show"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "vswitchctl after stop:\n{}",
        fmt_output(&out)
    );
}
