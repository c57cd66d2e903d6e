using System.Buffers.Binary;

namespace Vmig.Spec.Nvme;

/// <summary>Feature Identifiers (Set/Get Features CDW10 FID [7:0]).</summary>
public enum FeatureId : byte
{
    Arbitration = 0x01,
    PowerManagement = 0x02,
    TemperatureThreshold = 0x04,
    ErrorRecovery = 0x05,
    VolatileWriteCache = 0x06,
    NumberOfQueues = 0x07,
    InterruptCoalescing = 0x08,
    InterruptVectorConfiguration = 0x09,
    WriteAtomicityNormal = 0x0A,
    AsynchronousEventConfiguration = 0x0B,
    KeepAliveTimer = 0x0F,

    /// <summary>TP4159: Controller Data Queue (head pointer, tail-pointer trigger).</summary>
    ControllerDataQueue = 0x21,
}

/// <summary>Get Features SEL (CDW10 [10:8]).</summary>
public enum FeatureSelect : byte
{
    Current = 0,
    Default = 1,
    Saved = 2,
    SupportedCapabilities = 3,
}

/// <summary>Log Page Identifiers (Get Log Page CDW10 LID [7:0]).</summary>
public enum LogPageId : byte
{
    ErrorInformation = 0x01,
    SmartHealth = 0x02,
    FirmwareSlot = 0x03,
    ChangedNamespaceList = 0x04,
}

/// <summary>Asynchronous Event Type (AER completion DW0 [2:0]).</summary>
public enum AsyncEventType : byte
{
    ErrorStatus = 0,
    SmartHealthStatus = 1,
    Notice = 2,
    IoCommandSetSpecific = 6,
    VendorSpecific = 7,
}

/// <summary>Asynchronous Event Information for <see cref="AsyncEventType.ErrorStatus"/> (DW0 [15:8]).</summary>
public enum AsyncEventErrorInfo : byte
{
    /// <summary>A doorbell was written for a queue that does not exist.</summary>
    WriteToInvalidDoorbell = 0x00,

    /// <summary>A doorbell value was written that is invalid (past the queue size, or a head past the tail).</summary>
    InvalidDoorbellWriteValue = 0x01,

    DiagnosticFailure = 0x02,
    PersistentInternalError = 0x03,
    TransientInternalError = 0x04,
}

/// <summary>Asynchronous Event Information for <see cref="AsyncEventType.Notice"/>.</summary>
public enum AsyncEventNoticeInfo : byte
{
    NamespaceAttributeChanged = 0x00,
    FirmwareActivationStarting = 0x01,
}

/// <summary>AER completion DW0: type [2:0], information [15:8], log page [23:16].</summary>
public readonly record struct AsyncEvent(AsyncEventType Type, byte Info, LogPageId LogPage)
{
    public uint Dw0 => (uint)Type | ((uint)Info << 8) | ((uint)LogPage << 16);

    public static AsyncEvent FromDw0(uint dw0) => new((AsyncEventType)(dw0 & 7), (byte)(dw0 >> 8), (LogPageId)(byte)(dw0 >> 16));
}

/// <summary>Virtualization Management actions (CDW10 ACT [3:0]).</summary>
public enum VirtualizationAction : byte
{
    PrimaryFlexibleAllocation = 0x1,
    SecondaryOffline = 0x7,
    SecondaryAssign = 0x8,
    SecondaryOnline = 0x9,
}

/// <summary>Virtualization Management resource types (CDW10 RT [10:8]).</summary>
public enum VirtualizationResource : byte
{
    /// <summary>VQ: a queue pair resource (admin + I/O queues of a secondary).</summary>
    Queue = 0,

    /// <summary>VI: an interrupt vector resource.</summary>
    Interrupt = 1,
}

