using System.Buffers.Binary;

namespace Vmig.Spec.Nvme;

/// <summary>Migration Send SEL values (CDW10 [7:0]; reference §5.6.2, libnvme).</summary>
public enum MigrationSendSelect : byte
{
    Suspend = 0,
    Resume = 1,
    SetControllerState = 2,
}

/// <summary>Migration Receive SEL values.</summary>
public enum MigrationReceiveSelect : byte
{
    GetControllerState = 0,
}

/// <summary>Suspend Type (Migration Send Suspend CDW11 [23:16]).</summary>
public enum SuspendType : byte
{
    /// <summary>Suspend Notification: the controller stops initiating new DMA soon; I/O still completes.</summary>
    Notification = 0,
    Suspend = 1,
}

/// <summary>Set Controller State sequence indicator (MOS [1:0]).</summary>
public enum SequenceIndicator : byte
{
    Middle = 0,
    First = 1,
    Last = 2,
    Only = 3,
}

/// <summary>Track Send SEL values.</summary>
public enum TrackSendSelect : byte
{
    LogUserDataChanges = 0,
    TrackMemoryChanges = 1,
}

/// <summary>Controller Data Queue SEL values.</summary>
public enum ControllerDataQueueSelect : byte
{
    Create = 0,
    Delete = 1,
}

/// <summary>
/// Controller state header returned by Get Controller State (48 bytes; reference §5.6.2 after libnvme types.h):
/// VER 1:0, CSATTR 2 (bit 0 = suspended), reserved 15:3, NVMECSS 31:16 (size of the NVMe-defined part in dwords,
/// 128-bit), VSS 47:32 (size of the vendor part in dwords, 128-bit). The NVMe part and then the vendor part follow.
/// </summary>
public readonly record struct ControllerStateHeader(ushort Ver, byte Csattr, ulong Nvmecss, ulong Vss)
{
    public const int Size = 48;

    public bool Suspended => (Csattr & 1) != 0;

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(d, Ver);
        d[2] = Csattr;
        BinaryPrimitives.WriteUInt128LittleEndian(d[16..], Nvmecss);
        BinaryPrimitives.WriteUInt128LittleEndian(d[32..], Vss);
    }

    /// <summary>Parses the header; false if short or if a size does not fit in 64 bits.</summary>
    public static bool TryRead(ReadOnlySpan<byte> s, out ControllerStateHeader v)
    {
        v = default;
        if (s.Length < Size)
        {
            return false;
        }
        UInt128 a = BinaryPrimitives.ReadUInt128LittleEndian(s[16..]);
        UInt128 b = BinaryPrimitives.ReadUInt128LittleEndian(s[32..]);
        if (a > ulong.MaxValue || b > ulong.MaxValue)
        {
            return false;
        }
        v = new ControllerStateHeader(BinaryPrimitives.ReadUInt16LittleEndian(s), s[2], (ulong)a, (ulong)b);
        return true;
    }
}

