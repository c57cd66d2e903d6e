# part1-vf.sh - guest side of realguest part 1: Linux's nvme driver, nvme-cli and fio against one NVMe
# controller (a vmig VF over vfio-user, or QEMU's own NVMe for comparison). run.sh prepends lib.sh.
#
# Env (run-guest.sh --env): RUN_ID (pattern tag, must match the host's), PATTERNS ("OFF:LEN ..." bytes),
#   FIO4K_SIZE / FIO128K_SIZE (bytes of I/O per job), FIO_JOBS, FIO_QD, CHECKS (only these, space separated).
# Namespace layout used (bytes): patterns at PATTERNS (default 0, 1 MiB+12 KiB, 48 MiB-4 KiB); probe I/O at
# 8 MiB; discard test at 16 MiB; fio 4k at 64 MiB (FIO_JOBS regions of FIO4K_SIZE); fio 128k right after.
RUN_ID=${RUN_ID:-norun}
PATTERNS=${PATTERNS:-"0:4096 1060864:65536 50327552:1048576"}
FIO4K_SIZE=${FIO4K_SIZE:-8M}; FIO128K_SIZE=${FIO128K_SIZE:-32M}
FIO_JOBS=${FIO_JOBS:-2}; FIO_QD=${FIO_QD:-32}
echo "realguest part 1: kernel $(uname -r), nvme-cli $(nvme version 2>/dev/null | head -n1), $(fio --version)"

bytes() { numfmt --from=iec "$1"; }   # 8M -> 8388608

c_enumerate() {
  lspci -nn
  find_nvme
  case $? in
    1) why "no PCI function with class code 0x010802 (NVMe I/O controller)"; return 1;;
    2) local d; d=$(readlink /sys/bus/pci/devices/$BDF/driver 2>/dev/null)
       why "$BDF has class 0x010802 but no nvme controller node (driver=${d:-none})"; return 1;;
  esac
  lspci -nn -vv -s "$BDF"
  local drv; drv=$(basename "$(readlink -f /sys/bus/pci/devices/$BDF/driver)")
  [ "$drv" = nvme ] || { why "driver bound to $BDF is '$drv', not nvme"; return 1; }
  wait_live 30 || { why "controller $CTRL never became live (state $(cat /sys/class/nvme/$CTRL/state))"; return 1; }
  echo "BDF=$BDF CTRL=$CTRL NS=$NS LBA=$LBA size=$(blockdev --getsize64 "$NS")"
}

c_msix() {
  local n; n=$(ls /sys/bus/pci/devices/$BDF/msi_irqs 2>/dev/null | wc -l)
  lspci -vv -s "$BDF" | grep -E 'MSI-X|MSI:'
  grep -E "${CTRL}q" /proc/interrupts
  lspci -vv -s "$BDF" | grep -q 'MSI-X: Enable+' || { why "MSI-X capability not enabled by the driver (lspci: $(lspci -vv -s $BDF | grep -o 'MSI-X: [^ ]*'))"; return 1; }
  [ "$n" -ge 1 ] || { why "no MSI/MSI-X vectors allocated ($BDF/msi_irqs empty)"; return 1; }
  # Admin commands ran during probe: the admin queue's vector must have fired at least once.
  local aq; aq=$(awk -v q="${CTRL}q0" '$NF==q {s=0; for(i=2;i<=NF;i++) if ($i ~ /^[0-9]+$/) s+=$i; print s}' /proc/interrupts)
  [ "${aq:-0}" -gt 0 ] || { why "admin queue vector ${CTRL}q0 never fired (count ${aq:-absent}): completions not signalled through MSI-X"; return 1; }
  echo "vectors=$n admin-queue interrupts=$aq"
}

c_ioqueues() {
  local hw; hw=$(ls /sys/block/$(basename "$NS")/mq/ | wc -l)
  dmesg | grep -E "$CTRL: [0-9]+/[0-9]+/[0-9]+ default/read/poll queues"
  nvme get-feature "$CDEV" -f 7 -H
  local ioq; ioq=$(grep -cE " ${CTRL}q[1-9][0-9]*\$" /proc/interrupts)
  [ "$hw" -ge 1 ] || { why "no blk-mq hardware queues on $NS"; return 1; }
  [ "$ioq" -ge 1 ] || { why "no I/O queue interrupt vectors (${CTRL}q1..) in /proc/interrupts: driver runs without I/O queues"; return 1; }
  echo "blk-mq hw queues=$hw, I/O queue vectors=$ioq"
}

