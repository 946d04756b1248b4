#!/usr/bin/env bash
# make run: a Debian 12 cloud VM behind the engine, rented to a consumer who SSHes in through
# WireGuard (Debian's wireguard-go and OpenSSH, the VM's host key pinned), and the VM's
# attempts to reach the internet, the provider's LAN and the provider host, as root with its
# own firewall flushed, blocked and counted. Root on Debian; installs what is missing first;
# builds the image once (a minute or two), then about three minutes under TCG.
#
#   [ns omerta-cdemo-e] omerta-engine; QEMU with the cloud image (its NIC is the engine)
#          veth 203.0.113.1/30  <->  203.0.113.2/30 veth
#   [ns omerta-cdemo-c] wireguard-go (10.50.1.1), ssh
#
# Nothing can leave the machine: both namespaces hold only their end of the veth pair.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[[ $(id -u) -eq 0 ]] || { echo "make run needs root (network namespaces, QEMU)" >&2; exit 1; }
t0=$SECONDS
step() { echo "== $* (at $((SECONDS - t0)) s)"; }
step "setting up (packages, users, the test guest's helper)"
scripts/setup.sh
export PATH=$HOME/.cargo/bin:$PATH
step "building"
cargo build -q --bins -p omerta-control
step "the Debian 12 cloud image (built once, then cached under target/cloud-image)"
scripts/cloud-image.sh
bin=$top/target/debug
image=$top/target/cloud-image
helper=$top/target/guest/tree/bin/omerta-guest
work=$(mktemp -d /tmp/omerta-demo.XXXXXX)
chmod 755 "$work"
e=omerta-cdemo-e c=omerta-cdemo-c wgif=omerta-cdemo
engine_pid="" wg_pid=""
cleanup() {
    local rc=$?
    set +e
    [[ -n $engine_pid ]] && kill -TERM "$engine_pid" 2>/dev/null && wait "$engine_pid" 2>/dev/null
    [[ -n $wg_pid ]] && kill -TERM "$wg_pid" 2>/dev/null && wait "$wg_pid" 2>/dev/null
    rm -f "/var/run/wireguard/$wgif.sock"
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
inc() { ip netns exec $c "$@"; }

step "consumer: WireGuard at 203.0.113.2:51820, tunnel address 10.50.1.1 (namespace $c)"
(umask 077; wg genkey > "$work/wg.key")
c_pub=$(wg pubkey < "$work/wg.key")
if inc ip link add $wgif type wireguard 2>/dev/null; then
    echo "   the kernel's WireGuard"
else
    echo "   wireguard-go (this host has no WireGuard module)"
    # A socket left by an earlier run that was killed would be found before ours exists.
    rm -f "/var/run/wireguard/$wgif.sock"
    WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 inc wireguard-go -f $wgif > "$work/wireguard-go.log" 2>&1 &
    wg_pid=$!
    for _ in $(seq 100); do
        [[ -S /var/run/wireguard/$wgif.sock ]] && inc ip link show $wgif >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
inc wg set $wgif private-key "$work/wg.key" listen-port 51820
inc ip addr add 10.50.1.1/24 dev $wgif
inc ip link set $wgif up
ssh-keygen -q -t ed25519 -N "" -C demo-consumer -f "$work/id_ed25519"

step "engine: filtered mode (namespace $e)"
ip netns exec $e "$bin/omerta-engine" --control "$work/ctl/engine.sock" --state-dir "$work/state" \
    --image-dir "$image" --image-dir "$work" > "$work/engine.log" 2>&1 &
engine_pid=$!
ctl() { "$bin/omertactl" --socket "$work/ctl/engine.sock" "$@"; }
for _ in $(seq 50); do ctl status >/dev/null 2>&1 && break; sleep 0.1; done
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }

step "vm start --image (the engine makes the VM's keys, overlay and seed)"
show=$(ctl --json vm start name=demo,consumer=203.0.113.2:51820 --image "$image" \
    --consumer-key "$c_pub" --ssh-key-file "$work/id_ed25519.pub")
