using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;
using Vmig.Vmm;

namespace Vmig.Bench;

/// <summary>
/// <see cref="IVmDevice"/> over a <see cref="VfioUserClient"/> (the VMM-side adapter main does not have yet), so the
/// VMM's migration engine and <see cref="VmPciFunction"/> drive a device served in another process.
/// </summary>
internal sealed class VfioVmDevice : IVmDevice
{
    private readonly VfioUserClient _client;
    private readonly int _msix;

    public VfioVmDevice(string socketPath, string name, string kind, string profile)
    {
        _client = VfioUserClient.Connect(socketPath);
        try
        {
            Description = new DeviceDescription(name, kind, profile, _client.GetMigrationFlags());
            _msix = (int)_client.GetIrqInfo(VfioPci.MsixIrqIndex).Count;
        }
        catch
        {
            _client.Dispose();
            throw;
        }
    }

    public VfioUserClient Client => _client;
    public DeviceDescription Description { get; }
    public bool SupportsPrecopyInfo => _client.SupportsPrecopyInfo;
    public bool SupportsStopCopySize => _client.SupportsStopCopySize;
    public bool SupportsDirtyLogging => true;
    public int MsixVectorCount => _msix;

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

    public void StartDirtyLogging(ulong pageSize, IReadOnlyList<(ulong Iova, ulong Length)> ranges) => _client.StartDirtyLogging(pageSize, ranges);

    public void StopDirtyLogging() => _client.StopDirtyLogging();

    public void ReportDirty(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap) =>
        _client.ReportDirty(iova, length, pageSize).Words.CopyTo(bitmap);

    public void Reset() => _client.Reset();

    public void Dispose() => _client.Dispose();
}