/// <summary>
/// I/O Submission Queue state entry of the NVMe controller state v0 (24 bytes): PRP1 7:0, QSIZE 9:8 (0's based),
/// QID 11:10, CQID 13:12, ATTRS 15:14 (bit 0 PC, bits 2:1 priority), HEAD 17:16, TAIL 19:18, reserved 23:20.
/// </summary>
public readonly record struct IoSubmissionQueueState(ulong Prp1, ushort Qsize, ushort Qid, ushort Cqid, ushort Attrs, ushort Head, ushort Tail)
{
    public const int Size = 24;

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt64LittleEndian(d, Prp1);
        BinaryPrimitives.WriteUInt16LittleEndian(d[8..], Qsize);
        BinaryPrimitives.WriteUInt16LittleEndian(d[10..], Qid);
        BinaryPrimitives.WriteUInt16LittleEndian(d[12..], Cqid);
        BinaryPrimitives.WriteUInt16LittleEndian(d[14..], Attrs);
        BinaryPrimitives.WriteUInt16LittleEndian(d[16..], Head);
        BinaryPrimitives.WriteUInt16LittleEndian(d[18..], Tail);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out IoSubmissionQueueState v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new IoSubmissionQueueState(
            BinaryPrimitives.ReadUInt64LittleEndian(s),
            BinaryPrimitives.ReadUInt16LittleEndian(s[8..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[10..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[12..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[14..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[16..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[18..]));
        return true;
    }
}

/// <summary>
/// I/O Completion Queue state entry (24 bytes): PRP1 7:0, QSIZE 9:8, QID 11:10, HEAD 13:12, TAIL 15:14,
/// ATTRS 19:16 (bit 0 PC, bit 1 IEN, bit 2 phase tag of the next slot to post, bits 31:16 interrupt vector), reserved.
/// </summary>
public readonly record struct IoCompletionQueueState(ulong Prp1, ushort Qsize, ushort Qid, ushort Head, ushort Tail, uint Attrs)
{
    public const int Size = 24;

    public bool Pc => (Attrs & 1) != 0;
    public bool Ien => (Attrs & 2) != 0;
    public bool Phase => (Attrs & 4) != 0;
    public ushort Iv => (ushort)(Attrs >> 16);

    public static uint EncodeAttrs(bool pc, bool ien, bool phase, ushort iv) =>
        (pc ? 1u : 0) | (ien ? 2u : 0) | (phase ? 4u : 0) | ((uint)iv << 16);

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt64LittleEndian(d, Prp1);
        BinaryPrimitives.WriteUInt16LittleEndian(d[8..], Qsize);
        BinaryPrimitives.WriteUInt16LittleEndian(d[10..], Qid);
        BinaryPrimitives.WriteUInt16LittleEndian(d[12..], Head);
        BinaryPrimitives.WriteUInt16LittleEndian(d[14..], Tail);
        BinaryPrimitives.WriteUInt32LittleEndian(d[16..], Attrs);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out IoCompletionQueueState v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new IoCompletionQueueState(
            BinaryPrimitives.ReadUInt64LittleEndian(s),
            BinaryPrimitives.ReadUInt16LittleEndian(s[8..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[10..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[12..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[14..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[16..]));
        return true;
    }
}

/// <summary>NVMe controller state v0 prologue (8 bytes): VER, NIOSQ, NIOCQ, reserved; then the SQ and CQ entries.</summary>
public readonly record struct NvmeControllerStateV0Header(ushort Ver, ushort Niosq, ushort Niocq)
{
    public const int Size = 8;

    /// <summary>Total bytes of the NVMe part including entries.</summary>
    public int TotalSize => Size + (Niosq * IoSubmissionQueueState.Size) + (Niocq * IoCompletionQueueState.Size);

    public void WriteTo(Span<byte> d)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(d, Ver);
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], Niosq);
        BinaryPrimitives.WriteUInt16LittleEndian(d[4..], Niocq);
        BinaryPrimitives.WriteUInt16LittleEndian(d[6..], 0);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out NvmeControllerStateV0Header v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new NvmeControllerStateV0Header(
            BinaryPrimitives.ReadUInt16LittleEndian(s),
            BinaryPrimitives.ReadUInt16LittleEndian(s[2..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[4..]));
        return true;
    }
}

/// <summary>
/// Track Receive data for tracked memory changes (layout after the libnvme 3.2 man page, reference §5.6.2): a 16-byte
/// header {u8 VER, u8 ATTRB, le16 CNTLID, le32 NTMCD (descriptor count), le16 RPMPG, u8 rsvd[6]} and NTMCD 16-byte
/// descriptors {le64 SADDR, le32 LEN in RPMPG pages, u8 rsvd[4]}. In this project RPMPG encodes the page size as
/// 2^(12 + RPMPG) bytes (0 = 4 KiB), like CC.MPS; the reference leaves its encoding open.
/// </summary>
public readonly record struct TrackedMemoryChangesHeader(byte Ver, byte Attrb, ushort Cntlid, uint Ntmcd, ushort Rpmpg)
{
    public const int Size = 16;

    /// <summary>ATTRB bit 0: more changes remain than fitted in the buffer (read again).</summary>
    public bool More => (Attrb & 1) != 0;

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        d[0] = Ver;
        d[1] = Attrb;
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], Cntlid);
        BinaryPrimitives.WriteUInt32LittleEndian(d[4..], Ntmcd);
        BinaryPrimitives.WriteUInt16LittleEndian(d[8..], Rpmpg);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out TrackedMemoryChangesHeader v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new TrackedMemoryChangesHeader(s[0], s[1], BinaryPrimitives.ReadUInt16LittleEndian(s[2..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[4..]), BinaryPrimitives.ReadUInt16LittleEndian(s[8..]));
        return true;
    }
}

/// <summary>One tracked memory change: <see cref="Length"/> pages from <see cref="Saddr"/> (16 bytes on the wire).</summary>
public readonly record struct TrackedMemoryChange(ulong Saddr, uint Length)
{
    public const int Size = 16;

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt64LittleEndian(d, Saddr);
        BinaryPrimitives.WriteUInt32LittleEndian(d[8..], Length);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out TrackedMemoryChange v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new TrackedMemoryChange(BinaryPrimitives.ReadUInt64LittleEndian(s), BinaryPrimitives.ReadUInt32LittleEndian(s[8..]));
        return true;
    }
}

/// <summary>
/// User Data Migration Queue entry (Controller Data Queue type 0, 32 bytes; reference §5.6.2 after libvfn): NSID 3:0,
/// NLB 7:4 (blocks), SLBA 15:8, reserved 30:16, attribute byte 31: bit 0 phase tag, bits 3:1 ESA (0 = a range,
/// 1 first, 2 last: logging stopped, 3 last: suspended, 7 last: queue full), bits 7:6 LBACIR (0 this range changed,
/// 1 all LBAs changed, 2 no range reported).
/// </summary>
public readonly record struct UserDataChangeEntry(uint Nsid, uint Nlb, ulong Slba, bool Phase, byte Esa, byte Lbacir)
{
    public const int Size = 32;

    public const byte EsaRange = 0;
    public const byte EsaFirst = 1;
    public const byte EsaLastStopped = 2;
    public const byte EsaLastSuspended = 3;
    public const byte EsaLastQueueFull = 7;

    public byte Attr => (byte)((Phase ? 1 : 0) | ((Esa & 7) << 1) | ((Lbacir & 3) << 6));

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(d, Nsid);
        BinaryPrimitives.WriteUInt32LittleEndian(d[4..], Nlb);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], Slba);
        d[31] = Attr;
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out UserDataChangeEntry v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        byte a = s[31];
        v = new UserDataChangeEntry(BinaryPrimitives.ReadUInt32LittleEndian(s), BinaryPrimitives.ReadUInt32LittleEndian(s[4..]),
            BinaryPrimitives.ReadUInt64LittleEndian(s[8..]), (a & 1) != 0, (byte)((a >> 1) & 7), (byte)(a >> 6));
        return true;
    }
}
