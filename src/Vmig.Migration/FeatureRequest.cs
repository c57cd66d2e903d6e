namespace Vmig.Migration;

/// <summary>
/// <c>VFIO_DEVICE_FEATURE_*</c> feature numbers, carried in the low 16 bits of <c>vfio_device_feature.flags</c>
/// (include/uapi/linux/vfio.h; reference §2.7).
/// </summary>
public enum DeviceFeature : ushort
{
    PciVfToken = 0,
    /// <summary>GET: u64 migration flags (<see cref="MigrationFlags"/>).</summary>
    Migration = 1,
    /// <summary>GET/SET: u32 device_state, s32 data_fd (-1; unused on vfio-user).</summary>
    MigDeviceState = 2,
    LowPowerEntry = 3,
    LowPowerEntryWithWakeup = 4,
    LowPowerExit = 5,
    /// <summary>SET: u64 page_size, u32 num_ranges, u32 reserved, ranges (a pointer in the kernel, inline in vfio-user).</summary>
    DmaLoggingStart = 6,
    /// <summary>SET, no payload.</summary>
    DmaLoggingStop = 7,
    /// <summary>GET: u64 iova, u64 length, u64 page_size, bitmap (a pointer in the kernel, appended in vfio-user).</summary>
    DmaLoggingReport = 8,
    /// <summary>GET: u64 stop_copy_length. Not in the vfio-user spec; a vmig extension negotiated in VERSION.</summary>
    MigDataSize = 9,
}

/// <summary>The GET/SET operations a feature allows; values are the <c>vfio_device_feature.flags</c> bits.</summary>
[Flags]
public enum FeatureOps : uint
{
    None = 0,
    Get = FeatureRequest.GetFlag,
    Set = FeatureRequest.SetFlag,
}

/// <summary>What a feature the server offers accepts: its operations and the smallest payload (bytes after the 8-byte header).</summary>
public readonly record struct FeatureSupport(FeatureOps Ops, uint MinPayloadSize)
{
    /// <summary>
    /// The kernel core's rules for the features it handles itself (vfio_main.c): MIGRATION GET 8, MIG_DEVICE_STATE
    /// GET|SET 8, DMA_LOGGING_START SET 24 (<c>vfio_device_feature_dma_logging_control</c> with its ranges pointer),
    /// DMA_LOGGING_STOP SET 0, DMA_LOGGING_REPORT GET 32 (with the bitmap pointer), MIG_DATA_SIZE GET 8.
    /// Null for any other feature.
    /// </summary>
    public static FeatureSupport? Kernel(DeviceFeature feature) => feature switch
    {
        DeviceFeature.DmaLoggingStart => new(FeatureOps.Set, 24),
        DeviceFeature.DmaLoggingReport => new(FeatureOps.Get, 32),
        _ => Common(feature),
    };

    /// <summary>
    /// The same rules with vfio-user's inline layouts (reference §3.4, libvfio-user vfio-user.h): DMA_LOGGING_START
    /// SET 16 (page_size, num_ranges, reserved; ranges follow inline), DMA_LOGGING_REPORT GET 24 (iova, length,
    /// page_size; the bitmap is appended). MIG_DATA_SIZE is listed with its kernel layout; the server offers it only
    /// to clients that negotiated the extension. Null for any other feature.
    /// </summary>
    public static FeatureSupport? VfioUser(DeviceFeature feature) => feature switch
    {
        DeviceFeature.DmaLoggingStart => new(FeatureOps.Set, 16),
        DeviceFeature.DmaLoggingReport => new(FeatureOps.Get, 24),
        _ => Common(feature),
    };

    private static FeatureSupport? Common(DeviceFeature feature) => feature switch
    {
        DeviceFeature.Migration => new(FeatureOps.Get, 8),
        DeviceFeature.MigDeviceState => new(FeatureOps.Get | FeatureOps.Set, 8),
        DeviceFeature.DmaLoggingStop => new(FeatureOps.Set, 0),
        DeviceFeature.MigDataSize => new(FeatureOps.Get, 8),
        _ => null,
    };
}

