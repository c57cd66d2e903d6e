namespace Vmig.Migration;

/// <summary>
/// <c>enum vfio_device_mig_state</c> (include/uapi/linux/vfio.h). Numeric values are wire values
/// (MIG_DEVICE_STATE device_state, u32).
/// </summary>
public enum DeviceState : uint
{
    /// <summary>A transition failed and could not roll back. Left only by DEVICE_RESET (→ RUNNING).</summary>
    Error = 0,
    /// <summary>No DMA, no interrupts, no internal state change; config space and MSI-X still answer.</summary>
    Stop = 1,
    /// <summary>Fully operational.</summary>
    Running = 2,
    /// <summary>STOP plus an open save stream read to its end.</summary>
    StopCopy = 3,
    /// <summary>Stopped and taking a new internal state through the data stream.</summary>
    Resuming = 4,
    /// <summary>Running but initiating no peer-to-peer DMA (needs <see cref="MigrationFlags.P2P"/>).</summary>
    RunningP2P = 5,
    /// <summary>Running with an open save stream and internal dirty tracking (needs <see cref="MigrationFlags.PreCopy"/>).</summary>
    PreCopy = 6,
    /// <summary>PRE_COPY plus the P2P quiesce.</summary>
    PreCopyP2P = 7,
}

/// <summary><c>struct vfio_device_feature_migration.flags</c> (u64).</summary>
[Flags]
public enum MigrationFlags : ulong
{
    None = 0,
    /// <summary>VFIO_MIGRATION_STOP_COPY: mandatory; STOP, STOP_COPY and RESUMING exist.</summary>
    StopCopy = 1,
    /// <summary>VFIO_MIGRATION_P2P: RUNNING_P2P (and PRE_COPY_P2P with PRE_COPY) exist.</summary>
    P2P = 2,
    /// <summary>VFIO_MIGRATION_PRE_COPY: PRE_COPY (and PRE_COPY_P2P with P2P) exist.</summary>
    PreCopy = 4,
}
