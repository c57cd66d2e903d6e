using Vmig.Spec.Nvme;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Nvme;

/// <summary>
/// TP4159 host-managed live migration on the primary controller (reference §5.6.2): every operation names a
/// secondary controller by CNTLID, and the secondary never takes part in its own migration. The admin commands
/// Migration Send (0x41) and Migration Receive (0x42) on the primary's admin queue and the host-side methods here
/// (used by a migration driver inside the device host) run the same code, so both give byte-identical state.
/// Migration data moves only through the primary's buffers (its admin command PRPs) or host memory, never through
/// the secondary's DMA windows.
/// </summary>
public sealed class NvmeMigrationController
{
    private readonly NvmeSubsystem _subsystem;
    private readonly object _gate = new();
    private readonly Dictionary<ushort, byte[]> _saved = [];
    private readonly Dictionary<ushort, MemoryStream> _incoming = [];

    internal NvmeMigrationController(NvmeSubsystem subsystem)
    {
        _subsystem = subsystem;
        DataQueues = new ControllerDataQueues(subsystem);
    }

    internal ControllerDataQueues DataQueues { get; }

    /// <summary>The profile a target must match: resources, MQES and the namespaces attached to <paramref name="cntlid"/>.</summary>
    public NvmeMigrationProfile ProfileOf(ushort cntlid)
    {
        var c = _subsystem.GetSecondary(cntlid) ?? throw new ArgumentOutOfRangeException(nameof(cntlid), $"no secondary controller {cntlid}");
        var nss = _subsystem.AttachedNamespaceIds(cntlid).Select(id =>
        {
            var ns = _subsystem.GetNamespace(id)!;
            return (id, ns.LbaSize, ns.BlockCount);
        }).ToList();
        return new NvmeMigrationProfile((ushort)c.QueueResources, (ushort)c.VectorResources, c.Capabilities.Mqes, nss);
    }

    /// <summary>
    /// Migration Send / Suspend. <see cref="SuspendType.Notification"/> only records the notice; <see cref="SuspendType.Suspend"/>
    /// stops the secondary fetching commands. Commands run to completion when fetched, so once this returns nothing
    /// is in progress: the only fetched-but-incomplete commands are AERs, which travel in the state.
    /// Statuses: Invalid Controller Identifier (not a secondary), Controller Suspended (already suspended).
    /// </summary>
    public NvmeStatus Suspend(ushort cntlid, SuspendType type)
    {
        var c = _subsystem.GetSecondary(cntlid);
        if (c is null)
        {
            return NvmeStatus.InvalidControllerIdentifier;
        }
        if (type == SuspendType.Notification)
        {
            return NvmeStatus.Success;
        }
        if (type != SuspendType.Suspend)
        {
            return NvmeStatus.InvalidField;
        }
        return c.Suspend();
    }

    /// <summary>Migration Send / Resume: the secondary fetches again (and catches up on doorbells rung meanwhile). Controller Not Suspended if it was not.</summary>
    public NvmeStatus Resume(ushort cntlid)
    {
        var c = _subsystem.GetSecondary(cntlid);
        if (c is null)
        {
            return NvmeStatus.InvalidControllerIdentifier;
        }
        lock (_gate)
        {
            _saved.Remove(cntlid);
            _incoming.Remove(cntlid);
        }
        return c.ResumeFromMigration();
    }

    /// <summary>Bytes Get Controller State would return now (the state is encoded to measure it).</summary>
    public int EstimateStateSize(ushort cntlid)
    {
        var c = _subsystem.GetSecondary(cntlid);
        if (c is null)
        {
            return 0;
        }
        var profile = ProfileOf(cntlid);
        return c.WithLock(st => NvmeStateCodec.Save(st, profile).Length);
    }

    /// <summary>Whether the secondary is suspended (CSUP), or null for an unknown CNTLID.</summary>
    public bool? IsSuspended(ushort cntlid) => _subsystem.GetSecondary(cntlid)?.WithLock(s => s.Suspended);