c_nvme_list() {
  nvme list | tee /tmp/list
  grep -q "$NS" /tmp/list || { why "nvme list does not show $NS"; return 1; }
}

c_id_ctrl() {
  nvme id-ctrl "$CDEV" > /tmp/idc || { cat /tmp/idc; why "nvme id-ctrl failed"; return 1; }
  cat /tmp/idc
  local sqes cqes nn sn mn
  sqes=$(idv sqes /tmp/idc); cqes=$(idv cqes /tmp/idc); nn=$(idv nn /tmp/idc)
  sn=$(idv sn /tmp/idc); mn=$(idv mn /tmp/idc)
  # NVMe Base 2.x Identify Controller: SQES/CQES bits 3:0 are the required entry sizes, 2^6=64 and 2^4=16.
  [ $((sqes & 0xf)) = 6 ] || { why "SQES=$sqes: required SQ entry size must be 6 (64 bytes)"; return 1; }
  [ $((cqes & 0xf)) = 4 ] || { why "CQES=$cqes: required CQ entry size must be 4 (16 bytes)"; return 1; }
  [ "$((nn))" -ge 1 ] || { why "NN=$nn: no namespaces"; return 1; }
  [ -n "$sn" ] && [ -n "$mn" ] || { why "empty serial number or model number"; return 1; }
}

c_id_ns() {
  nvme id-ns "$NS" > /tmp/idn || { cat /tmp/idn; why "nvme id-ns failed"; return 1; }
  cat /tmp/idn
  local nsze flbas lbads size
  nsze=$(idv nsze /tmp/idn); flbas=$(idv flbas /tmp/idn)
  # FLBAS bits 3:0 (and 6:5 for >16 formats) pick the in-use LBA format; its LBADS is on the "in use" line.
  lbads=$(grep 'in use' /tmp/idn | sed -n 's/.*lbads:\([0-9]*\).*/\1/p')
  size=$(blockdev --getsize64 "$NS")
  [ "$((nsze))" -gt 0 ] || { why "NSZE=$nsze"; return 1; }
  [ $((1 << lbads)) = "$LBA" ] || { why "in-use LBA format has LBADS=$lbads but the kernel uses $LBA-byte blocks"; return 1; }
  [ $((nsze * LBA)) = "$size" ] || { why "NSZE=$nsze x $LBA bytes != block device size $size"; return 1; }
  echo "nsze=$((nsze)) flbas=$flbas lbads=$lbads -> $size bytes"
}

c_smart_log() {
  nvme smart-log "$CDEV" || { why "nvme smart-log (Get Log Page 02h) failed"; return 1; }
}

c_get_feature() {
  # Mandatory features for an NVMe-over-PCIe I/O controller (NVMe Base 2.x, Feature Identifiers figure):
  # 01h Arbitration, 02h Power Management, 04h Temperature Threshold, 07h Number of Queues,
  # 08h Interrupt Coalescing, 09h Interrupt Vector Configuration, 0Ah Write Atomicity Normal,
  # 0Bh Asynchronous Event Configuration; 06h Volatile Write Cache when VWC.Present.
  local f bad= vwc
  vwc=$(idv vwc /tmp/idc 2>/dev/null)
  local list="1 2 4 7 8 9 0xa 0xb"; [ $(( ${vwc:-0} & 1 )) = 1 ] && list="$list 6"
  for f in $list; do
    echo "--- get-feature $f"
    nvme get-feature "$CDEV" -f "$f" -H || bad="$bad $f"
  done
  [ -z "$bad" ] || { why "Get Features failed for FID(s):$bad"; return 1; }
}

c_error_log() {
  nvme error-log "$CDEV" -e 4 || { why "nvme error-log (Get Log Page 01h) failed"; return 1; }
}

