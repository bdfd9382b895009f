//! Capture filters: a documented subset of tcpdump's filter syntax
//! (pcap-filter(7)), evaluated on the flow key the pipeline already parsed,
//! so a filter costs no second parse and no libpcap.
//!
//! ```text
//! expr      := term ( ("or" | "||") term )*
//! term      := factor ( ("and" | "&&") factor )*
//! factor    := ("not" | "!") factor | "(" expr ")" | primitive
//! primitive := tcp | udp | icmp | icmp6 | arp | ip | ip6
//!            | (tcp|udp) [src|dst] port N   (the protocol qualifies the port)
//!            | [src|dst] host ADDR          (IPv4/IPv6; ARP sender/target too)
//!            | [src|dst] net PREFIX         (e.g. 10.0.1.0/24)
//!            | [src|dst] port N             (TCP or UDP)
//!            | [src|dst] portrange N-M
//!            | ether [src|dst] host MAC
//!            | vlan [N]
//! ```
//!
//! Juxtaposed primitives without `and` are an error (tcpdump's implicit
//! `and` and its qualifier inheritance, as in `host a or b`, are not
//! supported: write `host a or host b`).

use std::net::IpAddr;

use ipnet::IpNet;
use packet::{FlowKey, MacAddr, L3, L4};

/// Which end an address or port qualifier applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Src,
    Dst,
    Either,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Prim {
    Tcp,
    Udp,
    Icmp,
    Icmp6,
    Arp,
    Ip,
    Ip6,
    Host(Dir, IpAddr),
    Net(Dir, IpNet),
    Port(Dir, u16, u16),
    Ether(Dir, MacAddr),
    Vlan(Option<u16>),
}

/// A compiled filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// A primitive test.
    #[doc(hidden)]
    Prim(PrimBox),
    /// Both.
    And(Box<Filter>, Box<Filter>),
    /// Either.
    Or(Box<Filter>, Box<Filter>),
    /// Not.
    Not(Box<Filter>),
}

/// Opaque primitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimBox(Prim);

impl Filter {
    /// Compiles `text`; the error says what was expected where.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let toks = tokenize(text);
        if toks.is_empty() {
            return Err("empty filter".into());
        }
        if toks.len() > 256 {
            return Err("filter longer than 256 words".into());
        }
        let mut p = Parser {
            toks,
            i: 0,
            depth: 0,
        };
        let f = p.expr()?;
        match p.peek() {
            None => Ok(f),
            Some(t) => Err(format!(
                "unexpected {t:?} after a complete expression (join primitives with `and`/`or`)"
            )),
        }
    }

    /// Whether the frame with flow key `k` matches.
    pub fn matches(&self, k: &FlowKey) -> bool {
        match self {
            Filter::And(a, b) => a.matches(k) && b.matches(k),
            Filter::Or(a, b) => a.matches(k) || b.matches(k),
            Filter::Not(a) => !a.matches(k),
            Filter::Prim(PrimBox(p)) => prim(p, k),
        }
    }
}

fn addrs(k: &FlowKey) -> Option<(IpAddr, IpAddr)> {
    match k.l3 {
        L3::Ipv4(ip) | L3::Ipv6(ip) => Some((ip.src, ip.dst)),
        L3::Arp(a) => Some((IpAddr::V4(a.spa), IpAddr::V4(a.tpa))),
        L3::None => None,
    }
}

fn pick<T: Copy>(d: Dir, (s, t): (T, T), f: impl Fn(T) -> bool) -> bool {
    match d {
        Dir::Src => f(s),
        Dir::Dst => f(t),
        Dir::Either => f(s) || f(t),
    }
}

