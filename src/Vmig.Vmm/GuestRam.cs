using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using Vmig.Guest;
using Vmig.Native;

namespace Vmig.Vmm;

/// <summary>
/// Guest RAM: a memfd mapped MAP_SHARED into the VMM and handed to each device with DMA_MAP (iova = gpa).
/// Every write through <see cref="IGuestMemory"/> sets the page's bit in a dirty bitmap (the VMM's own dirty
/// logging of vCPU writes); device DMA bypasses it and is tracked by each device (DMA_LOGGING_*).
/// Thread-safe: vCPU threads write concurrently; the migration thread fetches the bitmap atomically.
/// </summary>
public sealed class GuestRam : IGuestMemory, IDisposable
{
    /// <summary>Dirty-logging granule and migration page size in bytes.</summary>
    public const int PageSize = 4096;

    /// <summary>log2(<see cref="PageSize"/>).</summary>
    public const int PageShift = 12;

    // Spans are int-sized; copies of huge ranges are chunked.
    private const int MaxChunk = 1 << 30;

    private readonly Mapping _mapping;
    private readonly PageBitmap _dirty;
    private readonly object _fileLock = new();
    private SafeFileHandle? _file;

    private GuestRam(UnixFd fd, Mapping mapping, ulong size, bool prefaulted)
    {
        Fd = fd;
        _mapping = mapping;
        Size = size;
        Prefaulted = prefaulted;
        _dirty = new PageBitmap((long)(size >> PageShift));
    }

    /// <inheritdoc/>
    public ulong Size { get; }

    /// <summary>Number of <see cref="PageSize"/> pages.</summary>
    public long PageCount => _dirty.PageCount;

    /// <summary>The memfd (for DMA_MAP with SCM_RIGHTS). Owned by this object.</summary>
    public UnixFd Fd { get; }

    /// <summary>
    /// True when every page was allocated and mapped at creation (<see cref="Create"/> with prefault, QEMU's
    /// <c>-mem-prealloc</c>): stores through the mapping then take no page fault, so an incoming migration copies RAM
    /// through the mapping instead of pwrite(2) on the memfd.
    /// </summary>
    public bool Prefaulted { get; }

    /// <summary>Creates RAM of <paramref name="sizeBytes"/> (a positive multiple of <see cref="PageSize"/>), zero-filled.</summary>
    /// <param name="sizeBytes">Bytes of RAM.</param>
    /// <param name="name">memfd name (shown in /proc/PID/fd).</param>
    /// <param name="prefault">
    /// Allocate and map every page now (mmap MAP_POPULATE on the shared memfd: each page allocated, zeroed and mapped
    /// writable), as QEMU's <c>-mem-prealloc</c> does at start: ~0.8 s of CPU per GiB on this machine (bench/results/
    /// s3-vmm/page-cache-primitives.txt) paid here instead of page by page on first write.
    /// </param>
    /// <exception cref="ArgumentOutOfRangeException">The size is 0 or not page aligned.</exception>
    /// <exception cref="NativeException">memfd_create, ftruncate or mmap failed (ENOMEM when prefaulting more than the host has).</exception>
    public static GuestRam Create(ulong sizeBytes, string name = "vmig-guest-ram", bool prefault = false)
    {
        if (sizeBytes == 0 || (sizeBytes & (PageSize - 1)) != 0 || sizeBytes > long.MaxValue)
        {
            throw new ArgumentOutOfRangeException(nameof(sizeBytes), $"guest RAM size {sizeBytes} must be a positive multiple of {PageSize}");
        }
        UnixFd fd = MemFd.Create(name, (long)sizeBytes);
        try
        {
            Mapping m = Mapping.Map(fd, 0, (long)sizeBytes, populate: prefault);
            return new GuestRam(fd, m, sizeBytes, prefault);
        }
        catch
        {
            fd.Dispose();
            throw;
        }
    }

