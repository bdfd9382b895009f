//! `vswitchctl`: talks to a running vswitchd over its control socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;
use vswitch::control::{self, ClientError, Request};
use vswitch::table::Table;

/// Query and steer a running vswitchd.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Control socket of the daemon.
    #[arg(long, global = true, default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Networks and ports with counters and drops.
    Show,
    /// MAC tables.
    Fdb {
        /// Only this network: TENANT/NETWORK, or NETWORK if unique.
        #[arg(long)]
        network: Option<String>,
    },
    /// Re-read the config file; a bad file keeps the running config.
    Reload,
    /// Every counter in one place: per port (packets, bytes, drops by
    /// reason), per VXLAN peer, per security-group rule, per NAT pool.
    Stats,
    /// Graceful restart: the daemon saves its connections (NAT, security
    /// groups) to its state directory, keeps the VMs' taps and exits;
    /// start vswitchd again (a supervisor does) and it restores them.
    Restart,
    /// DHCP leases: MAC, IP, host name, state, expiry, port.
    Leases {
        /// Only this network: TENANT/NETWORK, or NETWORK.
        #[arg(long)]
        network: Option<String>,
    },
    /// Tracked connections: both directions' addresses (NAT shows as a
    /// reply that is not the mirror of the original), state, expiry.
    Conntrack {
        /// `flush`: forget the tracked connections of `--port`.
        #[arg(value_parser = ["flush"])]
        action: Option<String>,
        /// Only this tenant's connections.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this port's connections (required by `flush`).
        #[arg(long)]
        port: Option<String>,
    },
    /// Security groups: rules with hit counters; filtered ports with their
    /// groups, tracked connections and drops.
    Sg {
        /// Only this port.
        #[arg(long)]
        port: Option<String>,
    },
    /// The uplink, NAT rules (SNAT, floating IPs, port forwards), port
    /// pools, mappings and counters.
    Nat,
    /// Load balancers: each VIP's backends with health, weight, Maglev
    /// slots and live connections (set a weight to 0 and reload to drain).
    Lb,
    /// Explain a packet's path in tenant terms: walk a synthetic packet from
    /// a port through the real pipeline (nothing is sent or committed), or
    /// with --live trace the next real packets arriving at the port.
    Trace {
        /// Port the packet enters at (a VM's port or the uplink).
        #[arg(long)]
        port: String,
        /// The packet: 'tcp 10.0.1.10:40000 > 10.0.2.20:80 [syn|synack|ack|fin|rst]',
        /// 'udp A:P > B:Q', 'icmp A > B [reply]', 'arp A > B'.
        flow: Option<String>,
        /// Trace the next N real packets from the port instead (at most 100).
        #[arg(long, value_name = "N")]
        live: Option<u64>,
        /// With --live: only packets matching this filter (capture syntax).
        #[arg(long)]
        filter: Option<String>,
        /// With --live: give up after this many seconds (default 10, max 60).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Capture a port's frames as pcapng (tcpdump, tshark, Wireshark read it).
    Capture {
        /// Port name (for --stage underlay: only that port's frames;
        /// --stage uplink needs none).
        #[arg(long)]
        port: Option<String>,
        /// Stages: rx (from the VM), tx (to the VM), drop (with the reason
        /// as a packet comment); comma-separated, default all. Or, alone:
        /// underlay (the VXLAN datagrams to and from peers, outer headers
        /// included; filters match the inner frame) or uplink (the uplink
        /// port's rx, tx and drops).
        #[arg(long, value_delimiter = ',')]
        stage: Option<Vec<String>>,
        /// Filter, a subset of tcpdump's syntax (docs/cli.md).
        #[arg(long)]
        filter: Option<String>,
        /// Stop after N frames (default: until interrupted).
        #[arg(long, short = 'c')]
        count: Option<u64>,
        /// Bytes kept per frame.
        #[arg(long, short = 's')]
        snaplen: Option<u32>,
        /// Write to FILE, or `-` for standard output (`... -w - | tcpdump -r -`).
        #[arg(short = 'w', required = true)]
        write: PathBuf,
    },
}

