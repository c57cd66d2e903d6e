using Vmig.Devices.Nvme;
using Vmig.Guest;
using Vmig.Native;
using Vmig.VfioUser.Server;

namespace Vmig.InProcess;

/// <summary>
/// A guest driver's view of one <see cref="NvmeController"/> in the same process, without the PCI layer or a socket:
/// BAR0 accesses call <see cref="NvmeController.ReadBar0"/> / <see cref="NvmeController.WriteBar0"/> directly, MSI-X
/// vectors are real eventfds the controller signals, and config space is a plain 256-byte array with no capabilities
/// (so a driver finds no MSI-X capability to enable and needs none). Used by tests and the bench to measure the driver
/// and controller without the vfio-user transport; a VM reaches a controller through vfio-user instead.
/// </summary>
/// <remarks>The counters are updated and read atomically, so they may be read while I/O runs.</remarks>
internal sealed class NvmeDirectFunction : IGuestPciFunction, IDisposable
{
    private readonly NvmeController _ctrl;
    private readonly EventFd[] _vectors;
    private readonly byte[] _config = new byte[256];
    private long _mmioWrites;
    private long _doorbellWrites;
    private long _interrupts;

    /// <summary>
    /// Attaches <paramref name="controller"/> to <paramref name="dma"/> (guest memory as the device sees it) with
    /// <paramref name="vectors"/> eventfd-backed MSI-X vectors; a vector number at or above that count is dropped.
    /// </summary>
    public NvmeDirectFunction(NvmeController controller, IDmaSpace dma, int vectors)
    {
        ArgumentNullException.ThrowIfNull(controller);
        ArgumentNullException.ThrowIfNull(dma);
        ArgumentOutOfRangeException.ThrowIfNegative(vectors);
        _ctrl = controller;
        _vectors = new EventFd[vectors];
        for (int i = 0; i < vectors; i++)
        {
            _vectors[i] = EventFd.Create();
        }
        controller.Attach(dma, v =>
        {
            Interlocked.Increment(ref _interrupts);
            if (v < _vectors.Length)
            {
                _vectors[v].Signal();
            }
        });
    }

    /// <summary>BAR0 writes so far (registers and doorbells).</summary>
    public long MmioWrites => Interlocked.Read(ref _mmioWrites);

    /// <summary>BAR0 writes at or above 0x1000 (the doorbells) so far.</summary>
    public long DoorbellWrites => Interlocked.Read(ref _doorbellWrites);

    /// <summary>MSI-X signals the controller sent so far (any vector).</summary>
    public long Interrupts => Interlocked.Read(ref _interrupts);

    /// <summary>Zeroes the counters (e.g. after bring-up, so they count I/O only).</summary>
    public void ResetCounters()
    {
        Interlocked.Exchange(ref _mmioWrites, 0);
        Interlocked.Exchange(ref _doorbellWrites, 0);
        Interlocked.Exchange(ref _interrupts, 0);
    }

    public int MsixVectorCount => _vectors.Length;

    public void ReadConfig(int offset, Span<byte> data) => _config.AsSpan(offset, data.Length).CopyTo(data);

    public void WriteConfig(int offset, ReadOnlySpan<byte> data) => data.CopyTo(_config.AsSpan(offset));

    /// <exception cref="IOException">Not BAR0, or the controller refused the access (its errno in the message).</exception>
    public void MmioRead(int bar, ulong offset, Span<byte> data) => Check(bar, bar == 0 ? _ctrl.ReadBar0((long)offset, data) : 0);

    /// <exception cref="IOException">Not BAR0, or the controller refused the access (its errno in the message).</exception>
    public void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data)
    {
        Interlocked.Increment(ref _mmioWrites);
        if (offset >= 0x1000)
        {
            Interlocked.Increment(ref _doorbellWrites);
        }
        Check(bar, bar == 0 ? _ctrl.WriteBar0((long)offset, data) : 0);
    }

    public bool WaitInterrupt(int vector, int timeoutMs) => _vectors[vector].Wait(timeoutMs) > 0;

    private static void Check(int bar, int errno)
    {
        if (bar != 0)
        {
            throw new IOException($"BAR{bar} does not exist (the controller has BAR0 only)");
        }
        if (errno != 0)
        {
            throw new IOException($"BAR0 access failed: errno {errno}");
        }
    }

    /// <summary>Detaches the controller (stops its poller) and closes the eventfds.</summary>
    public void Dispose()
    {
        _ctrl.Detach();
        foreach (var v in _vectors)
        {
            v.Dispose();
        }
    }
}
