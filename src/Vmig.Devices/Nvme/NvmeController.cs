using System.Buffers.Binary;
using Vmig.Spec.Nvme;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Nvme;

/// <summary>
/// One NVMe controller (the primary controller of the PF or a secondary controller of a VF), independent of the PCI
/// function model: BAR0 register accesses come in through <see cref="ReadBar0"/>/<see cref="WriteBar0"/>, guest
/// memory is reached through the <see cref="IDmaSpace"/> given to <see cref="Attach"/>, and interrupts leave through
/// the vector callback.
/// </summary>
/// <remarks>
/// Commands run to completion under the controller lock, on the thread that rang the doorbell (an MMIO write) or on
/// the shadow-doorbell poller. All mutable state lives in <see cref="State"/>. Bad guest input never throws out of
/// this class: it gets the spec's status, an asynchronous event, or CSTS.CFS.
/// </remarks>
public sealed partial class NvmeController : IDisposable
{
    /// <summary>BAR0 size in bytes: registers plus doorbells for qid 0..<see cref="NvmeControllerState.MaxQueueId"/> (power of two).</summary>
    public const int Bar0Size = 0x4000;

    /// <summary>MDTS: maximum data transfer 2^9 pages of 4 KiB = 2 MiB.</summary>
    public const byte Mdts = 9;

    /// <summary>Largest transfer in bytes.</summary>
    public const int MaxTransferBytes = PrpList.PageSize << Mdts;

    /// <summary>AERL (0's based): four outstanding Asynchronous Event Requests.</summary>
    public const byte Aerl = 3;

    /// <summary>NVMe version reported in VS: 2.0.0.</summary>
    public const uint Version = 0x00020000;

    private readonly object _gate = new();
    private readonly NvmeSubsystem _subsystem;
    private readonly List<(ulong Address, int Length)> _segments = [];
    private readonly bool[] _pendingVectors = new bool[NvmeControllerState.MaxQueueId + 1];
    private IDmaSpace? _dma;
    private Action<int>? _interrupt;
    private ShadowDoorbellPoller? _poller;

    /// <summary>
    /// False while the function is out of RUNNING/PRE_COPY (set by its migration driver): the poller is parked then, and
    /// the EventIdx entries stay armed, so commands still run through MMIO doorbells. Device-host emulation, not state.
    /// </summary>
    private bool _pollingAllowed = true;

    /// <summary>
    /// False from attach until the host shows its memory is mapped (a doorbell write, or a migration step: the VMM maps
    /// DMA before it loads or runs a function). A client maps its DMA regions after attaching; a shadow poll before
    /// that would find no memory and fail the controller (CSTS.CFS).
    /// </summary>
    private bool _hostMemoryReady;
    private bool _deliverAfterCompletion;

    internal NvmeController(NvmeSubsystem subsystem, ushort cntlid, bool isPrimary, ushort mqes)
    {
        _subsystem = subsystem;
        Cntlid = cntlid;
        IsPrimary = isPrimary;
        // CAP: MQES, CQR = 1 (contiguous queues only), TO = 2 (1 s), DSTRD = 0, CSS bit 0 (NVM), MPSMIN = MPSMAX = 0 (4 KiB).
        Capabilities = ControllerCapabilities.Encode(mqes, cqr: true, to: 2, dstrd: 0, css: 1, mpsmin: 0, mpsmax: 0);
    }

    /// <summary>Controller identifier within the subsystem.</summary>
    public ushort Cntlid { get; }

    /// <summary>True for the primary controller (the PF's); it alone accepts Namespace Attachment, Virtualization Management and TP4159 commands.</summary>
    public bool IsPrimary { get; }

    /// <summary>The CAP register.</summary>
    public ControllerCapabilities Capabilities { get; }

    /// <summary>All mutable state. Read or replace it only under <see cref="WithLock"/> (migration does).</summary>
    public NvmeControllerState State { get; private set; } = new();

    /// <summary>Queue pairs this controller may use, admin included (VQ resources; for a secondary, assigned by the primary).</summary>
    public int QueueResources { get; internal set; }

