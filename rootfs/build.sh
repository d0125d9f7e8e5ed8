#!/usr/bin/env bash
# Builds the root filesystem image both boxes run: $CACHE/rootfs/<key>/rootfs.ext4, and
# points $CACHE/rootfs/current at it. Prints the image path on stdout (logs go to stderr).
#
# Contents: busybox-static (/bin/busybox + applet links), the static twinbox-init at
# /sbin/twinbox-init (/sbin/init links to it; the same file rootfs/build-init.sh publishes
# as its own artifact, which both boxes run by default, so the copy here is only for
# peers and runtimes that start init from the image), the static twinbox-microbench at
# /usr/bin (also published beside the image, for native runs), the static twinbox-probe
# at /usr/bin (the lockdown tests' attacks), a minimal /etc, /dev/console and /dev/null
# nodes (so the kernel can give PID 1 a console before devtmpfs is mounted), and the
# benchmark tools (fio, sysbench, iperf3 for the net scenario) with the shared libraries
# they load.
#
# Cached: the key is a sha256 over this script, init's and the protocol's sources,
# Cargo.lock, the toolchain version and the versions of the Debian packages copied in.
# When the image for a key exists the script only prints its path.
#
# Deterministic: fixed mtimes, fixed UUID and directory-hash seed, no journal, fixed
# mkfs clock; two builds from the same inputs are byte-identical (checked by hand with
# `rootfs/build.sh --force` twice and sha256sum; see docs in the report / ARCHITECTURE).
#
# Usage: rootfs/build.sh [--force]     (--force rebuilds even if the key is cached)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${TWINBOX_CACHE:-/var/cache/twinbox}
force=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    *) echo "rootfs/build.sh: unknown argument '$arg' (usage: rootfs/build.sh [--force])" >&2; exit 2 ;;
  esac
done

log() { echo "rootfs: $*" >&2; }

# Fixed identity of the filesystem: same bytes on every build.
readonly FS_UUID=6e1b0c5a-7d1e-4c8f-9a53-2f7b8e4d1c90
readonly FS_LABEL=twinbox-root
# Debian packages whose files are copied into the image (their versions enter the key).
readonly PACKAGES=(busybox-static fio sysbench iperf3 libiperf0)
# Tools copied with their shared libraries.
readonly TOOLS=(/usr/bin/fio /usr/bin/sysbench /usr/bin/iperf3)

"$repo/scripts/install-deps" >&2

# ---- cache key -------------------------------------------------------------------------
key_inputs() {
  (cd "$repo" && sha256sum rootfs/build.sh rootfs/build-init.sh Cargo.lock \
    rootfs/init/Cargo.toml proto/Cargo.toml $(find rootfs/init/src proto/src -type f | LC_ALL=C sort))
  dpkg-query -W -f='${Package} ${Version}\n' "${PACKAGES[@]}"
  rustc -V
}
key=$(key_inputs | sha256sum | cut -c1-16)
out_dir=$cache/rootfs/$key
# The init artifacts first, cached or not, so `rootfs/build.sh` alone leaves both boxes
# able to run any image (the init they bring is published there, not in the image).
initramfs=$("$repo/rootfs/build-init.sh")
init_bin=$(dirname "$initramfs")/twinbox-init
image=$out_dir/rootfs.ext4

point_current() {
  ln -sfn "$key" "$cache/rootfs/current.tmp.$$"
  mv -T "$cache/rootfs/current.tmp.$$" "$cache/rootfs/current"
}

if [[ -f $image && $force -eq 0 ]]; then
  point_current
  echo "$image"
  exit 0
fi

mkdir -p "$cache/rootfs"
work=$(mktemp -d "$cache/rootfs/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
staging=$work/staging
started=$(date +%s.%N)

# ---- twinbox-init, static --------------------------------------------------------------
# build-init.sh published the stripped init (and the initramfs) as their own artifact
# above; the image gets the very same file. The crate's other binaries come from the same static
# build in $cache/init-target; cargo makes sure they are current (a no-op when
# build-init.sh just built them).
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
  -p twinbox-init --target x86_64-unknown-linux-gnu --target-dir "$cache/init-target")
microbench_bin=$cache/init-target/x86_64-unknown-linux-gnu/release/twinbox-microbench
probe_bin=$cache/init-target/x86_64-unknown-linux-gnu/release/twinbox-probe
if ! file "$init_bin" "$microbench_bin" "$probe_bin" | grep -c static | grep -qx 3; then
  echo "rootfs/build.sh: $init_bin, $microbench_bin or $probe_bin is not statically linked" >&2
  exit 1
fi

# ---- skeleton ----------------------------------------------------------------------------
umask 022
mkdir -p "$staging"
for d in bin sbin etc proc sys dev tmp run root usr/bin usr/sbin var/tmp mnt lib lib64; do
  mkdir -p "$staging/$d"
done
chmod 1777 "$staging/tmp" "$staging/var/tmp"
chmod 0700 "$staging/root"

install -m 0755 "$init_bin" "$staging/sbin/twinbox-init"
ln -s twinbox-init "$staging/sbin/init"
# The syscall/fork/exec micro-benchmark (rootfs/init/src/bin); the same stripped file is
# published next to the image for the bench's native runs.
install -m 0755 "$microbench_bin" "$staging/usr/bin/twinbox-microbench"
strip --strip-all "$staging/usr/bin/twinbox-microbench"
# One named attack per run, for the lockdown tests (rootfs/init/src/bin/twinbox-probe.rs).
install -m 0755 "$probe_bin" "$staging/usr/bin/twinbox-probe"
strip --strip-all "$staging/usr/bin/twinbox-probe"