/// <summary>What a validated DEVICE_FEATURE request asks the server to do.</summary>
public enum FeatureAction
{
    /// <summary>Nothing to run: a PROBE that succeeded (reply echoes the request), or the request failed.</summary>
    None,
    Get,
    Set,
}

/// <summary>
/// Validation of a DEVICE_FEATURE request exactly as Linux does it: the header checks of
/// <c>vfio_ioctl_device_feature</c> followed by the driver's <c>vfio_check_feature</c> (reference §2.6).
/// </summary>
public static class FeatureRequest
{
    /// <summary><c>VFIO_DEVICE_FEATURE_MASK</c>: the feature number bits of flags.</summary>
    public const uint IndexMask = 0xFFFF;
    /// <summary><c>VFIO_DEVICE_FEATURE_GET</c> (1 &lt;&lt; 16).</summary>
    public const uint GetFlag = 0x1_0000;
    /// <summary><c>VFIO_DEVICE_FEATURE_SET</c> (1 &lt;&lt; 17).</summary>
    public const uint SetFlag = 0x2_0000;
    /// <summary><c>VFIO_DEVICE_FEATURE_PROBE</c> (1 &lt;&lt; 18).</summary>
    public const uint ProbeFlag = 0x4_0000;
    /// <summary>Size of <c>struct vfio_device_feature</c> without data: u32 argsz, u32 flags.</summary>
    public const uint HeaderSize = 8;

    /// <summary>The feature number in <paramref name="flags"/>.</summary>
    public static DeviceFeature FeatureOf(uint flags) => (DeviceFeature)(flags & IndexMask);

    /// <summary>
    /// Validates a request, in the kernel's order:
    /// argsz &lt; 8 → EINVAL; flag bits outside mask|GET|SET|PROBE → EINVAL; GET and SET together without PROBE →
    /// EINVAL; feature not offered (<paramref name="support"/> null) → ENOTTY; GET or SET named but not supported
    /// by the feature → EINVAL (even with PROBE); PROBE → 0 with <see cref="FeatureAction.None"/> (the payload is
    /// ignored); neither GET nor SET → EINVAL; argsz − 8 below the feature's minimum payload → EINVAL; else 0 with
    /// Get or Set.
    /// </summary>
    /// <param name="argsz">vfio_device_feature.argsz: header plus payload (vfio-user: the largest reply payload the
    /// client accepts; the server checks the message's real length separately).</param>
    /// <param name="flags">vfio_device_feature.flags.</param>
    /// <param name="support">What the server offers for <c>FeatureOf(flags)</c>, or null if it does not offer it
    /// (no migration driver, no logging, unknown number). vfio-pci-core answers unknown features with ENOTTY.</param>
    /// <param name="action">What to run when the result is 0.</param>
    /// <returns>0, 22 (EINVAL) or 25 (ENOTTY).</returns>
    public static int Validate(uint argsz, uint flags, FeatureSupport? support, out FeatureAction action)
    {
        action = FeatureAction.None;
        if (argsz < HeaderSize)
        {
            return Errno.EINVAL;
        }
        if ((flags & ~(IndexMask | GetFlag | SetFlag | ProbeFlag)) != 0)
        {
            return Errno.EINVAL;
        }
        bool probe = (flags & ProbeFlag) != 0;
        uint ops = flags & (GetFlag | SetFlag);
        if (!probe && ops == (GetFlag | SetFlag))
        {
            return Errno.EINVAL;
        }
        if (support is not { } s)
        {
            return Errno.ENOTTY;
        }
        // From here on this is vfio_check_feature(flags, argsz - 8, supported_ops, minsz).
        if ((ops & ~(uint)s.Ops) != 0)
        {
            return Errno.EINVAL;
        }
        if (probe)
        {
            return 0;
        }
        if (ops == 0)
        {
            return Errno.EINVAL;
        }
        if (argsz - HeaderSize < s.MinPayloadSize)
        {
            return Errno.EINVAL;
        }
        action = ops == GetFlag ? FeatureAction.Get : FeatureAction.Set;
        return 0;
    }
}