    /// <summary>Interrupt vectors this controller may use (VI resources).</summary>
    public int VectorResources { get; internal set; }

    /// <summary>Secondary only: the primary set it online (Virtualization Management). A primary is always online.</summary>
    public bool Online { get; internal set; }

    /// <summary>True if CSTS.RDY is set.</summary>
    public bool IsReady
    {
        get
        {
            lock (_gate)
            {
                return (State.Csts & ControllerStatus.Rdy) != 0;
            }
        }
    }

    /// <summary>Runs <paramref name="action"/> with the controller lock held (no command is in progress meanwhile).</summary>
    public T WithLock<T>(Func<NvmeControllerState, T> action)
    {
        ArgumentNullException.ThrowIfNull(action);
        lock (_gate)
        {
            return action(State);
        }
    }

    /// <summary>
    /// Connects guest memory and the interrupt line (a vfio-user client attached). <paramref name="interrupt"/> gets the
    /// MSI-X vector number; it must not block.
    /// </summary>
    public void Attach(IDmaSpace dma, Action<int> interrupt)
    {
        ArgumentNullException.ThrowIfNull(dma);
        ArgumentNullException.ThrowIfNull(interrupt);
        lock (_gate)
        {
            _dma = dma;
            _interrupt = interrupt;
            // The poller thread is created now, parked, so that no migration step waits for a thread to start. It
            // does not poll yet even if Doorbell Buffer Config is in force (a client reconnecting to a controller
            // that was not reset): see _hostMemoryReady. Detach left EventIdx armed, so the client's first doorbell
            // runs its command and sets the poller going.
            _hostMemoryReady = false;
            CreatePollerLocked();
        }
    }

    /// <summary>Disconnects guest memory (client gone): stops the poller; the controller keeps its state until reset.</summary>
    public void Detach()
    {
        StopPoller();
        lock (_gate)
        {
            // With no poller the host must ring for every update; a client that reattaches sees armed entries even if
            // no poller is started for it (e.g. while its function is stopped for migration).
            if (CanProcess)
            {
                WriteEventIdx(armed: true);
            }
            _dma = null;
            _interrupt = null;
        }
    }

    /// <summary>
    /// Lets the shadow-doorbell poller poll (the function is RUNNING or PRE_COPY) or parks it at once (any other
    /// migration state: the VMM has paused the vCPUs and needs the CPU for stop-copy; a poller yielding for its idle
    /// window competed with it on the 2-core host). While parked, EventIdx is armed so a host that still submits rings
    /// MMIO doorbells, which run its commands as without shadow doorbells. Never creates or joins a thread (either
    /// waits for the scheduler: milliseconds on a loaded host, inside the VM's downtime); a woken poller starts armed,
    /// and its first poll runs whatever waits in the SQs.
    /// </summary>
    internal void SetPollingAllowed(bool allowed)
    {
        bool ran = false;
        lock (_gate)
        {
            _pollingAllowed = allowed;
            // Only the VMM moves migration states, with the VM's memory mapped.
            _hostMemoryReady = true;
            if (!allowed && CanProcess && State.ShadowDoorbellBase != 0)
            {
                WriteEventIdx(armed: true);
                // Arm, then look once more (as the poller does before it blocks): commands the host queued through the
                // shadow page before the arm, with no doorbell, run now, on this host, where the poller would have
                // run them, rather than travel in the SQ to a target that runs them inside the VM's downtime.
                Interlocked.MemoryBarrier();
                ran = ProcessLocked();
            }
        }
        if (ran)
        {
            FireInterrupts();
        }
        _poller?.Wake(busy: false);
    }

    /// <summary>
    /// True if the poller should poll: shadow doorbells configured, host attached with its memory mapped, controller
    /// ready and not suspended, polling allowed. Lock held.
    /// </summary>
    private bool ShouldPollLocked => _pollingAllowed && _hostMemoryReady && State.ShadowDoorbellBase != 0 && CanProcess;