    /// <inheritdoc/>
    public void Read(ulong gpa, Span<byte> destination)
    {
        Check(gpa, (ulong)destination.Length);
        while (!destination.IsEmpty)
        {
            int n = Math.Min(destination.Length, MaxChunk);
            _mapping.GetSpan((long)gpa, n).CopyTo(destination);
            destination = destination[n..];
            gpa += (ulong)n;
        }
    }

    /// <inheritdoc/>
    public void Write(ulong gpa, ReadOnlySpan<byte> source)
    {
        Check(gpa, (ulong)source.Length);
        ulong start = gpa;
        while (!source.IsEmpty)
        {
            int n = Math.Min(source.Length, MaxChunk);
            source[..n].CopyTo(_mapping.GetSpan((long)gpa, n));
            source = source[n..];
            gpa += (ulong)n;
        }
        MarkDirty(start, gpa - start);
    }

    /// <inheritdoc/>
    public uint ReadUInt32(ulong gpa)
    {
        CheckAligned(gpa, 4);
        return _mapping.ReadUInt32Volatile((long)gpa);
    }

    /// <inheritdoc/>
    public void WriteUInt32(ulong gpa, uint value)
    {
        CheckAligned(gpa, 4);
        _mapping.WriteUInt32Volatile((long)gpa, value);
        MarkDirty(gpa, 4);
    }

    /// <inheritdoc/>
    public ulong ReadUInt64(ulong gpa)
    {
        CheckAligned(gpa, 8);
        return (ulong)_mapping.ReadInt64Volatile((long)gpa);
    }

    /// <inheritdoc/>
    public void WriteUInt64(ulong gpa, ulong value)
    {
        CheckAligned(gpa, 8);
        // An aligned 8-byte slot: the volatile store is one atomic access.
        Volatile.Write(ref MemoryMarshal.Cast<byte, ulong>(_mapping.GetSpan((long)gpa, 8))[0], value);
        MarkDirty(gpa, 8);
    }

    /// <summary>
    /// The VMM's own view of [<paramref name="gpa"/>, +<paramref name="length"/>) (no dirty marking): migration
    /// reads pages from it and the target loads pages into it. Valid while this object lives.
    /// </summary>
    public Span<byte> GetHostSpan(ulong gpa, int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        Check(gpa, (ulong)length);
        return _mapping.GetSpan((long)gpa, length);
    }

    /// <summary>
    /// Writes <paramref name="source"/> at [<paramref name="gpa"/>, +source.Length) with pwrite(2) on the memfd instead of
    /// stores through the mapping: on a fresh memfd each store through the mapping takes a page fault that allocates and
    /// zeroes the page, where pwrite allocates in the kernel's copy loop (measured on this machine: ~1.0 s per GiB through
    /// the mapping against ~0.5 s with pwrite). Coherent with the mapping (same page cache). Thread-safe; no dirty marking.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is outside RAM.</exception>
    /// <exception cref="IOException">pwrite failed.</exception>
    public void WriteUntracked(ulong gpa, ReadOnlySpan<byte> source)
    {
        Check(gpa, (ulong)source.Length);
        RandomAccess.Write(MemFdHandle(), source, (long)gpa);
    }

    /// <summary>
    /// Loads incoming pages at [<paramref name="gpa"/>, +source.Length) the cheapest way for this RAM: a copy through the
    /// mapping when <see cref="Prefaulted"/> (every page is mapped already: no fault), else <see cref="WriteUntracked"/>
    /// (pwrite allocates fresh shmem pages in the kernel's copy loop, half the cost of faulting them through the mapping).
    /// No dirty marking.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is outside RAM.</exception>
    public void LoadUntracked(ulong gpa, ReadOnlySpan<byte> source)
    {
        if (!Prefaulted)
        {
            WriteUntracked(gpa, source);
            return;
        }
        Check(gpa, (ulong)source.Length);
        source.CopyTo(_mapping.GetSpan((long)gpa, source.Length));
    }

