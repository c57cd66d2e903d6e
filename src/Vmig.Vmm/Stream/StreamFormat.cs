using Vmig.Spec;
using System.Buffers.Binary;
using System.Numerics;

namespace Vmig.Vmm.Stream;

/// <summary>
/// Section types of the migration stream (docs/stream-format.md §3). Direction: S→T source to target (or to a
/// snapshot file), T→S target back to source.
/// </summary>
public enum SectionType : ushort
{
    /// <summary>S→T, mandatory: the VM description, UTF-8 JSON.</summary>
    VmDescription = 1,
    /// <summary>T→S, mandatory: u32 status (0 accept, 1 refuse), UTF-8 reason.</summary>
    HandshakeReply = 2,
    /// <summary>S→T, mandatory: RAM page runs of one round.</summary>
    RamPages = 3,
    /// <summary>S→T, mandatory: u16 device index, u8 phase, u8 0, device migration bytes.</summary>
    DeviceData = 4,
    /// <summary>S→T, mandatory: u16 device index, u16 0 — the device's initial pre-copy bytes are all sent.</summary>
    DeviceInitialDataSent = 5,
    /// <summary>T→S, mandatory: u16 device index, u16 0 — the target loaded the initial bytes (switchover-ack).</summary>
    SwitchoverAck = 6,
    /// <summary>S→T, mandatory: u32 vCPU index, register block.</summary>
    VcpuState = 7,
    /// <summary>S→T, mandatory: u16 device index, u16 0 — the device's stop-copy stream ended.</summary>
    DeviceEnd = 8,
    /// <summary>S→T, mandatory, empty: the whole VM state has been sent.</summary>
    EndOfState = 9,
    /// <summary>T→S, mandatory: u32 status (0 running, 1 failed), u32 0, u64 target downtime µs, u64 commit wait µs, UTF-8 reason (<see cref="Migration.TargetResult"/>).</summary>
    TargetResult = 10,
    /// <summary>S→T on an extra RAM channel, mandatory: 16-byte session id, u32 channel index, u32 channel count.</summary>
    ChannelHello = 11,
    /// <summary>S→T on an extra RAM channel, mandatory: u64 RAM pages sent on this channel.</summary>
    ChannelEnd = 12,
    /// <summary>S→T, optional: u32 round, u32 0, u64 dirty pages, u64 bytes sent, u64 round µs.</summary>
    RoundInfo = 13,
    /// <summary>S→T, optional, empty: the source paused its vCPUs (downtime starts).</summary>
    SwitchoverStart = 14,
    /// <summary>
    /// T→S, mandatory, empty (since 2.0): the target loaded the whole state, its devices are in STOP/RUNNING_P2P and
    /// its vCPUs are parked; it waits for <see cref="Commit"/> and never runs without it.
    /// </summary>
    TargetReady = 15,
    /// <summary>S→T, mandatory, empty (since 2.0): the source gives the VM up; the target may run it.</summary>
    Commit = 16,
    /// <summary>
    /// T→S, optional (since 2.1): u32 round, u32 0 — the target has applied every section the main connection carried up
    /// to that round's RoundInfo. A 2.1 source waits for the last pre-copy round's before pausing its vCPUs, so no
    /// receive backlog lands in the downtime.
    /// </summary>
    RoundApplied = 17,
    /// <summary>T→S, optional (since 2.1): the target's step durations, UTF-8 JSON object of step name → microseconds; sent right before TargetReady.</summary>
    TargetTimings = 18,
}

/// <summary>Section flags (u16).</summary>
[Flags]
public enum SectionFlags : ushort
{
    None = 0,
    /// <summary>A reader that does not know the type must fail rather than skip it.</summary>
    Mandatory = 1,
}

