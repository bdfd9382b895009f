//! The flow a synthetic trace packet carries, as an operator writes it:
//! `tcp 10.0.1.10:40000 > 10.0.2.20:80`, `udp A:p > B:q`, `icmp A > B`,
//! `arp A > B` (A asks who has B). TCP segments are SYNs unless a flag word
//! follows (`ack`, `synack`, `fin`, `rst`); ICMP is an echo request unless
//! `reply` follows. IPv4 only.

use std::net::Ipv4Addr;

use packet::MacAddr;

/// What the packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP with these flags (SYN, ACK, FIN, RST bits as in the header).
    Tcp(u8),
    /// UDP.
    Udp,
    /// ICMP echo request (`false`) or reply (`true`).
    Icmp(bool),
    /// ARP request: source asks who has the destination.
    Arp,
}

/// A parsed flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSpec {
    /// Protocol.
    pub proto: Proto,
    /// Source address.
    pub src: Ipv4Addr,
    /// Source port (TCP/UDP; the ICMP identifier).
    pub sport: u16,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Destination port (TCP/UDP).
    pub dport: u16,
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

const USAGE: &str = "write a flow like 'tcp 10.0.1.10:40000 > 10.0.2.20:80', \
'udp A:P > B:Q', 'icmp A > B' or 'arp A > B' (IPv4)";

