using Vmig.Spec.Nvme;

namespace Vmig.Devices.Nvme;

/// <summary>
/// One submission queue as the controller tracks it. <see cref="Entries"/> is the 1's based size (QSIZE + 1).
/// </summary>
public sealed class SubmissionQueueState
{
    public ushort Qid { get; set; }
    public ulong BaseAddress { get; set; }
    public int Entries { get; set; }
    public ushort Cqid { get; set; }
    public ushort Head { get; set; }
    public ushort Tail { get; set; }

    /// <summary>QPRIO (CDW11 [2:1] of Create I/O SQ).</summary>
    public byte Priority { get; set; }

    public SubmissionQueueState Clone() => (SubmissionQueueState)MemberwiseClone();
}

/// <summary>One completion queue: the slot the controller posts next (<see cref="Tail"/>) and its phase tag.</summary>
public sealed class CompletionQueueState
{
    public ushort Qid { get; set; }
    public ulong BaseAddress { get; set; }
    public int Entries { get; set; }

    /// <summary>Last head the host reported through the CQ head doorbell.</summary>
    public ushort Head { get; set; }

    /// <summary>Next slot the controller writes.</summary>
    public ushort Tail { get; set; }

    /// <summary>Phase tag the controller writes into the entry at <see cref="Tail"/> (starts at 1, flips on wrap).</summary>
    public bool Phase { get; set; } = true;

    public bool InterruptsEnabled { get; set; }
    public ushort Vector { get; set; }

    public bool IsFull => (Tail + 1) % Entries == Head;

    public CompletionQueueState Clone() => (CompletionQueueState)MemberwiseClone();
}

/// <summary>
/// Every piece of mutable state of one NVMe controller, in one place, so that a secondary controller can be
/// suspended, saved, restored and resumed (issue 5) by copying this object: registers, admin and I/O queues
/// (base, size, head, tail, phase, vector), features, asynchronous event state (outstanding AER command ids and
/// events not yet reported), shadow doorbell configuration, the error log and the SMART counters.
/// </summary>
/// <remarks>
/// Commands are processed to completion while the controller lock is held, so the only commands "fetched but not
/// completed" at any quiescent point are outstanding Asynchronous Event Requests (<see cref="OutstandingAers"/>).
/// Immutable properties of the controller (CNTLID, CAP, its profile) are not here; they belong to the controller's
/// construction and are compared, not copied, on migration.
/// </remarks>
public sealed class NvmeControllerState
{
    /// <summary>Highest queue id the controller supports (queue arrays are indexed by qid).</summary>
    public const int MaxQueueId = 64;

    /// <summary>Error log entries kept (Identify ELPE + 1).</summary>
    public const int ErrorLogDepth = 16;

    public uint Cc { get; set; }
    public ControllerStatus Csts { get; set; }
    public uint Aqa { get; set; }
    public ulong Asq { get; set; }
    public ulong Acq { get; set; }
    public uint Intms { get; set; }

    /// <summary>SQs by qid (0 = admin); null = not created.</summary>
    public SubmissionQueueState?[] Sqs { get; } = new SubmissionQueueState?[MaxQueueId + 1];

    /// <summary>CQs by qid (0 = admin).</summary>
    public CompletionQueueState?[] Cqs { get; } = new CompletionQueueState?[MaxQueueId + 1];

    /// <summary>Number of Queues as allocated (1's based counts of I/O SQs and CQs); 0 until the host sets it.</summary>
    public ushort AllocatedSqs { get; set; }
    public ushort AllocatedCqs { get; set; }

    /// <summary>True once the host set Number of Queues or created an I/O queue (later Set Features 07h is refused).</summary>
    public bool QueueCountLocked { get; set; }

    public uint Arbitration { get; set; }
    public uint InterruptCoalescing { get; set; }
    public bool VolatileWriteCacheEnabled { get; set; } = true;
    public uint AsyncEventConfig { get; set; }
    public uint KeepAliveTimer { get; set; }

    /// <summary>Power Management (FID 02h) CDW11: PS [4:0] (only power state 0 exists, NPSS = 0), WH [7:5].</summary>
    public uint PowerManagement { get; set; }

