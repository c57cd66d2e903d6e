using System.Buffers.Binary;

namespace Vmig.VfioUser.Protocol;

/// <summary>Header flags (vfio-user.rst "Header"): bits 0-3 type, bit 4 NO_REPLY, bit 5 ERROR.</summary>
[Flags]
public enum VfioUserHeaderFlags : uint
{
    Command = 0x0,
    Reply = 0x1,
    TypeMask = 0xF,
    NoReply = 0x10,
    Error = 0x20,
}

/// <summary>
/// The 16-byte header in front of every vfio-user message (host byte order; little-endian here):
/// msg_id u16 @0, command u16 @2, msg_size u32 @4 (whole message including this header),
/// flags u32 @8, error_no u32 @12.
/// </summary>
public readonly struct VfioUserHeader
{
    /// <summary>Header size in bytes.</summary>
    public const int Size = 16;

    public VfioUserHeader(ushort messageId, VfioUserCommand command, uint messageSize, VfioUserHeaderFlags flags, uint errorNo = 0)
    {
        MessageId = messageId;
        Command = command;
        MessageSize = messageSize;
        Flags = flags;
        ErrorNo = errorNo;
    }

    public ushort MessageId { get; }
    public VfioUserCommand Command { get; }
    /// <summary>Whole message size in bytes, header included.</summary>
    public uint MessageSize { get; }
    public VfioUserHeaderFlags Flags { get; }
    /// <summary>errno of an error reply (may be 0 even with ERROR set).</summary>
    public uint ErrorNo { get; }

    public bool IsReply => (Flags & VfioUserHeaderFlags.TypeMask) == VfioUserHeaderFlags.Reply;
    public bool IsCommand => (Flags & VfioUserHeaderFlags.TypeMask) == VfioUserHeaderFlags.Command;
    public bool IsError => (Flags & VfioUserHeaderFlags.Error) != 0;
    public bool NoReply => (Flags & VfioUserHeaderFlags.NoReply) != 0;
    /// <summary>Payload size in bytes (msg_size − 16); only meaningful once <see cref="MessageSize"/> ≥ 16 was checked.</summary>
    public int PayloadSize => (int)(MessageSize - Size);

    public static VfioUserHeader ReadFrom(ReadOnlySpan<byte> src) => new(
        BinaryPrimitives.ReadUInt16LittleEndian(src),
        (VfioUserCommand)BinaryPrimitives.ReadUInt16LittleEndian(src[2..]),
        BinaryPrimitives.ReadUInt32LittleEndian(src[4..]),
        (VfioUserHeaderFlags)BinaryPrimitives.ReadUInt32LittleEndian(src[8..]),
        BinaryPrimitives.ReadUInt32LittleEndian(src[12..]));

    public void WriteTo(Span<byte> dst)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(dst, MessageId);
        BinaryPrimitives.WriteUInt16LittleEndian(dst[2..], (ushort)Command);
        BinaryPrimitives.WriteUInt32LittleEndian(dst[4..], MessageSize);
        BinaryPrimitives.WriteUInt32LittleEndian(dst[8..], (uint)Flags);
        BinaryPrimitives.WriteUInt32LittleEndian(dst[12..], ErrorNo);
    }

    public override string ToString() => $"id={MessageId} {Command} size={MessageSize} flags=0x{(uint)Flags:x} err={ErrorNo}";
}