    /// <summary>Function-level reset: back to power-on, admin queue registers included.</summary>
    public void Reset()
    {
        lock (_gate)
        {
            State.ResetVolatile(keepAdminQueueRegisters: false);
            Array.Clear(_coalescedEntries);
            Array.Clear(_coalesceDeadline);
        }
        // No shadow doorbells now: the poller parks.
        _poller?.Wake(busy: false);
    }

    /// <summary>
    /// A BAR0 read of 1, 2, 4 or 8 bytes at <paramref name="offset"/>. Registers read as the containing little-endian
    /// qword; doorbells and reserved space read as 0. Returns 0 or EINVAL (bad size or outside BAR0).
    /// </summary>
    public int ReadBar0(long offset, Span<byte> data)
    {
        if (data.Length is not (1 or 2 or 4 or 8) || offset < 0 || offset > Bar0Size - data.Length)
        {
            return Errno.EINVAL;
        }
        Span<byte> q = stackalloc byte[16];
        long baseOff = offset & ~7L;
        lock (_gate)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(q, ReadRegister64(baseOff));
            BinaryPrimitives.WriteUInt64LittleEndian(q[8..], ReadRegister64(baseOff + 8));
        }
        q.Slice((int)(offset - baseOff), data.Length).CopyTo(data);
        return 0;
    }

    private ulong ReadRegister64(long off) => off switch
    {
        NvmeRegisters.Cap => Capabilities.Value,
        NvmeRegisters.Vs => Version | ((ulong)State.Intms << 32),
        NvmeRegisters.Intmc => State.Intms | ((ulong)State.Cc << 32),
        0x18 => (ulong)State.Csts << 32,
        NvmeRegisters.Nssr => (ulong)State.Aqa << 32,
        NvmeRegisters.Asq => State.Asq,
        NvmeRegisters.Acq => State.Acq,
        _ => 0,
    };

    /// <summary>
    /// A BAR0 write: 4 bytes to a register or doorbell, or 8 bytes to ASQ/ACQ (or two adjacent dwords). Writes to
    /// read-only registers are ignored. Returns 0 or EINVAL (size other than 4/8, misaligned, outside BAR0).
    /// </summary>
    public int WriteBar0(long offset, ReadOnlySpan<byte> data)
    {
        if (data.Length is not (4 or 8) || (offset & 3) != 0 || offset < 0 || offset > Bar0Size - data.Length)
        {
            return Errno.EINVAL;
        }
        WriteDword(offset, BinaryPrimitives.ReadUInt32LittleEndian(data));
        if (data.Length == 8)
        {
            WriteDword(offset + 4, BinaryPrimitives.ReadUInt32LittleEndian(data[4..]));
        }
        return 0;
    }

    private void WriteDword(long offset, uint value)
    {
        if (offset >= NvmeRegisters.DoorbellBase)
        {
            RingDoorbell(offset, value);
            return;
        }
        lock (_gate)
        {
            var s = State;
            switch (offset)
            {
                case NvmeRegisters.Intms:
                    s.Intms |= value;
                    break;
                case NvmeRegisters.Intmc:
                    s.Intms &= ~value;
                    break;
                case NvmeRegisters.Cc:
                    WriteCc(value);
                    break;
                case NvmeRegisters.Aqa:
                    s.Aqa = value & 0x0FFF0FFF;
                    break;
                case NvmeRegisters.Asq:
                    s.Asq = (s.Asq & 0xFFFFFFFF00000000UL) | (value & 0xFFFFF000u);
                    break;
                case NvmeRegisters.Asq + 4:
                    s.Asq = (s.Asq & 0xFFFFFFFFUL) | ((ulong)value << 32);
                    break;
                case NvmeRegisters.Acq:
                    s.Acq = (s.Acq & 0xFFFFFFFF00000000UL) | (value & 0xFFFFF000u);
                    break;
                case NvmeRegisters.Acq + 4:
                    s.Acq = (s.Acq & 0xFFFFFFFFUL) | ((ulong)value << 32);
                    break;
                default:
                    // CAP, VS, CSTS, NSSR (unsupported, CAP.NSSRS = 0) and reserved space: writes are ignored.
                    break;
            }
        }
    }

    private void WriteCc(uint value)
    {
        var s = State;
        var old = new ControllerConfiguration(s.Cc);
        var cc = new ControllerConfiguration(value);
        if (old.En && !cc.En)
        {
            // Controller reset (§3.7.2): queues deleted, registers back to defaults except the admin queue registers.
            // The poller parks (no shadow doorbells); woken so it does not wait for its 50 ms timeout to notice.
            s.ResetVolatile(keepAdminQueueRegisters: true);
            _poller?.Wake(busy: false);
            s.Cc = value & ~1u;
            return;
        }
        s.Cc = value;
        if (!old.En && cc.En)
        {
            Enable(cc);
        }
        if (cc.Shn != 0 && old.Shn == 0 && (s.Csts & ControllerStatus.Rdy) != 0)
        {
            // Shutdown (§3.6.2): nothing is in flight under the lock, so the only work is making data durable.
            _subsystem.FlushNamespacesOf(Cntlid);
            s.Csts = (s.Csts & ~(ControllerStatus)0xC) | ControllerStatus.ShstComplete;
        }
    }

    private void Enable(ControllerConfiguration cc)
    {
        var s = State;
        var aqa = new AdminQueueAttributes(s.Aqa);
        bool valid = cc.Css == 0 && cc.Mps == 0 && aqa.Asqs >= 1 && aqa.Acqs >= 1
            && aqa.Asqs <= Capabilities.Mqes && aqa.Acqs <= Capabilities.Mqes && s.Asq != 0 && s.Acq != 0;
        if (!valid)
        {
            // An invalid configuration at enable is a fatal controller error the host sees as CSTS.CFS.
            s.Csts |= ControllerStatus.Cfs;
            return;
        }
        if (!IsPrimary && !Online)
        {
            // An offline secondary never becomes ready (NVMe Base 2.x §8.2.6.4): RDY stays 0.
            return;
        }
        s.Sqs[0] = new SubmissionQueueState { Qid = 0, BaseAddress = s.Asq, Entries = aqa.Asqs + 1, Cqid = 0 };
        s.Cqs[0] = new CompletionQueueState { Qid = 0, BaseAddress = s.Acq, Entries = aqa.Acqs + 1, InterruptsEnabled = true, Vector = 0 };
        s.Csts = ControllerStatus.Rdy;
    }

    /// <summary>Called by the subsystem when a secondary goes offline: a controller reset, as the spec requires.</summary>
    internal void ForceReset(bool keepAdminQueueRegisters)
    {
        lock (_gate)
        {
            State.ResetVolatile(keepAdminQueueRegisters);
        }
        _poller?.Wake(busy: false);
    }

    private bool CanProcess
    {
        get
        {
            var s = State;
            return _dma is not null && (s.Csts & (ControllerStatus.Rdy | ControllerStatus.Cfs | ControllerStatus.ShstComplete)) == ControllerStatus.Rdy
                && !s.Suspended;
        }
    }

    private void RingDoorbell(long offset, uint value)
    {
        // Only I/O queues have shadow doorbells: an admin doorbell (e.g. the Identify a resumed guest sends while the
        // VMM is still inside the downtime) says nothing about I/O to come, and waking the poller into its spin phase
        // for it took CPU from the switchover on the 2-core host.
        bool ioQueue = offset >= NvmeRegisters.SqTailDoorbell(1, Capabilities.Dstrd);
        lock (_gate)
        {
            _hostMemoryReady = true;
            var s = State;
            if ((s.Csts & ControllerStatus.Rdy) == 0 || (s.Csts & ControllerStatus.Cfs) != 0)
            {
                // Doorbell writes to a disabled or failed controller have no effect.
                return;
            }
            if (!NvmeRegisters.TryDecodeDoorbell(offset, Capabilities.Dstrd, out int qid, out bool isCq)
                || qid > NvmeControllerState.MaxQueueId || (isCq ? s.Cqs[qid] is null : s.Sqs[qid] is null))
            {
                InvalidDoorbell(qid, AsyncEventErrorInfo.WriteToInvalidDoorbell);
            }
            else if (isCq)
            {
                var cq = s.Cqs[qid]!;
                if (!IsValidCqHead(cq, value))
                {
                    InvalidDoorbell(qid, AsyncEventErrorInfo.InvalidDoorbellWriteValue);
                }
                else
                {
                    cq.Head = (ushort)value;
                }
            }
            else
            {
                var sq = s.Sqs[qid]!;
                if (value >= (uint)sq.Entries)
                {
                    InvalidDoorbell(qid, AsyncEventErrorInfo.InvalidDoorbellWriteValue);
                }
                else
                {
                    sq.Tail = (ushort)value;
                }
            }
            ProcessLocked();
        }
        FireInterrupts();
        if (ioQueue)
        {
            _poller?.Wake(busy: true);
        }
    }

    /// <summary>A CQ head may only move over entries the controller has posted: it must lie in [old head, tail].</summary>
    private static bool IsValidCqHead(CompletionQueueState cq, uint value)
    {
        if (value >= (uint)cq.Entries)
        {
            return false;
        }
        int posted = (cq.Tail - cq.Head + cq.Entries) % cq.Entries;
        int moved = ((int)value - cq.Head + cq.Entries) % cq.Entries;
        return moved <= posted;
    }

    private void InvalidDoorbell(int qid, AsyncEventErrorInfo info)
    {
        if (qid == 0)
        {
            // The admin queue is how events reach the host; a broken admin doorbell is fatal (host must reset).
            State.Csts |= ControllerStatus.Cfs;
            return;
        }
        RaiseEventLocked(new AsyncEvent(AsyncEventType.ErrorStatus, (byte)info, LogPageId.ErrorInformation));
    }

    /// <summary>Fetches and executes commands from every SQ until none are left or their CQs are full. Lock held.</summary>
    private bool ProcessLocked()
    {
        bool any = false;
        if (!CanProcess)
        {
            return false;
        }
        var s = State;
        Span<byte> raw = stackalloc byte[SubmissionQueueEntry.Size];
        bool progress = true;
        while (progress && CanProcess)
        {
            progress = false;
            for (int qid = 0; qid <= NvmeControllerState.MaxQueueId && CanProcess; qid++)
            {
                var sq = s.Sqs[qid];
                if (sq is null)
                {
                    continue;
                }
                if (qid != 0 && s.ShadowDoorbellBase != 0)
                {
                    ReadShadow(sq);
                }
                var cq = s.Cqs[sq.Cqid];
                if (cq is null)
                {
                    continue;
                }
                if (qid != 0 && s.ShadowDoorbellBase != 0)
                {
                    ReadShadow(cq);
                }
                // Round robin (CC.AMS = 0): a burst per queue per pass, so one busy queue cannot starve the rest.
                for (int burst = 0; burst < 16 && sq.Head != sq.Tail && !cq.IsFull && CanProcess; burst++)
                {
                    if (!_dma!.TryRead(sq.BaseAddress + (ulong)sq.Head * SubmissionQueueEntry.Size, raw))
                    {
                        // The SQ itself is unreachable: nothing can be completed, so the controller fails (§9.5).
                        s.Csts |= ControllerStatus.Cfs;
                        return any;
                    }
                    SubmissionQueueEntry.TryRead(raw, out var sqe);
                    ushort slot = sq.Head;
                    sq.Head = (ushort)((sq.Head + 1) % sq.Entries);
                    if (s.AbortedSlots.Count > 0 && s.AbortedSlots.Remove(((ushort)qid, slot)))
                    {
                        // Aborted while waiting in the SQ (§5.1): completed without running.
                        PostCompletion(cq, sq, sqe.Cid, NvmeStatus.AbortRequested, 0);
                    }
                    else
                    {
                        Execute(sq, cq, in sqe);
                    }
                    progress = true;
                    any = true;
                }
            }
        }
        if (any && s.EventIdxBase != 0)
        {
            UpdateEventIdx();
        }
        return any;
    }

    private void Execute(SubmissionQueueState sq, CompletionQueueState cq, in SubmissionQueueEntry sqe)
    {
        NvmeStatus status;
        uint dw0 = 0;
        bool complete = true;
        try
        {
            if (sqe.Psdt != 0 || sqe.Fuse != 0)
            {
                // SGLs (SGLS = 0) and fused operations (FUSES = 0) are not supported.
                status = NvmeStatus.InvalidField;
            }
            else if (sq.Qid == 0)
            {
                status = ExecuteAdmin(in sqe, out dw0, out complete);
            }
            else
            {
                status = ExecuteIo(in sqe, out dw0);
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // The backing file failed (EIO, ENOSPC): the host sees an internal error; the device host carries on.
            status = NvmeStatus.InternalError;
        }
        catch (ObjectDisposedException)
        {
            // The namespace was deleted by the primary while this command was running.
            status = NvmeStatus.InvalidNamespaceOrFormat;
        }
        if (!status.IsSuccess)
        {
            LogError(sq.Qid, sqe.Cid, status, sqe.Nsid);
        }
        if (complete)
        {
            PostCompletion(cq, sq, sqe.Cid, status, dw0);
        }
        if (_deliverAfterCompletion)
        {
            // After the command that unmasked an event type has completed, so its CQE comes first.
            _deliverAfterCompletion = false;
            DeliverEventsLocked();
        }
    }

    /// <summary>Writes a CQE at the CQ tail with the current phase, advances the tail and marks the vector. Lock held.</summary>
    private bool PostCompletion(CompletionQueueState cq, SubmissionQueueState sq, ushort cid, NvmeStatus status, uint dw0)
    {
        var entry = new CompletionQueueEntry(dw0, 0, sq.Head, sq.Qid, cid, status, cq.Phase);
        Span<byte> b = stackalloc byte[CompletionQueueEntry.Size];
        entry.WriteTo(b);
        ulong addr = cq.BaseAddress + (ulong)cq.Tail * CompletionQueueEntry.Size;
        // DW0-DW2 first, then DW3 (phase) with release semantics, so the host never sees a new phase over stale data.
        if (!_dma!.TryWrite(addr, b[..12]) || !_dma.TryWriteUInt32(addr + 12, BinaryPrimitives.ReadUInt32LittleEndian(b[12..])))
        {
            State.Csts |= ControllerStatus.Cfs;
            return false;
        }
        cq.Tail = (ushort)((cq.Tail + 1) % cq.Entries);
        if (cq.Tail == 0)
        {
            cq.Phase = !cq.Phase;
        }
        if (cq.InterruptsEnabled && cq.Vector < _pendingVectors.Length)
        {
            MarkVectorLocked(cq);
        }
        return true;
    }

    // ---- Interrupt Coalescing (FID 08h) and Interrupt Vector Configuration (FID 09h) ----

    private readonly int[] _coalescedEntries = new int[NvmeControllerState.MaxQueueId + 1];
    private readonly long[] _coalesceDeadline = new long[NvmeControllerState.MaxQueueId + 1];
    private Timer? _coalesceTimer;

    /// <summary>
    /// A completion was posted to <paramref name="cq"/> (interrupts enabled). Coalescing (§5.27.1.8) applies to I/O CQs
    /// only, on vectors whose CD bit (FID 09h) is clear, when AGGR THR (0's based entries) is above 0 and AGGR TIME
    /// (100 µs units, 0 = no delay) is set: the vector fires once THR + 1 entries are pending or TIME after the first.
    /// Lock held.
    /// </summary>
    private void MarkVectorLocked(CompletionQueueState cq)
    {
        int v = cq.Vector;
        uint coal = State.InterruptCoalescing;
        int threshold = (int)(coal & 0xFF) + 1;
        long window = ((coal >> 8) & 0xFF) * (System.Diagnostics.Stopwatch.Frequency / 10_000);
        bool disabled = v >= 64 || (State.CoalescingDisabledVectors & (1UL << v)) != 0;
        if (cq.Qid == 0 || threshold == 1 || window == 0 || disabled)
        {
            _pendingVectors[v] = true;
            return;
        }
        if (++_coalescedEntries[v] >= threshold)
        {
            _pendingVectors[v] = true;
            return;
        }
        if (_coalesceDeadline[v] == 0)
        {
            _coalesceDeadline[v] = System.Diagnostics.Stopwatch.GetTimestamp() + window;
            ArmCoalesceTimerLocked(window);
        }
    }

    private void ArmCoalesceTimerLocked(long ticks)
    {
        _coalesceTimer ??= new Timer(static o => ((NvmeController)o!).OnCoalesceTimer(), this, Timeout.Infinite, Timeout.Infinite);
        long ms = Math.Max(1, (ticks * 1000 + System.Diagnostics.Stopwatch.Frequency - 1) / System.Diagnostics.Stopwatch.Frequency);
        _coalesceTimer.Change(ms, Timeout.Infinite);
    }

    /// <summary>Aggregation time ran out for some vector: fire the ones that are due, re-arm for the rest.</summary>
    private void OnCoalesceTimer()
    {
        lock (_gate)
        {
            long now = System.Diagnostics.Stopwatch.GetTimestamp();
            long next = long.MaxValue;
            for (int v = 0; v < _coalesceDeadline.Length; v++)
            {
                long d = _coalesceDeadline[v];
                if (d == 0)
                {
                    continue;
                }
                if (d <= now)
                {
                    _pendingVectors[v] = true;
                }
                else
                {
                    next = Math.Min(next, d - now);
                }
            }
            if (next != long.MaxValue)
            {
                ArmCoalesceTimerLocked(next);
            }
        }
        FireInterrupts();
    }

    /// <summary>Delivers every interrupt coalescing is holding back (before a suspend: nothing may stay owed). Lock held.</summary>
    private void FlushCoalescedLocked()
    {
        for (int v = 0; v < _coalescedEntries.Length; v++)
        {
            if (_coalescedEntries[v] != 0 || _coalesceDeadline[v] != 0)
            {
                _pendingVectors[v] = true;
            }
        }
    }

    private void FireInterrupts()
    {
        Action<int>? irq;
        Span<bool> fire = stackalloc bool[_pendingVectors.Length];
        lock (_gate)
        {
            irq = _interrupt;
            for (int i = 0; i < _pendingVectors.Length; i++)
            {
                fire[i] = _pendingVectors[i];
                _pendingVectors[i] = false;
                if (fire[i])
                {
                    // The interrupt covers every entry coalescing was holding back on this vector.
                    _coalescedEntries[i] = 0;
                    _coalesceDeadline[i] = 0;
                }
            }
        }
        if (irq is null)
        {
            return;
        }
        for (int i = 0; i < fire.Length; i++)
        {
            if (fire[i])
            {
                irq(i);
            }
        }
    }

    private void LogError(ushort sqid, ushort cid, NvmeStatus status, uint nsid)
    {
        var s = State;
        s.ErrorCount++;
        s.ErrorLog.Insert(0, new ErrorInformationEntry(s.ErrorCount, sqid, cid, status, 0xFFFF, 0, nsid));
        if (s.ErrorLog.Count > NvmeControllerState.ErrorLogDepth)
        {
            s.ErrorLog.RemoveAt(s.ErrorLog.Count - 1);
        }
    }

    /// <summary>Queues an asynchronous event and completes an outstanding AER if one is waiting. Lock held.</summary>
    private void RaiseEventLocked(AsyncEvent e)
    {
        var s = State;
        if (!s.PendingEvents.Contains(e))
        {
            s.PendingEvents.Add(e);
        }
        DeliverEventsLocked();
    }

    private void DeliverEventsLocked()
    {
        var s = State;
        var sq = s.Sqs[0];
        var cq = s.Cqs[0];
        if (sq is null || cq is null || _dma is null || s.Suspended || (s.Csts & ControllerStatus.Cfs) != 0)
        {
            // A suspended controller writes nothing to host memory; events wait in the state.
            return;
        }
        for (int i = 0; i < s.PendingEvents.Count && s.OutstandingAers.Count > 0 && !cq.IsFull;)
        {
            var e = s.PendingEvents[i];
            if ((s.MaskedEventTypes & (1 << (int)e.Type)) != 0)
            {
                i++;
                continue;
            }
            s.PendingEvents.RemoveAt(i);
            ushort cid = s.OutstandingAers[0];
            s.OutstandingAers.RemoveAt(0);
            // Further events of this type wait until the host reads the log page (§5.2, "Asynchronous Event Request").
            s.MaskedEventTypes |= (byte)(1 << (int)e.Type);
            PostCompletion(cq, sq, cid, NvmeStatus.Success, e.Dw0);
        }
    }

    /// <summary>Posts an asynchronous event from outside a command (e.g. namespace attribute changed) and signals it.</summary>
    internal void RaiseEvent(AsyncEvent e)
    {
        lock (_gate)
        {
            if ((State.Csts & ControllerStatus.Rdy) == 0)
            {
                return;
            }
            RaiseEventLocked(e);
        }
        FireInterrupts();
    }

    public void Dispose()
    {
        StopPoller();
        lock (_gate)
        {
            _coalesceTimer?.Dispose();
            _coalesceTimer = null;
        }
    }
}