    /// <summary>
    /// Get Controller State of a suspended secondary: the whole state (see <see cref="NvmeStateCodec"/>). Statuses:
    /// Invalid Controller Identifier, Controller Not Suspended.
    /// </summary>
    public NvmeStatus GetControllerState(ushort cntlid, out byte[] state)
    {
        state = [];
        var c = _subsystem.GetSecondary(cntlid);
        if (c is null)
        {
            return NvmeStatus.InvalidControllerIdentifier;
        }
        var profile = ProfileOf(cntlid);
        byte[]? s = c.WithLock(st => st.Suspended ? NvmeStateCodec.Save(st, profile) : null);
        if (s is null)
        {
            return NvmeStatus.ControllerNotSuspended;
        }
        state = s;
        return NvmeStatus.Success;
    }

    /// <summary>
    /// Set Controller State on a suspended target secondary: validates the whole state (CRC, magic, version, lengths,
    /// profile, every queue) before changing anything, then replaces the secondary's state in one step.
    /// <paramref name="error"/> says why a state was refused. Statuses: Invalid Controller Identifier, Controller Not
    /// Suspended, Invalid Field (corrupt, truncated, foreign or incompatible state).
    /// </summary>
    public NvmeStatus SetControllerState(ushort cntlid, ReadOnlySpan<byte> state, out string error)
    {
        error = "";
        var c = _subsystem.GetSecondary(cntlid);
        if (c is null)
        {
            error = $"no secondary controller {cntlid}";
            return NvmeStatus.InvalidControllerIdentifier;
        }
        if (c.WithLock(s => !s.Suspended))
        {
            error = $"secondary controller {cntlid} is not suspended";
            return NvmeStatus.ControllerNotSuspended;
        }
        if (!NvmeStateCodec.TryLoad(state, ProfileOf(cntlid), c.VectorResources - 1, out var loaded, out error))
        {
            return NvmeStatus.InvalidField;
        }
        loaded.Suspended = true;
        return c.ReplaceState(loaded);
    }

    // ---- memory-change tracking (Track Send / Track Receive, SEL 1 "Track Memory Changes") ----

    /// <summary>Tracking granule: 4 KiB pages (RPMPG 0).</summary>
    public const int TrackPageSize = 4096;

    private DmaSpace? TrackedDma(ushort cntlid, out NvmeStatus status)
    {
        status = NvmeStatus.Success;
        var f = _subsystem.GetSecondary(cntlid) is null ? null : _subsystem.SecondaryFunction(cntlid);
        if (f is null)
        {
            status = NvmeStatus.InvalidControllerIdentifier;
            return null;
        }
        // The host memory the secondary writes is its vfio-user client's DMA space; tracking uses its write log (the
        // "hardware" tracker; the VF's DMA_LOGGING_* reach it only through Track Send/Receive, see NvmeVfMigration).
        if (f.Context?.Dma is not DmaSpace dma)
        {
            status = NvmeStatus.CommandSequenceError;
            return null;
        }
        return dma;
    }

    /// <summary>
    /// Track Send / Track Memory Changes: start (true) or stop logging the host-memory pages secondary
    /// <paramref name="cntlid"/> writes. Statuses: Invalid Controller Identifier, Command Sequence Error (no host
    /// memory attached, already started, or not started).
    /// </summary>
    public NvmeStatus TrackMemoryChanges(ushort cntlid, bool start)
    {
        var dma = TrackedDma(cntlid, out var st);
        if (dma is null)
        {
            return st;
        }
        int rc = start ? dma.StartWriteLog(TrackPageSize) : dma.StopWriteLog();
        return rc == 0 ? NvmeStatus.Success : NvmeStatus.CommandSequenceError;
    }

