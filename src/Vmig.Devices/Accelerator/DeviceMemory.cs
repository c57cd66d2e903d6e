using System.Numerics;
using Vmig.Native;

namespace Vmig.Devices.Accelerator;

/// <summary>
/// A VF's on-device memory: a memfd (sparse; pages are allocated when first written) mapped once into the device
/// host, with page-granular (4 KiB) write tracking for pre-copy. Writers call <see cref="MarkDirty"/> after they
/// write; the save stream clears a page's bit before it copies the page, so a write racing the copy is always sent
/// again (mark-after-write + clear-before-copy).
/// </summary>
public sealed class DeviceMemory : IDisposable
{
    /// <summary>Tracking granule in bytes.</summary>
    public const int PageSize = 4096;
    public const int PageShift = 12;

    private readonly UnixFd _fd;
    private readonly ulong[] _dirty;
    private volatile bool _tracking;

    /// <summary>Creates <paramref name="size"/> bytes (a positive multiple of 4 KiB) of zeroed device memory.</summary>
    /// <exception cref="ArgumentOutOfRangeException">Size is not a positive multiple of 4 KiB.</exception>
    public DeviceMemory(string name, long size)
    {
        if (size <= 0 || (size & (PageSize - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(size), $"device memory size {size} is not a positive multiple of {PageSize}");
        }
        _fd = MemFd.Create(name, size);
        Mapping = Mapping.Map(_fd, 0, size);
        Size = size;
        PageCount = size >> PageShift;
        _dirty = new ulong[(PageCount + 63) / 64];
    }

    /// <summary>Size in bytes.</summary>
    public long Size { get; }

    /// <summary>Number of 4 KiB pages.</summary>
    public long PageCount { get; }

    /// <summary>The mapping (device host only; never handed to a client).</summary>
    public Mapping Mapping { get; }

    /// <summary>Whether writes are being tracked.</summary>
    public bool IsTracking => _tracking;

    /// <summary>True if [offset, +length) lies inside device memory (overflow-safe).</summary>
    public bool Contains(ulong offset, ulong length) => offset <= (ulong)Size && length <= (ulong)Size - offset;

    /// <summary>A span over [offset, +count) (count ≤ 2 GiB; callers chunk).</summary>
    public Span<byte> GetSpan(long offset, int count) => Mapping.GetSpan(offset, count);

    /// <summary>Clears the log and starts tracking.</summary>
    public void StartTracking()
    {
        Array.Clear(_dirty);
        _tracking = true;
    }

    /// <summary>Stops tracking and forgets the log.</summary>
    public void StopTracking()
    {
        _tracking = false;
        Array.Clear(_dirty);
    }

    /// <summary>Records a write to [offset, +length). No-op while not tracking or for length 0.</summary>
    public void MarkDirty(long offset, long length)
    {
        if (!_tracking || length <= 0)
        {
            return;
        }
        long first = offset >> PageShift;
        long last = (offset + length - 1) >> PageShift;
        for (long p = first; p <= last; p++)
        {
            Interlocked.Or(ref _dirty[p >> 6], 1UL << (int)(p & 63));
        }
    }

    /// <summary>Clears the dirty bits of pages [firstPage, +count) (the caller is about to copy them).</summary>
    public void ClearDirty(long firstPage, long count)
    {
        for (long p = firstPage; p < firstPage + count;)
        {
            int bit = (int)(p & 63);
            int take = (int)Math.Min(64 - bit, firstPage + count - p);
            ulong mask = take == 64 ? ulong.MaxValue : ((1UL << take) - 1) << bit;
            Interlocked.And(ref _dirty[p >> 6], ~mask);
            p += take;
        }
    }

    /// <summary>Number of dirty pages.</summary>
    public long DirtyPageCount()
    {
        long n = 0;
        for (int i = 0; i < _dirty.Length; i++)
        {
            n += BitOperations.PopCount(Volatile.Read(ref _dirty[i]));
        }
        return n;
    }

    /// <summary>
    /// Finds the first run of consecutive dirty pages below <paramref name="limitPage"/>, capped at
    /// <paramref name="maxPages"/>. Returns false if none. Runs are what the save stream sends as one record.
    /// </summary>
    public bool FindDirtyRun(long fromPage, long limitPage, int maxPages, out long firstPage, out int count)
    {
        firstPage = -1;
        count = 0;
        for (long p = fromPage; p < limitPage;)
        {
            ulong w = Volatile.Read(ref _dirty[p >> 6]) >> (int)(p & 63);
            if (w == 0)
            {
                p = (p | 63) + 1;
                continue;
            }
            p += BitOperations.TrailingZeroCount(w);
            if (p >= limitPage)
            {
                break;
            }
            firstPage = p;
            while (p < limitPage && count < maxPages && (Volatile.Read(ref _dirty[p >> 6]) & (1UL << (int)(p & 63))) != 0)
            {
                count++;
                p++;
            }
            return true;
        }
        return false;
    }

    /// <summary>
    /// Pages and records (runs capped at <paramref name="maxPages"/>) the save stream would send now for the dirty
    /// pages below <paramref name="limitPage"/>; the same grouping as repeated <see cref="FindDirtyRun"/>.
    /// </summary>
    public (long Pages, long Runs) CountDirtyRuns(long limitPage, int maxPages)
    {
        long pages = 0, runs = 0;
        long from = 0;
        while (FindDirtyRun(from, limitPage, maxPages, out long first, out int count))
        {
            pages += count;
            runs++;
            from = first + count;
        }
        return (pages, runs);
    }

    public void Dispose()
    {
        Mapping.Dispose();
        _fd.Dispose();
    }
}
