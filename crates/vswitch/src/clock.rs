//! Time as the data path sees it: a monotonic nanosecond count passed into
//! every piece of logic as `now`, so tests drive timeouts with a clock they
//! own instead of sleeping.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Nanoseconds on a monotonic clock with an arbitrary origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The origin; tests start their clocks here.
    pub const ZERO: Timestamp = Timestamp(0);

    /// The real monotonic clock (only the I/O loops and the control plane
    /// call this; logic takes `now` as an argument).
    pub fn now() -> Timestamp {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(Instant::now);
        // Saturate: u64 nanoseconds last 584 years.
        Timestamp(u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    /// Time since `earlier` (zero if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}
