#!/usr/bin/env bash
# Builds the "stock guest": Debian's unmodified cloud kernel (the same package the lab runs
# on) and a small initramfs that loads its virtio modules and reports what the kernel sees
# of the machine twinbox gives it. A user's own distribution kernel is the common case;
# tests/vm_cpu.rs boots this one to prove twinbox describes the machine to it correctly.
#
#   $TWINBOX_CACHE/stock-guest/<key>/{vmlinuz,initramfs.cpio,version}   and   stock-guest/current -> <key>
#
# The initramfs's /init (busybox sh) loads virtio_ring, virtio, virtio_mmio and virtio_blk,
# waits for the first disk, prints `STOCK_<FACT>=<value>` lines on the console (CPUs online,
# each CPU's topology and cache sharing, the CPU flags, the disk, whether it mounts as
# ext4) and resets the machine (`reboot -f`; twinbox's
# command line says reboot=k). The kernel is never installed on the host: the .deb is
# unpacked into a temporary directory. Keyed by package version + this script; a cached key
# returns at once. Prints the output directory as its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${TWINBOX_CACHE:-/var/cache/twinbox}

"$here/../scripts/install-deps" >&2

# linux-image-cloud-amd64 is a metapackage: the kernel is the versioned package it depends on.
package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $package ]]; then
  apt-get update -qq
  package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[[ -n $package ]] || { echo "stock-guest: cannot resolve linux-image-cloud-amd64 from apt" >&2; exit 1; }
version=$(apt-cache policy "$package" | awk '/Candidate:/ {print $2}')
busybox=$(command -v busybox || true)
# ldd fails on a static binary: that is the one the initramfs can use without libraries.
[[ -n $busybox ]] && ! ldd "$busybox" >/dev/null 2>&1 ||
  { echo "stock-guest: a static busybox is needed (apt-get install busybox-static)" >&2; exit 1; }
key=$(cat "$here/build-stock-guest.sh" <(echo "$package $version") | sha256sum | cut -c1-16)
out="$cache/stock-guest/$key"
publish_current() {
  ln -sfn "$key" "$cache/stock-guest/current.tmp.$$"
  mv -T "$cache/stock-guest/current.tmp.$$" "$cache/stock-guest/current"
}
if [[ -f $out/vmlinuz && -f $out/initramfs.cpio ]]; then
  publish_current
  echo "$out"
  exit 0
fi

mkdir -p "$cache/stock-guest"
work=$(mktemp -d "$cache/stock-guest/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "stock-guest: fetching $package $version" >&2
# apt-get download writes into the current directory; _apt cannot write to a root-owned
# mktemp dir, which only costs a warning.
(cd "$work" && apt-get download -q "$package" 2>&1 | grep -v "unsandboxed" >&2 || true)
deb=$(ls "$work"/*.deb 2>/dev/null | head -n1)
[[ -n $deb ]] || { echo "stock-guest: apt-get download $package produced no .deb" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/x"

tree="$work/tree"
mkdir -p "$tree"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$busybox" "$tree/bin/busybox"
# Load order follows the dependencies (modinfo -F depends): virtio_ring, then virtio, then
# the transport and the block driver.
modules="virtio_ring virtio virtio_mmio virtio_blk"
for module in $modules; do
  src=$(find "$work/x/lib/modules" -name "$module.ko*" | head -n1)
  [[ -n $src ]] || { echo "stock-guest: $package has no $module module" >&2; exit 1; }
  case $src in
    *.ko.xz) xz -dc "$src" > "$tree/lib/modules/$module.ko" ;;
    *.ko.zst) zstd -qdc "$src" > "$tree/lib/modules/$module.ko" ;;
    *) cp "$src" "$tree/lib/modules/$module.ko" ;;
  esac
done

cat > "$tree/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $modules; do
  insmod /lib/modules/\$m.ko || echo "STOCK_INSMOD_FAILED=\$m"
done
# virtio_blk probes asynchronously: give the disk a few seconds to appear.
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 50 ]; do sleep 0.1; i=\$((i + 1)); done
echo "STOCK_CPUS_ONLINE=\$(cat /sys/devices/system/cpu/online)"
echo "STOCK_NPROC=\$(grep -c ^processor /proc/cpuinfo)"
for c in /sys/devices/system/cpu/cpu[0-9]*; do
  n=\${c##*cpu}
  t=\$c/topology
  echo "STOCK_TOPOLOGY_\$n=\$(cat \$t/physical_package_id):\$(cat \$t/core_id):\$(cat \$t/thread_siblings_list):\$(cat \$t/core_siblings_list)"
  for i in \$c/cache/index*; do
    [ -d "\$i" ] && echo "STOCK_CACHE_\${n}_\${i##*index}=L\$(cat \$i/level)-\$(cat \$i/type):\$(cat \$i/shared_cpu_list)"
  done
done
echo "STOCK_FLAGS=\$(grep -m1 ^flags /proc/cpuinfo | cut -d: -f2)"
echo "STOCK_DISKS=\$(ls /sys/block | grep '^vd' | tr '\n' ' ')"
if mount -t ext4 -o ro /dev/vda /mnt 2>/dev/null; then
  echo "STOCK_ROOT_MOUNTED=yes"
  echo "STOCK_ROOT_HAS_SH=\$([ -e /mnt/bin/sh ] && echo yes || echo no)"
  umount /mnt
else
  echo "STOCK_ROOT_MOUNTED=no"
fi
echo "STOCK_DONE=yes"
reboot -f
INIT
chmod 755 "$tree/init"

stage="$work/out"
mkdir -p "$stage"
cp "$work"/x/boot/vmlinuz-* "$stage/vmlinuz"
# Fixed order, times and owners, so the archive's bytes depend on its inputs only.
find "$tree" -exec touch -h -d @0 {} +
(cd "$tree" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible -R 0:0) > "$stage/initramfs.cpio"
echo "$package $version" > "$stage/version"
rm -rf "$out"
mv -T "$stage" "$out"
publish_current
echo "$out"
