using System.Buffers.Binary;
using System.Numerics;
using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.TestPeer;

/// <summary>
/// A small but complete test device: BAR0 = 64 KiB (page 0 registers, pages 1.. data, memfd-backed and mmap-able
/// through a sparse area), config space 256 bytes, 4 MSI-X vectors. Writing DOORBELL runs one DMA command
/// (1 = copy LEN bytes guest[SRC] → BAR[DST]; 2 = BAR[DST] → guest[SRC]) and raises MSI-X vector 0.
/// Migratable with any flag set: the state is BAR0 (+ config), pre-copy streams it page by page and re-sends pages
/// written since (4 KiB tracking), so tests see initial_bytes fall and dirty_bytes grow.
/// </summary>
public sealed class SampleDevice : VfioUserDevice, IMigrationDevice, IDisposable
{
    public const int BarSize = 64 * 1024;
    public const int PageSize = 4096;
    public const ulong RegDoorbell = 0x00, RegSrc = 0x08, RegDst = 0x10, RegLen = 0x18, RegStatus = 0x20;
    private const uint Magic = 0x53414D50; // "SAMP"

    private readonly UnixFd _barFd;
    private readonly Mapping _bar;
    private readonly byte[] _config = new byte[256];
    private readonly bool[] _dirty = new bool[BarSize / PageSize];
    private readonly List<(string Arc, DeviceState From, DeviceState To)> _arcs = [];
    private DeviceState _state = DeviceState.Running;
    private byte[]? _save;
    private int _savePos;
    private int _nextPage;
    private MemoryStream? _load;

    public SampleDevice(MigrationFlags flags = MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy)
    {
        MigrationFlags = flags;
        _barFd = MemFd.Create("sample-bar0", BarSize);
        _bar = Mapping.Map(_barFd, 0, BarSize);
        BinaryPrimitives.WriteUInt16LittleEndian(_config, 0x1af4);
        BinaryPrimitives.WriteUInt16LittleEndian(_config.AsSpan(2), 0x10f0);
        Regions =
        [
            new RegionDescriptor(BarSize, RegionFlags.Read | RegionFlags.Write | RegionFlags.Mmap, _barFd, 0, [(PageSize, BarSize - PageSize)]),
            RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent,
            RegionDescriptor.Absent,
            new RegionDescriptor(256, RegionFlags.Read | RegionFlags.Write),
            RegionDescriptor.Absent,
        ];
        Irqs = [new IrqDescriptor(1, IrqInfoFlags.Eventfd | IrqInfoFlags.Maskable | IrqInfoFlags.AutoMasked), IrqDescriptor.Absent,
            new IrqDescriptor(4, IrqInfoFlags.Eventfd | IrqInfoFlags.NoResize), IrqDescriptor.Absent, IrqDescriptor.Absent];
    }

    public override IReadOnlyList<RegionDescriptor> Regions { get; }
    public override IReadOnlyList<IrqDescriptor> Irqs { get; }
    public override IMigrationDevice? Migration => this;
    public MigrationFlags MigrationFlags { get; }

    /// <summary>Every arc performed, in order (for tests).</summary>
    public IReadOnlyList<(string Arc, DeviceState From, DeviceState To)> Arcs => _arcs;

    /// <summary>Fail the next arc into this state (tests of partial failure).</summary>
    public DeviceState? FailArcInto { get; set; }

    /// <summary>BAR0 bytes (direct view for tests).</summary>
    public Span<byte> Bar => _bar.GetSpan(0, BarSize);

    public override int ReadRegion(int index, ulong offset, Span<byte> data)
    {
        if (index == 7)
        {
            _config.AsSpan((int)offset, data.Length).CopyTo(data);
            return 0;
        }
        _bar.GetSpan((long)offset, data.Length).CopyTo(data);
        return 0;
    }