fn capture(socket: &std::path::Path, req: &Request, to: &std::path::Path) -> ExitCode {
    use std::io::{Read, Write};
    let mut stream = match control::capture_stream(socket, req) {
        Ok(s) => s,
        Err(e @ ClientError::Daemon(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    let mut out: Box<dyn Write> = if to.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        match std::fs::File::create(to) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("error: {}: {e}", to.display());
                return ExitCode::from(1);
            }
        }
    };
    // Copy as it comes, flushing each chunk, so a reader at the other end
    // of a pipe sees frames live.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    // The reader went away (e.g. `| head`): a normal end.
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("error: capture stream: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Cmd::Capture {
        port,
        stage,
        filter,
        count,
        snaplen,
        write,
    } = &args.cmd
    {
        let req = Request::Capture {
            port: port.clone(),
            stages: stage.clone(),
            filter: filter.clone(),
            count: *count,
            snaplen: *snaplen,
        };
        return capture(&args.socket, &req, write);
    }
    let req = match &args.cmd {
        Cmd::Show => Request::Show {},
        Cmd::Fdb { network } => Request::Fdb {
            network: network.clone(),
        },
        Cmd::Reload => Request::Reload {},
        Cmd::Stats => Request::Stats {},
        Cmd::Restart => Request::Restart {},
        Cmd::Leases { network } => Request::Leases {
            network: network.clone(),
        },
        Cmd::Conntrack {
            action: Some(_),
            port,
            ..
        } => match port {
            Some(p) => Request::ConntrackFlush { port: p.clone() },
            None => {
                eprintln!("error: conntrack flush needs --port PORT");
                return ExitCode::from(2);
            }
        },
        Cmd::Conntrack { tenant, port, .. } => Request::Conntrack {
            tenant: tenant.clone(),
            port: port.clone(),
        },
        Cmd::Sg { port } => Request::Sg { port: port.clone() },
        Cmd::Nat => Request::Nat {},
        Cmd::Lb => Request::Lb {},
        Cmd::Trace {
            port,
            flow,
            live,
            filter,
            timeout,
        } => Request::Trace {
            port: port.clone(),
            flow: flow.clone(),
            live: *live,
            filter: filter.clone(),
            timeout: *timeout,
        },
        Cmd::Capture { .. } => return ExitCode::from(2),
    };
    match control::request(&args.socket, &req) {
        Ok(data) => {
            if args.json {
                println!("{data}");
            } else {
                print!("{}", render(&args.cmd, &data));
            }
            ExitCode::SUCCESS
        }
        Err(e @ ClientError::Daemon(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render(cmd: &Cmd, d: &Value) -> String {
    match cmd {
        Cmd::Show => render_show(d),
        Cmd::Fdb { .. } => render_fdb(d),
        Cmd::Leases { .. } => render_leases(d),
        Cmd::Conntrack {
            action: Some(_), ..
        } => format!(
            "flushed {} security-group and {} NAT connections of port {}\n",
            s(&d["flushed"]["sg"]),
            s(&d["flushed"]["nat"]),
            s(&d["port"])
        ),
        Cmd::Conntrack { .. } => render_conntrack(d),
        Cmd::Sg { .. } => render_sg(d),
        Cmd::Stats => render_stats(d),
        Cmd::Nat => render_nat(d),
        Cmd::Lb => render_lb(d),
        Cmd::Trace { .. } => render_trace(d),
        Cmd::Capture { .. } => String::new(),
        Cmd::Restart => {
            "vswitchd is stopping for a restart: connections saved, taps kept; start it again\n"
                .into()
        }
        Cmd::Reload => {
            let list = |k: &str| {
                let v: Vec<String> = d[k]
                    .as_array()
                    .map(|a| a.iter().map(s).collect())
                    .unwrap_or_default();
                if v.is_empty() {
                    "-".to_string()
                } else {
                    v.join(", ")
                }
            };
            format!(
                "reloaded\n  ports added:      {}\n  ports removed:    {}\n  ports changed:    {}\n  networks added:   {}\n  networks removed: {}\n",
                list("added_ports"), list("removed_ports"), list("changed_ports"),
                list("added_networks"), list("removed_networks")
            )
        }
    }
}

fn render_show(d: &Value) -> String {
    let offl = &d["offloads"];
    let on: Vec<&str> = ["csum", "tso4", "tso6", "uso"]
        .into_iter()
        .filter(|k| offl[*k] == Value::Bool(true))
        .collect();
    let mut out = format!(
        "vswitchd: config {}, up {} s, {} workers, tap offloads: {}\n\n",
        s(&d["config"]),
        s(&d["uptime_secs"]),
        s(&d["workers"]),
        if on.is_empty() {
            "-".to_string()
        } else {
            on.join(",")
        }
    );
    let mut t = Table::new(&[
        "TENANT", "NETWORK", "VNI", "CIDR", "GATEWAY", "PORTS", "MACS",
    ]);
    for n in d["networks"].as_array().into_iter().flatten() {
        t.row(vec![
            s(&n["tenant"]),
            s(&n["name"]),
            s(&n["vni"]),
            s(&n["cidr"]),
            s(&n["gateway"]),
            n["ports"].as_array().map_or(0, Vec::len).to_string(),
            format!("{}/{}", s(&n["mac_entries"]), s(&n["mac_table_size"])),
        ]);
    }
    out.push_str(&t.render());
    out.push('\n');
    let mut t = Table::new(&[
        "PORT", "TENANT", "NETWORK", "TAP", "MAC", "IP", "LINK", "RX PKTS", "RX BYTES", "TX PKTS",
        "TX BYTES", "DROPS",
    ]);
    for p in d["ports"].as_array().into_iter().flatten() {
        t.row(vec![
            s(&p["name"]),
            s(&p["tenant"]),
            s(&p["network"]),
            s(&p["tap"]),
            s(&p["mac"]),
            s(&p["ip"]),
            s(&p["link"]),
            s(&p["rx_packets"]),
            s(&p["rx_bytes"]),
            s(&p["tx_packets"]),
            s(&p["tx_bytes"]),
            drops_text(&p["drops"]),
        ]);
    }
    out.push_str(&t.render());
    let ul = &d["underlay"];
    if ul.is_object() {
        out.push_str(&format!(
            "\nunderlay: host {} at {}:{}, MTU {} (overlay {}), ttl {}, {} source ports; from non-peers {}, receive errors {}\n",
            s(&ul["host"]), s(&ul["address"]), s(&ul["port"]), s(&ul["mtu"]), s(&ul["overlay_mtu"]),
            s(&ul["ttl"]), ul["src_ports"].as_array().map_or(0, Vec::len),
            s(&ul["rx_not_peer"]), s(&ul["rx_errors"]),
        ));
        let mut t = Table::new(&[
            "PEER", "VTEP", "NETWORKS", "RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES", "DROPS",
        ]);
        for p in ul["peers"].as_array().into_iter().flatten() {
            let nets: Vec<String> = p["networks"]
                .as_array()
                .map(|v| v.iter().map(s).collect())
                .unwrap_or_default();
            t.row(vec![
                s(&p["name"]),
                s(&p["address"]),
                if nets.is_empty() {
                    "-".into()
                } else {
                    nets.join(",")
                },
                s(&p["rx_packets"]),
                s(&p["rx_bytes"]),
                s(&p["tx_packets"]),
                s(&p["tx_bytes"]),
                drops_text(&p["drops"]),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

fn drops_text(d: &Value) -> String {
    let drops: Vec<String> = d
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    if drops.is_empty() {
        "0".into()
    } else {
        drops.join(" ")
    }
}

fn render_fdb(d: &Value) -> String {
    let mut out = String::new();
    for n in d["networks"].as_array().into_iter().flatten() {
        let st = &n["stats"];
        out.push_str(&format!(
            "{}/{} (VNI {}): {}/{} entries; learned {} moved {} aged {} evicted {} hijack_refused {} table_full {}\n",
            s(&n["tenant"]), s(&n["network"]), s(&n["vni"]), s(&n["count"]), s(&n["mac_table_size"]),
            s(&st["learned"]), s(&st["moved"]), s(&st["aged"]), s(&st["evicted"]),
            s(&st["hijack_refused"]), s(&st["table_full"]),
        ));
        let mut t = Table::new(&["  MAC", "PORT", "VTEP", "KIND", "AGE"]);
        for e in n["entries"].as_array().into_iter().flatten() {
            t.row(vec![
                format!("  {}", s(&e["mac"])),
                s(&e["port"]),
                s(&e["vtep"]),
                s(&e["kind"]),
                format!("{}s", s(&e["age_secs"])),
            ]);
        }
        out.push_str(&t.render());
        out.push('\n');
    }
    out
}

fn render_leases(d: &Value) -> String {
    let mut out = String::new();
    for n in d["networks"].as_array().into_iter().flatten() {
        let st = &n["stats"];
        out.push_str(&format!(
            "{}/{}: ack {} nak {} offer {} decline {} release {} pool_exhausted {} chaddr_mismatch {} persist_failures {}\n",
            s(&n["tenant"]), s(&n["network"]), s(&st["ack"]), s(&st["nak"]), s(&st["offer"]),
            s(&st["decline"]), s(&st["release"]), s(&st["pool_exhausted"]),
            s(&st["chaddr_mismatch"]), s(&st["persist_failures"]),
        ));
        let mut t = Table::new(&[
            "  MAC", "IP", "HOSTNAME", "STATE", "EXPIRES", "PORT", "RESERVED",
        ]);
        for l in n["leases"].as_array().into_iter().flatten() {
            t.row(vec![
                format!("  {}", s(&l["mac"])),
                s(&l["ip"]),
                s(&l["hostname"]),
                s(&l["state"]),
                format!("{}s", s(&l["expires_in_secs"])),
                s(&l["port"]),
                s(&l["reserved"]),
            ]);
        }
        out.push_str(&t.render());
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("no network has DHCP\n");
    }
    out
}

fn render_conntrack(d: &Value) -> String {
    let mut out = format!(
        "{} connections shown ({} tracked: {} by NAT, max {}; {} by security groups)\n",
        s(&d["count"]),
        s(&d["total"]),
        s(&d["nat"]["total"]),
        s(&d["nat"]["max_entries"]),
        s(&d["sg"]["total"])
    );
    let mut t = Table::new(&[
        "TABLE",
        "PROTO",
        "ZONE",
        "ORIGINAL",
        "REPLY ZONE",
        "REPLY",
        "STATE",
        "BY",
        "PORT",
        "EXPIRES",
        "PKTS",
        "BYTES",
    ]);
    for e in d["entries"].as_array().into_iter().flatten() {
        let (o, r) = (&e["original"], &e["reply"]);
        let pair = |v: &Value| format!("{}/{}", s(&v[0]), s(&v[1]));
        let by = if e["table"] == "sg" {
            format!("rule {}", s(&e["rule"]["rule"]))
        } else {
            s(&e["nat"])
        };
        t.row(vec![
            s(&e["table"]),
            s(&o["proto"]),
            s(&o["zone"]),
            format!("{} > {}", s(&o["src"]), s(&o["dst"])),
            s(&r["zone"]),
            format!("{} > {}", s(&r["src"]), s(&r["dst"])),
            s(&e["state"]),
            by,
            s(&e["port"]),
            format!("{}s", s(&e["expires_secs"])),
            pair(&e["packets"]),
            pair(&e["bytes"]),
        ]);
    }
    out.push_str(&t.render());
    for table in ["nat", "sg"] {
        let stats: Vec<String> = d[table]["stats"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect()
            })
            .unwrap_or_default();
        let stats = if stats.is_empty() {
            "-".to_string()
        } else {
            stats.join(" ")
        };
        out.push_str(&format!("\n{table} counters: {stats}"));
    }
    out.push('\n');
    out
}

fn render_sg(d: &Value) -> String {
    let mut out = String::new();
    for t in d["tenants"].as_array().into_iter().flatten() {
        for g in t["groups"].as_array().into_iter().flatten() {
            out.push_str(&format!("{}/{}\n", s(&t["tenant"]), s(&g["name"])));
            let mut tb = Table::new(&[
                "  #",
                "DIRECTION",
                "FAMILY",
                "PROTO",
                "PORTS/ICMP",
                "REMOTE",
                "HITS",
            ]);
            for r in g["rules"].as_array().into_iter().flatten() {
                let what = if r["ports"].is_string() {
                    s(&r["ports"])
                } else if r["icmp_type"].is_number() {
                    format!("type {} code {}", s(&r["icmp_type"]), s(&r["icmp_code"]))
                } else {
                    "-".into()
                };
                tb.row(vec![
                    format!("  {}", s(&r["number"])),
                    s(&r["direction"]),
                    s(&r["family"]),
                    s(&r["proto"]),
                    what,
                    s(&r["remote"]),
                    s(&r["hits"]),
                ]);
            }
            out.push_str(&tb.render());
            out.push('\n');
        }
    }
    let mut tb = Table::new(&["PORT", "TENANT", "GROUPS", "CONNECTIONS", "DROPS"]);
    for p in d["ports"].as_array().into_iter().flatten() {
        let groups: Vec<String> = p["groups"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        tb.row(vec![
            s(&p["port"]),
            s(&p["tenant"]),
            groups.join(","),
            format!("{}/{}", s(&p["connections"]), s(&p["max_connections"])),
            drops_text(&p["drops"]),
        ]);
    }
    if tb.is_empty() {
        out.push_str("no port is filtered (no tenant defines a security_group)\n");
    } else {
        out.push_str(&tb.render());
    }
    out
}

fn render_lb(d: &Value) -> String {
    let mut out = String::new();
    let lbs = d["load_balancers"].as_array().cloned().unwrap_or_default();
    if lbs.is_empty() {
        return "no load balancers on this host\n".into();
    }
    for l in lbs {
        out.push_str(&format!(
            "{}/{}: {} {}{} -> network {}, check {}\n",
            s(&l["tenant"]),
            s(&l["name"]),
            s(&l["proto"]),
            s(&l["vip"]),
            if l["external"].as_bool() == Some(true) {
                " (external)"
            } else {
                ""
            },
            s(&l["network"]),
            s(&l["check"]),
        ));
        let mut t = Table::new(&[
            "BACKEND",
            "ENDPOINT",
            "WEIGHT",
            "HEALTH",
            "NEW CONNS",
            "SLOTS",
            "CONNECTIONS",
            "PROBES",
            "FAILED",
            "LAST ERROR",
        ]);
        for b in l["backends"].as_array().into_iter().flatten() {
            t.row(vec![
                s(&b["name"]),
                s(&b["endpoint"]),
                s(&b["weight"]),
                s(&b["health"]),
                if b["eligible"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                s(&b["slots"]),
                s(&b["connections"]),
                s(&b["probes"]),
                s(&b["probe_failures"]),
                s(&b["last_error"]),
            ]);
        }
        out.push_str(&t.render());
        out.push('\n');
    }
    let st = &d["stats"];
    out.push_str(&format!(
        "new {} forwarded {} replied {} rejected {} hairpin {} dropped {}\n",
        s(&st["new"]),
        s(&st["forwarded"]),
        s(&st["replied"]),
        s(&st["rejected"]),
        s(&st["hairpin"]),
        s(&st["dropped"])
    ));
    out
}

fn render_nat(d: &Value) -> String {
    let up = &d["uplink"];
    let mut out = if up.is_object() {
        format!(
            "uplink {}: {} via {} (mac {}), SNAT ports {}; {} connections in {} stripes\n\n",
            s(&up["name"]),
            s(&up["address"]),
            s(&up["gateway"]),
            s(&up["mac"]),
            s(&up["snat_ports"]),
            s(&d["connections"]),
            s(&d["stripes"])
        )
    } else {
        "this host has no uplink\n\n".to_string()
    };
    let mut t = Table::new(&["KIND", "TENANT", "WHAT", "EXTERNAL", "INSIDE"]);
    for r in d["snat"].as_array().into_iter().flatten() {
        t.row(vec![
            "snat".into(),
            s(&r["tenant"]),
            format!("network {}", s(&r["network"])),
            s(&r["external"]),
            s(&r["cidr"]),
        ]);
    }
    for r in d["floating_ips"].as_array().into_iter().flatten() {
        t.row(vec![
            "floating".into(),
            s(&r["tenant"]),
            format!("port {}", s(&r["port"])),
            s(&r["external"]),
            s(&r["inside"]),
        ]);
    }
    for r in d["port_forwards"].as_array().into_iter().flatten() {
        t.row(vec![
            format!("forward/{}", s(&r["proto"])),
            s(&r["tenant"]),
            format!("port {}", s(&r["port"])),
            s(&r["external"]),
            s(&r["inside"]),
        ]);
    }
    out.push_str(&t.render());
    if let Some(pools) = d["pools"].as_array() {
        let mut t = Table::new(&["POOL", "PROTO", "RANGE", "USED", "RESERVED"]);
        for p in pools {
            t.row(vec![
                s(&p["external"]),
                s(&p["proto"]),
                s(&p["range"]),
                s(&p["used"]),
                s(&p["reserved"]),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(maps) = d["mappings"].as_array() {
        let mut t = Table::new(&["MAPPING", "ZONE", "PROTO", "INSIDE", "EXTERNAL", "CONNS"]);
        for m in maps {
            t.row(vec![
                "eim".into(),
                s(&m["tenant"]),
                s(&m["proto"]),
                s(&m["inside"]),
                s(&m["external"]),
                s(&m["connections"]),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    let stats: Vec<String> = d["stats"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    out.push_str(&format!("\ncounters: {}\n", stats.join(" ")));
    out
}

fn render_stats(d: &Value) -> String {
    let mut t = Table::new(&[
        "PORT", "KIND", "TENANT", "NETWORK", "RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES", "DROPS",
    ]);
    for p in d["ports"].as_array().into_iter().flatten() {
        t.row(vec![
            s(&p["name"]),
            s(&p["kind"]),
            s(&p["tenant"]),
            s(&p["network"]),
            s(&p["rx_packets"]),
            s(&p["rx_bytes"]),
            s(&p["tx_packets"]),
            s(&p["tx_bytes"]),
            drops_text(&p["drops"]),
        ]);
    }
    let mut out = t.render();
    if let Some(peers) = d["peers"].as_array().filter(|a| !a.is_empty()) {
        let mut t = Table::new(&[
            "PEER", "VTEP", "RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES", "DROPS",
        ]);
        for p in peers {
            t.row(vec![
                s(&p["name"]),
                s(&p["address"]),
                s(&p["rx_packets"]),
                s(&p["rx_bytes"]),
                s(&p["tx_packets"]),
                s(&p["tx_bytes"]),
                drops_text(&p["drops"]),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(rules) = d["sg_rules"].as_array().filter(|a| !a.is_empty()) {
        let mut t = Table::new(&["TENANT", "GROUP", "RULE", "DIRECTION", "HITS"]);
        for r in rules {
            t.row(vec![
                s(&r["tenant"]),
                s(&r["group"]),
                s(&r["rule"]),
                s(&r["direction"]),
                s(&r["hits"]),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(pools) = d["nat_pools"].as_array().filter(|a| !a.is_empty()) {
        let mut t = Table::new(&["NAT POOL", "PROTO", "RANGE", "USED", "FREE"]);
        for p in pools {
            t.row(vec![
                s(&p["external"]),
                s(&p["proto"]),
                s(&p["range"]),
                s(&p["used"]),
                s(&p["free"]),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(bs) = d["lb_backends"].as_array().filter(|a| !a.is_empty()) {
        let mut t = Table::new(&[
            "LOAD BALANCER",
            "VIP",
            "BACKEND",
            "HEALTH",
            "CONNS",
            "PROBES",
            "FAILED",
        ]);
        for b in bs {
            t.row(vec![
                format!("{}/{}", s(&b["tenant"]), s(&b["load_balancer"])),
                s(&b["vip"]),
                format!("{} ({})", s(&b["backend"]), s(&b["endpoint"])),
                s(&b["health"]),
                s(&b["connections"]),
                s(&b["probes"]),
                s(&b["probe_failures"]),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out.push_str(&format!(
        "\nconnections: {} NAT, {} security groups\n",
        s(&d["connections"]["nat"]),
        s(&d["connections"]["sg"])
    ));
    out
}

/// One traced packet: its decisions, numbered, then its fate.
fn render_traced(out: &mut String, t: &Value) {
    let steps = t["steps"].as_array().cloned().unwrap_or_default();
    for (i, st) in steps.iter().enumerate() {
        out.push_str(&format!(
            "  {:>2}. {:<13} {}\n",
            i + 1,
            s(&st["stage"]),
            s(&st["text"])
        ));
    }
    out.push_str(&format!("  => {}\n", s(&t["verdict"])));
}

fn render_trace(d: &Value) -> String {
    let mut out = String::new();
    if d["mode"] == "live" {
        let packets = d["packets"].as_array().cloned().unwrap_or_default();
        for (i, p) in packets.iter().enumerate() {
            out.push_str(&format!(
                "packet {} at port {}: {}\n",
                i + 1,
                s(&d["port"]),
                s(&p["packet"])
            ));
            render_traced(&mut out, p);
        }
        if d["timed_out"] == true {
            out.push_str(&format!(
                "({} of {} packets seen before the timeout)\n",
                packets.len(),
                s(&d["wanted"])
            ));
        }
        return out;
    }
    out.push_str(&format!(
        "trace of {} from port {} ({} -> {}); dry run: nothing sent, committed or counted\n",
        s(&d["packet"]),
        s(&d["port"]),
        s(&d["src_mac"]),
        s(&d["dst_mac"])
    ));
    render_traced(&mut out, d);
    out
}
