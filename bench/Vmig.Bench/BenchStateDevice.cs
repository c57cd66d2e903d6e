using System.Numerics;
using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Bench;

/// <summary>
/// A vfio-user device whose migration state is <see cref="StateBytes"/> bytes of memfd memory (configurable, up to
/// many GiB), so MIG_DATA_READ/WRITE throughput can be measured at any size. BAR0 = 4 KiB of plain registers (the
/// REGION_WRITE target). The save stream is the state bytes in order: pre-copy streams them all as initial data
/// (PRE_COPY flag), STOP_COPY continues where pre-copy stopped or, from STOP, streams everything. The resume stream
/// must be exactly <see cref="StateBytes"/> bytes (EFBIG above, EINVAL short at RESUMING→STOP).
/// Zero-copy both ways (as a device whose state is a memfd can be): the save stream hands out slices of the state
/// mapping as gather segments (<see cref="IMigrationDataSource"/>), the resume stream is received straight into the
/// state (<see cref="IMigrationDataSink"/>). The state never changes while the device runs (nothing runs), so handing
/// out live state in PRE_COPY is as safe as in STOP_COPY here.
/// </summary>
public sealed class BenchStateDevice : VfioUserDevice, IMigrationDevice, IMigrationDataSink, IMigrationDataSource, IDisposable
{
    /// <summary>BAR0 size in bytes.</summary>
    public const int BarSize = 4096;

    private readonly UnixFd _stateFd;
    private readonly Mapping _state;
    private readonly byte[] _bar = new byte[BarSize];
    private readonly byte[] _config = new byte[256];
    private long _readPos;
    private long _writePos;
    private bool _saving;
    private bool _resuming;
    private bool _overflowed;

    /// <summary>Creates the device with <paramref name="stateBytes"/> of state, filled with a position-dependent pattern
    /// from <paramref name="seed"/> (give source and target different seeds so a checksum match proves a transfer).</summary>
    public BenchStateDevice(long stateBytes, ulong seed, MigrationFlags flags = MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(stateBytes, 4096);
        StateBytes = stateBytes;
        MigrationFlags = flags;
        _stateFd = MemFd.Create("bench-state", stateBytes);
        _state = Mapping.Map(_stateFd, 0, stateBytes);
        Fill(seed);
        Regions =
        [
            new RegionDescriptor(BarSize, RegionFlags.Read | RegionFlags.Write),
            RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent,
            RegionDescriptor.Absent,
            new RegionDescriptor(256, RegionFlags.Read | RegionFlags.Write),
            RegionDescriptor.Absent,
        ];
        Irqs = [IrqDescriptor.Absent, IrqDescriptor.Absent, new IrqDescriptor(1, IrqInfoFlags.Eventfd | IrqInfoFlags.NoResize), IrqDescriptor.Absent, IrqDescriptor.Absent];
    }

    public long StateBytes { get; }
    public override IReadOnlyList<RegionDescriptor> Regions { get; }
    public override IReadOnlyList<IrqDescriptor> Irqs { get; }
    public override IMigrationDevice? Migration => this;
    public MigrationFlags MigrationFlags { get; }

    /// <summary>Fills the state with a pattern derived from <paramref name="seed"/> and each 8-byte position.</summary>
    public void Fill(ulong seed)
    {
        for (long off = 0; off < StateBytes; off += 1 << 20)
        {
            int n = (int)Math.Min(1 << 20, StateBytes - off);
            var words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(_state.GetSpan(off, n));
            for (int i = 0; i < words.Length; i++)
            {
                words[i] = (((ulong)off / 8) + (ulong)i) * 0x9E3779B97F4A7C15UL ^ seed;
            }
        }
    }

    /// <summary>CRC32C of the whole state (to prove a transfer was byte-exact).</summary>
    public uint Checksum()
    {
        uint crc = 0;
        for (long off = 0; off < StateBytes; off += 1 << 20)
        {
            var s = _state.GetSpan(off, (int)Math.Min(1 << 20, StateBytes - off));
            var words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(s);
            foreach (ulong w in words)
            {
                crc = BitOperations.Crc32C(crc, w);
            }
        }
        return crc;
    }

    public override int ReadRegion(int index, ulong offset, Span<byte> data)
    {
        var src = index == 7 ? _config : _bar;
        src.AsSpan((int)offset, data.Length).CopyTo(data);
        return 0;
    }

    public override int WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        var dst = index == 7 ? _config : _bar;
        data.CopyTo(dst.AsSpan((int)offset));
        return 0;
    }

    public void Step(DeviceState from, DeviceState to)
    {
        if (MigrationStateMachine.OpensSaveSession(from, to))
        {
            _saving = true;
            _readPos = 0;
        }
        else if (MigrationStateMachine.IsSavingState(from) && !MigrationStateMachine.IsSavingState(to))
        {
            _saving = false;
        }
        if (to == DeviceState.Resuming)
        {
            _resuming = true;
            _overflowed = false;
            _writePos = 0;
        }
        else if (from == DeviceState.Resuming)
        {
            _resuming = false;
            if (_writePos != StateBytes || _overflowed)
            {
                throw new MigrationException(22, $"resume stream has {_writePos} of {StateBytes} bytes", DeviceState.Resuming);
            }
        }
    }

    public int ReadData(Span<byte> buffer)
    {
        if (!_saving)
        {
            return 0;
        }
        int n = (int)Math.Min(buffer.Length, StateBytes - _readPos);
        _state.GetSpan(_readPos, n).CopyTo(buffer);
        _readPos += n;
        return n;
    }

    public void WriteData(ReadOnlySpan<byte> data)
    {
        if (!_resuming || data.Length > StateBytes - _writePos)
        {
            throw new MigrationException(27, $"resume stream over {StateBytes} bytes");
        }
        data.CopyTo(_state.GetSpan(_writePos, data.Length));
        _writePos += data.Length;
    }

    public int ReadDataGather(int maxBytes, MigrationGatherList segments)
    {
        if (!_saving)
        {
            return 0;
        }
        int n = (int)Math.Min(maxBytes, StateBytes - _readPos);
        segments.Add(_state.GetMemory(_readPos, n));
        _readPos += n;
        return n;
    }

    public Span<byte> GetWriteSpan(int sizeHint)
    {
        if (!_resuming || _writePos == StateBytes)
        {
            // The bytes that fitted have landed: the load is spoiled, RESUMING→STOP must fail.
            _overflowed = true;
            throw new MigrationException(27, $"resume stream over {StateBytes} bytes");
        }
        return _state.GetSpan(_writePos, (int)Math.Min(sizeHint, StateBytes - _writePos));
    }

    public void AdvanceWrite(int count) => _writePos += count;

    public PrecopyInfo GetPrecopyInfo() => new((ulong)(StateBytes - _readPos), 0);

    public ulong GetStopCopySize() => (ulong)(StateBytes - (_saving ? _readPos : 0));

    public void OnReset()
    {
        _saving = false;
        _resuming = false;
    }

    public void Dispose()
    {
        _state.Dispose();
        _stateFd.Dispose();
    }
}
