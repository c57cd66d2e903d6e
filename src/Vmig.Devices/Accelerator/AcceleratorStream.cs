using Vmig.Spec;
using System.Buffers.Binary;
using Vmig.Devices.Pci;
using Vmig.Migration;
using Vmig.VfioUser.Protocol;

namespace Vmig.Devices.Accelerator;

/// <summary>Record types of the accelerator's migration stream.</summary>
public enum AcceleratorRecordType : ushort
{
    /// <summary>The compatibility header: an <see cref="AcceleratorProfile"/>. Always first.</summary>
    Profile = 1,
    /// <summary>Device memory [DeviceOffset, +PayloadLength), whole 4 KiB pages, at most <see cref="AcceleratorRecordHeader.MaxPagesPayload"/>.</summary>
    Pages = 2,
    /// <summary>Registers (<see cref="AcceleratorVfRegisters"/>), then u32 length + PCI config state. STOP_COPY only.</summary>
    State = 3,
    /// <summary>End of the stream (empty payload).</summary>
    End = 4,
}

/// <summary>
/// Header of one stream record (32 bytes, little-endian): u32 magic "AVMR", u16 version, u16 type, u64 device offset,
/// u32 payload length, u32 0, u32 CRC32C of bytes 0..23, u32 0. The payload follows, then a u32 CRC32C of the payload.
/// </summary>
public readonly record struct AcceleratorRecordHeader(AcceleratorRecordType Type, ulong DeviceOffset, uint PayloadLength)
{
    public const int Size = 32;
    public const int TrailerSize = 4;
    public const uint Magic = 0x524D_5641; // "AVMR"
    public const ushort Version = 1;
    /// <summary>Largest Pages payload (256 pages = 1 MiB).</summary>
    public const int MaxPagesPayload = 256 * DeviceMemory.PageSize;
    /// <summary>Largest State payload accepted.</summary>
    public const int MaxStatePayload = 64 * 1024;

    /// <summary>Bytes of a whole record with <paramref name="payload"/> payload bytes.</summary>
    public static long RecordSize(long payload) => Size + payload + TrailerSize;

    /// <summary>Parses and checks magic, version and header CRC; false on any mismatch (never throws).</summary>
    public static bool TryRead(ReadOnlySpan<byte> s, out AcceleratorRecordHeader header)
    {
        header = default;
        if (s.Length < Size || BinaryPrimitives.ReadUInt32LittleEndian(s) != Magic
            || BinaryPrimitives.ReadUInt16LittleEndian(s[4..]) != Version
            || BinaryPrimitives.ReadUInt32LittleEndian(s[24..]) != Crc32C.Compute(s[..24]))
        {
            return false;
        }
        header = new AcceleratorRecordHeader(
            (AcceleratorRecordType)BinaryPrimitives.ReadUInt16LittleEndian(s[6..]),
            BinaryPrimitives.ReadUInt64LittleEndian(s[8..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[16..]));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        d = d[..Size];
        d.Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(d, Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(d[4..], Version);
        BinaryPrimitives.WriteUInt16LittleEndian(d[6..], (ushort)Type);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], DeviceOffset);
        BinaryPrimitives.WriteUInt32LittleEndian(d[16..], PayloadLength);
        BinaryPrimitives.WriteUInt32LittleEndian(d[24..], Crc32C.Compute(d[..24]));
    }
}

/// <summary>
/// The save side of a VF's migration stream, produced by the PF. Order: Profile; all device memory (the initial
/// image, 1 MiB records); device-memory pages dirtied since (runs of ≤ 256 dirty pages, each cleared just before it
/// is copied); and, once in STOP_COPY, State then End. Payload bytes are copied straight from the device memory
/// mapping into the reader's buffer (never staged), checksummed in the same pass (<see cref="Crc32C.AppendCopy"/>);
/// in STOP_COPY <see cref="ReadGather"/> hands them out as slices of the mapping instead (no copy at all).
/// </summary>
public sealed class AcceleratorSaveStream
{
    private const int MaxRunPages = AcceleratorRecordHeader.MaxPagesPayload / DeviceMemory.PageSize;

    private readonly AcceleratorVf _vf;
    private readonly DeviceMemory _mem;
    private readonly byte[] _header = new byte[AcceleratorRecordHeader.Size];
    private readonly byte[] _trailer = new byte[AcceleratorRecordHeader.TrailerSize];
    private bool _profileSent;
    private long _initialPage;
    private bool _stopCopy;
    private bool _stateSent;
    private bool _endSent;

