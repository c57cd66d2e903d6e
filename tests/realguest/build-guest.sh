#!/bin/bash
# build-guest.sh - copy of shared/tools/realguest/build-guest.sh with one change (vmig realguest suite):
#   Debian sid's linux-image-amd64 now pulls dracut (a linux-initramfs-tool) through debootstrap's resolver,
#   and dracut conflicts with initramfs-tools from --include, so the original fails on SUITE=sid with
#   "conflicting packages - not installing initramfs-tools" (sid's linux-image depends on
#   "dracut | initramfs-tools", and debootstrap takes the first alternative; --exclude does not stop that).
#   So for SUITE != bookworm initramfs-tools is left out of --include: the guest gets dracut, no Debian
#   initrd is made (only the fallback initrd-debian.img is lost; run-guest.sh boots the busybox initrd).
#   HARNESS_DIR points at the original (for guest-files/).
# Original header:
# build-guest.sh - build the realguest guest:
#   Debian $SUITE (default bookworm; sid gives nvme-cli with the lm plugin) minbase + linux-image-amd64 + nvme-cli + fio + pciutils (+ util-linux, kmod,
#   busybox, procps), custom PID 1 (/sbin/rg-init), then under ${RG:-${TMPDIR:-/tmp}/realguest}/image:
#     rootfs.img         ext4 image made with mke2fs -d (attached read-only-ish: snapshot=on)
#     vmlinux            uncompressed kernel (PVH ELF entry; boots ~3 s faster than bzImage under TCG)
#     vmlinuz            the Debian bzImage (fallback: RG_KERNEL=${RG:-${TMPDIR:-/tmp}/realguest}/image/vmlinuz)
#     initrd.img         tiny uncompressed initramfs (busybox + virtio/ext4 modules + mini-init)
#     initrd-debian.img  Debian initramfs-tools initrd, MODULES=list (fallback via RG_INITRD=...)
# Re-runnable: debootstrap is skipped if guest-root already has fio.
set -euo pipefail
T=${RG:-${TMPDIR:-/tmp}/realguest}
HERE=${HARNESS_DIR:?set HARNESS_DIR to shared/tools/realguest}
mkdir -p "$T"
G=${GUEST_ROOT:-$T/guest-root}
IMGDIR=${IMAGE_DIR:-$T/image}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
INITRAMFS_PKG=${INITRAMFS_PKG-$(if [ "$SUITE" = bookworm ]; then echo initramfs-tools,; fi)}
cd $T
t0=$(date +%s)
if [ ! -x $G/usr/bin/fio ]; then
  debootstrap --variant=minbase \
    --include=${INITRAMFS_PKG}linux-image-amd64,nvme-cli,fio,pciutils,util-linux,kmod,busybox,procps \
    $SUITE $G $MIRROR
fi
t1=$(date +%s)
KVER=$(cd $G/lib/modules && ls | sort -V | tail -1)
install -m 0755 $HERE/guest-files/rg-init $G/sbin/rg-init
install -m 0755 $HERE/guest-files/rg-wait $G/usr/local/bin/rg-wait
echo realguest > $G/etc/hostname
# q35's built-in ICH9 SATA/SMBus/LPC are not needed: skip their drivers during cold-plug (saves boot time).
printf 'blacklist ahci\nblacklist i2c_i801\nblacklist lpc_ich\n' > $G/etc/modprobe.d/realguest.conf

# (a) Debian initramfs-tools initrd, only what is needed to mount /dev/vda (fallback).
if [ -f $G/etc/initramfs-tools/initramfs.conf ]; then
  sed -i 's/^MODULES=.*/MODULES=list/' $G/etc/initramfs-tools/initramfs.conf
  printf 'virtio_pci\nvirtio_blk\next4\n' > $G/etc/initramfs-tools/modules
  unshare -m --propagation private bash -c "
    mount -t proc proc $G/proc; mount --bind /sys $G/sys; mount --bind /dev $G/dev
    chroot $G /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin update-initramfs -u -k $KVER
  "
else
  echo "note: no initramfs-tools in the guest; only the busybox initramfs is built"
