//! Prometheus metrics on an opt-in address: scraped with curl inside a
//! lab host's namespace (its own loopback), they carry the same counters as
//! `vswitchctl show`.

use vswitch_tests::*;

#[test]
fn metrics_endpoint_serves_port_and_peer_counters() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "curl"]) {
        return;
    }
    let n = Names::new("met");
    let dir = TestDir::new();
    let (ha, hb, v1, v2) = (n.port("ha"), n.port("hb"), n.port("v1"), n.port("v2"));
    let ul = format!("ul-{ha}");
    let t = format!(
        r#"[switch]
metrics_listen = "127.0.0.1:9477"

[[host]]
name = "{ha}"
underlay = "198.19.0.1/16"

[[host]]
name = "{hb}"
underlay = "198.19.0.2/16"

[[tenant]]
name = "acme"

  [[tenant.network]]
  name = "web"
  vni = 1001
  cidr = "10.0.1.0/24"

  [[tenant.port]]
  name = "{v1}"
  network = "web"
  host = "{ha}"
  ip = "10.0.1.11"

  [[tenant.port]]
  name = "{v2}"
  network = "web"
  host = "{hb}"
  ip = "10.0.1.12"
"#
    );
    let path = dir.write("vswitch.toml", &t);
    let all = [&ha, &hb, &ul, &v1, &v2].map(|s| s.to_string());
    let lab = MultiLab::up(&dir, &path, None, &all);
    lab.assert_ping(&v1, "10.0.1.12", 3);
    let scrape = |p: &str| {
        let o = lab.exec(
            &ha,
            &["curl", "-s", "-i", &format!("http://127.0.0.1:9477{p}")],
        );
        assert!(o.status.success(), "curl: {}", fmt_output(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let m = scrape("/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains("# TYPE vswitch_port_rx_packets_total counter"),
        "{m}"
    );
    let line = |name: &str, labels: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with(name) && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}{{{labels}}} in\n{m}"))
    };
    assert!(line("vswitch_port_rx_packets_total", &format!("port=\"{v1}\"")) >= 3);
    assert!(line("vswitch_peer_tx_packets_total", &format!("peer=\"{hb}\"")) >= 3);
    // The same counters vswitchctl shows (read after the scrape: the VM's
    // own background traffic, e.g. IPv6 neighbour discovery, may add a few).
    let show = lab.ctl(&ha, &["show"]);
    let port = find_port(&show, &v1).expect("v1");
    let scraped = line("vswitch_port_tx_packets_total", &format!("port=\"{v1}\""));
    let shown = port["tx_packets"].as_u64().unwrap_or(0);
    assert!(
        scraped <= shown && shown - scraped < 10,
        "scraped {scraped}, show {shown}"
    );
    assert!(scrape("/other").starts_with("HTTP/1.1 404"));

    // A Prometheus parser reads the whole exposition, and the counters
    // move with traffic between two scrapes.
    let parse = |text: &str| -> prometheus_parse::Scrape {
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let lines = body.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format")
    };
    let sample = |sc: &prometheus_parse::Scrape, name: &str, label: (&str, &str)| -> f64 {
        sc.samples
            .iter()
            .find(|x| x.metric == name && x.labels.get(label.0) == Some(label.1))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {name} with {label:?}"))
    };
    let first = parse(&scrape("/metrics"));
    assert!(first.samples.len() > 20, "{} samples", first.samples.len());
    for family in [
        "vswitch_port_rx_packets_total",
        "vswitch_peer_tx_packets_total",
        "vswitch_fdb_entries",
        "vswitch_uptime_seconds",
    ] {
        assert!(
            first.docs.contains_key(family),
            "no HELP for {family}: {:?}",
            first.docs.keys().collect::<Vec<_>>()
        );
    }
    let before = sample(&first, "vswitch_peer_tx_packets_total", ("peer", &hb));
    let out = lab.exec(&v1, &["ping", "-c", "20", "-i", "0.01", "-q", "10.0.1.12"]);
    assert!(out.status.success(), "{}", fmt_output(&out));
    let second = parse(&scrape("/metrics"));
    let after = sample(&second, "vswitch_peer_tx_packets_total", ("peer", &hb));
    assert!(
        after - before >= 20.0,
        "peer tx went from {before} to {after}"
    );
    let rx =
        |sc: &prometheus_parse::Scrape| sample(sc, "vswitch_port_rx_packets_total", ("port", &v1));
    assert!(rx(&second) - rx(&first) >= 20.0);
}
