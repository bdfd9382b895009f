//! Floods from a hostile VM (and from a host on the underlay that is not a
//! peer), each bounded in count and time, while another tenant's VMs keep
//! working: a ping series and an iperf3 TCP flow run through every flood.
//!
//! | flood | count | from | what must hold |
//! |---|---|---|---|
//! | DHCP DISCOVER, random chaddr | 10,000 | a VM on a DHCP network | no lease for a spoofed chaddr; port `dhcp_chaddr_mismatch` + `local_service_busy` = sent; network `chaddr_mismatch` = the port's count; a real client still gets a lease |
//! | ARP requests for random addresses | 20,000 | a VM | flooded in its network only (another tenant captures none); the ARP responder answers during the storm; `rx_packets` >= sent |
//! | broadcast, ethertype 0x88b5 | 20,000 | a VM | reaches its own network only |
//! | VXLAN, random VNIs | 5,000 | a non-peer on the underlay | `rx_not_peer` rises by exactly what each host got; no VM sees it; cross-host ping works |
//! | TCP SYN to many ports, from a VM with security groups | 20,000 | a VM | its own connection limit (100) holds: 100 tracked, the rest `conn_limit`; the target's ingress rule admits none (`sg_ingress_denied`); the table never grows past the limit |
//! | UDP, one new flow per frame, through SNAT | 50,000 | a VM | SNAT's 10,000-port range fills exactly; the other 40,000 are `nat_ports_exhausted`; the NAT table holds 10,000 connections; existing flows keep working |
//!
//! The senders are python3 raw sockets in the attacker's namespace, paced
//! (100 frames, then 5 ms) so that the kernel between the VM and the switch
//! does not drop frames itself (a tap's ring holds 500 frames; in bursts of
//! 500 the VM's `tx_dropped` rose by 1,975 of 20,000, unpaced by half):
//! the counter assertions are exact.
//! The floods of this file take turns (a process-wide lock): what the
//! bystanders measure is one flood's effect, and the file still takes about
//! 26 s on the 2-core machine (about 16 s without the lock).
//!
//! Bystander loss: the assertion is 0% loss, not the 10% the issue allows.
//! Measured on the 2-core machine while another project's tests ran too:
//! 18 runs of this file (15 with the lock, 3 without), each flood with 40
//! echo requests at 0.1 s beside an unlimited iperf3 (2-6 GB moved) between
//! the same two VMs: no echo request was ever lost. Each flood lasts about
//! 1 s of the bystanders' 4 s, and ports are served round-robin (at most 64
//! frames per port per wake-up), so the bystanders' frames wait behind at
//! most one batch of the attacker's.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use vswitch_tests::*;

/// One flood at a time in this process (see the module docs).
fn one_flood_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `python3 FILE KIND IFNAME COUNT SEED EVERY PAUSE ARGS...` sends COUNT
/// frames of KIND on IFNAME, pausing PAUSE seconds after every EVERY frames
/// (and retrying a send the kernel refuses with ENOBUFS). Prints
/// `start=T` before the first frame and `sent=N retries=N secs=F end=T`
/// after the last (T: CLOCK_MONOTONIC seconds, the same clock in every
/// namespace). Kinds and their ARGS:
/// - `dhcp OUR_MAC CHADDR_FILE`: DHCPDISCOVER from OUR_MAC (0.0.0.0:68 ->
///   255.255.255.255:67) with a random chaddr each, written to CHADDR_FILE;
/// - `arp OUR_MAC OUR_IP PREFIX24 EXCLUDE,...`: ARP request from OUR_MAC /
///   OUR_IP for PREFIX24.x, x random in 2..254 but not in EXCLUDE, padded
///   to 60 bytes with the marker ARPSTORM;
/// - `bcast OUR_MAC`: to ff:ff:ff:ff:ff:ff, ethertype 0x88b5, marker
///   BCASTSTORM, 60 bytes;
/// - `udp OUR_MAC GW_MAC OUR_IP DST_IP DST_PORT FIRST_SPORT`: UDP from
///   OUR_IP:(FIRST_SPORT + i) to DST_IP:DST_PORT through the gateway, one
///   new flow per frame (no UDP checksum), marker UDPFLOOD;
/// - `syn OUR_MAC DST_MAC OUR_IP DST_IP`: TCP SYNs from OUR_IP, random
///   source port, to DST_IP on port 1 + i % 65535 (many ports), valid
///   checksums.
const FLOOD_PY: &str = r#"
import random, socket, struct, sys, time
kind, ifname, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
every, pause, args = int(sys.argv[5]), float(sys.argv[6]), sys.argv[7:]
rng = random.Random(seed)
mac = lambda s: bytes.fromhex(s.replace(":", ""))
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
def rand_mac():
    m = bytearray(rng.getrandbits(8) for _ in range(6))
    m[0] = (m[0] & 0xFC) | 0x02
    return bytes(m)
frames = []
if kind == "dhcp":
    ours = mac(args[0])
    chaddrs = []
    for i in range(count):
        ch = rand_mac()
        while ch == ours:
            ch = rand_mac()
        chaddrs.append(":".join("%02x" % b for b in ch))
        bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, rng.getrandbits(32), 0, 0x8000,
                            bytes(4), bytes(4), bytes(4), bytes(4), ch + bytes(10), bytes(64), bytes(128))
        bootp += b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\xff"
        udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xffff, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        frames.append(b"\xff" * 6 + ours + b"\x08\x00" + ip + udp)
    with open(args[1], "w") as f:
        f.write("\n".join(chaddrs) + "\n")
elif kind == "arp":
    ours, our_ip, prefix = mac(args[0]), socket.inet_aton(args[1]), args[2]
    exclude = set(int(x) for x in args[3].split(",") if x)
    hosts = [x for x in range(2, 255) if x not in exclude]
    for i in range(count):
        tpa = socket.inet_aton("%s.%d" % (prefix, rng.choice(hosts)))
        a = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, ours, our_ip, bytes(6), tpa)
        f = b"\xff" * 6 + ours + b"\x08\x06" + a + b"ARPSTORM" + struct.pack("!I", i)
        frames.append(f + bytes(60 - len(f)))
elif kind == "bcast":
    ours = mac(args[0])
    for i in range(count):
        f = b"\xff" * 6 + ours + b"\x88\xb5" + b"BCASTSTORM" + struct.pack("!I", i)
        frames.append(f + bytes(60 - len(f)))
