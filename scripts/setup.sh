#!/usr/bin/env bash
# Installs what building and testing need on a Debian machine, once; quiet when all is there.
# Rust itself is not installed here: it needs rustup (see README), Debian's rustc is too old.
set -euo pipefail
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v ip >/dev/null || need+=(iproute2)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing ${need[*]}; run as root or install them with apt-get" >&2
        exit 1
    fi
    echo "setup: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found. Install Rust 1.85 or newer with rustup (https://rustup.rs), then rerun." >&2
    exit 1
fi