install -m 0755 /bin/busybox "$staging/bin/busybox"
# Applet links at their usual places (bin/ls, usr/bin/awk, sbin/ifconfig); never replace
# what is already there (sbin/init is ours).
while read -r applet; do
  [[ -z $applet || $applet == bin/busybox ]] && continue
  target=$staging/$applet
  mkdir -p "$(dirname "$target")"
  [[ -e $target || -L $target ]] || ln -s /bin/busybox "$target"
done < <(/bin/busybox --list-full | LC_ALL=C sort)

# The kernel opens /dev/console for PID 1 before init can mount devtmpfs.
mknod -m 0600 "$staging/dev/console" c 5 1
mknod -m 0666 "$staging/dev/null" c 1 3

cat >"$staging/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$staging/etc/group" <<'EOF'
root:x:0:
tty:x:5:
nogroup:x:65534:
EOF
echo twinbox >"$staging/etc/hostname"
cat >"$staging/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1	localhost
EOF
chmod 0644 "$staging"/etc/{passwd,group,hostname,hosts}

# ---- benchmark tools ---------------------------------------------------------------------
# copy_with_libs BIN: copies BIN and every shared library `ldd` resolves for it (and the
# ELF interpreter) to the same paths in the image, dereferencing symlinks.
copy_with_libs() {
  local bin=$1 lib
  install -D -m 0755 "$bin" "$staging$bin"
  while read -r lib; do
    [[ -e $staging$lib ]] && continue
    install -D -m 0755 "$(readlink -f "$lib")" "$staging$lib"
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | LC_ALL=C sort -u)
}
for tool in "${TOOLS[@]}"; do
  copy_with_libs "$tool"
done

# ---- image ---------------------------------------------------------------------------------
# Size: content + 20% + 8 MiB for ext4 metadata (inode tables, directories, bitmaps),
# rounded up to a MiB. No free space is needed beyond that: both boxes mount the image
# read-only and write into a tmpfs overlay, so every spare MiB would only cost disk.
content_kib=$(du -s --block-size=1K "$staging" | cut -f1)
size_mib=$(( (content_kib * 12 / 10 + 8 * 1024 + 1023) / 1024 ))
tmp_image=$work/rootfs.ext4
log "making ext4 image: ${size_mib} MiB for $((content_kib / 1024)) MiB of content"
# e2fsprogs 1.47.0 stamps "now" into the superblock and each inode's crtime unless
# E2FSPROGS_FAKE_TIME is set (0 counts as unset, hence 1); SOURCE_DATE_EPOCH is for newer
# versions. Inode ctimes are copied from the staging files, whose ctime `touch` cannot
# set, and reading the staging tree (du, mkfs) moves directory atimes, so a debugfs pass
# zeroes all three times of every inode afterwards.
export E2FSPROGS_FAKE_TIME=1 SOURCE_DATE_EPOCH=1
mkfs.ext4 -q -F \
  -d "$staging" -L "$FS_LABEL" -U "$FS_UUID" -E "hash_seed=$FS_UUID,root_owner=0:0" \
  -O ^has_journal -m 0 -b 4096 "$tmp_image" "${size_mib}M" >&2
(cd "$staging" && find . -printf '%P\n' | LC_ALL=C sort) | while read -r path; do
  for field in ctime atime mtime; do echo "sif \"/$path\" $field 0"; done
done >"$work/ctimes.debugfs"
debugfs -w -f "$work/ctimes.debugfs" "$tmp_image" >/dev/null 2>"$work/debugfs.log" || {
  cat "$work/debugfs.log" >&2
  echo "rootfs/build.sh: resetting inode ctimes with debugfs failed" >&2
  exit 1
}
if grep -v '^debugfs ' "$work/debugfs.log" | grep -q .; then
  cat "$work/debugfs.log" >&2
  echo "rootfs/build.sh: debugfs reported errors while resetting ctimes" >&2
  exit 1
fi
if ! fsck_log=$(e2fsck -fn "$tmp_image" 2>&1); then
  echo "$fsck_log" >&2
  echo "rootfs/build.sh: the new image fails e2fsck" >&2
  exit 1
fi
chmod 0444 "$tmp_image"

# Publish atomically: the keyed directory appears complete or not at all.
publish=$work/publish
mkdir "$publish"
mv "$tmp_image" "$publish/rootfs.ext4"
install -m 0755 "$staging/usr/bin/twinbox-microbench" "$publish/twinbox-microbench"
sha256sum "$publish/rootfs.ext4" | cut -d' ' -f1 >"$publish/rootfs.ext4.sha256"
rm -rf "$out_dir"
mv -T "$publish" "$out_dir"
point_current
# Keep the three newest images (one a box may still have open, one to compare against);
# each is ~110 MiB. Deleting an image a running box has open is harmless on Linux.
(cd "$cache/rootfs" && ls -1dt -- */ | sed 's|/$||' | { grep -E '^[0-9a-f]{16}$' || true; } | tail -n +4 |
  while read -r old; do rm -rf -- "$old"; done)
log "built in $(echo "$(date +%s.%N) - $started" | bc) s, sha256 $(cat "$out_dir/rootfs.ext4.sha256")"
echo "$image"