elif kind == "udp":
    ours, gw, src, dst = mac(args[0]), mac(args[1]), socket.inet_aton(args[2]), socket.inet_aton(args[3])
    dport, first = int(args[4]), int(args[5])
    for i in range(count):
        udp = struct.pack("!HHHH", first + i, dport, 8 + 12, 0) + b"UDPFLOOD" + struct.pack("!I", i)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xffff, 0, 64, 17, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        frames.append(gw + ours + b"\x08\x00" + ip + udp)
elif kind == "syn":
    ours, dmac, src, dst = mac(args[0]), mac(args[1]), socket.inet_aton(args[2]), socket.inet_aton(args[3])
    for i in range(count):
        sport, dport = rng.randrange(1024, 65536), 1 + i % 65535
        tcp = struct.pack("!HHIIBBHHH", sport, dport, rng.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xffff, 0, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        frames.append(dmac + ours + b"\x08\x00" + ip + tcp)
else:
    sys.exit("unknown kind " + kind)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
sent = retries = 0
t0 = time.monotonic()
print("start=%.6f" % t0, flush=True)
for i, f in enumerate(frames):
    for attempt in range(2000):
        try:
            s.send(f)
            sent += 1
            break
        except OSError:
            retries += 1
            time.sleep(0.0005)
    if every and i % every == every - 1:
        time.sleep(pause)
t1 = time.monotonic()
print("sent=%d retries=%d secs=%.3f end=%.6f" % (sent, retries, t1 - t0, t1))
"#;

/// `python3 FILE IFNAME OUR_MAC OUR_IP TARGET_IP`: one ARP request, then
/// waits up to 2 s for the reply and prints its sender MAC (exit 1 if none).
const ARP_ASK_PY: &str = r#"
import socket, struct, sys, time
ifname, ours, our_ip, target = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3]), socket.inet_aton(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((ifname, 0))
a = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, ours, our_ip, bytes(6), target)
s.send(b"\xff" * 6 + ours + b"\x08\x06" + a)
end = time.monotonic() + 2
while time.monotonic() < end:
    s.settimeout(max(0.01, end - time.monotonic()))
    try:
        f = s.recv(2048)
    except socket.timeout:
        break
    if len(f) >= 42 and f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == target and f[38:42] == our_ip:
        print(":".join("%02x" % b for b in f[22:28]))
        sys.exit(0)
sys.exit(1)
"#;

/// `python3 FILE IFNAME OUR_MAC OUR_IP SECS TARGET...`: for SECS seconds,
/// an ARP request every 50 ms (for each TARGET in turn); prints
/// `T TARGET SENDER_MAC` for every reply (T: CLOCK_MONOTONIC seconds).
const ARP_WATCH_PY: &str = r#"
import socket, struct, sys, time
ifname, ours, our_ip = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3])
secs, targets = float(sys.argv[4]), [socket.inet_aton(t) for t in sys.argv[5:]]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((ifname, 0))
s.setblocking(False)
end = time.monotonic() + secs
nxt, i = 0.0, 0
while time.monotonic() < end:
    now = time.monotonic()
    if now >= nxt:
        a = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, ours, our_ip, bytes(6), targets[i % len(targets)])
        s.send(b"\xff" * 6 + ours + b"\x08\x06" + a)
        i, nxt = i + 1, now + 0.05
    try:
        f = s.recv(2048)
    except BlockingIOError:
        time.sleep(0.002)
        continue
    if len(f) >= 42 and f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[38:42] == our_ip:
        print("%.6f %s %s" % (time.monotonic(), socket.inet_ntoa(f[28:32]), ":".join("%02x" % b for b in f[22:28])), flush=True)
"#;

/// What a flood sender reported.
#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    sent: u64,
    retries: u64,
    secs: f64,
    start: f64,
    end: f64,
}

