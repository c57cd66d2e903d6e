using System.Numerics;

namespace Vmig.Vmm;

/// <summary>
/// One bit per guest page (bit <c>p % 64</c> of word <c>p / 64</c> is page <c>p</c>): the layout of
/// VFIO's dirty bitmaps (<c>DMA_LOGGING_REPORT</c>), so device reports OR straight in.
/// Single-threaded unless a method says otherwise.
/// </summary>
public sealed class PageBitmap
{
    private readonly ulong[] _words;

    /// <summary>A bitmap of <paramref name="pageCount"/> pages, all clear.</summary>
    public PageBitmap(long pageCount)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pageCount);
        PageCount = pageCount;
        _words = new ulong[(pageCount + 63) / 64];
    }

    /// <summary>Number of pages covered.</summary>
    public long PageCount { get; }

    /// <summary>The backing words (for atomic producers such as <see cref="GuestRam"/>).</summary>
    internal ulong[] Words => _words;

    /// <summary>Sets page <paramref name="page"/>.</summary>
    public void Set(long page)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(page);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(page, PageCount);
        _words[page >> 6] |= 1UL << (int)(page & 63);
    }

    /// <summary>True if page <paramref name="page"/> is set.</summary>
    public bool Get(long page)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(page);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(page, PageCount);
        return (_words[page >> 6] & (1UL << (int)(page & 63))) != 0;
    }

    /// <summary>Sets every page.</summary>
    public void SetAll()
    {
        Array.Fill(_words, ulong.MaxValue);
        TrimTail();
    }

    /// <summary>Clears every page.</summary>
    public void Clear() => Array.Clear(_words);

    /// <summary>Clears pages [<paramref name="firstPage"/>, +<paramref name="count"/>) (clamped to <see cref="PageCount"/>).</summary>
    public void ClearRange(long firstPage, long count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(firstPage);
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        long end = Math.Min(PageCount, firstPage + count);
        long p = firstPage;
        // Partial head word, whole words, partial tail word.
        while (p < end && (p & 63) != 0)
        {
            _words[p >> 6] &= ~(1UL << (int)(p & 63));
            p++;
        }
        if (end - p >= 64)
        {
            long words = (end - p) >> 6;
            Array.Clear(_words, (int)(p >> 6), (int)words);
            p += words << 6;
        }
        while (p < end)
        {
            _words[p >> 6] &= ~(1UL << (int)(p & 63));
            p++;
        }
    }

    /// <summary>Number of set pages.</summary>
    public long Count()
    {
        long n = 0;
        foreach (ulong w in _words)
        {
            n += BitOperations.PopCount(w);
        }
        return n;
    }

    /// <summary>ORs <paramref name="other"/> (same page count) into this bitmap.</summary>
    public void Or(PageBitmap other)
    {
        ArgumentNullException.ThrowIfNull(other);
        if (other.PageCount != PageCount)
        {
            throw new ArgumentException($"page counts differ ({other.PageCount} vs {PageCount})", nameof(other));
        }
        for (int i = 0; i < _words.Length; i++)
        {
            _words[i] |= other._words[i];
        }
    }

    /// <summary>
    /// ORs a VFIO dirty bitmap whose bit 0 is page <paramref name="firstPage"/> (as returned by
    /// <c>DMA_LOGGING_REPORT</c> for an iova range starting at <c>firstPage * pageSize</c>). Bits beyond
    /// <see cref="PageCount"/> are ignored.
    /// </summary>
    public void OrRange(long firstPage, ReadOnlySpan<ulong> bitmap)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(firstPage);
        for (int i = 0; i < bitmap.Length; i++)
        {
            ulong w = bitmap[i];
            while (w != 0)
            {
                int b = BitOperations.TrailingZeroCount(w);
                w &= w - 1;
                long page = firstPage + (i * 64L) + b;
                if (page >= PageCount)
                {
                    return;
                }
                _words[page >> 6] |= 1UL << (int)(page & 63);
            }
        }
    }

    /// <summary>
    /// Enumerates runs of consecutive set pages in ascending order, each at most <paramref name="maxRun"/> pages.
    /// The bitmap must not change during enumeration.
    /// </summary>
    public IEnumerable<(long FirstPage, int Count)> Runs(int maxRun)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxRun);
        long p = 0;
        while (p < PageCount)
        {
            long w = p >> 6;
            ulong word = _words[w] >> (int)(p & 63);
            if (word == 0)
            {
                p = (w + 1) << 6;
                continue;
            }
            p += BitOperations.TrailingZeroCount(word);
            if (p >= PageCount)
            {
                yield break;
            }
            long start = p;
            while (p < PageCount && p - start < maxRun && (_words[p >> 6] & (1UL << (int)(p & 63))) != 0)
            {
                p++;
            }
            yield return (start, (int)(p - start));
        }
    }

    private void TrimTail()
    {
        int rem = (int)(PageCount & 63);
        if (rem != 0)
        {
            _words[^1] &= (1UL << rem) - 1;
        }
    }
}
