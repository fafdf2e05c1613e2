//! What the zone's idempotency index costs, so that capacity is visible before it
//! bites: how many message_ids the zone remembers, what the index holds on disk (the
//! index stream and this gateway's look-up file), how much memory the zone's
//! nats-server uses, and where the disk goes at the current rate.
//!
//! The bounded layout keeps the server's per-subject state fixed (4096 bucket
//! subjects, 256 fact subjects per class, kind and gateway), so server memory does not
//! grow with the ids remembered; disk does, per id, as long as the horizon
//! (`index_max_age`) is permanent (measured with `bsfg bench index`,
//! docs/benchmarks.md).

use std::time::Duration;

/// A snapshot of the index's size and the server's memory.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexUsage {
    /// message_ids the zone remembers (entries in this gateway's look-up).
    pub ids: u64,
    /// Bytes the index stream holds on disk.
    pub disk_bytes: u64,
    /// Bytes of this gateway's look-up file (0 when it is kept in memory).
    pub lookup_bytes: u64,
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
    /// 10 GiB of disk (index stream and look-up) within 30 days (worth a warning).
    pub fn projection(&self, now_unix_ms: i64) -> (String, bool) {
        const MIB: f64 = 1024.0 * 1024.0;
        let horizon = if self.horizon.is_zero() {
            "permanent (index_max_age = 0)".to_owned()
        } else {
            format!("{} days (index_max_age)", self.horizon.as_secs() / 86_400)
        };
        let mut line = format!(
            "idempotency index: {} ids remembered, {:.1} MiB in the index stream and {:.1} MiB in this gateway's look-up on disk, horizon {horizon}",
            self.ids,
            self.disk_bytes as f64 / MIB,
            self.lookup_bytes as f64 / MIB,
        );
        if let Some(m) = self.server_memory_bytes {
            line += &format!(
                "; nats-server memory {:.1} MiB (bounded: not per id)",
                m as f64 / MIB
            );
        }
        let mut warn = false;
        match self.ids_per_day(now_unix_ms) {
            Some(rate) => {
                let per_id = if self.ids == 0 {
                    0.0
                } else {
                    (self.disk_bytes + self.lookup_bytes) as f64 / self.ids as f64
                };
                let disk_per_day = rate * per_id;
                line += &format!(
                    "; at {rate:.0} ids/day it adds about {:.1} MiB of disk per day (~{per_id:.0} B per id)",
                    disk_per_day / MIB
                );
                if self.horizon.is_zero() {
                    line += &format!(
                        ", {:.2} GiB more in 30 days",
                        30.0 * disk_per_day / (1024.0 * MIB)
                    );
                    warn = 30.0 * disk_per_day > 10.0 * 1024.0 * MIB;
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
            lookup_bytes: ids * 150,
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