fn parse_sent(out: &str) -> Sent {
    let mut s = Sent::default();
    for w in out.split_whitespace() {
        match w.split_once('=') {
            Some(("sent", v)) => s.sent = v.parse().unwrap_or(0),
            Some(("retries", v)) => s.retries = v.parse().unwrap_or(0),
            Some(("secs", v)) => s.secs = v.parse().unwrap_or(0.0),
            Some(("start", v)) => s.start = v.parse().unwrap_or(0.0),
            Some(("end", v)) => s.end = v.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    s
}

/// Waits for a flood sender started as a [`Bg`] and returns what it sent.
fn finish_flood(mut flood: Bg, want: u64) -> Sent {
    let st = flood.wait(Duration::from_secs(30));
    assert!(
        st.success(),
        "flood sender failed ({st}): {}{}",
        flood.stdout(),
        flood.stderr()
    );
    let s = parse_sent(&flood.stdout());
    assert_eq!(s.sent, want, "flood sender: {}", flood.stdout());
    s
}

/// The `show` entry of `port`, panicking if it is missing.
fn port_of(sw: &Switch, port: &str) -> Value {
    sw.port(port)
        .unwrap_or_else(|| panic!("{port} missing in show"))
}

fn drop_count(p: &Value, reason: &str) -> u64 {
    num(&p["drops"], reason)
}

/// `ip -s link` TX drops of the VM's eth0 (frames the kernel lost between
/// the attacker's socket and the switch).
fn vm_tx_dropped(ns: &str) -> u64 {
    let out = ns_exec(
        ns,
        &["cat", "/sys/class/net/eth0/statistics/tx_dropped"],
        Duration::from_secs(5),
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Asserts what the bystanders measured through a flood.
fn assert_bystanders(what: &str, r: &WorkloadReport) {
    eprintln!(
        "{what}: bystander ping {}/{} replies ({:.1}% loss), iperf3 {} bytes",
        r.ping_received,
        r.ping_sent,
        r.ping_loss_pct(),
        r.iperf_bytes
    );
    assert!(
        r.ping_ok && r.ping_sent > 0 && r.ping_received == r.ping_sent,
        "{what}: the other tenant's ping lost replies during the flood:\n{}",
        r.ping_output
    );
    assert!(
        r.iperf_ok && r.iperf_bytes > 1_000_000,
        "{what}: the other tenant's iperf3 moved {} bytes during the flood:\n{}",
        r.iperf_bytes,
        r.iperf_output
    );
}

fn script(dir: &TestDir, name: &str, text: &str) -> String {
    dir.write(name, text).to_string_lossy().into_owned()
}

/// A bystander tenant: network `lan` (VNI `vni`, `cidr`) with ports
/// `b1`/`b2` at `.21`/`.22` of a /24 written `PREFIX24`.
fn bystander_toml(n: &Names, vni: u32, prefix24: &str, macs: (&str, &str)) -> String {
    let mut cfg = Config::new();
    let t = cfg.tenant("bys");
    t.network("lan", vni, &format!("{prefix24}.0/24"));
    t.port(
        &n.port("b1"),
        "lan",
        &n.tap("b1"),
        macs.0,
        &format!("{prefix24}.21"),
    );
    t.port(
        &n.port("b2"),
        "lan",
        &n.tap("b2"),
        macs.1,
        &format!("{prefix24}.22"),
    );
    cfg.to_toml()
}

#[test]
fn dhcp_discover_flood_with_spoofed_chaddrs() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "udhcpc", "ping", "iperf3"]) {
        return;
    }
    let _turn = one_flood_at_a_time();
    let n = Names::new("fdh");
    let dir = TestDir::new();
    let (atk, leg, b1, b2) = (n.port("atk"), n.port("leg"), n.port("b1"), n.port("b2"));
    let (atk_mac, leg_mac) = ("02:00:00:61:00:0a", "02:00:00:61:00:0b");
    // The bystanders use the same subnet: tenants may overlap.
    let mut text = bystander_toml(
        &n,
        6200,
        "10.61.0",
        ("02:00:00:62:00:21", "02:00:00:62:00:22"),
    );
    text.push_str(&format!(
        r#"
[[tenant]]
name = "vic"
  [[tenant.network]]
  name = "lan"
  vni = 6100
  cidr = "10.61.0.0/24"
  gateway = "10.61.0.1"
  [tenant.network.dhcp]
  pool = ["10.61.0.100-10.61.0.150"]
  lease_secs = 600

  [[tenant.port]]
  name = "{atk}"
  network = "lan"
  tap = "{atk_tap}"
  mac = "{atk_mac}"

  [[tenant.port]]
  name = "{leg}"
  network = "lan"
  tap = "{leg_tap}"
  mac = "{leg_mac}"
"#,
        atk_tap = n.tap("atk"),
        leg_tap = n.tap("leg"),
    ));
    let path = dir.write("vswitch.toml", &text);
    let flood_py = script(&dir, "flood.py", FLOOD_PY);
    let chaddr_file = dir.file("chaddrs.txt").to_string_lossy().into_owned();
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[atk.clone(), leg.clone(), b1.clone(), b2.clone()]);
    lab.assert_ping(&b1, "10.61.0.22", 2);

    let stats =
        || -> Value { sw.ctl(&["leases", "--network", "vic/lan"])["networks"][0]["stats"].clone() };
    let p0 = port_of(&sw, &atk);
    let s0 = stats();
    let tx_dropped0 = vm_tx_dropped(&atk);

    // 10,000 DISCOVERs in bursts of 100 with 5 ms pauses (the DHCP queue
    // holds 1024, the tap's ring 500).
    const COUNT: u64 = 10_000;
    let mut work = Workload::start(&dir, "bys", &b1, &b2, "10.61.0.22", 4);
    let t0 = Instant::now();
    let flood = lab.spawn(
        &dir,
        &atk,
        "flood",
        &[
            "python3",
            &flood_py,
            "dhcp",
            "eth0",
            &COUNT.to_string(),
            "1",
            "100",
            "0.005",
            atk_mac,
            &chaddr_file,
        ],
    );
    let sent = finish_flood(flood, COUNT);
    let flood_secs = t0.elapsed();
    assert!(
        work.running(),
        "the flood outlasted the bystanders' traffic"
    );
    let report = work.finish();

    // Every DISCOVER is accounted for: refused for its chaddr by the DHCP
    // service, or dropped before it because the service's queue was full.
    let mut p1 = Value::Null;
    let (mut mismatch, mut busy) = (0, 0);
    let counted = wait_until(Duration::from_secs(10), || {
        p1 = port_of(&sw, &atk);
        mismatch =
            drop_count(&p1, "dhcp_chaddr_mismatch") - drop_count(&p0, "dhcp_chaddr_mismatch");
        busy = drop_count(&p1, "local_service_busy") - drop_count(&p0, "local_service_busy");
        mismatch + busy >= COUNT
    });
    let s1 = stats();
    let rx = num(&p1, "rx_packets") - num(&p0, "rx_packets");
    let tx_dropped = vm_tx_dropped(&atk) - tx_dropped0;
    eprintln!(
        "DHCP flood: sent {} in {:.2} s ({} ENOBUFS retries; flood phase {:.2} s), port rx {rx}, \
         dhcp_chaddr_mismatch {mismatch}, local_service_busy {busy}, VM tx_dropped {tx_dropped}; \
         network stats {s1}",
        sent.sent,
        sent.secs,
        sent.retries,
        flood_secs.as_secs_f64()
    );
    assert!(
        counted && mismatch + busy == COUNT,
        "sent {COUNT} DISCOVERs with foreign chaddrs: dhcp_chaddr_mismatch {mismatch} + \
         local_service_busy {busy} != {COUNT} (port rx {rx}, VM tx_dropped {tx_dropped}): {p1}"
    );
    assert_eq!(
        num(&s1, "chaddr_mismatch") - num(&s0, "chaddr_mismatch"),
        mismatch,
        "the network's DHCP stats disagree with the port's drop counter: {s1}"
    );
    for k in ["discover", "offer", "request", "ack"] {
        assert_eq!(num(&s1, k), num(&s0, k), "stats.{k} moved: {s1}");
    }
    let leases = sw.ctl(&["leases", "--network", "vic/lan"])["networks"][0]["leases"].clone();
    assert_eq!(
        leases.as_array().map(Vec::len),
        Some(0),
        "leases after the flood: {leases}"
    );
    assert_bystanders("DHCP flood", &report);

    // A real client on the same network still gets a lease, and only it
    // holds one.
    let o = lab.exec_timeout(
        &leg,
        &["udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-T", "2"],
        Duration::from_secs(30),
    );
    assert!(
        o.status.success(),
        "udhcpc after the flood:\n{}",
        fmt_output(&o)
    );
    let leases = sw.ctl(&["leases", "--network", "vic/lan"])["networks"][0]["leases"].clone();
    let macs: Vec<&str> = leases
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["mac"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(macs, vec![leg_mac], "leases: {leases}");
    let spoofed: HashSet<String> = std::fs::read_to_string(&chaddr_file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(spoofed.len() as u64, COUNT, "chaddrs written by the sender");
    assert!(!macs.iter().any(|m| spoofed.contains(*m)));
    let leased = leases[0]["ip"].as_str().unwrap_or("?").to_string();
    let addr = lab.exec(&leg, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        String::from_utf8_lossy(&addr.stdout).contains(&format!(" {leased}/24 ")),
        "leg's address is not its lease {leased}: {}",
        fmt_output(&addr)
    );
    assert_no_panic(&sw.log());
}

fn assert_no_panic(log: &str) {
    assert!(!log.contains("panicked"), "vswitchd panicked:\n{log}");
}

/// An attacker network (`atk`, `v2`) and a bystander tenant (`b1`, `b2`)
/// on one switch; the attacker floods, everything else is checked around it.
struct Storm {
    // Dropped in this order: the lab, then the switch, then the directory
    // holding their config and socket.
    lab: Lab,
    sw: Switch,
    atk: String,
    v2: String,
    b1: String,
    b2: String,
    flood_py: String,
    dir: TestDir,
}

const ATK_MAC: &str = "02:00:00:63:00:0a";
const V2_MAC: &str = "02:00:00:63:00:0b";

impl Storm {
    /// Attacker network 10.63.0.0/24 (gateway .1, atk .10, v2 .11); the
    /// bystanders use the same subnet in their own tenant.
    fn new(tag: &str, vni: u32) -> Storm {
        let n = Names::new(tag);
        let dir = TestDir::new();
        let (atk, v2, b1, b2) = (n.port("atk"), n.port("v2"), n.port("b1"), n.port("b2"));
        let mut cfg = Config::new();
        let t = cfg.tenant("atk");
        t.network("lan", vni, "10.63.0.0/24").gateway = Some("10.63.0.1".into());
        t.port(&atk, "lan", &n.tap("atk"), ATK_MAC, "10.63.0.10");
        t.port(&v2, "lan", &n.tap("v2"), V2_MAC, "10.63.0.11");
        let mut text = cfg.to_toml();
        text.push_str(&bystander_toml(
            &n,
            vni + 1,
            "10.63.0",
            ("02:00:00:64:00:21", "02:00:00:64:00:22"),
        ));
        let path = dir.write("vswitch.toml", &text);
        let flood_py = script(&dir, "flood.py", FLOOD_PY);
        let sw = Switch::start(&dir, &path);
        let lab = Lab::up(&path, &[atk.clone(), v2.clone(), b1.clone(), b2.clone()]);
        lab.assert_ping(&b1, "10.63.0.22", 2);
        lab.assert_ping(&atk, "10.63.0.11", 1);
        Storm {
            lab,
            sw,
            atk,
            v2,
            b1,
            b2,
            flood_py,
            dir,
        }
    }

    fn capture(&self, port: &str, filter: &[&str]) -> Capture {
        Capture::start_snap(&self.dir, port, &format!("cap-{port}"), "eth0", 256, filter)
    }

    fn flood(&self, kind: &str, count: u64, args: &[&str]) -> Bg {
        let c = count.to_string();
        let mut argv = vec![
            "python3",
            self.flood_py.as_str(),
            kind,
            "eth0",
            c.as_str(),
            "7",
            "100",
            "0.005",
        ];
        argv.extend_from_slice(args);
        self.lab.spawn(&self.dir, &self.atk, "flood", &argv)
    }
}

/// The bystanders' captures must hold no frame with `marker` and no
/// frame from the attacker's MAC.
fn assert_nothing_crossed(what: &str, caps: &[(&str, &Captured)], marker: &[u8]) {
    let atk = [2u8, 0, 0, 0x63, 0, 0x0a];
    for (who, c) in caps {
        assert_eq!(
            c.count_with(marker),
            0,
            "{what}: {who} (another tenant) captured the attacker's frames"
        );
        assert!(
            !c.frames.iter().any(|f| f.get(6..12) == Some(&atk[..])),
            "{what}: {who} captured a frame from the attacker's MAC"
        );
        assert!(
            !c.frames.is_empty(),
            "{what}: {who} captured nothing at all (the bystander traffic should be there)"
        );
    }
}

#[test]
fn arp_storm_stays_in_its_network_and_the_responder_answers() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "tcpdump", "ping", "iperf3"]) {
        return;
    }
    let _turn = one_flood_at_a_time();
    let s = Storm::new("far", 6300);
    let ask_py = script(&s.dir, "arp_ask.py", ARP_ASK_PY);
    let ask = |target: &str| -> String {
        let o = s.lab.exec(
            &s.v2,
            &["python3", &ask_py, "eth0", V2_MAC, "10.63.0.11", target],
        );
        assert!(
            o.status.success(),
            "no ARP reply for {target}:\n{}",
            fmt_output(&o)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let gw_mac = ask("10.63.0.1");
    assert_eq!(ask("10.63.0.10"), ATK_MAC);

    let c_v2 = s.capture(&s.v2, &["arp"]);
    // Bystanders: everything but their own TCP flow.
    let c_b1 = s.capture(&s.b1, &["not", "tcp"]);
    let c_b2 = s.capture(&s.b2, &["not", "tcp"]);
    let p0 = port_of(&s.sw, &s.atk);
    let v0 = port_of(&s.sw, &s.v2);
    let tx_dropped0 = vm_tx_dropped(&s.atk);

    const COUNT: u64 = 20_000;
    // v2 keeps asking for the gateway and the attacker's address (the
    // switch answers both) through the storm.
    let watch_py = script(&s.dir, "arp_watch.py", ARP_WATCH_PY);
    let mut watch = s.lab.spawn(
        &s.dir,
        &s.v2,
        "arp-watch",
        &[
            "python3",
            &watch_py,
            "eth0",
            V2_MAC,
            "10.63.0.11",
            "4",
            "10.63.0.1",
            "10.63.0.10",
        ],
    );
    let mut work = Workload::start(&s.dir, "bys", &s.b1, &s.b2, "10.63.0.22", 4);
    // Requests for addresses nobody has: .1 (gateway), .10 (the attacker)
    // and .11 (v2) are answered by the switch, the rest must flood.
    let flood = s.flood("arp", COUNT, &[ATK_MAC, "10.63.0.10", "10.63.0", "1,10,11"]);
    let sent = finish_flood(flood, COUNT);
    assert!(
        work.running(),
        "the flood outlasted the bystanders' traffic"
    );
    let report = work.finish();

    let mut p1 = Value::Null;
    wait_until(Duration::from_secs(5), || {
        p1 = port_of(&s.sw, &s.atk);
        num(&p1, "rx_packets") - num(&p0, "rx_packets") >= COUNT
    });
    let rx = num(&p1, "rx_packets") - num(&p0, "rx_packets");
    let v1 = port_of(&s.sw, &s.v2);
    let v2_tx = num(&v1, "tx_packets") - num(&v0, "tx_packets");
    let v2_busy = drop_count(&v1, "egress_busy") - drop_count(&v0, "egress_busy");
    let tx_dropped = vm_tx_dropped(&s.atk) - tx_dropped0;
    let in_v2 = c_v2.stop();
    let in_b1 = c_b1.stop();
    let in_b2 = c_b2.stop();
    let seen_v2 = in_v2.count_with(b"ARPSTORM");
    watch.wait(Duration::from_secs(10));
    // Answers that arrived while the storm was being sent.
    let answers: Vec<(String, String)> = watch
        .stdout()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let t: f64 = w.next()?.parse().ok()?;
            let (ip, mac) = (w.next()?.to_string(), w.next()?.to_string());
            (t > sent.start && t < sent.end).then_some((ip, mac))
        })
        .collect();
    let answered = |ip: &str| answers.iter().filter(|(t, _)| t == ip).count();
    eprintln!(
        "ARP storm: sent {} in {:.2} s ({} ENOBUFS retries), attacker port rx {rx}, VM \
         tx_dropped {tx_dropped}; during it v2 got {} answers for the gateway and {} for the \
         attacker's address; v2: switch tx {v2_tx}, egress_busy {v2_busy}, captured \
         {seen_v2} (tcpdump dropped {}); bystanders captured {} + {} frames",
        sent.sent,
        sent.secs,
        sent.retries,
        answered("10.63.0.1"),
        answered("10.63.0.10"),
        in_v2.dropped_by_kernel,
        in_b1.frames.len(),
        in_b2.frames.len()
    );
    assert!(
        rx >= COUNT,
        "attacker port rx_packets rose by {rx}, sent {COUNT} (VM tx_dropped {tx_dropped}): {p1}"
    );
    // The responder kept answering during the storm (which lasts at least
    // 1 s: 200 pauses of 5 ms; a request for each address every 100 ms),
    // with the right MACs.
    assert!(
        answered("10.63.0.1") >= 3 && answered("10.63.0.10") >= 3,
        "no ARP answers for v2 while the storm ran ({:.3}..{:.3}): {}",
        sent.start,
        sent.end,
        watch.stdout()
    );
    for (ip, mac) in &answers {
        let want = if ip == "10.63.0.1" { &gw_mac } else { ATK_MAC };
        assert_eq!(mac, want, "answer for {ip} during the storm");
    }
    // Within the network, every request was flooded to v2: written to its
    // tap or counted as refused there.
    assert!(
        v2_tx + v2_busy >= COUNT,
        "v2 got {v2_tx} frames + {v2_busy} egress_busy of {COUNT} flooded requests: {v1}"
    );
    assert!(
        seen_v2 as u64 >= COUNT / 2,
        "positive control: v2 captured only {seen_v2} of {COUNT} requests"
    );
    assert_nothing_crossed(
        "ARP storm",
        &[(&s.b1, &in_b1), (&s.b2, &in_b2)],
        b"ARPSTORM",
    );
    assert_bystanders("ARP storm", &report);
    // Nothing counted as spoofing: the requests were the attacker's own.
    assert_eq!(drop_count(&p1, "arp_spoofed"), 0, "{p1}");
    assert_eq!(ask("10.63.0.1"), gw_mac);
    assert_no_panic(&s.sw.log());
}

