using System.Buffers.Binary;
using Vmig.Spec;
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

    /// <summary>Writes the 8-byte payload header (u32 round, u32 0) at the start of <paramref name="payload"/>.</summary>
    public static void WritePayloadHeader(Span<byte> payload, uint round)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(payload, round);
        BinaryPrimitives.WriteUInt32LittleEndian(payload[4..], 0);
    }

    /// <summary>Writes a 16-byte record header at the start of <paramref name="destination"/>.</summary>
    public static void WriteRecord(Span<byte> destination, long firstPage, int count, bool zero)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(destination, (ulong)firstPage << GuestRam.PageShift);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[8..], (uint)count);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[12..], zero ? ZeroFlag : 0);
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
                // One writer: claim the record's pages and load each claimed run in one call (GuestRam.LoadUntracked:
                // one pwrite into fresh RAM, half the cost of page-faulting it through the mapping; a copy into prefaulted RAM).
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
                        ram.LoadUntracked(gpa + ((ulong)runStart * GuestRam.PageSize),
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

/// <summary>
/// Builds RamPages sections straight from guest RAM in two steps, so every byte of page data is read from RAM once: first
/// <see cref="Plan"/> classifies pages (zero or not, read through the VMM's mapping: a non-zero page stops at its first
/// non-zero bytes) and fixes the section's records and length; then <see cref="Build"/> writes the 16-byte section header,
/// the records and the page data into a frame, copying each data page from RAM with the CRC-32C fused into the copy
/// (<see cref="Crc32C.AppendCopy"/>), so the section CRC covers exactly the bytes in the frame (the bytes sent) without a
/// second pass. A page a running vCPU or device changes between the two steps keeps its planned record (the length
/// cannot change) and is copied as it is then, possibly torn: its dirty bit is set again, so a later round (at the
/// latest the final one, with everything stopped) resends it. Zero pages become ZERO records, or nothing when the
/// receiver's RAM is known zero-filled (the first pass). Not thread-safe: one builder per connection.
/// </summary>
/// <remarks>
/// Pages are read through the mapping, which must not touch memfd holes (a load allocates and zeroes each one: ~10 s per
/// GiB measured on this machine, against ~0.2 s for a pread of holes, which the sender used before): callers give
/// only pages that were written (dirty) or lie in a data extent (<see cref="GuestRam.KeepAllocatedPages"/>).
/// </remarks>
internal sealed class RamSectionBuilder
{
    private readonly GuestRam _ram;
    private readonly bool _omitZeroPages;
    private readonly List<(long FirstPage, int Count, bool Zero)> _records = [];
    private int _payload = RamPages.PayloadHeaderSize;
    private bool _extendable;

    /// <param name="ram">Guest RAM the pages are read from.</param>
    /// <param name="omitZeroPages">Leave zero pages out entirely (the receiver's RAM is still zero-filled: round 1, snapshots).</param>
    public RamSectionBuilder(GuestRam ram, bool omitZeroPages)
    {
        _ram = ram;
        _omitZeroPages = omitZeroPages;
    }

    /// <summary>True when nothing is planned (no record: nothing to send).</summary>
    public bool IsEmpty => _records.Count == 0;

    /// <summary>Payload bytes of the planned section.</summary>
    public int PayloadLength => _payload;

    /// <summary>
    /// Plans pages [<paramref name="first"/>, +<paramref name="count"/>) (1-256 pages, inside RAM) into the current section.
    /// Returns how many leading pages fit (fewer than <paramref name="count"/> when the section is full: build it, then plan
    /// the rest); <paramref name="zeroPages"/> counts the zero pages among them.
    /// </summary>
    public int Plan(long first, int count, out int zeroPages)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(count);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(count, RamPages.MaxPagesPerSection);
        zeroPages = 0;
        _extendable = false; // a new run never continues the previous record (its gpa does not follow on)
        for (int k = 0; k < count; k++)
        {
            long page = first + k;
            bool zero = !_ram.GetHostSpan((ulong)page << GuestRam.PageShift, GuestRam.PageSize).ContainsAnyExcept((byte)0);
            bool extend = _extendable && _records[^1].Zero == zero;
            int cost = zero
                ? (_omitZeroPages || extend ? 0 : RamPages.RecordHeaderSize)
                : (extend ? 0 : RamPages.RecordHeaderSize) + GuestRam.PageSize;
            if (_payload + cost > RamPages.MaxPayload)
            {
                return k;
            }
            _payload += cost;
            zeroPages += zero ? 1 : 0;
            if (zero && _omitZeroPages)
            {
                _extendable = false;
                continue;
            }
            if (extend)
            {
                var r = _records[^1];
                _records[^1] = (r.FirstPage, r.Count + 1, r.Zero);
            }
            else
            {
                _records.Add((page, 1, zero));
            }
            // Runs are at most 256 pages, so a record grown within one never exceeds the format's 256.
            _extendable = true;
        }
        return count;
    }

    /// <summary>
    /// Writes the planned section into <paramref name="frame"/> (16-byte section header, then the payload; at least
    /// <see cref="SectionHeader.Size"/> + <see cref="PayloadLength"/> bytes) and starts a new plan. Returns the payload
    /// length; <paramref name="crc"/> is the section CRC (docs/stream-format.md §2) the header carries.
    /// </summary>
    public int Build(byte[] frame, uint round, out uint crc)
    {
        int length = _payload;
        ArgumentOutOfRangeException.ThrowIfLessThan(frame.Length, SectionHeader.Size + length);
        const ushort type = (ushort)SectionType.RamPages;
        uint running = SectionHeader.StartCrc(type, SectionFlags.Mandatory, (uint)length);
        int pos = SectionHeader.Size;
        RamPages.WritePayloadHeader(frame.AsSpan(pos), round);
        running = Crc32C.Append(running, frame.AsSpan(pos, RamPages.PayloadHeaderSize));
        pos += RamPages.PayloadHeaderSize;
        foreach (var (firstPage, count, zero) in _records)
        {
            RamPages.WriteRecord(frame.AsSpan(pos), firstPage, count, zero);
            running = Crc32C.Append(running, frame.AsSpan(pos, RamPages.RecordHeaderSize));
            pos += RamPages.RecordHeaderSize;
            if (!zero)
            {
                int bytes = count * GuestRam.PageSize;
                running = Crc32C.AppendCopy(running, _ram.GetHostSpan((ulong)firstPage << GuestRam.PageShift, bytes), frame.AsSpan(pos, bytes));
                pos += bytes;
            }
        }
        if (pos != SectionHeader.Size + length)
        {
            throw new InvalidOperationException($"RamPages section built {pos - SectionHeader.Size} bytes of a planned {length}");
        }
        crc = Crc32C.Finish(running);
        new SectionHeader(type, SectionFlags.Mandatory, (uint)length, crc).WriteTo(frame);
        _records.Clear();
        _payload = RamPages.PayloadHeaderSize;
        _extendable = false;
        return length;
    }
}
