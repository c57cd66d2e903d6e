using System.Buffers;
using System.Numerics;
using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser.Server;

/// <summary>DMA window protection (vfio_user_dma_map.flags bits 0-1).</summary>
[Flags]
public enum DmaProt : uint
{
    None = 0,
    Read = 1,
    Write = 2,
}

/// <summary>Access to guest memory windows that the client did not back with an fd: the SDK turns them into
/// DMA_READ / DMA_WRITE messages to the client.</summary>
public interface IMessageDma
{
    /// <summary>Reads through a DMA_READ message. Returns 0 or an errno.</summary>
    int Read(ulong iova, Span<byte> destination);

    /// <summary>Writes through a DMA_WRITE message. Returns 0 or an errno.</summary>
    int Write(ulong iova, ReadOnlySpan<byte> source);
}

/// <summary>
/// DMA_LOGGING_START/STOP/REPORT answered by a device's migration driver (see <see cref="DmaSpace.LoggingDriver"/>).
/// Arguments and errnos are those of the same-named <see cref="DmaSpace"/> methods: Start gets the granule in bytes
/// (power of two, ≥ 4096) and returns 0, EINVAL or EBUSY; Stop returns 0 or EINVAL (not started); Report reads and
/// clears [iova, +length) into one bit per <c>pageSize</c> (u64 words, LSB first) and returns 0 or EINVAL.
/// </summary>
public interface IDmaLoggingDriver
{
    int Start(ulong pageSize);

    int Stop();

    int Report(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap);
}

/// <summary>
/// The DMA windows of one client connection (DMA_MAP / DMA_UNMAP), with write logging for
/// DMA_LOGGING_START/REPORT. Lookups are lock-free over an immutable, sorted window array that is
/// replaced on every map/unmap; a mapping is ref-counted around each access so an unmap never pulls
/// memory from under a device thread.
/// </summary>
public sealed class DmaSpace : IDmaSpace, IDisposable
{
    /// <summary>One window. <see cref="Mapping"/> is null for windows served by messages.</summary>
    public sealed class Window
    {
        internal Window(ulong iova, ulong size, DmaProt prot, Mapping? mapping, long mappingOffset)
        {
            Iova = iova;
            Size = size;
            Prot = prot;
            Mapping = mapping;
            MappingOffset = mappingOffset;
        }

        public ulong Iova { get; }
        public ulong Size { get; }
        public DmaProt Prot { get; }
        public Mapping? Mapping { get; }
        public long MappingOffset { get; }
        internal ulong[]? DirtyBits;

        internal bool Contains(ulong iova, ulong len) => iova >= Iova && len <= Size && iova - Iova <= Size - len;
    }

    private readonly object _gate = new();
    private Window[] _windows = [];
    private ulong _logPageSize;
    private int _logPageShift;
    private bool _logging;

    /// <summary>The most windows at once (VERSION max_dma_maps).</summary>
    public int MaxWindows { get; init; } = 65535;

    /// <summary>Set by the connection so windows without an fd can be reached through messages.</summary>
    public IMessageDma? MessageDma { get; set; }

    /// <summary>Current windows, sorted by IOVA.</summary>
    public IReadOnlyList<Window> Windows => Volatile.Read(ref _windows);

    /// <summary>Whether this space's own write log is started (<see cref="StartWriteLog"/>).</summary>
    public bool IsLogging => _logging;

    /// <summary>
    /// When set, DMA_LOGGING_START/STOP/REPORT (<see cref="StartLogging"/>, <see cref="StopLogging"/>,
    /// <see cref="Report"/>) are answered by this driver instead of the space's own write log: the analogue of a VFIO
    /// variant driver's log_ops. An NVMe VF's migration driver sets it so memory-change tracking goes through the
    /// primary controller (Track Send / Track Receive), whose "hardware" is the write log below
    /// (<see cref="StartWriteLog"/>, <see cref="StopWriteLog"/>, <see cref="ReportWriteLog"/>).
    /// </summary>
    public IDmaLoggingDriver? LoggingDriver { get; set; }

    /// <summary>The logging granule in bytes (valid while <see cref="IsLogging"/>).</summary>
    public ulong LogPageSize => _logPageSize;