    public override int WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        if (index == 7)
        {
            data.CopyTo(_config.AsSpan((int)offset));
            return 0;
        }
        if (_state is DeviceState.Stop or DeviceState.StopCopy or DeviceState.Resuming)
        {
            // A stopped device must not change its internal state; accesses are dropped (host unharmed).
            return 0;
        }
        data.CopyTo(_bar.GetSpan((long)offset, data.Length));
        MarkDirty((int)offset, data.Length);
        if (offset == RegDoorbell && data.Length >= 1)
        {
            RunCommand(data[0]);
        }
        return 0;
    }

    private void RunCommand(byte cmd)
    {
        var regs = _bar.GetSpan(0, 0x28);
        ulong src = BinaryPrimitives.ReadUInt64LittleEndian(regs[(int)RegSrc..]);
        ulong dst = BinaryPrimitives.ReadUInt64LittleEndian(regs[(int)RegDst..]);
        ulong len = BinaryPrimitives.ReadUInt64LittleEndian(regs[(int)RegLen..]);
        uint status = 1;
        var dma = Context?.Dma;
        if (dma is not null && dst >= PageSize && len <= BarSize && dst <= BarSize - len)
        {
            var area = _bar.GetSpan((long)dst, (int)len);
            bool ok = cmd switch
            {
                1 => dma.TryRead(src, area),
                2 => dma.TryWrite(src, area),
                _ => false,
            };
            if (ok && cmd == 1)
            {
                MarkDirty((int)dst, (int)len);
            }
            status = ok ? 0u : 2u;
        }
        BinaryPrimitives.WriteUInt32LittleEndian(_bar.GetSpan((long)RegStatus, 4), status);
        MarkDirty((int)RegStatus, 4);
        Context?.Irqs.Trigger(VfioPci.MsixIrqIndex, 0);
    }

    private void MarkDirty(int offset, int length)
    {
        if (length <= 0)
        {
            return;
        }
        lock (_dirty)
        {
            for (int p = offset / PageSize; p <= (offset + length - 1) / PageSize; p++)
            {
                _dirty[p] = true;
            }
        }
    }

    public void Step(DeviceState from, DeviceState to)
    {
        _arcs.Add(($"{from}->{to}", from, to));
        if (FailArcInto == to)
        {
            FailArcInto = null;
            throw new MigrationException(5, $"injected failure on {from}->{to}", from);
        }
        if (to is DeviceState.StopCopy && from is DeviceState.Stop)
        {
            _save = BuildFullImage();
            _savePos = 0;
        }
        else if (to is DeviceState.StopCopy)
        {
            // PRE_COPY(_P2P) → STOP_COPY: the rest of the pre-copy pages, then every page dirtied since.
            _save = BuildDirtyImage(includeHeader: false);
            _savePos = 0;
        }
        else if (to is DeviceState.PreCopy or DeviceState.PreCopyP2P && from is DeviceState.Running or DeviceState.RunningP2P)
        {
            lock (_dirty)
            {
                Array.Fill(_dirty, true);
            }
            _save = Header();
            _savePos = 0;
            _nextPage = 0;
        }
        else if (to is DeviceState.Resuming)
        {
            _load = new MemoryStream();
        }
        else if (from is DeviceState.Resuming)
        {
            var l = _load!;
            if (!TryApply(l.ToArray(), out string? why))
            {
                // Still RESUMING with the same data: a retried RESUMING->STOP fails the same way.
                throw new MigrationException(22, "invalid device state: " + why, DeviceState.Resuming);
            }
            _load = null;
        }
        if (to is DeviceState.Stop or DeviceState.Running or DeviceState.RunningP2P)
        {
            _save = null;
        }
        _state = to;
    }

    private static byte[] Header()
    {
        var h = new byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(h, Magic);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(4), BarSize);
        return h;
    }

    private byte[] BuildFullImage()
    {
        lock (_dirty)
        {
            Array.Fill(_dirty, true);
        }
        return BuildDirtyImage(includeHeader: true);
    }

    private byte[] BuildDirtyImage(bool includeHeader)
    {
        var ms = new MemoryStream();
        if (includeHeader)
        {
            ms.Write(Header());
        }
        if (_save is not null && _savePos < _save.Length)
        {
            ms.Write(_save.AsSpan(_savePos));
        }
        lock (_dirty)
        {
            for (int p = 0; p < _dirty.Length; p++)
            {
                if (_dirty[p])
                {
                    WritePage(ms, p);
                    _dirty[p] = false;
                }
            }
        }
        return ms.ToArray();
    }

    private void WritePage(Stream s, int page)
    {
        Span<byte> idx = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(idx, page);
        s.Write(idx);
        s.Write(_bar.GetSpan(page * PageSize, PageSize));
    }

    public int ReadData(Span<byte> buffer)
    {
        int n = 0;
        while (n < buffer.Length)
        {
            if (_save is not null && _savePos < _save.Length)
            {
                int k = Math.Min(buffer.Length - n, _save.Length - _savePos);
                _save.AsSpan(_savePos, k).CopyTo(buffer[n..]);
                _savePos += k;
                n += k;
                continue;
            }
            if (_state is DeviceState.PreCopy or DeviceState.PreCopyP2P)
            {
                int p = NextDirtyPage();
                if (p < 0)
                {
                    break;
                }
                var ms = new MemoryStream();
                WritePage(ms, p);
                _save = ms.ToArray();
                _savePos = 0;
                continue;
            }
            break;
        }
        return n;
    }

    private int NextDirtyPage()
    {
        lock (_dirty)
        {
            for (int i = 0; i < _dirty.Length; i++)
            {
                int p = (_nextPage + i) % _dirty.Length;
                if (_dirty[p])
                {
                    _dirty[p] = false;
                    _nextPage = p + 1;
                    return p;
                }
            }
            return -1;
        }
    }

    public void WriteData(ReadOnlySpan<byte> data)
    {
        if (_load is null || _load.Length + data.Length > (8 + (BarSize / PageSize * (PageSize + 4)) * 4L))
        {
            throw new MigrationException(27, "resume stream too large");
        }
        _load.Write(data);
    }

    private bool TryApply(byte[] s, out string? why)
    {
        why = null;
        if (s.Length < 8 || BinaryPrimitives.ReadUInt32LittleEndian(s) != Magic || BinaryPrimitives.ReadUInt32LittleEndian(s.AsSpan(4)) != BarSize)
        {
            why = "bad header";
            return false;
        }
        if ((s.Length - 8) % (PageSize + 4) != 0)
        {
            why = "truncated page record";
            return false;
        }
        for (int o = 8; o < s.Length; o += PageSize + 4)
        {
            int p = BinaryPrimitives.ReadInt32LittleEndian(s.AsSpan(o));
            if ((uint)p >= BarSize / PageSize)
            {
                why = $"page {p} out of range";
                return false;
            }
        }
        for (int o = 8; o < s.Length; o += PageSize + 4)
        {
            int p = BinaryPrimitives.ReadInt32LittleEndian(s.AsSpan(o));
            s.AsSpan(o + 4, PageSize).CopyTo(_bar.GetSpan(p * PageSize, PageSize));
        }
        return true;
    }

    public PrecopyInfo GetPrecopyInfo()
    {
        ulong pending = (ulong)(_save is null ? 0 : _save.Length - _savePos);
        int dirty;
        lock (_dirty)
        {
            dirty = _dirty.Count(d => d);
        }
        return new PrecopyInfo(pending, (ulong)dirty * (PageSize + 4));
    }

    public ulong GetStopCopySize() => 8 + ((ulong)(BarSize / PageSize) * (PageSize + 4));

    public void OnReset()
    {
        _save = null;
        _load = null;
        _state = DeviceState.Running;
    }

    public override void Reset() => _bar.GetSpan(0, PageSize).Clear();

    public void Dispose()
    {
        _bar.Dispose();
        _barFd.Dispose();
    }

    /// <summary>Unused; keeps BitOperations referenced for page math in derived tests.</summary>
    internal static bool IsPow2(ulong v) => BitOperations.IsPow2(v);
}