/// <summary>Error Information log entry (log page 01h, 64 bytes each).</summary>
public readonly record struct ErrorInformationEntry(
    ulong ErrorCount, ushort Sqid, ushort Cid, NvmeStatus Status, ushort ParameterErrorLocation, ulong Lba, uint Nsid)
{
    public const int Size = 64;

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt64LittleEndian(d, ErrorCount);
        BinaryPrimitives.WriteUInt16LittleEndian(d[8..], Sqid);
        BinaryPrimitives.WriteUInt16LittleEndian(d[10..], Cid);
        // Status field layout as in the CQE (bit 0 = phase, which the log reports as 0).
        BinaryPrimitives.WriteUInt16LittleEndian(d[12..], (ushort)(Status.Field << 1));
        BinaryPrimitives.WriteUInt16LittleEndian(d[14..], ParameterErrorLocation);
        BinaryPrimitives.WriteUInt64LittleEndian(d[16..], Lba);
        BinaryPrimitives.WriteUInt32LittleEndian(d[24..], Nsid);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out ErrorInformationEntry v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new ErrorInformationEntry(
            BinaryPrimitives.ReadUInt64LittleEndian(s),
            BinaryPrimitives.ReadUInt16LittleEndian(s[8..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[10..]),
            NvmeStatus.FromField((ushort)(BinaryPrimitives.ReadUInt16LittleEndian(s[12..]) >> 1)),
            BinaryPrimitives.ReadUInt16LittleEndian(s[14..]),
            BinaryPrimitives.ReadUInt64LittleEndian(s[16..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[24..]));
        return true;
    }
}

/// <summary>SMART / Health Information log (log page 02h, 512 bytes). Counters are 128-bit little-endian.</summary>
public readonly record struct SmartHealthLog
{
    public const int Size = 512;

    public byte CriticalWarning { get; init; }        // 0
    public ushort CompositeTemperature { get; init; } // 2:1 (Kelvin)
    public byte AvailableSpare { get; init; }         // 3 (percent)
    public byte AvailableSpareThreshold { get; init; } // 4
    public byte PercentageUsed { get; init; }         // 5
    public UInt128 DataUnitsRead { get; init; }       // 47:32 (thousands of 512-byte units, rounded up)
    public UInt128 DataUnitsWritten { get; init; }    // 63:48
    public UInt128 HostReadCommands { get; init; }    // 79:64
    public UInt128 HostWriteCommands { get; init; }   // 95:80
    public UInt128 PowerCycles { get; init; }         // 127:112
    public UInt128 PowerOnHours { get; init; }        // 143:128
    public UInt128 UnsafeShutdowns { get; init; }     // 159:144
    public UInt128 MediaErrors { get; init; }         // 175:160
    public UInt128 ErrorLogEntries { get; init; }     // 191:176

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        d[0] = CriticalWarning;
        BinaryPrimitives.WriteUInt16LittleEndian(d[1..], CompositeTemperature);
        d[3] = AvailableSpare;
        d[4] = AvailableSpareThreshold;
        d[5] = PercentageUsed;
        BinaryPrimitives.WriteUInt128LittleEndian(d[32..], DataUnitsRead);
        BinaryPrimitives.WriteUInt128LittleEndian(d[48..], DataUnitsWritten);
        BinaryPrimitives.WriteUInt128LittleEndian(d[64..], HostReadCommands);
        BinaryPrimitives.WriteUInt128LittleEndian(d[80..], HostWriteCommands);
        BinaryPrimitives.WriteUInt128LittleEndian(d[112..], PowerCycles);
        BinaryPrimitives.WriteUInt128LittleEndian(d[128..], PowerOnHours);
        BinaryPrimitives.WriteUInt128LittleEndian(d[144..], UnsafeShutdowns);
        BinaryPrimitives.WriteUInt128LittleEndian(d[160..], MediaErrors);
        BinaryPrimitives.WriteUInt128LittleEndian(d[176..], ErrorLogEntries);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out SmartHealthLog v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new SmartHealthLog
        {
            CriticalWarning = s[0],
            CompositeTemperature = BinaryPrimitives.ReadUInt16LittleEndian(s[1..]),
            AvailableSpare = s[3],
            AvailableSpareThreshold = s[4],
            PercentageUsed = s[5],
            DataUnitsRead = BinaryPrimitives.ReadUInt128LittleEndian(s[32..]),
            DataUnitsWritten = BinaryPrimitives.ReadUInt128LittleEndian(s[48..]),
            HostReadCommands = BinaryPrimitives.ReadUInt128LittleEndian(s[64..]),
            HostWriteCommands = BinaryPrimitives.ReadUInt128LittleEndian(s[80..]),
            PowerCycles = BinaryPrimitives.ReadUInt128LittleEndian(s[112..]),
            PowerOnHours = BinaryPrimitives.ReadUInt128LittleEndian(s[128..]),
            UnsafeShutdowns = BinaryPrimitives.ReadUInt128LittleEndian(s[144..]),
            MediaErrors = BinaryPrimitives.ReadUInt128LittleEndian(s[160..]),
            ErrorLogEntries = BinaryPrimitives.ReadUInt128LittleEndian(s[176..]),
        };
        return true;
    }
}