    /// <summary>
    /// Adds a window. <paramref name="mapping"/> (owned by the space from here on) backs it; null means
    /// message-based access. Returns 0, EINVAL (zero size, overflow, overlap) or ENOSPC (too many windows).
    /// </summary>
    public int Map(ulong iova, ulong size, DmaProt prot, Mapping? mapping, long mappingOffset = 0)
    {
        if (size == 0 || iova + size < iova)
        {
            return Errno.EINVAL;
        }
        if (mapping is not null && !mapping.Contains(mappingOffset, (long)Math.Min(size, long.MaxValue)))
        {
            return Errno.EINVAL;
        }
        lock (_gate)
        {
            var cur = _windows;
            if (cur.Length >= MaxWindows)
            {
                return Errno.ENOSPC;
            }
            foreach (var w in cur)
            {
                if (iova < w.Iova + w.Size && w.Iova < iova + size)
                {
                    return Errno.EEXIST;
                }
            }
            var nw = new Window(iova, size, prot, mapping, mappingOffset);
            if (_logging && mapping is not null)
            {
                nw.DirtyBits = NewBits(size, _logPageShift);
            }
            var next = new Window[cur.Length + 1];
            int i = 0, j = 0;
            while (i < cur.Length && cur[i].Iova < iova)
            {
                next[j++] = cur[i++];
            }
            next[j++] = nw;
            while (i < cur.Length)
            {
                next[j++] = cur[i++];
            }
            Volatile.Write(ref _windows, next);
        }
        return 0;
    }

    /// <summary>Removes the window that exactly matches [iova, +size). Returns 0 or ENOENT (libvfio-user semantics).</summary>
    public int Unmap(ulong iova, ulong size)
    {
        Window? removed = null;
        lock (_gate)
        {
            var cur = _windows;
            int idx = Array.FindIndex(cur, w => w.Iova == iova && w.Size == size);
            if (idx < 0)
            {
                return Errno.ENOENT;
            }
            removed = cur[idx];
            var next = new Window[cur.Length - 1];
            Array.Copy(cur, 0, next, 0, idx);
            Array.Copy(cur, idx + 1, next, idx, cur.Length - idx - 1);
            Volatile.Write(ref _windows, next);
        }
        removed.Mapping?.Dispose();
        return 0;
    }

    /// <summary>Removes every window (client gone or reset of the connection).</summary>
    public void UnmapAll()
    {
        Window[] old;
        lock (_gate)
        {
            old = _windows;
            Volatile.Write(ref _windows, []);
        }
        foreach (var w in old)
        {
            w.Mapping?.Dispose();
        }
    }

