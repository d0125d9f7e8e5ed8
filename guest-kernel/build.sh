#!/usr/bin/env bash
# Builds the guest kernel (vmlinux with the PVH note, and bzImage) from Debian's
# linux-source-6.1 and fragment.config, into a cache keyed by the hash of fragment +
# this script + the source package version. A cached key returns at once. Prints the
# output directory as its last line. The build tree is deleted afterwards: any change is a
# new key and a full build anyway, and the tree is over 1 GB.
#   $TWINBOX_CACHE/kernel/<key>/{vmlinux,bzImage,config,build-info}   and
#   kernel/current -> <key>      (build-info: build time and sizes, stripped and not)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${TWINBOX_CACHE:-/var/cache/twinbox}
source_tar=/usr/src/linux-source-6.1.tar.xz

"$here/../scripts/install-deps"

source_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$(cat "$here/fragment.config" "$here/build.sh" <(echo "$source_version") | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
publish_current() {
  ln -sfn "$key" "$cache/kernel/current.tmp.$$"
  mv -T "$cache/kernel/current.tmp.$$" "$cache/kernel/current"
}
if [[ -f $out/vmlinux && -f $out/bzImage ]]; then
  publish_current
  echo "$out"
  exit 0
fi

started=$(date +%s)
mkdir -p "$cache/kernel"
work=$(mktemp -d "$cache/kernel/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "guest-kernel: building $key in $work (8-15 min on 2 cores)" >&2
tar -xf "$source_tar" -C "$work"
src="$work/linux-source-6.1"

# allnoconfig + fragment keeps the config minimal (scripts/config + olddefconfig pulls
# in defaults such as IPv6).
make -C "$src" -s KCONFIG_ALLCONFIG="$here/fragment.config" allnoconfig >&2

# Kconfig silently drops options whose dependencies are unmet: check every line.
dropped=0
while IFS= read -r line; do
  case $line in
    CONFIG_*=*)
      grep -qxF "$line" "$src/.config" || { echo "guest-kernel: Kconfig dropped '$line'" >&2; dropped=1; } ;;
    "# CONFIG_"*" is not set")
      option=${line#\# }; option=${option%% *}
      ! grep -q "^$option=" "$src/.config" || { echo "guest-kernel: '$option' is set but the fragment turns it off" >&2; dropped=1; } ;;
  esac
done < "$here/fragment.config"
((dropped == 0)) || { echo "guest-kernel: fix fragment.config (a dependency is missing)" >&2; exit 1; }

make -C "$src" -s -j"$(nproc)" vmlinux bzImage >&2

# The PVH entry note must survive stripping, or VMMs fall back to the bzImage protocol.
stage="$work/out"
mkdir -p "$stage"
strip --strip-all -o "$stage/vmlinux" "$src/vmlinux"
readelf -n "$stage/vmlinux" | grep -q "Xen.*0x00000012" \
  || { echo "guest-kernel: vmlinux has no PVH (Xen type 18) ELF note" >&2; exit 1; }
cp "$src/arch/x86/boot/bzImage" "$stage/bzImage"
cp "$src/.config" "$stage/config"
cat > "$stage/build-info" <<INFO
source_version=$source_version
build_seconds=$(($(date +%s) - started))
vmlinux_unstripped_bytes=$(stat -c %s "$src/vmlinux")
vmlinux_bytes=$(stat -c %s "$stage/vmlinux")
bzimage_bytes=$(stat -c %s "$stage/bzImage")
INFO
rm -rf "$out"
mv -T "$stage" "$out"
publish_current
echo "guest-kernel: built $key:" $(cat "$out/build-info") >&2
echo "$out"
