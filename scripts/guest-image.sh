#!/usr/bin/env bash
# Builds the test guest under target/guest: Debian's cloud kernel, busybox-static, the NIC,
# WireGuard and iptables modules with their dependencies, wg and iptables (legacy) with the
# libraries they need, our static helper (omerta-guest) and /init. Packages are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x`: nothing is installed on the host.
# Cached: a second run with nothing changed does nothing.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/target/guest
mkdir -p "$out"
inputs=$(cat "$0" "$top"/tools/src/bin/omerta-guest.rs "$top"/engine/src/testkit.rs "$top"/sys/src/bench_linux.rs | sha256sum | cut -c1-16)
if [[ -f $out/vmlinuz && -f $out/initrd.cpio && $(cat "$out/.inputs" 2>/dev/null) == "$inputs" ]]; then
    exit 0
fi
echo "guest-image: building (once) in $out"
for tool in apt-get apt-cache dpkg-deb; do
    command -v $tool >/dev/null || { echo "guest-image: $tool is missing (a Debian machine is needed)" >&2; exit 1; }
done
dl=$out/dl x=$out/x tree=$out/tree
rm -rf "$x" "$tree"
mkdir -p "$dl" "$x" "$tree"
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [[ -z $kpkg ]]; then
    apt-get update -qq
    kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
pkgs=("$kpkg" busybox-static wireguard-tools iptables libxtables12 libip4tc2 libip6tc2)
(cd "$dl" && for p in "${pkgs[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download -qq "$p"; done) 2>&1 | grep -v "^W: Download is performed unsandboxed" || true
for d in "$dl"/*.deb; do dpkg-deb -x "$d" "$x"; done
kver=$(ls "$x/lib/modules" | head -n1)
cp "$x/boot/vmlinuz-$kver" "$out/vmlinuz"

# Userland: busybox (applets installed by /init), wg, iptables-legacy, their libraries.
mkdir -p "$tree"/{bin,sbin,dev,proc,sys,tmp,etc,run,lib/modules,lib64,lib/x86_64-linux-gnu,usr/lib/x86_64-linux-gnu/xtables}
cp "$x/bin/busybox" "$tree/bin/busybox"
cp "$x/usr/bin/wg" "$tree/bin/wg"
cp "$x/usr/sbin/xtables-legacy-multi" "$tree/sbin/xtables-legacy-multi"
ln -s xtables-legacy-multi "$tree/sbin/iptables"
cp -a "$x"/usr/lib/x86_64-linux-gnu/xtables/lib{xt,ipt}_*.so "$tree/usr/lib/x86_64-linux-gnu/xtables/"
for lib in libxtables.so.12 libip4tc.so.2 libip6tc.so.2; do
    cp -L "$x/usr/lib/x86_64-linux-gnu/$lib" "$tree/lib/x86_64-linux-gnu/" 2>/dev/null || cp -L "$x/lib/x86_64-linux-gnu/$lib" "$tree/lib/x86_64-linux-gnu/"
done
# The C library comes from this (Debian) host, the release those packages were built for.
for lib in libc.so.6 libm.so.6 libdl.so.2; do cp -L "/lib/x86_64-linux-gnu/$lib" "$tree/lib/x86_64-linux-gnu/"; done
cp -L /lib64/ld-linux-x86-64.so.2 "$tree/lib64/"

# Kernel modules, dependencies first (busybox depmod makes the modules.dep Debian leaves out).
"$x/bin/busybox" depmod -b "$x" "$kver"
dep=$x/lib/modules/$kver/modules.dep
want=(virtio_pci virtio_net wireguard ip_tables iptable_filter xt_tcpudp nf_log_syslog xt_LOG)
declare -A seen=()
order=()
load() { # module path relative to the modules dir
    local m=$1
    [[ -n ${seen[$m]:-} ]] && return
    seen[$m]=1
    local deps
    deps=$(awk -v m="$m:" '$1 == m { $1 = ""; print }' "$dep")
    for d in $deps; do load "$d"; done
    order+=("$m")
}
for w in "${want[@]}"; do
    m=$(awk -F: -v w="/$w.ko" 'index($1, w) && substr($1, length($1) - length(w) + 1) == w { print $1; exit }' "$dep")
    [[ -n $m ]] || { echo "guest-image: module $w not found" >&2; exit 1; }
    load "$m"
done
for m in "${order[@]}"; do
    cp "$x/lib/modules/$kver/$m" "$tree/lib/modules/"
    basename "$m" >> "$tree/lib/modules/order"
done

# Our helper, static so it runs without any library.
(cd "$top" && CARGO_TARGET_DIR="$top/target/guest-build" RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q --release -p omerta-tools --bin omerta-guest --target x86_64-unknown-linux-gnu)
cp "$top/target/guest-build/x86_64-unknown-linux-gnu/release/omerta-guest" "$tree/bin/omerta-guest"

cat > "$tree/init" <<'INIT'
#!/bin/busybox sh
# Omerta test guest: static address, optional firewall, then /test.sh; results on the console.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
arg() { for w in $(cat /proc/cmdline); do case $w in "$1"=*) echo "${w#*=}";; esac; done; }
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m; done
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
ip link set eth0 up
if [ "$(arg omerta.dhcp)" = 1 ]; then
    # DHCP is optional: a short try, then the static address from the command line.
    if udhcpc -i eth0 -n -q -t 2 -T 1 -s /bin/true >/dev/null 2>&1; then echo "OMERTA-DHCP lease"; else echo "OMERTA-DHCP none"; fi
fi
ip addr add "$(arg omerta.ip)" dev eth0
ip route add default via "$(arg omerta.gw)"
if [ "$(arg omerta.fw)" = 1 ]; then
    # Defense in depth: nothing leaves but the consumer's endpoint (and ICMP to it).
    c=$(arg omerta.consumer)
    iptables -P OUTPUT DROP
    iptables -A OUTPUT -o lo -j ACCEPT
    iptables -A OUTPUT -d "${c%:*}" -p udp --dport "${c#*:}" -j ACCEPT
    iptables -A OUTPUT -d "${c%:*}" -p icmp -j ACCEPT
    # The WireGuard tunnel: what goes in is encrypted and leaves only towards the consumer.
    iptables -A OUTPUT -o wg+ -j ACCEPT
    # What the policy drops is logged first (xt_LOG, to the kernel log and so the console).
    if iptables -A OUTPUT -j LOG --log-prefix "OMERTA-FW-DROP "; then echo "OMERTA-FW log on"; fi
    echo "OMERTA-FW on"
fi
echo "OMERTA-READY"
if [ -x /test.sh ]; then /test.sh; rc=$?; else rc=0; fi
echo "OMERTA-RESULT rc=$rc"
reboot -f
INIT
chmod 755 "$tree/init"
(cd "$top" && cargo build -q -p omerta-tools --bin omerta-mkinitramfs)
"$top/target/debug/omerta-mkinitramfs" "$tree" "$out/initrd.cpio"
echo "$inputs" > "$out/.inputs"
echo "guest-image: kernel $kver, initramfs $(du -h "$out/initrd.cpio" | cut -f1), modules: ${#order[@]}"
