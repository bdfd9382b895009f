//! DHCPv4 message decoding and encoding (RFC 2131 §2, RFC 2132, RFC 3396).
//!
//! Decoding never panics: every read is bounds-checked and a message that
//! does not fit the format is an `Err(WireError)`. Options are collected per
//! code; an option that appears more than once is concatenated (RFC 3396),
//! and option overload (option 52) pulls further options out of the `file`
//! and `sname` fields, in that order.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// BOOTREQUEST / BOOTREPLY op codes.
pub const BOOTREQUEST: u8 = 1;
/// BOOTREPLY op code.
pub const BOOTREPLY: u8 = 2;
/// The magic cookie that starts the options field (RFC 2131 §3).
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Length of the fixed BOOTP header, before the magic cookie.
pub const FIXED_LEN: usize = 236;
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;
/// Smallest message we send (BOOTP compatibility: 300 bytes).
pub const MIN_REPLY_LEN: usize = 300;

/// Option codes used by the server.
#[allow(missing_docs)]
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOST_NAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const MTU: u8 = 26;
    pub const BROADCAST: u8 = 28;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETER_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    pub const RENEWAL_T1: u8 = 58;
    pub const REBINDING_T2: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const CLASSLESS_ROUTES: u8 = 121;
    pub const END: u8 = 255;
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// 1
    Discover,
    /// 2
    Offer,
    /// 3
    Request,
    /// 4
    Decline,
    /// 5
    Ack,
    /// 6
    Nak,
    /// 7
    Release,
    /// 8
    Inform,
    /// Anything else (leasequery, forcerenew, ...): not served.
    Other(u8),
}

impl MessageType {
    /// From the option 53 byte.
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            n => Self::Other(n),
        }
    }

    /// The option 53 byte.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
            Self::Other(n) => n,
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the fixed header plus magic cookie.
    TooShort,
    /// The magic cookie is not 99.130.83.99.
    BadCookie,
    /// An option's length runs past the end of its field.
    TruncatedOption,
}

/// A decoded DHCPv4 message (the parts the server uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// 1 = BOOTREQUEST, 2 = BOOTREPLY.
    pub op: u8,
    /// Hardware type (1 = Ethernet).
    pub htype: u8,
    /// Hardware address length.
    pub hlen: u8,
    /// Transaction id.
    pub xid: u32,
    /// Flags (bit 15 = broadcast).
    pub flags: u16,
    /// Client IP address (set when the client is BOUND/RENEWING/REBINDING).
    pub ciaddr: Ipv4Addr,
    /// "Your" IP address.
    pub yiaddr: Ipv4Addr,
    /// Relay agent address.
    pub giaddr: Ipv4Addr,
    /// Client hardware address (16 bytes, first `hlen` significant).
    pub chaddr: [u8; 16],
    /// Options, concatenated per code (RFC 3396), overload applied.
    pub options: BTreeMap<u8, Vec<u8>>,
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    match b.get(at..at + 4) {
        Some(s) => Ipv4Addr::new(s[0], s[1], s[2], s[3]),
        None => Ipv4Addr::UNSPECIFIED,
    }
}

/// Walks one options area, appending to `out`. Returns the overload value
/// when `want_overload` and option 52 was seen.
fn parse_area(
    area: &[u8],
    out: &mut BTreeMap<u8, Vec<u8>>,
    want_overload: bool,
) -> Result<Option<u8>, WireError> {
    let mut overload = None;
    let mut i = 0;
    while i < area.len() {
        let code = area[i];
        match code {
            opt::PAD => {
                i += 1;
                continue;
            }
            opt::END => break,
            _ => {}
        }
        let len = *area.get(i + 1).ok_or(WireError::TruncatedOption)? as usize;
        let data = area
            .get(i + 2..i + 2 + len)
            .ok_or(WireError::TruncatedOption)?;
        if code == opt::OVERLOAD {
            // Only meaningful in the options field; ignored elsewhere.
            if want_overload {
                overload = data.first().copied();
            }
        } else {
            out.entry(code).or_default().extend_from_slice(data);
        }
        i += 2 + len;
    }
    Ok(overload)
}

