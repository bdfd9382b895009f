//! Tap devices with the virtio-net header: one of the two modules with
//! `unsafe` (the other is `udp_gso`).
//!
//! Why our own module: the `tun-tap` crate has no vnet header support, and
//! the rest of what we need is five ioctls. The device is opened
//! `O_RDWR|O_NONBLOCK|O_CLOEXEC` with `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`, the
//! header size set to 12 (`virtio_net_hdr_mrg_rxbuf`), and offloads turned
//! on with `TUNSETOFFLOAD` so the kernel hands us checksum-partial TSO/USO
//! super-frames instead of segmenting them. Frames are read and written with
//! `readv`/`writev` so the header and the frame live in separate buffers and
//! the frame keeps its headroom.
//!
//! With more than one data-plane worker a tap is opened multi-queue
//! (`IFF_MULTI_QUEUE`, one fd per queue): the kernel spreads the VM's
//! flows over the queues by a symmetric flow hash and sends a flow's
//! replies back on the queue its frames were last written to, so each
//! worker reads and writes its own queue of every port and a flow stays on
//! one worker. A tap that exists single-queue (left by an older run, or
//! made by a VMM) is attached with one queue.

#![allow(unsafe_code)]

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use packet::{Offload, OffloadCaps, OffloadError, PacketBuf, VNET_HDR_LEN};
use rustix::fs::{Mode, OFlags};
use rustix::io::{IoSlice, IoSliceMut};

// <linux/if_tun.h>: _IOW('T', n, int) and _IOR('T', n, unsigned int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// The tun character device answers this socket ioctl for its netdev.
const SIOCGIFHWADDR: libc::c_ulong = 0x8927;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;

const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// `struct ifreq` as TUNSETIFF reads it: the name, then `ifr_flags` at the
/// start of the 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `struct ifreq` as SIOCGIFHWADDR writes it: the name, then a
/// `struct sockaddr` (family, 14 data bytes; the MAC is the first 6).
#[repr(C)]
struct IfReqHwAddr {
    name: [u8; libc::IFNAMSIZ],
    family: u16,
    data: [u8; 14],
    _pad: [u8; 8],
}

/// Most queues a tap is opened with (the kernel allows 256; more than
/// workers never helps).
pub const MAX_QUEUES: usize = 64;

