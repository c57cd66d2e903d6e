#!/bin/bash
# ci.sh - CI hook for the realguest suite (for .ci/run; the lead decides whether to call it).
# Builds or reuses the harness (cached outside the repo in $RG / $RG_SID), runs tests/realguest/run.sh
# against vmig within a total time budget, and prints one line:
#     realguest: N passed, N failed, N skipped
# Env: REALGUEST_BUDGET (seconds for everything, default 480), REALGUEST_PARTS (1, 2 or all; default all),
#      REALGUEST_TARGET (vmig or qemu-nvme; default vmig), PART1_TIMEOUT / PART2_TIMEOUT (guest limits, 240/180 s),
#      and run.sh's: RG, RG_SID, VMIG, HOST_IMPL (standin = tests/realguest/host instead of `vmig host`).
# Exit status: 0 nothing failed (a skip is printed with its reason, never hidden), 1 something failed or the
# budget ran out.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BUDGET=${REALGUEST_BUDGET:-480}
PARTS=${REALGUEST_PARTS:-all}
TARGET=${REALGUEST_TARGET:-vmig}
[ "$TARGET" = qemu-nvme ] && PARTS=1
OUT=/tmp/realguest-out/ci-$(date -u +%Y%m%dT%H%M%S)-$$
mkdir -p "$OUT"
t0=$(date +%s)
# Leave the guests at least ~3 minutes of the budget; the rest may go to building the harness. A healthy guest run
# takes about a minute per part; a device that hangs Linux's probe is cut off by these per-part limits.
build_budget=$(( BUDGET > 240 ? BUDGET - 180 : 60 ))
export PART1_TIMEOUT=${PART1_TIMEOUT:-240} PART2_TIMEOUT=${PART2_TIMEOUT:-180}
timeout -k 15 "$BUDGET" "$HERE/run.sh" --target "$TARGET" --part "$PARTS" --out "$OUT" \
  --build-timeout "$build_budget" 2>&1 | sed -u 's/^/  /'
rc=${PIPESTATUS[0]}
res="$OUT/results.txt"
p=$(grep -c '^PASS ' "$res" 2>/dev/null); f=$(grep -c '^FAIL ' "$res" 2>/dev/null); s=$(grep -c '^SKIP ' "$res" 2>/dev/null)
p=${p:-0} f=${f:-0} s=${s:-0}
case $rc in
  0) ;;
  77) [ "$s" -gt 0 ] || s=1
      echo "realguest SKIPPED: $(sed -n 's/^SKIP realguest //p' "$res" | head -n1)";;
  124|137) f=$((f+1)); echo "realguest: budget of ${BUDGET}s exhausted (results so far in $res)";;
  *) [ "$f" -gt 0 ] || f=1;;
esac
echo "realguest: wall $(( $(date +%s) - t0 ))s, results in $OUT"
echo "realguest: $p passed, $f failed, $s skipped"
[ "$f" = 0 ]
