# part2-lm.sh - guest side of realguest part 2: a Debian sid guest (nvme-cli 2.16 with the `nvme lm`
# live-migration plugin) drives vmig's primary controller (PF, host-only socket) and migrates the state of
# a secondary controller (VF) by CNTLID, per TP4159 (Host Managed Live Migration). run.sh prepends lib.sh.
#
# Env: VF_CNTLID (default: the first secondary controller in `nvme list-secondary`), CDQ_DWORDS (CDQ size),
#   STATE_DWORDS (how much controller state to read), CHECKS (only these).
# Commands used (nvme-cli 2.16, plugins/lm; see docs/realguest.md):
#   nvme lm create-cdq DEV --cntlid=ID --size=DWORDS --queue-type=0 --consent   -> "CDQID=0x...."
#   nvme lm track-send DEV --sel=0 --cdqid=CDQID --start|--stop                 (Log User Data Changes)
#   nvme lm migration-send DEV --sel=0 --cntlid=ID --stype=1                     (Suspend)
#   nvme lm migration-send DEV --sel=1 --cntlid=ID                               (Resume)
#   nvme lm migration-recv DEV --sel=0 --cntlid=ID --numd=N [--output-file=F]    (Get Controller State)
#   nvme lm delete-cdq DEV --cdqid=CDQID
CDQ_DWORDS=${CDQ_DWORDS:-1024}; STATE_DWORDS=${STATE_DWORDS:-1023}
echo "realguest part 2: kernel $(uname -r), $(nvme version 2>/dev/null | tr '\n' ' ')"

c_enumerate() {
  lspci -nn
  find_nvme
  case $? in
    1) why "no PCI function with class code 0x010802 (NVMe I/O controller) on the PF socket"; return 1;;
    2) why "$BDF has class 0x010802 but no nvme controller node"; return 1;;
  esac
  wait_live 30 || { why "PF controller $CTRL never became live"; return 1; }
  echo "BDF=$BDF CTRL=$CTRL NS=${NS:-none}"
}

c_lm_plugin() {
  nvme lm help > /tmp/lmhelp 2>&1; cat /tmp/lmhelp
  for c in create-cdq delete-cdq track-send migration-send migration-recv; do
    grep -q "$c" /tmp/lmhelp || { why "this nvme-cli has no 'nvme lm $c' (needs nvme-cli >= 2.16 with the lm plugin)"; return 1; }
  done
}

c_hmlms() {
  nvme id-ctrl "$CDEV" > /tmp/idc || { why "nvme id-ctrl on the PF failed"; return 1; }
  nvme id-ctrl "$CDEV" -H | sed -n '/^oacs/,/^acl/p'
  local oacs; oacs=$(idv oacs /tmp/idc)
  # TP4159: Identify Controller OACS bit 11 = Host Managed Live Migration Support (HMLMS).
  [ $(( oacs >> 11 & 1 )) = 1 ] || { why "OACS=$oacs: bit 11 (HMLMS) not set on the primary controller"; return 1; }
  echo "OACS=$oacs HMLMS=1 CNTLID=$(idv cntlid /tmp/idc)"
}

c_secondary() {
  nvme list-secondary "$CDEV" > /tmp/sec 2>&1; local rc=$?
  cat /tmp/sec
  [ $rc = 0 ] || { why "nvme list-secondary (Identify CNS 15h) failed"; return 1; }
  if [ -z "${VF_CNTLID:-}" ]; then
    VF_CNTLID=$(sed -n 's/.*SCID *: *\(0x[0-9a-fA-F]*\|[0-9][0-9]*\).*/\1/p' /tmp/sec | head -n1)
  fi
  [ -n "${VF_CNTLID:-}" ] || { why "no secondary controller listed; cannot pick a VF CNTLID"; return 1; }
  VF_CNTLID=$((VF_CNTLID)); echo "VF CNTLID=$VF_CNTLID"
}

CDQID=
c_create_cdq() {
  nvme lm create-cdq "$CDEV" --cntlid="$VF_CNTLID" --size="$CDQ_DWORDS" --queue-type=0 --consent > /tmp/cdq 2>&1
  local rc=$?; cat /tmp/cdq
  [ $rc = 0 ] || { why "Create CDQ (Controller Data Queue, TP4159) for CNTLID $VF_CNTLID failed: $(tail -n1 /tmp/cdq)"; return 1; }
  CDQID=$(sed -n 's/.*CDQID=\(0x[0-9a-fA-F]*\).*/\1/p' /tmp/cdq)
  [ -n "$CDQID" ] || { why "Create CDQ succeeded but printed no CDQID"; return 1; }
}