    // The record being read out.
    private bool _hasRecord;
    private bool _recordIsInitial;
    private long _recordDeviceOffset;
    private byte[]? _recordBytes;
    private long _payloadLength;
    private long _pos;
    private uint _crc;

    // ReadGather's staging for record headers and trailers (from the gather list's pool).
    private const int SmallStaging = 1024;
    private Memory<byte> _small;
    private int _smallPos;

    internal AcceleratorSaveStream(AcceleratorVf vf)
    {
        _vf = vf;
        _mem = vf.Memory;
    }

    /// <summary>True once the End record has been read completely.</summary>
    public bool IsComplete => _endSent && !_hasRecord;

    /// <summary>From now on the stream ends with State and End (the VF is stopped: STOP_COPY).</summary>
    internal void EnterStopCopy() => _stopCopy = true;

    /// <summary>Copies the next stream bytes; returns fewer than asked when nothing more is available now.</summary>
    public int Read(Span<byte> buffer)
    {
        int n = 0;
        while (n < buffer.Length)
        {
            if (!_hasRecord && !StartNextRecord())
            {
                break;
            }
            n += EmitFromRecord(buffer.Length - n, buffer[n..], null);
        }
        return n;
    }

    /// <summary>
    /// Zero-copy read (STOP_COPY: the VF is stopped, device memory is stable): appends up to <paramref name="maxBytes"/>
    /// stream bytes to <paramref name="segments"/> — Pages payloads as slices of the device memory mapping (checksummed
    /// in place, not copied), headers and trailers as small copies. Before STOP_COPY the VF runs and may write device
    /// memory between now and the send, so a slice could go out torn against its CRC: then the bytes are copied and
    /// checksummed in one pass (<see cref="Read"/>) into one staging buffer, once. Returns the count appended.
    /// </summary>
    public int ReadGather(int maxBytes, MigrationGatherList segments)
    {
        if (!_stopCopy)
        {
            var staging = segments.RentStaging(maxBytes);
            int c = Read(staging.Span[..maxBytes]);
            segments.Add(staging[..c]);
            return c;
        }
        _small = default;
        _smallPos = 0;
        int n = 0;
        while (n < maxBytes)
        {
            if (!_hasRecord && !StartNextRecord())
            {
                break;
            }
            n += EmitFromRecord(maxBytes - n, default, segments);
        }
        return n;
    }

    /// <summary>
    /// Exact bytes still to read of the initial part (Profile + initial image) and of the dirty part (pages dirtied
    /// behind the initial cursor, grouped as they will be sent), at this moment (VFIO_MIG_GET_PRECOPY_INFO).
    /// </summary>
    public PrecopyInfo GetPrecopyInfo()
    {
        long current = _hasRecord ? AcceleratorRecordHeader.RecordSize(_payloadLength) - _pos : 0;
        long initial = (_profileSent ? 0 : AcceleratorRecordHeader.RecordSize(AcceleratorProfile.Size)) + InitialBytesFrom(_initialPage);
        long dirty = DirtyBytes();
        bool currentIsPages = _hasRecord && _recordBytes is null;
        if (_hasRecord && (_recordIsInitial || !currentIsPages))
        {
            initial += current;
        }
        else if (_hasRecord)
        {
            dirty += current;
        }
        return new PrecopyInfo((ulong)initial, (ulong)dirty);
    }

    /// <summary>Bytes a STOP_COPY from here would still produce (everything pending + State + End).</summary>
    public ulong GetStopCopySize(int stateLength)
    {
        var p = GetPrecopyInfo();
        ulong tail = (_stateSent ? 0 : (ulong)AcceleratorRecordHeader.RecordSize(stateLength)) + (_endSent ? 0 : (ulong)AcceleratorRecordHeader.RecordSize(0));
        return p.InitialBytes + p.DirtyBytes + tail;
    }

    /// <summary>Bytes of a complete stream for a VF with <paramref name="memorySize"/> bytes and no dirtying.</summary>
    internal static ulong FullImageSize(long memorySize, int stateLength) =>
        (ulong)(AcceleratorRecordHeader.RecordSize(AcceleratorProfile.Size) + InitialBytes(memorySize / DeviceMemory.PageSize)
            + AcceleratorRecordHeader.RecordSize(stateLength) + AcceleratorRecordHeader.RecordSize(0));

