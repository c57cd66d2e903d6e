using System.Buffers.Binary;

namespace Vmig.Vmm.Stream;

/// <summary>
/// Writes the stream header and framed sections to a <see cref="System.IO.Stream"/> (socket, TLS stream, file).
/// Not thread-safe: one writer per stream. Counts bytes per section type for the report.
/// </summary>
public sealed class SectionWriter
{
    private readonly System.IO.Stream _stream;
    private readonly byte[] _header = new byte[SectionHeader.Size];
    private readonly Dictionary<SectionType, long> _bytesByType = [];

    public SectionWriter(System.IO.Stream stream) => _stream = stream ?? throw new ArgumentNullException(nameof(stream));

    /// <summary>Total bytes written (headers included).</summary>
    public long BytesWritten { get; private set; }

    /// <summary>Bytes written per section type (16-byte headers included).</summary>
    public IReadOnlyDictionary<SectionType, long> BytesByType => _bytesByType;

    /// <summary>Writes the 16-byte stream header.</summary>
    public void WriteStreamHeader(ushort major = StreamHeader.CurrentMajor, ushort minor = StreamHeader.CurrentMinor)
    {
        Span<byte> h = stackalloc byte[StreamHeader.Size];
        new StreamHeader(major, minor).WriteTo(h);
        _stream.Write(h);
        BytesWritten += StreamHeader.Size;
    }

    /// <summary>Writes a section of a known type; mandatory unless the type is optional by definition.</summary>
    public void Write(SectionType type, ReadOnlySpan<byte> payload) =>
        WriteRaw((ushort)type, SectionIo.IsOptional(type) ? SectionFlags.None : SectionFlags.Mandatory, payload);

    /// <summary>Writes any section (tests use it to forge unknown types).</summary>
    public void WriteRaw(ushort type, SectionFlags flags, ReadOnlySpan<byte> payload)
    {
        new SectionHeader(type, flags, (uint)payload.Length, SectionHeader.ComputeCrc(type, flags, payload)).WriteTo(_header);
        _stream.Write(_header);
        _stream.Write(payload);
        long n = SectionHeader.Size + payload.Length;
        BytesWritten += n;
        var t = (SectionType)type;
        _bytesByType[t] = _bytesByType.GetValueOrDefault(t) + n;
    }

    /// <summary>
    /// Writes a section whose payload is already in <paramref name="frame"/> at offset <see cref="SectionHeader.Size"/>
    /// (<paramref name="payloadLength"/> bytes): the header is filled into the first 16 bytes and header and payload go
    /// to the stream in one write (a separate 16-byte header write would be its own send on a socket).
    /// </summary>
    public void WriteFramed(SectionType type, byte[] frame, int payloadLength)
    {
        ArgumentNullException.ThrowIfNull(frame);
        ArgumentOutOfRangeException.ThrowIfNegative(payloadLength);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(payloadLength, frame.Length - SectionHeader.Size);
        ushort t = (ushort)type;
        var flags = SectionIo.IsOptional(type) ? SectionFlags.None : SectionFlags.Mandatory;
        var payload = frame.AsSpan(SectionHeader.Size, payloadLength);
        new SectionHeader(t, flags, (uint)payloadLength, SectionHeader.ComputeCrc(t, flags, payload)).WriteTo(frame);
        WriteBuilt(type, frame, payloadLength);
    }

    /// <summary>
    /// Writes a section that is complete in <paramref name="frame"/>: its 16-byte header (CRCs included, e.g. from
    /// <see cref="SectionHeader.StartCrc"/> fed while the payload was produced) followed by <paramref name="payloadLength"/>
    /// payload bytes, in one write. The header is not re-checked here: the reader checks both CRCs.
    /// </summary>
    public void WriteBuilt(SectionType type, byte[] frame, int payloadLength)
    {
        ArgumentNullException.ThrowIfNull(frame);
        ArgumentOutOfRangeException.ThrowIfNegative(payloadLength);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(payloadLength, frame.Length - SectionHeader.Size);
        _stream.Write(frame, 0, SectionHeader.Size + payloadLength);
        long n = SectionHeader.Size + payloadLength;
        BytesWritten += n;
        _bytesByType[type] = _bytesByType.GetValueOrDefault(type) + n;
    }

