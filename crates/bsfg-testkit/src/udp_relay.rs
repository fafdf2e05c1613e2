//! A seeded UDP relay that emulates a bad link where no network namespaces can be
//! made: loss, delay, jitter, reordering, duplication and a bandwidth cap, set per
//! direction, plus a blackhole for a while (a partition). A client sends to
//! [`UdpRelay::addr`]; the relay forwards to the target and sends replies back to
//! wherever the client last sent from, so a client that changes its address (a new
//! socket, NAT rebinding) keeps talking. The same seed and the same packet order give
//! the same drops and delays.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;

/// How one direction of the link behaves.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Profile {
    /// Fraction of datagrams dropped (0.0 ..= 1.0).
    pub loss: f64,
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Uniform extra delay, 0 ..= jitter.
    pub jitter: Duration,
    /// Fraction of datagrams held back by an extra `delay`, so later ones overtake them.
    pub reorder: f64,
    /// Fraction of datagrams sent twice.
    pub duplicate: f64,
    /// Bandwidth cap in bits per second (`None`: unlimited).
    pub rate_bps: Option<u64>,
}

/// What the relay did so far, both directions together.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Datagrams sent on (duplicates included).
    pub forwarded: AtomicU64,
    /// Datagrams dropped by loss or a blackhole.
    pub dropped: AtomicU64,
    /// Bytes sent on.
    pub bytes: AtomicU64,
}

/// One direction of an emulated link: its profile and its own seeded randomness.
pub(crate) struct Direction {
    pub(crate) profile: Profile,
    rng: SmallRng,
    /// When the (rate-capped) link is free again.
    free_at: Instant,
}

impl Direction {
    /// A direction with `profile` whose drops and delays follow `seed`.
    pub(crate) fn new(profile: Profile, seed: u64) -> Direction {
        Direction {
            profile,
            rng: SmallRng::seed_from_u64(seed),
            free_at: Instant::now(),
        }
    }

