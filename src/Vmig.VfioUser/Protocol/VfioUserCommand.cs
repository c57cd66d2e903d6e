namespace Vmig.VfioUser.Protocol;

/// <summary>vfio-user command numbers (qemu docs/interop/vfio-user.rst; libvfio-user include/vfio-user.h).</summary>
public enum VfioUserCommand : ushort
{
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    DeviceGetRegionIoFds = 6,
    DeviceGetIrqInfo = 7,
    DeviceSetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    /// <summary>Removed v1-migration DIRTY_PAGES; never valid.</summary>
    DirtyPagesRemoved = 14,
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
}
