#!/usr/bin/env bash
# make run-small: the small test guest (busybox, seconds to boot) behind the engine, reaching its consumer over WireGuard, its attempts
# to go anywhere else blocked and counted. Root on Debian; installs what is missing first.
#
#   [ns omerta-demo-e]  omerta-engine --control ... ; QEMU guest (filtered mode, guest firewall)
#          veth 203.0.113.1/30  <->  203.0.113.2/30 veth
#   [ns omerta-demo-c]  omerta-consumer (userspace WireGuard, tunnel address 10.99.0.1)
#
# Nothing can leave the machine: both namespaces hold only their end of the veth pair.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[[ $(id -u) -eq 0 ]] || { echo "make run needs root (network namespaces, QEMU)" >&2; exit 1; }
scripts/setup.sh
export PATH=$HOME/.cargo/bin:$PATH
echo "== building"
cargo build -q --bins -p omerta-control -p omerta-tools
bin=$top/target/debug
work=$(mktemp -d /tmp/omerta-demo.XXXXXX)
# The engine drops root for its own user (nobody here), who reads the guest's initrd from here.
chmod 755 "$work"
e=omerta-demo-e c=omerta-demo-c
engine_pid="" consumer_pid=""
cleanup() {
    local rc=$?
    set +e
    [[ -n $engine_pid ]] && kill -TERM "$engine_pid" 2>/dev/null && wait "$engine_pid" 2>/dev/null
    [[ -n $consumer_pid ]] && kill -TERM "$consumer_pid" 2>/dev/null && wait "$consumer_pid" 2>/dev/null
    ip netns del $e 2>/dev/null || true
    ip netns del $c 2>/dev/null || true
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT
ip netns del $e 2>/dev/null || true
ip netns del $c 2>/dev/null || true
ip netns add $e
ip netns add $c
ip -n $e link add vd0 type veth peer name vd1 netns $c
ip -n $e addr add 203.0.113.1/30 dev vd0
ip -n $c addr add 203.0.113.2/30 dev vd1
for ns in $e $c; do ip -n $ns link set lo up; done
ip -n $e link set vd0 up
ip -n $c link set vd1 up

read -r g_priv g_pub < <("$bin/omerta-consumer" genkey)
read -r c_priv c_pub < <("$bin/omerta-consumer" genkey)
echo "== consumer: userspace WireGuard at 203.0.113.2:51820 (namespace $c)"
ip netns exec $c "$bin/omerta-consumer" 203.0.113.2:51820 "$c_priv" "$g_pub" 10.99.0.1 120 > "$work/consumer.log" 2>&1 &
consumer_pid=$!
echo "== engine: filtered mode, control socket $work/ctl/engine.sock (namespace $e)"
ip netns exec $e "$bin/omerta-engine" --control "$work/ctl/engine.sock" --state-dir "$work/state" \
    --image-dir target/guest --image-dir "$work" > "$work/engine.log" 2>&1 &
engine_pid=$!
ctl() { "$bin/omertactl" --socket "$work/ctl/engine.sock" "$@"; }
for _ in $(seq 50); do ctl status >/dev/null 2>&1 && break; sleep 0.1; done

mkdir -p "$work/extra"
cat > "$work/extra/test.sh" <<SCRIPT
#!/bin/sh
echo "== guest: WireGuard to the consumer"
echo $g_priv > /tmp/key
ip link add wg0 type wireguard
wg set wg0 private-key /tmp/key listen-port 51820 peer $c_pub allowed-ips 10.99.0.0/24 endpoint 203.0.113.2:51820 persistent-keepalive 5
ip addr add 10.99.0.2/24 dev wg0
ip link set wg0 up
echo "   3 pings to the consumer through the tunnel; PING-REPLIES counts the answers (the first"
echo "   ping can go unanswered while the WireGuard handshake completes, so 2 or 3 is a success)"
omerta-guest ping 10.99.0.1 3
echo "   3 UDP requests to the consumer's echo service; REPLY: is its answer, NO-REPLY none in 3 s"
for i in 1 2 3; do omerta-guest udp-rr 10.99.0.1:7 hello-from-the-vm-\$i 3000; done
echo "   the tunnel as WireGuard sees it (a recent handshake, bytes both ways):"
wg show wg0 | sed -n '/peer/,\$p'
echo "== guest: trying to leave through its own firewall (blocked in the guest)"
echo "   SENT 0 means the guest's own firewall refused the datagram before it left"
omerta-guest udp-send 8.8.8.8:53 dns 1
echo "== guest: trying to leave below its firewall, raw frames (blocked by the engine)"
echo "   RAW-SENT N: an N-byte Ethernet frame written with AF_PACKET, under the guest's firewall,"
echo "   as root in a VM always can: it left the guest, and the engine drops it (see stats below)"
omerta-guest raw-udp 8.8.8.8:53 dns
omerta-guest raw-udp 192.168.1.1:80 provider-lan
omerta-guest raw-udp 10.0.2.2:22 provider-host
SCRIPT
chmod 755 "$work/extra/test.sh"
"$bin/omerta-mkinitramfs" "$work/extra" "$work/extra.cpio"
cat target/guest/initrd.cpio "$work/extra.cpio" > "$work/initrd"

echo "== starting the guest (QEMU; under TCG this takes a few seconds)"
ctl vm start name=demo,consumer=203.0.113.2:51820 --kernel vmlinuz --initrd "$work/initrd" | sed -n '1,3p'
said_ready=""
for _ in $(seq 600); do
    state=$(ctl --json vm show demo | sed -n 's/.*"state":"\([a-z]*\)".*/\1/p')
    if [[ $state == ready && -z $said_ready ]]; then
        echo "== the guest is ready (it said so on its console: network and firewall up)"
        said_ready=1
    fi
    [[ $state == starting || $state == booting || $state == ready ]] || break
    sleep 0.2
done
console=$(ctl --json vm show demo | sed -n 's/.*"console":"\([^"]*\)".*/\1/p')
echo
echo "== the guest's console"
grep -v -e '^\[' -e '^$' "$console" || true
echo
echo "== the consumer saw"
sed -n '1,20p' "$work/consumer.log"
echo
echo "== omertactl stats demo (frames_from_vm: all the VM sent; forwarded_*: let through to its consumer;"
echo "   dropped and the reasons under it: what the engine stopped; frames_to_vm: what it delivered to the VM)"
ctl stats demo
echo
echo "== omertactl log demo (blocked traffic, header fields only)"
ctl log demo
echo
echo "== stopping"
kill -TERM "$engine_pid"; wait "$engine_pid" || true; engine_pid=""
echo "done: the guest reached its consumer over WireGuard; everything else was blocked and counted."
