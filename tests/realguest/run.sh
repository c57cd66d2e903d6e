#!/bin/bash
# run.sh - realguest suite: real Linux (its nvme driver, nvme-cli, fio) drives an NVMe controller.
#
# Usage: tests/realguest/run.sh [--target vmig|qemu-nvme] [--part 1|2|all] [--out DIR] [--checks "a b"]
#                               [--build-only] [--build-timeout SECONDS]
#   --target vmig       (default) start `vmig host`, boot the guest with --vfio-user on the VF socket (part 1)
#                       and, for part 2, a Debian sid guest on the PF's host-only socket
#   --target qemu-nvme  the same guest scripts against QEMU's own NVMe controller (checks the suite itself;
#                       the part-1 host-side check reads QEMU's backing file; part 2 gets an SR-IOV capable
#                       QEMU NVMe PF with 2 VFs, which has no HMLMS: the lm checks are expected to fail there)
#   --part              1 = VF suite (bookworm guest), 2 = PF live-migration suite (sid guest), all = both
#   --checks            run only these guest checks (names as printed), e.g. --checks "enumerate fio-4k"
#   --build-only        build or reuse the harness, then stop
# Environment: RG (bookworm harness cache, default /tmp/realguest), RG_SID (sid guest, default /tmp/realguest-sid),
#   RG_HARNESS (the harness scripts), VMIG (command that runs vmig), OUT (results dir, under /tmp).
# Output: per check "PASS|FAIL|SKIP name", a line "realguest partN (...): N passed, N failed, N skipped",
#   and $OUT/results.txt (one "VERDICT part/name reason" per line, read by ci.sh).
# Exit status: 0 all checks passed (skips allowed), 1 a check failed, 77 SKIPPED (harness cannot be built
#   here, e.g. Debian's archive is unreachable, or vmig host is not there yet), 2 usage error.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
EXIT_SKIP=77

# ---------------------------------------------------------------- knobs the lead may need to adjust
VMIG=${VMIG:-}                          # empty: build src/Vmig.Cli (Release) and run its vmig.dll with dotnet
HOST_IMPL=${HOST_IMPL:-vmig}            # vmig = `vmig host`; standin = tests/realguest/host (the project's
                                        # NvmeSubsystem in PCI functions), until `vmig host` serves NVMe
NS_SIZE=${NS_SIZE:-256M}                # namespace file size (sparse); the guest layout needs >= 192 MiB
NS_FILE_BASE=0                          # byte offset of namespace LBA 0 inside the namespace file
VF_SOCK_NAME=nvme0-vf0.sock             # socket of secondary controller (VF) 0, in the host's run dir
PF_SOCK_NAME=nvme0-pf.sock              # host-only socket of the primary controller (PF)
HOST_START_TIMEOUT=${HOST_START_TIMEOUT:-120}   # seconds for vmig host to listen (includes JIT start-up)
# The device host's configuration. $1 = config file, $2 = run dir (sockets), $3 = namespace file.
write_host_config() {
  # vmig host's HostConfig (src/Vmig.Cli/Host/HostConfig.cs; unknown members are rejected): sockets are
  # runtimeDir/<nvme name>-pf.sock and runtimeDir/<nvme name>-vf<i>.sock.
  cat > "$1" <<EOF
{
  "name": "realguest",
  "runtimeDir": "$2",
  "nvme": [
    {
      "name": "nvme0",
      "namespaces": [ { "path": "$3", "lbaSize": 512 } ],
      "vfs": 1,
      "queuesPerVf": 4,
      "vectorsPerVf": 4${PCI_IDS_JSON:-}
    }
  ]
}
EOF
}
# Extra nvme members, e.g. PCI_IDS_JSON=', "pfDeviceId": "10f0", "vfDeviceId": "10f1"' (stand-in only: vmig host
# rejects unknown members).
vmig_host_cmd() { echo "$VMIG host --config $1"; }   # $1 = config file
# ----------------------------------------------------------------------------------------------------

TARGET=vmig PART=1 OUT=${OUT:-} CHECKS= BUILD_ONLY=0 BUILD_TIMEOUT=${BUILD_TIMEOUT:-1200}
while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET=$2; shift 2;;
    --part) PART=$2; shift 2;;
    --out) OUT=$2; shift 2;;
    --checks) CHECKS=$2; shift 2;;
    --build-only) BUILD_ONLY=1; shift;;
    --build-timeout) BUILD_TIMEOUT=$2; shift 2;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
