#!/usr/bin/env bash
# Builds twinbox's own init as artifacts of their own, so a root image need not carry it:
#   $CACHE/init/<key>/twinbox-init      static, stripped (the container binds it read-only)
#   $CACHE/init/<key>/initramfs.cpio    newc archive with it as /init (the VM boots with it)
# and points $CACHE/init/current at them. Prints the initramfs path on stdout (logs go to
# stderr). rootfs/build.sh calls it and copies the same twinbox-init into the image.
#
# Also leaves the static twinbox-microbench and twinbox-probe in $CACHE/init-target (one
# cargo build makes all of the crate's binaries; rootfs/build.sh copies them).
#
# Cached: the key is a sha256 over this script, init's and the protocol's sources,
# Cargo.lock and the toolchain version; when the artifacts for a key exist the script only
# prints the path. Deterministic: the archive is written by twinbox-initramfs
# (rootfs/init/src/bin), with fixed inode numbers, times and owners.
#
# Usage: rootfs/build-init.sh [--force]     (--force rebuilds even if the key is cached)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${TWINBOX_CACHE:-/var/cache/twinbox}
force=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    *) echo "rootfs/build-init.sh: unknown argument '$arg' (usage: rootfs/build-init.sh [--force])" >&2; exit 2 ;;
  esac
done

log() { echo "init: $*" >&2; }

"$repo/scripts/install-deps" >&2

key_inputs() {
  (cd "$repo" && sha256sum rootfs/build-init.sh Cargo.lock \
    rootfs/init/Cargo.toml proto/Cargo.toml $(find rootfs/init/src proto/src -type f | LC_ALL=C sort))
  rustc -V
}
key=$(key_inputs | sha256sum | cut -c1-16)
out_dir=$cache/init/$key
initramfs=$out_dir/initramfs.cpio

point_current() {
  ln -sfn "$key" "$cache/init/current.tmp.$$"
  mv -T "$cache/init/current.tmp.$$" "$cache/init/current"
}

target=$cache/init-target/x86_64-unknown-linux-gnu/release
if [[ -f $initramfs && -f $out_dir/twinbox-init && $force -eq 0 ]]; then
  point_current
  echo "$initramfs"
  exit 0
fi

mkdir -p "$cache/init"
work=$(mktemp -d "$cache/init/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$(date +%s.%N)

# Explicit --target so +crt-static does not reach build scripts/proc macros; its own target
# dir so these RUSTFLAGS do not invalidate the shared one. Whole-program LTO in one codegen
# unit packs init's code onto fewer pages: every box start faults them in, ~15 µs a fault
# on a PVM host (6 of init's faults fewer per start).
log "building twinbox-init (static)"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
  --config 'profile.release.lto="fat"' --config profile.release.codegen-units=1 \
  -p twinbox-init --target x86_64-unknown-linux-gnu --target-dir "$cache/init-target")
for bin in twinbox-init twinbox-initramfs; do
  if ! file "$target/$bin" | grep -q 'statically linked\|static-pie linked'; then
    echo "rootfs/build-init.sh: $target/$bin is not statically linked" >&2
    exit 1
  fi
done

publish=$work/publish
mkdir "$publish"
install -m 0755 "$target/twinbox-init" "$publish/twinbox-init"
strip --strip-all "$publish/twinbox-init"
"$target/twinbox-initramfs" "$publish/twinbox-init" "$publish/initramfs.cpio"
chmod 0444 "$publish/initramfs.cpio"
chmod 0555 "$publish/twinbox-init"
(cd "$publish" && sha256sum twinbox-init initramfs.cpio >SHA256SUMS)

# Publish atomically: the keyed directory appears complete or not at all.
rm -rf "$out_dir"
mv -T "$publish" "$out_dir"
point_current
# Keep the three newest (a running box may hold one; each is ~1 MiB twice).
(cd "$cache/init" && ls -1dt -- */ | sed 's|/$||' | { grep -E '^[0-9a-f]{16}$' || true; } | tail -n +4 |
  while read -r old; do rm -rf -- "$old"; done)
log "built in $(echo "$(date +%s.%N) - $started" | bc) s: $(du -h "$out_dir/twinbox-init" | cut -f1) init, $(du -h "$initramfs" | cut -f1) initramfs"
echo "$initramfs"