impl Message {
    /// Decodes a UDP payload. Never panics.
    pub fn decode(b: &[u8]) -> Result<Message, WireError> {
        if b.len() < FIXED_LEN + 4 {
            return Err(WireError::TooShort);
        }
        if b[FIXED_LEN..FIXED_LEN + 4] != MAGIC_COOKIE {
            return Err(WireError::BadCookie);
        }
        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(&b[28..44]);
        let mut options = BTreeMap::new();
        let overload = parse_area(&b[FIXED_LEN + 4..], &mut options, true)?;
        // RFC 3396 §5: options field, then file, then sname.
        match overload {
            Some(1) => {
                parse_area(&b[FILE], &mut options, false)?;
            }
            Some(2) => {
                parse_area(&b[SNAME], &mut options, false)?;
            }
            Some(3) => {
                parse_area(&b[FILE], &mut options, false)?;
                parse_area(&b[SNAME], &mut options, false)?;
            }
            _ => {}
        }
        Ok(Message {
            op: b[0],
            htype: b[1],
            hlen: b[2],
            xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            flags: u16::from_be_bytes([b[10], b[11]]),
            ciaddr: ip_at(b, 12),
            yiaddr: ip_at(b, 16),
            giaddr: ip_at(b, 24),
            chaddr,
            options,
        })
    }

    /// Option 53, if present and one byte long.
    pub fn message_type(&self) -> Option<MessageType> {
        match self.options.get(&opt::MESSAGE_TYPE).map(Vec::as_slice) {
            Some([t]) => Some(MessageType::from_u8(*t)),
            _ => None,
        }
    }

    /// An option holding exactly one IPv4 address.
    pub fn ip_option(&self, code: u8) -> Option<Ipv4Addr> {
        match self.options.get(&code).map(Vec::as_slice) {
            Some([a, b, c, d]) => Some(Ipv4Addr::new(*a, *b, *c, *d)),
            _ => None,
        }
    }

    /// The broadcast flag (RFC 2131 §2, figure 2).
    pub fn broadcast(&self) -> bool {
        self.flags & 0x8000 != 0
    }

    /// The first six bytes of chaddr.
    pub fn mac(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.chaddr[..6]);
        m
    }
}

/// Builds a reply: fixed header, then options in the order given, each
/// added only if it still fits `limit` bytes (with the End option).
#[derive(Debug)]
pub struct ReplyBuilder {
    buf: Vec<u8>,
    limit: usize,
}

impl ReplyBuilder {
    /// Starts a BOOTREPLY for `req`.
    pub fn new(req: &Message, ciaddr: Ipv4Addr, yiaddr: Ipv4Addr, limit: usize) -> Self {
        let mut buf = vec![0u8; FIXED_LEN];
        buf[0] = BOOTREPLY;
        buf[1] = req.htype;
        buf[2] = req.hlen;
        buf[4..8].copy_from_slice(&req.xid.to_be_bytes());
        buf[10..12].copy_from_slice(&req.flags.to_be_bytes());
        buf[12..16].copy_from_slice(&ciaddr.octets());
        buf[16..20].copy_from_slice(&yiaddr.octets());
        buf[24..28].copy_from_slice(&req.giaddr.octets());
        buf[28..44].copy_from_slice(&req.chaddr);
        buf.extend_from_slice(&MAGIC_COOKIE);
        ReplyBuilder { buf, limit }
    }

    /// Bytes an option with `len` bytes of data takes (RFC 3396 split).
    fn encoded_len(len: usize) -> usize {
        if len == 0 {
            2
        } else {
            len + 2 * len.div_ceil(255)
        }
    }

    /// Adds an option if it fits; returns whether it was added. Values
    /// longer than 255 bytes are split into several instances (RFC 3396).
    pub fn option(&mut self, code: u8, data: &[u8]) -> bool {
        if self.buf.len() + Self::encoded_len(data.len()) + 1 > self.limit {
            return false;
        }
        if data.is_empty() {
            self.buf.extend_from_slice(&[code, 0]);
        }
        for chunk in data.chunks(255) {
            self.buf.push(code);
            self.buf.push(chunk.len() as u8);
            self.buf.extend_from_slice(chunk);
        }
        true
    }

