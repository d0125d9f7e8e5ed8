#!/usr/bin/env bash
# Boot benchmark of twinbox's microVM, in the lab (QEMU TCG + kvm-amd; see lab/run), since
# a Linux guest cannot reach user space on this project's PVM hosts (docs/vm-on-pvm.md).
#
#   vmm/benches/boot-lab.sh [RUNS] [TWINBOX_BINARY]     (defaults: 20, target/release/twinbox)
#
# TWINBOX_VMM_SECCOMP (kill, log, off), when set, is passed to the runs in the lab, to
# compare the VMM with and without its seccomp filters.
#
# Each run is `twinbox vm run --json -- /bin/true`; from its host-stamped timeline we take
# spawn→init_started (boot to init), spawn→workload_exited, spawn→torn_down (whole run),
# and the VMM's peak RSS without guest RAM. Prints every run, then median, min, max and
# the interquartile range per metric. Lab numbers are TCG numbers: compare VMs with each
# other there, not with hardware.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-20}
bin=${2:-$here/target/release/twinbox}
[[ -x $bin ]] || { echo "boot-lab.sh: $bin missing — cargo build --release -p twinbox" >&2; exit 125; }

script='
'"${TWINBOX_VMM_SECCOMP:+export TWINBOX_VMM_SECCOMP=$TWINBOX_VMM_SECCOMP}"'
ms() { echo $(( ($2 - $1) / 1000000 )); }
for i in $(seq '"$runs"'); do
  twinbox vm run --json -- /bin/true > /tmp/r.json 2> /tmp/r.err || { echo "RUN-FAILED $i: $(cat /tmp/r.err)"; continue; }
  get() { awk -v p="\"$1\"" '"'"'$0 ~ "\"phase\": " p {getline; gsub(/[^0-9]/, ""); print}'"'"' /tmp/r.json; }
  rss=$(awk '"'"'/runtime_peak_rss_kib/ {gsub(/[^0-9]/, ""); print}'"'"' /tmp/r.json)
  touched=$(awk '"'"'/guest_memory_touched_kib/ {gsub(/[^0-9]/, ""); print}'"'"' /tmp/r.json)
  s=$(get spawn); echo "RUN $i init_ms=$(ms $s $(get init_started)) exit_ms=$(ms $s $(get workload_exited)) total_ms=$(ms $s $(get torn_down)) sandbox_ms=$(ms $s $(get sandbox_ready)) teardown_ms=$(ms $(get workload_exited) $(get torn_down)) vmm_rss_kib=$rss guest_touched_kib=$touched"
done'

out=$("$here/lab/run" --bin "$bin" --file "$bin:/usr/local/bin/twinbox" --artifacts \
      --timeout $((60 + runs * 20)) -- "$script" | tr -d '\r')
grep -E '^(RUN|RUN-FAILED) ' <<<"$out"
echo
printf '%-18s %8s %8s %8s %8s %8s\n' metric median min max p25 p75
for metric in init_ms exit_ms total_ms sandbox_ms teardown_ms vmm_rss_kib guest_touched_kib; do
  grep -oE "^RUN .*" <<<"$out" | grep -oE "$metric=[0-9]+" | cut -d= -f2 | sort -n |
    awk -v m="$metric" '{v[NR]=$1} END {
      if (NR == 0) { print m ": no data"; exit }
      printf "%-18s %8d %8d %8d %8d %8d\n", m, v[int((NR+1)/2)], v[1], v[NR], v[int((NR+3)/4)], v[int((3*NR+1)/4)]
    }'
done
