using Vmig.Devices.Accelerator;
using Vmig.Devices.Tests.Pci;
using Vmig.Guest.Accelerator;
using Vmig.Migration;
using Vmig.Spec.Accelerator;

namespace Vmig.Devices.Tests.Accelerator;

/// <summary>One "host" (PF with VF 0) and one "VM" (guest RAM at IOVA 0 attached to the VF, the guest driver).</summary>
public sealed class AcceleratorRig : IDisposable
{
    public const long RamSize = 4 << 20;
    public const ulong DriverBlock = 0x10_0000;
    /// <summary>Guest buffers for jobs start here (after the driver's block and ring).</summary>
    public const ulong BufferArea = 0x20_0000;

    public AcceleratorRig(ulong deviceMemory = 4 << 20, uint maxRing = 64, bool initDriver = true)
    {
        Pf = new AcceleratorPf(2, AcceleratorProfile.Create(deviceMemory, maxRing));
        Pf.EnableVfs(1);
        Vf = Pf.GetVf(0);
        Ram = new GuestRam(RamSize, Spec.Accelerator.AcceleratorIds.VfMsixVectors, iova: 0);
        Vf.OnAttached(Ram.Context);
        Function = new InProcessPciFunction(Vf, Ram.Irqs);
        if (initDriver)
        {
            Driver = AcceleratorDriver.Initialize(Ram, Function, DriverBlock, 32);
        }
    }

    public AcceleratorPf Pf { get; }
    public AcceleratorVf Vf { get; }
    public GuestRam Ram { get; }
    public InProcessPciFunction Function { get; }
    public AcceleratorDriver? Driver { get; set; }
    public IMigrationDevice Migration => Vf.Migration;

    public AcceleratorDriver D => Driver ?? throw new InvalidOperationException("no driver");

    public AcceleratorCompletion Run(AcceleratorOpcode op, ulong guest, ulong dev, ulong len, ulong pattern = 0) =>
        D.Run(new AcceleratorJob(op, AcceleratorJobFlags.None, 0, guest, dev, len, pattern));

    public void Step(params DeviceState[] path)
    {
        for (int i = 1; i < path.Length; i++)
        {
            Migration.Step(path[i - 1], path[i]);
        }
    }

    /// <summary>
    /// Reads the save stream until it says "no more for now" (or the end), or <paramref name="limit"/> bytes (a VMM
    /// bounds a pre-copy round: a device that dirties faster than it is read never says "no more").
    /// </summary>
    public long Drain(MemoryStream wire, int chunk = 64 * 1024, long limit = long.MaxValue)
    {
        var buf = new byte[chunk];
        long total = 0;
        while (total < limit)
        {
            int n = Migration.ReadData(buf.AsSpan(0, (int)Math.Min(chunk, limit - total)));
            wire.Write(buf, 0, n);
            total += n;
            if (n < Math.Min(chunk, limit - total + n))
            {
                return total;
            }
        }
        return total;
    }

    public void Dispose()
    {
        Vf.OnDetached();
        Pf.Dispose();
        Ram.Dispose();
    }
}