case "$TARGET" in vmig|qemu-nvme) ;; *) echo "run.sh: bad --target $TARGET" >&2; exit 2;; esac
case "$PART" in 1|2|all) ;; *) echo "run.sh: bad --part $PART" >&2; exit 2;; esac

RG=${RG:-/tmp/realguest}
RG_SID=${RG_SID:-/tmp/realguest-sid}
OUT=${OUT:-/tmp/realguest-out/$(date -u +%Y%m%dT%H%M%S)-$$}
mkdir -p "$OUT"; : > "$OUT/results.txt"
case "$OUT" in /tmp/*) ;; *) echo "run.sh: --out must be under /tmp (the QEMU chroot sees only /tmp)" >&2; exit 2;; esac

say() { echo "[realguest $(date -u +%T)] $*"; }
result() {   # result VERDICT NAME [REASON]
  printf '%s %s%s\n' "$1" "$2" "${3:+ $3}" >> "$OUT/results.txt"
  if [ "$1" = PASS ]; then printf '%-4s %s%s\n' "$1" "$2" "${3:+ $3}"; else printf '%-4s %s%s\n' "$1" "$2" "${3:+  -- $3}"; fi
}
skip_all() {   # the whole suite cannot run here: say so loudly, never pass silently
  echo "SKIPPED: $*"
  result SKIP "realguest" "$*"
  exit $EXIT_SKIP
}

# ---------------------------------------------------------------- harness: build or reuse
find_harness() {
  local c
  for c in "${RG_HARNESS:-}" "$REPO/../shared/tools/realguest" "$REPO/../../shared/tools/realguest" \
           /work/shared/tools/realguest; do
    [ -n "$c" ] && [ -x "$c/run-guest.sh" ] && { (cd "$c" && pwd); return 0; }
  done
  return 1
}
HARNESS=$(find_harness) || skip_all "realguest harness (shared/tools/realguest) not found; set RG_HARNESS"

# The mirror the harness uses (its own default unless MIRROR is set), for the reachability probe.
MIRROR=${MIRROR:-$(sed -n 's/^MIRROR=\${MIRROR:-\(.*\)}$/\1/p' "$HARNESS/build-guest.sh" | head -n1)}
archive_reachable() {   # $1 = suite
  local url="$MIRROR/dists/$1/InRelease"
  if command -v wget >/dev/null; then wget -q -T 20 -t 2 -O /dev/null "$url"
  elif command -v curl >/dev/null; then curl -fsS -m 40 -o /dev/null "$url"
  else python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20).read(1)' "$url"
  fi
}
# Our copy of build-guest.sh (sid fix) + the harness's guest files decide whether a cached image is current.
stamp_of() { cat "$HERE/build-guest.sh" "$HARNESS"/guest-files/* | sha256sum | cut -c1-16; }

# build_step LOGNAME DESCRIPTION SUITE CMD... : run one harness build under the remaining time budget.
BUILD_DEADLINE=$(( $(date +%s) + BUILD_TIMEOUT ))
build_step() {
  local log="$OUT/build-$1.log" what=$2 suite=$3; shift 3
  local left=$(( BUILD_DEADLINE - $(date +%s) ))
  [ $left -gt 10 ] || { echo "FAIL: no build time left for $what (budget ${BUILD_TIMEOUT}s)"; return 1; }
  say "building $what (log $log, at most ${left}s)"
  local t0=$(date +%s) rc
  timeout -k 10 $left "$@" > "$log" 2>&1; rc=$?
  say "$what: rc=$rc in $(( $(date +%s) - t0 ))s"
  [ $rc = 0 ] && return 0
  tail -n 15 "$log"
  if ! archive_reachable "$suite"; then
    skip_all "Debian's archive ($MIRROR) is unreachable; cannot build the realguest harness ($what)"
  fi
  [ $rc = 124 ] && echo "FAIL: building $what exceeded the time budget"
  return 1
}

# Host tools the harness scripts use (a fresh machine may lack some): command -> Debian package.
ensure_host_tools() {
  local missing=() c pkg
  for c in debootstrap:debootstrap cpio:cpio bc:bc readelf:binutils xz:xz-utils zstd:zstd mke2fs:e2fsprogs \
           wget:wget unshare:util-linux; do
    command -v "${c%%:*}" >/dev/null || missing+=("${c#*:}")
  done
  [ ${#missing[@]} = 0 ] && return 0
  say "installing host tools: ${missing[*]}"
  apt-get install -y -q "${missing[@]}" > "$OUT/build-apt.log" 2>&1 && return 0
  apt-get update -q >> "$OUT/build-apt.log" 2>&1
  apt-get install -y -q "${missing[@]}" >> "$OUT/build-apt.log" 2>&1 && return 0
  tail -n 5 "$OUT/build-apt.log"
  skip_all "cannot install ${missing[*]} with apt-get (package archive unreachable?)"
}

# ensure_qemu: the QEMU 11.1 chroot in $RG/sid-root (shared by both guests).
ensure_qemu() {
  if [ ! -x "$RG/sid-root/usr/bin/qemu-system-x86_64" ]; then
    ensure_host_tools
    archive_reachable sid || skip_all "Debian's archive ($MIRROR) is unreachable; no cached harness in $RG"
    rm -rf "$RG/sid-root"
    build_step sid-qemu "QEMU 11.1 chroot ($RG/sid-root)" sid env RG="$RG" "$HARNESS/setup-sid-qemu.sh" \
      || { rm -rf "$RG/sid-root"; return 1; }
  fi
}

# ensure_guest CACHE SUITE: the guest image in CACHE/image (rebuilt when the stamp changed).
ensure_guest() {
  local cache=$1 suite=$2 stamp
  stamp=$(stamp_of)
  if [ ! -r "$cache/image/rootfs.img" ] || [ "$(cat "$cache/.rg-stamp" 2>/dev/null)" != "$stamp" ]; then
    ensure_host_tools
    [ -x "$cache/guest-root/usr/bin/fio" ] || {
      archive_reachable "$suite" || skip_all "Debian's archive ($MIRROR) is unreachable; no cached $suite guest in $cache"
      rm -rf "$cache/guest-root"; }
    build_step "guest-$suite" "$suite guest image ($cache)" "$suite" \
      env RG="$cache" SID_ROOT="$RG/sid-root" SUITE="$suite" HARNESS_DIR="$HARNESS" "$HERE/build-guest.sh" \
      || { [ -x "$cache/guest-root/usr/bin/fio" ] || rm -rf "$cache/guest-root"; return 1; }
    echo "$stamp" > "$cache/.rg-stamp"
  fi
}

[ "$(id -u)" = 0 ] || skip_all "needs root (debootstrap, chroot, mount namespaces); run as root"
mkdir -p "$RG" "$RG_SID"
exec 9>"$RG.lock"; flock 9   # one build at a time per machine
ensure_host_tools
NEED_SID=0; { [ "$PART" = 2 ] || [ "$PART" = all ]; } && NEED_SID=1
NEED_BOOKWORM=0; { [ "$PART" = 1 ] || [ "$PART" = all ]; } && NEED_BOOKWORM=1
T_BUILD0=$(date +%s)
ensure_qemu || { result FAIL harness "building the QEMU chroot failed (see $OUT/build-sid-qemu.log)"; exit 1; }
# The two guests are independent (mostly download + dpkg): build them side by side. A skip_all inside the
# background job has already printed and recorded SKIPPED; its status 77 is passed on.
SID_JOB=
if [ $NEED_SID = 1 ]; then
  if [ $NEED_BOOKWORM = 1 ]; then ( ensure_guest "$RG_SID" sid ) & SID_JOB=$!
  else ensure_guest "$RG_SID" sid || { result FAIL harness "building the sid guest failed (see $OUT/build-*.log)"; exit 1; }
  fi
fi
if [ $NEED_BOOKWORM = 1 ]; then
  ensure_guest "$RG" bookworm || { [ -n "$SID_JOB" ] && wait "$SID_JOB"
    result FAIL harness "building the bookworm guest failed (see $OUT/build-*.log)"; exit 1; }
fi
if [ -n "$SID_JOB" ]; then
  wait "$SID_JOB"; rc=$?
  [ $rc = $EXIT_SKIP ] && exit $EXIT_SKIP
  [ $rc = 0 ] || { result FAIL harness "building the sid guest failed (see $OUT/build-*.log)"; exit 1; }
fi
flock -u 9
say "harness ready in $(( $(date +%s) - T_BUILD0 ))s ($("$HARNESS/sid-chroot.sh" qemu-system-x86_64 --version 2>/dev/null | head -n1))"
[ $BUILD_ONLY = 1 ] && exit 0

# ---------------------------------------------------------------- diagnostics
# Print what a CI reader needs to see why a guest check failed: the check's own console section and
# the kernel's nvme/PCI messages from the serial log.
explain_failures() {   # $1 = console log, $2 = part tag
  local log=$1 n
  for n in $(awk -v p="$2/" '$1=="FAIL" && index($2,p)==1 {print substr($2, length(p)+1)}' "$OUT/results.txt"); do
    echo "----- $2/$n: guest console for this check"
    tr -d '\r' < "$log" | awk -v n="$n" '$0 ~ "^=== BEGIN "n"( |$)" {on=1} on {print} $0 ~ "^=== END "n" " {on=0}' | tail -n 60
  done
  echo "----- $2: kernel messages about NVMe / PCI / MSI from the serial console ($log)"
  tr -d '\r' < "$log" | grep -aE '^\[ *[0-9]+\.[0-9]+\] .*(nvme|NVMe|vfio|msi|MSI|pci 0000:00:0[2-9]|AER|I/O error|timeout)' | grep -av 'ommand line' | awk '!seen[$0]++' | tail -n 80
  [ -n "${HOST_LOG:-}" ] && [ -s "$HOST_LOG" ] && { echo "----- $2: vmig host log ($HOST_LOG), last lines"; tail -n 40 "$HOST_LOG"; }
  [ "$(wc -l < "$log.qemu")" -gt 1 ] && { echo "----- $2: QEMU stderr ($log.qemu)"; tail -n +2 "$log.qemu" | tail -n 20; }
  return 0
}

# collect PART_TAG LOG GUEST_RC: turn the guest's RG_CHECK markers into results.
collect() {
  local tag=$1 log=$2 grc=$3 line v rest name reason seen=0
  while IFS= read -r line; do
    line=${line%$'\r'}
    case "$line" in "RG_CHECK "*) ;; *) continue;; esac
    set -- $line; v=$2; rest=${line#RG_CHECK $v }
    name=${rest%%[: ]*}; reason=${rest#"$name"}; reason=${reason#:}; reason=${reason# }
    result "$v" "$tag/$name" "$reason"; seen=$((seen+1))
  done < <(tr -d '\r' < "$log.status" | grep -a '^RG_CHECK ')
  if ! grep -aq 'RG_GUEST_DONE' "$log.status"; then
    case $grc in
      124) result FAIL "$tag/guest-run" "guest timed out after $seen check(s)";;
      125) result FAIL "$tag/guest-run" "VM failed to start or died (QEMU: $(tail -n1 "$log.qemu" 2>/dev/null))";;
      2)   result FAIL "$tag/guest-run" "run-guest.sh refused: $(grep -m1 '^run-guest:' "$OUT/$tag-run-guest.err")";;
      *)   result FAIL "$tag/guest-run" "guest script ended early (exit $grc) after $seen check(s)";;
    esac
    echo "----- $tag: last console lines"; tr -d '\r' < "$log" | tail -n 40
  fi
}

summarize() {   # $1 = part tag, $2 = description
  local p f s
  p=$(grep -c "^PASS $1/" "$OUT/results.txt"); f=$(grep -c "^FAIL $1/" "$OUT/results.txt"); s=$(grep -c "^SKIP $1/" "$OUT/results.txt")
  echo "realguest $1 ($2): $p passed, $f failed, $s skipped"
}

# ---------------------------------------------------------------- vmig host
HOST_PID=
stop_host() {
  [ -n "$HOST_PID" ] || return 0
  if kill -0 "$HOST_PID" 2>/dev/null; then
    kill -TERM "$HOST_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$HOST_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$HOST_PID" 2>/dev/null && { say "vmig host ignored SIGTERM for 10 s; killing it"; kill -KILL "$HOST_PID"; }
  fi
  wait "$HOST_PID" 2>/dev/null; HOST_RC=$?
  HOST_PID=
}
# run-guest.sh runs in its own session, in the background, so that a TERM (ci.sh's budget) interrupts `wait`
# at once and takes QEMU down with it; then the EXIT trap stops vmig host.
GUEST_PGID=
guest_run() {   # guest_run STDERR_FILE RUN-GUEST-ARGS...
  local err=$1; shift
  setsid "$HARNESS/run-guest.sh" "$@" 2> "$err" &
  GUEST_PGID=$!
  wait "$GUEST_PGID"; local rc=$?
  GUEST_PGID=
  return $rc
}
on_exit() {
  # GNU timeout (inside run-guest.sh) moves QEMU into a process group of its own, but it stays in our session.
  [ -n "$GUEST_PGID" ] && kill -TERM $(ps -eo pid=,sid= | awk -v s="$GUEST_PGID" '$2==s {print $1}') 2>/dev/null
  stop_host
}
trap on_exit EXIT
trap 'echo "run.sh: interrupted"; exit 143' TERM INT

resolve_vmig() {
  [ -n "$VMIG" ] && return 0
  command -v dotnet >/dev/null || return 1
  if [ "$HOST_IMPL" = standin ]; then
    local sdll="$HERE/host/bin/Release/net10.0/Vmig.RealguestHost.dll"
    say "building the stand-in host (tests/realguest/host, Release)"
    dotnet build "$HERE/host" -c Release -nologo -clp:ErrorsOnly > "$OUT/build-standin.log" 2>&1 \
      || { tail -n 20 "$OUT/build-standin.log"; return 1; }
    VMIG="dotnet $sdll"; return 0
  fi
  local dll="$REPO/src/Vmig.Cli/bin/Release/net10.0/vmig.dll"
  if [ ! -f "$dll" ] || [ -n "$(find "$REPO/src" -name '*.cs' -newer "$dll" -print -quit)" ]; then
    say "building src/Vmig.Cli (Release)"
    dotnet build "$REPO/src/Vmig.Cli" -c Release -nologo -clp:ErrorsOnly > "$OUT/build-vmig.log" 2>&1 \
      || { tail -n 20 "$OUT/build-vmig.log"; return 1; }
  fi
  VMIG="dotnet $dll"
}

listening() { awk -v p="$1" '$4=="00010000" && $8==p {f=1} END {exit !f}' /proc/net/unix; }

start_host() {   # sets HOST_PID; RUNDIR, NS_FILE, HOST_LOG
  RUNDIR=$OUT/host-run; NS_FILE=$OUT/ns0.img; HOST_LOG=$OUT/vmig-host.log
  mkdir -p "$RUNDIR"; rm -f "$NS_FILE"; truncate -s "$NS_SIZE" "$NS_FILE"
  write_host_config "$OUT/host.json" "$RUNDIR" "$NS_FILE"
  local cmd; cmd=$(vmig_host_cmd "$OUT/host.json")
  say "starting: $cmd"
  $cmd > "$HOST_LOG" 2>&1 &
  HOST_PID=$!
  local want=("$RUNDIR/$VF_SOCK_NAME"); [ $NEED_SID = 1 ] && want+=("$RUNDIR/$PF_SOCK_NAME")
  local t s ok
  for ((t=0; t<HOST_START_TIMEOUT*10; t++)); do
    kill -0 "$HOST_PID" 2>/dev/null || { wait "$HOST_PID"; HOST_RC=$?; HOST_PID=
      echo "vmig host exited (rc=$HOST_RC) before listening:"; tail -n 30 "$HOST_LOG"; return 1; }
    ok=1; for s in "${want[@]}"; do [ -S "$s" ] && listening "$s" || ok=0; done
    [ $ok = 1 ] && { say "vmig host listening after $((t/10)).$((t%10))s: ${want[*]}"; return 0; }
    sleep 0.1
  done
  echo "vmig host did not listen on ${want[*]} within ${HOST_START_TIMEOUT}s:"; ls -la "$RUNDIR"; tail -n 30 "$HOST_LOG"
  return 1
}

# ---------------------------------------------------------------- host-side namespace check
RUN_ID=$(date -u +%s)-$$
PATTERNS="0:4096 1060864:65536 50327552:1048576"
pattern() { yes "vmig-realguest $RUN_ID off=$1 " | head -c "$2"; }
check_ns_file() {   # $1 = part tag, $2 = namespace file
  local tag=$1 f=$2 p off len bad= d
  case "$(awk -v n="$tag/pattern-write" '$2==n {print $1}' "$OUT/results.txt")" in
    PASS) ;;
    "") if [ -n "$CHECKS" ] && [[ " $CHECKS " != *" pattern-write "* ]]; then
          result SKIP "$tag/host-ns-file" "pattern-write not selected (--checks)"
        else result FAIL "$tag/host-ns-file" "blocked: the guest never ran pattern-write"; fi
        return;;
    *) result FAIL "$tag/host-ns-file" "blocked: pattern-write did not pass in the guest"; return;;
  esac
  [ -r "$f" ] || { result FAIL "$tag/host-ns-file" "namespace file $f not readable"; return; }
  for p in $PATTERNS; do
    off=${p%%:*} len=${p#*:}
    d=$(cmp <(dd if="$f" bs=64k skip=$((NS_FILE_BASE + off)) count="$len" iflag=skip_bytes,count_bytes status=none) \
            <(pattern "$off" "$len") 2>&1)
    if [ -n "$d" ]; then
      bad="$bad byte $off (LBA $((off/512)) at 512 B) first differs at +$(( $(sed -n 's/.*differ: byte \([0-9]*\).*/\1/p' <<<"$d") - 1 ));"
      echo "----- $tag/host-ns-file: namespace file at byte $((NS_FILE_BASE + off)): found vs expected"
      dd if="$f" bs=64k skip=$((NS_FILE_BASE + off)) count=64 iflag=skip_bytes,count_bytes status=none | od -A d -c | head -n 4
      pattern "$off" 64 | od -A d -c | head -n 4
    fi
  done
  if [ -z "$bad" ]; then result PASS "$tag/host-ns-file"
  else result FAIL "$tag/host-ns-file" "guest-written patterns not in the namespace file at:$bad"; fi
}

