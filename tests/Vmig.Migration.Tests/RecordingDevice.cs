using Vmig.Migration;

namespace Vmig.Migration.Tests;

/// <summary>
/// A migration device that records every call: arcs in order, stream reads/writes, resets. Save data is a queue the
/// test fills (so "more data arrived later" can be simulated); failures are injected per arc.
/// </summary>
internal sealed class RecordingDevice(MigrationFlags flags) : IMigrationDevice
{
    private int _inside;

    public MigrationFlags MigrationFlags { get; } = flags;

    public List<MigrationArc> Arcs { get; } = [];

    /// <summary>Called before each arc; return an exception to make that arc fail.</summary>
    public Func<MigrationArc, Exception?>? FailArc { get; set; }

    public Queue<byte> SaveData { get; } = new();

    public List<byte> Loaded { get; } = [];

    public Exception? ReadFailure { get; set; }

    public Exception? WriteFailure { get; set; }

    /// <summary>Overrides the count ReadData returns (to simulate a buggy device).</summary>
    public int? ReadCountOverride { get; set; }

    public int ReadCalls { get; private set; }

    public int ResetCalls { get; private set; }

    public PrecopyInfo Precopy { get; set; } = new(100, 7);

    public ulong StopCopySize { get; set; } = 4096;

    /// <summary>Set if two calls were ever inside the device at once.</summary>
    public bool Overlapped { get; private set; }

    public void Step(DeviceState from, DeviceState to)
    {
        Enter();
        try
        {
            var arc = new MigrationArc(from, to);
            Arcs.Add(arc);
            Thread.SpinWait(200);
            if (FailArc?.Invoke(arc) is { } ex)
            {
                throw ex;
            }
        }
        finally
        {
            Exit();
        }
    }

    public int ReadData(Span<byte> buffer)
    {
        Enter();
        try
        {
            ReadCalls++;
            if (ReadFailure is { } f)
            {
                throw f;
            }
            int n = 0;
            while (n < buffer.Length && SaveData.Count > 0)
            {
                buffer[n++] = SaveData.Dequeue();
            }
            Thread.SpinWait(100);
            return ReadCountOverride ?? n;
        }
        finally
        {
            Exit();
        }
    }

    public void WriteData(ReadOnlySpan<byte> data)
    {
        if (WriteFailure is { } f)
        {
            throw f;
        }
        Loaded.AddRange(data.ToArray());
    }

    public PrecopyInfo GetPrecopyInfo() => Precopy;

    public ulong GetStopCopySize() => StopCopySize;

    public void OnReset()
    {
        ResetCalls++;
        SaveData.Clear();
    }

    private void Enter()
    {
        if (Interlocked.Increment(ref _inside) != 1)
        {
            Overlapped = true;
        }
    }

    private void Exit() => Interlocked.Decrement(ref _inside);
}
