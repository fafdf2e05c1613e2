//! Test fixture: for each fact, the predicate names what to reach for; the verdict is
//! `deny("<what>: <what it got>")`, so a test reads exactly what the sandbox gave.
//! `file` reads /etc/passwd, `dir` lists /, `env` reads HOME and counts the variables,
//! `args` counts the arguments, `tcp` connects to 127.0.0.1:22, `udp` binds a socket,
//! `dns` resolves localhost, `clock` reads the wall clock, `random` draws 8 bytes of
//! std's hash seed, `print` writes a line to stdout and one to stderr. Anything else
//! is allowed.
use std::hash::{BuildHasher, Hasher};

wit_bindgen::generate!({ path: "../../wit", world: "policy" });


fn probe(what: &str) -> Option<String> {
    Some(match what {
        "file" => match std::fs::read("/etc/passwd") {
            Ok(b) => format!("read {} bytes", b.len()),
            Err(e) => format!("error: {e}"),
        },
        "dir" => match std::fs::read_dir("/") {
            Ok(d) => format!("{} entries", d.count()),
            Err(e) => format!("error: {e}"),
        },
        "env" => format!(
            "HOME={:?}, {} variables",
            std::env::var("HOME").ok(),
            std::env::vars().count()
        ),
        "args" => format!("{} arguments", std::env::args().count()),
        "tcp" => match std::net::TcpStream::connect("127.0.0.1:22") {
            Ok(_) => "connected".to_owned(),
            Err(e) => format!("error: {e}"),
        },
        "udp" => match std::net::UdpSocket::bind("127.0.0.1:0") {
            Ok(_) => "bound".to_owned(),
            Err(e) => format!("error: {e}"),
        },
        "dns" => match std::net::ToSocketAddrs::to_socket_addrs("localhost:80") {
            Ok(a) => format!("{} addresses", a.count()),
            Err(e) => format!("error: {e}"),
        },
        "clock" => format!(
            "{:?}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
        ),
        "random" => {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u8(0);
            format!("{:016x}", h.finish())
        }
        "print" => {
            println!("probe says hello on stdout");
            eprintln!("probe says hello on stderr");
            "printed".to_owned()
        }
        _ => return None,
    })
}

struct Probe;

impl Guest for Probe {
    fn init(_settings: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn decide(_ctx: Context, facts: Vec<Fact>) -> Vec<Verdict> {
        facts
            .iter()
            .map(|f| match probe(&f.predicate) {
                Some(got) => Verdict::Deny(format!("{}: {got}", f.predicate)),
                None => Verdict::Allow,
            })
            .collect()
    }
}

export!(Probe);
