//! One `sendmsg` of a UDP GSO train gathered from a scatter list: the
//! second (and last) module with `unsafe`, beside `tap`.
//!
//! Why: a VXLAN train built contiguously costs a copy of every payload byte
//! in user space before the kernel copies it again. Gathered, each
//! datagram is its headers (VXLAN and the inner segment's, a few dozen
//! bytes written per segment) followed by a slice of the super-frame as it
//! was read from the tap, and the kernel's copy is the only one.
//! `quinn-udp` sends one contiguous buffer and `rustix` has no
//! `UDP_SEGMENT` control message, so this is `sendmsg(2)` through `libc`.

#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;

/// Room for one `cmsghdr` carrying a `u16`, aligned for it.
#[repr(C, align(8))]
struct ControlBuf([u8; 32]);

/// Sends the concatenation of `iov` to `dst` from `sock` as one datagram,
/// or with `segment` as a UDP GSO train of datagrams of that size (the
/// last may be shorter). Returns the bytes sent (UDP sends are whole or
/// fail).
pub fn send(
    sock: &impl AsRawFd,
    dst: SocketAddrV4,
    iov: &[IoSlice<'_>],
    segment: Option<u16>,
) -> io::Result<usize> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut control = ControlBuf([0; 32]);
    // SAFETY: `msghdr` is plain data (integers and raw pointers, some
    // private padding on some libcs); all-zero is a valid value of it.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&addr as *const libc::sockaddr_in).cast_mut().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // `IoSlice` is ABI-compatible with `iovec` on Unix (documented by std).
    msg.msg_iov = iov.as_ptr().cast_mut().cast();
    msg.msg_iovlen = iov.len() as _;
    if let Some(size) = segment {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        if space > control.0.len() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg.msg_control` points at `space` writable bytes of
        // `control` (8-aligned, as `cmsghdr` needs), at least one
        // `cmsghdr` plus a u16, so CMSG_FIRSTHDR returns a pointer into it
        // (checked for null anyway); CMSG_DATA points inside the same
        // space, and the u16 is written unaligned.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            if c.is_null() {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
        }
    }
    // SAFETY: `msg` points at `addr`, `iov` and `control`, all alive for
    // the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
