namespace Vmig.VfioUser.Protocol;

/// <summary>VFIO PCI region and IRQ indices (include/uapi/linux/vfio.h, VFIO_PCI_*_INDEX).</summary>
public static class VfioPci
{
    public const int Bar0RegionIndex = 0;
    public const int Bar5RegionIndex = 5;
    public const int RomRegionIndex = 6;
    public const int ConfigRegionIndex = 7;
    public const int VgaRegionIndex = 8;
    /// <summary>VFIO_PCI_NUM_REGIONS.</summary>
    public const int NumRegions = 9;

    public const int IntxIrqIndex = 0;
    public const int MsiIrqIndex = 1;
    public const int MsixIrqIndex = 2;
    public const int ErrIrqIndex = 3;
    public const int ReqIrqIndex = 4;
    /// <summary>VFIO_PCI_NUM_IRQS.</summary>
    public const int NumIrqs = 5;
}

/// <summary>vfio_region_info.flags.</summary>
[Flags]
public enum RegionFlags : uint
{
    None = 0,
    Read = 1,
    Write = 2,
    Mmap = 4,
    Caps = 8,
}

/// <summary>vfio_irq_info.flags.</summary>
[Flags]
public enum IrqInfoFlags : uint
{
    None = 0,
    Eventfd = 1,
    Maskable = 2,
    AutoMasked = 4,
    NoResize = 8,
}

/// <summary>vfio_device_info.flags.</summary>
[Flags]
public enum DeviceInfoFlags : uint
{
    None = 0,
    Reset = 1,
    Pci = 2,
}
