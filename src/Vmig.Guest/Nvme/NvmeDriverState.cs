namespace Vmig.Guest.Nvme;

/// <summary>
/// Byte layout of the NVMe driver's state in guest memory. Everything the driver needs to continue lives here or in
/// memory this block points to, so a driver object created on another host after RAM migration can re-attach.
/// </summary>
/// <remarks>
/// State block (one 4 KiB page at the state GPA):
/// <code>
///   0  u64 Magic "VMIGNVD1"       8  u32 Version (1)         12 u32 Flags (bit 0 shadow doorbells, bit 1 MSI-X)
///  16  u64 RegionBase            24  u64 RegionSize          32 u64 AllocNext (bump allocator)
///  40  u16 IoQueues              42  u16 IoQueueEntries      44 u16 AdminEntries   46 u16 Dstrd
///  48  u64 ShadowDoorbellGpa     56  u64 EventIdxGpa         64 u32 MaxTransfer (bytes)  72 u64 ScratchPage (Identify)
///  80  u64 TransferBuffer (64 KiB, for controller state and tracking data)
/// 128 + 64*qid  queue descriptor (qid 0 = admin):
///   +0 u64 SqBase  +8 u64 CqBase  +16 u16 Entries  +18 u16 SqTail  +20 u16 CqHead  +22 u8 Phase  +23 u8 Flags (bit0 IEN)
///  +24 u64 SlotTable (Entries-1 slots of 32 B)  +32 u64 PrpPages (one 4 KiB page per slot)  +40 u16 Vector
///  +42 u16 InFlight  +44 u16 NextSlot
/// </code>
/// Slot (one per command id, 32 bytes): +0 u8 State (0 free, 1 in flight, 2 completed) +1 u8 Opcode +2 u16 Status field
/// +4 u32 Dw0 +8 u64 Tag (caller's) +16 u16 Sqhd.
/// </remarks>
public static class NvmeDriverState
{
    public const ulong Magic = 0x3144564E47494D56; // "VMIGNVD1" little-endian
    public const uint StateVersion = 1;
    public const int BlockSize = 4096;

    public const int OffMagic = 0;
    public const int OffVersion = 8;
    public const int OffFlags = 12;
    public const int OffRegionBase = 16;
    public const int OffRegionSize = 24;
    public const int OffAllocNext = 32;
    public const int OffIoQueues = 40;
    public const int OffIoQueueEntries = 42;
    public const int OffAdminEntries = 44;
    public const int OffDstrd = 46;
    public const int OffShadow = 48;
    public const int OffEventIdx = 56;
    public const int OffMaxTransfer = 64;
    public const int OffScratchPage = 72;
    public const int OffTransferBuffer = 80;

    public const int OffQueues = 128;
    public const int QueueDescSize = 64;

    /// <summary>Most queues (admin + I/O) the block has room for.</summary>
    public const int MaxQueues = (BlockSize - OffQueues) / QueueDescSize;

    public const int QSqBase = 0;
    public const int QCqBase = 8;
    public const int QEntries = 16;
    public const int QSqTail = 18;
    public const int QCqHead = 20;
    public const int QPhase = 22;
    public const int QFlags = 23;
    public const int QSlots = 24;
    public const int QPrpPages = 32;
    public const int QVector = 40;
    public const int QInFlight = 42;
    public const int QNextSlot = 44;

    public const int SlotSize = 32;
    public const int SState = 0;
    public const int SOpcode = 1;
    public const int SStatus = 2;
    public const int SDw0 = 4;
    public const int STag = 8;
    public const int SSqhd = 16;

    public const byte SlotFree = 0;
    public const byte SlotInFlight = 1;
    public const byte SlotCompleted = 2;

    public const uint FlagShadow = 1;
    public const uint FlagMsix = 2;
}
