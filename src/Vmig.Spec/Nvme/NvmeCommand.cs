using System.Buffers.Binary;

namespace Vmig.Spec.Nvme;

/// <summary>
/// A 64-byte Submission Queue Entry (NVMe Base 2.x §4.2, "Common Command Format"). PRP form only (PSDT = 0).
/// Layout: byte 0 OPC, 1 FUSE[1:0]/PSDT[7:6], 2-3 CID, 4-7 NSID, 8-15 CDW2-3, 16-23 MPTR, 24-31 PRP1, 32-39 PRP2,
/// 40-63 CDW10-CDW15.
/// </summary>
public readonly record struct SubmissionQueueEntry
{
    /// <summary>Bytes on the wire.</summary>
    public const int Size = 64;

    public byte Opcode { get; init; }

    /// <summary>Byte 1: FUSE [1:0], PSDT [7:6].</summary>
    public byte Flags { get; init; }

    /// <summary>Command Identifier, unique per SQ among commands in flight.</summary>
    public ushort Cid { get; init; }

    public uint Nsid { get; init; }
    public uint Cdw2 { get; init; }
    public uint Cdw3 { get; init; }

    /// <summary>Metadata pointer (unused: no metadata formats).</summary>
    public ulong Mptr { get; init; }

    public ulong Prp1 { get; init; }
    public ulong Prp2 { get; init; }
    public uint Cdw10 { get; init; }
    public uint Cdw11 { get; init; }
    public uint Cdw12 { get; init; }
    public uint Cdw13 { get; init; }
    public uint Cdw14 { get; init; }
    public uint Cdw15 { get; init; }

    /// <summary>PSDT [7:6] of byte 1: 0 = PRPs; anything else asks for SGLs.</summary>
    public int Psdt => Flags >> 6;

    /// <summary>FUSE [1:0] of byte 1.</summary>
    public int Fuse => Flags & 3;

    /// <summary>CDW10 | CDW11 &lt;&lt; 32 (SLBA of NVM commands, offsets).</summary>
    public ulong Cdw10_11 => Cdw10 | ((ulong)Cdw11 << 32);

    /// <summary>CDW12 | CDW13 &lt;&lt; 32.</summary>
    public ulong Cdw12_13 => Cdw12 | ((ulong)Cdw13 << 32);

    /// <summary>Parses 64 bytes; false if <paramref name="source"/> is shorter.</summary>
    public static bool TryRead(ReadOnlySpan<byte> source, out SubmissionQueueEntry entry)
    {
        if (source.Length < Size)
        {
            entry = default;
            return false;
        }
        entry = new SubmissionQueueEntry
        {
            Opcode = source[0],
            Flags = source[1],
            Cid = BinaryPrimitives.ReadUInt16LittleEndian(source[2..]),
            Nsid = BinaryPrimitives.ReadUInt32LittleEndian(source[4..]),
            Cdw2 = BinaryPrimitives.ReadUInt32LittleEndian(source[8..]),
            Cdw3 = BinaryPrimitives.ReadUInt32LittleEndian(source[12..]),
            Mptr = BinaryPrimitives.ReadUInt64LittleEndian(source[16..]),
            Prp1 = BinaryPrimitives.ReadUInt64LittleEndian(source[24..]),
            Prp2 = BinaryPrimitives.ReadUInt64LittleEndian(source[32..]),
            Cdw10 = BinaryPrimitives.ReadUInt32LittleEndian(source[40..]),
            Cdw11 = BinaryPrimitives.ReadUInt32LittleEndian(source[44..]),
            Cdw12 = BinaryPrimitives.ReadUInt32LittleEndian(source[48..]),
            Cdw13 = BinaryPrimitives.ReadUInt32LittleEndian(source[52..]),
            Cdw14 = BinaryPrimitives.ReadUInt32LittleEndian(source[56..]),
            Cdw15 = BinaryPrimitives.ReadUInt32LittleEndian(source[60..]),
        };
        return true;
    }

    /// <summary>Writes the 64 bytes. Throws <see cref="ArgumentException"/> if <paramref name="destination"/> is shorter.</summary>
    public void WriteTo(Span<byte> destination)
    {
        if (destination.Length < Size)
        {
            throw new ArgumentException($"need {Size} bytes", nameof(destination));
        }
        destination[0] = Opcode;
        destination[1] = Flags;
        BinaryPrimitives.WriteUInt16LittleEndian(destination[2..], Cid);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[4..], Nsid);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[8..], Cdw2);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[12..], Cdw3);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[16..], Mptr);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[24..], Prp1);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[32..], Prp2);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[40..], Cdw10);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[44..], Cdw11);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[48..], Cdw12);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[52..], Cdw13);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[56..], Cdw14);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[60..], Cdw15);
    }
}

