//! `vswitch::config::Config::parse` on arbitrary UTF-8 (seeded with the
//! example configs; `fuzz/dicts/config.dict` has the TOML keys).
//!
//! Asserts: never panics; parsing is deterministic; a rejected file names
//! at least one problem and has a non-empty message; an accepted file keeps
//! what the validator promises (ports name an existing network of their
//! tenant, unique port and tap names, taps at most 15 bytes, unicast MACs
//! and addresses unique per network, addresses inside the cidr and not the
//! gateway, unique VNIs, ports per network within mac_table_size); and for
//! every network with `[dhcp]` the `dhcp` crate accepts the server config the
//! daemon derives from it (otherwise a valid file would fail at apply time).
//!
//! Found this way and fixed: a /31 or /32 network with `[dhcp]` passed
//! validation while the DHCP server refuses subnets smaller than /30.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vswitch::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let r = Config::parse(path, text);
    let again = Config::parse(path, text);
    match (&r, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "parse is deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "parse is deterministic"),
        _ => panic!("parse is not deterministic"),
    }
    let cfg = match r {
        Ok(cfg) => cfg,
        Err(e) => {
            if let ConfigError::Invalid { problems, .. } = &e {
                assert!(!problems.is_empty(), "Invalid without problems");
            }
            assert!(!e.to_string().is_empty());
            return;
        }
    };

    assert_eq!(cfg.path, path);
    let mut vnis = HashSet::new();
    let mut nets = HashSet::new();
    for n in &cfg.networks {
        assert!(cfg.tenants.contains(&n.tenant));
        assert!(vnis.insert(n.vni), "VNI {} twice", n.vni);
        assert!(nets.insert(n.key()), "network {} twice", n.key());
        if let Some(gw) = n.gateway {
            assert!(n.cidr.contains(&gw), "gateway {gw} outside {}", n.cidr);
        }
        let ports = cfg.ports.iter().filter(|p| p.net_key() == n.key()).count();
        assert!(ports <= n.mac_table_size);
    }
    let mut names = HashSet::new();
    let mut taps = HashSet::new();
    let mut macs = HashSet::new();
    let mut ips = HashSet::new();
    for p in &cfg.ports {
        let net = cfg.network_of(p).expect("a port's network exists");
        assert!(names.insert(p.name.clone()), "port {} twice", p.name);
        assert!(taps.insert(p.tap.clone()), "tap {} twice", p.tap);
        assert!(!p.tap.is_empty() && p.tap.len() <= 15, "tap {:?}", p.tap);
        assert!(p.mac.is_unicast(), "port {} mac {}", p.name, p.mac);
        assert!(macs.insert((p.net_key(), p.mac)), "mac {} twice in {}", p.mac, p.net_key());
        if let Some(ip) = p.ip {
            assert!(net.cidr.contains(&ip), "port ip {ip} outside {}", net.cidr);
            assert_ne!(Some(ip), net.gateway, "port ip is the gateway");
            assert!(ips.insert((p.net_key(), ip)), "ip {ip} twice in {}", p.net_key());
        }
    }

    for n in &cfg.networks {
        if n.dhcp.is_none() {
            continue;
        }
        let sc = vswitch::dhcp_service::server_config(&cfg, n)
            .unwrap_or_else(|| panic!("network {} has [dhcp] but no server config", n.key()));
        match dhcp::Server::new(sc) {
            Ok(_) => {}
            Err(e) => panic!("config accepted, but the DHCP server of {} refuses it: {e}", n.key()),
        }
    }
});
