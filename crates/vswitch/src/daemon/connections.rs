//! What the running switch tells about connections: `vswitchctl
//! conntrack` (NAT's table and the security groups' table), `conntrack
//! flush`, `nat` and `sg`.

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::{drop_map, Daemon};
use crate::clock::Timestamp;
use crate::config::Config;
use crate::dataplane::Snapshot;
use crate::pipeline::security;
use crate::pipeline::DropReason;

/// One direction's key as `vswitchctl` shows it, with its zone named by
/// `zone`.
fn side(k: &conntrack::ConnKey, zone: String) -> Value {
    let proto = conntrack::proto_name(k.proto, k.is_v6())
        .map_or_else(|| k.proto.to_string(), str::to_string);
    let (src, dst) = if k.is_icmp() {
        (
            k.src.to_string(),
            format!("{} (id {} type {})", k.dst, k.src_port, k.dst_port),
        )
    } else if k.src_port == 0 && k.dst_port == 0 {
        (k.src.to_string(), k.dst.to_string())
    } else {
        (
            SocketAddr::new(k.src, k.src_port).to_string(),
            SocketAddr::new(k.dst, k.dst_port).to_string(),
        )
    };
    json!({"zone": zone, "proto": proto, "src": src, "dst": dst})
}

/// Common fields of an entry.
fn entry_json<E>(
    e: &conntrack::EntryView<'_, E>,
    snap: &Snapshot,
    orig: Value,
    reply: Value,
) -> Value {
    json!({
        "original": orig, "reply": reply,
        "state": e.state.as_str(),
        "port": snap.location_name(e.port),
        "age_secs": e.age_ns / 1_000_000_000,
        "expires_secs": e.remaining_ns / 1_000_000_000,
        "packets": [e.stats[0].packets, e.stats[1].packets],
        "bytes": [e.stats[0].bytes, e.stats[1].bytes],
    })
}

/// The NAT zone's name: a tenant, or `external`.
fn nat_zone(cfg: &Config, z: u32) -> String {
    if z == nat::EXTERNAL_ZONE {
        "external".into()
    } else {
        cfg.tenant_of_zone(z).unwrap_or("?").to_string()
    }
}

impl Daemon {
    /// `conntrack` data: tracked connections of NAT (table `nat`) and of
    /// security groups (table `sg`, one zone per port), optionally of one
    /// tenant or one port (see docs/cli.md).
    pub fn conntrack(
        &self,
        tenant: Option<&str>,
        port: Option<&str>,
        now: Timestamp,
    ) -> Result<Value, String> {
        let cfg = self.config();
        let snap = self.shared.load();
        let zone = match tenant {
            None => None,
            Some(t) if cfg.tenants.iter().any(|x| x == t) => Some(cfg.zone_of(t)),
            Some(t) => {
                return Err(format!(
                    "no tenant {t:?}; tenants: {}",
                    cfg.tenants.join(", ")
                ))
            }
        };
        let port_id = match port {
            None => None,
            Some(p) => Some(
                snap.iter_ports()
                    .find(|x| x.name == p)
                    .map(|x| x.id)
                    .ok_or_else(|| format!("no port {p:?} on this host"))?,
            ),
        };
        let tenant_of_port = |id: crate::fdb::PortId| snap.port(id).map(|p| p.tenant.as_str());
        let mut entries: Vec<Value> = Vec::new();
        let (nat_total, nat_stats, max_entries) = {
            let nat = &self.nat;
            nat.for_each_entry(now.0, |e| {
                if zone.is_some_and(|z| e.orig.zone != z && e.reply.zone != z)
                    || port_id.is_some_and(|p| e.port != p)
                {
                    return;
                }
                let mut v = entry_json(
                    e,
                    &snap,
                    side(&e.orig, nat_zone(&cfg, e.orig.zone)),
                    side(&e.reply, nat_zone(&cfg, e.reply.zone)),
                );
                v["table"] = json!("nat");
                v["nat"] = json!(e.ext.kind);
                entries.push(v);
            });
            (
                nat.len(),
                serde_json::to_value(nat.conntrack_stats()).unwrap_or_default(),
                nat.max_entries(),
            )
        };
        let (sg_total, sg_stats) = {
            let ct = &self.sg_table;
            ct.for_each_entry(now.0, |e| {
                if zone.is_some_and(|_| tenant_of_port(e.port) != tenant)
                    || port_id.is_some_and(|p| e.port != p)
                {
                    return;
                }
                let name = snap
                    .port(e.port)
                    .map_or_else(|| "?".to_string(), |p| format!("port {}", p.name));
                let mut v = entry_json(e, &snap, side(&e.orig, name.clone()), side(&e.reply, name));
                v["table"] = json!("sg");
                v["rule"] = json!({"group": e.ext.rule.group, "rule": e.ext.rule.rule + 1,
                    "direction": e.ext.dir});
                entries.push(v);
            });
            (
                ct.len(),
                serde_json::to_value(ct.stats()).unwrap_or_default(),
            )
        };
        Ok(json!({
            "count": entries.len(), "total": nat_total + sg_total,
            "nat": {"total": nat_total, "max_entries": max_entries, "stats": nat_stats},
            "sg": {"total": sg_total, "stats": sg_stats},
            "entries": entries,
        }))
    }

