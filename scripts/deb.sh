#!/usr/bin/env bash
# Builds the Debian package omerta_<version>_<arch>.deb from binaries already built in
# target/$PROFILE (make deb builds the release ones first), with dpkg-deb: the four programs,
# their man pages, the systemd units byte for byte as packaging/systemd has them, sysusers.d,
# tmpfiles.d, the sysctl file, /etc/omerta/engine.toml as a conffile, and the maintainer
# scripts of packaging/debian. Then lintian, when it is installed, fails the build on any error
# or warning. No root needed (files are root's in the package: --root-owner-group).
#
#   PROFILE=release|debug   which build to package (release)
#   DEB_VERSION=V           the package's version (the programs' own --version; a rebuild of
#                           the same tree for an upgrade test: V+rebuild1)
#   DEB_BUILT=DIR           the binaries (target/$PROFILE)
#   DEB_OUT=DIR             where the .deb goes (target/debian)
#   DEB_LINTIAN=0           skip lintian
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
profile=${PROFILE:-release}
built=${DEB_BUILT:-$top/target/$profile}
out=${DEB_OUT:-$top/target/debian}
bins=(omerta-engine omertactl omertad omerta)
die() { echo "deb: $*" >&2; exit 1; }

for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
    command -v $tool >/dev/null || die "$tool is missing; run make setup"
done
for b in "${bins[@]}" omerta-man; do
    [[ -x $built/$b ]] || die "$built/$b is not built; run make deb (or cargo build --bins for PROFILE=debug)"
done
# One version for all four programs: the workspace's.
version=
for b in "${bins[@]}"; do
    v=$("$built/$b" --version | cut -d' ' -f2)
    [[ -z $version || $v == "$version" ]] || die "$b says version $v, omerta-engine $version: rebuild"
    version=$v
done
# Semver's pre-release dash sorts before the release in Debian's order as a tilde.
version=${DEB_VERSION:-${version//-/\~}}
arch=$(dpkg --print-architecture)
deb=$out/omerta_${version}_${arch}.deb
# Reproducible: every date in the package is the commit's.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)}
commit=$(git -C "$top" log -1 --format=%h 2>/dev/null || echo unknown)

work=$out/build
rm -rf "$work"
pkg=$work/debian/omerta
mkdir -p "$pkg/DEBIAN"
umask 022
inst() { install -D -m "$1" "$2" "$pkg/$3"; }

for b in "${bins[@]}"; do
    inst 0755 "$built/$b" "usr/bin/$b"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg/usr/bin/$b"
    mkdir -p "$pkg/usr/share/man/man8"
    "$built/omerta-man" "$built/$b" 8 | gzip -9n > "$pkg/usr/share/man/man8/$b.8.gz"
    chmod 0644 "$pkg/usr/share/man/man8/$b.8.gz"
done
for u in "$top"/packaging/systemd/*.service; do
    inst 0644 "$u" "usr/lib/systemd/system/${u##*/}"
done
inst 0644 "$top/packaging/sysusers.d/omerta.conf" usr/lib/sysusers.d/omerta.conf
inst 0644 "$top/packaging/tmpfiles.d/omerta.conf" usr/lib/tmpfiles.d/omerta.conf
inst 0644 "$top/packaging/sysctl.d/90-omerta.conf" usr/lib/sysctl.d/90-omerta.conf
inst 0644 "$top/packaging/engine.toml" etc/omerta/engine.toml
inst 0644 "$top/packaging/debian/copyright" usr/share/doc/omerta/copyright
{
    echo "omerta ($version) unstable; urgency=medium"
    echo
    echo "  * Built from commit $commit."
    echo
    echo " -- ${DEB_MAINTAINER:-Omerta developers <dev@omerta.invalid>}  $(date -R -u -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$pkg/usr/share/doc/omerta/changelog.gz"
chmod 0644 "$pkg/usr/share/doc/omerta/changelog.gz"
# The crates compiled into the programs, each with its licence and its own licence and notice
# files: MIT, BSD, ISC and Zlib ask that a binary carry them.
command -v cargo >/dev/null || die "cargo is missing (it lists the crates in the programs)"
host=$(rustc -vV | sed -n 's/^host: //p')
sources=${CARGO_HOME:-$HOME/.cargo}/registry/src
{
    echo "The omerta programs include these crates, compiled in, under their own licences."
    echo
    (cd "$top" && cargo tree --offline --locked -e normal --target "$host" -p omerta-control -p omerta-mesh \
        --prefix none --format '{p}|{l}|{r}') | sed 's/ (\*)//' | grep -v -e '^$' -e ' (/' -e '(proc-macro)' |
        LC_ALL=C sort -u | while IFS='|' read -r crate licence repo; do
            name=${crate% v*}
            version=${crate##* v}
            echo "== $name $version ($licence) ${repo}"
            texts=0
            for f in "$sources"/*/"$name-$version"/{LICEN[CS]E,COPYING,NOTICE,COPYRIGHT}*; do
                [[ -f $f ]] || continue
                echo "-- ${f##*/}"
                cat "$f"
                echo
                texts=1
            done
            # A crate that ships no licence file: its notice from packaging/debian/notices,
            # taken from its repository. Without one the package is not built.
            if ((!texts)); then
                [[ -f $top/packaging/debian/notices/$name ]] ||
                    die "$name $version ships no licence file: add its notice to packaging/debian/notices/$name"
                cat "$top/packaging/debian/notices/$name"
            fi
            echo
        done
} | gzip -9n > "$pkg/usr/share/doc/omerta/THIRD-PARTY.gz"
chmod 0644 "$pkg/usr/share/doc/omerta/THIRD-PARTY.gz"
[[ $(zcat "$pkg/usr/share/doc/omerta/THIRD-PARTY.gz" | grep -c '^== ') -gt 50 ]] || die "cargo tree listed too few crates"
for s in postinst prerm postrm; do
    install -m 0755 "$top/packaging/debian/$s" "$pkg/DEBIAN/$s"
done
echo /etc/omerta/engine.toml > "$pkg/DEBIAN/conffiles"
chmod 0644 "$pkg/DEBIAN/conffiles"
(cd "$pkg" && find usr -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums"

# The shared libraries the programs link, as dependencies (dpkg-shlibdeps reads
# debian/control in its working directory).
printf 'Source: omerta\n\nPackage: omerta\nArchitecture: any\n' > "$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O "${bins[@]/#/debian/omerta/usr/bin/}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[[ -n $shlibs ]] || die "dpkg-shlibdeps found no libraries"
size=$(du -k -s --apparent-size --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@SIZE@|$size|" -e "s|@SHLIBS@|$shlibs|" \
    -e "s|@MAINTAINER@|${DEB_MAINTAINER:-Omerta developers <dev@omerta.invalid>}|" \
    "$top/packaging/debian/control.in" > "$pkg/DEBIAN/control"
find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
rm -rf "$work"
echo "deb: $deb ($(du -h "$deb" | cut -f1), $profile build)"
if [[ ${DEB_LINTIAN:-1} != 0 ]]; then
    if command -v lintian >/dev/null; then
        lintian --allow-root --fail-on error,warning --tag-display-limit 0 "$deb" || die "lintian finds fault with $deb"
        echo "deb: lintian finds no error or warning"
    else
        echo "deb: lintian is not installed (make setup installs it); the package is unchecked"
    fi
fi