    /// <summary>Flushes the underlying stream (at sync points: handshake, switchover, end).</summary>
    public void Flush() => _stream.Flush();
}

/// <summary>
/// Reads the stream header and sections, checking every CRC and bounding every length before allocating.
/// Unknown optional sections are skipped; unknown mandatory sections, bad CRCs, reserved flag bits and
/// over-long payloads throw <see cref="StreamFormatException"/>. Not thread-safe.
/// </summary>
public sealed class SectionReader
{
    /// <summary>Hard ceiling on a payload: 16 MiB.</summary>
    public const int MaxPayloadLimit = 16 << 20;

    private readonly System.IO.Stream _stream;
    private readonly byte[] _header = new byte[SectionHeader.Size];
    private byte[] _payload = new byte[4096];
    private int _length;

    /// <param name="stream">The source.</param>
    /// <param name="maxPayload">Largest payload accepted (≤ <see cref="MaxPayloadLimit"/>).</param>
    public SectionReader(System.IO.Stream stream, int maxPayload = 4 << 20)
    {
        _stream = stream ?? throw new ArgumentNullException(nameof(stream));
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxPayload);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(maxPayload, MaxPayloadLimit);
        MaxPayload = maxPayload;
    }

    /// <summary>Largest payload accepted.</summary>
    public int MaxPayload { get; }

    /// <summary>Type of the current section.</summary>
    public SectionType Type { get; private set; }

    /// <summary>Payload of the current section; valid until the next read.</summary>
    public ReadOnlySpan<byte> Payload => _payload.AsSpan(0, _length);

    /// <summary>Unknown optional sections skipped so far.</summary>
    public int SkippedSections { get; private set; }

    /// <summary>Bytes read so far.</summary>
    public long BytesRead { get; private set; }

    /// <summary>Reads and checks the 16-byte stream header.</summary>
    /// <exception cref="StreamFormatException">Bad magic, CRC or an unsupported major version.</exception>
    /// <exception cref="EndOfStreamException">The stream ended inside the header.</exception>
    public StreamHeader ReadStreamHeader()
    {
        Span<byte> h = stackalloc byte[StreamHeader.Size];
        _stream.ReadExactly(h);
        BytesRead += StreamHeader.Size;
        if (!StreamHeader.TryRead(h, out var header))
        {
            throw new StreamFormatException("not a vmig migration stream (bad magic or header CRC)");
        }
        if (header.Major != StreamHeader.CurrentMajor)
        {
            throw new StreamFormatException($"stream version {header.Major}.{header.Minor} is not supported (this reader: {StreamHeader.CurrentMajor}.x)");
        }
        return header;
    }

    /// <summary>
    /// Reads the next known section into <see cref="Type"/>/<see cref="Payload"/>. Returns false on a clean end of
    /// stream (no byte of a next header).
    /// </summary>
    /// <exception cref="StreamFormatException">Malformed section (see class remarks).</exception>
    /// <exception cref="EndOfStreamException">The stream ended inside a section.</exception>
    public bool ReadNext()
    {
        while (true)
        {
            int got = _stream.ReadAtLeast(_header, SectionHeader.Size, throwOnEndOfStream: false);
            if (got == 0)
            {
                return false;
            }
            if (got < SectionHeader.Size)
            {
                throw new EndOfStreamException($"stream ended inside a section header ({got} of {SectionHeader.Size} bytes)");
            }
            // The header has its own CRC: a corrupted length fails here, at once, instead of waiting for a payload the
            // writer never sent (before 2.0 that waited out the socket timeout at the end of a migration).
            if (!SectionHeader.TryRead(_header, out var h))
            {
                throw new StreamFormatException("section header CRC mismatch (corrupted type, flags or length)");
            }
            if ((h.Flags & ~SectionFlags.Mandatory) != 0)
            {
                throw new StreamFormatException($"section type {h.Type}: reserved flag bits set ({(ushort)h.Flags:#x})");
            }
            if (h.Length > (uint)MaxPayload)
            {
                throw new StreamFormatException($"section type {h.Type}: payload of {h.Length} bytes exceeds the limit of {MaxPayload}");
            }
            if (SectionIo.MaxPayloadOf(h.Type) is int typeMax && h.Length > (uint)typeMax)
            {
                throw new StreamFormatException($"section type {h.Type}: payload of {h.Length} bytes exceeds the type's maximum of {typeMax}");
            }
            int len = (int)h.Length;
            if (_payload.Length < len)
            {
                _payload = new byte[Math.Max(len, Math.Min(MaxPayload, _payload.Length * 2))];
            }
            _stream.ReadExactly(_payload, 0, len);
            BytesRead += SectionHeader.Size + len;
            if (SectionHeader.ComputeCrc(h.Type, h.Flags, _payload.AsSpan(0, len)) != h.Crc)
            {
                throw new StreamFormatException($"section type {h.Type}: CRC-32C mismatch");
            }
            if (!SectionIo.IsKnown(h.Type))
            {
                if ((h.Flags & SectionFlags.Mandatory) != 0)
                {
                    throw new StreamFormatException($"unknown mandatory section type {h.Type}");
                }
                SkippedSections++;
                continue;
            }
            Type = (SectionType)h.Type;
            _length = len;
            return true;
        }
    }

    /// <summary>
    /// Hands the current payload's buffer to the caller (the payload is its first <see cref="Payload"/>.Length bytes,
    /// as before the call) and continues with <paramref name="replacement"/> (or a new buffer of the same size), so a
    /// consumer on another thread can own the bytes without a copy. <see cref="Payload"/> is empty afterwards.
    /// </summary>
    public byte[] TakePayload(byte[]? replacement = null)
    {
        byte[] taken = _payload;
        _payload = replacement ?? new byte[taken.Length];
        _length = 0;
        return taken;
    }

    /// <summary>Reads the next section and requires it to be <paramref name="expected"/>.</summary>
    /// <exception cref="StreamFormatException">Another type came, or the stream ended.</exception>
    public void Expect(SectionType expected)
    {
        if (!ReadNext())
        {
            throw new StreamFormatException($"stream ended; expected section {expected}");
        }
        if (Type != expected)
        {
            throw new StreamFormatException($"expected section {expected}, got {Type}");
        }
    }
}

