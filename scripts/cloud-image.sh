#!/usr/bin/env bash
# Builds the Debian 12 cloud-style test image under target/cloud-image, from Debian packages
# only and without loop mounts: mmdebstrap into a directory, mkfs.ext4 -d into a raw disk.
# The result: disk.raw (the read-only base each VM's qcow2 overlay sits on), vmlinuz and
# initrd.img (booted directly, no bootloader). Rebuilt only when this recipe changes; quiet
# when the cached image is current. Needs root (mmdebstrap, chroot hooks) and the network to
# Debian's mirror (about 70 MB of packages). Measured recipe: ../shared/real-vm-notes.md.
#
# `cloud-image.sh provider` builds the provider image under target/provider-image instead: the
# same system plus what the omerta package depends on (QEMU, nftables, ...), so that the
# package installs offline, and a boot unit that, on a kernel command line with
# omerta.pkgtest, runs run.sh from a disk labelled OMERTA-PKG with its output on the serial
# console, then powers off (tests/package.rs).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
variant=${1:-cloud}
case $variant in
    cloud | provider) ;;
    *) echo "cloud-image: unknown variant $variant (cloud or provider)" >&2; exit 2 ;;
esac
out=$top/target/$variant-image
files=$top/scripts/cloud-image
# The recipe: this script, the variant, and the files it puts in the image (scripts/cloud-image/).
recipe=$( (cat "$0" "$files"/*; echo "$variant") | sha256sum | cut -c1-16)
if [[ -f $out/.recipe && $(cat "$out/.recipe") == "$recipe" && -f $out/disk.raw && -f $out/vmlinuz && -f $out/initrd.img ]]; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "cloud-image: building the image needs root (mmdebstrap); run make image as root" >&2
    exit 1
fi
# mmdebstrap and mkfs.ext4 come from scripts/setup.sh (so that two image builds never wait on
# each other for dpkg's lock).
for tool in mmdebstrap mkfs.ext4; do
    command -v $tool >/dev/null || { echo "cloud-image: $tool is missing; run make setup first" >&2; exit 1; }
done
t0=$SECONDS
step() { echo "cloud-image: $* (at $((SECONDS - t0)) s)"; }
tmp=$out.tmp
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
rootfs=$tmp/rootfs
pkgs=systemd,systemd-sysv,udev,dbus,cloud-init,openssh-server,wireguard-tools,iptables,sudo,iproute2
pkgs+=,linux-image-cloud-amd64,kmod,passwd,netbase
hooks=()
if [[ $variant == provider ]]; then
    # The omerta package's dependencies (packaging/debian/control.in) beyond the above.
    pkgs+=,qemu-system-x86,qemu-utils,genisoimage,nftables,procps
    hooks+=(--customize-hook="copy-in $files/omerta-pkgtest $files/omerta-pkgtest.service /usr/local/sbin"
        --customize-hook='mv "$1/usr/local/sbin/omerta-pkgtest.service" "$1/etc/systemd/system/"'
        --customize-hook='chmod 755 "$1/usr/local/sbin/omerta-pkgtest"'
        --customize-hook='chroot "$1" systemctl enable omerta-pkgtest.service >/dev/null 2>&1')
fi
step "downloading and unpacking Debian 12 (with its updates and security fixes) and $pkgs (a minute or two)"
# Hooks: the disk is /dev/vda; cloud-init looks for a NoCloud seed only; networkd brings up
# the NIC; timers that would touch the network or the disk are masked; no SSH host keys (the
# provider's seed brings them); no resolver of the host's; no docs, man pages or locales;
# Omerta's firewall unit, enabled before anything of the network (docs/guest-provisioning.md).
mmdebstrap --quiet --variant=minbase --include="$pkgs" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='echo "/dev/vda / ext4 defaults 0 1" > "$1/etc/fstab"' \
    --customize-hook='echo omerta-vm > "$1/etc/hostname"' \
    --customize-hook='printf "datasource_list: [NoCloud, None]\nlocale: false\nmanage_etc_hosts: localhost\n" > "$1/etc/cloud/cloud.cfg.d/90-omerta.cfg"' \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd >/dev/null 2>&1' \
    --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer >/dev/null 2>&1' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook=': > "$1/etc/resolv.conf"' \
    --customize-hook="copy-in $files/omerta-firewall /usr/local/sbin" \
    --customize-hook="copy-in $files/omerta-firewall.service /etc/systemd/system" \
    --customize-hook='mkdir -p "$1/etc/systemd/system/systemd-networkd.service.d"' \
    --customize-hook="copy-in $files/networkd-needs-firewall.conf /etc/systemd/system/systemd-networkd.service.d" \
    --customize-hook='chmod 755 "$1/usr/local/sbin/omerta-firewall"' \
    --customize-hook='chroot "$1" systemctl enable omerta-firewall.service >/dev/null 2>&1' \
    "${hooks[@]}" \
    bookworm "$rootfs" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main"
step "copying the kernel and initrd out"
kernel=$(ls "$rootfs"/boot/vmlinuz-* | sort | tail -1)
cp "$kernel" "$tmp/vmlinuz"
cp "$(ls "$rootfs"/boot/initrd.img-* | sort | tail -1)" "$tmp/initrd.img"
chmod 644 "$tmp/vmlinuz" "$tmp/initrd.img"
step "making the 2 GiB disk (ext4, sparse)"
mkfs.ext4 -q -L root -d "$rootfs" "$tmp/disk.raw" 2G >/dev/null
chmod 644 "$tmp/disk.raw"
rm -rf "$rootfs"
echo "$recipe" > "$tmp/.recipe"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
step "done: $out/disk.raw ($(du -h "$out/disk.raw" | cut -f1) used), kernel ${kernel##*/vmlinuz-}"