irq_io_count() { awk -v c="$CTRL" '$NF ~ "^"c"q[1-9][0-9]*$" {for(i=2;i<=NF;i++) if ($i ~ /^[0-9]+$/) s+=$i} END {print s+0}' /proc/interrupts; }

run_fio() {   # run_fio NAME BS SIZE_PER_JOB OFFSET
  local name=$1 bs=$2 size=$3 off=$4
  fio --name="$name" --filename="$NS" --ioengine=libaio --direct=1 --rw=randrw --rwmixread=50 --bs="$bs" \
      --size="$size" --offset="$off" --offset_increment="$size" --numjobs="$FIO_JOBS" --iodepth="$FIO_QD" \
      --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting --eta=never > /tmp/fio.out 2>&1
  local rc=$?
  cat /tmp/fio.out
  [ $rc = 0 ] || { why "fio $bs randrw verify=crc32c failed: $(grep -m1 -iE 'verify|error|err=' /tmp/fio.out)"; return 1; }
  grep -qE 'err= *0' /tmp/fio.out || { why "fio reported errors"; return 1; }
}

c_fio_4k() {
  local before after
  before=$(irq_io_count)
  run_fio rand4k 4k "$FIO4K_SIZE" $((64<<20)) || return 1
  after=$(irq_io_count)
  [ "$after" -gt "$before" ] || { why "fio completed but I/O queue vectors did not fire ($before -> $after)"; return 1; }
  echo "I/O queue interrupts: $before -> $after"
}
c_fio_128k() { run_fio rand128k 128k "$FIO128K_SIZE" $(( (64<<20) + FIO_JOBS * $(bytes "$FIO4K_SIZE") )); }

c_discard() {
  local q=/sys/block/$(basename "$NS")/queue max off=$((16<<20)) len=$((1<<20))
  max=$(cat $q/discard_max_bytes)
  echo "discard_max_bytes=$max discard_granularity=$(cat $q/discard_granularity) oncs=$(idv oncs /tmp/idc)"
  [ "$max" -gt 0 ] || { why "kernel offers no discard on $NS (ONCS bit 2 Dataset Management not set?)"; return 1; }
  head -c $len /dev/urandom > /tmp/rg-old
  dd if=/tmp/rg-old of="$NS" bs=64k seek=$((off/65536)) oflag=direct conv=fsync status=none || { why "pre-discard write failed"; return 1; }
  blkdiscard -v -o $off -l $len "$NS" || { why "blkdiscard of $len bytes at $off failed"; return 1; }
  # Deallocate (DSM AD) is advisory: each block must now read either as before or, if the controller did
  # deallocate it, as DLFEAT bits 2:0 say (001b: zeroes; NVM Command Set, Identify Namespace DLFEAT).
  # Anything else is corruption.
  dd if="$NS" of=/tmp/rg-new bs=64k skip=$((off/65536)) count=$((len/65536)) iflag=direct status=none || { why "read after discard failed"; return 1; }
  local dlfeat; dlfeat=$(idv dlfeat /tmp/idn)
  python3 - /tmp/rg-old /tmp/rg-new "$((${dlfeat:-0} & 7))" "$LBA" <<'PY' || { why "after discard some blocks read as neither the old data nor what DLFEAT=${dlfeat:-?} promises"; return 1; }
import sys
old, new, mode, lba = open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read(), int(sys.argv[3]), int(sys.argv[4])
kept = zero = ones = bad = 0
for i in range(0, len(old), lba):
    b = new[i:i+lba]
    if b == old[i:i+lba]: kept += 1
    elif b == bytes(lba) and mode == 1: zero += 1
    elif b == b'\xff' * lba and mode == 2: ones += 1
    elif mode == 0: zero += 1   # DLFEAT 000b: what a deallocated block reads as is not reported
    else: bad += 1
print(f"after discard: {kept} blocks unchanged, {zero} zeroed/unspecified, {ones} all-ones, {bad} wrong")
sys.exit(1 if bad else 0)
PY
}