    /// <summary>
    /// Track Receive: reads and clears the pages secondary <paramref name="cntlid"/> wrote since the last call, as runs
    /// of <see cref="TrackPageSize"/> pages, at most <paramref name="maxRuns"/> (the rest stay logged; <c>more</c> says so).
    /// </summary>
    public NvmeStatus ReceiveTrackedChanges(ushort cntlid, int maxRuns, List<TrackedMemoryChange> runs, out bool more)
    {
        ArgumentNullException.ThrowIfNull(runs);
        more = false;
        var dma = TrackedDma(cntlid, out var st);
        if (dma is null)
        {
            return st;
        }
        if (!dma.IsLogging)
        {
            return NvmeStatus.CommandSequenceError;
        }
        foreach (var w in dma.Windows)
        {
            ulong pages = (w.Size + TrackPageSize - 1) / TrackPageSize;
            int words = (int)((pages + 63) / 64);
            // Pooled: a window of guest RAM needs a large bitmap on every report (ReportWriteLog clears it first).
            ulong[] rented = System.Buffers.ArrayPool<ulong>.Shared.Rent(words);
            try
            {
                CollectRuns(dma, w.Iova, pages, rented.AsSpan(0, words), maxRuns, runs, ref more);
            }
            finally
            {
                System.Buffers.ArrayPool<ulong>.Shared.Return(rented);
            }
        }
        return NvmeStatus.Success;
    }

    /// <summary>Reads and clears the write log of the window at <paramref name="iova"/> into runs (see <see cref="ReceiveTrackedChanges"/>).</summary>
    private static void CollectRuns(DmaSpace dma, ulong iova, ulong pages, Span<ulong> bitmap, int maxRuns, List<TrackedMemoryChange> runs, ref bool more)
    {
        if (dma.ReportWriteLog(iova, pages * TrackPageSize, TrackPageSize, bitmap) != 0)
        {
            return;
        }
        ulong p = 0;
        while (p < pages)
        {
            // Skip clean pages a word at a time: most of a window is clean between two reports.
            ulong rest = bitmap[(int)(p >> 6)] >> (int)(p & 63);
            if (rest == 0)
            {
                p = (p | 63) + 1;
                continue;
            }
            p += (ulong)System.Numerics.BitOperations.TrailingZeroCount(rest);
            ulong startPage = p;
            while (p < pages && (bitmap[(int)(p >> 6)] & (1UL << (int)(p & 63))) != 0 && p - startPage < uint.MaxValue)
            {
                p++;
            }
            if (runs.Count == maxRuns)
            {
                // Out of room: put the run back so the next Track Receive reports it.
                dma.MarkDirty(iova + (startPage * TrackPageSize), (p - startPage) * TrackPageSize);
                more = true;
                continue;
            }
            runs.Add(new TrackedMemoryChange(iova + (startPage * TrackPageSize), (uint)(p - startPage)));
        }
    }

    // ---- admin command forms (primary's admin queue) ----