fi
rm -f $G/boot/*.dpkg-bak $G/boot/*.new
rm -rf $G/var/cache/apt/archives/*.deb $G/var/lib/apt/lists/*_Packages $G/var/cache/apt/*.bin
mkdir -p $IMGDIR
cp $G/boot/vmlinuz-$KVER $IMGDIR/vmlinuz
[ -f $G/boot/initrd.img-$KVER ] && cp $G/boot/initrd.img-$KVER $IMGDIR/initrd-debian.img || true

# (b) Uncompressed vmlinux out of the bzImage (xz, zstd or gzip payload). QEMU boots it via its PVH note,
#     about 3 s faster than the bzImage under the software CPU. Without it, run-guest.sh boots vmlinuz.
rm -f $IMGDIR/vmlinux
python3 - "$IMGDIR/vmlinuz" "$IMGDIR/vmlinux.payload" <<'PY' > $IMGDIR/vmlinux.kind || true
import sys
d = open(sys.argv[1], 'rb').read()
for kind, magic in (("xz", b'\xfd7zXZ\x00'), ("zstd", b'\x28\xb5\x2f\xfd'), ("gzip", b'\x1f\x8b\x08')):
    i = d.find(magic)
    if i > 0:
        open(sys.argv[2], 'wb').write(d[i:]); print(kind); break
PY
case "$(cat $IMGDIR/vmlinux.kind 2>/dev/null)" in
  xz)   xz -dc --single-stream $IMGDIR/vmlinux.payload > $IMGDIR/vmlinux 2>/dev/null || true ;;
  zstd) command -v zstd >/dev/null || apt-get install -y -q zstd >/dev/null
        zstd -dcq $IMGDIR/vmlinux.payload > $IMGDIR/vmlinux 2>/dev/null || true ;;
  gzip) gzip -dc $IMGDIR/vmlinux.payload > $IMGDIR/vmlinux 2>/dev/null || true ;;
esac
rm -f $IMGDIR/vmlinux.payload $IMGDIR/vmlinux.kind
if [ -s $IMGDIR/vmlinux ] && readelf -n $IMGDIR/vmlinux 2>/dev/null | grep -q 'Unknown note type: (0x00000012)'; then
  echo "vmlinux with PVH entry: ok"
else
  rm -f $IMGDIR/vmlinux; echo "note: no PVH vmlinux; run-guest.sh will boot vmlinuz"
fi

# (c) Tiny initramfs: busybox + libc + virtio_pci/virtio_blk/ext4 (+deps) + mini-init.
MK=$(mktemp -d /tmp/rg-initramfs.XXXXXX)
mkdir -p $MK/bin $MK/dev $MK/proc $MK/sys $MK/root $MK/lib/x86_64-linux-gnu $MK/lib64
cp $G/usr/bin/busybox $MK/bin/
for a in sh mount umount insmod sleep cat switch_root poweroff; do ln -s busybox $MK/bin/$a; done
for l in $(chroot $G ldd /usr/bin/busybox | grep -o '/lib[^ ]*'); do cp -L $G$l $MK$l; done
# Newer kernels build some of these in, or drop crc32c_generic: ask for each one, keep what is a module.
for m in virtio_pci virtio_blk ext4 crc32c_generic; do
  chroot $G modprobe -S $KVER --show-depends $m 2>/dev/null || true
done | awk '/^insmod/ && !seen[$2]++ {print $2}' > $MK/modules.order
while read -r m; do mkdir -p $MK$(dirname $m); cp $G$m $MK$m; done < $MK/modules.order
install -m 0755 $HERE/guest-files/mini-init $MK/init
(cd $MK && find . | cpio -o -H newc --quiet) > $IMGDIR/initrd.img
rm -rf $MK
t2=$(date +%s)

rm -f $IMGDIR/rootfs.img
mke2fs -q -t ext4 -L rgroot -E root_owner=0:0 -d $G $IMGDIR/rootfs.img 2G
t3=$(date +%s)
echo "debootstrap: $((t1-t0))s  configure+initrds+vmlinux: $((t2-t1))s  mke2fs: $((t3-t2))s"
ls -la $IMGDIR; du -sh $IMGDIR/rootfs.img
