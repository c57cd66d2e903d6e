namespace Vmig.Spec.Nvme;

/// <summary>
/// Controller registers in BAR0 (NVMe Base Specification 2.x §3.1.4, "Controller Properties"): byte offsets and
/// bit fields. All registers are little-endian; 64-bit registers (CAP, ASQ, ACQ) may be accessed as two dwords.
/// </summary>
public static class NvmeRegisters
{
    /// <summary>CAP, Controller Capabilities (u64, read-only).</summary>
    public const int Cap = 0x00;

    /// <summary>VS, Version (u32): MJR[31:16], MNR[15:8], TER[7:0].</summary>
    public const int Vs = 0x08;

    /// <summary>INTMS, Interrupt Mask Set (u32, write 1 to set; reserved when MSI-X is used).</summary>
    public const int Intms = 0x0C;

    /// <summary>INTMC, Interrupt Mask Clear (u32, write 1 to clear).</summary>
    public const int Intmc = 0x10;

    /// <summary>CC, Controller Configuration (u32).</summary>
    public const int Cc = 0x14;

    /// <summary>CSTS, Controller Status (u32, read-only except NSSRO).</summary>
    public const int Csts = 0x1C;

    /// <summary>NSSR, NVM Subsystem Reset (u32; not supported here: CAP.NSSRS = 0).</summary>
    public const int Nssr = 0x20;

    /// <summary>AQA, Admin Queue Attributes (u32): ASQS[11:0], ACQS[27:16], both 0's based.</summary>
    public const int Aqa = 0x24;

    /// <summary>ASQ, Admin Submission Queue Base Address (u64, 4 KiB aligned).</summary>
    public const int Asq = 0x28;

    /// <summary>ACQ, Admin Completion Queue Base Address (u64, 4 KiB aligned).</summary>
    public const int Acq = 0x30;

    /// <summary>First doorbell: SQ 0 tail. Doorbells follow at 4 &lt;&lt; CAP.DSTRD byte strides.</summary>
    public const int DoorbellBase = 0x1000;

    /// <summary>Byte offset of the Submission Queue <paramref name="qid"/> Tail Doorbell for stride <paramref name="dstrd"/>.</summary>
    public static int SqTailDoorbell(int qid, int dstrd = 0) => DoorbellBase + (2 * qid) * (4 << dstrd);

    /// <summary>Byte offset of the Completion Queue <paramref name="qid"/> Head Doorbell for stride <paramref name="dstrd"/>.</summary>
    public static int CqHeadDoorbell(int qid, int dstrd = 0) => DoorbellBase + (2 * qid + 1) * (4 << dstrd);

    /// <summary>
    /// Decodes a doorbell offset: true with (qid, isCompletion) if <paramref name="offset"/> is dword aligned and at or
    /// past <see cref="DoorbellBase"/>; it does not check that the queue exists.
    /// </summary>
    public static bool TryDecodeDoorbell(long offset, int dstrd, out int qid, out bool isCompletion)
    {
        qid = 0;
        isCompletion = false;
        if (offset < DoorbellBase || (offset & 3) != 0)
        {
            return false;
        }
        long index = (offset - DoorbellBase) / (4L << dstrd);
        if ((offset - DoorbellBase) % (4L << dstrd) != 0 || index > 2 * 65536)
        {
            return false;
        }
        qid = (int)(index >> 1);
        isCompletion = (index & 1) != 0;
        return true;
    }
}