/// <summary>Migration hooks used by <see cref="NvmeMigrationController"/> (primary-driven, never by the secondary's own host).</summary>
public sealed partial class NvmeController
{
    /// <summary>
    /// Writes this controller's host memory outside a command (the primary posting Controller Data Queue entries).
    /// False if no host is attached or the address is outside its DMA windows.
    /// </summary>
    internal bool TryWriteHost(ulong address, ReadOnlySpan<byte> data) => Volatile.Read(ref _dma)?.TryWrite(address, data) ?? false;

    internal NvmeStatus Suspend()
    {
        lock (_gate)
        {
            if (State.Suspended)
            {
                return NvmeStatus.ControllerSuspended;
            }
            // Under the lock no command is in progress; from now on nothing is fetched.
            State.Suspended = true;
            FlushCoalescedLocked();
        }
        FireInterrupts();
        // Every fetch happens under the lock and checks Suspended, so the poller needs no join: woken, it parks.
        _poller?.Wake(busy: false);
        return NvmeStatus.Success;
    }

    internal NvmeStatus ResumeFromMigration()
    {
        lock (_gate)
        {
            if (!State.Suspended)
            {
                return NvmeStatus.ControllerNotSuspended;
            }
            State.Suspended = false;
            // Deliver events that were pending and commands whose doorbells rang while suspended (or on the source).
            DeliverEventsLocked();
            if (CanProcess)
            {
                // The source's poller may have left EventIdx one behind (unarmed); until a poller runs the host must ring.
                WriteEventIdx(armed: true);
            }
            _hostMemoryReady = true;
            if (ShouldPollLocked && _poller is not null)
            {
                // The woken poller's first act (arm, then poll) runs the commands waiting in the SQs, on its own
                // thread: the VMM's switchover does not wait for them. It then blocks until the host rings.
                _poller.Wake(busy: false);
            }
            else if (State.ShadowDoorbellBase == 0 || _pollingAllowed)
            {
                ProcessLocked();
            }
            // Otherwise (shadow doorbells, function in RUNNING_P2P: the VMM has the vCPUs paused) the waiting commands
            // run when the function reaches RUNNING and its poller starts, or on the host's next doorbell.
        }
        FireInterrupts();
        return NvmeStatus.Success;
    }

    internal NvmeStatus ReplaceState(NvmeControllerState state)
    {
        lock (_gate)
        {
            if (!State.Suspended)
            {
                return NvmeStatus.ControllerNotSuspended;
            }
            State = state;
            Array.Clear(_coalescedEntries);
            Array.Clear(_coalesceDeadline);
        }
        return NvmeStatus.Success;
    }
}