    /// When to send a datagram of `len` bytes that arrived now, and how many copies
    /// (0: dropped).
    pub(crate) fn schedule(&mut self, len: usize, now: Instant) -> (Instant, usize) {
        let p = self.profile;
        if self.rng.gen_bool(p.loss.clamp(0.0, 1.0)) {
            return (now, 0);
        }
        let mut at = now + p.delay;
        if !p.jitter.is_zero() {
            at += p.jitter.mul_f64(self.rng.r#gen::<f64>());
        }
        if self.rng.gen_bool(p.reorder.clamp(0.0, 1.0)) {
            at += p.delay.max(Duration::from_millis(5));
        }
        if let Some(rate) = p.rate_bps.filter(|r| *r > 0) {
            let start = self.free_at.max(now);
            self.free_at = start + Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
            at = at.max(self.free_at);
        }
        let copies = if self.rng.gen_bool(p.duplicate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        (at, copies)
    }
}

/// A packet waiting in a [`delay_line`] until its time.
struct Due<T> {
    at: Instant,
    seq: u64,
    item: T,
    copies: usize,
}

impl<T> PartialEq for Due<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<T> Eq for Due<T> {}
impl<T> PartialOrd for Due<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Due<T> {
    // Earliest first (BinaryHeap is a max-heap); ties keep arrival order.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Where one direction's packets wait for their send time.
pub(crate) type Line<T> = tokio::sync::mpsc::UnboundedSender<(Instant, usize, T)>;

/// One direction's delay line: packets leave at their scheduled time, and packets
/// scheduled for the same time (or in increasing times, as with a constant delay)
/// leave in the order they came. Only jitter and the `reorder` knob reorder; a task
/// per packet would reorder on its own (timers firing together wake in any order),
/// which QUIC and TCP take for loss.
pub(crate) fn delay_line<T, F, Fut>(mut send: F) -> (Line<T>, tokio::task::JoinHandle<()>)
where
    T: Send + 'static,
    F: FnMut(T, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, usize, T)>();
    let task = tokio::spawn(async move {
        let mut heap = std::collections::BinaryHeap::new();
        let mut seq = 0u64;
        loop {
            let next = heap.peek().map(|d: &Due<T>| d.at);
            tokio::select! {
                got = rx.recv() => match got {
                    Some((at, copies, item)) => {
                        seq += 1;
                        heap.push(Due { at, seq, item, copies });
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now).into()), if next.is_some() => {
                    let now = Instant::now();
                    while heap.peek().is_some_and(|d| d.at <= now) {
                        if let Some(d) = heap.pop() {
                            send(d.item, d.copies).await;
                        }
                    }
                }
            }
        }
    });
    (tx, task)
}

/// A running relay; it stops when dropped.
pub struct UdpRelay {
    addr: SocketAddr,
    stats: Arc<RelayStats>,
    blackhole_until: Arc<Mutex<Option<Instant>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl UdpRelay {
    /// Relays to `target`: `up` applies to client -> target, `down` to the replies.
    pub async fn start(
        target: SocketAddr,
        up: Profile,
        down: Profile,
        seed: u64,
    ) -> std::io::Result<UdpRelay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(target).await?;
        let addr = front.local_addr()?;
        let stats = Arc::new(RelayStats::default());
        let blackhole_until = Arc::new(Mutex::new(None::<Instant>));
        let mut dirs = [
            Direction::new(up, seed),
            Direction::new(down, seed ^ 0x9e37_79b9_7f4a_7c15),
        ];
        let (st, bh) = (stats.clone(), blackhole_until.clone());
        // Each direction's delay line sends a datagram `copies` times; replies go to
        // wherever the client last spoke from.
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        let (up_line, up_task) = {
            let (back, st) = (back.clone(), stats.clone());
            delay_line(move |data: Vec<u8>, copies| {
                let (back, st) = (back.clone(), st.clone());
                async move {
                    for _ in 0..copies {
                        if back.send(&data).await.is_ok() {
                            st.forwarded.fetch_add(1, Ordering::Relaxed);
                            st.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let (down_line, down_task) = {
            let (front, st, client) = (front.clone(), stats.clone(), client.clone());
            delay_line(move |data: Vec<u8>, copies| {
                let (front, st) = (front.clone(), st.clone());
                let to = client.lock().ok().and_then(|c| *c);
                async move {
                    for _ in 0..copies {
                        if let Some(c) = to
                            && front.send_to(&data, c).await.is_ok()
                        {
                            st.forwarded.fetch_add(1, Ordering::Relaxed);
                            st.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let task = tokio::spawn(async move {
            let (mut a, mut b) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            loop {
                // Which side spoke, what it said, and where it goes.
                let (dir, data) = tokio::select! {
                    r = front.recv_from(&mut a) => match r {
                        Ok((n, from)) => {
                            if let Ok(mut c) = client.lock() {
                                *c = Some(from);
                            }
                            (0, a[..n].to_vec())
                        }
                        Err(_) => continue,
                    },
                    r = back.recv(&mut b) => match r {
                        Ok(n) => (1, b[..n].to_vec()),
                        _ => continue,
                    },
                };
                let now = Instant::now();
                let holed = bh
                    .lock()
                    .ok()
                    .and_then(|g| *g)
                    .is_some_and(|until| now < until);
                let (at, copies) = if holed {
                    (now, 0)
                } else {
                    dirs[dir].schedule(data.len(), now)
                };
                if copies == 0 {
                    st.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let line = if dir == 0 { &up_line } else { &down_line };
                let _ = line.send((at, copies, data));
            }
        });
        Ok(UdpRelay {
            addr,
            stats,
            blackhole_until,
            tasks: vec![task, up_task, down_task],
        })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters so far.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Drops everything, both ways, for `d` from now (a partition).
    pub fn blackhole(&self, d: Duration) {
        if let Ok(mut g) = self.blackhole_until.lock() {
            *g = Some(Instant::now() + d);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A UDP echo server.
    async fn echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    /// Sends `n` numbered datagrams, paced, while reading the echoes; returns the
    /// numbers echoed back, stopping after `wait` without one. (Reading while sending
    /// keeps the client's socket buffer from overflowing: loss the relay did not
    /// decide.)
    async fn round_trips(relay: SocketAddr, n: u32, wait: Duration) -> Vec<u32> {
        let c = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let reader = {
            let c = c.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 16];
                let mut idle = wait.max(Duration::from_millis(100));
                while let Ok(Ok((len, _))) = tokio::time::timeout(idle, c.recv_from(&mut buf)).await
                {
                    if len == 4 {
                        got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    }
                    idle = wait;
                }
                got
            })
        };
        for i in 0..n {
            c.send_to(&i.to_be_bytes(), relay).await.unwrap();
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        reader.await.unwrap()
    }

    #[tokio::test]
    async fn a_clean_link_delivers_everything_after_the_delay_both_ways() {
        let p = Profile {
            delay: Duration::from_millis(20),
            ..Profile::default()
        };
        let relay = UdpRelay::start(echo().await, p, p, 1).await.unwrap();
        let t = Instant::now();
        let got = round_trips(relay.addr(), 50, Duration::from_millis(300)).await;
        assert_eq!(got.len(), 50);
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "two one-way delays"
        );
    }

    #[tokio::test]
    async fn loss_is_seeded_and_near_the_configured_rate() {
        let lossy = Profile {
            loss: 0.3,
            ..Profile::default()
        };
        let run = |seed| async move {
            let relay = UdpRelay::start(echo().await, lossy, Profile::default(), seed)
                .await
                .unwrap();
            round_trips(relay.addr(), 1000, Duration::from_millis(200)).await
        };
        let a = run(7).await;
        let b = run(7).await;
        assert_eq!(a, b, "same seed, same packets lost");
        assert!(
            (600..=800).contains(&a.len()),
            "{} of 1000 got through",
            a.len()
        );
    }

    #[tokio::test]
    async fn a_blackhole_drops_everything_then_the_link_comes_back() {
        let relay = UdpRelay::start(echo().await, Profile::default(), Profile::default(), 3)
            .await
            .unwrap();
        relay.blackhole(Duration::from_millis(300));
        assert!(
            round_trips(relay.addr(), 20, Duration::from_millis(100))
                .await
                .is_empty()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            round_trips(relay.addr(), 20, Duration::from_millis(200))
                .await
                .len(),
            20
        );
        assert!(relay.stats().dropped.load(Ordering::Relaxed) >= 20);
    }

    #[tokio::test]
    async fn duplication_and_reordering_happen_and_a_new_client_address_is_followed() {
        let p = Profile {
            duplicate: 0.5,
            reorder: 0.3,
            delay: Duration::from_millis(5),
            ..Profile::default()
        };
        let relay = UdpRelay::start(echo().await, p, Profile::default(), 11)
            .await
            .unwrap();
        let got = round_trips(relay.addr(), 200, Duration::from_millis(200)).await;
        assert!(
            got.len() > 200,
            "some datagrams arrive twice: {}",
            got.len()
        );
        assert!(
            got.windows(2).any(|w| w[1] < w[0]),
            "some arrive out of order"
        );
        // Another socket (a changed source address) is answered too.
        let again = round_trips(relay.addr(), 10, Duration::from_millis(200)).await;
        assert!(again.len() >= 10);
    }

    #[tokio::test]
    async fn a_constant_delay_keeps_datagrams_in_order() {
        let p = Profile {
            delay: Duration::from_millis(20),
            ..Profile::default()
        };
        let relay = UdpRelay::start(echo().await, p, p, 2).await.unwrap();
        let got = round_trips(relay.addr(), 500, Duration::from_millis(300)).await;
        assert_eq!(got.len(), 500);
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "delay alone must not reorder (transports take reordering for loss)"
        );
    }

    #[tokio::test]
    async fn a_rate_cap_spaces_datagrams_out() {
        let p = Profile {
            rate_bps: Some(80_000), // 10 kB/s
            ..Profile::default()
        };
        let relay = UdpRelay::start(echo().await, p, Profile::default(), 5)
            .await
            .unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t = Instant::now();
        for _ in 0..20 {
            c.send_to(&[0u8; 1000], relay.addr()).await.unwrap();
        }
        let mut buf = [0u8; 2000];
        for _ in 0..20 {
            tokio::time::timeout(Duration::from_secs(5), c.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
        }
        // 20 kB at 10 kB/s: about two seconds, not instantly.
        assert!(
            t.elapsed() >= Duration::from_millis(1800),
            "{:?}",
            t.elapsed()
        );
    }
}