    private long InitialBytesFrom(long page) => InitialBytes(_mem.PageCount - page);

    private static long InitialBytes(long pages) =>
        pages * DeviceMemory.PageSize + (pages + MaxRunPages - 1) / MaxRunPages * (AcceleratorRecordHeader.Size + AcceleratorRecordHeader.TrailerSize);

    private long DirtyBytes()
    {
        var (pages, runs) = _mem.CountDirtyRuns(_initialPage, MaxRunPages);
        return pages * DeviceMemory.PageSize + runs * (AcceleratorRecordHeader.Size + AcceleratorRecordHeader.TrailerSize);
    }

    private bool StartNextRecord()
    {
        if (!_profileSent)
        {
            var payload = new byte[AcceleratorProfile.Size];
            _vf.Profile.WriteTo(payload);
            BeginBytes(AcceleratorRecordType.Profile, payload);
            _recordIsInitial = true;
            _profileSent = true;
            return true;
        }
        if (_initialPage < _mem.PageCount)
        {
            long run = Math.Min(MaxRunPages, _mem.PageCount - _initialPage);
            _mem.ClearDirty(_initialPage, run);
            BeginPages(_initialPage, run);
            _recordIsInitial = true;
            _initialPage += run;
            return true;
        }
        if (_mem.FindDirtyRun(0, _mem.PageCount, MaxRunPages, out long first, out int count))
        {
            _mem.ClearDirty(first, count);
            BeginPages(first, count);
            _recordIsInitial = false;
            return true;
        }
        if (_stopCopy && !_stateSent)
        {
            BeginBytes(AcceleratorRecordType.State, BuildState(_vf));
            _recordIsInitial = false;
            _stateSent = true;
            return true;
        }
        if (_stopCopy && !_endSent)
        {
            BeginBytes(AcceleratorRecordType.End, []);
            _recordIsInitial = false;
            _endSent = true;
            return true;
        }
        return false;
    }

    /// <summary>State payload: registers, u32 PCI state length, PCI config state.</summary>
    internal static byte[] BuildState(AcceleratorVf vf)
    {
        var pci = vf.SaveConfigState();
        var payload = new byte[AcceleratorVfRegisters.Size + 4 + pci.Length];
        vf.CaptureRegisters().WriteTo(payload);
        BinaryPrimitives.WriteUInt32LittleEndian(payload.AsSpan(AcceleratorVfRegisters.Size), (uint)pci.Length);
        pci.CopyTo(payload, AcceleratorVfRegisters.Size + 4);
        return payload;
    }

    private void BeginBytes(AcceleratorRecordType type, byte[] payload)
    {
        new AcceleratorRecordHeader(type, 0, (uint)payload.Length).WriteTo(_header);
        _recordBytes = payload;
        _payloadLength = payload.Length;
        Begin();
    }

    private void BeginPages(long firstPage, long pages)
    {
        _recordDeviceOffset = firstPage * DeviceMemory.PageSize;
        _payloadLength = pages * DeviceMemory.PageSize;
        new AcceleratorRecordHeader(AcceleratorRecordType.Pages, (ulong)_recordDeviceOffset, (uint)_payloadLength).WriteTo(_header);
        _recordBytes = null;
        Begin();
    }

    private void Begin()
    {
        _hasRecord = true;
        _pos = 0;
        _crc = Crc32C.Start;
    }

    // Headers and trailers are rewritten per record, so a gathered one is copied (a few bytes) into staging that lives
    // until the reply is sent.
    private ReadOnlyMemory<byte> Small(MigrationGatherList segments, ReadOnlySpan<byte> bytes)
    {
        if (_small.Length - _smallPos < bytes.Length)
        {
            _small = segments.RentStaging(SmallStaging);
            _smallPos = 0;
        }
        var m = _small.Slice(_smallPos, bytes.Length);
        bytes.CopyTo(m.Span);
        _smallPos += bytes.Length;
        return m;
    }

