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

# The guest sees the PF and, when run.sh attaches it too (vmig target), the VF under test. The PF is the
# controller whose Identify Secondary Controller List is not empty; the VF is the other one.
VF_CTRL= VF_NS= VF_BDF=
c_enumerate() {
  lspci -nn
  local d c ctrls=() fns=()
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class" 2>/dev/null)" = 0x010802 ] || continue
    fns+=("$(basename "$d")")
    for c in "$d"/nvme/nvme*; do [ -e "$c" ] && ctrls+=("$(basename "$c")"); done
  done
  [ ${#ctrls[@]} -ge 1 ] || { why "no NVMe controller (class 0x010802 with the nvme driver) in the guest"; return 1; }
  local i s
  for c in "${ctrls[@]}"; do
    for ((i=0; i<300; i++)); do s=$(cat /sys/class/nvme/$c/state); [ "$s" = live ] && break; sleep 0.1; done
    [ "$s" = live ] || { why "controller $c never became live (state $s)"; return 1; }
    echo "$c: cntlid=$(cat /sys/class/nvme/$c/cntlid) pci=$(basename "$(readlink -f /sys/class/nvme/$c/device)")"
  done
  CTRL=
  for c in "${ctrls[@]}"; do
    n=$(nvme list-secondary /dev/$c 2>/dev/null | awk -F: '/NUMID/ {gsub(/ /,"",$NF); print $NF; exit}')
    [ "$((${n:-0}))" -ge 1 ] && { CTRL=$c; break; }
  done
  [ -n "$CTRL" ] || CTRL=${ctrls[0]}   # no controller lists secondaries: list-secondary will say so
  CDEV=/dev/$CTRL; BDF=$(basename "$(readlink -f /sys/class/nvme/$CTRL/device)")
  for c in "${ctrls[@]}"; do [ "$c" != "$CTRL" ] && VF_CTRL=$c; done
  local f
  for f in "${fns[@]}"; do [ "$f" != "$BDF" ] && VF_BDF=$f; done
  if [ -n "$VF_BDF" ] && [ -z "$VF_CTRL" ]; then
    echo "VF function $VF_BDF has no live nvme controller (driver: $(basename "$(readlink -f /sys/bus/pci/devices/$VF_BDF/driver 2>/dev/null)" 2>/dev/null || echo none)); kernel said:"
    dmesg | grep -a "$VF_BDF\|nvme" | tail -n 5
  fi
  find_vf_ns
  echo "PF: $CTRL ($BDF)  VF: ${VF_BDF:-no second function} ${VF_CTRL:+controller $VF_CTRL} ${VF_NS:+namespace $VF_NS}"
}

find_vf_ns() {
  if [ -n "$VF_CTRL" ]; then
    # run.sh boots with nvme_core.multipath=N, so each controller has its own nvme<ctrl>n<nsid>;
    # the multipath naming is handled in case that changes. The namespace may appear after "live".
    for ((i=0; i<100; i++)); do ls -d /sys/class/nvme/$VF_CTRL/nvme*n* >/dev/null 2>&1 && break; sleep 0.1; done
    local p; p=$(ls -d /sys/class/nvme/$VF_CTRL/nvme*c*n* 2>/dev/null | head -n1)
    if [ -n "$p" ]; then p=$(basename "$p"); VF_NS=/dev/${p%%c*}n${p##*n}
    else VF_NS=$(ls -d /sys/class/nvme/$VF_CTRL/${VF_CTRL}n* 2>/dev/null | head -n1 | sed 's,.*/,/dev/,'); fi
  fi
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
  # nvme-cli prints "SCID      : Secondary Controller Identifier : 0x0001": take the last field.
  local scids= x
  for x in $(awk -F: '$1 ~ /^ *SCID *$/ {gsub(/ /,"",$NF); print $NF}' /tmp/sec); do scids="$scids$((x)) "; done
  echo "secondary controllers (SCID): ${scids:-none}"
  if [ -z "${VF_CNTLID:-}" ] && [ -n "$VF_CTRL" ]; then
    VF_CNTLID=$(cat /sys/class/nvme/$VF_CTRL/cntlid)
    [[ " $scids " == *" $VF_CNTLID "* ]] \
      || { why "the attached VF ($VF_CTRL) has CNTLID $VF_CNTLID, which the PF's secondary controller list ($scids) lacks"; return 1; }
  fi
  [ -n "${VF_CNTLID:-}" ] || VF_CNTLID=${scids%% *}
  [ -n "${VF_CNTLID:-}" ] || { why "no secondary controller listed; cannot pick a VF CNTLID"; return 1; }
  VF_CNTLID=$((VF_CNTLID)); echo "VF CNTLID=$VF_CNTLID"
}

# QEMU resets every vfio-user device when the VM starts (VFIO_USER_DEVICE_RESET). For the PF that is a function-level
# reset, which clears VF Enable in its SR-IOV capability (PCIe SR-IOV: VFs cease to exist) and, in vmig, takes the
# secondaries offline: the VF in this guest then fails its probe ("Device not ready; aborting initialisation").
# This check does what the host's PF driver does after a PF reset: set NumVFs and VF Enable | VF MSE through the PF's
# config space (QEMU hides the SR-IOV capability from the guest but forwards the writes; vmig's PF has it at
# SRIOV_CAP, default 0x100), give the secondary VQ/VI resources and set it online (Virtualization Management), then
# bind the VF to nvme again.
c_pf_enables_vf() {
  [ -n "$VF_BDF" ] || { why "no VF function attached"; return 77; }
  if [ -n "$VF_CTRL" ]; then echo "VF already live as $VF_CTRL: nothing to do"; return 0; fi
  local cap=$(( ${SRIOV_CAP:-0x100} ))
  setpci -s "$BDF" "$(printf '%x' $((cap + 0x10))).w=1" && setpci -s "$BDF" "$(printf '%x' $((cap + 0x08))).w=9" \
    || { why "writing NumVFs / VF Enable to the PF's SR-IOV capability at 0x$(printf %x $cap) failed"; return 1; }
  nvme virt-mgmt "$CDEV" -c "$VF_CNTLID" -r 0 -a 8 -n 5 && nvme virt-mgmt "$CDEV" -c "$VF_CNTLID" -r 1 -a 8 -n 5 \
    && nvme virt-mgmt "$CDEV" -c "$VF_CNTLID" -a 9 \
    || { why "Virtualization Management (assign VQ/VI, online) of CNTLID $VF_CNTLID failed"; return 1; }
  nvme list-secondary "$CDEV" | grep -E 'SCID|SCS' | head -n 2
  echo "$VF_BDF" > /sys/bus/pci/drivers/nvme/bind 2>/dev/null
  local c i
  for ((i=0; i<300; i++)); do
    for c in /sys/bus/pci/devices/$VF_BDF/nvme/nvme*; do [ -e "$c" ] && VF_CTRL=$(basename "$c"); done
    [ -n "$VF_CTRL" ] && [ "$(cat /sys/class/nvme/$VF_CTRL/state 2>/dev/null)" = live ] && break
    sleep 0.1
  done
  [ -n "$VF_CTRL" ] && [ "$(cat /sys/class/nvme/$VF_CTRL/state)" = live ] \
    || { why "VF $VF_BDF did not come up under nvme after VF Enable + online: $(dmesg | grep -a "$VF_BDF\|nvme" | tail -n1)"; return 1; }
  find_vf_ns
  echo "VF $VF_BDF is live as $VF_CTRL ($VF_NS) after the PF re-enabled it"
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

# --- the VF under suspend/resume, seen from its own driver (only when run.sh attached the VF too).
# Reads only while a CDQ exists: nvme-cli's create-cdq hands the controller a buffer that is unpinned when
# the command completes, so a logged user-data change would be written into freed guest memory.
need_vf() {
  [ -n "$VF_CTRL" ] || { why "no VF attached to this guest (run.sh attaches it on the vmig target)"; return 77; }
  rg-wait "$VF_NS" 20 || { why "VF namespace $VF_NS never appeared"; return 1; }
}
VF_PAT=/tmp/vf-pattern VF_OFF=$((32<<20))
c_vf_io() {
  need_vf || return
  [ "$(cat /sys/class/nvme/$VF_CTRL/cntlid)" = "$VF_CNTLID" ] \
    || { why "the attached VF has CNTLID $(cat /sys/class/nvme/$VF_CTRL/cntlid), the PF lists $VF_CNTLID"; return 1; }
  head -c $((64<<10)) /dev/urandom > $VF_PAT
  dd if=$VF_PAT of="$VF_NS" bs=64k seek=$((VF_OFF/65536)) oflag=direct conv=fsync status=none || { why "write to VF failed"; return 1; }
  cmp <(dd if="$VF_NS" bs=64k skip=$((VF_OFF/65536)) count=1 iflag=direct status=none) $VF_PAT \
    || { why "VF read-back differs"; return 1; }
  echo "VF $VF_CTRL ($VF_NS): 64 KiB written at byte $VF_OFF and read back"
}
BG_PID=
c_vf_stalled() {   # TP4159 Suspend: the suspended controller processes no further commands until Resume
  need_vf || return
  VF_KMSG_BASE=$(dmesg | grep -ciE "$VF_CTRL.*(timeout|reset|abort)")
  ( dd if="$VF_NS" of=/tmp/vf-bg bs=64k skip=$((VF_OFF/65536)) count=1 iflag=direct status=none; echo $? > /tmp/vf-bg.rc ) &
  BG_PID=$!
  sleep 3
  if [ -s /tmp/vf-bg.rc ]; then
    why "a read submitted to the suspended VF completed (rc $(cat /tmp/vf-bg.rc)) before Resume"; return 1
  fi
  echo "read on suspended VF still outstanding after 3 s (as it must be)"
}
c_vf_resumed() {
  need_vf || return
  [ -n "$BG_PID" ] || { why "no outstanding read (vf-suspended-stalls-io did not run)"; return 1; }
  local i
  for ((i=0; i<100; i++)); do [ -s /tmp/vf-bg.rc ] && break; sleep 0.1; done
  [ -s /tmp/vf-bg.rc ] || { why "the read outstanding on the VF did not complete within 10 s of Resume"; dmesg | grep -i "$VF_CTRL" | tail -n 5; return 1; }
  [ "$(cat /tmp/vf-bg.rc)" = 0 ] || { why "the read outstanding across Suspend/Resume failed (dd rc $(cat /tmp/vf-bg.rc))"; return 1; }
  cmp -s /tmp/vf-bg $VF_PAT || { why "the read outstanding across Suspend/Resume returned wrong data"; return 1; }
  # Only kernel messages that appeared since the read was submitted count (the VF's failed boot-time probe doesn't).
  local new; new=$(dmesg | grep -iE "$VF_CTRL.*(timeout|reset|abort)" | tail -n +$(( ${VF_KMSG_BASE:-0} + 1 )))
  [ -z "$new" ] || { echo "$new"; why "the kernel timed out or reset the VF around Suspend/Resume: $(echo "$new" | head -n1)"; return 1; }
  echo "outstanding read completed after Resume with the right data; no timeouts"
}

c_bad_cntlid() {   # a CNTLID that names no secondary controller must be refused, not acted on
  if lm migration-send "$CDEV" --sel=0 --cntlid=65534 --stype=1; then
    why "Migration Send Suspend of nonexistent CNTLID 0xfffe succeeded"; return 1
  fi
  grep -qi 'NVMe status' /tmp/lm.out || { why "refused, but without an NVMe status: $(tail -n1 /tmp/lm.out)"; return 1; }
  if grep -qi 'Invalid Command Opcode' /tmp/lm.out; then
    # Refusing the opcode proves nothing about CNTLID checking; with HMLMS set it is itself a bug.
    [ "${RG_VERDICT[hmlms]:-}" = PASS ] && { why "HMLMS is set but Migration Send (opcode 41h) is an invalid opcode"; return 1; }
    why "the controller has no Migration Send at all (no HMLMS): CNTLID checking not testable"; return 77
  fi
}

# Only with --target qemu-nvme: QEMU's SR-IOV NVMe starts with its VFs offline. Give secondary controller 1
# flexible resources, set it online (Virtualization Management, nvme virt-mgmt) and enable one VF, so the
# guest has a PF + VF pair like vmig's (this exercises the VF-side checks against a second implementation).
c_qemu_sriov() {
  find_nvme || { why "no NVMe PF"; return 1; }
  wait_live 30 any || { why "PF not live"; return 1; }
  local d=/sys/bus/pci/devices/$BDF
  echo 0 > $d/sriov_drivers_autoprobe
  echo 1 > $d/sriov_numvfs || { why "enabling 1 VF failed"; return 1; }
  nvme virt-mgmt "$CDEV" -c 1 -r 1 -a 8 -n 1 && nvme virt-mgmt "$CDEV" -c 1 -r 0 -a 8 -n 2 \
    && nvme virt-mgmt "$CDEV" -c 1 -r 0 -a 9 -n 0 || { why "nvme virt-mgmt (assign VI/VQ, online) failed"; return 1; }
  local vf; vf=$(basename "$(readlink -f $d/virtfn0)")
  # With sriov_drivers_autoprobe=0 the PCI core only probes a VF that has a driver_override.
  echo nvme > /sys/bus/pci/devices/$vf/driver_override
  echo "$vf" > /sys/bus/pci/drivers/nvme/bind || { why "bind of VF $vf failed"; return 1; }
  nvme list-secondary "$CDEV" | grep -E 'SCID|SCS'
}
[ "${QEMU_SRIOV:-0}" = 1 ] && run qemu-sriov-prep c_qemu_sriov

run enumerate c_enumerate
REQUIRES=enumerate
run lm-plugin c_lm_plugin
run hmlms c_hmlms
run list-secondary c_secondary
REQUIRES="enumerate lm-plugin list-secondary"
run pf-enables-vf c_pf_enables_vf
run vf-io-before c_vf_io
run create-cdq c_create_cdq
REQUIRES="enumerate lm-plugin list-secondary create-cdq"
run track-send-start c_track_start
REQUIRES="enumerate lm-plugin list-secondary"
run migration-send-suspend c_suspend
REQUIRES="enumerate lm-plugin list-secondary migration-send-suspend"
run vf-suspended-stalls-io c_vf_stalled
run migration-recv-state c_get_state
run migration-send-resume c_resume
run vf-io-resumes c_vf_resumed
REQUIRES="enumerate lm-plugin list-secondary create-cdq"
run track-send-stop c_track_stop
run delete-cdq c_delete_cdq
REQUIRES="enumerate lm-plugin list-secondary"
run vf-io-after c_vf_io
REQUIRES="enumerate lm-plugin"
run bad-cntlid-refused c_bad_cntlid
rg_summary
