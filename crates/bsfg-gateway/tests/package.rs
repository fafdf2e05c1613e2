//! The Debian package, built by `scripts/package.sh` (the README's package command)
//! around the binary this test run built: its contents (`dpkg-deb -c`), its control
//! data, the hardened unit (`systemd-analyze verify` where systemd is installed), and
//! the example zone file it ships passing `bsfg validate` as the service would run it;
//! and the zone's nats-server package beside it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BSFG, text};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn has_tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The unit's settings that are not comments.
fn directives(unit: &str) -> Vec<&str> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn the_package_holds_the_binary_the_hardened_unit_the_example_zone_and_the_sysctl_drop_in() {
    let dir = tempfile::tempdir().unwrap();
    let deb = run(Command::new(repo().join("scripts/package.sh"))
        .args(["--binary", BSFG, "--compress", "none", "--out"])
        .arg(dir.path()));
    let debs: Vec<PathBuf> = deb.lines().map(PathBuf::from).collect();
    assert_eq!(debs.len(), 2, "{deb}");
    let deb = debs[0].clone();
    assert!(deb.is_file(), "{}", deb.display());
    nats_package(&debs[1], dir.path());
    assert!(
        deb.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("bsfg_0.")
    );

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for (path, mode) in [
        ("./usr/bin/bsfg", "-rwxr-xr-x root/root"),
        (
            "./usr/lib/systemd/system/bsfg.service",
            "-rw-r--r-- root/root",
        ),
        ("./etc/bsfg/zone.toml", "-rw-r--r-- root/root"),
        ("./etc/default/bsfg", "-rw-r--r-- root/root"),
        (
            "./usr/lib/sysctl.d/60-bsfg-quic.conf",
            "-rw-r--r-- root/root",
        ),
        ("./usr/share/doc/bsfg/operations.md", "-rw-r--r-- root/root"),
        (
            "./usr/share/bsfg/grafana/bsfg-zones.json",
            "-rw-r--r-- root/root",
        ),
        (
            "./usr/share/bsfg/prometheus/bsfg-rules.yml",
            "-rw-r--r-- root/root",
        ),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(&format!(" {path}"))),
            "{path} ({mode}) not in:\n{listing}"
        );
    }
    let control = run(Command::new("dpkg-deb").args(["-f"]).arg(&deb));
    assert!(control.contains("Package: bsfg\n"), "{control}");
    assert!(control.contains("Depends: libc6 (>= 2."), "{control}");
    let conffiles = run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles, "/etc/bsfg/zone.toml\n/etc/default/bsfg\n");
    let postinst = run(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("postinst"));
    assert!(
        postinst.contains("useradd --system"),
        "the bsfg system user"
    );
    assert!(
        postinst.contains("certs admin-token"),
        "an admin token at install"
    );

    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    // Stripped: no symbol table left.
    let syms = Command::new("objdump")
        .arg("-t")
        .arg(root.join("usr/bin/bsfg"))
        .output()
        .unwrap();
    assert!(
        text(&syms.stdout).contains("no symbols"),
        "the binary is not stripped"
    );
    let version = run(Command::new(root.join("usr/bin/bsfg")).arg("--version"));
    assert!(version.starts_with("bsfg 0."), "{version}");

    // The unit: Type=notify with the watchdog, hardened, and without the settings
    // that would break policies (W^X pages, address-space reservations).
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/bsfg.service")).unwrap();
    let set = directives(&unit);
    for want in [
        "Type=notify",
        "WatchdogSec=30s",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "StateDirectory=bsfg",
        "ReadOnlyPaths=/etc/bsfg",
        "User=bsfg",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/bin/bsfg run --config /etc/bsfg/zone.toml",
    ] {
        assert!(set.contains(&want), "{want} not set in the unit");
    }
    for never in ["MemoryDenyWriteExecute", "LimitAS"] {
        assert!(
            !set.iter().any(|l| l.starts_with(never)),
            "{never} must not be set"
        );
        assert!(unit.contains(&format!("# - {never}")), "why not {never}");
    }
    let sysctl = std::fs::read_to_string(root.join("usr/lib/sysctl.d/60-bsfg-quic.conf")).unwrap();
    assert!(sysctl.contains("net.core.rmem_max = 8388608"), "{sysctl}");
    if has_tool("systemd-analyze") {
        // verify checks that ExecStart's program exists on this host: point it at the
        // unpacked binary, nothing else changed. Any warning (an unknown or invalid
        // setting) fails the test, not only errors.
        verify_unit(
            &unit,
            "/usr/bin/bsfg",
            &root.join("usr/bin/bsfg"),
            dir.path(),
        );
    } else {
        eprintln!("systemd-analyze not installed: the unit was checked by content only");
    }

    // The shipped zone file is valid as the service runs it (its folder, a token
    // made at install, $STATE_DIRECTORY), and names the variables it takes.
    let etc = root.join("etc/bsfg");
    run(Command::new(BSFG)
        .args(["certs", "admin-token", "--out"])
        .arg(etc.join("admin.token")));
    let out = run(Command::new(root.join("usr/bin/bsfg"))
        .args(["validate", "--config"])
        .arg(etc.join("zone.toml"))
        .env("STATE_DIRECTORY", dir.path().join("state"))
        .env_remove("BSFG_ZONE")
        .env_remove("BSFG_LISTEN"));
    assert!(out.contains("ok: zone plant-a"), "{out}");
}

/// `systemd-analyze verify` on `unit` with its program at `installed` pointed at the
/// unpacked `program` (verify checks that it exists on this host); any warning (an
/// unknown or invalid setting) fails, not only errors.
fn verify_unit(unit: &str, installed: &str, program: &Path, dir: &Path) {
    let checked = dir.join(format!("verify-{}.service", std::process::id()));
    std::fs::write(&checked, unit.replace(installed, program.to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out.stderr)
    );
    std::fs::remove_file(checked).unwrap();
}

/// The zone's nats-server package: the release the tests use, its unit, and a
/// configuration that server accepts, with every write synced.
fn nats_package(deb: &Path, dir: &Path) {
    assert!(
        deb.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("bsfg-nats_2."),
        "{}",
        deb.display()
    );
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    for path in [
        "./usr/lib/bsfg-nats/nats-server",
        "./usr/lib/systemd/system/bsfg-nats.service",
        "./etc/bsfg-nats/nats.conf",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} not in:\n{listing}"
        );
    }
    let root = dir.join("nats-root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    let server = root.join("usr/lib/bsfg-nats/nats-server");
    let conf = root.join("etc/bsfg-nats/nats.conf");
    // -t: checks the file and exits, non-zero on an unknown key or a bad value.
    run(Command::new(&server).arg("-c").arg(&conf).arg("-t"));
    let conf = std::fs::read_to_string(&conf).unwrap();
    assert!(conf.contains("sync_interval: always"), "{conf}");
    assert!(conf.contains("listen: 127.0.0.1:4222"), "{conf}");
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/bsfg-nats.service")).unwrap();
    let set = directives(&unit);
    for want in [
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "User=bsfg-nats",
    ] {
        assert!(set.contains(&want), "{want} not set in bsfg-nats.service");
    }
    if has_tool("systemd-analyze") {
        verify_unit(&unit, "/usr/lib/bsfg-nats/nats-server", &server, dir);
    }
}