    /// Ends the options and pads to the BOOTP minimum.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(opt::END);
        if self.buf.len() < MIN_REPLY_LEN {
            self.buf.resize(MIN_REPLY_LEN, 0);
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<u8> {
        let mut b = vec![0u8; FIXED_LEN];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
        b[10] = 0x80;
        b[28..34].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        b.extend_from_slice(&MAGIC_COOKIE);
        b
    }

    #[test]
    fn decode_fixed_fields_and_options() {
        let mut b = base();
        b.extend_from_slice(&[53, 1, 1, 0, 50, 4, 10, 0, 0, 5, 255]);
        let m = Message::decode(&b).expect("decodes");
        assert_eq!(m.op, BOOTREQUEST);
        assert_eq!(m.xid, 0xdead_beef);
        assert!(m.broadcast());
        assert_eq!(m.mac(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(m.message_type(), Some(MessageType::Discover));
        assert_eq!(
            m.ip_option(opt::REQUESTED_IP),
            Some(Ipv4Addr::new(10, 0, 0, 5))
        );
    }

    #[test]
    fn rejects_short_bad_cookie_truncated() {
        assert_eq!(Message::decode(&[0; 10]), Err(WireError::TooShort));
        let mut b = base();
        b[FIXED_LEN] = 0;
        assert_eq!(Message::decode(&b), Err(WireError::BadCookie));
        let mut b = base();
        b.extend_from_slice(&[53, 5, 1]);
        assert_eq!(Message::decode(&b), Err(WireError::TruncatedOption));
    }

    #[test]
    fn missing_end_is_accepted() {
        let mut b = base();
        b.extend_from_slice(&[53, 1, 3]);
        let m = Message::decode(&b).expect("decodes");
        assert_eq!(m.message_type(), Some(MessageType::Request));
    }

    #[test]
    fn repeated_options_are_concatenated() {
        let mut b = base();
        b.extend_from_slice(&[61, 2, 1, 2, 61, 2, 3, 4, 255]);
        let m = Message::decode(&b).expect("decodes");
        assert_eq!(m.options[&61], vec![1, 2, 3, 4]);
    }

    #[test]
    fn overload_file_then_sname() {
        let mut b = base();
        // file carries message type and the first half of the client id,
        // sname the second half.
        b[FILE.start..FILE.start + 7].copy_from_slice(&[53, 1, 1, 61, 2, 1, 2]);
        b[FILE.start + 7] = 255;
        b[SNAME.start..SNAME.start + 5].copy_from_slice(&[61, 2, 3, 4, 255]);
        b.extend_from_slice(&[52, 1, 3, 255]);
        let m = Message::decode(&b).expect("decodes");
        assert_eq!(m.message_type(), Some(MessageType::Discover));
        assert_eq!(m.options[&61], vec![1, 2, 3, 4]);
        assert!(!m.options.contains_key(&52));
    }

    #[test]
    fn overload_ignored_without_option_52() {
        let mut b = base();
        b[FILE.start..FILE.start + 3].copy_from_slice(&[53, 1, 1]);
        b.extend_from_slice(&[255]);
        let m = Message::decode(&b).expect("decodes");
        assert_eq!(m.message_type(), None);
    }

    #[test]
    fn builder_splits_long_options_and_respects_limit() {
        let req = Message::decode(&{
            let mut b = base();
            b.push(255);
            b
        })
        .expect("decodes");
        let mut r = ReplyBuilder::new(&req, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, 548);
        assert!(r.option(121, &[7u8; 300]));
        assert!(!r.option(6, &[1u8; 300]), "does not fit any more");
        assert!(r.option(53, &[2]));
        let out = r.finish();
        assert!(out.len() <= 548);
        let back = Message::decode(&out).expect("decodes");
        assert_eq!(back.options[&121].len(), 300);
        assert_eq!(back.op, BOOTREPLY);
        assert_eq!(back.xid, req.xid);
        assert_eq!(back.flags, req.flags);
    }
}
