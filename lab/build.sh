#!/usr/bin/env bash
# Builds the lab's kernel side: Debian's stock cloud kernel and the KVM modules it needs
# (kvm, kvm-amd, irqbypass) plus loop, tun and overlay (so VM networking and containers
# can be tried in the lab too), unpacked from the .deb into the cache — never installed on
# the host. Keyed by package version + this script; a cached key returns at once. Prints
# the output directory as its last line.
#   $TWINBOX_CACHE/lab/<key>/{vmlinuz,modules/*.ko,version}   (modules decompressed)   and   lab/current -> <key>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${TWINBOX_CACHE:-/var/cache/twinbox}

"$here/../scripts/install-deps"

# linux-image-cloud-amd64 is a metapackage: the kernel is the versioned package it depends on.
package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $package ]]; then
  apt-get update -qq
  package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[[ -n $package ]] || { echo "lab: cannot resolve linux-image-cloud-amd64 from apt" >&2; exit 1; }
version=$(apt-cache policy "$package" | awk '/Candidate:/ {print $2}')
key=$(cat "$here/build.sh" <(echo "$package $version") | sha256sum | cut -c1-16)
out="$cache/lab/$key"
publish_current() {
  ln -sfn "$key" "$cache/lab/current.tmp.$$"
  mv -T "$cache/lab/current.tmp.$$" "$cache/lab/current"
}
if [[ -f $out/vmlinuz && -f $out/modules/overlay.ko ]]; then
  publish_current
  echo "$out"
  exit 0
fi

mkdir -p "$cache/lab"
work=$(mktemp -d "$cache/lab/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "lab: fetching $package $version" >&2
# apt-get download writes into the current directory; _apt cannot write to a root-owned
# mktemp dir, which only costs a warning.
(cd "$work" && apt-get download -q "$package" 2>&1 | grep -v "unsandboxed" >&2 || true)
deb=$(ls "$work"/*.deb 2>/dev/null | head -n1)
[[ -n $deb ]] || { echo "lab: apt-get download $package produced no .deb" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/x"

stage="$work/out"
mkdir -p "$stage/modules"
cp "$work"/x/boot/vmlinuz-* "$stage/vmlinuz"
# kvm-amd needs kvm, which needs irqbypass (modinfo -F depends); loop, tun and overlay
# depend on nothing. Load order is in lab/run.
for module in irqbypass kvm kvm-amd loop tun overlay; do
  src=$(find "$work/x/lib/modules" -name "$module.ko*" | head -n1)
  [[ -n $src ]] || { echo "lab: $package has no $module module" >&2; exit 1; }
  case $src in
    *.ko.xz) xz -dc "$src" > "$stage/modules/$module.ko" ;;
    *.ko.zst) zstd -qdc "$src" > "$stage/modules/$module.ko" ;;
    *) cp "$src" "$stage/modules/$module.ko" ;;
  esac
done
echo "$package $version" > "$stage/version"
rm -rf "$out"
mv -T "$stage" "$out"
publish_current
echo "$out"