/// <summary>
/// The 16-byte stream header: 0 "VMIGSTRM" (8 ASCII bytes); 8 u16 major; 10 u16 minor; 12 u32 CRC-32C of
/// bytes 0-11. All little-endian.
/// </summary>
public readonly struct StreamHeader
{
    public const int Size = 16;
    /// <summary>2: 16-byte section headers with their own CRC, and the TargetReady/Commit end (docs/stream-format.md §4).</summary>
    public const ushort CurrentMajor = 2;
    /// <summary>
    /// 2: a device-data connection next to the RAM ones, when the VmDescription asks for it (docs/stream-format.md
    /// §4.2). 1: optional RoundApplied and TargetTimings; the first RAM pass may leave zero pages out.
    /// </summary>
    public const ushort CurrentMinor = 2;

    private static ReadOnlySpan<byte> MagicBytes => "VMIGSTRM"u8;

    public StreamHeader(ushort major, ushort minor)
    {
        Major = major;
        Minor = minor;
    }

    public ushort Major { get; }
    public ushort Minor { get; }

    /// <summary>Writes the 16 bytes.</summary>
    public void WriteTo(Span<byte> destination)
    {
        MagicBytes.CopyTo(destination);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[8..], Major);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[10..], Minor);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[12..], Crc32C.Compute(destination[..12]));
    }

    /// <summary>Parses; false if short, wrong magic or CRC mismatch (never throws).</summary>
    public static bool TryRead(ReadOnlySpan<byte> source, out StreamHeader header)
    {
        header = default;
        if (source.Length < Size || !source[..8].SequenceEqual(MagicBytes)
            || BinaryPrimitives.ReadUInt32LittleEndian(source[12..]) != Crc32C.Compute(source[..12]))
        {
            return false;
        }
        header = new StreamHeader(BinaryPrimitives.ReadUInt16LittleEndian(source[8..]), BinaryPrimitives.ReadUInt16LittleEndian(source[10..]));
        return true;
    }
}

/// <summary>
/// The 16-byte section header: 0 u16 type; 2 u16 flags; 4 u32 payload length; 8 u32 header CRC (CRC-32C of bytes
/// 0-7); 12 u32 CRC-32C over bytes 0-7 followed by the payload. Little-endian. The header CRC lets a reader refuse a
/// corrupted length before it waits for a payload that will never come (stream format 2.0).
/// </summary>
public readonly struct SectionHeader
{
    public const int Size = 16;

    public SectionHeader(ushort type, SectionFlags flags, uint length, uint crc)
    {
        Type = type;
        Flags = flags;
        Length = length;
        Crc = crc;
    }

    public ushort Type { get; }
    public SectionFlags Flags { get; }
    public uint Length { get; }

    /// <summary>CRC-32C over header bytes 0-7 and the payload.</summary>
    public uint Crc { get; }

    /// <summary>CRC the header should carry for <paramref name="payload"/>.</summary>
    public static uint ComputeCrc(ushort type, SectionFlags flags, ReadOnlySpan<byte> payload) =>
        Crc32C.Finish(Crc32C.Append(StartCrc(type, flags, (uint)payload.Length), payload));

    /// <summary>
    /// The running (non-inverted) CRC-32C after header bytes 0-7 of a section with this type, flags and payload length:
    /// a writer that produces the payload piece by piece feeds each piece into it (<see cref="Crc32C.Append"/> or the
    /// copying <see cref="Crc32C.AppendCopy"/>) and ends with <see cref="Crc32C.Finish"/>, giving <see cref="ComputeCrc"/>.
    /// </summary>
    public static uint StartCrc(ushort type, SectionFlags flags, uint length)
    {
        Span<byte> first = stackalloc byte[8];
        WriteFirst(first, type, flags, length);
        return Crc32C.Append(Crc32C.Start, first);
    }

    /// <summary>Writes the 16 bytes (the header CRC is computed here).</summary>
    public void WriteTo(Span<byte> destination)
    {
        WriteFirst(destination, Type, Flags, Length);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[8..], Crc32C.Compute(destination[..8]));
        BinaryPrimitives.WriteUInt32LittleEndian(destination[12..], Crc);
    }

    /// <summary>Parses 16 bytes; false if short or the header CRC (bytes 8-11) does not match bytes 0-7 (never throws).</summary>
    public static bool TryRead(ReadOnlySpan<byte> source, out SectionHeader header)
    {
        header = default;
        if (source.Length < Size || BinaryPrimitives.ReadUInt32LittleEndian(source[8..]) != Crc32C.Compute(source[..8]))
        {
            return false;
        }
        header = new SectionHeader(
            BinaryPrimitives.ReadUInt16LittleEndian(source),
            (SectionFlags)BinaryPrimitives.ReadUInt16LittleEndian(source[2..]),
            BinaryPrimitives.ReadUInt32LittleEndian(source[4..]),
            BinaryPrimitives.ReadUInt32LittleEndian(source[12..]));
        return true;
    }

    private static void WriteFirst(Span<byte> destination, ushort type, SectionFlags flags, uint length)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(destination, type);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[2..], (ushort)flags);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[4..], length);
    }
}

/// <summary>The stream is malformed (bad magic/version, CRC mismatch, bad length, unknown mandatory section, bad payload).</summary>
public sealed class StreamFormatException : IOException
{
    public StreamFormatException(string message) : base(message) { }
}