/// <summary>Type tables and small payload codecs (docs/stream-format.md §3).</summary>
public static class SectionIo
{
    /// <summary>True for types this version defines.</summary>
    public static bool IsKnown(ushort type) => type is >= 1 and <= 18;

    /// <summary>Longest reason text in a HandshakeReply or TargetResult (bytes of UTF-8).</summary>
    public const int MaxReasonBytes = 64 << 10;

    /// <summary>
    /// Largest payload a section of a known type can have (docs/stream-format.md §3), or null for a type this version
    /// does not define. Fixed-size types get their exact size; optional types get room to grow in later minor
    /// versions (4 KiB). Checked by <see cref="SectionReader"/> before it reads the payload.
    /// </summary>
    public static int? MaxPayloadOf(ushort type) => (SectionType)type switch
    {
        SectionType.VmDescription => 1 << 20,
        SectionType.HandshakeReply => 4 + MaxReasonBytes,
        SectionType.RamPages => Migration.RamPages.MaxPayload,
        SectionType.DeviceData => 4 << 20, // 4-byte header + one MIG_DATA_READ of at most 4 MiB − 4 (MigrationOptions.DeviceReadChunk)
        SectionType.DeviceInitialDataSent or SectionType.SwitchoverAck or SectionType.DeviceEnd => 4,
        SectionType.VcpuState => 4 + Guest.GuestEnvironment.RegisterSize,
        SectionType.EndOfState or SectionType.TargetReady or SectionType.Commit => 0,
        SectionType.TargetResult => Migration.TargetResult.FixedSize + MaxReasonBytes,
        SectionType.ChannelHello => 24,
        SectionType.ChannelEnd => 8,
        SectionType.RoundInfo or SectionType.SwitchoverStart or SectionType.RoundApplied => 4096,
        SectionType.TargetTimings => 64 << 10,
        _ => null,
    };

