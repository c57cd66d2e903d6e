using Vmig.Migration;
using Vmig.Native;

namespace Vmig.Vmm;

/// <summary>
/// A device function assigned to a VM, as the VMM drives it: the subset of the vfio-user client API the VMM
/// needs (regions, DMA map, MSI-X eventfds, migration state and data, dirty logging). Implemented over a
/// vfio-user client connection by an adapter; tests implement it in-process.
/// </summary>
/// <remarks>Failures throw <see cref="IOException"/> (the vfio-user client's VfioUserException carries the errno).</remarks>
public interface IVmDevice : IDisposable
{
    /// <summary>What the device is, for the handshake's compatibility check.</summary>
    DeviceDescription Description { get; }

    /// <summary>True if <see cref="GetPrecopyInfo"/> is available (negotiated extension).</summary>
    bool SupportsPrecopyInfo { get; }

    /// <summary>True if <see cref="GetStopCopySize"/> is available (MIG_DATA_SIZE).</summary>
    bool SupportsStopCopySize { get; }

    /// <summary>True if the device logs its DMA writes (DMA_LOGGING_START/REPORT).</summary>
    bool SupportsDirtyLogging { get; }

    /// <summary>Number of MSI-X vectors (VFIO_PCI_MSIX_IRQ_INDEX count).</summary>
    int MsixVectorCount { get; }

    /// <summary>Reads region <paramref name="index"/> (0-5 BARs, 7 config) at <paramref name="offset"/>.</summary>
    void ReadRegion(int index, ulong offset, Span<byte> data);

    /// <summary>Writes region <paramref name="index"/> at <paramref name="offset"/>.</summary>
    void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data);

    /// <summary>Maps [<paramref name="iova"/>, +<paramref name="size"/>) read-write for device DMA, backed by <paramref name="fd"/> at <paramref name="fileOffset"/>.</summary>
    void DmaMap(ulong iova, ulong size, UnixFd fd, long fileOffset);

    /// <summary>Unmaps a window mapped by <see cref="DmaMap"/>.</summary>
    void DmaUnmap(ulong iova, ulong size);

    /// <summary>Wires MSI-X vectors [0, fds.Count) to eventfds (the device signals them).</summary>
    void SetMsixEventFds(IReadOnlyList<EventFd> fds);

    /// <summary>Current migration state (MIG_DEVICE_STATE GET).</summary>
    DeviceState GetState();

    /// <summary>Moves to <paramref name="target"/> along the kernel's arcs; returns the state reached. Throws on failure.</summary>
    DeviceState SetState(DeviceState target);

    /// <summary>One MIG_DATA_READ into <paramref name="buffer"/>; fewer bytes than asked = no more (for now in PRE_COPY, ever in STOP_COPY).</summary>
    int ReadMigrationData(Span<byte> buffer);

    /// <summary>One MIG_DATA_WRITE (RESUMING only).</summary>
    void WriteMigrationData(ReadOnlySpan<byte> data);

    /// <summary>Pre-copy info (PRE_COPY/PRE_COPY_P2P only; requires <see cref="SupportsPrecopyInfo"/>).</summary>
    PrecopyInfo GetPrecopyInfo();

    /// <summary>Estimated STOP_COPY bytes (requires <see cref="SupportsStopCopySize"/>).</summary>
    ulong GetStopCopySize();

    /// <summary>DMA_LOGGING_START over <paramref name="ranges"/> at <paramref name="pageSize"/> granularity.</summary>
    void StartDirtyLogging(ulong pageSize, IReadOnlyList<(ulong Iova, ulong Length)> ranges);

    /// <summary>DMA_LOGGING_STOP.</summary>
    void StopDirtyLogging();

    /// <summary>DMA_LOGGING_REPORT: fills <paramref name="bitmap"/> (bit i = page iova/pageSize + i) and clears the device's log for the range.</summary>
    void ReportDirty(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap);

    /// <summary>DEVICE_RESET: back to RUNNING, any data session ends.</summary>
    void Reset();
}

/// <summary>
/// A device as the VM description names it. The target accepts a device only if its own device has the
/// same <see cref="Kind"/>, <see cref="Profile"/> and <see cref="MigrationFlags"/>.
/// </summary>
/// <param name="Name">Unique within the VM (e.g. "nvme0"); guest drivers find their function by it.</param>
/// <param name="Kind">Device kind (e.g. "nvme", "accel").</param>
/// <param name="Profile">The migratable profile fixed by the controlling function (queue counts, features…), canonical text.</param>
/// <param name="MigrationFlags">The device's migration flags.</param>
public sealed record DeviceDescription(string Name, string Kind, string Profile, MigrationFlags MigrationFlags)
{
    /// <summary>Null if <paramref name="other"/> can take this device's state, else the reason it cannot.</summary>
    public string? IncompatibilityWith(DeviceDescription other)
    {
        ArgumentNullException.ThrowIfNull(other);
        if (!string.Equals(Kind, other.Kind, StringComparison.Ordinal))
        {
            return $"device {Name}: kind '{other.Kind}' differs from '{Kind}'";
        }
        if (!string.Equals(Profile, other.Profile, StringComparison.Ordinal))
        {
            return $"device {Name}: profile '{other.Profile}' differs from '{Profile}'";
        }
        if (MigrationFlags != other.MigrationFlags)
        {
            return $"device {Name}: migration flags {other.MigrationFlags} differ from {MigrationFlags}";
        }
        return null;
    }
}

/// <summary>The VM as the handshake describes it.</summary>
/// <param name="Name">VM name.</param>
/// <param name="MemorySize">Guest RAM bytes.</param>
/// <param name="Vcpus">Program kind of each vCPU, by index.</param>
/// <param name="Devices">Devices in index order (the stream refers to devices by this index).</param>
public sealed record VmDescription(string Name, ulong MemorySize, IReadOnlyList<string> Vcpus, IReadOnlyList<DeviceDescription> Devices);