impl FlowSpec {
    /// Parses the operator's text; the error says what is wrong and how
    /// to write it.
    pub fn parse(text: &str) -> Result<FlowSpec, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (proto_word, src, arrow, dst, rest) = match words.as_slice() {
            [p, s, ">", d, rest @ ..] => (*p, *s, ">", *d, rest),
            _ => return Err(format!("cannot read flow {text:?}: {USAGE}")),
        };
        let _ = arrow;
        let with_ports = matches!(proto_word, "tcp" | "udp");
        let endpoint = |w: &str, what: &str| -> Result<(Ipv4Addr, u16), String> {
            if with_ports {
                let (a, p) = w.rsplit_once(':').ok_or(format!(
                    "{what} {w:?} needs a port for {proto_word}: ADDRESS:PORT"
                ))?;
                let a = a
                    .parse()
                    .map_err(|_| format!("{what} {a:?} is not an IPv4 address"))?;
                let p = p
                    .parse()
                    .map_err(|_| format!("{what} port {p:?} is not a number 0-65535"))?;
                Ok((a, p))
            } else {
                let a = w
                    .parse()
                    .map_err(|_| format!("{what} {w:?} is not an IPv4 address"))?;
                Ok((a, 0))
            }
        };
        let (src, sport) = endpoint(src, "source")?;
        let (dst, dport) = endpoint(dst, "destination")?;
        let flag = rest.first().copied();
        if rest.len() > 1 {
            return Err(format!("unexpected {:?} after the flow: {USAGE}", rest[1]));
        }
        let proto = match (proto_word, flag) {
            ("tcp", None | Some("syn")) => Proto::Tcp(SYN),
            ("tcp", Some("synack")) => Proto::Tcp(SYN | ACK),
            ("tcp", Some("ack")) => Proto::Tcp(ACK),
            ("tcp", Some("fin")) => Proto::Tcp(FIN | ACK),
            ("tcp", Some("rst")) => Proto::Tcp(RST),
            ("udp", None) => Proto::Udp,
            ("icmp", None | Some("request")) => Proto::Icmp(false),
            ("icmp", Some("reply")) => Proto::Icmp(true),
            ("arp", None) => Proto::Arp,
            ("tcp", Some(f)) => {
                return Err(format!(
                    "unknown TCP flags {f:?}: use syn (default), synack, ack, fin or rst"
                ))
            }
            ("icmp", Some(f)) => {
                return Err(format!(
                    "unknown ICMP kind {f:?}: use request (default) or reply"
                ))
            }
            (p @ ("udp" | "arp"), Some(f)) => {
                return Err(format!("unexpected {f:?} after a {p} flow: {USAGE}"))
            }
            (p, _) => return Err(format!("unknown protocol {p:?}: use tcp, udp, icmp or arp")),
        };
        Ok(FlowSpec {
            proto,
            src,
            sport: if matches!(proto, Proto::Icmp(_)) {
                1
            } else {
                sport
            },
            dst,
            dport,
        })
    }

    /// The Ethernet frame: from `src_mac` to `dst_mac` (ARP requests go to
    /// broadcast whatever `dst_mac` says).
    pub fn frame(&self, src_mac: MacAddr, dst_mac: MacAddr) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        if self.proto == Proto::Arp {
            out.extend_from_slice(&[0xff; 6]);
            out.extend_from_slice(&src_mac.0);
            out.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            out.extend_from_slice(&src_mac.0);
            out.extend_from_slice(&self.src.octets());
            out.extend_from_slice(&[0; 6]);
            out.extend_from_slice(&self.dst.octets());
            out.resize(60, 0);
            return out;
        }
        let b = etherparse::PacketBuilder::ethernet2(src_mac.0, dst_mac.0).ipv4(
            self.src.octets(),
            self.dst.octets(),
            64,
        );
        let payload = [0u8; 16];
        let written = match self.proto {
            Proto::Tcp(flags) => {
                let mut t = b.tcp(self.sport, self.dport, 1000, 64240);
                if flags & SYN != 0 {
                    t = t.syn();
                }
                if flags & ACK != 0 {
                    t = t.ack(1);
                }
                if flags & FIN != 0 {
                    t = t.fin();
                }
                if flags & RST != 0 {
                    t = t.rst();
                }
                t.write(&mut out, &[])
            }
            Proto::Udp => b.udp(self.sport, self.dport).write(&mut out, &payload),
            Proto::Icmp(false) => b
                .icmpv4_echo_request(self.sport, 1)
                .write(&mut out, &payload),
            Proto::Icmp(true) => b.icmpv4_echo_reply(self.sport, 1).write(&mut out, &payload),
            Proto::Arp => Ok(()),
        };
        // Writing into a Vec of a fixed small packet cannot fail; an empty
        // frame would be dropped as a runt and say so.
        if written.is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_parse_and_build() {
        let f = FlowSpec::parse("tcp 10.0.1.10:40000 > 10.0.2.20:80").unwrap();
        assert_eq!(f.proto, Proto::Tcp(SYN));
        assert_eq!((f.sport, f.dport), (40000, 80));
        let frame = f.frame(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
        let k = packet::FlowKey::parse(&frame).unwrap();
        assert!(matches!(
            k.l4,
            packet::L4::Tcp {
                src_port: 40000,
                dst_port: 80,
                ..
            }
        ));
        assert_eq!(
            FlowSpec::parse("tcp 1.2.3.4:5 > 6.7.8.9:10 ack")
                .unwrap()
                .proto,
            Proto::Tcp(ACK)
        );
        let u = FlowSpec::parse("udp 10.0.0.1:53 > 10.0.0.2:5353").unwrap();
        let frame = u.frame(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
        assert!(packet::FlowKey::parse(&frame).is_ok());
        let i = FlowSpec::parse("icmp 10.0.0.1 > 10.0.0.2").unwrap();
        assert_eq!(i.proto, Proto::Icmp(false));
        let a = FlowSpec::parse("arp 10.0.0.1 > 10.0.0.2").unwrap();
        let frame = a.frame(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr::ZERO);
        assert!(matches!(
            packet::FlowKey::parse(&frame).unwrap().l3,
            packet::L3::Arp(_)
        ));
        for bad in [
            "",
            "tcp 10.0.0.1 > 10.0.0.2:80",
            "tcp 10.0.0.1:1 > 10.0.0.2:99999",
            "sctp 1.1.1.1 > 2.2.2.2",
            "tcp 1.1.1.1:1 > 2.2.2.2:2 urg",
            "icmp 1.1.1.1 > 2.2.2.2 extra words",
            "icmp ::1 > ::2",
        ] {
            let e = FlowSpec::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}