#[test]
fn broadcast_storm_stays_in_its_network() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "tcpdump", "ping", "iperf3"]) {
        return;
    }
    let _turn = one_flood_at_a_time();
    let s = Storm::new("fbc", 6500);
    let c_v2 = s.capture(&s.v2, &["ether", "proto", "0x88b5"]);
    let c_b1 = s.capture(&s.b1, &["not", "tcp"]);
    let c_b2 = s.capture(&s.b2, &["not", "tcp"]);
    let p0 = port_of(&s.sw, &s.atk);
    let v0 = port_of(&s.sw, &s.v2);
    let tx_dropped0 = vm_tx_dropped(&s.atk);

    const COUNT: u64 = 20_000;
    let mut work = Workload::start(&s.dir, "bys", &s.b1, &s.b2, "10.63.0.22", 4);
    let flood = s.flood("bcast", COUNT, &[ATK_MAC]);
    let sent = finish_flood(flood, COUNT);
    assert!(
        work.running(),
        "the flood outlasted the bystanders' traffic"
    );
    let report = work.finish();

    let mut p1 = Value::Null;
    wait_until(Duration::from_secs(5), || {
        p1 = port_of(&s.sw, &s.atk);
        num(&p1, "rx_packets") - num(&p0, "rx_packets") >= COUNT
    });
    let rx = num(&p1, "rx_packets") - num(&p0, "rx_packets");
    let v1 = port_of(&s.sw, &s.v2);
    let v2_tx = num(&v1, "tx_packets") - num(&v0, "tx_packets");
    let v2_busy = drop_count(&v1, "egress_busy") - drop_count(&v0, "egress_busy");
    let tx_dropped = vm_tx_dropped(&s.atk) - tx_dropped0;
    let in_v2 = c_v2.stop();
    let in_b1 = c_b1.stop();
    let in_b2 = c_b2.stop();
    let seen_v2 = in_v2.count_with(b"BCASTSTORM");
    eprintln!(
        "broadcast storm: sent {} in {:.2} s ({} ENOBUFS retries), attacker port rx {rx}, VM \
         tx_dropped {tx_dropped}; v2: switch tx {v2_tx}, egress_busy {v2_busy}, captured \
         {seen_v2} (tcpdump dropped {}); bystanders captured {} + {} frames",
        sent.sent,
        sent.secs,
        sent.retries,
        in_v2.dropped_by_kernel,
        in_b1.frames.len(),
        in_b2.frames.len()
    );
    assert!(
        rx >= COUNT,
        "attacker port rx_packets rose by {rx}, sent {COUNT} (VM tx_dropped {tx_dropped}): {p1}"
    );
    assert!(
        v2_tx + v2_busy >= COUNT,
        "v2 got {v2_tx} frames + {v2_busy} egress_busy of {COUNT} broadcasts: {v1}"
    );
    assert!(
        seen_v2 as u64 >= COUNT / 2,
        "positive control: v2 captured only {seen_v2} of {COUNT} broadcasts"
    );
    assert_nothing_crossed(
        "broadcast storm",
        &[(&s.b1, &in_b1), (&s.b2, &in_b2)],
        b"BCASTSTORM",
    );
    assert_bystanders("broadcast storm", &report);
    assert_eq!(num(&p1, "drops_total"), num(&p0, "drops_total"), "{p1}");
    assert_no_panic(&s.sw.log());
}

