//! The switch answers ARP itself, and a VM that lies about its addresses
//! reaches no one.

use std::time::Duration;

use rustix::process::Signal;
use vswitch_tests::*;

/// `python3 FILE IFNAME KIND COUNT OUR_MAC OUR_IP VICTIM_MAC VICTIM_IP OTHER_IP`
/// sends COUNT crafted frames of KIND from the namespace's eth0:
/// - `legit`: UDP from OUR_MAC/OUR_IP to the victim, payload LEGITLEGIT
///   (with another port's MAC as OUR_MAC it is a MAC spoof);
/// - `ip-spoof`: UDP from OUR_MAC but OTHER_IP, payload SPOOFSPOOF;
/// - `arp-spoof`: ARP reply claiming OTHER_IP is at our MAC, to the victim;
/// - `dhcp-server`: a DHCPOFFER-shaped UDP 67 -> 68 broadcast, payload SPOOFSPOOF.
const CRAFT_PY: &str = r#"
import socket, struct, sys
ifname, kind, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
our_mac, our_ip, vic_mac, vic_ip, other_ip = sys.argv[4:9]
mac = lambda s: bytes.fromhex(s.replace(":", ""))
ip = lambda s: socket.inet_aton(s)
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
def udp(src_mac, dst_mac, src, dst, sport, dport, payload):
    u = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(u), 1, 0, 64, 17, 0, ip(src), ip(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return mac(dst_mac) + mac(src_mac) + b"\x08\x00" + h + u
def arp_reply(src_mac, dst_mac, spa, tpa):
    a = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac(src_mac), ip(spa), mac(dst_mac), ip(tpa))
    return mac(dst_mac) + mac(src_mac) + b"\x08\x06" + a
if kind == "legit":
    f = udp(our_mac, vic_mac, our_ip, vic_ip, 40000, 9999, b"LEGITLEGIT")
elif kind == "ip-spoof":
    f = udp(our_mac, vic_mac, other_ip, vic_ip, 40000, 9999, b"SPOOFSPOOF")
elif kind == "arp-spoof":
    f = arp_reply(our_mac, vic_mac, other_ip, vic_ip)
elif kind == "dhcp-server":
    f = udp(our_mac, "ff:ff:ff:ff:ff:ff", our_ip, "255.255.255.255", 67, 68, b"\x02\x01\x06\x00SPOOFSPOOF" + bytes(230))
else:
    sys.exit("unknown kind " + kind)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
for _ in range(count):
    s.send(f)
print(count)
"#;

fn craft(lab: &Lab, dir: &TestDir, port: &str, kind: &str, count: u32, args: [&str; 5]) {
    let script = dir.write("craft.py", CRAFT_PY);
    let script = script.to_string_lossy().into_owned();
    let n = count.to_string();
    let mut argv = vec!["python3", script.as_str(), "eth0", kind, n.as_str()];
    argv.extend(args);
    let out = lab.exec(port, &argv);
    assert!(out.status.success(), "craft {kind}:\n{}", fmt_output(&out));
}

fn start_capture(lab: &Lab, dir: &TestDir, port: &str) -> (std::path::PathBuf, Bg) {
    let file = dir.file(&format!("{port}.pcap"));
    let f = file.to_string_lossy().into_owned();
    let bg = lab.spawn(
        dir,
        port,
        &format!("tcpdump-{port}"),
        &[
            "tcpdump",
            "--immediate-mode",
            "-n",
            "-U",
            "-Z",
            "root",
            "-s",
            "0",
            "-i",
            "eth0",
            "-w",
            &f,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || bg
            .stderr()
            .contains("listening on")),
        "tcpdump in {port} did not start: {}",
        bg.stderr()
    );
    (file, bg)
}

fn stop_capture(port: &str, file: &std::path::Path, mut bg: Bg) -> Vec<Vec<u8>> {
    let st = bg.stop(Signal::INT, Duration::from_secs(10));
    assert!(st.success(), "tcpdump in {port}: {st} {}", bg.stderr());
    pcap::read(file).unwrap_or_else(|e| panic!("{e}"))
}