    /// `conntrack flush --port P`: forgets the port's tracked connections
    /// (its security-group zone, and the NAT connections it created).
    pub fn conntrack_flush(&self, port: &str) -> Result<Value, String> {
        let snap = self.shared.load();
        let id = snap
            .iter_ports()
            .find(|x| x.name == port)
            .map(|x| x.id)
            .ok_or_else(|| format!("no port {port:?} on this host"))?;
        let sg = self.sg_table.flush_zone(security::zone_of(id));
        let nat = self.nat.flush_port(id);
        Ok(json!({"port": port, "flushed": {"sg": sg, "nat": nat}}))
    }

    /// `sg` data: each filtering tenant's groups with per-rule hit
    /// counters, and each filtered port's groups, tracked connections and
    /// drops (see docs/cli.md).
    pub fn sg(&self, port: Option<&str>) -> Result<Value, String> {
        let cfg = self.config();
        let snap = self.shared.load();
        if let Some(p) = port {
            if !snap.iter_ports().any(|x| x.name == p) {
                return Err(format!("no port {p:?} on this host"));
            }
        }
        let firewalls = self.state.lock().firewalls.clone();
        let ct = &self.sg_table;
        let mut tenants: Vec<Value> = Vec::new();
        for t in &cfg.tenants {
            let Some(fw) = firewalls.get(t) else { continue };
            let groups: Vec<Value> = cfg
                .tenant_groups(t)
                .iter()
                .filter_map(|g| {
                    let gid = fw.group_id(&g.name)?;
                    let rules: Vec<Value> = g
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            let hits = fw.hits(firewall::RuleRef {
                                group: gid,
                                rule: u32::try_from(i).unwrap_or(u32::MAX),
                            });
                            json!({
                                "number": i + 1, "direction": r.direction, "family": r.family,
                                "proto": r.proto,
                                "ports": r.ports.map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }),
                                "icmp_type": r.icmp_type, "icmp_code": r.icmp_code,
                                "remote": match &r.remote {
                                    firewall::Remote::Any => "any".to_string(),
                                    firewall::Remote::Cidr(n) => n.to_string(),
                                    firewall::Remote::Group(g) => format!("group {g}"),
                                },
                                "hits": hits,
                            })
                        })
                        .collect();
                    Some(json!({"name": g.name, "rules": rules}))
                })
                .collect();
            tenants.push(json!({"tenant": t, "groups": groups}));
        }
        let ports: Vec<Value> = snap
            .iter_ports()
            .filter(|p| port.is_none_or(|n| n == p.name))
            .filter_map(|p| {
                let sg = p.sg.as_ref()?;
                let names: Vec<String> = cfg
                    .ports
                    .iter()
                    .find(|c| c.name == p.name)
                    .map(|c| cfg.port_groups(c))
                    .unwrap_or_default();
                let (drops, _) = drop_map(|r| match r {
                    DropReason::SgIngressDenied
                    | DropReason::SgEgressDenied
                    | DropReason::ConnLimit
                    | DropReason::ConnInvalid => p.counters.drops(r),
                    _ => 0,
                });
                Some(json!({
                    "port": p.name, "tenant": p.tenant, "groups": names,
                    "connections": ct.port_count(security::zone_of(p.id), p.id), "max_connections": sg.max_connections,
                    "drops": drops,
                }))
            })
            .collect();
        Ok(json!({"tenants": tenants, "ports": ports, "connections": ct.len()}))
    }

    /// `nat` data: this host's external addresses, rules, port pools,
    /// mappings and counters (see docs/cli.md).
    /// `vswitchctl lb`: every load balancer this host runs, its backends'
    /// health, weight, Maglev slots and live connections.
    pub fn lb(&self) -> Value {
        let cfg = self.config();
        let now = Timestamp::now().0;
        let conns = self.lasting.lb.connections(now);
        let stats = self.lasting.lb.service_stats();
        let status = self.lasting.balancers.status();
        let mut lbs = Vec::new();
        for l in cfg.load_balancers.iter().filter(|l| cfg.runs_lb(l)) {
            let views = status
                .iter()
                .find(|(id, ..)| *id == l.id)
                .map(|(_, _, _, v)| v.clone())
                .unwrap_or_default();
            let backends: Vec<Value> = l
                .backends
                .iter()
                .map(|b| {
                    let ep = format!("{}:{}", b.ip, b.port);
                    let v = views.iter().find(|v| v.endpoint == ep);
                    let id = lb::BackendId::from_name(&ep);
                    json!({
                        "name": b.name,
                        "endpoint": ep,
                        "host": b.host,
                        "weight": b.weight,
                        "health": v.map(|v| v.health).unwrap_or("unknown"),
                        "eligible": v.is_some_and(|v| v.eligible),
                        "slots": v.map(|v| v.slots).unwrap_or(0),
                        "probes": v.map(|v| v.probes).unwrap_or(0),
                        "probe_failures": v.map(|v| v.failures).unwrap_or(0),
                        "last_error": v.and_then(|v| v.last_error.clone()),
                        "connections": conns.get(&(l.id, id)).copied().unwrap_or(0),
                    })
                })
                .collect();
            lbs.push(json!({
                "tenant": l.tenant,
                "name": l.name,
                "vip": format!("{}:{}", l.vip, l.port),
                "proto": l.proto_name(),
                "external": l.external,
                "network": l.network,
                "check": match &l.pool.check {
                    lb::Check::Tcp => "tcp".to_string(),
                    lb::Check::Http { path, expected_status } => format!("http GET {path} -> {expected_status}"),
                },
                "backends": backends,
            }));
        }
        json!({
            "load_balancers": lbs,
            "stats": stats,
            "prober_inbox_dropped": self.lasting.balancers.inbox_dropped.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    pub fn nat(&self) -> Value {
        let cfg = self.config();
        let here = |h: &Option<String>| h.as_deref() == cfg.local_host.as_deref();
        let up = cfg.local_uplink();
        let snat: Vec<Value> = cfg
            .networks
            .iter()
            .filter(|n| n.snat && up.is_some())
            .map(|n| {
                json!({"tenant": n.tenant, "network": n.name, "cidr": n.cidr.to_string(),
                "external": up.map(|u| u.ip().to_string())})
            })
            .collect();
        let floating: Vec<Value> = cfg
            .floating_ips
            .iter()
            .filter(|f| here(&f.host))
            .map(|f| {
                json!({"tenant": f.tenant, "port": f.port, "external": f.address.to_string(),
                "inside": f.inside.to_string()})
            })
            .collect();
        let forwards: Vec<Value> = cfg
            .port_forwards
            .iter()
            .filter(|f| here(&f.host))
            .map(|f| {
                json!({"tenant": f.tenant, "port": f.port, "proto": f.proto,
                "external": f.external.to_string(), "inside": f.inside.to_string()})
            })
            .collect();
        let nat = &self.nat;
        let proto = |p: u8| match p {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            1 => "icmp".to_string(),
            p => p.to_string(),
        };
        let pools: Vec<Value> = nat
            .pools()
            .into_iter()
            .map(|p| {
                json!({"external": p.external.to_string(), "proto": proto(p.proto),
                "range": format!("{}-{}", p.range.0, p.range.1), "ports": p.ports,
                "used": p.used, "reserved": p.reserved, "free": p.free})
            })
            .collect();
        let mappings: Vec<Value> = nat
            .mappings()
            .into_iter()
            .map(|m| {
                json!({"tenant": cfg.tenant_of_zone(m.zone), "proto": proto(m.proto),
                "inside": m.inside.to_string(), "external": m.external.to_string(),
                "connections": m.connections})
            })
            .collect();
        json!({
            "pools": pools, "mappings": mappings,
            "uplink": up.map(|u| json!({"name": u.name, "address": u.addr.to_string(),
                "gateway": u.gateway.map(|g| g.to_string()), "mac": u.mac.to_string(),
                "snat_ports": format!("{}-{}", u.snat_ports.0, u.snat_ports.1)})),
            "snat": snat, "floating_ips": floating, "port_forwards": forwards,
            "connections": nat.len(), "stripes": nat.count(),
            "stats": nat.stats(),
        })
    }
}

impl Daemon {
    /// `stats` data: every counter in one answer, per port (packets, bytes,
    /// drops by reason), per VXLAN peer, per security-group rule, per NAT
    /// pool, per load-balancer backend, and the connection tables (see
    /// docs/cli.md).
    pub fn stats(&self) -> Value {
        let show = self.show();
        let keep = |v: &Value, keys: &[&str]| -> Value {
            let mut o = serde_json::Map::new();
            for k in keys {
                o.insert((*k).to_string(), v[*k].clone());
            }
            Value::Object(o)
        };
        let counters = [
            "name",
            "kind",
            "tenant",
            "network",
            "rx_packets",
            "rx_bytes",
            "tx_packets",
            "tx_bytes",
            "drops_total",
            "drops",
        ];
        let ports: Vec<Value> = show["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| keep(p, &counters))
            .collect();
        let peers: Vec<Value> = show["underlay"]["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                keep(
                    p,
                    &[
                        "name",
                        "address",
                        "rx_packets",
                        "rx_bytes",
                        "tx_packets",
                        "tx_bytes",
                        "drops_total",
                        "drops",
                    ],
                )
            })
            .collect();
        let sg = self.sg(None).unwrap_or(Value::Null);
        let rules: Vec<Value> = sg["tenants"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| {
                t["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(move |g| {
                        g["rules"].as_array().into_iter().flatten().map(move |r| {
                            json!({"tenant": t["tenant"], "group": g["name"], "rule": r["number"],
                            "direction": r["direction"], "hits": r["hits"]})
                        })
                    })
            })
            .collect();
        let nat = self.nat();
        let lb = self.lb();
        let backends: Vec<Value> =
            lb["load_balancers"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|l| {
                    l["backends"].as_array().into_iter().flatten().map(move |b| {
                    json!({"tenant": l["tenant"], "load_balancer": l["name"], "vip": l["vip"],
                    "backend": b["name"], "endpoint": b["endpoint"], "health": b["health"],
                    "connections": b["connections"], "probes": b["probes"],
                    "probe_failures": b["probe_failures"]})
                })
                })
                .collect();
        json!({
            "ports": ports, "peers": peers, "sg_rules": rules, "lb_backends": backends,
            "lb": lb["stats"],
            "nat_pools": nat["pools"], "nat": nat["stats"],
            "connections": {"nat": nat["connections"], "sg": sg["connections"]},
            "underlay": keep(&show["underlay"], &["rx_not_peer", "rx_errors"]),
        })
    }
}

