using System.Buffers.Binary;
using System.Numerics;

namespace Vmig.Migration;

/// <summary>
/// A dirty-page bitmap over the IOVA range [<see cref="Iova"/>, +<see cref="Length"/>) in pages of
/// <see cref="PageSize"/> bytes, with the VFIO DMA_LOGGING_REPORT layout (reference §2.8, §3.4): bit n stands for
/// the page at <c>iova + n * pageSize</c>; bits are packed into u64 words, LSB first, each word little-endian on
/// the wire; bits past the last page are zero. The wire size is <c>roundup(ceil(length / pageSize), 64) / 8</c>
/// bytes, as libvfio-user sizes it. Not thread-safe.
/// </summary>
public sealed class DirtyBitmap
{
    /// <summary>
    /// Largest bitmap accepted, in bytes: libvfio-user's default <c>max_bitmap_size</c> (256 MiB), i.e. 2^31 pages
    /// (8 TiB at 4 KiB pages).
    /// </summary>
    public const ulong MaxByteLength = 256UL << 20;

    private readonly ulong[] _words;

    /// <param name="iova">Start address; a multiple of <paramref name="pageSize"/>.</param>
    /// <param name="length">Bytes covered, &gt; 0; iova + length must stay below 2^64. A partial last page counts as a page.</param>
    /// <param name="pageSize">Bytes per bit; a power of two.</param>
    /// <exception cref="ArgumentException">A rule above is broken, or the bitmap would exceed <see cref="MaxByteLength"/>.</exception>
    public DirtyBitmap(ulong iova, ulong length, ulong pageSize)
    {
        int rc = TryGetByteLength(iova, length, pageSize, out ulong bytes);
        if (rc != 0)
        {
            throw new ArgumentException(
                $"Invalid dirty bitmap geometry iova=0x{iova:x} length=0x{length:x} pageSize=0x{pageSize:x}.");
        }
        Iova = iova;
        Length = length;
        PageSize = pageSize;
        PageCount = (length - 1) / pageSize + 1;
        _words = new ulong[bytes / 8];
    }

    public ulong Iova { get; }

    public ulong Length { get; }

    public ulong PageSize { get; }

    /// <summary>Pages covered: ceil(Length / PageSize).</summary>
    public ulong PageCount { get; }

    /// <summary>Wire size in bytes: roundup(PageCount, 64) / 8.</summary>
    public int ByteLength => _words.Length * 8;

    /// <summary>The bitmap words (bit n of word w = page 64w + n).</summary>
    public ReadOnlySpan<ulong> Words => _words;

    /// <summary>
    /// Checks a geometry and computes its wire size (for sizing a DMA_LOGGING_REPORT argsz).
    /// </summary>
    /// <returns>0, or 22 (EINVAL): length 0, pageSize not a power of two, iova not page-aligned, iova + length
    /// overflows, or the bitmap would exceed <see cref="MaxByteLength"/>.</returns>
    public static int TryGetByteLength(ulong iova, ulong length, ulong pageSize, out ulong byteLength)
    {
        byteLength = 0;
        if (length == 0 || !BitOperations.IsPow2(pageSize) || (iova & (pageSize - 1)) != 0 || iova + length < iova)
        {
            return Errno.EINVAL;
        }
        ulong pages = (length - 1) / pageSize + 1;
        ulong words = (pages - 1) / 64 + 1;
        if (words > MaxByteLength / 8)
        {
            return Errno.EINVAL;
        }
        byteLength = words * 8;
        return 0;
    }

    /// <summary>Marks page <paramref name="page"/> (0-based, &lt; PageCount) dirty.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The page is outside the bitmap.</exception>
    public void SetPage(ulong page)
    {
        CheckPage(page);
        _words[page >> 6] |= 1UL << (int)(page & 63);
    }

    /// <summary>Whether page <paramref name="page"/> (0-based, &lt; PageCount) is dirty.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The page is outside the bitmap.</exception>
    public bool IsPageSet(ulong page)
    {
        CheckPage(page);
        return (_words[page >> 6] & (1UL << (int)(page & 63))) != 0;
    }

    /// <summary>
    /// Marks every page that [<paramref name="address"/>, +<paramref name="length"/>) touches, clipped to the
    /// bitmap's range (a write partly outside still dirties the pages inside). Length 0 marks nothing.
    /// </summary>
    public void MarkRange(ulong address, ulong length)
    {
        if (length == 0)
        {
            return;
        }
        ulong end = address + length < address ? ulong.MaxValue : address + length; // exclusive, saturated
        ulong lo = Math.Max(address, Iova);
        ulong hi = Math.Min(end, Iova + Length);
        if (lo >= hi)
        {
            return;
        }
        ulong first = (lo - Iova) / PageSize;
        ulong last = (hi - 1 - Iova) / PageSize;
        for (ulong p = first; p <= last; p++)
        {
            _words[p >> 6] |= 1UL << (int)(p & 63);
        }
    }