    /// <summary>True for types written without the mandatory flag.</summary>
    public static bool IsOptional(SectionType type) => type is SectionType.RoundInfo or SectionType.SwitchoverStart or SectionType.RoundApplied or SectionType.TargetTimings;

    /// <summary>4-byte payload: u16 device index, u16 0.</summary>
    public static byte[] DeviceIndexPayload(int device)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt16LittleEndian(b, checked((ushort)device));
        return b;
    }

    /// <summary>Parses a device-index payload (≥ 4 bytes) and bounds it by <paramref name="deviceCount"/>.</summary>
    public static int ReadDeviceIndex(ReadOnlySpan<byte> payload, int deviceCount)
    {
        if (payload.Length < 4)
        {
            throw new StreamFormatException($"device section of {payload.Length} bytes is shorter than 4");
        }
        int d = BinaryPrimitives.ReadUInt16LittleEndian(payload);
        if (d >= deviceCount)
        {
            throw new StreamFormatException($"device index {d} but the VM has {deviceCount} devices");
        }
        return d;
    }

    /// <summary>RoundApplied payload: u32 round, u32 0.</summary>
    public static byte[] RoundPayload(uint round)
    {
        var b = new byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(b, round);
        return b;
    }

    /// <summary>Parses a RoundApplied payload (≥ 4 bytes).</summary>
    public static uint ReadRound(ReadOnlySpan<byte> payload) => payload.Length < 4
        ? throw new StreamFormatException($"round section of {payload.Length} bytes is shorter than 4")
        : BinaryPrimitives.ReadUInt32LittleEndian(payload);

    /// <summary>TargetTimings payload: UTF-8 JSON object, step name → microseconds (integers).</summary>
    public static byte[] TimingsPayload(IReadOnlyDictionary<string, long> microseconds) =>
        System.Text.Json.JsonSerializer.SerializeToUtf8Bytes(microseconds);

    /// <summary>
    /// Runs <see cref="TimingsPayload"/> and <see cref="ReadTimings"/> once on a thread-pool thread, so System.Text.Json's
    /// first use in this process (reflection, converters, JIT: tens of ms in a fresh process) is not paid inside the
    /// downtime, where the target serializes and the source parses the timings between Commit and TargetResult.
    /// </summary>
    public static void WarmUpTimings() => ThreadPool.UnsafeQueueUserWorkItem<object?>(
        static _ => ReadTimings(TimingsPayload(new Dictionary<string, long> { ["warm-up"] = 0 })), null, preferLocal: false);

    /// <summary>Parses a TargetTimings payload; informational only, so anything malformed yields an empty result.</summary>
    public static IReadOnlyDictionary<string, long> ReadTimings(ReadOnlySpan<byte> payload)
    {
        try
        {
            return System.Text.Json.JsonSerializer.Deserialize<Dictionary<string, long>>(payload) ?? [];
        }
        catch (System.Text.Json.JsonException)
        {
            return new Dictionary<string, long>();
        }
    }

    /// <summary>Status payload: u32 status, UTF-8 text.</summary>
    public static byte[] StatusPayload(uint status, string? reason)
    {
        byte[] text = ReasonBytes(reason);
        var b = new byte[4 + text.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(b, status);
        text.CopyTo(b, 4);
        return b;
    }

    /// <summary>Parses a status payload.</summary>
    public static (uint Status, string Reason) ReadStatus(ReadOnlySpan<byte> payload)
    {
        if (payload.Length < 4)
        {
            throw new StreamFormatException("status section shorter than 4 bytes");
        }
        return (BinaryPrimitives.ReadUInt32LittleEndian(payload), System.Text.Encoding.UTF8.GetString(payload[4..]));
    }

    /// <summary>UTF-8 of <paramref name="reason"/>, cut to <see cref="MaxReasonBytes"/> (a reader refuses longer).</summary>
    public static byte[] ReasonBytes(string? reason)
    {
        byte[] text = System.Text.Encoding.UTF8.GetBytes(reason ?? "");
        return text.Length <= MaxReasonBytes ? text : text[..MaxReasonBytes];
    }
}
