using Vmig.Guest;
using Vmig.Native;

namespace Vmig.Vmm;

/// <summary>
/// A device as its guest driver sees it: config space = VFIO region 7, BARs = regions 0-5, MSI-X vectors =
/// eventfds the VMM created and handed to the device (SET_IRQS), waited on by the vCPU thread.
/// </summary>
public sealed class VmPciFunction : IGuestPciFunction, IDisposable
{
    private const int ConfigRegionIndex = 7;
    private readonly IVmDevice _device;
    private readonly EventFd[] _vectors;

    /// <summary>Creates one eventfd per MSI-X vector of <paramref name="device"/> and wires them to it.</summary>
    public VmPciFunction(IVmDevice device)
    {
        _device = device ?? throw new ArgumentNullException(nameof(device));
        _vectors = new EventFd[device.MsixVectorCount];
        try
        {
            for (int i = 0; i < _vectors.Length; i++)
            {
                _vectors[i] = EventFd.Create();
            }
            if (_vectors.Length > 0)
            {
                device.SetMsixEventFds(_vectors);
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <inheritdoc/>
    public int MsixVectorCount => _vectors.Length;

    /// <inheritdoc/>
    public void ReadConfig(int offset, Span<byte> data)
    {
        CheckConfig(offset, data.Length);
        _device.ReadRegion(ConfigRegionIndex, (ulong)offset, data);
    }

    /// <inheritdoc/>
    public void WriteConfig(int offset, ReadOnlySpan<byte> data)
    {
        CheckConfig(offset, data.Length);
        _device.WriteRegion(ConfigRegionIndex, (ulong)offset, data);
    }

    /// <inheritdoc/>
    public void MmioRead(int bar, ulong offset, Span<byte> data)
    {
        CheckBar(bar);
        _device.ReadRegion(bar, offset, data);
    }

    /// <inheritdoc/>
    public void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data)
    {
        CheckBar(bar);
        _device.WriteRegion(bar, offset, data);
    }

    /// <inheritdoc/>
    public bool WaitInterrupt(int vector, int timeoutMs)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(vector);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(vector, _vectors.Length);
        return _vectors[vector].Wait(timeoutMs) != 0;
    }

    public void Dispose()
    {
        foreach (var v in _vectors)
        {
            v?.Dispose();
        }
    }

    private static void CheckConfig(int offset, int length)
    {
        if (offset < 0 || length < 0 || offset + length > 4096)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"config access [{offset}, +{length}) outside 4096 bytes");
        }
    }

    private static void CheckBar(int bar)
    {
        if (bar is < 0 or > 5)
        {
            throw new ArgumentOutOfRangeException(nameof(bar), $"BAR {bar} is not 0-5");
        }
    }
}
