using System.Buffers.Binary;
using System.Diagnostics;
using Vmig.Spec.Nvme;
using static Vmig.Guest.Nvme.NvmeDriverState;

namespace Vmig.Guest.Nvme;

/// <summary>Options for <see cref="NvmeDriver.Initialize"/>.</summary>
public sealed record NvmeDriverOptions
{
    /// <summary>I/O queue pairs to create (capped by what the controller allocates).</summary>
    public int IoQueues { get; init; } = 2;

    /// <summary>Entries per I/O queue (capped by CAP.MQES + 1); at most entries - 1 commands are in flight per queue.</summary>
    public int IoQueueEntries { get; init; } = 64;

    public int AdminQueueEntries { get; init; } = 32;

    /// <summary>Use Doorbell Buffer Config if the controller supports it (OACS bit 8).</summary>
    public bool ShadowDoorbells { get; init; } = true;

    /// <summary>Use MSI-X interrupts for completions; false = poll every completion queue (admin included).</summary>
    public bool Interrupts { get; init; } = true;

    /// <summary>
    /// How many of the I/O queues (the highest-numbered ones) are poll queues, as Linux nvme's <c>poll_queues</c>
    /// parameter makes them: their completion queue is created with interrupts disabled (Create I/O Completion Queue
    /// CDW11.IEN = 0, no vector; NVMe Base 2.x §5.2.2) and waiters reap it by watching the phase tag of the entry at
    /// the CQ head — what io_uring IOPOLL / fio's <c>hipri</c> do. The device then never signals an interrupt for
    /// them. A poll-queue waiter spins (a pause loop, a sched_yield every other check) for up to
    /// <see cref="PollSpinMicroseconds"/> and then checks once a millisecond, so a slow command does not hold a
    /// core. 0 (the default) = every I/O queue uses MSI-X when <see cref="Interrupts"/> is on.
    /// </summary>
    public int PollQueues { get; init; }

    /// <summary>On a poll queue: how long a waiter spins on the phase tag before it falls back to 1 ms sleeps (µs).</summary>
    public int PollSpinMicroseconds { get; init; } = 1000;

    /// <summary>How long to wait for CSTS.RDY changes and for commands, in ms.</summary>
    public int TimeoutMs { get; init; } = 5000;

    /// <summary>
    /// With interrupts and more than one command in flight on the queue: how long a waiter polls the completion
    /// queue's phase bit before it sleeps on the MSI-X vector, in µs (0 = sleep at once, the default). A completion
    /// that lands within it is seen without the eventfd wake-up. Off by default: on the shared 2-core bench host the
    /// same-run QD32 comparisons went both ways (0.4× vs 0.04×, and 0.07× vs 0.23×; bench/results/s2-nvme-*), since
    /// a spinning guest takes the CPU the device's poller needs.
    /// </summary>
    public int CompletionPollMicroseconds { get; init; }
}

/// <summary>A command the driver saw complete.</summary>
public readonly record struct NvmeCompletion(int Qid, ushort Cid, NvmeStatus Status, uint Dw0, ulong Tag);

/// <summary>The controller or the driver failed in a way the caller must handle (timeout, CSTS.CFS, bad state block).</summary>
public sealed class NvmeDriverException : Exception
{
    public NvmeDriverException(string message, NvmeStatus? status = null) : base(status is { } s ? $"{message}: {s}" : message) => Status = status;

    public NvmeStatus? Status { get; }
}

/// <summary>
/// The guest's NVMe host driver, over <see cref="IGuestMemory"/> and <see cref="IGuestPciFunction"/>. All of its
/// state — queues, tails, heads, phases, command slots, PRP list pages, buffers and bookkeeping — lives in guest
/// memory in a contiguous region the VMM gives it, with a fixed state block at the region start (layout in
/// <see cref="NvmeDriverState"/>). A driver object holds only references and locks, so <see cref="Attach"/> on
/// another host after RAM migration continues exactly where the source left off, including reaping completions of
/// commands that were in flight.
/// </summary>
/// <remarks>One thread per queue at a time (a per-queue lock enforces it); different queues may be used concurrently.</remarks>
public sealed partial class NvmeDriver
{
    private const ulong Page = 4096;

    private readonly IGuestMemory _mem;
    private readonly IGuestPciFunction _fn;
    private readonly ulong _state;
    private readonly object[] _queueLocks;
    private readonly object _allocLock = new();
    private readonly int _timeoutMs;