    /// <summary>
    /// Emits the current record's next bytes (at most <paramref name="max"/>): copied into <paramref name="dst"/>
    /// (payloads copied and checksummed in one pass), or, with <paramref name="segments"/>, appended as segments
    /// (payloads handed out in place and checksummed there; header and trailer pieces copied into small staging).
    /// </summary>
    private int EmitFromRecord(int max, Span<byte> dst, MigrationGatherList? segments)
    {
        int written = 0;
        if (_pos < AcceleratorRecordHeader.Size)
        {
            int k = (int)Math.Min(AcceleratorRecordHeader.Size - _pos, max);
            Put(_header.AsSpan((int)_pos, k), dst, segments, written);
            _pos += k;
            written += k;
        }
        long payloadEnd = AcceleratorRecordHeader.Size + _payloadLength;
        if (written < max && _pos < payloadEnd)
        {
            int k = (int)Math.Min(payloadEnd - _pos, max - written);
            long at = _pos - AcceleratorRecordHeader.Size;
            if (segments is not null)
            {
                ReadOnlyMemory<byte> from = _recordBytes is not null
                    ? _recordBytes.AsMemory((int)at, k)
                    : _mem.Mapping.GetMemory(_recordDeviceOffset + at, k);
                _crc = Crc32C.Append(_crc, from.Span);
                segments.Add(from);
            }
            else
            {
                ReadOnlySpan<byte> from = _recordBytes is not null ? _recordBytes.AsSpan((int)at, k) : _mem.GetSpan(_recordDeviceOffset + at, k);
                // One pass: each word of device memory is loaded once, stored into the reply buffer and fed to the CRC.
                _crc = Crc32C.AppendCopy(_crc, from, dst.Slice(written, k));
            }
            _pos += k;
            written += k;
        }
        if (_pos == payloadEnd)
        {
            // The payload is all out (or empty): its CRC is final. Rewritten unchanged if the trailer waits for the next read.
            BinaryPrimitives.WriteUInt32LittleEndian(_trailer, Crc32C.Finish(_crc));
        }
        if (written < max && _pos >= payloadEnd)
        {
            int k = (int)Math.Min(payloadEnd + AcceleratorRecordHeader.TrailerSize - _pos, max - written);
            Put(_trailer.AsSpan((int)(_pos - payloadEnd), k), dst, segments, written);
            _pos += k;
            written += k;
        }
        if (_pos == payloadEnd + AcceleratorRecordHeader.TrailerSize)
        {
            _hasRecord = false;
            _recordBytes = null;
        }
        return written;
    }

    private void Put(ReadOnlySpan<byte> bytes, Span<byte> dst, MigrationGatherList? segments, int at)
    {
        if (segments is not null)
        {
            segments.Add(Small(segments, bytes));
        }
        else
        {
            bytes.CopyTo(dst[at..]);
        }
    }
}

/// <summary>
/// The resume side: parses records as they arrive in any segmentation, checks the profile as soon as the Profile
/// record is complete (EINVAL before any device memory is written), and applies State at <see cref="Commit"/>. Two
/// ways in, feeding one parser (a record's payload stays on the path its first byte took):
/// <list type="bullet">
/// <item><see cref="Write"/> (copying): a record is applied only after its payload CRC has been checked: when the rest of
/// a payload and its trailer are in one write, the CRC runs over the caller's bytes and the payload is then copied
/// straight into device memory; a payload split across writes is held (checksummed as it is copied) in one reusable
/// record-sized buffer until its trailer arrives. Device memory never holds part of a record that failed its check.</item>
/// <item><see cref="GetWriteSpan"/>/<see cref="AdvanceWrite"/> (zero-copy, the server receives from the socket into the
/// span): headers and trailers go to small buffers of the parser, Profile/State payloads to the staging buffer, and a
/// Pages payload straight into its place in device memory, checksummed as each piece arrives (while it is still in
/// cache). A Pages record that fails its CRC has then already landed: the load is dead (every later write fails with
/// EINVAL, RESUMING→STOP fails into ERROR), so the VF never runs with it; only a reset leaves.</item>
/// </list>
/// Every check failure is a <see cref="MigrationException"/> with EINVAL and ends the session.
/// </summary>
public sealed class AcceleratorLoadStream
{
    private readonly AcceleratorVf _vf;
    private readonly byte[] _header = new byte[AcceleratorRecordHeader.Size];
    private readonly byte[] _trailer = new byte[AcceleratorRecordHeader.TrailerSize];
    private int _headerFill;
    private int _trailerFill;
    private AcceleratorRecordHeader? _record;
    // Payload bytes of the current record received so far; all of them are held in _stage until the trailer is checked.
    private int _payloadPos;
    private byte[]? _stage;
    private uint _crc;
    private bool _profileOk;
    private bool _endSeen;
    private byte[]? _state;
    private bool _failed;
    // The current Pages record's payload is being received in place (zero-copy path), not held in _stage.
    private bool _inPlace;
    // What the span GetWriteSpan last gave points at, and its length.
    private SpanTarget _given;
    private int _givenLength;

