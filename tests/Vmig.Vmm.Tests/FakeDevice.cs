using System.Buffers.Binary;
using Vmig.Migration;
using Vmig.Native;
using Vmig.Vmm;

namespace Vmig.Vmm.Tests;

/// <summary>
/// An in-process device for VMM tests: a 4 KiB BAR0 of device memory, a counter, and a "DMA engine" thread that,
/// while the device runs, writes its counter into guest RAM through its own mapping of the RAM memfd (as a device
/// host would), logs the page when dirty logging is on, and signals MSI-X vector 0. State walks follow the kernel
/// next-step table for the device's flags; every arc is appended to a shared log.
/// Save stream: records { u8 tag, u32 length, data }: tag 1 = BAR0 (pre-copy), tag 2 = BAR0 + u64 counter (final).
/// </summary>
internal sealed class FakeDevice : IVmDevice
{
    // NEXT[from][to] from reference §1.5 (0 = invalid).
    private static readonly byte[,] Next =
    {
        { 0, 0, 0, 0, 0, 0, 0, 0 },
        { 0, 1, 5, 3, 4, 5, 5, 5 },
        { 0, 5, 2, 5, 5, 5, 6, 5 },
        { 0, 1, 1, 3, 1, 1, 0, 0 },
        { 0, 1, 1, 1, 4, 1, 1, 1 },
        { 0, 1, 2, 1, 1, 5, 2, 7 },
        { 0, 2, 2, 7, 2, 2, 6, 7 },
        { 0, 5, 5, 3, 5, 5, 6, 7 },
    };

    private static readonly uint[] Required = [uint.MaxValue, 1, 1, 1, 1, 3, 5, 7];

    private readonly object _lock = new();
    private readonly List<string> _log;
    private readonly byte[] _save = new byte[8192 + 32];
    private readonly MemoryStream _incoming = new();
    private readonly List<ulong> _dirtyPages = [];
    private Thread? _dma;
    private volatile bool _stopDma;
    private Mapping? _ram;
    private EventFd? _vector0;
    private DeviceState _state = DeviceState.Running;
    private int _saveLen, _savePos;
    private bool _logging;

    public FakeDevice(string name, MigrationFlags flags, List<string> log, ulong dmaGpa = 0)
    {
        Description = new DeviceDescription(name, "fake", "bar0=4k", flags);
        _log = log;
        DmaGpa = dmaGpa;
    }

    public DeviceDescription Description { get; }
    public byte[] Bar0 { get; } = new byte[4096];
    public ulong Counter { get; set; }
    public ulong DmaGpa { get; }
    public ulong CounterAtCommit { get; private set; }
    public bool FailCommit { get; set; }

    /// <summary>STOP_COPY → STOP throws InvalidOperationException (an adapter failing in the source's cleanup).</summary>
    public bool FailStopAfterStopCopy { get; set; }

    /// <summary>MIG_DATA_READ fails with EIO (a source device failing mid pre-copy).</summary>
    public bool FailSaveRead { get; set; }

    /// <summary>MIG_DATA_WRITE fails with EIO (a target device rejecting its incoming stream).</summary>
    public bool FailLoadWrite { get; set; }
    public bool SupportsPrecopyInfo => true;
    public bool SupportsStopCopySize => true;
    public bool SupportsDirtyLogging { get; init; } = true;
    public int MsixVectorCount => 1;
    public int ResetCount { get; private set; }
    public bool Disposed { get; private set; }

    public DeviceState State
    {
        get { lock (_lock) { return _state; } }
    }

    public void ReadRegion(int index, ulong offset, Span<byte> data)
    {
        lock (_lock)
        {
            if (index == 0)
            {
                Bar0.AsSpan((int)offset, data.Length).CopyTo(data);
            }
            else
            {
                data.Clear();
            }
        }
    }