    /// <summary>Whether the page holding <paramref name="address"/> is dirty (false outside the range).</summary>
    public bool IsDirty(ulong address)
    {
        if (address < Iova || address - Iova >= Length)
        {
            return false;
        }
        ulong page = (address - Iova) / PageSize;
        return (_words[page >> 6] & (1UL << (int)(page & 63))) != 0;
    }

    /// <summary>Number of dirty pages.</summary>
    public ulong Count()
    {
        ulong n = 0;
        foreach (ulong w in _words)
        {
            n += (ulong)BitOperations.PopCount(w);
        }
        return n;
    }

    /// <summary>The start address of each dirty page, ascending.</summary>
    public IEnumerable<ulong> EnumerateDirtyPages()
    {
        for (int w = 0; w < _words.Length; w++)
        {
            ulong v = _words[w];
            while (v != 0)
            {
                int b = BitOperations.TrailingZeroCount(v);
                v &= v - 1;
                yield return Iova + (((ulong)w * 64) + (ulong)b) * PageSize;
            }
        }
    }

    /// <summary>ORs <paramref name="other"/> (same iova, length and page size) into this bitmap.</summary>
    /// <exception cref="ArgumentException">The geometries differ.</exception>
    public void Or(DirtyBitmap other)
    {
        ArgumentNullException.ThrowIfNull(other);
        if (other.Iova != Iova || other.Length != Length || other.PageSize != PageSize)
        {
            throw new ArgumentException("Dirty bitmaps cover different ranges or page sizes.", nameof(other));
        }
        for (int i = 0; i < _words.Length; i++)
        {
            _words[i] |= other._words[i];
        }
    }

    /// <summary>Marks every page clean.</summary>
    public void Clear() => Array.Clear(_words);

    /// <summary>
    /// A bitmap of the same range in coarser pages of <paramref name="newPageSize"/>: a coarse page is dirty if any
    /// fine page inside it is (the OR-fold a server applies when the report page size is a multiple of its
    /// logging granule, reference §3.4).
    /// </summary>
    /// <exception cref="ArgumentException"><paramref name="newPageSize"/> is not a power of two ≥ PageSize, or Iova
    /// is not aligned to it.</exception>
    public DirtyBitmap Fold(ulong newPageSize)
    {
        if (!BitOperations.IsPow2(newPageSize) || newPageSize < PageSize || (Iova & (newPageSize - 1)) != 0)
        {
            throw new ArgumentException(
                $"Cannot fold {PageSize}-byte pages at 0x{Iova:x} into {newPageSize}-byte pages.", nameof(newPageSize));
        }
        var coarse = new DirtyBitmap(Iova, Length, newPageSize);
        int shift = BitOperations.TrailingZeroCount(newPageSize) - BitOperations.TrailingZeroCount(PageSize);
        for (int w = 0; w < _words.Length; w++)
        {
            ulong v = _words[w];
            while (v != 0)
            {
                int b = BitOperations.TrailingZeroCount(v);
                v &= v - 1;
                ulong p = (((ulong)w * 64) + (ulong)b) >> shift;
                coarse._words[p >> 6] |= 1UL << (int)(p & 63);
            }
        }
        return coarse;
    }

    /// <summary>
    /// Parses a wire bitmap for the given geometry: the first <c>TryGetByteLength(...)</c> bytes of
    /// <paramref name="bytes"/> (extra bytes are ignored). Never throws on hostile bytes.
    /// </summary>
    /// <returns>False (and null) for an invalid geometry, too few bytes, or any bit set past the last page.</returns>
    public static bool TryRead(ulong iova, ulong length, ulong pageSize, ReadOnlySpan<byte> bytes, out DirtyBitmap? bitmap)
    {
        bitmap = null;
        if (TryGetByteLength(iova, length, pageSize, out ulong size) != 0 || (ulong)bytes.Length < size)
        {
            return false;
        }
        var result = new DirtyBitmap(iova, length, pageSize);
        for (int i = 0; i < result._words.Length; i++)
        {
            result._words[i] = BinaryPrimitives.ReadUInt64LittleEndian(bytes.Slice(i * 8, 8));
        }
        int tailBits = (int)(result.PageCount & 63);
        if (tailBits != 0 && (result._words[^1] >> tailBits) != 0)
        {
            return false;
        }
        bitmap = result;
        return true;
    }

    /// <summary>Writes the <see cref="ByteLength"/> wire bytes to the start of <paramref name="destination"/>.</summary>
    /// <exception cref="ArgumentException"><paramref name="destination"/> is shorter than <see cref="ByteLength"/>.</exception>
    public void WriteTo(Span<byte> destination)
    {
        if (destination.Length < ByteLength)
        {
            throw new ArgumentException($"Need {ByteLength} bytes, got {destination.Length}.", nameof(destination));
        }
        for (int i = 0; i < _words.Length; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(destination.Slice(i * 8, 8), _words[i]);
        }
    }

    private void CheckPage(ulong page)
    {
        if (page >= PageCount)
        {
            throw new ArgumentOutOfRangeException(nameof(page), page, $"Page index must be below {PageCount}.");
        }
    }
}