const UL_A: &str = "198.19.0.1";
const UL_B: &str = "198.19.0.2";
const UL_X: &str = "198.19.0.9";

/// `python3 FILE SRC_IP DSTS COUNT SEED EVERY PAUSE VNIS`: COUNT VXLAN
/// datagrams from SRC_IP to the hosts in DSTS (comma-separated, in turn),
/// VNI random in 1..2^24 except every 4th one, which takes the next of
/// VNIS (the VNIs in use); inner frames to broadcast or a random unicast
/// MAC, 60-200 bytes, with the marker VXFLOOD. Prints `sent=N` and
/// `to=IP:N` per host.
const VXLAN_PY: &str = r#"
import random, socket, struct, sys, time
src, dsts, count, seed = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
every, pause, vnis = int(sys.argv[5]), float(sys.argv[6]), [int(v) for v in sys.argv[7].split(",")]
rng = random.Random(seed)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
s.bind((src, 0))
per = dict((d, 0) for d in dsts)
def rmac():
    m = bytearray(rng.getrandbits(8) for _ in range(6))
    m[0] = (m[0] & 0xFC) | 0x02
    return bytes(m)
for i in range(count):
    vni = vnis[(i // 4) % len(vnis)] if i % 4 == 0 else rng.randrange(1, 1 << 24)
    dst = b"\xff" * 6 if i % 2 else rmac()
    inner = dst + rmac() + b"\x08\x00" + b"\x45" + bytes(19) + b"VXFLOOD" + struct.pack("!I", i)
    inner += bytes(rng.randrange(60, 201) - len(inner))
    hdr = struct.pack("!BBBBI", 0x08, 0, 0, 0, vni << 8)
    to = dsts[i % len(dsts)]
    s.sendto(hdr + inner, (to, 4789))
    per[to] += 1
    if every and i % every == every - 1:
        time.sleep(pause)
print("sent=%d" % count)
for d in dsts:
    print("to=%s:%d" % (d, per[d]))
"#;

fn port_toml(name: &str, network: &str, host: &str, mac: &str, ip: &str) -> String {
    format!(
        "  [[tenant.port]]\n  name = \"{name}\"\n  network = \"{network}\"\n  host = \"{host}\"\n  mac = \"{mac}\"\n  ip = \"{ip}\"\n\n"
    )
}

fn rx_not_peer(lab: &MultiLab, host: &str) -> u64 {
    lab.ctl(host, &["show"])["underlay"]["rx_not_peer"]
        .as_u64()
        .unwrap_or(0)
}

/// UDP receive errors of a host namespace's stack (datagrams the kernel
/// dropped before the switch could read them).
fn udp_rcvbuf_errors(ns: &str) -> u64 {
    let out = ns_exec(ns, &["cat", "/proc/net/snmp"], Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn vxlan_from_a_non_peer_with_random_vnis() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "tcpdump", "ping", "iperf3"]) {
        return;
    }
    let _turn = one_flood_at_a_time();
    let n = Names::new("fvx");
    let dir = TestDir::new();
    let (ha, hb) = (n.port("ha"), n.port("hb"));
    let ul = format!("ul-{ha}");
    let (w1, w2, g1, g2, x) = (
        n.port("w1"),
        n.port("w2"),
        n.port("g1"),
        n.port("g2"),
        n.port("x"),
    );
    let mut t = format!(
        "[[host]]\nname = \"{ha}\"\nunderlay = \"{UL_A}/16\"\n\n[[host]]\nname = \"{hb}\"\nunderlay = \"{UL_B}/16\"\n\n"
    );
    t.push_str("[[tenant]]\nname = \"acme\"\n\n  [[tenant.network]]\n  name = \"web\"\n  vni = 1001\n  cidr = \"10.0.1.0/24\"\n\n");
    t += &port_toml(&w1, "web", &ha, "02:00:00:00:01:01", "10.0.1.11");
    t += &port_toml(&w2, "web", &hb, "02:00:00:00:01:02", "10.0.1.12");
    t.push_str("[[tenant]]\nname = \"globex\"\n\n  [[tenant.network]]\n  name = \"web\"\n  vni = 2001\n  cidr = \"10.0.1.0/24\"\n\n");
    t += &port_toml(&g1, "web", &ha, "02:00:00:00:01:01", "10.0.1.11");
    t += &port_toml(&g2, "web", &hb, "02:00:00:00:01:02", "10.0.1.12");
    let path = dir.write("vswitch.toml", &t);
    let all_ns = [&ha, &hb, &ul, &w1, &w2, &g1, &g2, &x].map(|s| s.to_string());
    let lab = MultiLab::up(&dir, &path, None, &all_ns);
    lab.assert_ping(&w1, "10.0.1.12", 2);
    lab.assert_ping(&g1, "10.0.1.12", 2);

    // The attacker: a namespace on the underlay bridge, not in the config.
    let ip = |args: &[&str]| {
        let out = run_timeout(
            std::process::Command::new("ip").args(args),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "ip {args:?}: {}", fmt_output(&out));
    };
    ip(&["netns", "add", &x]);
    let outer = format!("ul-{x}");
    ip(&[
        "-n", &ul, "link", "add", &outer, "type", "veth", "peer", "name", "ul0", "netns", &x,
    ]);
    ip(&["-n", &ul, "link", "set", &outer, "master", "br0", "up"]);
    ip(&["-n", &x, "addr", "add", &format!("{UL_X}/16"), "dev", "ul0"]);
    ip(&["-n", &x, "link", "set", "ul0", "up"]);
    ip(&["-n", &x, "link", "set", "lo", "up"]);
    // Resolve both hosts first: datagrams queued behind an unresolved
    // neighbour could be dropped by the attacker's own kernel.
    for h in [UL_A, UL_B] {
        let o = ns_exec(
            &x,
            &["ping", "-c", "1", "-W", "2", h],
            Duration::from_secs(10),
        );
        assert!(o.status.success(), "{}", fmt_output(&o));
    }

    let caps: Vec<(String, Capture)> = [&w1, &w2, &g1, &g2]
        .iter()
        .map(|vm| {
            let c =
                Capture::start_snap(&dir, vm, &format!("cap-{vm}"), "eth0", 256, &["not", "tcp"]);
            (vm.to_string(), c)
        })
        .collect();
    let before = (rx_not_peer(&lab, &ha), rx_not_peer(&lab, &hb));
    let rcvbuf0 = (udp_rcvbuf_errors(&ha), udp_rcvbuf_errors(&hb));

    const COUNT: u64 = 5_000;
    let mut work = Workload::start(&dir, "acme", &w1, &w2, "10.0.1.12", 4);
    let vx_py = script(&dir, "vxlan.py", VXLAN_PY);
    let mut flood = Bg::spawn_in(
        &dir,
        &x,
        "vxflood",
        &[
            "python3",
            &vx_py,
            UL_X,
            &format!("{UL_A},{UL_B}"),
            &COUNT.to_string(),
            "3",
            "100",
            "0.005",
            "1001,2001",
        ],
    );
    let st = flood.wait(Duration::from_secs(30));
    assert!(st.success(), "{}{}", flood.stdout(), flood.stderr());
    let out = flood.stdout();
    let to = |h: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("to={h}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("sender output: {out}"))
    };
    let (to_a, to_b) = (to(UL_A), to(UL_B));
    assert_eq!(to_a + to_b, COUNT, "{out}");
    assert!(
        work.running(),
        "the flood outlasted the bystanders' traffic"
    );
    let report = work.finish();

    let mut got = (0, 0);
    let exact = wait_until(Duration::from_secs(5), || {
        got = (
            rx_not_peer(&lab, &ha) - before.0,
            rx_not_peer(&lab, &hb) - before.1,
        );
        got == (to_a, to_b)
    });
    let rcvbuf = (
        udp_rcvbuf_errors(&ha) - rcvbuf0.0,
        udp_rcvbuf_errors(&hb) - rcvbuf0.1,
    );
    let captured: Vec<(String, Captured)> =
        caps.into_iter().map(|(vm, c)| (vm, c.stop())).collect();
    eprintln!(
        "VXLAN flood: sent {to_a} to host a and {to_b} to host b; rx_not_peer rose by {} and {}; \
         UDP RcvbufErrors {} and {}; VMs captured {:?} frames",
        got.0,
        got.1,
        rcvbuf.0,
        rcvbuf.1,
        captured
            .iter()
            .map(|(vm, c)| (vm.as_str(), c.frames.len()))
            .collect::<Vec<_>>()
    );
    assert!(
        exact,
        "rx_not_peer rose by {got:?}, sent {:?} (kernel UDP RcvbufErrors {rcvbuf:?})",
        (to_a, to_b)
    );
    for (vm, c) in &captured {
        assert_eq!(c.count_with(b"VXFLOOD"), 0, "{vm} saw an injected frame");
    }
    // Nothing the peers sent was dropped on the way.
    for (h, peer) in [(&ha, &hb), (&hb, &ha)] {
        let show = lab.ctl(h, &["show"]);
        let p = show["underlay"]["peers"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == **peer).cloned())
            .unwrap_or(Value::Null);
        assert_eq!(num(&p, "drops_total"), 0, "{h}: peer {peer}: {p}");
    }
    assert_bystanders("VXLAN flood", &report);
    lab.assert_ping(&g1, "10.0.1.12", 3);
    assert_no_panic(&lab.log(&ha));
    assert_no_panic(&lab.log(&hb));
}

