//! A packet buffer with headroom for encapsulation and the packet's offload
//! metadata.

use crate::offload::Offload;

/// Bytes kept free in front of the frame so outer headers (VXLAN: 14 + 20 +
/// 8 + 8, IPv6 underlay: 70) can be prepended without moving the frame.
pub const HEADROOM: usize = 128;

/// Largest frame a buffer holds: a 64 KB IP super-frame plus Ethernet and two
/// VLAN tags, rounded up.
pub const MAX_FRAME: usize = 65_536 + 64;

/// One Ethernet frame with headroom and its offload state.
///
/// The frame lives at `data[start..end]`; `start` never goes below 0 and
/// `end` never past the capacity, so every view of it is in bounds.
pub struct PacketBuf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
    /// Segmentation and checksum work still owed for this frame.
    pub offload: Offload,
}

impl std::fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketBuf")
            .field("len", &self.len())
            .field("headroom", &self.start)
            .field("offload", &self.offload)
            .finish()
    }
}

impl Default for PacketBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketBuf {
    /// An empty buffer able to hold [`MAX_FRAME`] bytes after [`HEADROOM`].
    pub fn new() -> PacketBuf {
        Self::with_capacity(MAX_FRAME)
    }

    /// An empty buffer for frames of at most `cap` bytes.
    pub fn with_capacity(cap: usize) -> PacketBuf {
        PacketBuf {
            data: vec![0u8; HEADROOM + cap].into_boxed_slice(),
            start: HEADROOM,
            end: HEADROOM,
            offload: Offload::NONE,
        }
    }

    /// A buffer holding a copy of `frame` (tests, control-plane injection).
    /// Frames longer than [`MAX_FRAME`] are truncated.
    pub fn from_frame(frame: &[u8]) -> PacketBuf {
        let mut b = Self::with_capacity(frame.len().clamp(64, MAX_FRAME));
        let n = frame.len().min(b.capacity());
        b.data[HEADROOM..HEADROOM + n].copy_from_slice(&frame[..n]);
        b.end = HEADROOM + n;
        b
    }

    /// The frame bytes.
    pub fn frame(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// The frame bytes, writable (header rewrites).
    pub fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.end]
    }

    /// Frame length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when no frame is held.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Largest frame this buffer can receive.
    pub fn capacity(&self) -> usize {
        self.data.len() - HEADROOM
    }

    /// Free bytes in front of the frame.
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Resets to an empty frame at the default headroom and returns the whole
    /// receive area, for a `read`/`readv` to fill. Call
    /// [`PacketBuf::set_received`] with the byte count afterwards.
    pub fn rx_area(&mut self) -> &mut [u8] {
        self.start = HEADROOM;
        self.end = HEADROOM;
        self.offload = Offload::NONE;
        &mut self.data[HEADROOM..]
    }

    /// Marks the first `n` bytes of the receive area as the frame
    /// (clamped to the capacity).
    pub fn set_received(&mut self, n: usize) {
        self.start = HEADROOM;
        self.end = HEADROOM + n.min(self.capacity());
    }

    /// Grows the frame by `n` bytes at the front (encapsulation) and returns
    /// the new front bytes to fill; `None` if the headroom is too small.
    pub fn push_front(&mut self, n: usize) -> Option<&mut [u8]> {
        let new_start = self.start.checked_sub(n)?;
        self.start = new_start;
        Some(&mut self.data[new_start..new_start + n])
    }

    /// Removes `n` bytes from the front (decapsulation); `false` and no
    /// change if the frame is shorter.
    pub fn pull_front(&mut self, n: usize) -> bool {
        if n > self.len() {
            return false;
        }
        self.start += n;
        true
    }

    /// Replaces the frame with a copy of `frame` at the default headroom,
    /// keeping this buffer's storage (a worker's receive buffer stays
    /// full-size); `false` and no change if it does not fit.
    pub fn replace_frame(&mut self, frame: &[u8]) -> bool {
        if frame.len() > self.capacity() {
            return false;
        }
        self.data[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
        self.start = HEADROOM;
        self.end = HEADROOM + frame.len();
        true
    }

    /// Appends `bytes` at the end of the frame (GRO coalescing); `false` and
    /// no change if they do not fit in the capacity.
    pub fn append(&mut self, bytes: &[u8]) -> bool {
        let Some(dst) = self.data.get_mut(self.end..self.end + bytes.len()) else {
            return false;
        };
        dst.copy_from_slice(bytes);
        self.end += bytes.len();
        true
    }

    /// [`PacketBuf::append`] that also returns the [`crate::checksum::sum`]
    /// of `bytes`, computed while copying them (GRO verifies each merged
    /// payload); `None` and no change if they do not fit.
    pub fn append_summed(&mut self, bytes: &[u8]) -> Option<u64> {
        let dst = self.data.get_mut(self.end..self.end + bytes.len())?;
        let s = crate::checksum::copy_and_sum(dst, bytes);
        self.end += bytes.len();
        Some(s)
    }

    /// Cuts the frame to `len` bytes (no-op if already shorter).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.start + len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_push_pull() {
        let mut b = PacketBuf::new();
        let area = b.rx_area();
        area[..4].copy_from_slice(&[1, 2, 3, 4]);
        b.set_received(4);
        assert_eq!(b.frame(), &[1, 2, 3, 4]);
        b.push_front(2).unwrap().copy_from_slice(&[9, 9]);
        assert_eq!(b.frame(), &[9, 9, 1, 2, 3, 4]);
        assert!(b.pull_front(2));
        assert_eq!(b.frame(), &[1, 2, 3, 4]);
        assert!(!b.pull_front(5));
        assert!(b.push_front(HEADROOM + 1).is_none());
        b.truncate(1);
        assert_eq!(b.frame(), &[1]);
    }

    #[test]
    fn replace_frame_keeps_capacity() {
        let mut b = PacketBuf::with_capacity(100);
        assert!(b.replace_frame(&[7; 60]));
        assert_eq!(b.frame(), &[7; 60][..]);
        assert_eq!(b.capacity(), 100);
        assert!(!b.replace_frame(&[0; 101]));
        assert_eq!(b.len(), 60);
    }

    #[test]
    fn append_bounded_by_capacity() {
        let mut b = PacketBuf::with_capacity(100);
        assert!(b.replace_frame(&[1; 60]));
        assert!(b.append(&[2; 40]));
        assert_eq!(b.len(), 100);
        assert_eq!(&b.frame()[58..62], &[1, 1, 2, 2]);
        assert!(!b.append(&[3]));
        assert_eq!(b.len(), 100);
        assert!(b.append(&[]));
    }

    #[test]
    fn append_summed_copies_and_sums() {
        let mut b = PacketBuf::with_capacity(100);
        assert!(b.replace_frame(&[1; 60]));
        let tail: Vec<u8> = (0..39).collect();
        assert_eq!(b.append_summed(&tail), Some(crate::checksum::sum(&tail)));
        assert_eq!(&b.frame()[60..], &tail[..]);
        assert_eq!(b.append_summed(&[3, 4]), None);
        assert_eq!(b.len(), 99);
        assert_eq!(b.append_summed(&[]), Some(0));
    }

    #[test]
    fn set_received_clamps() {
        let mut b = PacketBuf::with_capacity(100);
        b.rx_area();
        b.set_received(1000);
        assert_eq!(b.len(), 100);
    }
}
