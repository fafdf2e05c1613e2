//! What the zone's idempotency index costs, so that capacity is visible before it
//! bites: how many message_ids the zone remembers, what the index holds on disk, how
//! much memory the zone's nats-server uses, and where that goes at the current rate.
//!
//! Today's index keeps one subject per message_id (and each retained fact has its own
//! subject too), and nats-server keeps per-subject state in memory for every subject
//! of a stream: a "permanent" index grows the server's memory with every id ever
//! appended (measured with `bsfg bench index`, docs/benchmarks.md). `index_max_age`
//! bounds it, at the price of idempotency older than that horizon.

use std::time::Duration;

/// Server memory per remembered id with today's layout (one index subject per id),
/// from the measurement in `../shared/docs/jetstream-measurements.md` (about 370-420
/// bytes per subject) and `bsfg bench index`. Used only for projections.
pub const SERVER_BYTES_PER_ID: u64 = 400;

/// A snapshot of the index's size and the server's memory.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexUsage {
    /// message_ids the zone remembers (entries in the index stream).
    pub ids: u64,
    /// Bytes the index stream holds on disk.
    pub disk_bytes: u64,
    /// When the oldest remembered id was appended (Unix ms), if any.
    pub first_at_unix_ms: Option<i64>,
    /// The index's horizon (`index_max_age`); zero keeps ids forever.
    pub horizon: Duration,
    /// The zone's nats-server resident memory, when its monitoring endpoint answers.
    pub server_memory_bytes: Option<u64>,
}

impl IndexUsage {
    /// Average ids per day since the oldest remembered id (needs a day's history to
    /// say anything: younger zones have no rate yet).
    pub fn ids_per_day(&self, now_unix_ms: i64) -> Option<f64> {
        let first = self.first_at_unix_ms?;
        let days = (now_unix_ms - first) as f64 / 86_400_000.0;
        (days >= 1.0).then(|| self.ids as f64 / days)
    }

    /// The start-up line: what the index holds, what it costs, and where it goes.
    /// The second value is true when a permanent index is projected to add more than
    /// 1 GiB of server memory within 30 days (worth a warning).
    pub fn projection(&self, now_unix_ms: i64) -> (String, bool) {
        const MIB: f64 = 1024.0 * 1024.0;
        let horizon = if self.horizon.is_zero() {
            "permanent (index_max_age = 0)".to_owned()
        } else {
            format!("{} days (index_max_age)", self.horizon.as_secs() / 86_400)
        };
        let mut line = format!(
            "idempotency index: {} ids remembered, {:.1} MiB on disk, horizon {horizon}",
            self.ids,
            self.disk_bytes as f64 / MIB
        );
        if let Some(m) = self.server_memory_bytes {
            line += &format!("; nats-server memory {:.1} MiB", m as f64 / MIB);
        }
        let mut warn = false;
        match self.ids_per_day(now_unix_ms) {
            Some(rate) => {
                let mem_per_day = rate * SERVER_BYTES_PER_ID as f64;
                let disk_per_id = if self.ids == 0 {
                    0.0
                } else {
                    self.disk_bytes as f64 / self.ids as f64
                };
                line += &format!(
                    "; at {rate:.0} ids/day it adds about {:.1} MiB of server memory and {:.1} MiB of disk per day (~{SERVER_BYTES_PER_ID} B of memory per id)",
                    mem_per_day / MIB,
                    rate * disk_per_id / MIB
                );
                if self.horizon.is_zero() {
                    line += &format!(
                        ", {:.2} GiB more in 30 days",
                        30.0 * mem_per_day / (1024.0 * MIB)
                    );
                    warn = 30.0 * mem_per_day > 1024.0 * MIB;
                }
            }
            None => line += "; no rate yet (less than a day of history)",
        }
        (line, warn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn usage(ids: u64, days: i64, horizon: Duration) -> IndexUsage {
        IndexUsage {
            ids,
            disk_bytes: ids * 200,
            first_at_unix_ms: Some(-days * DAY),
            horizon,
            server_memory_bytes: Some(512 << 20),
        }
    }

    #[test]
    fn a_permanent_index_growing_fast_is_projected_and_warned_about() {
        // 1000 facts/s for ten days.
        let u = usage(864_000_000, 10, Duration::ZERO);
        let (line, warn) = u.projection(0);
        assert!(warn, "{line}");
        assert!(line.contains("86400000 ids/day"), "{line}");
        assert!(line.contains("permanent"), "{line}");
        assert!(line.contains("GiB more in 30 days"), "{line}");
    }

    #[test]
    fn a_slow_or_bounded_index_is_reported_without_a_warning() {
        let (line, warn) = usage(10_000, 10, Duration::ZERO).projection(0);
        assert!(!warn, "{line}");
        let (line, warn) = usage(864_000_000, 10, Duration::from_secs(30 * 86_400)).projection(0);
        assert!(!warn && line.contains("30 days (index_max_age)"), "{line}");
        let young = IndexUsage {
            first_at_unix_ms: Some(-DAY / 2),
            ..usage(5, 0, Duration::ZERO)
        };
        assert!(young.projection(0).0.contains("no rate yet"));
    }
}
