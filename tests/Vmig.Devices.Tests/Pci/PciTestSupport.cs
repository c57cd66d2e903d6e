using System.Buffers.Binary;
using Microsoft.Extensions.Logging.Abstractions;
using Vmig.Guest;
using Vmig.Native;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Tests.Pci;

/// <summary>An IIrqSignaler over real eventfds, one per (index, subindex), as the SDK wires them after SET_IRQS.</summary>
public sealed class EventFdIrqSignaler : IIrqSignaler, IDisposable
{
    private readonly Dictionary<(int, int), EventFd> _fds = [];

    public EventFdIrqSignaler(int index, int count)
    {
        for (int i = 0; i < count; i++)
        {
            _fds[(index, i)] = EventFd.Create();
        }
    }

    public EventFd this[int index, int subindex] => _fds[(index, subindex)];

    public bool Trigger(int index, int subindex)
    {
        if (!_fds.TryGetValue((index, subindex), out var fd))
        {
            return false;
        }
        fd.Signal();
        return true;
    }

    public bool IsConfigured(int index, int subindex) => _fds.ContainsKey((index, subindex));

    /// <summary>Counter of the eventfd, consumed (0 = not signalled within <paramref name="timeoutMs"/>).</summary>
    public ulong Take(int index, int subindex, int timeoutMs = 0) => _fds[(index, subindex)].Wait(timeoutMs);

    public void Dispose()
    {
        foreach (var fd in _fds.Values)
        {
            fd.Dispose();
        }
    }
}

/// <summary>
/// "Guest RAM": a memfd mapped twice, once as a DMA window of a DmaSpace at <see cref="Base"/> and once for the test
/// (and guest drivers, through <see cref="IGuestMemory"/> when <see cref="Base"/> is 0) to use.
/// </summary>
public sealed class GuestRam : IDisposable, IGuestMemory
{
    /// <summary>Default IOVA of the window for device-only tests (so low addresses are unmapped).</summary>
    public const ulong Iova = 0x1_0000_0000;

    public GuestRam(long size, int msixVectors = 0, ulong iova = Iova)
    {
        Base = iova;
        Fd = MemFd.Create("guest-ram", size);
        View = Mapping.Map(Fd, 0, size);
        Dma = new DmaSpace();
        int rc = Dma.Map(iova, (ulong)size, DmaProt.Read | DmaProt.Write, Mapping.Map(Fd, 0, size));
        Assert.Equal(0, rc);
        Irqs = new EventFdIrqSignaler(Vmig.VfioUser.Protocol.VfioPci.MsixIrqIndex, msixVectors);
        Context = new DeviceContext(Dma, Irqs, NullLogger.Instance);
        Size = size;
    }

    public ulong Base { get; }
    public long Size { get; }
    ulong IGuestMemory.Size => (ulong)Size - Base; // valid only when Base is 0 (gpa == iova)
    public UnixFd Fd { get; }
    public Mapping View { get; }
    public DmaSpace Dma { get; }
    public EventFdIrqSignaler Irqs { get; }
    public DeviceContext Context { get; }

    public Span<byte> At(ulong iova, int count) => View.GetSpan((long)(iova - Base), count);

    public void Read(ulong gpa, Span<byte> destination) => At(gpa, destination.Length).CopyTo(destination);

    public void Write(ulong gpa, ReadOnlySpan<byte> source) => source.CopyTo(At(gpa, source.Length));

    public uint ReadUInt32(ulong gpa) => View.ReadUInt32Volatile((long)(gpa - Base));

    public void WriteUInt32(ulong gpa, uint value) => View.WriteUInt32Volatile((long)(gpa - Base), value);

    public ulong ReadUInt64(ulong gpa) => (ulong)View.ReadInt64Volatile((long)(gpa - Base));

    public void WriteUInt64(ulong gpa, ulong value) => BinaryPrimitives.WriteUInt64LittleEndian(At(gpa, 8), value);

    public void Dispose()
    {
        Dma.Dispose();
        View.Dispose();
        Fd.Dispose();
        Irqs.Dispose();
    }
}

/// <summary>A guest's view of a device function in the same process: region accesses and MSI-X eventfds, errno → exception.</summary>
public sealed class InProcessPciFunction(VfioUserDevice device, EventFdIrqSignaler irqs) : IGuestPciFunction
{
    public int MsixVectorCount => (int)device.Irqs[Vmig.VfioUser.Protocol.VfioPci.MsixIrqIndex].Count;

    public void ReadConfig(int offset, Span<byte> data) => Check(device.ReadRegion(Vmig.VfioUser.Protocol.VfioPci.ConfigRegionIndex, (ulong)offset, data));

    public void WriteConfig(int offset, ReadOnlySpan<byte> data) => Check(device.WriteRegion(Vmig.VfioUser.Protocol.VfioPci.ConfigRegionIndex, (ulong)offset, data));

    public void MmioRead(int bar, ulong offset, Span<byte> data) => Check(device.ReadRegion(bar, offset, data));

    public void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data) => Check(device.WriteRegion(bar, offset, data));

    public bool WaitInterrupt(int vector, int timeoutMs) => irqs.Take(Vmig.VfioUser.Protocol.VfioPci.MsixIrqIndex, vector, timeoutMs) > 0;

    private static void Check(int errno)
    {
        if (errno != 0)
        {
            throw new IOException($"region access failed: errno {errno}");
        }
    }
}