    /// <summary>Largest piece of a Pages payload one <see cref="GetWriteSpan"/> gives: small enough that its CRC runs while
    /// the bytes just received are still in cache.</summary>
    public const int InPlaceSlice = 256 * 1024;

    internal AcceleratorLoadStream(AcceleratorVf vf) => _vf = vf;

    private enum SpanTarget
    {
        None,
        Header,
        InPlace,
        Stage,
        Trailer,
    }

    /// <summary>
    /// Zero-copy load, step 1 (<see cref="IMigrationDataSink.GetWriteSpan"/>): where the next stream bytes go — the
    /// rest of a record header, a piece (≤ <see cref="InPlaceSlice"/>) of device memory for a Pages payload, the
    /// staging buffer for a Profile/State payload, or the rest of a trailer. At most <paramref name="sizeHint"/> bytes.
    /// </summary>
    /// <exception cref="MigrationException">EINVAL: the session already failed, or the stream already ended.</exception>
    public Span<byte> GetWriteSpan(int sizeHint)
    {
        _given = SpanTarget.None;
        if (_failed)
        {
            throw new MigrationException(Errno.EINVAL, "the resume stream already failed");
        }
        if (_endSeen)
        {
            _failed = true;
            throw Invalid("data after the End record");
        }
        Span<byte> span;
        if (_record is not { } r)
        {
            span = _header.AsSpan(_headerFill);
            _given = SpanTarget.Header;
        }
        else if (_payloadPos < r.PayloadLength)
        {
            int rest = (int)r.PayloadLength - _payloadPos;
            if (r.Type == AcceleratorRecordType.Pages && (_payloadPos == 0 || _inPlace))
            {
                _inPlace = true;
                span = _vf.Memory.GetSpan((long)r.DeviceOffset + _payloadPos, Math.Min(rest, InPlaceSlice));
                _given = SpanTarget.InPlace;
            }
            else
            {
                span = Stage().AsSpan(_payloadPos, rest);
                _given = SpanTarget.Stage;
            }
        }
        else
        {
            span = _trailer.AsSpan(_trailerFill);
            _given = SpanTarget.Trailer;
        }
        span = span[..Math.Min(span.Length, sizeHint)];
        _givenLength = span.Length;
        return span;
    }

    /// <summary>
    /// Zero-copy load, step 2 (<see cref="IMigrationDataSink.AdvanceWrite"/>): <paramref name="count"/> bytes arrived
    /// at the start of the last span; parses and checks them (a completed header is validated, a completed trailer
    /// checks the payload's CRC and applies the record).
    /// </summary>
    /// <exception cref="MigrationException">EINVAL: invalid bytes (the session is then dead) or no span outstanding.</exception>
    public void AdvanceWrite(int count)
    {
        var given = _given;
        _given = SpanTarget.None;
        if (_failed || given == SpanTarget.None || count <= 0 || count > _givenLength)
        {
            _failed = true;
            throw new MigrationException(Errno.EINVAL, "accelerator resume stream: write without a matching span");
        }
        try
        {
            switch (given)
            {
                case SpanTarget.Header:
                    _headerFill += count;
                    if (_headerFill == AcceleratorRecordHeader.Size)
                    {
                        StartRecord();
                    }
                    break;
                case SpanTarget.InPlace:
                    var r = _record!.Value;
                    _crc = Crc32C.Append(_crc, _vf.Memory.GetSpan((long)r.DeviceOffset + _payloadPos, count));
                    _payloadPos += count;
                    break;
                case SpanTarget.Stage:
                    _crc = Crc32C.Append(_crc, _stage.AsSpan(_payloadPos, count));
                    _payloadPos += count;
                    break;
                default:
                    _trailerFill += count;
                    if (_trailerFill == AcceleratorRecordHeader.TrailerSize)
                    {
                        var t = _record!.Value;
                        Check(t, _crc, _trailer);
                        Apply(t, default);
                    }
                    break;
            }
        }
        catch (MigrationException)
        {
            _failed = true;
            throw;
        }
    }

