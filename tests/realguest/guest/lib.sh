#!/bin/bash
# lib.sh - helpers shared by the realguest guest scripts. run.sh concatenates this file in front of
# a guest script (the harness hands the guest exactly one script through fw_cfg).
#
# Result protocol (parsed by run.sh from the status port ttyS1, also printed on the console):
#   RG_CHECK PASS <name>
#   RG_CHECK FAIL <name>: <reason>
#   RG_CHECK SKIP <name>: <reason>
# Each check's own output is framed on the console by "=== BEGIN <name>" / "=== END <name> <verdict>",
# so run.sh can show the output of exactly the checks that failed.
set -u
export LC_ALL=C
RG_FAILED=0
declare -A RG_VERDICT=()

rg_status() {   # a marker line on the console and on the status port (clean of kernel messages)
  echo "$*"
  if [ -c /dev/ttyS1 ]; then stty -F /dev/ttyS1 raw -echo 2>/dev/null; echo "$*" > /dev/ttyS1; fi
}

# check NAME FUNCTION [ARGS...]: run FUNCTION; its exit status is the verdict (0 pass, 77 skip, else fail).
# The function explains a failure or a skip by writing one line to $RG_WHY.
# A check listed in REQUIRES (space separated) that did not pass makes this one fail as blocked, not run:
# a blocked check is counted as failed so that a dead device can never look like a mostly-green run.
RG_WHY=/tmp/rg-why
REQUIRES=
check() {
  local name=$1; shift
  local dep
  for dep in $REQUIRES; do
    if [ "${RG_VERDICT[$dep]:-}" != PASS ]; then
      RG_VERDICT[$name]=FAIL; RG_FAILED=$((RG_FAILED+1))
      rg_status "RG_CHECK FAIL $name: blocked: $dep did not pass"
      return 1
    fi
  done
  : > "$RG_WHY"
  echo; echo "=== BEGIN $name  (uptime $(cut -d' ' -f1 /proc/uptime))"
  local t0 rc why
  t0=$(date +%s.%N)
  "$@"; rc=$?
  why=$(head -n1 "$RG_WHY" 2>/dev/null)
  local dt; dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  if [ $rc = 0 ]; then
    RG_VERDICT[$name]=PASS; echo "=== END $name PASS (${dt}s)"; rg_status "RG_CHECK PASS $name (${dt}s)"
  elif [ $rc = 77 ]; then
    RG_VERDICT[$name]=SKIP; echo "=== END $name SKIP"; rg_status "RG_CHECK SKIP $name: ${why:-no reason given}"
  else
    RG_VERDICT[$name]=FAIL; RG_FAILED=$((RG_FAILED+1))
    echo "=== END $name FAIL (rc=$rc, ${dt}s)"
    echo "--- kernel messages since this check began:"; dmesg --since "@${t0%.*}" 2>/dev/null | tail -n 40 \
      || dmesg | tail -n 40
    rg_status "RG_CHECK FAIL $name: ${why:-exit status $rc}"
  fi
  return 0
}
why() { echo "$*" > "$RG_WHY"; echo "WHY: $*"; }

# The NVMe controller under test: the one PCI function with class 0x010802 (NVM Express I/O controller).
# Sets BDF, CTRL (nvmeN), CDEV (/dev/nvmeN), NS (/dev/nvmeNn1 or first namespace), LBA (logical block size).
find_nvme() {
  BDF= CTRL= CDEV= NS= LBA=
  local d
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class" 2>/dev/null)" = 0x010802 ] && { BDF=$(basename "$d"); break; }
  done
  [ -n "$BDF" ] || return 1
  local c
  for c in /sys/bus/pci/devices/$BDF/nvme/nvme*; do [ -e "$c" ] && CTRL=$(basename "$c"); done
  [ -n "$CTRL" ] || return 2
  CDEV=/dev/$CTRL
  # The guest has exactly one NVMe controller (its root disk is virtio). With native multipath the
  # block device is the subsystem head nvmeSnY; the per-path nvmeXcZnY node is hidden: skip it.
  local b
  for b in /sys/block/nvme*n*; do
    [ -e "$b" ] || continue
    case "$(basename "$b")" in *c*n*) continue;; esac
    NS=/dev/$(basename "$b"); break
  done
  [ -n "$NS" ] && LBA=$(cat /sys/block/$(basename "$NS")/queue/logical_block_size)
  return 0
}

# wait_live [SECONDS] [any]: wait until /sys/class/nvme/$CTRL/state is "live" and (unless "any") the
# namespace block device exists. A PF may have no namespace attached: part 2 passes "any".
wait_live() {
  local t=${1:-30} any=${2:-} i s
  for ((i=0; i<t*10; i++)); do
    find_nvme >/dev/null 2>&1
    s=$(cat /sys/class/nvme/${CTRL:-none}/state 2>/dev/null)
    [ "$s" = live ] && { [ -n "$any" ] || { [ -n "$NS" ] && [ -b "$NS" ]; }; } && return 0
    sleep 0.1
  done
  echo "wait_live: ctrl=${CTRL:-?} state=${s:-?} ns=${NS:-?} after ${t}s"
  return 1
}

# Small verified I/O: write 1 MiB of random data at byte offset $1 with O_DIRECT, read it back, compare.
io_probe() {
  local off=${1:-$((8<<20))} src=/tmp/rg-probe.src dst=/tmp/rg-probe.dst
  head -c $((1<<20)) /dev/urandom > $src
  dd if=$src of="$NS" bs=64k seek=$((off/65536)) count=16 oflag=direct conv=notrunc,fsync status=none \
    || { why "write of 1 MiB at byte $off failed"; return 1; }
  dd if="$NS" of=$dst bs=64k skip=$((off/65536)) count=16 iflag=direct status=none \
    || { why "read of 1 MiB at byte $off failed"; return 1; }
  cmp -s $src $dst || { why "read-back of 1 MiB at byte $off differs from what was written"; cmp $src $dst | head -n1; return 1; }
  echo "io_probe: 1 MiB at byte $off written, read back, identical"
}

# run NAME FUNCTION: a check, unless CHECKS (space separated names) is set and does not list it.
want() { [ -z "${CHECKS:-}" ] || [[ " $CHECKS " == *" $1 "* ]]; }
run() { want "$1" && check "$@"; }

# idv KEY FILE: a field of nvme-cli's "key : value" output (id-ctrl, id-ns), e.g. idv sqes /tmp/idc -> 0x66.
idv() { awk -v k="$1" -F: '{gsub(/ /,"",$1)} $1==k {gsub(/^ +| +$/,"",$2); print $2; exit}' "$2"; }

rg_summary() {
  echo
  echo "=== dmesg (nvme, vfio, pci errors)"
  dmesg | grep -aiE 'nvme|msi|AER|pcieport|timeout|I/O error|blk_update_request' | tail -n 60
  rg_status "RG_GUEST_DONE failed=$RG_FAILED"
  [ $RG_FAILED = 0 ]
}
