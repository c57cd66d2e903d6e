using Microsoft.Extensions.Logging.Abstractions;
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

/// <summary>"Guest RAM": a memfd mapped twice, once as a DMA window of a DmaSpace at <see cref="Iova"/> and once for the test to inspect.</summary>
public sealed class GuestRam : IDisposable
{
    public const ulong Iova = 0x1_0000_0000;

    public GuestRam(long size, int msixVectors = 0)
    {
        Fd = MemFd.Create("guest-ram", size);
        View = Mapping.Map(Fd, 0, size);
        Dma = new DmaSpace();
        int rc = Dma.Map(Iova, (ulong)size, DmaProt.Read | DmaProt.Write, Mapping.Map(Fd, 0, size));
        Assert.Equal(0, rc);
        Irqs = new EventFdIrqSignaler(Vmig.VfioUser.Protocol.VfioPci.MsixIrqIndex, msixVectors);
        Context = new DeviceContext(Dma, Irqs, NullLogger.Instance);
        Size = size;
    }

    public long Size { get; }
    public UnixFd Fd { get; }
    public Mapping View { get; }
    public DmaSpace Dma { get; }
    public EventFdIrqSignaler Irqs { get; }
    public DeviceContext Context { get; }

    public Span<byte> At(ulong iova, int count) => View.GetSpan((long)(iova - Iova), count);

    public void Dispose()
    {
        Dma.Dispose();
        View.Dispose();
        Fd.Dispose();
        Irqs.Dispose();
    }
}