    internal NvmeStatus Execute(NvmeController primary, in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        byte sel = (byte)c.Cdw10;
        ushort cntlid = (ushort)c.Cdw11;
        if ((NvmeAdminOpcode)c.Opcode == NvmeAdminOpcode.ControllerDataQueue)
        {
            return DataQueues.Execute(primary, in c, out dw0);
        }
        if ((NvmeAdminOpcode)c.Opcode == NvmeAdminOpcode.TrackSend && (TrackSendSelect)sel == TrackSendSelect.LogUserDataChanges)
        {
            return DataQueues.TrackUserData(primary, in c);
        }
        if ((NvmeAdminOpcode)c.Opcode == NvmeAdminOpcode.TrackSend)
        {
            // SEL 1 Track Memory Changes: TACT = MOS[3:0] (0 stop, 1 start), CNTLID in CDW11[15:0]; MRTG in DW0 = RPMPG.
            int tact = (int)(c.Cdw10 >> 16) & 0xF;
            if ((TrackSendSelect)sel != TrackSendSelect.TrackMemoryChanges || tact > 1)
            {
                return NvmeStatus.InvalidField;
            }
            return TrackMemoryChanges(cntlid, tact == 1);
        }
        if ((NvmeAdminOpcode)c.Opcode == NvmeAdminOpcode.TrackReceive)
        {
            return TrackReceiveCommand(primary, in c, cntlid);
        }
        if ((NvmeAdminOpcode)c.Opcode == NvmeAdminOpcode.MigrationSend)
        {
            switch ((MigrationSendSelect)sel)
            {
                case MigrationSendSelect.Suspend:
                    {
                        var st = Suspend(cntlid, (SuspendType)(byte)(c.Cdw11 >> 16));
                        if (st.IsSuccess && (SuspendType)(byte)(c.Cdw11 >> 16) == SuspendType.Suspend)
                        {
                            // DUDMQ (CDW11 bit 31): delete the user data migration queues of this controller.
                            DataQueues.OnSuspend(cntlid, deleteQueues: (c.Cdw11 & (1u << 31)) != 0);
                        }
                        return st;
                    }
                case MigrationSendSelect.Resume:
                    return Resume(cntlid);
                case MigrationSendSelect.SetControllerState:
                    return SetStateChunk(primary, in c, cntlid);
                default:
                    return NvmeStatus.InvalidField;
            }
        }
        if ((MigrationReceiveSelect)sel != MigrationReceiveSelect.GetControllerState)
        {
            return NvmeStatus.InvalidField;
        }
        return GetStateChunk(primary, in c, cntlid, out dw0);
    }

    /// <summary>
    /// Track Receive (SEL 0 = tracked memory changes): CDW11[15:0] CNTLID, CDW15 NUMD (0's based dwords) of the host
    /// buffer, which gets a <see cref="TrackedMemoryChangesHeader"/> and as many descriptors as fit (ATTRB bit 0 = more).
    /// </summary>
    private NvmeStatus TrackReceiveCommand(NvmeController primary, in SubmissionQueueEntry c, ushort cntlid)
    {
        long len = ((long)c.Cdw15 + 1) * 4;
        if ((byte)c.Cdw10 != 0 || len < TrackedMemoryChangesHeader.Size || len > NvmeController.MaxTransferBytes)
        {
            return NvmeStatus.InvalidField;
        }
        int maxRuns = (int)((len - TrackedMemoryChangesHeader.Size) / TrackedMemoryChange.Size);
        var runs = new List<TrackedMemoryChange>();
        var st = ReceiveTrackedChanges(cntlid, maxRuns, runs, out bool more);
        if (!st.IsSuccess)
        {
            return st;
        }
        byte[] buf = new byte[len];
        new TrackedMemoryChangesHeader(0, (byte)(more ? 1 : 0), cntlid, (uint)runs.Count, 0).WriteTo(buf);
        for (int i = 0; i < runs.Count; i++)
        {
            runs[i].WriteTo(buf.AsSpan(TrackedMemoryChangesHeader.Size + (i * TrackedMemoryChange.Size)));
        }
        return primary.ToHost(in c, buf);
    }