# ---------------------------------------------------------------- parts
guest_script() {   # $1 = guest part script -> path of lib.sh + script
  local s="$OUT/guest-$(basename "$1")"
  cat "$HERE/guest/lib.sh" "$1" > "$s"; echo "$s"
}

run_part1() {
  local tag=part1 log="$OUT/part1-console.log" args=() desc grc
  if [ "$TARGET" = vmig ]; then
    desc="vmig VF over vfio-user, bookworm $(ls "$RG/guest-root/lib/modules" 2>/dev/null | sort -V | tail -n1)"
    args=(--vfio-user "$RUNDIR/$VF_SOCK_NAME" --vfio-user-opt x-msg-timeout=30000)
  else
    desc="QEMU's own NVMe, bookworm"
    args=(--qemu-nvme --qemu-nvme-size 1G --keep)
  fi
  say "part 1: booting the guest ($desc)"
  local t0=$(date +%s)
  RG=$RG guest_run "$OUT/part1-run-guest.err" "${args[@]}" --script "$(guest_script "$HERE/guest/part1-vf.sh")" \
    --env RUN_ID="$RUN_ID" --env PATTERNS="$PATTERNS" --env CHECKS="$CHECKS" \
    --log "$log" --timeout "${PART1_TIMEOUT:-900}"
  grc=$?
  cat "$OUT/part1-run-guest.err"
  say "part 1: guest finished in $(( $(date +%s) - t0 ))s (script exit $grc)"
  collect $tag "$log" $grc
  if [ "$TARGET" = vmig ]; then
    # The guest has powered off; vmig host keeps running (part 2 may follow). Its writes reach the file with
    # pwrite, so they are visible here now; a host that only buffers them in memory fails this check.
    kill -0 "$HOST_PID" 2>/dev/null || { result FAIL "$tag/vmig-host-alive" "vmig host died during the guest run"; tail -n 30 "$HOST_LOG"; }
    check_ns_file $tag "$NS_FILE"
  else
    local scratch; scratch=$(sed -n 's/^run-guest: scratch kept in //p' "$OUT/part1-run-guest.err")
    if [ -n "$scratch" ] && [ -f "$scratch/qemu-nvme.img" ]; then
      check_ns_file $tag "$scratch/qemu-nvme.img"; rm -rf "$scratch"
    else
      result SKIP "$tag/host-ns-file" "QEMU's backing file was not kept"
    fi
  fi
  grep -q "^FAIL $tag/" "$OUT/results.txt" && explain_failures "$log" $tag
  summarize $tag "$desc"
}