/// <summary>Firmware Slot Information log (log page 03h, 512 bytes): AFI byte 0, FRS1..FRS7 (8-byte ASCII) from byte 8.</summary>
public readonly record struct FirmwareSlotLog(byte Afi, string Frs1)
{
    public const int Size = 512;

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        d[0] = Afi;
        NvmeAscii.Write(d.Slice(8, 8), Frs1);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out FirmwareSlotLog v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new FirmwareSlotLog(s[0], NvmeAscii.Read(s.Slice(8, 8)));
        return true;
    }
}

/// <summary>A Dataset Management range (16 bytes): context attributes, NLB (1's based... count of blocks), SLBA.</summary>
public readonly record struct DatasetManagementRange(uint ContextAttributes, uint Nlb, ulong Slba)
{
    public const int Size = 16;

    /// <summary>Most ranges in one command (CDW10 NR is 0's based, 8 bits).</summary>
    public const int MaxRanges = 256;

    public void WriteTo(Span<byte> d)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(d, ContextAttributes);
        BinaryPrimitives.WriteUInt32LittleEndian(d[4..], Nlb);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], Slba);
    }

    public static bool TryRead(ReadOnlySpan<byte> s, out DatasetManagementRange v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new DatasetManagementRange(
            BinaryPrimitives.ReadUInt32LittleEndian(s),
            BinaryPrimitives.ReadUInt32LittleEndian(s[4..]),
            BinaryPrimitives.ReadUInt64LittleEndian(s[8..]));
        return true;
    }
}

/// <summary>
/// Doorbell Buffer Config shadow layout: the shadow doorbell page (PRP1) and the EventIdx page (PRP2) use the same
/// index as the doorbell registers, i.e. dword (2*qid) for SQ tail and (2*qid + 1) for CQ head at DSTRD 0.
/// The host rings the MMIO doorbell only if <see cref="NeedEvent"/> says the device asked to be told.
/// </summary>
public static class ShadowDoorbell
{
    /// <summary>Byte offset of the SQ tail shadow (or its EventIdx) for <paramref name="qid"/> within its page.</summary>
    public static int SqOffset(int qid, int dstrd = 0) => 2 * qid * (4 << dstrd);

    /// <summary>Byte offset of the CQ head shadow (or its EventIdx).</summary>
    public static int CqOffset(int qid, int dstrd = 0) => (2 * qid + 1) * (4 << dstrd);

    /// <summary>
    /// True if moving a doorbell from <paramref name="oldValue"/> to <paramref name="newValue"/> crosses
    /// <paramref name="eventIdx"/> (the virtio/NVMe "event index" rule, 16-bit wrap-around).
    /// </summary>
    public static bool NeedEvent(ushort eventIdx, ushort newValue, ushort oldValue) =>
        (ushort)(newValue - eventIdx - 1) < (ushort)(newValue - oldValue);
}
