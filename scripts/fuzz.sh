#!/usr/bin/env bash
# Builds and runs each cargo-fuzz target of engine/fuzz and mesh/fuzz for FUZZ_SECONDS (default 30) seconds.
# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them,
# since no other toolchain can be installed on our machines.
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
seconds=${FUZZ_SECONDS:-30}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (once)"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
# The engine's targets (frames from a VM, datagrams from the host) and the mesh's (datagrams
# from a peer, IPC requests and invite links, and sessions of signed messages through
# admission with issue 24's invariants checked after every step), and packets a hostile VM
# sends into a userspace tunnel (the fence, then the consumer's TCP/IP stack).
for crate_target in engine:vm_frame engine:host_datagram mesh:mesh_datagram mesh:mesh_ipc mesh:mesh_session mesh:tunnel_packets; do
    crate=${crate_target%%:*} target=${crate_target#*:}
    cd "$top/$crate/fuzz"
    mkdir -p "corpus/$target"
    seeds=corpus/seed
    # Sessions have seeds of their own (steps, not datagrams).
    [[ $target == mesh_session ]] && seeds=corpus/session
    # Packets from a VM into a userspace tunnel have theirs too.
    [[ $target == tunnel_packets ]] && seeds=corpus/tunnel
    cp -n "$seeds"/* "corpus/$target/" 2>/dev/null || true
    echo "fuzz: $target for ${seconds}s"
    cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
