//! Bad config files: refused at start-up (exit 2) and on reload (kept running).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vswitch_tests::*;

struct Case {
    label: &'static str,
    toml: String,
    /// each group: at least one of its strings must appear in stderr (besides
    /// the file path)
    expect: Vec<Vec<String>>,
}

fn port_block(name: &str, network: &str, tap: &str, mac: &str, ip: &str) -> String {
    format!(
        "  [[tenant.port]]\n  name = \"{name}\"\n  network = \"{network}\"\n  tap = \"{tap}\"\n  \
         mac = \"{mac}\"\n  ip = \"{ip}\"\n"
    )
}

fn cases(n: &Names) -> Vec<Case> {
    let (p1, p2) = (n.port("x"), n.port("y"));
    let (t1, t2) = (n.tap("x"), n.tap("y"));
    let head =
        "[[tenant]]\nname = \"acme\"\n  [[tenant.network]]\n  name = \"web\"\n  vni = 1001\n  \
                cidr = \"10.0.1.0/24\"\n";
    vec![
        Case {
            label: "unknown-network",
            toml: format!(
                "{head}{}{}",
                port_block(&p1, "web", &t1, "02:00:00:00:01:01", "10.0.1.10"),
                port_block(&p2, "nope", &t2, "02:00:00:00:01:02", "10.0.1.11")
            ),
            expect: vec![vec![format!("port \"{p2}\"")], vec!["\"nope\"".into()]],
        },
        Case {
            label: "duplicate-vni",
            toml: format!(
                "{head}{}[[tenant]]\nname = \"other\"\n  [[tenant.network]]\n  name = \"dupnet\"\n  \
                 vni = 1001\n  cidr = \"10.0.2.0/24\"\n",
                port_block(&p1, "web", &t1, "02:00:00:00:01:01", "10.0.1.10"),
            ),
            expect: vec![
                vec!["network \"dupnet\"".into(), "network \"web\"".into()],
                vec!["1001".into(), "vni".into()],
            ],
        },
        Case {
            label: "ip-outside-cidr",
            toml: format!(
                "{head}{}",
                port_block(&p1, "web", &t1, "02:00:00:00:01:01", "10.9.9.9")
            ),
            expect: vec![
                vec![format!("port \"{p1}\"")],
                vec!["10.9.9.9".into(), "cidr".into()],
            ],
        },
        Case {
            label: "bad-mac",
            toml: format!(
                "{head}{}",
                port_block(&p1, "web", &t1, "02:00:zz:00:01:01", "10.0.1.10")
            ),
            expect: vec![vec![format!("port \"{p1}\"")], vec!["mac".into()]],
        },
        Case {
            label: "multicast-mac",
            toml: format!(
                "{head}{}",
                port_block(&p1, "web", &t1, "03:00:00:00:01:01", "10.0.1.10")
            ),
            expect: vec![vec![format!("port \"{p1}\"")], vec!["mac".into()]],
        },
        Case {
            label: "unknown-key",
            toml: format!(
                "{head}{}  colour = \"red\"\n",
                port_block(&p1, "web", &t1, "02:00:00:00:01:01", "10.0.1.10")
            ),
            expect: vec![vec!["colour".into()]],
        },
    ]
}