    private NvmeDriver(IGuestMemory mem, IGuestPciFunction fn, ulong stateGpa, int timeoutMs, int pollMicroseconds = 0, int pollSpinMicroseconds = 1000)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pollMicroseconds);
        ArgumentOutOfRangeException.ThrowIfNegative(pollSpinMicroseconds);
        _pollTicks = pollMicroseconds * Stopwatch.Frequency / 1_000_000;
        _pollSpinTicks = pollSpinMicroseconds * Stopwatch.Frequency / 1_000_000;
        _mem = mem;
        _fn = fn;
        _state = stateGpa;
        _timeoutMs = timeoutMs;
        _queueLocks = new object[MaxQueues];
        for (int i = 0; i < _queueLocks.Length; i++)
        {
            _queueLocks[i] = new object();
        }
    }

    /// <summary>Guest physical address of the state block (pass it to <see cref="Attach"/>).</summary>
    public ulong StateGpa => _state;

    /// <summary>Number of I/O queues (qid 1..IoQueueCount).</summary>
    public int IoQueueCount => (ushort)_mem.ReadUInt32(_state + OffIoQueues);

    /// <summary>Entries of each I/O queue; at most this minus one commands in flight per queue.</summary>
    public int IoQueueEntries => (ushort)(_mem.ReadUInt32(_state + OffIoQueues) >> 16);

    /// <summary>True if the controller accepted Doorbell Buffer Config.</summary>
    public bool UsesShadowDoorbells => (_mem.ReadUInt32(_state + OffFlags) & FlagShadow) != 0;

    /// <summary>True if completions are signalled with MSI-X.</summary>
    public bool UsesInterrupts => (_mem.ReadUInt32(_state + OffFlags) & FlagMsix) != 0;

    /// <summary>
    /// True if queue <paramref name="qid"/> is polled: its CQ was created with IEN = 0 (a poll queue, see
    /// <see cref="NvmeDriverOptions.PollQueues"/>) or the driver runs without interrupts.
    /// </summary>
    public bool IsPolled(int qid) => !Ien(ValidQueue(qid));

    /// <summary>Largest transfer in bytes (from MDTS, and the one PRP list page per command).</summary>
    public int MaxTransferBytes => (int)_mem.ReadUInt32(_state + OffMaxTransfer);

    /// <summary>
    /// Brings the controller up: PCI command register (memory + bus master), MSI-X enable, controller reset, admin
    /// queue, CC.EN, wait for RDY, Identify, Number of Queues, Doorbell Buffer Config, I/O queue pairs. The driver's
    /// state block and everything it allocates lie in [<paramref name="regionGpa"/>, +<paramref name="regionSize"/>).
    /// </summary>
    /// <exception cref="NvmeDriverException">The controller failed, timed out, or refused a command.</exception>
    /// <exception cref="ArgumentException">The region is too small or not page aligned.</exception>
    public static NvmeDriver Initialize(IGuestMemory memory, IGuestPciFunction function, ulong regionGpa, ulong regionSize, NvmeDriverOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(function);
        var o = options ?? new NvmeDriverOptions();
        if ((regionGpa & (Page - 1)) != 0 || regionSize < 16 * Page || regionGpa + regionSize > memory.Size || regionGpa + regionSize < regionGpa)
        {
            throw new ArgumentException("driver region must be page aligned, at least 64 KiB and inside guest RAM");
        }
        if (o.IoQueues < 1 || o.IoQueues > MaxQueues - 1 || o.IoQueueEntries < 2 || o.AdminQueueEntries < 2 || o.AdminQueueEntries > 4096
            || o.PollQueues < 0 || o.PollQueues > o.IoQueues)
        {
            throw new ArgumentException("queue counts or sizes out of range", nameof(options));
        }
        var d = new NvmeDriver(memory, function, regionGpa, o.TimeoutMs, o.CompletionPollMicroseconds, o.PollSpinMicroseconds);
        d.Zero(regionGpa, BlockSize);
        memory.WriteUInt64(regionGpa + OffRegionBase, regionGpa);
        memory.WriteUInt64(regionGpa + OffRegionSize, regionSize);
        memory.WriteUInt64(regionGpa + OffAllocNext, regionGpa + BlockSize);
        d.BringUp(o);
        // The magic goes last: a block with a magic is a complete, attachable driver state.
        memory.WriteUInt32(regionGpa + OffVersion, StateVersion);
        memory.WriteUInt64(regionGpa + OffMagic, Magic);
        return d;
    }

    /// <summary>
    /// Re-attaches to a driver whose state block is at <paramref name="stateGpa"/> (after the VM's RAM moved to another
    /// host). Touches neither the controller nor guest memory: commands in flight complete and are reaped as usual.
    /// </summary>
    /// <exception cref="NvmeDriverException">No valid state block there.</exception>
    public static NvmeDriver Attach(IGuestMemory memory, IGuestPciFunction function, ulong stateGpa, int timeoutMs = 5000, int pollSpinMicroseconds = 1000)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(function);
        if (stateGpa + BlockSize > memory.Size || memory.ReadUInt64(stateGpa + OffMagic) != Magic || memory.ReadUInt32(stateGpa + OffVersion) != StateVersion)
        {
            throw new NvmeDriverException($"no NVMe driver state block at 0x{stateGpa:X}");
        }
        return new NvmeDriver(memory, function, stateGpa, timeoutMs, 0, pollSpinMicroseconds);
    }

    // ---- guest memory allocation (bump allocator persisted in the state block) ----

    /// <summary>Allocates <paramref name="bytes"/> zeroed bytes of guest memory from the driver region (page aligned). Never freed.</summary>
    /// <exception cref="InsufficientMemoryException">The region is exhausted.</exception>
    public ulong Allocate(ulong bytes)
    {
        lock (_allocLock)
        {
            ulong next = _mem.ReadUInt64(_state + OffAllocNext);
            ulong end = _mem.ReadUInt64(_state + OffRegionBase) + _mem.ReadUInt64(_state + OffRegionSize);
            ulong size = (bytes + Page - 1) & ~(Page - 1);
            if (size == 0 || next + size > end || next + size < next)
            {
                throw new InsufficientMemoryException($"NVMe driver region exhausted ({bytes} bytes asked, {end - next} left)");
            }
            _mem.WriteUInt64(_state + OffAllocNext, next + size);
            Zero(next, size);
            return next;
        }
    }

    private void Zero(ulong gpa, ulong size)
    {
        Span<byte> z = stackalloc byte[4096];
        z.Clear();
        for (ulong o = 0; o < size; o += 4096)
        {
            _mem.Write(gpa + o, z[..(int)Math.Min(4096, size - o)]);
        }
    }

    // ---- bring-up ----

    private uint Reg32(int off)
    {
        Span<byte> b = stackalloc byte[4];
        _fn.MmioRead(0, (ulong)off, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private ulong Reg64(int off) => Reg32(off) | ((ulong)Reg32(off + 4) << 32);

    private void WriteReg32(int off, uint v)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, v);
        _fn.MmioWrite(0, (ulong)off, b);
    }

    private void WriteReg64(int off, ulong v)
    {
        WriteReg32(off, (uint)v);
        WriteReg32(off + 4, (uint)(v >> 32));
    }

    private void WaitReady(bool ready, int timeoutMs)
    {
        var sw = Stopwatch.StartNew();
        while (true)
        {
            var csts = (ControllerStatus)Reg32(NvmeRegisters.Csts);
            if ((csts & ControllerStatus.Cfs) != 0 && ready)
            {
                throw new NvmeDriverException("controller fatal status (CSTS.CFS) while enabling");
            }
            if (((csts & ControllerStatus.Rdy) != 0) == ready)
            {
                return;
            }
            if (sw.ElapsedMilliseconds > timeoutMs)
            {
                throw new NvmeDriverException($"timed out waiting for CSTS.RDY = {(ready ? 1 : 0)}");
            }
            Thread.Sleep(1);
        }
    }

    private void EnablePciFunction(bool wantMsix)
    {
        Span<byte> b = stackalloc byte[2];
        _fn.ReadConfig(4, b);
        ushort cmd = (ushort)(BinaryPrimitives.ReadUInt16LittleEndian(b) | 0x6); // Memory Space + Bus Master
        BinaryPrimitives.WriteUInt16LittleEndian(b, cmd);
        _fn.WriteConfig(4, b);
        if (!wantMsix)
        {
            return;
        }
        // Walk the capability list (status bit 4) for MSI-X (id 0x11) and set its Enable bit (message control bit 15).
        _fn.ReadConfig(6, b);
        if ((BinaryPrimitives.ReadUInt16LittleEndian(b) & 0x10) == 0)
        {
            return;
        }
        Span<byte> one = stackalloc byte[1];
        _fn.ReadConfig(0x34, one);
        int ptr = one[0] & 0xFC;
        for (int guard = 0; ptr >= 0x40 && guard < 48; guard++)
        {
            _fn.ReadConfig(ptr, b);
            if (b[0] == 0x11)
            {
                _fn.ReadConfig(ptr + 2, b);
                ushort mc = (ushort)((BinaryPrimitives.ReadUInt16LittleEndian(b) | 0x8000) & ~0x4000); // enable, unmask function
                BinaryPrimitives.WriteUInt16LittleEndian(b, mc);
                _fn.WriteConfig(ptr + 2, b);
                return;
            }
            ptr = b[1] & 0xFC;
        }
    }

    private void BringUp(NvmeDriverOptions o)
    {
        bool msix = o.Interrupts && _fn.MsixVectorCount > 0;
        EnablePciFunction(msix);
        var cap = new ControllerCapabilities(Reg64(NvmeRegisters.Cap));
        int timeout = Math.Max(o.TimeoutMs, (cap.To + 1) * 500);
        if (new ControllerConfiguration(Reg32(NvmeRegisters.Cc)).En)
        {
            WriteReg32(NvmeRegisters.Cc, 0);
        }
        WaitReady(false, timeout);

        int maxEntries = cap.Mqes + 1;
        int adminEntries = Math.Min(o.AdminQueueEntries, maxEntries);
        _mem.WriteUInt32(_state + OffAdminEntries, (uint)adminEntries | ((uint)cap.Dstrd << 16));
        _mem.WriteUInt32(_state + OffFlags, msix ? FlagMsix : 0);
        _mem.WriteUInt32(_state + OffMaxTransfer, (uint)Math.Min(2 << 20, 4096 * 513));
        SetupQueue(0, adminEntries, vector: 0, interrupts: msix);
        ulong q0 = QueueDesc(0);
        WriteReg32(NvmeRegisters.Aqa, AdminQueueAttributes.Encode(adminEntries - 1, adminEntries - 1).Value);
        WriteReg64(NvmeRegisters.Asq, _mem.ReadUInt64(q0 + QSqBase));
        WriteReg64(NvmeRegisters.Acq, _mem.ReadUInt64(q0 + QCqBase));
        WriteReg32(NvmeRegisters.Cc, ControllerConfiguration.Encode(en: true).Value);
        WaitReady(true, timeout);

        var id = IdentifyController();
        if (id.Mdts != 0)
        {
            long mdtsBytes = 4096L << id.Mdts;
            _mem.WriteUInt32(_state + OffMaxTransfer, (uint)Math.Min(mdtsBytes, 4096L * 513));
        }

        var nq = Admin(new SubmissionQueueEntry
        {
            Opcode = (byte)NvmeAdminOpcode.SetFeatures,
            Cdw10 = (uint)FeatureId.NumberOfQueues,
            Cdw11 = (uint)(o.IoQueues - 1) | ((uint)(o.IoQueues - 1) << 16),
        });
        int queues = Math.Min(o.IoQueues, Math.Min((int)(nq.Dw0 & 0xFFFF), (int)(nq.Dw0 >> 16)) + 1);

        if (o.ShadowDoorbells && (id.Oacs & OptionalAdminCommands.DoorbellBufferConfig) != 0)
        {
            ulong shadow = Allocate(Page);
            ulong eventIdx = Allocate(Page);
            Admin(new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.DoorbellBufferConfig, Prp1 = shadow, Prp2 = eventIdx });
            _mem.WriteUInt64(_state + OffShadow, shadow);
            _mem.WriteUInt64(_state + OffEventIdx, eventIdx);
            _mem.WriteUInt32(_state + OffFlags, _mem.ReadUInt32(_state + OffFlags) | FlagShadow);
        }

        int entries = Math.Min(o.IoQueueEntries, maxEntries);
        int vectors = Math.Max(1, _fn.MsixVectorCount);
        // Poll queues are the last ones, as Linux maps HCTX_TYPE_POLL after the default queues.
        int firstPolled = queues - Math.Min(o.PollQueues, queues) + 1;
        for (int q = 1; q <= queues; q++)
        {
            bool ien = msix && q < firstPolled;
            int vector = ien ? q % vectors : 0;
            SetupQueue(q, entries, vector, ien);
            ulong qd = QueueDesc(q);
            while (true)
            {
                var cq = ExecuteRaw(0, new SubmissionQueueEntry
                {
                    Opcode = (byte)NvmeAdminOpcode.CreateIoCompletionQueue,
                    Prp1 = _mem.ReadUInt64(qd + QCqBase),
                    Cdw10 = (uint)q | ((uint)(entries - 1) << 16),
                    Cdw11 = 1u | (ien ? 2u : 0u) | ((uint)vector << 16),
                });
                if (cq.Status.IsSuccess)
                {
                    break;
                }
                if (cq.Status != NvmeStatus.InvalidInterruptVector || vector == 0)
                {
                    throw new NvmeDriverException($"Create I/O CQ {q} failed", cq.Status);
                }
                // A secondary may have fewer interrupt resources than its MSI-X table has entries: share lower vectors.
                vectors = vector;
                vector = q % vectors;
                _mem.WriteUInt32(qd + QVector, (uint)vector);
            }
            Admin(new SubmissionQueueEntry
            {
                Opcode = (byte)NvmeAdminOpcode.CreateIoSubmissionQueue,
                Prp1 = _mem.ReadUInt64(qd + QSqBase),
                Cdw10 = (uint)q | ((uint)(entries - 1) << 16),
                Cdw11 = 1u | ((uint)q << 16),
            });
            // Recorded only once the queue pair exists on the controller.
            _mem.WriteUInt32(_state + OffIoQueues, (uint)q | ((uint)entries << 16));
        }
    }

    private ulong QueueDesc(int qid) => _state + OffQueues + (ulong)(qid * QueueDescSize);

    private void SetupQueue(int qid, int entries, int vector, bool interrupts)
    {
        ulong sq = Allocate((ulong)entries * SubmissionQueueEntry.Size);
        ulong cq = Allocate((ulong)entries * CompletionQueueEntry.Size);
        ulong slots = Allocate((ulong)(entries - 1) * SlotSize);
        ulong prps = Allocate((ulong)(entries - 1) * Page);
        ulong d = QueueDesc(qid);
        Zero(d, QueueDescSize);
        _mem.WriteUInt64(d + QSqBase, sq);
        _mem.WriteUInt64(d + QCqBase, cq);
        _mem.WriteUInt64(d + QSlots, slots);
        _mem.WriteUInt64(d + QPrpPages, prps);
        // Entries, SqTail = 0 | CqHead = 0, Phase = 1, Flags
        _mem.WriteUInt32(d + QEntries, (uint)entries);
        _mem.WriteUInt32(d + QCqHead, 1u << 16 | (interrupts ? 1u << 24 : 0u));
        _mem.WriteUInt32(d + QVector, (uint)vector);
        if (qid != 0 && _mem.ReadUInt64(_state + OffShadow) is var shadow and not 0)
        {
            _mem.WriteUInt32(shadow + (ulong)ShadowDoorbell.SqOffset(qid), 0);
            _mem.WriteUInt32(shadow + (ulong)ShadowDoorbell.CqOffset(qid), 0);
        }
    }

    // ---- queue field access ----

    private ushort Entries(ulong d) => (ushort)_mem.ReadUInt32(d + QEntries);
    private ushort SqTail(ulong d) => (ushort)(_mem.ReadUInt32(d + QEntries) >> 16);
    private void SetSqTail(ulong d, ushort v) => _mem.WriteUInt32(d + QEntries, Entries(d) | ((uint)v << 16));
    private ushort CqHead(ulong d) => (ushort)_mem.ReadUInt32(d + QCqHead);
    private bool Phase(ulong d) => ((_mem.ReadUInt32(d + QCqHead) >> 16) & 1) != 0;
    private bool Ien(ulong d) => ((_mem.ReadUInt32(d + QCqHead) >> 24) & 1) != 0;

    private void SetCqHeadPhase(ulong d, ushort head, bool phase)
    {
        uint v = _mem.ReadUInt32(d + QCqHead);
        _mem.WriteUInt32(d + QCqHead, head | (phase ? 1u << 16 : 0) | (v & 0xFF000000u));
    }

    private int Vector(ulong d) => (ushort)_mem.ReadUInt32(d + QVector);
    private ushort InFlight(ulong d) => (ushort)(_mem.ReadUInt32(d + QVector) >> 16);

    private void SetInFlight(ulong d, ushort n) => _mem.WriteUInt32(d + QVector, (uint)Vector(d) | ((uint)n << 16));

    private ushort NextSlot(ulong d) => (ushort)_mem.ReadUInt32(d + QNextSlot);
    private void SetNextSlot(ulong d, ushort v) => _mem.WriteUInt32(d + QNextSlot, v);

    private ulong ValidQueue(int qid)
    {
        if (qid < 0 || qid > IoQueueCount)
        {
            throw new ArgumentOutOfRangeException(nameof(qid), $"queue {qid} does not exist (I/O queues 1..{IoQueueCount})");
        }
        return QueueDesc(qid);
    }

    // ---- doorbells ----

    private void RingSq(int qid, ulong d, ushort old, ushort tail)
    {
        ulong shadow = qid == 0 ? 0 : _mem.ReadUInt64(_state + OffShadow);
        if (shadow != 0)
        {
            _mem.WriteUInt32(shadow + (ulong)ShadowDoorbell.SqOffset(qid), tail);
            // The shadow write must be visible before EventIdx is read (the device reads them in the other order).
            Interlocked.MemoryBarrier();
            ushort ei = (ushort)_mem.ReadUInt32(_mem.ReadUInt64(_state + OffEventIdx) + (ulong)ShadowDoorbell.SqOffset(qid));
            if (!ShadowDoorbell.NeedEvent(ei, tail, old))
            {
                return;
            }
        }
        WriteReg32(NvmeRegisters.SqTailDoorbell(qid, Dstrd), tail);
    }

    private void RingCq(int qid, ushort old, ushort head)
    {
        ulong shadow = qid == 0 ? 0 : _mem.ReadUInt64(_state + OffShadow);
        if (shadow != 0)
        {
            _mem.WriteUInt32(shadow + (ulong)ShadowDoorbell.CqOffset(qid), head);
            Interlocked.MemoryBarrier();
            ushort ei = (ushort)_mem.ReadUInt32(_mem.ReadUInt64(_state + OffEventIdx) + (ulong)ShadowDoorbell.CqOffset(qid));
            if (!ShadowDoorbell.NeedEvent(ei, head, old))
            {
                return;
            }
        }
        WriteReg32(NvmeRegisters.CqHeadDoorbell(qid, Dstrd), head);
    }

    private int Dstrd => (int)(_mem.ReadUInt32(_state + OffAdminEntries) >> 16) & 0xF;

    // ---- submission ----

    /// <summary>
    /// Submits <paramref name="command"/> on queue <paramref name="qid"/> (0 = admin). The driver assigns the CID and,
    /// if <paramref name="length"/> &gt; 0, builds PRP1/PRP2 (and a PRP list in the command's slot page) for the guest
    /// buffer at <paramref name="dataGpa"/> (dword aligned). <paramref name="tag"/> comes back in the completion.
    /// Returns the CID.
    /// </summary>
    /// <exception cref="InvalidOperationException">The queue has entries − 1 commands in flight.</exception>
    /// <exception cref="ArgumentException">Misaligned buffer or a transfer over <see cref="MaxTransferBytes"/>.</exception>
    public ushort Submit(int qid, SubmissionQueueEntry command, ulong dataGpa = 0, int length = 0, ulong tag = 0)
    {
        ulong d = ValidQueue(qid);
        if (length < 0 || length > MaxTransferBytes || (length > 0 && (dataGpa & 3) != 0))
        {
            throw new ArgumentException($"transfer of {length} bytes at 0x{dataGpa:X} is misaligned or over {MaxTransferBytes}");
        }
        lock (_queueLocks[qid])
        {
            int entries = Entries(d);
            int slotsCount = entries - 1;
            if (InFlight(d) >= slotsCount)
            {
                throw new InvalidOperationException($"queue {qid} is full ({slotsCount} commands in flight)");
            }
            ulong slots = _mem.ReadUInt64(d + QSlots);
            int cid = NextSlot(d);
            for (int i = 0; i < slotsCount; i++, cid = (cid + 1) % slotsCount)
            {
                if (SlotState(slots, cid) == SlotFree)
                {
                    break;
                }
            }
            ulong slot = slots + (ulong)(cid * SlotSize);
            ulong prp1 = 0, prp2 = 0;
            if (length > 0)
            {
                BuildPrps(_mem.ReadUInt64(d + QPrpPages) + (ulong)cid * Page, dataGpa, length, out prp1, out prp2);
            }
            _mem.WriteUInt64(slot + STag, tag);
            _mem.WriteUInt32(slot + SState, SlotInFlight | ((uint)command.Opcode << 8));
            SetInFlight(d, (ushort)(InFlight(d) + 1));
            SetNextSlot(d, (ushort)((cid + 1) % slotsCount));

            var sqe = command with { Cid = (ushort)cid, Prp1 = length > 0 ? prp1 : command.Prp1, Prp2 = length > 0 ? prp2 : command.Prp2 };
            Span<byte> raw = stackalloc byte[SubmissionQueueEntry.Size];
            sqe.WriteTo(raw);
            ushort tail = SqTail(d);
            _mem.Write(_mem.ReadUInt64(d + QSqBase) + (ulong)tail * SubmissionQueueEntry.Size, raw);
            ushort next = (ushort)((tail + 1) % entries);
            SetSqTail(d, next);
            RingSq(qid, d, tail, next);
            return (ushort)cid;
        }
    }

    private byte SlotState(ulong slots, int cid) => (byte)_mem.ReadUInt32(slots + (ulong)(cid * SlotSize));

    /// <summary>PRP1 = the buffer; PRP2 = the second page, or a PRP list in <paramref name="listPage"/> for more.</summary>
    private void BuildPrps(ulong listPage, ulong gpa, int length, out ulong prp1, out ulong prp2)
    {
        prp1 = gpa;
        prp2 = 0;
        ulong firstLen = Math.Min((ulong)length, Page - (gpa & (Page - 1)));
        ulong rest = (ulong)length - firstLen;
        if (rest == 0)
        {
            return;
        }
        ulong next = gpa + firstLen;
        if (rest <= Page)
        {
            prp2 = next;
            return;
        }
        int pages = (int)((rest + Page - 1) / Page);
        Span<byte> list = stackalloc byte[8 * 512];
        for (int i = 0; i < pages; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(list[(8 * i)..], next + (ulong)i * Page);
        }
        _mem.Write(listPage, list[..(8 * pages)]);
        prp2 = listPage;
    }

    // ---- completion ----

    /// <summary>
    /// Moves every new completion of queue <paramref name="qid"/> from the CQ into the command slots and rings the CQ
    /// head doorbell. Returns how many were reaped.
    /// </summary>
    public int ProcessCompletions(int qid)
    {
        ulong d = ValidQueue(qid);
        lock (_queueLocks[qid])
        {
            return ReapLocked(qid, d);
        }
    }

    /// <summary><see cref="ProcessCompletions"/> for a validated queue, its lock held.</summary>
    private int ReapLocked(int qid, ulong d)
    {
        ulong cq = _mem.ReadUInt64(d + QCqBase);
        ulong slots = _mem.ReadUInt64(d + QSlots);
        int entries = Entries(d);
        ushort head = CqHead(d);
        ushort start = head;
        bool phase = Phase(d);
        int n = 0;
        Span<byte> raw = stackalloc byte[CompletionQueueEntry.Size];
        while (true)
        {
            ulong e = cq + (ulong)head * CompletionQueueEntry.Size;
            uint dw3 = _mem.ReadUInt32(e + 12);
            if ((((dw3 >> 16) & 1) != 0) != phase)
            {
                break;
            }
            _mem.Read(e, raw);
            CompletionQueueEntry.TryRead(raw, out var cqe);
            if (cqe.Cid < entries - 1)
            {
                ulong slot = slots + (ulong)(cqe.Cid * SlotSize);
                if ((byte)_mem.ReadUInt32(slot) == SlotInFlight)
                {
                    _mem.WriteUInt32(slot + SDw0, cqe.Dw0);
                    _mem.WriteUInt32(slot + SSqhd, cqe.Sqhd);
                    uint w = _mem.ReadUInt32(slot);
                    _mem.WriteUInt32(slot, (w & 0x0000FF00u) | SlotCompleted | ((uint)cqe.Status.Field << 16));
                }
            }
            head = (ushort)((head + 1) % entries);
            if (head == 0)
            {
                phase = !phase;
            }
            n++;
        }
        if (n > 0)
        {
            SetCqHeadPhase(d, head, phase);
            RingCq(qid, start, head);
        }
        return n;
    }

    /// <summary>If command <paramref name="cid"/> of queue <paramref name="qid"/> has completed, returns it and frees its slot.</summary>
    public bool TryTakeCompletion(int qid, ushort cid, out NvmeCompletion completion)
    {
        ulong d = ValidQueue(qid);
        lock (_queueLocks[qid])
        {
            return TakeLocked(qid, d, cid, out completion);
        }
    }

    /// <summary><see cref="TryTakeCompletion"/> for a validated queue, its lock held.</summary>
    private bool TakeLocked(int qid, ulong d, ushort cid, out NvmeCompletion completion)
    {
        completion = default;
        if (cid >= Entries(d) - 1)
        {
            return false;
        }
        ulong slot = _mem.ReadUInt64(d + QSlots) + (ulong)(cid * SlotSize);
        uint w = _mem.ReadUInt32(slot);
        if ((byte)w != SlotCompleted)
        {
            return false;
        }
        completion = new NvmeCompletion(qid, cid, NvmeStatus.FromField((ushort)(w >> 16)), _mem.ReadUInt32(slot + SDw0), _mem.ReadUInt64(slot + STag));
        _mem.WriteUInt32(slot, SlotFree);
        SetInFlight(d, (ushort)(InFlight(d) - 1));
        return true;
    }

    /// <summary>Takes any one completed command of queue <paramref name="qid"/> (reaping the CQ first).</summary>
    public bool TryTakeAnyCompletion(int qid, out NvmeCompletion completion)
    {
        ProcessCompletions(qid);
        ulong d = ValidQueue(qid);
        int slotsCount = Entries(d) - 1;
        ulong slots = _mem.ReadUInt64(d + QSlots);
        for (int cid = 0; cid < slotsCount; cid++)
        {
            if (SlotState(slots, cid) == SlotCompleted && TryTakeCompletion(qid, (ushort)cid, out completion))
            {
                return true;
            }
        }
        completion = default;
        return false;
    }

    /// <summary>CIDs of queue <paramref name="qid"/> that are in flight (submitted, not yet taken).</summary>
    public IReadOnlyList<ushort> InFlightCommands(int qid)
    {
        ulong d = ValidQueue(qid);
        int slotsCount = Entries(d) - 1;
        ulong slots = _mem.ReadUInt64(d + QSlots);
        var list = new List<ushort>();
        for (int cid = 0; cid < slotsCount; cid++)
        {
            if (SlotState(slots, cid) != SlotFree)
            {
                list.Add((ushort)cid);
            }
        }
        return list;
    }

    /// <summary>Waits (MSI-X or polling) until command <paramref name="cid"/> completes, then returns it.</summary>
    /// <exception cref="NvmeDriverException">Timeout or CSTS.CFS.</exception>
    public NvmeCompletion Wait(int qid, ushort cid, int timeoutMs = -1)
    {
        ulong d = ValidQueue(qid);
        int limit = timeoutMs < 0 ? _timeoutMs : timeoutMs;
        // Timestamps, not a Stopwatch object: no allocation per command on the QD1 path.
        long start = Stopwatch.GetTimestamp();
        bool irq = Ien(d);
        var gate = _queueLocks[qid];
        while (true)
        {
            // Reap and take under one lock acquisition, on the queue validated above.
            lock (gate)
            {
                ReapLocked(qid, d);
                if (TakeLocked(qid, d, cid, out var c))
                {
                    return c;
                }
            }
            long elapsedMs = (long)Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            if (elapsedMs > limit)
            {
                var csts = (ControllerStatus)Reg32(NvmeRegisters.Csts);
                throw new NvmeDriverException($"command {cid} on queue {qid} timed out after {limit} ms (CSTS 0x{(uint)csts:X})");
            }
            if (irq)
            {
                if (PollCompletionQueue(d))
                {
                    continue;
                }
                // Short slices so a completion whose interrupt was consumed by another waiter is still seen.
                _fn.WaitInterrupt(Vector(d), 10);
            }
            else
            {
                // Another waiter on this queue may reap our entry while we poll: watch our slot too (if it is one).
                PollPhaseTag(d, Math.Max(1, limit - elapsedMs + 1), cid < Entries(d) - 1 ? cid : -1);
            }
        }
    }

    private readonly long _pollTicks;
    private readonly long _pollSpinTicks;

    /// <summary>
    /// Phase-tag checks per sched_yield while a poll-queue waiter spins. Small on purpose: on a 2-core host shared with
    /// other work the guest's thread and the device's poller often share one core, and then every I/O waits for a
    /// turn to pass; yielding every 16 checks made a turn ~5 µs (QD1 read stages 5.4 / 1.6 / 8.5 µs p50), every 2
    /// checks ~2 µs (2.2 / 1.6 / 2.9; bench/results/s3-nvme/experiment-yield-*). On separate cores a yield with
    /// nothing else to run is a cheap syscall.
    /// </summary>
    private const int PollsPerYield = 2;

    /// <summary>
    /// Waits on a polled CQ (IEN = 0) for the phase tag of the entry at its head to flip: spins for the spin budget
    /// (a short pause loop between checks, a sched_yield every <see cref="PollsPerYield"/> checks so a device thread
    /// sharing this core runs), then checks once per 1 ms sleep. At most <paramref name="timeoutMs"/>. True if an
    /// entry is there, or (with <paramref name="cid"/> ≥ 0) that command's slot is already completed: a concurrent
    /// waiter's <see cref="ProcessCompletions"/> reaped it, so no new entry would ever show for it.
    /// </summary>
    private bool PollPhaseTag(ulong d, long timeoutMs, int cid = -1)
    {
        long start = Stopwatch.GetTimestamp();
        long spinEnd = start + _pollSpinTicks;
        long end = start + (timeoutMs * Stopwatch.Frequency / 1000);
        ulong slots = cid < 0 ? 0 : _mem.ReadUInt64(d + QSlots);
        for (int polls = 1; ; polls++)
        {
            if (HasNewCompletion(d) || (cid >= 0 && SlotState(slots, cid) == SlotCompleted))
            {
                return true;
            }
            long now = Stopwatch.GetTimestamp();
            if (now >= end)
            {
                return false;
            }
            if (now >= spinEnd)
            {
                Thread.Sleep(1);
            }
            else if (polls % PollsPerYield == 0)
            {
                Thread.Yield();
            }
            else
            {
                Thread.SpinWait(8);
            }
        }
    }

    /// <summary>
    /// Waits until queue <paramref name="qid"/>'s CQ may hold a new entry: polls its phase bit for
    /// <see cref="NvmeDriverOptions.CompletionPollMicroseconds"/>, then sleeps on its MSI-X vector (a poll queue:
    /// spins on the phase tag) for at most <paramref name="timeoutMs"/>. True if an entry or an interrupt arrived.
    /// </summary>
    public bool WaitForCompletions(int qid, int timeoutMs)
    {
        ulong d = ValidQueue(qid);
        if (PollCompletionQueue(d))
        {
            return true;
        }
        if (Ien(d))
        {
            return _fn.WaitInterrupt(Vector(d), timeoutMs);
        }
        return PollPhaseTag(d, timeoutMs);
    }

    /// <summary>
    /// Spins on the phase bit of the entry at the CQ head for the poll budget. True when a new entry is there. Only
    /// with more than one command in flight: measured on the 2-core bench host, a lone waiter that spins takes the CPU
    /// the device's own poller needs and its I/O gets slower (QD1 p50 19 → 34 µs), while at QD32 completions arrive
    /// often enough that polling pays (bench/results/s2-nvme-*).
    /// </summary>
    private bool PollCompletionQueue(ulong d)
    {
        if (_pollTicks == 0 || InFlight(d) < 2)
        {
            return false;
        }
        long end = Stopwatch.GetTimestamp() + _pollTicks;
        do
        {
            if (HasNewCompletion(d))
            {
                return true;
            }
            Thread.SpinWait(16);
        }
        while (Stopwatch.GetTimestamp() < end);
        return false;
    }

    private bool HasNewCompletion(ulong d)
    {
        uint headWord = _mem.ReadUInt32(d + QCqHead);
        ulong e = _mem.ReadUInt64(d + QCqBase) + ((ulong)(ushort)headWord * CompletionQueueEntry.Size);
        bool phase = ((headWord >> 16) & 1) != 0;
        return (((_mem.ReadUInt32(e + 12) >> 16) & 1) != 0) == phase;
    }

    /// <summary>Submits and waits; throws if the status is not success.</summary>
    public NvmeCompletion Execute(int qid, SubmissionQueueEntry command, ulong dataGpa = 0, int length = 0)
    {
        var c = Wait(qid, Submit(qid, command, dataGpa, length));
        if (!c.Status.IsSuccess)
        {
            throw new NvmeDriverException($"{(qid == 0 ? ((NvmeAdminOpcode)command.Opcode).ToString() : ((NvmeIoOpcode)command.Opcode).ToString())} failed", c.Status);
        }
        return c;
    }

    /// <summary>Submits and waits; returns the completion whatever its status.</summary>
    public NvmeCompletion ExecuteRaw(int qid, SubmissionQueueEntry command, ulong dataGpa = 0, int length = 0) =>
        Wait(qid, Submit(qid, command, dataGpa, length));

    private NvmeCompletion Admin(SubmissionQueueEntry command, ulong dataGpa = 0, int length = 0) => Execute(0, command, dataGpa, length);

    // ---- admin helpers ----

    private ulong ScratchPage() => ReservedBuffer(OffScratchPage, Page);

    /// <summary>A buffer reserved on first use, its address kept in the state block at <paramref name="slot"/>.</summary>
    private ulong ReservedBuffer(int slot, ulong size)
    {
        ulong p = _mem.ReadUInt64(_state + (ulong)slot);
        if (p == 0)
        {
            p = Allocate(size);
            _mem.WriteUInt64(_state + (ulong)slot, p);
        }
        return p;
    }

    /// <summary>Identify Controller.</summary>
    public IdentifyController IdentifyController()
    {
        var buf = IdentifyRaw(IdentifyCns.Controller, 0, 0);
        Vmig.Spec.Nvme.IdentifyController.TryRead(buf, out var id);
        return id;
    }

    /// <summary>Identify Namespace <paramref name="nsid"/> (zeroes for an inactive NSID).</summary>
    public IdentifyNamespace IdentifyNamespace(uint nsid)
    {
        var buf = IdentifyRaw(IdentifyCns.Namespace, nsid, 0);
        Vmig.Spec.Nvme.IdentifyNamespace.TryRead(buf, out var id);
        return id;
    }

    /// <summary>Active namespace IDs (CNS 02h).</summary>
    public IReadOnlyList<uint> ActiveNamespaces()
    {
        var buf = IdentifyRaw(IdentifyCns.ActiveNamespaceList, 0, 0);
        var list = new List<uint>();
        for (int i = 0; i < 1024; i++)
        {
            uint id = BinaryPrimitives.ReadUInt32LittleEndian(buf.AsSpan(4 * i));
            if (id == 0)
            {
                break;
            }
            list.Add(id);
        }
        return list;
    }

    /// <summary>Any Identify (4096 bytes) through the admin queue.</summary>
    public byte[] IdentifyRaw(IdentifyCns cns, uint nsid, ushort cntid)
    {
        lock (_allocLock)
        {
            ulong page = ScratchPage();
            Admin(new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.Identify, Nsid = nsid, Cdw10 = (uint)cns | ((uint)cntid << 16) }, page, 4096);
            byte[] buf = new byte[4096];
            _mem.Read(page, buf);
            return buf;
        }
    }

    // ---- I/O helpers ----

    /// <summary>Reads <paramref name="blocks"/> blocks at <paramref name="slba"/> into the guest buffer at <paramref name="bufferGpa"/>.</summary>
    public NvmeStatus Read(int qid, uint nsid, ulong slba, int blocks, int lbaSize, ulong bufferGpa) =>
        ExecuteRaw(qid, ReadWrite(NvmeIoOpcode.Read, nsid, slba, blocks), bufferGpa, blocks * lbaSize).Status;

    /// <summary>Writes <paramref name="blocks"/> blocks from the guest buffer at <paramref name="bufferGpa"/>.</summary>
    public NvmeStatus Write(int qid, uint nsid, ulong slba, int blocks, int lbaSize, ulong bufferGpa) =>
        ExecuteRaw(qid, ReadWrite(NvmeIoOpcode.Write, nsid, slba, blocks), bufferGpa, blocks * lbaSize).Status;

    /// <summary>An NVM Read/Write/Compare command: SLBA in CDW10-11, NLB (0's based) in CDW12.</summary>
    public static SubmissionQueueEntry ReadWrite(NvmeIoOpcode op, uint nsid, ulong slba, int blocks) => new()
    {
        Opcode = (byte)op,
        Nsid = nsid,
        Cdw10 = (uint)slba,
        Cdw11 = (uint)(slba >> 32),
        Cdw12 = (uint)(blocks - 1) & 0xFFFF,
    };

    /// <summary>Orderly shutdown: CC.SHN = normal, wait for CSTS.SHST = complete.</summary>
    public void Shutdown()
    {
        uint cc = Reg32(NvmeRegisters.Cc);
        WriteReg32(NvmeRegisters.Cc, (cc & ~(3u << 14)) | (1u << 14));
        var sw = Stopwatch.StartNew();
        while ((Reg32(NvmeRegisters.Csts) & 0xC) != (uint)ControllerStatus.ShstComplete)
        {
            if (sw.ElapsedMilliseconds > _timeoutMs)
            {
                throw new NvmeDriverException("timed out waiting for shutdown to complete");
            }
            Thread.Sleep(1);
        }
    }
}