/// An ARP frame as (op, sender MAC, sender IP, target IP).
type Arp = (u16, [u8; 6], [u8; 4], [u8; 4]);

/// The ARP frames in `frames`.
fn arps(frames: &[Vec<u8>]) -> Vec<Arp> {
    frames
        .iter()
        .filter(|f| f.len() >= 42 && f[12..14] == [0x08, 0x06])
        .map(|f| {
            let a = &f[14..];
            let mut sha = [0; 6];
            sha.copy_from_slice(&a[8..14]);
            let mut spa = [0; 4];
            spa.copy_from_slice(&a[14..18]);
            let mut tpa = [0; 4];
            tpa.copy_from_slice(&a[24..28]);
            (u16::from_be_bytes([a[6], a[7]]), sha, spa, tpa)
        })
        .collect()
}

fn drops(sw: &Switch, port: &str, reason: &str) -> u64 {
    sw.port(port)
        .map(|p| p["drops"][reason].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

#[test]
fn arp_is_answered_by_the_switch() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "tcpdump"]) {
        return;
    }
    let n = Names::new("arp");
    let dir = TestDir::new();
    let (v1, v2, v3) = (n.port("v1"), n.port("v2"), n.port("v3"));
    let mut cfg = Config::new();
    let t = cfg.tenant("t");
    t.network("net", 501, "10.0.5.0/24");
    t.port(&v1, "net", &n.tap("v1"), "02:00:00:05:00:01", "10.0.5.1");
    t.port(&v2, "net", &n.tap("v2"), "02:00:00:05:00:02", "10.0.5.2");
    t.port(&v3, "net", &n.tap("v3"), "02:00:00:05:00:03", "10.0.5.3");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());

    let (f3, c3) = start_capture(&lab, &dir, &v3);
    let (f2, c2) = start_capture(&lab, &dir, &v2);
    // v1 resolves v2 (ping needs it), then asks for an address nobody has:
    // that one must flood (positive control for the captures).
    lab.assert_ping(&v1, "10.0.5.2", 2);
    let _ = lab.exec(&v1, &["ping", "-n", "-c", "1", "-W", "1", "10.0.5.99"]);
    let neigh = lab.exec(&v1, &["ip", "neigh", "show", "10.0.5.2"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    assert!(
        neigh.contains("02:00:00:05:00:02"),
        "v1's neighbour entry for v2: {neigh:?}"
    );

    let in_v3 = arps(&stop_capture(&v3, &f3, c3));
    let in_v2 = arps(&stop_capture(&v2, &f2, c2));
    let for_v2 = |a: &&Arp| a.0 == 1 && a.3 == [10, 0, 5, 2];
    let for_99 = |a: &&Arp| a.0 == 1 && a.3 == [10, 0, 5, 99];
    assert_eq!(
        in_v3.iter().filter(for_v2).count(),
        0,
        "v3 saw ARP requests for v2: {in_v3:?}"
    );
    assert_eq!(
        in_v2.iter().filter(for_v2).count(),
        0,
        "v2 saw ARP requests for itself: {in_v2:?}"
    );
    assert!(
        in_v3.iter().any(|a| for_99(&a)),
        "positive control: the request for an unknown address must flood to v3: {in_v3:?}"
    );
    // And v2's request for v1 (to answer the ping) never reached v3 either.
    assert!(
        !in_v3.iter().any(|a| a.0 == 1 && a.3 == [10, 0, 5, 1]),
        "{in_v3:?}"
    );
    drop(sw);
}

#[test]
fn spoofing_vm_reaches_no_one() {
    if !netns_or_skip() || !tools_or_skip(&["ping", "tcpdump", "python3"]) {
        return;
    }
    let n = Names::new("spf");
    let dir = TestDir::new();
    let (v1, v2, bad) = (n.port("v1"), n.port("v2"), n.port("bad"));
    let (m1, m2, mb) = (
        "02:00:00:06:00:01",
        "02:00:00:06:00:02",
        "02:00:00:06:00:0b",
    );
    let mut cfg = Config::new();
    let t = cfg.tenant("t");
    t.network("net", 601, "10.0.6.0/24");
    t.port(&v1, "net", &n.tap("v1"), m1, "10.0.6.1");
    t.port(&v2, "net", &n.tap("v2"), m2, "10.0.6.2");
    t.port(&bad, "net", &n.tap("bad"), mb, "10.0.6.11");
    let path = dir.file("vswitch.toml");
    cfg.write(&path);
    let sw = Switch::start(&dir, &path);
    let lab = Lab::up(&path, &cfg.port_names());
    lab.assert_ping(&v1, "10.0.6.2", 1);

    let (f1, c1) = start_capture(&lab, &dir, &v1);
    let (f2, c2) = start_capture(&lab, &dir, &v2);
    // Positive control: the same crafter's honest frames arrive.
    craft(
        &lab,
        &dir,
        &bad,
        "legit",
        5,
        [mb, "10.0.6.11", m2, "10.0.6.2", "10.0.6.1"],
    );
    // Lies: v1's IP as source, v1's MAC as source, "10.0.6.2 is at bad" to
    // v1, and a DHCP server.
    craft(
        &lab,
        &dir,
        &bad,
        "ip-spoof",
        20,
        [mb, "10.0.6.11", m2, "10.0.6.2", "10.0.6.1"],
    );
    craft(
        &lab,
        &dir,
        &bad,
        "legit",
        20,
        [m1, "10.0.6.11", m2, "10.0.6.2", "10.0.6.1"],
    );
    craft(
        &lab,
        &dir,
        &bad,
        "arp-spoof",
        20,
        [mb, "10.0.6.11", m1, "10.0.6.1", "10.0.6.2"],
    );
    craft(
        &lab,
        &dir,
        &bad,
        "dhcp-server",
        20,
        [mb, "10.0.6.11", m2, "10.0.6.2", "10.0.6.1"],
    );

    let counted = wait_until(Duration::from_secs(5), || {
        drops(&sw, &bad, "ip_src_spoofed") >= 20
            && drops(&sw, &bad, "src_mac_spoofed") >= 20
            && drops(&sw, &bad, "arp_spoofed") >= 20
            && drops(&sw, &bad, "dhcp_server_from_vm") >= 20
    });
    assert!(counted, "drop counters of {bad}: {:?}", sw.port(&bad));

    let in_v1 = stop_capture(&v1, &f1, c1);
    let in_v2 = stop_capture(&v2, &f2, c2);
    assert!(
        pcap::count_with(&in_v2, b"LEGITLEGIT") >= 5,
        "positive control: v2 must see bad's honest frames ({} frames captured)",
        in_v2.len()
    );
    for (who, frames) in [(&v1, &in_v1), (&v2, &in_v2)] {
        assert_eq!(
            pcap::count_with(frames, b"SPOOFSPOOF"),
            0,
            "{who} received spoofed frames"
        );
        let fake_arp = arps(frames)
            .into_iter()
            .filter(|a| a.2 == [10, 0, 6, 2] && a.1 != [2, 0, 0, 6, 0, 2])
            .count();
        assert_eq!(
            fake_arp, 0,
            "{who} received ARP claiming 10.0.6.2 from a MAC not v2's"
        );
    }
    // Frames with v1's MAC from the bad port: counted above and never
    // delivered (only 5 LEGIT frames, from bad's own MAC, reached v2).
    let legit: Vec<String> = in_v2
        .iter()
        // Incoming only: v2's ICMP port-unreachable answers quote the payload.
        .filter(|f| f.starts_with(&[2, 0, 0, 6, 0, 2]) && pcap::contains(f, b"LEGITLEGIT"))
        .map(|f| format!("{:02x?}", &f[..f.len().min(14)]))
        .collect();
    assert_eq!(
        legit.len(),
        5,
        "frames sent with v1's MAC reached v2: {legit:?}"
    );
    // v1 still maps 10.0.6.2 to v2's MAC.
    let neigh = lab.exec(&v1, &["ip", "neigh", "show", "10.0.6.2"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    assert!(
        !neigh.contains(mb),
        "v1's ARP cache was poisoned: {neigh:?}"
    );
    lab.assert_ping(&v1, "10.0.6.2", 1);
}