    public void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            if (index == 0)
            {
                data.CopyTo(Bar0.AsSpan((int)offset));
            }
        }
    }

    public void DmaMap(ulong iova, ulong size, UnixFd fd, long fileOffset)
    {
        _ram = Mapping.Map(fd, fileOffset, (long)size);
        _dma = new Thread(DmaLoop) { IsBackground = true };
        _dma.Start();
    }

    public void DmaUnmap(ulong iova, ulong size) => _ram?.Dispose();

    public void SetMsixEventFds(IReadOnlyList<EventFd> fds) => _vector0 = fds[0];

    public DeviceState GetState() => State;

    /// <summary>SetState calls (one vfio-user request each on a real device).</summary>
    public int Requests { get; private set; }

    public DeviceState SetState(DeviceState target)
    {
        lock (_lock)
        {
            Requests++;
            uint flags = (uint)Description.MigrationFlags;
            if ((Required[(int)target] & flags) != Required[(int)target])
            {
                throw new IOException($"EINVAL: {target} not supported");
            }
            if (FailStopAfterStopCopy && _state == DeviceState.StopCopy && target == DeviceState.Stop)
            {
                throw new InvalidOperationException("injected: adapter refuses STOP after STOP_COPY");
            }
            while (_state != target)
            {
                var n = (DeviceState)Next[(int)_state, (int)target];
                while (n != DeviceState.Error && (Required[(int)n] & flags) != Required[(int)n])
                {
                    n = (DeviceState)Next[(int)n, (int)target];
                }
                if (n == DeviceState.Error)
                {
                    throw new IOException($"EINVAL: no path {_state}->{target}");
                }
                Arc(_state, n);
                _log.Add($"{Description.Name}:{_state}->{n}");
                _state = n;
            }
            return _state;
        }
    }

    public int ReadMigrationData(Span<byte> buffer)
    {
        lock (_lock)
        {
            if (_state is not (DeviceState.PreCopy or DeviceState.PreCopyP2P or DeviceState.StopCopy))
            {
                throw new IOException("EINVAL: not saving");
            }
            if (FailSaveRead)
            {
                throw new IOException("EIO: injected save read failure");
            }
            int n = Math.Min(buffer.Length, _saveLen - _savePos);
            _save.AsSpan(_savePos, n).CopyTo(buffer);
            _savePos += n;
            return n;
        }
    }

    public void WriteMigrationData(ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            if (_state != DeviceState.Resuming)
            {
                throw new IOException("EINVAL: not resuming");
            }
            if (FailLoadWrite)
            {
                throw new IOException("EIO: injected load write failure");
            }
            _incoming.Write(data);
        }
    }

    public PrecopyInfo GetPrecopyInfo()
    {
        lock (_lock)
        {
            return new PrecopyInfo((ulong)(_saveLen - _savePos), 0);
        }
    }

    public ulong GetStopCopySize() => 4096 + 8 + 10;

    public void StartDirtyLogging(ulong pageSize, IReadOnlyList<(ulong Iova, ulong Length)> ranges)
    {
        lock (_lock)
        {
            _logging = true;
            _dirtyPages.Clear();
        }
    }

    public void StopDirtyLogging()
    {
        lock (_lock)
        {
            _logging = false;
        }
    }

    public void ReportDirty(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap)
    {
        lock (_lock)
        {
            foreach (ulong p in _dirtyPages)
            {
                ulong i = p - (iova / pageSize);
                bitmap[(int)(i / 64)] |= 1UL << (int)(i % 64);
            }
            _dirtyPages.Clear();
        }
    }

    public void Reset()
    {
        lock (_lock)
        {
            ResetCount++;
            _log.Add($"{Description.Name}:reset");
            _state = DeviceState.Running;
            _incoming.SetLength(0);
        }
    }

    public void Dispose()
    {
        _stopDma = true;
        _dma?.Join();
        _ram?.Dispose();
        Disposed = true;
    }

    private void Arc(DeviceState from, DeviceState to)
    {
        if (to is DeviceState.PreCopy or DeviceState.PreCopyP2P && from is DeviceState.Running or DeviceState.RunningP2P)
        {
            _save[0] = 1;
            BinaryPrimitives.WriteUInt32LittleEndian(_save.AsSpan(1), 4096);
            Bar0.CopyTo(_save, 5);
            _saveLen = 5 + 4096;
            _savePos = 0;
        }
        if (to == DeviceState.StopCopy)
        {
            // The final record goes after whatever pre-copy data is still unread.
            var rest = _save.AsSpan(_savePos, _saveLen - _savePos).ToArray();
            rest.CopyTo(_save, 0);
            int p = rest.Length;
            _save[p] = 2;
            BinaryPrimitives.WriteUInt32LittleEndian(_save.AsSpan(p + 1), 4096 + 8);
            Bar0.CopyTo(_save, p + 5);
            BinaryPrimitives.WriteUInt64LittleEndian(_save.AsSpan(p + 5 + 4096), Counter);
            _saveLen = p + 5 + 4096 + 8;
            _savePos = 0;
        }
        if (from == DeviceState.Resuming && to == DeviceState.Stop)
        {
            if (FailCommit)
            {
                throw new IOException("EIO: injected commit failure");
            }
            var s = _incoming.ToArray().AsSpan();
            bool final = false;
            while (s.Length >= 5)
            {
                int len = (int)BinaryPrimitives.ReadUInt32LittleEndian(s[1..]);
                var data = s.Slice(5, len);
                data[..4096].CopyTo(Bar0);
                if (s[0] == 2)
                {
                    Counter = BinaryPrimitives.ReadUInt64LittleEndian(data[4096..]);
                    final = true;
                }
                s = s[(5 + len)..];
            }
            if (!final)
            {
                throw new IOException("EINVAL: no final state record");
            }
            CounterAtCommit = Counter;
        }
    }

    private void DmaLoop()
    {
        while (!_stopDma)
        {
            lock (_lock)
            {
                if (_ram is not null && _state is DeviceState.Running or DeviceState.PreCopy or DeviceState.RunningP2P or DeviceState.PreCopyP2P)
                {
                    Counter++;
                    BinaryPrimitives.WriteUInt64LittleEndian(_ram.GetSpan((long)DmaGpa, 8), Counter);
                    if (_logging)
                    {
                        _dirtyPages.Add(DmaGpa / 4096);
                    }
                    _vector0?.Signal();
                }
            }
            Thread.Sleep(1);
        }
    }
}