vm_pub=$(field wireguard_public_key <<<"$show")
host_key=$(field ssh_host_key <<<"$show")
echo "   the VM's WireGuard public key: $vm_pub"
echo "   its SSH host key fingerprint:  $(field ssh_host_fingerprint <<<"$show")"
inc wg set $wgif peer "$vm_pub" allowed-ips 10.50.1.2/32
echo "10.50.1.2 $host_key" > "$work/known_hosts"
ssh_vm() {
    inc timeout 60 ssh -i "$work/id_ed25519" -o UserKnownHostsFile="$work/known_hosts" \
        -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR omerta@10.50.1.2 "$@"
}

step "booting under TCG (cloud-init sets up the user, the host keys and WireGuard)"
booted=$SECONDS state=booting
while ((SECONDS - booted < 600)); do
    state=$(ctl --json vm show demo | field state)
    [[ $state == starting || $state == booting ]] || break
    (((SECONDS - booted) % 20 == 0)) && echo "   still booting ($((SECONDS - booted)) s)"
    sleep 1
done
[[ $state == ready ]] || { echo "the VM did not become ready ($state); its console ends:"; ctl vm show demo; exit 1; }
step "the VM is ready ($((SECONDS - booted)) s)"
for _ in $(seq 20); do ssh_vm true 2>/dev/null && break; sleep 3; done

step "the consumer SSHes in through WireGuard, the host key pinned (no trust on first use)"
ssh_vm 'echo "   hello from $(hostname) as $(id -un), kernel $(uname -r)"; ip -4 -o addr show scope global | sed "s/^/   /"'
inc wg show $wgif | sed -n '/latest handshake\|transfer/s/^/   /p'

step "root in the VM flushes its own firewall and tries to leave"
inc timeout 60 scp -q -i "$work/id_ed25519" -o UserKnownHostsFile="$work/known_hosts" -o StrictHostKeyChecking=yes \
    -o BatchMode=yes "$helper" omerta@10.50.1.2:/tmp/omerta-guest
before=$(ctl --json stats demo | sed -n 's/.*"dropped":\([0-9]*\).*/\1/p')
ssh_vm 'sudo bash -c "iptables -P INPUT ACCEPT; iptables -P OUTPUT ACCEPT; iptables -F; echo \"   firewall: \$(iptables -S OUTPUT | head -1)\";
    for d in 8.8.8.8:53 192.168.1.1:80 10.0.2.2:22 203.0.113.1:22; do /tmp/omerta-guest udp-send \$d leak 1 >/dev/null; echo \"   UDP to \$d: sent\"; done;
    timeout 3 bash -c \"echo x > /dev/tcp/8.8.8.8/443\" 2>/dev/null || echo \"   TCP to 8.8.8.8:443: no answer\";
    /tmp/omerta-guest ping 8.8.8.8 1 | sed \"s/^PING-REPLIES /   ping 8.8.8.8: answers: /\""' || true
echo "   (\"sent\" means the datagram left the VM's own stack: the engine is what stops it)"
sleep 1
after=$(ctl --json stats demo | sed -n 's/.*"dropped":\([0-9]*\).*/\1/p')
step "the engine dropped $((after - before)) of those (nothing reached anyone)"
echo "== omertactl log demo (blocked traffic, header fields only)"
ctl log demo | tail -8
echo "== omertactl stats demo (frames_from_vm: all the VM sent; forwarded_*: let through to its consumer;"
echo "   dropped and the reasons under it: what the engine stopped; frames_to_vm: what it delivered to the VM)"
ctl stats demo
step "stopping"
ctl vm remove demo > /dev/null
kill -TERM "$engine_pid"; wait "$engine_pid" || true; engine_pid=""
echo "done in $((SECONDS - t0)) s: a Debian cloud VM reached by SSH through WireGuard only; everything else it tried was blocked and counted."
