#!/usr/bin/env bash
# Installs what building and testing need on a Debian machine, once; quiet when all is there.
# Rust itself is not installed here: it needs rustup (see README), Debian's rustc is too old.
set -euo pipefail
if [[ ! -r /etc/debian_version ]] || ! command -v apt-get >/dev/null; then
    echo "setup: this script installs with apt-get on Debian 12; on $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-this system}") install Rust (rustup), gcc, iproute2, util-linux, iptables, nftables and qemu-system-x86 yourself" >&2
    exit 1
fi
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v curl >/dev/null || need+=(curl ca-certificates)
command -v ip >/dev/null || need+=(iproute2)
command -v prlimit >/dev/null || need+=(util-linux)
# Direct mode masquerades its VMM namespace behind the host (control/src/launcher/netns.rs).
command -v iptables >/dev/null || need+=(iptables)
# The engine's kernel fence: the launcher keeps its table with nft (control/src/launcher/fence.rs).
command -v nft >/dev/null || need+=(nftables)
# The real-VM tests boot a guest under QEMU (Debian 12: QEMU 7.2, which has -netdev dgram).
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# The cloud-image tests' consumer: Debian's WireGuard in userspace on a TUN device, its wg tool,
# the OpenSSH client, and tcpdump for the capture that must show no plaintext.
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v ssh >/dev/null || need+=(openssh-client)
command -v tcpdump >/dev/null || need+=(tcpdump)
# The operator tests: man pages rendered with man (man-db, groff) and the systemd units
# checked with systemd-analyze verify.
command -v man >/dev/null || need+=(man-db)
command -v systemd-analyze >/dev/null || need+=(systemd)
# The images (scripts/cloud-image.sh, installed here so that two image builds never wait on
# each other for dpkg's lock) and the guests' disks and seeds.
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v genisoimage >/dev/null || need+=(genisoimage)
command -v qemu-img >/dev/null || need+=(qemu-utils)
# The Debian package (scripts/deb.sh): dpkg-shlibdeps for its dependencies, lintian to check it.
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v lintian >/dev/null || need+=(lintian)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing ${need[*]}; run as root or install them with apt-get" >&2
        exit 1
    fi
    echo "setup: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    apt_updated=1
fi
if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH=$HOME/.cargo/bin:$PATH
fi
if ! command -v cargo >/dev/null; then
    # Debian 12's rustc is too old (we need 1.91): install the toolchain with rustup.
    if [[ $(id -u) -eq 0 ]] && command -v curl >/dev/null; then
        echo "setup: installing Rust with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
        export PATH=$HOME/.cargo/bin:$PATH
    else
        echo "setup: cargo not found. Install Rust 1.91 or newer with rustup (https://rustup.rs), then rerun." >&2
        exit 1
    fi
fi
# An older toolchain (smoltcp needs 1.91): rustup brings stable up to date where it manages it.
rust_minor=$(rustc --version 2>/dev/null | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p')
if [[ -n $rust_minor && $rust_minor -lt 91 ]]; then
    if command -v rustup >/dev/null; then
        echo "setup: Rust 1.$rust_minor is older than 1.91: rustup update stable"
        rustup update stable
    else
        echo "setup: Rust 1.$rust_minor is older than 1.91; install a newer one (https://rustup.rs), then rerun." >&2
        exit 1
    fi
fi
# The users an engine started as root runs as: omerta for the engine itself (--runas) and
# omerta-vmm for guests' VMMs (--vmm-user), system users with no login and no home, so that a
# guest that took over its VMM shares nothing with the engine (both fall back to nobody).
if [[ $(id -u) -eq 0 ]]; then
    for u in omerta omerta-vmm; do
        if ! getent passwd "$u" >/dev/null; then
            echo "setup: adding the system user $u"
            useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$u"
        fi
    done
fi
# The test guest (kernel and busybox fetched with apt-get download, cached under target/).
if [[ $(id -u) -eq 0 ]]; then
    [[ -n ${apt_updated:-} ]] || apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
    "$(dirname "$0")/guest-image.sh"
fi