    /// <summary>Finds the window holding [iova, +len), or null.</summary>
    public Window? Find(ulong iova, ulong len)
    {
        var ws = Volatile.Read(ref _windows);
        int lo = 0, hi = ws.Length - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >>> 1;
            var w = ws[mid];
            if (iova < w.Iova)
            {
                hi = mid - 1;
            }
            else if (iova - w.Iova >= w.Size)
            {
                lo = mid + 1;
            }
            else
            {
                return w.Contains(iova, len) ? w : null;
            }
        }
        return null;
    }

    public bool TryRead(ulong iova, Span<byte> destination)
    {
        var w = Find(iova, (ulong)destination.Length);
        if (w is null || (w.Prot & DmaProt.Read) == 0)
        {
            return false;
        }
        if (w.Mapping is null)
        {
            return MessageDma?.Read(iova, destination) == 0;
        }
        bool added = false;
        try
        {
            w.Mapping.DangerousAddRef(ref added);
            w.Mapping.GetSpan(w.MappingOffset + (long)(iova - w.Iova), destination.Length).CopyTo(destination);
            return true;
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
        finally
        {
            if (added)
            {
                w.Mapping.DangerousRelease();
            }
        }
    }

    public bool TryWrite(ulong iova, ReadOnlySpan<byte> source)
    {
        var w = Find(iova, (ulong)source.Length);
        if (w is null || (w.Prot & DmaProt.Write) == 0)
        {
            return false;
        }
        if (w.Mapping is null)
        {
            // Message-based windows are tracked by the client (libvfio-user #751, settled 2026).
            return MessageDma?.Write(iova, source) == 0;
        }
        bool added = false;
        try
        {
            w.Mapping.DangerousAddRef(ref added);
            source.CopyTo(w.Mapping.GetSpan(w.MappingOffset + (long)(iova - w.Iova), source.Length));
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
        finally
        {
            if (added)
            {
                w.Mapping.DangerousRelease();
            }
        }
        MarkDirty(w, iova, (ulong)source.Length);
        return true;
    }

    public bool TryReadUInt32(ulong iova, out uint value)
    {
        value = 0;
        var w = Find(iova, 4);
        if (w is null || (iova & 3) != 0 || (w.Prot & DmaProt.Read) == 0)
        {
            return false;
        }
        if (w.Mapping is null)
        {
            Span<byte> b = stackalloc byte[4];
            if (MessageDma?.Read(iova, b) != 0)
            {
                return false;
            }
            value = BitConverter.ToUInt32(b);
            return true;
        }
        bool added = false;
        try
        {
            w.Mapping.DangerousAddRef(ref added);
            value = w.Mapping.ReadUInt32Volatile(w.MappingOffset + (long)(iova - w.Iova));
            return true;
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
        finally
        {
            if (added)
            {
                w.Mapping.DangerousRelease();
            }
        }
    }

    public bool TryWriteUInt32(ulong iova, uint value)
    {
        var w = Find(iova, 4);
        if (w is null || (iova & 3) != 0 || (w.Prot & DmaProt.Write) == 0)
        {
            return false;
        }
        if (w.Mapping is null)
        {
            return MessageDma?.Write(iova, BitConverter.GetBytes(value)) == 0;
        }
        bool added = false;
        try
        {
            w.Mapping.DangerousAddRef(ref added);
            w.Mapping.WriteUInt32Volatile(w.MappingOffset + (long)(iova - w.Iova), value);
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
        finally
        {
            if (added)
            {
                w.Mapping.DangerousRelease();
            }
        }
        MarkDirty(w, iova, 4);
        return true;
    }

    public bool TryLendWritable<TState>(ulong iova, int length, TState state, SpanAction<byte, TState> action)
    {
        var w = AcquireLendable(iova, length, DmaProt.Write);
        if (w is null)
        {
            return false;
        }
        try
        {
            action(w.Mapping!.GetSpan(w.MappingOffset + (long)(iova - w.Iova), length), state);
        }
        finally
        {
            w.Mapping!.DangerousRelease();
            // After the stores, as TryWrite does: a report that cleared the bit before them would lose them.
            MarkDirty(w, iova, (ulong)length);
        }
        return true;
    }

    public bool TryLendReadable<TState>(ulong iova, int length, TState state, ReadOnlySpanAction<byte, TState> action)
    {
        var w = AcquireLendable(iova, length, DmaProt.Read);
        if (w is null)
        {
            return false;
        }
        try
        {
            action(w.Mapping!.GetSpan(w.MappingOffset + (long)(iova - w.Iova), length), state);
        }
        finally
        {
            w.Mapping!.DangerousRelease();
        }
        return true;
    }

    /// <summary>
    /// The one fd-backed window holding [iova, +length) with <paramref name="prot"/>, its mapping referenced (the caller
    /// releases it); null if there is none or it is being unmapped.
    /// </summary>
    private Window? AcquireLendable(ulong iova, int length, DmaProt prot)
    {
        if (length <= 0)
        {
            return null;
        }
        var w = Find(iova, (ulong)length);
        if (w?.Mapping is null || (w.Prot & prot) != prot)
        {
            return null;
        }
        bool added = false;
        try
        {
            w.Mapping.DangerousAddRef(ref added);
        }
        catch (ObjectDisposedException)
        {
            return null;
        }
        return added ? w : null;
    }

    /// <summary>Records a write the device made some other way (e.g. its own copy into a window). No-op when not logging.</summary>
    public void MarkDirty(ulong iova, ulong length)
    {
        if (!_logging || length == 0)
        {
            return;
        }
        var w = Find(iova, length);
        if (w is not null)
        {
            MarkDirty(w, iova, length);
        }
    }

    private void MarkDirty(Window w, ulong iova, ulong length)
    {
        var bits = w.DirtyBits;
        if (bits is null)
        {
            return;
        }
        int shift = _logPageShift;
        ulong first = (iova - w.Iova) >> shift;
        ulong last = (iova - w.Iova + length - 1) >> shift;
        for (ulong p = first; p <= last; p++)
        {
            Interlocked.Or(ref bits[p >> 6], 1UL << (int)(p & 63));
        }
    }

    /// <summary>DMA_LOGGING_START: <see cref="LoggingDriver"/> if set, else <see cref="StartWriteLog"/>.</summary>
    public int StartLogging(ulong pageSize) => LoggingDriver is { } d ? d.Start(pageSize) : StartWriteLog(pageSize);

    /// <summary>DMA_LOGGING_STOP: <see cref="LoggingDriver"/> if set, else <see cref="StopWriteLog"/>.</summary>
    public int StopLogging() => LoggingDriver is { } d ? d.Stop() : StopWriteLog();

    /// <summary>DMA_LOGGING_REPORT: <see cref="LoggingDriver"/> if set, else <see cref="ReportWriteLog"/>.</summary>
    public int Report(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap) =>
        LoggingDriver is { } d ? d.Report(iova, length, pageSize, bitmap) : ReportWriteLog(iova, length, pageSize, bitmap);

    /// <summary>
    /// Starts the write log: log writes to every fd-backed window at <paramref name="pageSize"/> granularity
    /// (power of two, ≥ 4096). Returns 0, EINVAL (bad page size) or EBUSY (already started).
    /// </summary>
    public int StartWriteLog(ulong pageSize)
    {
        if (pageSize < 4096 || !BitOperations.IsPow2(pageSize))
        {
            return Errno.EINVAL;
        }
        lock (_gate)
        {
            if (_logging)
            {
                return Errno.EBUSY;
            }
            _logPageSize = pageSize;
            _logPageShift = BitOperations.TrailingZeroCount(pageSize);
            // Only fd-backed windows are logged here (message windows are tracked by the client, libvfio-user #751);
            // a message window's size is not bounded by any real memory, so no bitmap is allocated for it.
            foreach (var w in _windows)
            {
                w.DirtyBits = w.Mapping is null ? null : NewBits(w.Size, _logPageShift);
            }
            _logging = true;
        }
        return 0;
    }

    /// <summary>Stops the write log. Returns 0, or EINVAL if it was not started.</summary>
    public int StopWriteLog()
    {
        lock (_gate)
        {
            if (!_logging)
            {
                return Errno.EINVAL;
            }
            _logging = false;
            foreach (var w in _windows)
            {
                w.DirtyBits = null;
            }
        }
        return 0;
    }

    /// <summary>
    /// Read-and-clear the write log for [iova, +length) into <paramref name="bitmap"/>, one bit per
    /// <paramref name="pageSize"/> (a power-of-two multiple of the logging granule); bit n = page iova + n*pageSize,
    /// u64 words, LSB first. The range may span several windows; pages outside any window report 0.
    /// Returns 0, EINVAL (not logging, misaligned, bad page size, bitmap too small) or ERANGE.
    /// </summary>
    public int ReportWriteLog(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap)
    {
        if (!_logging || pageSize < _logPageSize || !BitOperations.IsPow2(pageSize) || length == 0
            || iova + length < iova || (iova & (pageSize - 1)) != 0)
        {
            return Errno.EINVAL;
        }
        ulong pages = (length + pageSize - 1) / pageSize;
        if ((ulong)bitmap.Length * 64 < pages)
        {
            return Errno.EINVAL;
        }
        bitmap.Clear();
        int shift = _logPageShift;
        int fold = BitOperations.TrailingZeroCount(pageSize) - shift;
        foreach (var w in Volatile.Read(ref _windows))
        {
            var bits = w.DirtyBits;
            if (bits is null)
            {
                continue;
            }
            ulong lo = Math.Max(iova, w.Iova);
            ulong hi = Math.Min(iova + length, w.Iova + w.Size);
            if (lo >= hi)
            {
                continue;
            }
            ulong firstPage = (lo - w.Iova) >> shift;
            ulong lastPage = (hi - 1 - w.Iova) >> shift;
            for (ulong p = firstPage; p <= lastPage;)
            {
                ulong word = p >> 6;
                int bit = (int)(p & 63);
                int take = (int)Math.Min(64UL - (ulong)bit, lastPage - p + 1);
                ulong mask = take == 64 ? ulong.MaxValue : ((1UL << take) - 1) << bit;
                ulong v = Interlocked.And(ref bits[word], ~mask) & mask;
                while (v != 0)
                {
                    int b = BitOperations.TrailingZeroCount(v);
                    v &= v - 1;
                    ulong gpa = w.Iova + ((word * 64 + (ulong)b) << shift);
                    ulong outBit = (gpa - iova) >> (shift + fold);
                    bitmap[(int)(outBit >> 6)] |= 1UL << (int)(outBit & 63);
                }
                p += (ulong)take;
            }
        }
        return 0;
    }

    public void Dispose() => UnmapAll();

    private static ulong[] NewBits(ulong size, int shift)
    {
        ulong pages = (size + (1UL << shift) - 1) >> shift;
        return new ulong[(pages + 63) / 64];
    }
}