    /// <summary>
    /// Migration Receive / Get Controller State: CDW12-13 = byte offset, CDW15 = NUMD (0's based dwords). The first
    /// chunk (offset 0) snapshots the state; later chunks read the same snapshot. Bytes past the end read as zero.
    /// CQE DW0 bit 0 = CSUP.
    /// </summary>
    private NvmeStatus GetStateChunk(NvmeController primary, in SubmissionQueueEntry c, ushort cntlid, out uint dw0)
    {
        dw0 = 0;
        var sec = _subsystem.GetSecondary(cntlid);
        if (sec is null)
        {
            return NvmeStatus.InvalidControllerIdentifier;
        }
        bool suspended = sec.WithLock(s => s.Suspended);
        dw0 = suspended ? 1u : 0u;
        ulong offset = c.Cdw12_13;
        long len = ((long)c.Cdw15 + 1) * 4;
        if (len > NvmeController.MaxTransferBytes || (offset & 3) != 0)
        {
            return NvmeStatus.InvalidField;
        }
        byte[] snap;
        lock (_gate)
        {
            if (offset == 0 || !_saved.TryGetValue(cntlid, out snap!))
            {
                var st = GetControllerState(cntlid, out snap);
                if (!st.IsSuccess)
                {
                    return st;
                }
                _saved[cntlid] = snap;
            }
        }
        if (offset > (ulong)snap.Length)
        {
            return NvmeStatus.InvalidField;
        }
        byte[] chunk = new byte[len];
        snap.AsSpan((int)offset, (int)Math.Min((ulong)len, (ulong)snap.Length - offset)).CopyTo(chunk);
        return primary.ToHost(in c, chunk);
    }

    /// <summary>
    /// Migration Send / Set Controller State chunk: SEQIND (CDW10 bits 17:16) first/middle/last/only, CDW12-13 = byte
    /// offset (must continue the previous chunk), CDW15 = NUMD (0's based dwords). The state is applied on the last chunk.
    /// </summary>
    private NvmeStatus SetStateChunk(NvmeController primary, in SubmissionQueueEntry c, ushort cntlid)
    {
        if (_subsystem.GetSecondary(cntlid) is null)
        {
            return NvmeStatus.InvalidControllerIdentifier;
        }
        var seq = (SequenceIndicator)((c.Cdw10 >> 16) & 3);
        ulong offset = c.Cdw12_13;
        long len = ((long)c.Cdw15 + 1) * 4;
        if (len > NvmeController.MaxTransferBytes)
        {
            return NvmeStatus.InvalidField;
        }
        byte[] chunk = new byte[len];
        var st = primary.FromHost(in c, chunk);
        if (!st.IsSuccess)
        {
            return st;
        }
        byte[] whole;
        lock (_gate)
        {
            if (seq is SequenceIndicator.First or SequenceIndicator.Only)
            {
                _incoming[cntlid] = new MemoryStream();
            }
            if (!_incoming.TryGetValue(cntlid, out var ms) || (ulong)ms.Length != offset || ms.Length + len > NvmeStateCodec.MaxStateBytes + 4096)
            {
                // Out of sequence, or a state larger than any we produce: drop what was staged.
                _incoming.Remove(cntlid);
                return NvmeStatus.InvalidField;
            }
            ms.Write(chunk);
            if (seq is SequenceIndicator.First or SequenceIndicator.Middle)
            {
                return NvmeStatus.Success;
            }
            _incoming.Remove(cntlid);
            whole = ms.ToArray();
        }
        // The host sends whole dwords; the state's own header says how long it is.
        if (!ControllerStateHeader.TryRead(whole, out var hdr))
        {
            return NvmeStatus.InvalidField;
        }
        ulong size = ControllerStateHeader.Size + (hdr.Nvmecss + hdr.Vss) * 4;
        if (size > (ulong)whole.Length)
        {
            return NvmeStatus.InvalidField;
        }
        return SetControllerState(cntlid, whole.AsSpan(0, (int)size), out _);
    }

    internal NvmeStatus SetCdqFeature(in SubmissionQueueEntry c) => DataQueues.SetFeature(in c);

    internal NvmeStatus GetCdqFeature(NvmeController primary, in SubmissionQueueEntry c, out uint dw0) => DataQueues.GetFeature(primary, in c, out dw0);

    /// <summary>Identify CNS 20h: NV = 1 (NVMe-defined format version 0), NUUID = 0. Vendor state rides inside that format.</summary>
    internal static void WriteSupportedFormats(Span<byte> page)
    {
        page[0] = 1;
        page[1] = 0;
        page[2] = 0;
        page[3] = 0;
    }
}