/// <summary>
/// A 16-byte Completion Queue Entry (§4.2.3): DW0 (command specific), DW1, SQHD [15:0] and SQID [31:16] in DW2,
/// CID [15:0] and the status field [31:16] in DW3, where bit 16 is the phase tag and bits 31:17 the status.
/// </summary>
public readonly record struct CompletionQueueEntry(uint Dw0, uint Dw1, ushort Sqhd, ushort Sqid, ushort Cid, NvmeStatus Status, bool Phase)
{
    public const int Size = 16;

    /// <summary>Parses 16 bytes; false if <paramref name="source"/> is shorter.</summary>
    public static bool TryRead(ReadOnlySpan<byte> source, out CompletionQueueEntry entry)
    {
        if (source.Length < Size)
        {
            entry = default;
            return false;
        }
        ushort sf = BinaryPrimitives.ReadUInt16LittleEndian(source[14..]);
        entry = new CompletionQueueEntry(
            BinaryPrimitives.ReadUInt32LittleEndian(source),
            BinaryPrimitives.ReadUInt32LittleEndian(source[4..]),
            BinaryPrimitives.ReadUInt16LittleEndian(source[8..]),
            BinaryPrimitives.ReadUInt16LittleEndian(source[10..]),
            BinaryPrimitives.ReadUInt16LittleEndian(source[12..]),
            NvmeStatus.FromField((ushort)(sf >> 1)),
            (sf & 1) != 0);
        return true;
    }

    /// <summary>Writes the 16 bytes (DW3 last so a single 16-byte copy is enough for the host to see a whole entry).</summary>
    public void WriteTo(Span<byte> destination)
    {
        if (destination.Length < Size)
        {
            throw new ArgumentException($"need {Size} bytes", nameof(destination));
        }
        BinaryPrimitives.WriteUInt32LittleEndian(destination, Dw0);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[4..], Dw1);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[8..], Sqhd);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[10..], Sqid);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[12..], Cid);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[14..], (ushort)((Status.Field << 1) | (Phase ? 1 : 0)));
    }
}

/// <summary>Admin command opcodes (§5, figure "Opcodes for Admin Commands"; TP4159 for 0x3D-0x45).</summary>
public enum NvmeAdminOpcode : byte
{
    DeleteIoSubmissionQueue = 0x00,
    CreateIoSubmissionQueue = 0x01,
    GetLogPage = 0x02,
    DeleteIoCompletionQueue = 0x04,
    CreateIoCompletionQueue = 0x05,
    Identify = 0x06,
    Abort = 0x08,
    SetFeatures = 0x09,
    GetFeatures = 0x0A,
    AsynchronousEventRequest = 0x0C,
    NamespaceManagement = 0x0D,
    FirmwareCommit = 0x10,
    FirmwareImageDownload = 0x11,
    DeviceSelfTest = 0x14,
    NamespaceAttachment = 0x15,
    KeepAlive = 0x18,
    DirectiveSend = 0x19,
    DirectiveReceive = 0x1A,
    VirtualizationManagement = 0x1C,
    NvmeMiSend = 0x1D,
    NvmeMiReceive = 0x1E,

    /// <summary>TP4159 Track Send: start/stop logging user-data changes or tracking host-memory changes.</summary>
    TrackSend = 0x3D,

    /// <summary>TP4159 Track Receive: tracked host-memory changes.</summary>
    TrackReceive = 0x3E,

    /// <summary>TP4159 Migration Send: Suspend, Resume, Set Controller State.</summary>
    MigrationSend = 0x41,

    /// <summary>TP4159 Migration Receive: Get Controller State.</summary>
    MigrationReceive = 0x42,

    /// <summary>TP4159 Controller Data Queue create/delete.</summary>
    ControllerDataQueue = 0x45,

    DoorbellBufferConfig = 0x7C,
    FormatNvm = 0x80,
    SecuritySend = 0x81,
    SecurityReceive = 0x82,
    Sanitize = 0x84,
}

/// <summary>NVM command set I/O opcodes (NVM Command Set Specification §3).</summary>
public enum NvmeIoOpcode : byte
{
    Flush = 0x00,
    Write = 0x01,
    Read = 0x02,
    WriteUncorrectable = 0x04,
    Compare = 0x05,
    WriteZeroes = 0x08,
    DatasetManagement = 0x09,
    Verify = 0x0C,
    Copy = 0x19,
}