#[test]
fn udp_flows_exhaust_snat_ports_and_nothing_else() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "ping", "iperf3"]) {
        return;
    }
    let _turn = one_flood_at_a_time();
    let n = Names::new("fsn");
    let dir = TestDir::new();
    let (atk, ext, b1, b2) = (n.port("atk"), n.port("ext"), n.port("b1"), n.port("b2"));
    let atk_mac = "02:00:00:64:00:0a";
    let mut text = bystander_toml(
        &n,
        6400,
        "10.64.0",
        ("02:00:00:64:00:21", "02:00:00:64:00:22"),
    );
    text.push_str(&format!(
        r#"
[[uplink]]
name = "{ext}"
tap = "{ext_tap}"
address = "203.0.113.2/24"
gateway = "203.0.113.1"
snat_ports = "20000-29999"

[[tenant]]
name = "vic"
  [[tenant.network]]
  name = "lan"
  vni = 6500
  cidr = "10.64.0.0/24"
  gateway = "10.64.0.1"
  snat = true

  [[tenant.port]]
  name = "{atk}"
  network = "lan"
  tap = "{atk_tap}"
  mac = "{atk_mac}"
  ip = "10.64.0.10"
"#,
        ext_tap = n.tap("ext"),
        atk_tap = n.tap("atk"),
    ));
    let path = dir.write("vswitch.toml", &text);
    let flood_py = script(&dir, "flood.py", FLOOD_PY);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[atk.clone(), ext.clone(), b1.clone(), b2.clone()]);
    lab.assert_ping(&b1, "10.64.0.22", 2);
    // The attacker learns its gateway's MAC; the switch its next hop's
    // (the first echo request waits for that ARP answer and is dropped).
    let o = lab.ping(&atk, "203.0.113.1", 3);
    assert!(o.status.success(), "{}", fmt_output(&o));
    let neigh = lab.exec(&atk, &["ip", "neigh", "show", "10.64.0.1"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    let gw_mac = neigh
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_else(|| panic!("no gateway MAC in {neigh:?}"))
        .to_string();
    let p0 = port_of(&sw, &atk);
    let nat0 = sw.ctl(&["nat"]);

    const COUNT: u64 = 50_000;
    let mut work = Workload::start(&dir, "bys", &b1, &b2, "10.64.0.22", 6);
    let flood = lab.spawn(
        &dir,
        &atk,
        "flood",
        &[
            "python3",
            &flood_py,
            "udp",
            "eth0",
            &COUNT.to_string(),
            "1",
            "100",
            "0.005",
            atk_mac,
            &gw_mac,
            "10.64.0.10",
            "203.0.113.1",
            "9",
            "10000",
        ],
    );
    let sent = finish_flood(flood, COUNT);
    assert!(
        work.running(),
        "the flood outlasted the bystanders' traffic"
    );
    let report = work.finish();

    let mut p1 = Value::Null;
    let counted = wait_until(Duration::from_secs(10), || {
        p1 = port_of(&sw, &atk);
        num(&p1, "rx_packets") - num(&p0, "rx_packets") >= COUNT
    });
    let exhausted = drop_count(&p1, "nat_ports_exhausted") - drop_count(&p0, "nat_ports_exhausted");
    let nat = sw.ctl(&["nat"]);
    let udp_pool = nat["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["proto"] == "udp" && p["external"] == "203.0.113.2")
        .cloned()
        .unwrap_or(Value::Null);
    eprintln!(
        "SNAT flood: sent {} in {:.2} s ({} retries), exhausted {exhausted}, pool {udp_pool}, \
         connections {}",
        sent.sent, sent.secs, sent.retries, nat["connections"]
    );
    assert!(counted, "the switch saw every frame: {p1}");
    assert_eq!(udp_pool["used"], 10_000, "{nat:#}");
    assert_eq!(udp_pool["free"], 0, "{nat:#}");
    assert_eq!(exhausted, COUNT - 10_000, "{p1}");
    assert_eq!(
        num(&nat["stats"], "ports_exhausted") - num(&nat0["stats"], "ports_exhausted"),
        COUNT - 10_000
    );
    assert!(
        nat["connections"].as_u64().unwrap_or(0) >= 10_000
            && nat["connections"].as_u64().unwrap_or(0) <= 10_010,
        "{nat:#}"
    );
    assert_bystanders("SNAT flood", &report);
    // The attacker's earlier connection (its ping) kept its mapping; ICMP
    // has its own identifier pool, so ping still goes out.
    lab.assert_ping(&atk, "203.0.113.1", 2);
    assert_no_panic(&sw.log());
}

#[test]
fn syn_flood_to_many_ports_hits_the_senders_own_limit() {
    if !netns_or_skip() || !tools_or_skip(&["python3", "ping", "iperf3"]) {
        return;
    }
    let _turn = one_flood_at_a_time();
    let n = Names::new("fsy");
    let dir = TestDir::new();
    let (atk, tgt, b1, b2) = (n.port("atk"), n.port("tgt"), n.port("b1"), n.port("b2"));
    let (atk_mac, tgt_mac) = ("02:00:00:66:00:0a", "02:00:00:66:00:0b");
    let mut text = bystander_toml(
        &n,
        6600,
        "10.66.0",
        ("02:00:00:66:00:21", "02:00:00:66:00:22"),
    );
    text.push_str(&format!(
        r#"
[[tenant]]
name = "vic"
  [[tenant.network]]
  name = "lan"
  vni = 6700
  cidr = "10.66.0.0/24"

  [[tenant.security_group]]
  name = "web"
    [[tenant.security_group.rule]]
    direction = "ingress"
    proto = "tcp"
    ports = "80"
  [[tenant.security_group]]
  name = "out"
    [[tenant.security_group.rule]]
    direction = "egress"

  [[tenant.port]]
  name = "{atk}"
  network = "lan"
  tap = "{atk_tap}"
  mac = "{atk_mac}"
  ip = "10.66.0.10"
  security_groups = ["out"]
  max_connections = 100

  [[tenant.port]]
  name = "{tgt}"
  network = "lan"
  tap = "{tgt_tap}"
  mac = "{tgt_mac}"
  ip = "10.66.0.11"
  security_groups = ["web"]
"#,
        atk_tap = n.tap("atk"),
        tgt_tap = n.tap("tgt"),
    ));
    let path = dir.write("vswitch.toml", &text);
    let flood_py = script(&dir, "flood.py", FLOOD_PY);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &[atk.clone(), tgt.clone(), b1.clone(), b2.clone()]);
    lab.assert_ping(&b1, "10.66.0.22", 2);
    let (a0, t0) = (port_of(&sw, &atk), port_of(&sw, &tgt));

    const COUNT: u64 = 20_000;
    let mut work = Workload::start(&dir, "bys", &b1, &b2, "10.66.0.22", 4);
    let flood = lab.spawn(
        &dir,
        &atk,
        "flood",
        &[
            "python3",
            &flood_py,
            "syn",
            "eth0",
            &COUNT.to_string(),
            "1",
            "100",
            "0.005",
            atk_mac,
            tgt_mac,
            "10.66.0.10",
            "10.66.0.11",
        ],
    );
    let sent = finish_flood(flood, COUNT);
    assert!(
        work.running(),
        "the flood outlasted the bystanders' traffic"
    );
    let report = work.finish();

    let mut a1 = Value::Null;
    let counted = wait_until(Duration::from_secs(10), || {
        a1 = port_of(&sw, &atk);
        num(&a1, "rx_packets") - num(&a0, "rx_packets") >= COUNT
    });
    let t1 = port_of(&sw, &tgt);
    let limited = drop_count(&a1, "conn_limit") - drop_count(&a0, "conn_limit");
    let denied = drop_count(&t1, "sg_ingress_denied") - drop_count(&t0, "sg_ingress_denied");
    let sg = sw.ctl(&["sg", "--port", &atk]);
    let tracked = sg["ports"][0]["connections"].as_u64().unwrap_or(0);
    eprintln!(
        "SYN flood: sent {} in {:.2} s, conn_limit {limited}, target sg_ingress_denied {denied}, \
         attacker tracked {tracked}",
        sent.sent, sent.secs
    );
    assert!(counted, "{a1}");
    assert_eq!(tracked, 100, "{sg:#}");
    assert_eq!(limited, COUNT - 100, "{a1}");
    // The 100 that left the attacker met the target's ingress rule: only
    // port 80 may come in (port 80 is one of the 20,000).
    assert!((99..=100).contains(&denied), "{t1}");
    assert_eq!(
        sw.ctl(&["sg"])["connections"].as_u64().unwrap_or(0),
        100 + u64::from(denied < 100)
    );
    assert_bystanders("SYN flood", &report);
    assert_no_panic(&sw.log());
}