#[test]
fn bad_config() {
    if !netns_or_skip() {
        return;
    }
    let n = Names::new("bad");
    let dir = TestDir::new();
    let b = bins();
    let mut failures = Vec::new();
    for case in cases(&n) {
        let path = dir.write(&format!("{}.toml", case.label), &case.toml);
        let path_s = path.to_string_lossy().into_owned();
        let sock = dir.file(&format!("{}.sock", case.label));
        let mut cmd = Command::new(&b.vswitchd);
        cmd.arg("--config").arg(&path).arg("--socket").arg(&sock);
        let out = run_timeout(&mut cmd, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut problems = Vec::new();
        if out.status.code() != Some(2) {
            problems.push(format!("exit status {} (want 2)", out.status));
        }
        if !stderr.contains(&path_s) {
            problems.push(format!("stderr does not name the file {path_s}"));
        }
        for group in &case.expect {
            if !group.iter().any(|e| stderr.contains(e.as_str())) {
                problems.push(format!("stderr does not contain any of {group:?}"));
            }
        }
        // --check must refuse it too
        let mut check = Command::new(&b.vswitchd);
        check.arg("--config").arg(&path).arg("--check");
        let co = run_timeout(&mut check, Duration::from_secs(10));
        if co.status.success() {
            problems.push("`vswitchd --check` accepted the file".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "case {}: {}\n  file:\n{}\n  {}",
                case.label,
                problems.join("; "),
                case.toml,
                fmt_output(&out).replace('\n', "\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "bad configs not refused as documented:\n\n{}",
        failures.join("\n\n")
    );

    // control: a good file passes --check
    let good =
        dir.write(
            "good.toml",
            &format!(
            "[[tenant]]\nname = \"acme\"\n  [[tenant.network]]\n  name = \"web\"\n  vni = 1001\n  \
             cidr = \"10.0.1.0/24\"\n{}",
            port_block(&n.port("x"), "web", &n.tap("x"), "02:00:00:00:01:01", "10.0.1.10")
        ),
        );
    let mut check = Command::new(&b.vswitchd);
    check.arg("--config").arg(&good).arg("--check");
    let co = run_timeout(&mut check, Duration::from_secs(10));
    assert!(
        co.status.success(),
        "--check of a good file:\n{}",
        fmt_output(&co)
    );
}

#[test]
fn reload_bad_config_keeps_running() {
    if !netns_or_skip() || !tools_or_skip(&["ping"]) {
        return;
    }
    let n = Names::new("rbk");
    let dir = TestDir::new();
    let (k1, k2) = (n.port("k1"), n.port("k2"));
    let mut cfg = Config::new();
    let t = cfg.tenant("acme");
    t.network("web", 1001, "10.0.5.0/24");
    t.port(&k1, "web", &n.tap("k1"), "02:00:0a:00:05:01", "10.0.5.1");
    t.port(&k2, "web", &n.tap("k2"), "02:00:0a:00:05:02", "10.0.5.2");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);

    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());
    lab.assert_ping(&k1, "10.0.5.2", 2);

    // bad: k2 moves to a network that does not exist, plus a new port
    let mut bad = cfg.clone();
    bad.tenant_mut("acme").ports[1].network = "nope".into();
    bad.tenant_mut("acme").port(
        &n.port("k3"),
        "web",
        &n.tap("k3"),
        "02:00:0a:00:05:03",
        "10.0.5.3",
    );
    bad.write(&path);
    let path_s = path.to_string_lossy().into_owned();

    for json in [true, false] {
        let mut cmd = Command::new(&bins().vswitchctl);
        cmd.arg("--socket").arg(sw.socket());
        if json {
            cmd.arg("--json");
        }
        cmd.arg("reload");
        let out = run_timeout(&mut cmd, Duration::from_secs(15));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "vswitchctl {}reload of a bad file must exit 1:\n{}",
            if json { "--json " } else { "" },
            fmt_output(&out)
        );
        assert!(
            stderr.contains(&path_s) && stderr.contains(&format!("port \"{k2}\"")),
            "reload error must name the file and port \"{k2}\":\n{}",
            fmt_output(&out)
        );
    }

    // still running with the old config
    let show = sw.show();
    let mut names: Vec<String> = show["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    assert_eq!(
        names,
        vec![k1.clone(), k2.clone()],
        "show after bad reload: {show}"
    );
    let p2 = find_port(&show, &k2).expect("k2");
    assert_eq!(p2["network"], "web", "k2 after bad reload: {p2}");
    assert!(!host_link_exists(&n.tap("k3")), "bad reload created a tap");
    lab.assert_ping(&k1, "10.0.5.2", 3);

    // SIGHUP with the bad file: same, the daemon keeps running
    sw.signal(rustix::process::Signal::HUP);
    lab.assert_ping(&k2, "10.0.5.1", 3);
    assert_eq!(
        sw.show()["ports"].as_array().map(Vec::len),
        Some(2),
        "SIGHUP with a bad file changed the port set"
    );
    // restore the good file so `vslab down` can read it
    cfg.write(&path);
}

/// What a corpus file's leading comment says about it.
#[derive(Debug, Default)]
struct Header {
    /// `# expect: TEXT`: substrings stderr must contain.
    expect: Vec<String>,
    /// `# host: NAME`: run with `--host NAME`.
    host: Option<String>,
    /// `# why: TEXT` lines, joined.
    why: String,
}

/// Parses the comment lines a corpus file starts with.
fn corpus_header(text: &str) -> Header {
    let mut h = Header::default();
    for line in text.lines() {
        let Some(c) = line.strip_prefix('#') else {
            break;
        };
        let c = c.trim();
        if let Some(e) = c.strip_prefix("expect:") {
            h.expect.push(e.trim().to_string());
        } else if let Some(n) = c.strip_prefix("host:") {
            h.host = Some(n.trim().to_string());
        } else if let Some(w) = c.strip_prefix("why:") {
            h.why.push_str(w.trim());
            h.why.push(' ');
        }
    }
    h
}

fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// `NN-short-name.toml`: two digits, a dash, lower-case words.
fn corpus_name_ok(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let Some(stem) = name.strip_suffix(".toml") else {
        return false;
    };
    let b = stem.as_bytes();
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    (2..=3).contains(&digits)
        && b.len() > digits + 1
        && b[digits] == b'-'
        && b[digits + 1..]
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// Every file in `tests/bad-configs/` is refused by `vswitchd --check` with
/// exit status 2 and `error: ` lines that name the file and contain each of
/// the file's `# expect:` substrings (the item and the fix). Only `--check`,
/// so no namespaces are needed.
#[test]
fn every_bad_config_in_the_corpus_is_refused_with_file_item_and_fix() {
    let dir = workspace_root().join("tests").join("bad-configs");
    let files = corpus_files(&dir);
    assert!(
        files.len() >= 40,
        "expected at least 40 bad configs in {}, found {}",
        dir.display(),
        files.len()
    );
    let b = bins();
    let mut failures = Vec::new();
    let mut numbers = std::collections::HashSet::new();
    for path in &files {
        let path_s = path.to_string_lossy().into_owned();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path_s}: {e}"));
        let h = corpus_header(&text);
        let mut problems = Vec::new();
        if !corpus_name_ok(path) {
            problems.push("file name is not NN-short-name.toml".to_string());
        } else if !numbers.insert(name.split('-').next().unwrap_or_default().to_string()) {
            problems.push(format!(
                "number {} is used twice",
                name.split('-').next().unwrap_or_default()
            ));
        }
        if h.expect.is_empty() {
            problems.push("no `# expect:` line".into());
        }
        if h.why.trim().is_empty() {
            problems.push("no `# why:` line".into());
        }

        let mut cmd = Command::new(&b.vswitchd);
        cmd.arg("--config").arg(path).arg("--check");
        if let Some(host) = &h.host {
            cmd.arg("--host").arg(host);
        }
        let out = run_timeout(&mut cmd, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() != Some(2) {
            problems.push(format!("{} (want exit status 2)", out.status));
        }
        if stderr.trim().is_empty() {
            problems.push("stderr is empty".into());
        }
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            if !line.starts_with("error: ") {
                problems.push(format!(
                    "stderr line does not start with `error: `: {line:?}"
                ));
            }
        }
        if !stderr.contains(&path_s) {
            problems.push(format!("stderr does not name the file {path_s}"));
        }
        for e in &h.expect {
            if !stderr.contains(e.as_str()) {
                problems.push(format!("stderr does not contain {e:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{name} ({}):\n  - {}\n  {}",
                h.why.trim(),
                problems.join("\n  - "),
                fmt_output(&out).replace('\n', "\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad configs in {} were not refused as their header says:\n\n{}",
        failures.len(),
        files.len(),
        dir.display(),
        failures.join("\n\n")
    );
}