c_flush() {
  echo "vwc=$(idv vwc /tmp/idc)"
  nvme flush "$NS" || { why "nvme flush (NVM opcode 00h) failed"; return 1; }
  blockdev --flushbufs "$NS" || { why "blockdev --flushbufs failed"; return 1; }
}

pattern() { yes "vmig-realguest $RUN_ID off=$1 " | head -c "$2"; }
c_pattern_write() {
  local p off len
  for p in $PATTERNS; do
    off=${p%%:*} len=${p#*:}
    pattern "$off" "$len" | dd of="$NS" bs=4096 seek=$off oflag=direct,seek_bytes iflag=fullblock conv=notrunc status=none \
      || { why "dd of pattern ($len bytes at byte $off = LBA $((off/LBA))) failed"; return 1; }
    echo "wrote pattern: byte $off (LBA $((off/LBA))), $len bytes"
  done
  nvme flush "$NS" >/dev/null 2>&1; sync
  verify_patterns
}
verify_patterns() {
  local p off len
  for p in $PATTERNS; do
    off=${p%%:*} len=${p#*:}
    cmp -s <(dd if="$NS" bs=4096 skip=$off count=$len iflag=direct,skip_bytes,count_bytes status=none) <(pattern "$off" "$len") \
      || { why "pattern at byte $off (LBA $((off/LBA))) reads back wrong"; return 1; }
  done
  echo "all patterns read back intact"
}

c_nvme_reset() {
  nvme reset "$CDEV" || { why "nvme reset (NVME_IOCTL_RESET: CC.EN 1->0->1) failed"; return 1; }
  wait_live 30 || { why "controller not live again after nvme reset"; return 1; }
  io_probe && verify_patterns
}

c_flr() {
  local d=/sys/bus/pci/devices/$BDF
  echo "reset_method: $(cat $d/reset_method 2>/dev/null)"
  lspci -vv -s "$BDF" | grep -E 'DevCap:|FLReset'
  [ -w $d/reset ] || { why "$BDF has no sysfs reset (no reset method)"; return 1; }
  grep -qw flr $d/reset_method || { why "$BDF does not advertise FLR (PCIe DevCap.FLR), reset_method='$(cat $d/reset_method)'"; return 1; }
  echo flr > $d/reset_method   # force a real FLR, not a bus or PM reset
  local rc=0
  echo 1 > $d/reset || rc=$?
  echo default > $d/reset_method 2>/dev/null
  [ $rc = 0 ] || { why "write to $d/reset failed"; return 1; }
  wait_live 30 || { why "controller not live again after FLR"; return 1; }
  io_probe && verify_patterns
}

c_rebind() {
  echo "$BDF" > /sys/bus/pci/drivers/nvme/unbind || { why "unbind of $BDF from nvme failed"; return 1; }
  sleep 0.5
  [ ! -e /sys/bus/pci/devices/$BDF/driver ] || { why "$BDF still bound after unbind"; return 1; }
  echo "$BDF" > /sys/bus/pci/drivers/nvme/bind || { why "bind of $BDF to nvme failed"; return 1; }
  wait_live 30 || { why "controller not live again after rebind"; return 1; }
  io_probe && verify_patterns
}

c_error_log_after() {   # the driver's resets must not have left error-log entries behind unnoticed
  nvme error-log "$CDEV" -e 4 || { why "nvme error-log failed after resets"; return 1; }
  dmesg | grep -iE "$CTRL.*(timeout|abort|failed|error)" && { why "kernel logged nvme errors: $(dmesg | grep -iE "$CTRL.*(timeout|abort|failed|error)" | head -n1)"; return 1; }
  return 0
}

run enumerate c_enumerate
REQUIRES=enumerate
run msix c_msix
run io-queues c_ioqueues
run nvme-list c_nvme_list
run id-ctrl c_id_ctrl
run id-ns c_id_ns
run smart-log c_smart_log
run get-feature c_get_feature
run error-log c_error_log
run pattern-write c_pattern_write
run fio-4k c_fio_4k
run fio-128k c_fio_128k
run discard c_discard
run flush c_flush
run nvme-reset c_nvme_reset
run flr c_flr
run rebind c_rebind
run patterns-intact verify_patterns
run kernel-clean c_error_log_after
rg_summary
