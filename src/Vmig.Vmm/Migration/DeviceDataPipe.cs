using System.Collections.Concurrent;
using System.Runtime.ExceptionServices;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>
/// Source side of device data: reads a device's save stream (MIG_DATA_READ) and writes it as DeviceData sections, with
/// the next read running on a helper thread while the current section goes to the stream. Without the overlap every
/// chunk pays the device round trip and the socket write one after the other (measured: device data ran at ≈ 0.2× raw
/// TCP loopback). A stream that ends in its first read (the usual stop-copy tail) is read inline: no thread, nothing
/// added to the downtime.
/// </summary>
internal sealed class DeviceDataPump
{
    private const int Depth = 3;
    private readonly byte[][] _frames;

    /// <param name="chunk">Bytes per MIG_DATA_READ.</param>
    public DeviceDataPump(int chunk)
    {
        _frames = new byte[Depth][];
        for (int i = 0; i < Depth; i++)
        {
            _frames[i] = new byte[DeviceControl.DeviceFrameOverhead + chunk];
        }
    }

    private int Chunk => _frames[0].Length - DeviceControl.DeviceFrameOverhead;

    /// <summary>Told the CPU ms of each read helper thread when it ends (the report's per-stage CPU figures).</summary>
    public Action<double>? OnReaderCpu { get; set; }

    /// <summary>
    /// Sends device <paramref name="index"/>'s data until a short read, or once <paramref name="cap"/> bytes went
    /// (checked per read). Returns device bytes sent. A read or write
    /// failure is rethrown after the helper thread has finished (nothing touches the device after this returns).
    /// </summary>
    public long Send(IVmDevice device, int index, byte phase, SectionWriter writer, long cap, Throttle? throttle)
    {
        int chunk = Chunk;
        int n = Read(device, _frames[0], chunk);
        long total = Write(writer, _frames[0], index, phase, n, throttle);
        if (n < chunk || total >= cap)
        {
            return total;
        }
        using var free = new BlockingCollection<byte[]>();
        using var full = new BlockingCollection<(byte[] Frame, int Bytes)>();
        using var stop = new CancellationTokenSource();
        foreach (var f in _frames)
        {
            free.Add(f);
        }
        Exception? readError = null;
        long readSoFar = total;
        var reader = new Thread(() =>
        {
            double cpu0 = ThreadCpu.Milliseconds();
            try
            {
                while (true)
                {
                    var f = free.Take(stop.Token);
                    int m = Read(device, f, chunk);
                    full.Add((f, m));
                    readSoFar += m;
                    if (m < chunk || readSoFar >= cap)
                    {
                        return;
                    }
                }
            }
            catch (OperationCanceledException)
            {
                // The writer failed; it reports its own error.
            }
            catch (Exception e)
            {
                readError = e;
            }
            finally
            {
                OnReaderCpu?.Invoke(ThreadCpu.Milliseconds() - cpu0);
                full.CompleteAdding();
            }
        })
        { IsBackground = true, Name = $"vmig device {index} read" };
        reader.Start();
        try
        {
            foreach (var (f, m) in full.GetConsumingEnumerable())
            {
                total += Write(writer, f, index, phase, m, throttle);
                free.Add(f);
            }
        }
        finally
        {
            stop.Cancel();
            reader.Join();
        }
        if (readError is not null)
        {
            ExceptionDispatchInfo.Capture(readError).Throw();
        }
        return total;
    }

    private static int Read(IVmDevice device, byte[] frame, int chunk)
    {
        int n = device.ReadMigrationData(frame.AsSpan(DeviceControl.DeviceFrameOverhead, chunk));
        if (n < 0 || n > chunk)
        {
            throw new IOException($"device {device.Description.Name}: MIG_DATA_READ returned {n} for a {chunk}-byte buffer");
        }
        return n;
    }

    private static long Write(SectionWriter writer, byte[] frame, int index, byte phase, int n, Throttle? throttle)
    {
        if (n == 0)
        {
            return 0;
        }
        DeviceControl.WriteDeviceDataHeader(frame, index, phase);
        writer.WriteFramed(SectionType.DeviceData, frame, 4 + n);
        throttle?.Consume(4 + n + SectionHeader.Size);
        return n;
    }
}