fn prim(p: &Prim, k: &FlowKey) -> bool {
    match p {
        Prim::Tcp => matches!(k.l4, L4::Tcp { .. }),
        Prim::Udp => matches!(k.l4, L4::Udp { .. }),
        Prim::Icmp => matches!(k.l4, L4::Icmpv4 { .. }),
        Prim::Icmp6 => matches!(k.l4, L4::Icmpv6 { .. }),
        Prim::Arp => matches!(k.l3, L3::Arp(_)),
        Prim::Ip => matches!(k.l3, L3::Ipv4(_)),
        Prim::Ip6 => matches!(k.l3, L3::Ipv6(_)),
        Prim::Host(d, a) => addrs(k).is_some_and(|pair| pick(*d, pair, |x| x == *a)),
        Prim::Net(d, n) => addrs(k).is_some_and(|pair| pick(*d, pair, |x| n.contains(&x))),
        Prim::Port(d, lo, hi) => k
            .ports()
            .is_some_and(|pair| pick(*d, pair, |x| (*lo..=*hi).contains(&x))),
        Prim::Ether(d, m) => pick(*d, (k.src_mac, k.dst_mac), |x| x == *m),
        Prim::Vlan(v) => match v {
            None => k.vlan.is_some(),
            Some(id) => k.vlan == Some(*id),
        },
    }
}

fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' | ')' | '!' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Parser {
    toks: Vec<String>,
    i: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.toks.get(self.i).map(String::as_str)
    }

    fn next(&mut self) -> Option<String> {
        let t = self.toks.get(self.i).cloned();
        self.i += 1;
        t
    }

    fn expr(&mut self) -> Result<Filter, String> {
        let mut l = self.term()?;
        while matches!(self.peek(), Some("or" | "||")) {
            self.i += 1;
            l = Filter::Or(Box::new(l), Box::new(self.term()?));
        }
        Ok(l)
    }

    fn term(&mut self) -> Result<Filter, String> {
        let mut l = self.factor()?;
        while matches!(self.peek(), Some("and" | "&&")) {
            self.i += 1;
            l = Filter::And(Box::new(l), Box::new(self.factor()?));
        }
        Ok(l)
    }

    fn factor(&mut self) -> Result<Filter, String> {
        self.depth += 1;
        if self.depth > 64 {
            return Err("filter nested too deeply".into());
        }
        let r = match self.peek() {
            Some("not" | "!") => {
                self.i += 1;
                Ok(Filter::Not(Box::new(self.factor()?)))
            }
            Some("(") => {
                self.i += 1;
                let e = self.expr()?;
                match self.next().as_deref() {
                    Some(")") => Ok(e),
                    other => Err(format!("expected `)`, found {other:?}")),
                }
            }
            _ => self.primitive().and_then(|p| {
                // `tcp port 80`, `udp dst port 53`: a protocol qualifying
                // the port primitive that follows.
                let proto = matches!(p, Prim::Tcp | Prim::Udp);
                let f = Filter::Prim(PrimBox(p));
                if proto && matches!(self.peek(), Some("port" | "portrange" | "src" | "dst")) {
                    let q = self.primitive()?;
                    Ok(Filter::And(Box::new(f), Box::new(Filter::Prim(PrimBox(q)))))
                } else {
                    Ok(f)
                }
            }),
        };
        self.depth -= 1;
        r
    }

    fn primitive(&mut self) -> Result<Prim, String> {
        let Some(t) = self.next() else {
            return Err("expected a primitive (tcp, host ADDR, port N, ...) at the end".into());
        };
        let dir = match t.as_str() {
            "src" => Some(Dir::Src),
            "dst" => Some(Dir::Dst),
            _ => None,
        };
        let word = if dir.is_some() {
            self.next()
                .ok_or("expected host, net, port or portrange after src/dst")?
        } else {
            t
        };
        let d = dir.unwrap_or(Dir::Either);
        let arg = |p: &mut Parser, what: &str| p.next().ok_or(format!("`{what}` needs a value"));
        Ok(match word.as_str() {
            "tcp" if dir.is_none() => Prim::Tcp,
            "udp" if dir.is_none() => Prim::Udp,
            "icmp" if dir.is_none() => Prim::Icmp,
            "icmp6" if dir.is_none() => Prim::Icmp6,
            "arp" if dir.is_none() => Prim::Arp,
            "ip" if dir.is_none() => Prim::Ip,
            "ip6" if dir.is_none() => Prim::Ip6,
            "host" => {
                let v = arg(self, "host")?;
                Prim::Host(d, v.parse().map_err(|_| format!("host {v:?} is not an IP address"))?)
            }
            "net" => {
                let v = arg(self, "net")?;
                Prim::Net(d, v.parse().map_err(|_| format!("net {v:?} is not a prefix like 10.0.1.0/24"))?)
            }
            "port" => {
                let v = arg(self, "port")?;
                let p: u16 = v.parse().map_err(|_| format!("port {v:?} is not 0-65535"))?;
                Prim::Port(d, p, p)
            }
            "portrange" => {
                let v = arg(self, "portrange")?;
                let (a, b) = v
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
                    .filter(|(a, b)| a <= b)
                    .ok_or(format!("portrange {v:?} is not N-M with N <= M"))?;
                Prim::Port(d, a, b)
            }
            "ether" if dir.is_none() => {
                let mut w = self.next().ok_or("`ether` needs [src|dst] host MAC")?;
                let ed = match w.as_str() {
                    "src" => Dir::Src,
                    "dst" => Dir::Dst,
                    _ => Dir::Either,
                };
                if ed != Dir::Either {
                    w = self.next().ok_or("`ether src|dst` needs host MAC")?;
                }
                if w != "host" {
                    return Err(format!("expected `host` after ether, found {w:?}"));
                }
                let v = arg(self, "ether host")?;
                Prim::Ether(ed, v.parse().map_err(|_| format!("ether host {v:?} is not a MAC"))?)
            }
            "vlan" if dir.is_none() => match self.peek().and_then(|v| v.parse::<u16>().ok()) {
                Some(id) if id < 4096 => {
                    self.i += 1;
                    Prim::Vlan(Some(id))
                }
                _ => Prim::Vlan(None),
            },
            other => {
                return Err(format!(
                    "unknown primitive {other:?}; supported: tcp udp icmp icmp6 arp ip ip6, [src|dst] host|net|port|portrange, ether [src|dst] host, vlan (see docs/cli.md)"
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> FlowKey {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut f, &[0; 8])
            .unwrap();
        FlowKey::parse(&f).unwrap()
    }

    fn m(filter: &str, k: &FlowKey) -> bool {
        Filter::parse(filter).unwrap().matches(k)
    }

    #[test]
    fn primitives_and_logic() {
        let k = udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53);
        assert!(m("udp", &k));
        assert!(!m("tcp", &k));
        assert!(m("ip and udp port 53", &k));
        assert!(m("udp and dst port 53", &k));
        assert!(!m("src port 53", &k));
        assert!(m("host 10.0.0.2", &k));
        assert!(m("src host 10.0.0.1 && dst host 10.0.0.2", &k));
        assert!(!m("dst host 10.0.0.1", &k));
        assert!(m("net 10.0.0.0/24", &k));
        assert!(m("not tcp", &k));
        assert!(m("!(tcp or arp)", &k));
        assert!(m("tcp or (udp and portrange 50-60)", &k));
        assert!(m("udp dst port 53", &k));
        assert!(!m("tcp port 53", &k));
        assert!(m("ether src host 02:00:00:00:00:01", &k));
        assert!(!m("ether dst host 02:00:00:00:00:01", &k));
        assert!(!m("vlan", &k));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (f, want) in [
            ("", "empty"),
            ("host", "needs a value"),
            ("host banana", "not an IP address"),
            ("port 70000", "not 0-65535"),
            ("tcp udp", "join primitives"),
            ("(tcp", "expected `)`"),
            ("frobnicate", "unknown primitive"),
            ("portrange 9-1", "N <= M"),
        ] {
            let e = Filter::parse(f).unwrap_err();
            assert!(e.contains(want), "{f:?}: {e}");
        }
        let deep = "(".repeat(100) + "tcp" + &")".repeat(100);
        assert!(Filter::parse(&deep).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "[ a-z0-9().!&|:/-]{0,80}") {
            if let Ok(f) = Filter::parse(&s) {
                let _ = f.matches(&udp([1, 2, 3, 4], [5, 6, 7, 8], 1, 2));
            }
        }
    }
}
