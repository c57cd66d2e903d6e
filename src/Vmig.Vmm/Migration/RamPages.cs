using System.Buffers.Binary;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>
/// RamPages payload codec (docs/stream-format.md §3.3): u32 round, u32 0, then records
/// { u64 gpa (page aligned), u32 page count (≥ 1), u32 flags (bit 0 ZERO: no data follows) } each followed by
/// count × 4096 data bytes unless ZERO.
/// </summary>
internal static class RamPages
{
    public const int PayloadHeaderSize = 8;
    public const int RecordHeaderSize = 16;
    public const uint ZeroFlag = 1;

    /// <summary>Pages per section: 256 × 4 KiB = 1 MiB of data at most.</summary>
    public const int MaxPagesPerSection = 256;

    /// <summary>Largest payload a RamPages section can have.</summary>
    public const int MaxPayload = PayloadHeaderSize + (MaxPagesPerSection * (RecordHeaderSize + GuestRam.PageSize));

    /// <summary>Bytes one run of <paramref name="count"/> pages may take in a payload at most (every page its own record).</summary>
    public static int WorstCaseRunBytes(int count) => count * (RecordHeaderSize + GuestRam.PageSize);

    /// <summary>Writes the 8-byte payload header (u32 round, u32 0) at the start of <paramref name="payload"/>.</summary>
    public static void WritePayloadHeader(Span<byte> payload, uint round)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(payload, round);
        BinaryPrimitives.WriteUInt32LittleEndian(payload[4..], 0);
    }

    /// <summary>
    /// Appends records for pages [first, first+count) at <paramref name="pos"/> of <paramref name="buffer"/>, which
    /// must have <see cref="WorstCaseRunBytes"/>(count) bytes free there. The pages are read with
    /// <see cref="GuestRam.ReadUntracked"/> straight into their place after a record header, then compacted in place
    /// around the zero pages (no second copy): zero pages become ZERO records, or nothing at all when
    /// <paramref name="omitZeroPages"/> (a receiver whose RAM is still zero-filled, i.e. the first pass). Returns the
    /// new end position.
    /// </summary>
    public static int AppendRun(GuestRam ram, long first, int count, byte[] buffer, int pos, bool omitZeroPages, out int zeroPages)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(count);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(count, MaxPagesPerSection);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(pos + WorstCaseRunBytes(count), buffer.Length);
        // A page a vCPU or device is writing right now may be copied torn; its dirty bit is set again, so the next
        // round (at the latest the final one, with everything stopped) resends it.
        int read = pos + RecordHeaderSize;
        ram.ReadUntracked((ulong)first << GuestRam.PageShift, buffer.AsSpan(read, count * GuestRam.PageSize));
        Span<bool> zero = stackalloc bool[count];
        zeroPages = 0;
        for (int k = 0; k < count; k++)
        {
            zero[k] = !buffer.AsSpan(read + (k * GuestRam.PageSize), GuestRam.PageSize).ContainsAnyExcept((byte)0);
            zeroPages += zero[k] ? 1 : 0;
        }
        if (zeroPages == 0)
        {
            // Common case: one data record, already in place.
            WriteRecord(buffer, pos, first, count, zero: false);
            return read + (count * GuestRam.PageSize);
        }
        // Compaction: the write position never passes the read position of a page still to be copied (a record header
        // only ever overwrites part of a zero page already classified).
        int w = pos;
        int i = 0;
        while (i < count)
        {
            int j = i + 1;
            while (j < count && zero[j] == zero[i])
            {
                j++;
            }
            int n = j - i;
            if (!zero[i])
            {
                WriteRecord(buffer, w, first + i, n, zero: false);
                int bytes = n * GuestRam.PageSize;
                buffer.AsSpan(read + (i * GuestRam.PageSize), bytes).CopyTo(buffer.AsSpan(w + RecordHeaderSize));
                w += RecordHeaderSize + bytes;
            }
            else if (!omitZeroPages)
            {
                WriteRecord(buffer, w, first + i, n, zero: true);
                w += RecordHeaderSize;
            }
            i = j;
        }
        return w;
    }

    private static void WriteRecord(byte[] buffer, int pos, long firstPage, int count, bool zero)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(buffer.AsSpan(pos), (ulong)firstPage << GuestRam.PageShift);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer.AsSpan(pos + 8), (uint)count);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer.AsSpan(pos + 12), zero ? ZeroFlag : 0);
    }

    /// <summary>
    /// Applies a RamPages payload to <paramref name="ram"/>. A page is written only if <paramref name="pageRounds"/>
    /// says no later round already wrote it (parallel channels may deliver rounds out of order).
    /// </summary>
    /// <returns>Pages carried by the payload.</returns>
    /// <exception cref="StreamFormatException">Malformed payload or a range outside RAM.</exception>
    public static long Apply(GuestRam ram, ReadOnlySpan<byte> payload, PageRounds pageRounds)
    {
        if (payload.Length < PayloadHeaderSize)
        {
            throw new StreamFormatException("RamPages payload shorter than its 8-byte header");
        }
        uint round = BinaryPrimitives.ReadUInt32LittleEndian(payload);
        int pos = PayloadHeaderSize;
        long pages = 0;
        while (pos < payload.Length)
        {
            if (payload.Length - pos < RecordHeaderSize)
            {
                throw new StreamFormatException("RamPages record header truncated");
            }
            ulong gpa = BinaryPrimitives.ReadUInt64LittleEndian(payload[pos..]);
            uint n = BinaryPrimitives.ReadUInt32LittleEndian(payload[(pos + 8)..]);
            uint flags = BinaryPrimitives.ReadUInt32LittleEndian(payload[(pos + 12)..]);
            pos += RecordHeaderSize;
            if ((gpa & (GuestRam.PageSize - 1)) != 0 || n == 0 || n > MaxPagesPerSection || (flags & ~ZeroFlag) != 0
                || gpa >= ram.Size || (ulong)n * GuestRam.PageSize > ram.Size - gpa)
            {
                throw new StreamFormatException($"RamPages record gpa={gpa:#x} pages={n} flags={flags:#x} is invalid for {ram.Size} bytes of RAM");
            }
            bool zero = (flags & ZeroFlag) != 0;
            int bytes = (int)n * GuestRam.PageSize;
            if (!zero && payload.Length - pos < bytes)
            {
                throw new StreamFormatException("RamPages record data truncated");
            }
            long firstPage = (long)(gpa >> GuestRam.PageShift);
            if (!zero && !pageRounds.Concurrent)
            {
                // One writer: claim the record's pages and write each claimed run with one pwrite (see
                // GuestRam.WriteUntracked: half the cost of page-faulting a fresh memfd through the mapping).
                int runStart = -1;
                for (int k = 0; k <= n; k++)
                {
                    bool claimed = k < n && pageRounds.TryClaim(firstPage + k, round, out _);
                    if (claimed && runStart < 0)
                    {
                        runStart = k;
                    }
                    else if (!claimed && runStart >= 0)
                    {
                        ram.WriteUntracked(gpa + ((ulong)runStart * GuestRam.PageSize),
                            payload.Slice(pos + (runStart * GuestRam.PageSize), (k - runStart) * GuestRam.PageSize));
                        runStart = -1;
                    }
                }
                pos += bytes;
                pages += n;
                continue;
            }
            for (int k = 0; k < n; k++)
            {
                ulong pageGpa = gpa + ((ulong)k * GuestRam.PageSize);
                lock (pageRounds.LockFor(firstPage + k))
                {
                    if (!pageRounds.TryClaim(firstPage + k, round, out bool neverWritten))
                    {
                        continue;
                    }
                    if (!zero)
                    {
                        payload.Slice(pos + (k * GuestRam.PageSize), GuestRam.PageSize).CopyTo(ram.GetHostSpan(pageGpa, GuestRam.PageSize));
                    }
                    else if (!neverWritten)
                    {
                        // Incoming RAM starts as a fresh (all-zero) memfd: a page no earlier round wrote is already
                        // zero, and clearing it would only allocate it.
                        ram.GetHostSpan(pageGpa, GuestRam.PageSize).Clear();
                    }
                }
            }
            if (!zero)
            {
                pos += bytes;
            }
            pages += n;
        }
        return pages;
    }
}

/// <summary>The latest round that wrote each page on the target, with striped locks for concurrent channels.</summary>
internal sealed class PageRounds
{
    private readonly uint[] _rounds;
    private readonly object[] _locks;

    public PageRounds(long pageCount)
    {
        _rounds = new uint[pageCount];
        _locks = new object[256];
        for (int i = 0; i < _locks.Length; i++)
        {
            _locks[i] = new object();
        }
    }

    public object LockFor(long page) => _locks[page & 255];

    /// <summary>
    /// Set before a second thread may apply pages (parallel connections): then every claim and its write happen under
    /// <see cref="LockFor"/>; with one writer a record's pages are claimed first and written as runs.
    /// </summary>
    public bool Concurrent { get; set; }

    /// <summary>
    /// Under <see cref="LockFor"/>: true (and records the round) unless a later round already wrote the page;
    /// <paramref name="neverWritten"/> says no round had written it before.
    /// </summary>
    public bool TryClaim(long page, uint round, out bool neverWritten)
    {
        uint previous = _rounds[page];
        neverWritten = previous == 0;
        if (previous > round)
        {
            return false;
        }
        _rounds[page] = round;
        return true;
    }
}