/// File under the state directory holding connections across a graceful
/// restart (`vswitchctl restart`).
pub const SAVED_CONNECTIONS: &str = "connections.json";
/// A saved-connections file older than this is ignored (its connections
/// have long been given up by their peers).
pub const SAVED_MAX_AGE_SECS: u64 = 300;

/// What `vswitchctl restart` saves.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Saved {
    version: u32,
    /// Wall-clock seconds when saved.
    saved_at: u64,
    /// Port ids by name: security-group zones are port ids, so they are
    /// restored only if every saved port has the same id again.
    ports: std::collections::BTreeMap<String, u32>,
    nat: nat::NatSnapshot,
    sg: conntrack::Snapshot<security::SgConn>,
    /// The load balancer's connections (absent in files of older
    /// versions).
    #[serde(default)]
    lb: Option<conntrack::Snapshot<lb::LbConn>>,
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Daemon {
    fn port_ids(&self) -> std::collections::BTreeMap<String, u32> {
        self.shared
            .load()
            .iter_ports()
            .map(|p| (p.name.clone(), p.id))
            .collect()
    }

    /// Writes NAT's and the security groups' connections to the state
    /// directory (before a restart); the number saved.
    pub fn save_connections(&self) -> std::io::Result<usize> {
        let now = Timestamp::now().0;
        let saved = Saved {
            version: 1,
            saved_at: unix_secs(),
            ports: self.port_ids(),
            nat: self.nat.export(now),
            sg: self.sg_table.export(now),
            lb: Some(self.lasting.lb.export(now)),
        };
        let n = saved.nat.conntrack.entries.len()
            + saved.sg.entries.len()
            + saved.lb.as_ref().map_or(0, |l| l.entries.len());
        let text = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        std::fs::create_dir_all(&self.state_dir)?;
        let path = self.state_dir.join(SAVED_CONNECTIONS);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        Ok(n)
    }

    /// Restores connections saved by a graceful restart, once: the file is
    /// removed whatever happens. A missing file is normal (a first start or
    /// a crash); a stale, unreadable or mismatched one is logged and
    /// ignored.
    pub fn restore_connections(&self) {
        let path = self.state_dir.join(SAVED_CONNECTIONS);
        let Ok(text) = std::fs::read(&path) else {
            return;
        };
        let _ = std::fs::remove_file(&path);
        let saved: Saved = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "saved connections unreadable; ignored");
                return;
            }
        };
        let age = unix_secs().saturating_sub(saved.saved_at);
        if saved.version != 1 || age > SAVED_MAX_AGE_SECS {
            tracing::warn!(file = %path.display(), age_secs = age, "saved connections too old or of another version; ignored");
            return;
        }
        let now = Timestamp::now().0;
        match self.nat.import(saved.nat, now) {
            Ok(r) => tracing::info!(report = ?r, "NAT connections restored"),
            Err(e) => tracing::warn!(error = %e, "NAT connections not restored"),
        }
        // Zones are tenants' (stable); a backend is pinned by its entry.
        if let Some(l) = saved.lb {
            match self.lasting.lb.import(l, now) {
                Ok(r) => tracing::info!(report = ?r, "load-balancer connections restored"),
                Err(e) => tracing::warn!(error = %e, "load-balancer connections not restored"),
            }
        }
        let ids = self.port_ids();
        let same = saved
            .ports
            .iter()
            .all(|(name, id)| ids.get(name).is_none_or(|i| i == id));
        if !same {
            tracing::warn!("ports have other ids than before the restart; security-group connections not restored (established flows of filtered ports start over)");
            return;
        }
        match self.sg_table.import(saved.sg, now) {
            Ok(r) => tracing::info!(report = ?r, "security-group connections restored"),
            Err(e) => tracing::warn!(error = %e, "security-group connections not restored"),
        }
    }
}