    /// <summary>Temperature Threshold (FID 04h) of the composite sensor in kelvin: over (THSEL 0) and under (THSEL 1).</summary>
    public ushort OverTemperatureThreshold { get; set; } = DefaultOverTemperature;
    public ushort UnderTemperatureThreshold { get; set; }

    /// <summary>Error Recovery (FID 05h) CDW11: TLER [15:0], DULBE bit 16.</summary>
    public uint ErrorRecovery { get; set; }

    /// <summary>Write Atomicity Normal (FID 0Ah) CDW11: DN bit 0.</summary>
    public uint WriteAtomicityNormal { get; set; }

    /// <summary>Interrupt Vector Configuration (FID 09h): CD (coalescing disable) per vector, bit n = vector n (0..63).</summary>
    public ulong CoalescingDisabledVectors { get; set; }

    /// <summary>Composite over-temperature threshold at reset: 358 K (85 °C), above the 273+28 K the SMART log reports.</summary>
    public const ushort DefaultOverTemperature = 358;

    /// <summary>
    /// Submission queue slots (SQID, slot index) holding a command that Abort found submitted but not yet fetched: when
    /// fetched it completes with Command Abort Requested instead of running (NVMe Base 2.x §5.1).
    /// </summary>
    public List<(ushort Sqid, ushort Slot)> AbortedSlots { get; } = [];

    /// <summary>Most <see cref="AbortedSlots"/> at once (ACL + 1, Identify Controller).</summary>
    public const int MaxAbortedSlots = 4;

    /// <summary>CIDs of outstanding Asynchronous Event Request commands, oldest first.</summary>
    public List<ushort> OutstandingAers { get; } = [];

    /// <summary>Events waiting for an AER command to report them.</summary>
    public List<AsyncEvent> PendingEvents { get; } = [];

    /// <summary>Event types reported and not yet cleared by reading their log page (bit n = AsyncEventType n).</summary>
    public byte MaskedEventTypes { get; set; }

    /// <summary>Doorbell Buffer Config: the shadow doorbell page and EventIdx page (0 = not configured).</summary>
    public ulong ShadowDoorbellBase { get; set; }
    public ulong EventIdxBase { get; set; }

    public ulong ErrorCount { get; set; }
    public List<ErrorInformationEntry> ErrorLog { get; } = [];

    public ulong HostReadCommands { get; set; }
    public ulong HostWriteCommands { get; set; }
    public ulong BlocksRead512 { get; set; }
    public ulong BlocksWritten512 { get; set; }

    /// <summary>Migration: the primary suspended this controller (it fetches no commands).</summary>
    public bool Suspended { get; set; }

    /// <summary>
    /// Controller reset. <paramref name="keepAdminQueueRegisters"/>: a reset through CC.EN 1→0 keeps AQA, ASQ and ACQ
    /// (NVMe Base 2.x §3.7.2); a function-level reset clears them. Keeps the error log and SMART counters.
    /// </summary>
    public void ResetVolatile(bool keepAdminQueueRegisters)
    {
        Cc = 0;
        Csts = ControllerStatus.None;
        if (!keepAdminQueueRegisters)
        {
            Aqa = 0;
            Asq = 0;
            Acq = 0;
        }
        Intms = 0;
        Suspended = false;
        Array.Clear(Sqs);
        Array.Clear(Cqs);
        AllocatedSqs = 0;
        AllocatedCqs = 0;
        QueueCountLocked = false;
        Arbitration = 0;
        InterruptCoalescing = 0;
        VolatileWriteCacheEnabled = true;
        AsyncEventConfig = 0;
        KeepAliveTimer = 0;
        PowerManagement = 0;
        OverTemperatureThreshold = DefaultOverTemperature;
        UnderTemperatureThreshold = 0;
        ErrorRecovery = 0;
        WriteAtomicityNormal = 0;
        CoalescingDisabledVectors = 0;
        OutstandingAers.Clear();
        AbortedSlots.Clear();
        PendingEvents.Clear();
        MaskedEventTypes = 0;
        ShadowDoorbellBase = 0;
        EventIdxBase = 0;
    }
}