lm() {   # lm WHAT ARGS... : run an nvme lm subcommand, keep its output for why()
  nvme lm "$@" > /tmp/lm.out 2>&1; local rc=$?
  cat /tmp/lm.out; return $rc
}

c_track_start() {
  lm track-send "$CDEV" --sel=0 --cdqid="$CDQID" --start \
    || { why "Track Send (Log User Data Changes, start) on CDQ $CDQID failed: $(tail -n1 /tmp/lm.out)"; return 1; }
}

state_suspended() {   # reads CDW0 bit 0 (CSUP, controller suspended) from migration-recv's output
  local cdw0; cdw0=$(sed -n 's/^CDW0: \(0x[0-9a-fA-F]*\).*/\1/p' /tmp/lm.out | head -n1)
  [ -n "$cdw0" ] && [ $(( cdw0 & 1 )) = 1 ]
}

c_suspend() {
  lm migration-send "$CDEV" --sel=0 --cntlid="$VF_CNTLID" --stype=1 \
    || { why "Migration Send Suspend (SEL 0h, STYPE 1h) of CNTLID $VF_CNTLID failed: $(tail -n1 /tmp/lm.out)"; return 1; }
}

c_get_state() {
  lm migration-recv "$CDEV" --sel=0 --cntlid="$VF_CNTLID" --numd="$STATE_DWORDS" --output-file=/tmp/state.bin \
    || { why "Migration Receive Get Controller State of CNTLID $VF_CNTLID failed: $(tail -n1 /tmp/lm.out)"; return 1; }
  state_suspended || { why "Get Controller State: CDW0 bit 0 (CSUP) is not set right after Suspend: $(head -n1 /tmp/lm.out)"; return 1; }
  local n; n=$(stat -c %s /tmp/state.bin 2>/dev/null || echo 0)
  [ "$n" -gt 0 ] || { why "no controller state data returned"; return 1; }
  od -A d -t x4 /tmp/state.bin | head -n 8
  lm migration-recv "$CDEV" --sel=0 --cntlid="$VF_CNTLID" --numd="$STATE_DWORDS" --human-readable | head -n 60
  # The controller state's header carries the sizes of what follows (TP4159 Controller State data structure):
  # a state that is all zeroes would be a device that reports nothing.
  [ -n "$(tr -d '\0' < /tmp/state.bin | head -c1)" ] || { why "controller state data is all zeroes"; return 1; }
}

c_resume() {
  lm migration-send "$CDEV" --sel=1 --cntlid="$VF_CNTLID" \
    || { why "Migration Send Resume (SEL 1h) of CNTLID $VF_CNTLID failed: $(tail -n1 /tmp/lm.out)"; return 1; }
  lm migration-recv "$CDEV" --sel=0 --cntlid="$VF_CNTLID" --numd=16 --output-file=/tmp/state2.bin
  if state_suspended; then why "CDW0 bit 0 (CSUP) still set after Resume"; return 1; fi
  return 0
}

c_track_stop() {
  lm track-send "$CDEV" --sel=0 --cdqid="$CDQID" --stop \
    || { why "Track Send (stop logging) on CDQ $CDQID failed: $(tail -n1 /tmp/lm.out)"; return 1; }
}

c_delete_cdq() {
  lm delete-cdq "$CDEV" --cdqid="$CDQID" || { why "Delete CDQ $CDQID failed: $(tail -n1 /tmp/lm.out)"; return 1; }
}

c_bad_cntlid() {   # a CNTLID that names no secondary controller must be refused, not acted on
  if lm migration-send "$CDEV" --sel=0 --cntlid=65534 --stype=1; then
    why "Migration Send Suspend of nonexistent CNTLID 0xfffe succeeded"; return 1
  fi
  grep -qiE 'NVMe status|Invalid|status' /tmp/lm.out || { why "refused, but without an NVMe status: $(tail -n1 /tmp/lm.out)"; return 1; }
}

run enumerate c_enumerate
REQUIRES=enumerate
run lm-plugin c_lm_plugin
run hmlms c_hmlms
run list-secondary c_secondary
REQUIRES="enumerate lm-plugin list-secondary"
run create-cdq c_create_cdq
REQUIRES="enumerate lm-plugin list-secondary create-cdq"
run track-send-start c_track_start
REQUIRES="enumerate lm-plugin list-secondary"
run migration-send-suspend c_suspend
REQUIRES="enumerate lm-plugin list-secondary migration-send-suspend"
run migration-recv-state c_get_state
run migration-send-resume c_resume
REQUIRES="enumerate lm-plugin list-secondary create-cdq"
run track-send-stop c_track_stop
run delete-cdq c_delete_cdq
REQUIRES="enumerate lm-plugin"
run bad-cntlid-refused c_bad_cntlid
rg_summary