    /// <summary>The memfd opened once, read-write, for <see cref="WriteUntracked"/> (positioned I/O: one handle serves every thread).</summary>
    private SafeFileHandle MemFdHandle()
    {
        lock (_fileLock)
        {
            return _file ??= File.OpenHandle($"/proc/self/fd/{Fd.Fd}", FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        }
    }

    /// <summary>
    /// Clears in <paramref name="pages"/> every page that is a hole in the memfd (never written by anyone: vCPU, device
    /// DMA or a load through the mapping), found with lseek SEEK_DATA/SEEK_HOLE instead of reading RAM. A hole reads
    /// as zeros, so a receiver whose RAM starts zero-filled needs nothing for it. Cost: two lseek calls per allocated
    /// extent (shmem walks its page index), against reading every page. Thread-safe with respect to guest writes: a
    /// page written after its hole was seen is in the dirty logs (start them first).
    /// </summary>
    /// <returns>Pages left set.</returns>
    public long KeepAllocatedPages(PageBitmap pages)
    {
        ArgumentNullException.ThrowIfNull(pages);
        if (pages.PageCount != PageCount)
        {
            throw new ArgumentException("bitmap does not cover this RAM", nameof(pages));
        }
        long next = 0; // first page not yet classified
        long bytes = (long)Size;
        while (next < PageCount)
        {
            var extent = MemFd.NextDataExtent(Fd, next << PageShift);
            if (extent is not { } e || e.Start >= bytes)
            {
                pages.ClearRange(next, PageCount - next);
                break;
            }
            long firstData = e.Start >> PageShift;
            pages.ClearRange(next, firstData - next);
            // Extents are page granular on shmem; round the end up so a partial page is kept.
            next = Math.Min(PageCount, (Math.Min(e.End, bytes) + PageSize - 1) >> PageShift);
            if (next <= firstData)
            {
                next = firstData + 1;
            }
        }
        return pages.Count();
    }

    /// <summary>Marks [<paramref name="gpa"/>, +<paramref name="length"/>) dirty (thread-safe).</summary>
    public void MarkDirty(ulong gpa, ulong length)
    {
        if (length == 0)
        {
            return;
        }
        long first = (long)(gpa >> PageShift);
        long last = (long)((gpa + length - 1) >> PageShift);
        ulong[] words = _dirty.Words;
        for (long p = first; p <= last; p++)
        {
            ulong bit = 1UL << (int)(p & 63);
            ref ulong w = ref words[p >> 6];
            // Skip the locked op when the bit is already set: the common case for hot pages.
            if ((Volatile.Read(ref w) & bit) == 0)
            {
                Interlocked.Or(ref w, bit);
            }
        }
    }

    /// <summary>
    /// Atomically moves the pages dirtied since the last fetch into <paramref name="into"/> (OR) and clears them
    /// here, word by word: a write racing with the fetch lands in this fetch or the next, never in neither.
    /// </summary>
    public void FetchAndClearDirty(PageBitmap into)
    {
        ArgumentNullException.ThrowIfNull(into);
        if (into.PageCount != PageCount)
        {
            throw new ArgumentException("bitmap does not cover this RAM", nameof(into));
        }
        ulong[] src = _dirty.Words;
        ulong[] dst = into.Words;
        for (int i = 0; i < src.Length; i++)
        {
            if (Volatile.Read(ref src[i]) != 0)
            {
                dst[i] |= Interlocked.Exchange(ref src[i], 0);
            }
        }
    }

    /// <summary>Number of pages currently marked dirty (a racy snapshot).</summary>
    public long DirtyPageCount() => _dirty.Count();

    public void Dispose()
    {
        _file?.Dispose();
        _mapping.Dispose();
        Fd.Dispose();
    }

    private void Check(ulong gpa, ulong length)
    {
        if (gpa > Size || length > Size - gpa)
        {
            throw new ArgumentOutOfRangeException(nameof(gpa), $"[{gpa:#x}, +{length}) is outside guest RAM of {Size} bytes");
        }
    }

    private void CheckAligned(ulong gpa, int size)
    {
        Check(gpa, (ulong)size);
        if ((gpa & (ulong)(size - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(gpa), $"{gpa:#x} is not {size}-aligned");
        }
    }
}
