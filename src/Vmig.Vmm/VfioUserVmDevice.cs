using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Vmm;

/// <summary>
/// <see cref="IVmDevice"/> over a vfio-user connection (<see cref="VfioUserClient"/>): the VMM's handle on one
/// device function served by a device host. Migration flags, MSI-X vector count and dirty-logging support are read
/// from the device when it is opened; a device found outside RUNNING is reset first. Owns the client.
/// </summary>
public sealed class VfioUserVmDevice : IVmDevice
{
    private readonly VfioUserClient _client;

    /// <summary>Wraps an attached client. <paramref name="kind"/> and <paramref name="profile"/> name what the device is
    /// for the handshake's compatibility check (the profile the controlling function fixed for this function).</summary>
    /// <exception cref="VfioUserException">The device did not answer the probes.</exception>
    public VfioUserVmDevice(VfioUserClient client, string name, string kind, string profile)
    {
        _client = client ?? throw new ArgumentNullException(nameof(client));
        MigrationFlags flags;
        try
        {
            flags = client.GetMigrationFlags();
        }
        catch (VfioUserException e) when (e.Errno is Errno.ENOTTY or Errno.EINVAL)
        {
            // Not migratable: the handshake carries flags None and a target refuses it (STOP_COPY is mandatory).
            flags = MigrationFlags.None;
        }
        if (flags != MigrationFlags.None && client.GetState() != DeviceState.Running)
        {
            // A function left stopped by its previous user (e.g. the source side of an earlier migration) answers
            // no queries; reset it as VFIO resets a device on open.
            client.Reset();
        }
        Description = new DeviceDescription(name, kind, profile, flags);
        SupportsDirtyLogging = client.ProbeFeature((ushort)DeviceFeature.DmaLoggingStart, get: false, set: true) == 0;
        MsixVectorCount = (int)client.GetIrqInfo(VfioPci.MsixIrqIndex).Count;
    }

    /// <summary>Connects to the vfio-user socket at <paramref name="socketPath"/> and wraps it.</summary>
    public static VfioUserVmDevice Connect(string socketPath, string name, string kind, string profile, VfioUserClientOptions? options = null)
    {
        var c = VfioUserClient.Connect(socketPath, options);
        try
        {
            return new VfioUserVmDevice(c, name, kind, profile);
        }
        catch
        {
            c.Dispose();
            throw;
        }
    }

    /// <summary>The underlying client (for device-specific setup).</summary>
    public VfioUserClient Client => _client;

    public DeviceDescription Description { get; }
    public bool SupportsPrecopyInfo => _client.SupportsPrecopyInfo;
    public bool SupportsStopCopySize => _client.SupportsStopCopySize;
    public bool SupportsDirtyLogging { get; }
    public int MsixVectorCount { get; }

    public void ReadRegion(int index, ulong offset, Span<byte> data) => _client.ReadRegion(index, offset, data);
    public void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data) => _client.WriteRegion(index, offset, data);
    public void DmaMap(ulong iova, ulong size, UnixFd fd, long fileOffset) => _client.DmaMap(iova, size, fd, fileOffset, DmaProt.Read | DmaProt.Write);
    public void DmaUnmap(ulong iova, ulong size) => _client.DmaUnmap(iova, size);
    public void SetMsixEventFds(IReadOnlyList<EventFd> fds) => _client.SetIrqEventFds(VfioPci.MsixIrqIndex, 0, fds);
    public DeviceState GetState() => _client.GetState();
    public DeviceState SetState(DeviceState target) => _client.SetState(target);
    public int ReadMigrationData(Span<byte> buffer) => _client.ReadMigrationData(buffer);
    public void WriteMigrationData(ReadOnlySpan<byte> data) => _client.WriteMigrationData(data);
    public PrecopyInfo GetPrecopyInfo() => _client.GetPrecopyInfo();
    public ulong GetStopCopySize() => _client.GetStopCopySize();
    public void StartDirtyLogging(ulong pageSize, IReadOnlyList<(ulong Iova, ulong Length)> ranges)
    {
        ulong granule = _client.StartDirtyLogging(pageSize, ranges);
        if (granule != pageSize)
        {
            _client.StopDirtyLogging();
            throw new VfioUserException(Errno.EINVAL, $"device {Description.Name} logs at {granule}-byte pages, the VMM needs {pageSize}");
        }
    }

    public void StopDirtyLogging() => _client.StopDirtyLogging();

    public void ReportDirty(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap)
    {
        var bm = _client.ReportDirty(iova, length, pageSize);
        var words = bm.Words;
        if (words.Length > bitmap.Length)
        {
            throw new ArgumentException($"bitmap of {bitmap.Length} words is too small for {words.Length}", nameof(bitmap));
        }
        words.CopyTo(bitmap);
    }

    public void Reset() => _client.Reset();

    public void Dispose() => _client.Dispose();
}
