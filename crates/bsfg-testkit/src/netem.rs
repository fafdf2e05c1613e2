//! A link emulator for TCP and UDP alike: a network namespace (the far site) joined to
//! the test's own namespace (the near site) by two TUN devices and a userspace relay
//! that applies seeded loss, delay, jitter, reordering, duplication, a bandwidth cap
//! and blackholes to every IP packet, per direction. gRPC over TCP and QUIC over UDP
//! cross exactly the same emulated path, so comparisons between them are fair.
//!
//! ```text
//!  near (test's namespace)                      far (namespace `bsfgN`)
//!  tun  10.X.Y.1  <--- relay (this process) --->  tun  10.X.Y.2      impaired path
//!  veth 10.X.Z.1  <----------------------------->  veth 10.X.Z.2     clean side channel
//! ```
//!
//! Processes of the far site run in the namespace ([`EmulatedLink::command`]); the
//! clean side channel lets them reach services of the near site (its nats-server) and
//! lets the test reach theirs without crossing the impaired path.
//!
//! Needs root (CAP_NET_ADMIN) and `ip` (iproute2). [`EmulatedLink::create`] fails with
//! a clear error otherwise; tests that need it fail, they never skip.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::udp_relay::{Direction, Profile, RelayStats, delay_line};

/// Why the emulated link could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetemError {
    /// A setup command failed (not root, no iproute2, no /dev/net/tun, ...).
    #[error(
        "link emulator: `{command}` failed: {output} (the emulator needs root with CAP_NET_ADMIN, iproute2 and /dev/net/tun)"
    )]
    Setup {
        /// The command.
        command: String,
        /// What it printed.
        output: String,
    },
    /// The TUN device could not be opened.
    #[error("link emulator: TUN device {name}: {source}")]
    Tun {
        /// Device name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn ip(args: &[&str]) -> Result<(), NetemError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetemError::Setup {
            command: format!("ip {}", args.join(" ")),
            output: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetemError::Setup {
            command: format!("ip {}", args.join(" ")),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

struct Control {
    dirs: [Mutex<Direction>; 2],
    blackhole_until: Mutex<Option<Instant>>,
    stats: [RelayStats; 2],
}

/// A far site behind an emulated link. Dropping it removes the namespace and the
/// devices.
pub struct EmulatedLink {
    ns: String,
    near: Ipv4Addr,
    far: Ipv4Addr,
    side_near: Ipv4Addr,
    side_far: Ipv4Addr,
    veth_near: String,
    tun_near: String,
    control: Arc<Control>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl EmulatedLink {
    /// Builds the namespace, the path and the relay. `to_far` applies to packets from
    /// the near site to the far one, `to_near` to the way back; `seed` fixes every
    /// drop and delay for the same packet sequence. Must run inside a tokio runtime.
    pub fn create(
        to_far: Profile,
        to_near: Profile,
        seed: u64,
    ) -> Result<EmulatedLink, NetemError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Unique per process and link; addresses from 10.200.0.0/13, one /30 pair each.
        let tag = (pid % 4096) * 64 + (n % 64);
        let ns = format!("bsfg{tag}");
        let (hi, lo) = (200 + (tag >> 14) as u8 % 8, (tag >> 6) as u8);
        let block = ((tag % 64) * 4) as u8;
        let near = Ipv4Addr::new(10, hi, lo, block + 1);
        let far = Ipv4Addr::new(10, hi, lo, block + 2);
        let side_near = Ipv4Addr::new(10, hi + 8, lo, block + 1);
        let side_far = Ipv4Addr::new(10, hi + 8, lo, block + 2);
        let (tun_near, tun_far) = (format!("bt{tag}n"), format!("bt{tag}f"));
        let (veth_near, veth_far) = (format!("bv{tag}n"), format!("bv{tag}f"));
        // A namespace left over by a crashed run of a process with the same pid.
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        let link = EmulatedLink {
            ns: ns.clone(),
            near,
            far,
            side_near,
            side_far,
            veth_near: veth_near.clone(),
            tun_near: tun_near.clone(),
            control: Arc::new(Control {
                dirs: [
                    Mutex::new(Direction::new(to_far, seed)),
                    Mutex::new(Direction::new(to_near, seed ^ 0x9e37_79b9_7f4a_7c15)),
                ],
                blackhole_until: Mutex::new(None),
                stats: [RelayStats::default(), RelayStats::default()],
            }),
            tasks: Vec::new(),
        };
        let open = |name: &str| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .mtu(1500)
                .build_async()
                .map_err(|source| NetemError::Tun {
                    name: name.to_owned(),
                    source,
                })
        };
        let dev_near = Arc::new(open(&tun_near)?);
        let dev_far = Arc::new(open(&tun_far)?);
        let (near_s, far_s) = (format!("{near}"), format!("{far}"));
        ip(&["link", "set", &tun_far, "netns", &ns])?;
        ip(&["addr", "add", &near_s, "peer", &far_s, "dev", &tun_near])?;
        ip(&["link", "set", &tun_near, "up"])?;
        ip(&[
            "-n", &ns, "addr", "add", &far_s, "peer", &near_s, "dev", &tun_far,
        ])?;
        ip(&["-n", &ns, "link", "set", &tun_far, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // The far site can answer the near site's second address too (see
        // `change_near_address`).
        let moved = Ipv4Addr::new(10, hi, lo, block + 3).to_string();
        ip(&["-n", &ns, "route", "add", &moved, "dev", &tun_far])?;
        ip(&[
            "link", "add", &veth_near, "type", "veth", "peer", "name", &veth_far, "netns", &ns,
        ])?;
        ip(&["addr", "add", &format!("{side_near}/30"), "dev", &veth_near])?;
        ip(&["link", "set", &veth_near, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{side_far}/30"),
            "dev",
            &veth_far,
        ])?;
        ip(&["-n", &ns, "link", "set", &veth_far, "up"])?;
        let mut link = link;
        let c = link.control.clone();
        link.tasks
            .extend(pump(dev_near.clone(), dev_far.clone(), 0, c.clone()));
        link.tasks.extend(pump(dev_far, dev_near, 1, c));
        Ok(link)
    }

    /// The namespace of the far site.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The far site's address over the impaired path (where its listeners are dialed).
    pub fn far_addr(&self) -> Ipv4Addr {
        self.far
    }

    /// The near site's address over the impaired path, as the far site sees it.
    pub fn near_addr(&self) -> Ipv4Addr {
        self.near
    }

    /// The near site's address on the clean side channel (for the far site's
    /// processes to reach, e.g., a nats-server of the test).
    pub fn side_near_addr(&self) -> Ipv4Addr {
        self.side_near
    }

    /// The far site's address on the clean side channel.
    pub fn side_far_addr(&self) -> Ipv4Addr {
        self.side_far
    }

    /// Gives the near site a new address on the impaired path and makes it the source
    /// of everything it sends to the far site from now on, as when a NAT rebinds or a
    /// site changes uplinks: UDP flows change their source address mid-connection.
    /// Returns the new address.
    pub fn change_near_address(&self) -> Result<Ipv4Addr, NetemError> {
        let o = self.near.octets();
        let moved = Ipv4Addr::new(o[0], o[1], o[2], o[3] + 2);
        let (m, f) = (moved.to_string(), self.far.to_string());
        ip(&["addr", "add", &format!("{m}/32"), "dev", &self.tun_near])?;
        ip(&["route", "replace", &f, "dev", &self.tun_near, "src", &m])?;
        Ok(moved)
    }

    /// A command that runs `program` inside the far site's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Changes both directions' behaviour from now on (seeded randomness continues).
    pub fn set_profiles(&self, to_far: Profile, to_near: Profile) {
        for (d, p) in self.control.dirs.iter().zip([to_far, to_near]) {
            if let Ok(mut d) = d.lock() {
                d.profile = p;
            }
        }
    }

    /// Drops every packet both ways for `d` from now (a partition).
    pub fn blackhole(&self, d: Duration) {
        if let Ok(mut g) = self.control.blackhole_until.lock() {
            *g = Some(Instant::now() + d);
        }
    }

    /// Counters of the near -> far direction.
    pub fn to_far_stats(&self) -> &RelayStats {
        &self.control.stats[0]
    }

    /// Counters of the far -> near direction.
    pub fn to_near_stats(&self) -> &RelayStats {
        &self.control.stats[1]
    }

    /// IP bytes carried both ways so far (duplicates included, drops not).
    pub fn bytes_on_wire(&self) -> u64 {
        self.control
            .stats
            .iter()
            .map(|s| s.bytes.load(Ordering::Relaxed))
            .sum()
    }
}

impl Drop for EmulatedLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // The TUN devices vanish when the relay's descriptors close; the veth pair
        // goes with either end (also when a process still holds the namespace).
        let _ = ip(&["link", "del", &self.veth_near]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Moves packets from `from` to `to`, impaired by direction `dir` (a reader task and
/// the direction's delay line).
fn pump(
    from: Arc<tun_rs::AsyncDevice>,
    to: Arc<tun_rs::AsyncDevice>,
    dir: usize,
    control: Arc<Control>,
) -> [tokio::task::JoinHandle<()>; 2] {
    let (line, sender) = {
        let control = control.clone();
        delay_line(move |packet: Vec<u8>, copies| {
            let (to, control) = (to.clone(), control.clone());
            async move {
                for _ in 0..copies {
                    if to.send(&packet).await.is_ok() {
                        let s = &control.stats[dir];
                        s.forwarded.fetch_add(1, Ordering::Relaxed);
                        s.bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = match from.recv(&mut buf).await {
                Ok(n) => n,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let now = Instant::now();
            let holed = control
                .blackhole_until
                .lock()
                .ok()
                .and_then(|g| *g)
                .is_some_and(|until| now < until);
            let (at, copies) = if holed {
                (now, 0)
            } else {
                match control.dirs[dir].lock() {
                    Ok(mut d) => d.schedule(n, now),
                    Err(_) => (now, 1),
                }
            };
            if copies == 0 {
                control.stats[dir].dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let _ = line.send((at, copies, buf[..n].to_vec()));
        }
    });
    [reader, sender]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Kills its process when dropped, even when the test panics.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A TCP and UDP echo server on `port` inside the namespace (python3).
    fn echo_in(link: &EmulatedLink, port: u16) -> Killed {
        let script = format!(
            "import socket,threading\n\
             t=socket.socket();t.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);t.bind(('0.0.0.0',{port}));t.listen()\n\
             u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.bind(('0.0.0.0',{port}))\n\
             def udp():\n  while True:\n    d,a=u.recvfrom(65536);u.sendto(d,a)\n\
             threading.Thread(target=udp,daemon=True).start()\n\
             while True:\n  c,_=t.accept()\n  def h(c):\n    while True:\n      d=c.recv(65536)\n      if not d: break\n      c.sendall(d)\n  threading.Thread(target=h,args=(c,),daemon=True).start()\n"
        );
        Killed(
            link.command("python3")
                .args(["-c", &script])
                .spawn()
                .expect("python3 in the namespace"),
        )
    }

    async fn tcp_round_trip(addr: (Ipv4Addr, u16), bytes: usize) -> std::io::Result<Duration> {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let data = vec![7u8; bytes];
        let (mut r, mut w) = s.split();
        let writer = async { w.write_all(&data).await };
        let mut back = vec![0u8; bytes];
        let reader = r.read_exact(&mut back);
        let (a, b) = tokio::join!(writer, reader);
        a?;
        b?;
        assert_eq!(back, data);
        Ok(t.elapsed())
    }

    async fn connect_when_up(addr: (Ipv4Addr, u16)) {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("echo server in the namespace did not come up");
    }

    #[tokio::test]
    async fn tcp_crosses_the_delayed_lossy_path_intact_and_a_blackhole_stops_it() {
        let delayed = Profile {
            delay: Duration::from_millis(25),
            loss: 0.02,
            ..Profile::default()
        };
        let link = EmulatedLink::create(delayed, delayed, 9).unwrap();
        let _echo = echo_in(&link, 7000);
        let addr = (link.far_addr(), 7000);
        connect_when_up(addr).await;
        let rtt = tcp_round_trip(addr, 16).await.unwrap();
        assert!(
            rtt >= Duration::from_millis(100),
            "handshake + echo = 2 RTT of 50 ms: {rtt:?}"
        );
        // 1 MB survives 2 % loss through TCP's retransmissions.
        tcp_round_trip(addr, 1 << 20).await.unwrap();
        assert!(link.to_far_stats().dropped.load(Ordering::Relaxed) > 0);
        assert!(link.bytes_on_wire() > 2 << 20);
        link.blackhole(Duration::from_secs(2));
        let r = tokio::time::timeout(Duration::from_secs(1), tcp_round_trip(addr, 16)).await;
        assert!(r.is_err(), "nothing crosses a blackhole");
        tokio::time::sleep(Duration::from_secs(1)).await;
        tcp_round_trip(addr, 16).await.unwrap();
    }

    #[tokio::test]
    async fn udp_crosses_with_asymmetric_loss_and_the_side_channel_is_clean() {
        let link = EmulatedLink::create(
            Profile::default(),
            Profile {
                loss: 0.5,
                ..Profile::default()
            },
            4,
        )
        .unwrap();
        let _echo = echo_in(&link, 7001);
        connect_when_up((link.side_far_addr(), 7001)).await;
        let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
        let mut buf = [0u8; 16];
        let mut through = 0;
        for i in 0..200u32 {
            sock.send_to(&i.to_be_bytes(), (link.far_addr(), 7001))
                .await
                .unwrap();
            if tokio::time::timeout(Duration::from_millis(50), sock.recv_from(&mut buf))
                .await
                .is_ok()
            {
                through += 1;
            }
        }
        assert!(
            (60..=140).contains(&through),
            "half the echoes are lost: {through}"
        );
        assert_eq!(
            link.to_far_stats().dropped.load(Ordering::Relaxed),
            0,
            "only one way is lossy"
        );
        // The side channel bypasses the relay.
        let before = link.bytes_on_wire();
        tcp_round_trip((link.side_far_addr(), 7001), 4096)
            .await
            .unwrap();
        assert_eq!(link.bytes_on_wire(), before);
    }
}