/// <summary>CAP register fields (§3.1.4.1). Build with <see cref="Encode"/>, read with the accessors.</summary>
public readonly record struct ControllerCapabilities(ulong Value)
{
    /// <summary>MQES [15:0]: maximum queue entries supported, 0's based (so 1023 means 1024 entries).</summary>
    public ushort Mqes => (ushort)Value;

    /// <summary>CQR bit 16: contiguous queues required.</summary>
    public bool Cqr => (Value & (1UL << 16)) != 0;

    /// <summary>AMS [18:17]: arbitration mechanisms supported beyond round robin.</summary>
    public int Ams => (int)(Value >> 17) & 3;

    /// <summary>TO [31:24]: worst-case time to RDY after EN changes, in 500 ms units.</summary>
    public byte To => (byte)(Value >> 24);

    /// <summary>DSTRD [35:32]: doorbell stride, 4 &lt;&lt; DSTRD bytes.</summary>
    public int Dstrd => (int)(Value >> 32) & 0xF;

    /// <summary>NSSRS bit 36: NVM subsystem reset supported.</summary>
    public bool Nssrs => (Value & (1UL << 36)) != 0;

    /// <summary>CSS [44:37]: command sets supported (bit 0 = NVM command set).</summary>
    public int Css => (int)(Value >> 37) & 0xFF;

    /// <summary>MPSMIN [51:48]: minimum memory page size, 2^(12 + MPSMIN) bytes.</summary>
    public int Mpsmin => (int)(Value >> 48) & 0xF;

    /// <summary>MPSMAX [55:52]: maximum memory page size, 2^(12 + MPSMAX) bytes.</summary>
    public int Mpsmax => (int)(Value >> 52) & 0xF;

    /// <summary>Encodes CAP from its fields.</summary>
    public static ControllerCapabilities Encode(ushort mqes, bool cqr, byte to, int dstrd, int css, int mpsmin, int mpsmax) =>
        new(mqes | (cqr ? 1UL << 16 : 0) | ((ulong)to << 24) | ((ulong)(dstrd & 0xF) << 32)
            | ((ulong)(css & 0xFF) << 37) | ((ulong)(mpsmin & 0xF) << 48) | ((ulong)(mpsmax & 0xF) << 52));
}

/// <summary>CC register fields (§3.1.4.5).</summary>
public readonly record struct ControllerConfiguration(uint Value)
{
    /// <summary>EN bit 0: enable.</summary>
    public bool En => (Value & 1) != 0;

    /// <summary>CSS [6:4]: I/O command set selected (0 = NVM).</summary>
    public int Css => (int)(Value >> 4) & 7;

    /// <summary>MPS [10:7]: memory page size 2^(12 + MPS).</summary>
    public int Mps => (int)(Value >> 7) & 0xF;

    /// <summary>AMS [13:11]: arbitration mechanism selected (0 = round robin).</summary>
    public int Ams => (int)(Value >> 11) & 7;

    /// <summary>SHN [15:14]: shutdown notification (0 none, 1 normal, 2 abrupt).</summary>
    public int Shn => (int)(Value >> 14) & 3;

    /// <summary>IOSQES [19:16]: I/O SQ entry size, 2^n bytes (6 = 64 B).</summary>
    public int Iosqes => (int)(Value >> 16) & 0xF;

    /// <summary>IOCQES [23:20]: I/O CQ entry size, 2^n bytes (4 = 16 B).</summary>
    public int Iocqes => (int)(Value >> 20) & 0xF;

    /// <summary>Encodes CC for an NVM command set host with 4 KiB pages and 64/16 byte entries.</summary>
    public static ControllerConfiguration Encode(bool en, int shn = 0, int mps = 0, int iosqes = 6, int iocqes = 4) =>
        new((en ? 1u : 0) | ((uint)(mps & 0xF) << 7) | ((uint)(shn & 3) << 14) | ((uint)(iosqes & 0xF) << 16) | ((uint)(iocqes & 0xF) << 20));
}

/// <summary>CSTS register bits (§3.1.4.6).</summary>
[Flags]
public enum ControllerStatus : uint
{
    None = 0,

    /// <summary>RDY: ready to process commands (follows CC.EN).</summary>
    Rdy = 1 << 0,

    /// <summary>CFS: controller fatal status; the host must reset the controller.</summary>
    Cfs = 1 << 1,

    /// <summary>SHST [3:2] = 01b: shutdown processing occurring.</summary>
    ShstOccurring = 1 << 2,

    /// <summary>SHST [3:2] = 10b: shutdown processing complete.</summary>
    ShstComplete = 2 << 2,

    /// <summary>NSSRO: NVM subsystem reset occurred.</summary>
    Nssro = 1 << 4,

    /// <summary>PP: processing paused.</summary>
    Pp = 1 << 5,
}

/// <summary>AQA register fields (§3.1.4.8).</summary>
public readonly record struct AdminQueueAttributes(uint Value)
{
    /// <summary>ASQS [11:0]: admin SQ size, 0's based.</summary>
    public int Asqs => (int)(Value & 0xFFF);

    /// <summary>ACQS [27:16]: admin CQ size, 0's based.</summary>
    public int Acqs => (int)(Value >> 16) & 0xFFF;

    public static AdminQueueAttributes Encode(int asqs, int acqs) => new((uint)(asqs & 0xFFF) | ((uint)(acqs & 0xFFF) << 16));
}