run_part2() {
  local tag=part2 log="$OUT/part2-console.log" grc desc args=()
  local kver; kver=$(ls "$RG_SID/guest-root/lib/modules" 2>/dev/null | sort -V | tail -n1)
  if [ "$TARGET" = vmig ]; then
    # The PF (host-only socket) and, second, the VF: the guest's nvme driver owns the VF while nvme-cli
    # suspends and resumes it through the PF, so the suspend is observed by a real driver.
    desc="vmig PF host-only socket + VF, sid $kver"
    args=(--vfio-user "$RUNDIR/$PF_SOCK_NAME")
    [ "${PART2_ATTACH_VF:-1}" = 1 ] && args+=(--vfio-user "$RUNDIR/$VF_SOCK_NAME")
    args+=(--vfio-user-opt x-msg-timeout=30000)
  else
    # QEMU's NVMe checks its SR-IOV parameters: vq_flexible >= 2*max_vfs, vi_flexible >= max_vfs,
    # max_ioqpairs - vq_flexible >= 2, msix_qsize - vi_flexible >= 2.
    desc="QEMU's own NVMe PF with SR-IOV, sid $kver"
    truncate -s 256M "$OUT/qemu-sriov-ns.img"
    args=(--qemu-arg -drive --qemu-arg "file=$OUT/qemu-sriov-ns.img,if=none,id=rgns0,format=raw"
          --qemu-arg -device --qemu-arg nvme-subsys,id=rgsub0 --qemu-arg -device
          --qemu-arg nvme,serial=RGQEMUPF01,subsys=rgsub0,sriov_max_vfs=2,sriov_vq_flexible=4,sriov_vi_flexible=2,max_ioqpairs=6,msix_qsize=4
          --qemu-arg -device --qemu-arg nvme-ns,drive=rgns0,nsid=1,shared=on
          --env QEMU_SRIOV=1)
  fi
  say "part 2: booting the sid guest ($desc)"
  local t0=$(date +%s)
  local sid_root=$RG/sid-root
  RG=$RG_SID SID_ROOT=$sid_root guest_run "$OUT/part2-run-guest.err" "${args[@]}" \
    --script "$(guest_script "$HERE/guest/part2-lm.sh")" \
    --append nvme_core.multipath=N \
    --env CHECKS="$CHECKS" --log "$log" --timeout "${PART2_TIMEOUT:-600}"
  grc=$?
  cat "$OUT/part2-run-guest.err"
  say "part 2: guest finished in $(( $(date +%s) - t0 ))s (script exit $grc)"
  collect $tag "$log" $grc
  grep -q "^FAIL $tag/" "$OUT/results.txt" && explain_failures "$log" $tag
  summarize $tag "$desc"
}