    // The record-sized holding buffer (1 MiB: the largest payload), allocated once per session when first needed.
    private byte[] Stage() => _stage ??= GC.AllocateUninitializedArray<byte>(AcceleratorRecordHeader.MaxPagesPayload);

    /// <summary>Bytes of device memory written so far (for tests and progress).</summary>
    public long PageBytesLoaded { get; private set; }

    /// <summary>Consumes stream bytes. Throws <see cref="MigrationException"/> (EINVAL) on any invalid byte; the session is then dead.</summary>
    public void Write(ReadOnlySpan<byte> data)
    {
        if (_failed)
        {
            throw new MigrationException(Errno.EINVAL, "the resume stream already failed");
        }
        try
        {
            while (!data.IsEmpty)
            {
                data = data[Consume(data)..];
            }
        }
        catch (MigrationException)
        {
            _failed = true;
            throw;
        }
    }

    /// <summary>RESUMING → STOP: the stream must be complete; installs registers and PCI config state.</summary>
    public void Commit()
    {
        if (_failed || !_endSeen || _state is null || _record is not null || _headerFill != 0)
        {
            throw new MigrationException(Errno.EINVAL, "the accelerator resume stream is incomplete (no State or End record)");
        }
        AcceleratorVfRegisters.TryRead(_state, out var regs);
        int pciLength = (int)BinaryPrimitives.ReadUInt32LittleEndian(_state.AsSpan(AcceleratorVfRegisters.Size));
        try
        {
            _vf.LoadConfigState(_state.AsSpan(AcceleratorVfRegisters.Size + 4, pciLength));
            _vf.RestoreRegisters(regs);
        }
        catch (InvalidDataException e)
        {
            throw new MigrationException(Errno.EINVAL, $"accelerator state rejected: {e.Message}");
        }
    }

    private int Consume(ReadOnlySpan<byte> data)
    {
        if (_endSeen)
        {
            throw Invalid("data after the End record");
        }
        if (_record is null)
        {
            int k = Math.Min(AcceleratorRecordHeader.Size - _headerFill, data.Length);
            data[..k].CopyTo(_header.AsSpan(_headerFill));
            _headerFill += k;
            if (_headerFill == AcceleratorRecordHeader.Size)
            {
                StartRecord();
            }
            return k;
        }
        var r = _record.Value;
        int rest = (int)r.PayloadLength - _payloadPos;
        if (_trailerFill == 0 && !_inPlace && data.Length >= rest + AcceleratorRecordHeader.TrailerSize)
        {
            // The rest of the payload and the whole trailer are here: check in place, then apply without holding.
            var tail = data[..rest];
            Check(r, Crc32C.Append(_crc, tail), data.Slice(rest, AcceleratorRecordHeader.TrailerSize));
            Apply(r, tail);
            return rest + AcceleratorRecordHeader.TrailerSize;
        }
        if (rest > 0)
        {
            int k = Math.Min(rest, data.Length);
            // A payload that began on the zero-copy path goes on in place (its first bytes are already there).
            var dst = _inPlace ? _vf.Memory.GetSpan((long)r.DeviceOffset + _payloadPos, k) : Stage().AsSpan(_payloadPos);
            _crc = Crc32C.AppendCopy(_crc, data[..k], dst);
            _payloadPos += k;
            return k;
        }
        int t = Math.Min(AcceleratorRecordHeader.TrailerSize - _trailerFill, data.Length);
        data[..t].CopyTo(_trailer.AsSpan(_trailerFill));
        _trailerFill += t;
        if (_trailerFill == AcceleratorRecordHeader.TrailerSize)
        {
            Check(r, _crc, _trailer);
            Apply(r, default);
        }
        return t;
    }

