using Vmig.Migration;
using Vmig.VfioUser.Server;

namespace Vmig.TestPeer;

/// <summary>The deliberate faults a <see cref="BrokenDevice"/> can have (to prove the conformance suite catches them).</summary>
public enum BrokenMode
{
    /// <summary>The STOP_COPY stream never ends: every MIG_DATA_READ is answered in full (padding after the real end).</summary>
    EndlessStopCopy,
    /// <summary>The STOP→RESUMING arc claims to land the device in RUNNING, so GET reports the wrong state.</summary>
    WrongStateAfterResuming,
    /// <summary>RESUMING→STOP accepts any data, truncated or corrupt (no validation).</summary>
    AcceptsCorruptLoad,
}

/// <summary>
/// A <see cref="SampleDevice"/> with one deliberate spec violation (<see cref="BrokenMode"/>). Everything else is
/// delegated, so the conformance suite should fail exactly the checks that cover the fault.
/// </summary>
public sealed class BrokenDevice : VfioUserDevice, IMigrationDevice, IDisposable
{
    private readonly SampleDevice _inner;
    private readonly BrokenMode _mode;
    private DeviceState _state = DeviceState.Running;

    public BrokenDevice(BrokenMode mode, MigrationFlags flags)
    {
        _mode = mode;
        _inner = new SampleDevice(flags);
    }

    public override IReadOnlyList<RegionDescriptor> Regions => _inner.Regions;
    public override IReadOnlyList<IrqDescriptor> Irqs => _inner.Irqs;
    public override IMigrationDevice? Migration => this;
    public MigrationFlags MigrationFlags => _inner.MigrationFlags;

    public override int ReadRegion(int index, ulong offset, Span<byte> data) => _inner.ReadRegion(index, offset, data);

    public override int WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data) => _inner.WriteRegion(index, offset, data);

    public override void Reset() => _inner.Reset();

    public override void OnAttached(DeviceContext context)
    {
        base.OnAttached(context);
        _inner.OnAttached(context);
    }

    public override void OnDetached()
    {
        base.OnDetached();
        _inner.OnDetached();
    }

    public void Step(DeviceState from, DeviceState to)
    {
        if (_mode == BrokenMode.AcceptsCorruptLoad && from == DeviceState.Resuming)
        {
            try
            {
                _inner.Step(from, to);
            }
            catch (MigrationException)
            {
                // The fault: an invalid stream is "loaded" anyway.
            }
            _state = to;
            return;
        }
        _inner.Step(from, to);
        _state = to;
        if (_mode == BrokenMode.WrongStateAfterResuming && to == DeviceState.Resuming)
        {
            throw new MigrationException(5, "broken on purpose: claims RUNNING after STOP->RESUMING", DeviceState.Running);
        }
    }

    public int ReadData(Span<byte> buffer)
    {
        int n = _inner.ReadData(buffer);
        if (_mode == BrokenMode.EndlessStopCopy && _state == DeviceState.StopCopy && n < buffer.Length)
        {
            buffer[n..].Fill(0xEE);
            return buffer.Length;
        }
        return n;
    }

    public void WriteData(ReadOnlySpan<byte> data) => _inner.WriteData(data);

    public PrecopyInfo GetPrecopyInfo() => _inner.GetPrecopyInfo();

    public ulong GetStopCopySize() => _inner.GetStopCopySize();

    public void OnReset()
    {
        _state = DeviceState.Running;
        _inner.OnReset();
    }

    public void Dispose() => _inner.Dispose();

    /// <summary>`serve-broken SOCKET MODE [FLAGS]`: serves a broken device until stdin closes or "quit"; prints "ready".</summary>
    internal static int Serve(string[] args)
    {
        var mode = Enum.Parse<BrokenMode>(args[2], ignoreCase: true);
        var flags = args.Length >= 4 ? (MigrationFlags)ulong.Parse(args[3], System.Globalization.CultureInfo.InvariantCulture) : MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;
        using var dev = new BrokenDevice(mode, flags);
        using var server = new VfioUserServer(dev, args[1]);
        server.Start();
        Console.Out.WriteLine("ready");
        Console.Out.Flush();
        string? line;
        while ((line = Console.In.ReadLine()) is not null && line != "quit")
        {
        }
        return 0;
    }
}