if [ "$TARGET" = vmig ]; then
  command -v dotnet >/dev/null || [ -n "$VMIG" ] || skip_all "no dotnet SDK on this machine and VMIG not set"
  resolve_vmig || { result FAIL "host/build" "building the device host failed (see $OUT/build-*.log)"; exit 1; }
  if [ "$HOST_IMPL" != standin ]; then
    $VMIG host --help > "$OUT/vmig-host-help.txt" 2>&1
    grep -q -- '--config' "$OUT/vmig-host-help.txt" \
      || skip_all "'vmig host --config' is not available yet ($(head -n1 "$OUT/vmig-host-help.txt"))"
  fi
  start_host || { result FAIL "host/start" "vmig host did not start listening (log $HOST_LOG)"; exit 1; }
fi
# One vmig host serves both parts. Part 1 first, on a VF no client has used yet; part 2 then attaches the
# PF and (again) the VF, so with --part all the VF socket must accept a second client after the first left.
[ $NEED_BOOKWORM = 1 ] && run_part1
[ $NEED_SID = 1 ] && run_part2
if [ "$TARGET" = vmig ]; then
  stop_host
  if [ "${HOST_RC:-0}" = 0 ] || [ "${HOST_RC:-0}" = 143 ]; then result PASS "host/vmig-host-exit" "(rc ${HOST_RC:-0})"
  else result FAIL "host/vmig-host-exit" "vmig host exited with ${HOST_RC} on SIGTERM"; tail -n 30 "$HOST_LOG"; fi
fi

echo "results: $OUT/results.txt"
grep -q '^FAIL ' "$OUT/results.txt" && exit 1
exit 0