/// <summary>
/// Target side of device data: MIG_DATA_WRITE runs on a helper thread, in arrival order, while the receive loop reads
/// the next section. The section's payload buffer is handed over (<see cref="SectionReader.TakePayload"/>), not
/// copied. Callers <see cref="Drain"/> where the protocol needs the bytes loaded: before a switchover-ack and before
/// the devices leave RESUMING. At most <see cref="Depth"/> sections wait, so a slow device slows the stream down
/// rather than buffering it. Not thread-safe for callers (one receive loop).
/// </summary>
internal sealed class DeviceDataLoader : IDisposable
{
    private const int Depth = 4;
    private const int InlineLimit = 64 * 1024;
    private readonly IReadOnlyList<IVmDevice> _devices;
    private readonly BlockingCollection<(int Device, byte[] Buffer, int Length)> _queue = new(Depth);
    private readonly ConcurrentBag<byte[]> _spare = [];
    private readonly object _gate = new();
    private Thread? _thread;
    private int _pending;
    private Exception? _error;
    private bool _disposed;

    public DeviceDataLoader(IReadOnlyList<IVmDevice> devices) => _devices = devices;

    /// <summary>Queues the current DeviceData section of <paramref name="reader"/> (payload: 4-byte header, then data) for device <paramref name="device"/>.</summary>
    /// <exception cref="Exception">An earlier write failed (rethrown as it was thrown).</exception>
    public void Enqueue(int device, SectionReader reader)
    {
        ThrowIfFailed();
        int length = reader.Payload.Length;
        bool idle;
        lock (_gate)
        {
            idle = _pending == 0;
        }
        if (idle && length <= InlineLimit)
        {
            // A small section with nothing queued (the usual stop-copy tail, in the downtime): a hand-off to the helper
            // thread would cost a wake-up, more than the write it overlaps.
            _devices[device].WriteMigrationData(reader.Payload[4..]);
            return;
        }
        byte[] buffer = reader.TakePayload(_spare.TryTake(out var b) ? b : null);
        lock (_gate)
        {
            _pending++;
        }
        if (_thread is null)
        {
            _thread = new Thread(Run) { IsBackground = true, Name = "vmig device data load" };
            _thread.Start();
        }
        _queue.Add((device, buffer, length));
    }

    /// <summary>Waits until every queued section is written.</summary>
    /// <exception cref="Exception">A write failed (rethrown as it was thrown).</exception>
    public void Drain()
    {
        lock (_gate)
        {
            while (_pending > 0 && _error is null)
            {
                Monitor.Wait(_gate);
            }
        }
        ThrowIfFailed();
    }

    /// <summary>Stops the helper thread (after the write in progress, if any); queued sections are dropped.</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        _queue.CompleteAdding();
        _thread?.Join();
        _queue.Dispose();
    }

    /// <summary>CPU ms the helper thread spent (MIG_DATA_WRITE), valid once it ended (after <see cref="Dispose"/>).</summary>
    public double HelperCpuMilliseconds { get; private set; }

    private void Run()
    {
        double cpu0 = ThreadCpu.Milliseconds();
        Write();
        HelperCpuMilliseconds = ThreadCpu.Milliseconds() - cpu0;
    }

    private void Write()
    {
        foreach (var (d, buffer, length) in _queue.GetConsumingEnumerable())
        {
            bool failed;
            lock (_gate)
            {
                failed = _error is not null;
            }
            if (!failed)
            {
                try
                {
                    _devices[d].WriteMigrationData(buffer.AsSpan(4, length - 4));
                }
                catch (Exception e)
                {
                    lock (_gate)
                    {
                        _error = e;
                    }
                }
            }
            _spare.Add(buffer);
            lock (_gate)
            {
                _pending--;
                Monitor.PulseAll(_gate);
            }
        }
    }

    private void ThrowIfFailed()
    {
        Exception? e;
        lock (_gate)
        {
            e = _error;
        }
        if (e is not null)
        {
            ExceptionDispatchInfo.Capture(e).Throw();
        }
    }
}