    private void StartRecord()
    {
        if (!AcceleratorRecordHeader.TryRead(_header, out var h))
        {
            throw Invalid("bad record header (magic, version or header CRC)");
        }
        if (!_profileOk && h.Type != AcceleratorRecordType.Profile)
        {
            throw Invalid($"the stream starts with a {h.Type} record, not the Profile");
        }
        switch (h.Type)
        {
            case AcceleratorRecordType.Profile when h.PayloadLength == AcceleratorProfile.Size && !_profileOk:
            case AcceleratorRecordType.End when h.PayloadLength == 0:
                break;
            case AcceleratorRecordType.State when h.PayloadLength is >= AcceleratorVfRegisters.Size + 4 and <= AcceleratorRecordHeader.MaxStatePayload && _state is null:
                break;
            case AcceleratorRecordType.Pages:
                if (h.PayloadLength == 0 || h.PayloadLength > AcceleratorRecordHeader.MaxPagesPayload || h.PayloadLength % DeviceMemory.PageSize != 0
                    || h.DeviceOffset % DeviceMemory.PageSize != 0 || !_vf.Memory.Contains(h.DeviceOffset, h.PayloadLength))
                {
                    throw Invalid($"Pages record [0x{h.DeviceOffset:X}, +0x{h.PayloadLength:X}) is not whole pages inside {_vf.Memory.Size} bytes of device memory");
                }
                break;
            default:
                throw Invalid($"unexpected {h.Type} record with a {h.PayloadLength}-byte payload");
        }
        // From here PayloadLength ≤ MaxPagesPayload (every accepted type is bounded above), so it fits _stage and an int.
        _record = h;
        _inPlace = false;
        _payloadPos = 0;
        _crc = Crc32C.Start;
        _trailerFill = 0;
    }

    private static void Check(AcceleratorRecordHeader r, uint crc, ReadOnlySpan<byte> trailer)
    {
        if (BinaryPrimitives.ReadUInt32LittleEndian(trailer) != Crc32C.Finish(crc))
        {
            throw Invalid($"{r.Type} record payload CRC32C mismatch");
        }
    }

    /// <summary>
    /// Applies a record whose CRC has been checked: its payload is the <c>_payloadPos</c> bytes held in
    /// <c>_stage</c> followed by <paramref name="tail"/>.
    /// </summary>
    private void Apply(AcceleratorRecordHeader r, ReadOnlySpan<byte> tail)
    {
        int held = _payloadPos;
        if (r.Type == AcceleratorRecordType.Pages && _inPlace)
        {
            // Already in device memory (zero-copy path).
            PageBytesLoaded += r.PayloadLength;
        }
        else if (r.Type == AcceleratorRecordType.Pages)
        {
            var dst = _vf.Memory.GetSpan((long)r.DeviceOffset, (int)r.PayloadLength);
            _stage.AsSpan(0, held).CopyTo(dst);
            tail.CopyTo(dst[held..]);
            PageBytesLoaded += r.PayloadLength;
        }
        else
        {
            ReadOnlySpan<byte> payload = tail;
            if (held > 0)
            {
                tail.CopyTo(_stage.AsSpan(held));
                payload = _stage.AsSpan(0, (int)r.PayloadLength);
            }
            ApplySmall(r.Type, payload);
        }
        _record = null;
        _payloadPos = 0;
        _headerFill = 0;
        _inPlace = false;
    }

    private void ApplySmall(AcceleratorRecordType type, ReadOnlySpan<byte> payload)
    {
        switch (type)
        {
            case AcceleratorRecordType.Profile:
                AcceleratorProfile.TryRead(payload, out var p);
                if (p != _vf.Profile)
                {
                    throw Invalid($"profile mismatch: the source VF is {Describe(p)}, this VF is {Describe(_vf.Profile)}");
                }
                _profileOk = true;
                break;
            case AcceleratorRecordType.State:
                int pciLength = (int)BinaryPrimitives.ReadUInt32LittleEndian(payload[AcceleratorVfRegisters.Size..]);
                if (pciLength != payload.Length - AcceleratorVfRegisters.Size - 4)
                {
                    throw Invalid("State record PCI length does not match its payload");
                }
                _state = payload.ToArray();
                break;
            case AcceleratorRecordType.End:
                _endSeen = true;
                break;
            default:
                break;
        }
    }

    private static string Describe(AcceleratorProfile p) =>
        $"model {p.ModelVersion}, {p.DeviceMemorySize} bytes of device memory, rings ≤ {p.MaxRingEntries}, {p.MsixVectors} vectors, {p.PageSize}-byte pages";

    private static MigrationException Invalid(string what) => new(Errno.EINVAL, "accelerator resume stream: " + what);
}