thread_local! {
    /// The queue this thread writes to (`worker index % queues`); 0 for
    /// threads that are not data-plane workers.
    static TX_QUEUE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes the calling thread (data-plane worker `idx`) write to queue
/// `idx % queues` of every multi-queue tap.
pub fn set_thread_queue(idx: usize) {
    TX_QUEUE.with(|q| q.set(idx));
}

/// An open tap device: one fd per queue.
#[derive(Debug)]
pub struct Tap {
    queues: Vec<OwnedFd>,
    name: String,
    /// What the kernel agreed to hand us (and therefore what the VM side's
    /// netdev advertises as TX offloads).
    rx_offloads: OffloadCaps,
}

impl Tap {
    /// Creates (or attaches to a persistent) single-queue tap named `name`.
    pub fn open(name: &str) -> io::Result<Tap> {
        Tap::open_queues(name, 1)
    }

    /// Creates (or attaches to a persistent) tap named `name` with
    /// `queues` queues (at most [`MAX_QUEUES`]). An existing single-queue
    /// tap is attached with one queue: check [`Tap::queues`].
    pub fn open_queues(name: &str, queues: usize) -> io::Result<Tap> {
        let queues = queues.clamp(1, MAX_QUEUES);
        if queues > 1 {
            match Tap::open_queue(name, true) {
                Ok((fd, rx_offloads)) => {
                    let mut fds = vec![fd];
                    for _ in 1..queues {
                        fds.push(Tap::open_queue(name, true)?.0);
                    }
                    return Ok(Tap {
                        queues: fds,
                        name: name.to_string(),
                        rx_offloads,
                    });
                }
                // The device exists without IFF_MULTI_QUEUE (or the kernel
                // lacks it): one queue.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        let (fd, rx_offloads) = Tap::open_queue(name, false)?;
        Ok(Tap {
            queues: vec![fd],
            name: name.to_string(),
            rx_offloads,
        })
    }

    /// Opens one queue of tap `name` with the vnet header and offloads.
    fn open_queue(name: &str, multi_queue: bool) -> io::Result<(OwnedFd, OffloadCaps)> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        let fd = rustix::fs::open(
            "/dev/net/tun",
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;

        let mut features: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes one unsigned int through the pointer,
        // which points at a live, properly aligned local.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                TUNGETFEATURES,
                &mut features as *mut libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if features & (IFF_VNET_HDR as libc::c_uint) == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's tun driver has no IFF_VNET_HDR",
            ));
        }

        if multi_queue && features & (IFF_MULTI_QUEUE as libc::c_uint) == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mq = if multi_queue { IFF_MULTI_QUEUE } else { 0 };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | mq,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may write back the name into) a
        // `struct ifreq`; `IfReq` has its layout and size (40 bytes) and
        // lives for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }

        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len as *const c_int) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }

        let rx_offloads = set_offloads(&fd)?;
        Ok((fd, rx_offloads))
    }

    /// Number of queues (fds) open.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `q`'s fd (for polling), `q` modulo the queue count.
    pub fn queue_fd(&self, q: usize) -> BorrowedFd<'_> {
        self.queue(q).as_fd()
    }

    fn queue(&self, q: usize) -> &OwnedFd {
        // `queues` is never empty (every constructor opens one).
        &self.queues[q % self.queues.len()]
    }

    /// Device name as created.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Offloads the kernel hands us on receive.
    pub fn rx_offloads(&self) -> OffloadCaps {
        self.rx_offloads
    }

    /// What we may hand the kernel on transmit: with a vnet header, the tap
    /// accepts any GSO type and partial checksums and finishes the work in
    /// the receiving stack.
    pub fn tx_offloads(&self) -> OffloadCaps {
        OffloadCaps::ALL
    }

    /// Makes the device outlive this process (or not).
    /// The MAC address of the tap's netdev (the VM side's address when the
    /// netdev plays the VM, as in `vslab`).
    pub fn hw_addr(&self) -> io::Result<[u8; 6]> {
        let mut req = IfReqHwAddr {
            name: [0; libc::IFNAMSIZ],
            family: 0,
            data: [0; 14],
            _pad: [0; 8],
        };
        // SAFETY: SIOCGIFHWADDR on a tun fd fills a `struct ifreq` (40
        // bytes; `IfReqHwAddr` has that layout) that lives for the call.
        let rc = unsafe {
            libc::ioctl(
                self.queue(0).as_raw_fd(),
                SIOCGIFHWADDR,
                &mut req as *mut IfReqHwAddr,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&req.data[..6]);
        Ok(mac)
    }

    /// Attaches to a tap that already exists in the network namespace bound
    /// at `netns` (e.g. `/run/netns/vm1`, where `vslab` moved it) and has
    /// MAC `mac`; `None` if there is none. Never creates a device. The
    /// namespace switch happens on a short-lived thread; the tap's fd works
    /// from any namespace afterwards.
    pub fn attach_in_netns(
        netns: &std::path::Path,
        mac: [u8; 6],
        queues: usize,
    ) -> io::Result<Option<Tap>> {
        let ns = std::fs::File::open(netns)?;
        std::thread::scope(|s| {
            s.spawn(|| -> io::Result<Option<Tap>> {
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                // This thread's view of its namespace's interfaces.
                let dev = std::fs::read_to_string("/proc/thread-self/net/dev")?;
                for line in dev.lines().skip(2) {
                    let Some(name) = line.split(':').next().map(str::trim) else {
                        continue;
                    };
                    if name.is_empty() || name == "lo" {
                        continue;
                    }
                    // The device exists, so TUNSETIFF attaches (or fails for
                    // a non-tap or a busy tap); it cannot create one.
                    if let Ok(t) = Tap::open_queues(name, queues) {
                        if t.hw_addr().is_ok_and(|m| m == mac) {
                            return Ok(Some(t));
                        }
                    }
                }
                Ok(None)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
        })
    }

    /// Keeps the device after the last fd closes (`TUNSETPERSIST`): the
    /// VM's NIC survives a switch crash and the restarted switch
    /// re-attaches.
    pub fn set_persist(&self, persist: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                self.queue(0).as_raw_fd(),
                TUNSETPERSIST,
                libc::c_ulong::from(persist),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame from queue `q` into `buf`. `Ok(Ok(()))`: a frame
    /// with valid offload metadata; `Ok(Err(_))`: a frame whose vnet header
    /// we refuse (drop it); `Err(WouldBlock)`: nothing to read.
    pub fn recv(&self, q: usize, buf: &mut PacketBuf) -> io::Result<Result<(), OffloadError>> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        let n = {
            let mut iov = [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf.rx_area())];
            rustix::io::readv(self.queue(q), &mut iov)?
        };
        if n < VNET_HDR_LEN {
            buf.set_received(0);
            return Ok(Err(OffloadError::Truncated));
        }
        buf.set_received(n - VNET_HDR_LEN);
        match Offload::from_vnet_hdr(&hdr) {
            Ok(o) => {
                buf.offload = o;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// Writes one frame with its offload metadata, on the calling thread's
    /// queue (see [`set_thread_queue`]).
    pub fn send(&self, offload: &Offload, frame: &[u8]) -> io::Result<()> {
        let hdr = offload.to_vnet_hdr();
        let iov = [IoSlice::new(&hdr), IoSlice::new(frame)];
        let q = TX_QUEUE.with(std::cell::Cell::get);
        let n = rustix::io::writev(self.queue(q), &iov)?;
        if n != VNET_HDR_LEN + frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to tap",
            ));
        }
        Ok(())
    }
}

impl AsFd for Tap {
    /// Queue 0.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue(0).as_fd()
    }
}

/// Enables checksum, TSO4/6 (+ECN) and, where the kernel has it (6.2+),
/// USO. Returns what was enabled.
fn set_offloads(fd: &OwnedFd) -> io::Result<OffloadCaps> {
    let base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    for (flags, uso) in [(base | TUN_F_USO4 | TUN_F_USO6, true), (base, false)] {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if rc == 0 {
            return Ok(OffloadCaps {
                csum: true,
                tso4: true,
                tso6: true,
                uso,
            });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "TUNSETOFFLOAD refused checksum/TSO offloads",
    ))
}
