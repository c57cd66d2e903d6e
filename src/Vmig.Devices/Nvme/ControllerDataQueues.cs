using Vmig.Spec.Nvme;

namespace Vmig.Devices.Nvme;

/// <summary>
/// Controller Data Queues (TP4159, admin 0x45) of the primary: host-memory rings (in the primary's host memory, never
/// a VM's) where the controller logs which LBA ranges a secondary changed, for storage pre-copy. Track Send SEL 0
/// starts/stops logging into a queue; Set Features 0x21 moves its head. Entries are 32 bytes with a phase tag
/// (<see cref="UserDataChangeEntry"/>). When one free slot is left the controller posts a "queue full" end marker and
/// stops logging, so the host knows ranges were lost.
/// </summary>
internal sealed class ControllerDataQueues(NvmeSubsystem subsystem)
{
    public const int MaxQueues = 4;

    private readonly object _gate = new();
    private readonly Dictionary<ushort, Queue> _queues = [];
    private ushort _nextId = 1;

    /// <summary>
    /// Some queue is logging. Read without the lock by <see cref="LogChange"/>, which every write of every secondary
    /// calls: with no queue logging (the usual case) a write costs no lock shared by all controllers. Set under the lock.
    /// </summary>
    private volatile bool _anyLogging;

    private sealed class Queue
    {
        public ushort Cdqid;
        public ushort Cntlid;
        public ulong Base;
        public int Entries;
        public int Head;
        public int Tail;
        public bool Phase = true;
        public bool Logging;
        public uint TailTrigger;
    }

    public NvmeStatus Execute(NvmeController primary, in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        var sel = (ControllerDataQueueSelect)(byte)c.Cdw10;
        if (sel == ControllerDataQueueSelect.Delete)
        {
            lock (_gate)
            {
                bool removed = _queues.Remove((ushort)c.Cdw11);
                UpdateAnyLoggingLocked();
                return removed ? NvmeStatus.Success : NvmeStatus.InvalidQueueIdentifier;
            }
        }
        if (sel != ControllerDataQueueSelect.Create || (byte)(c.Cdw10 >> 16) != 0)
        {
            return NvmeStatus.InvalidField; // only Create/Delete of a User Data Migration Queue (QT 0)
        }
        ushort cntlid = (ushort)(c.Cdw11 >> 16);
        uint dwords = c.Cdw12;
        if (subsystem.GetSecondary(cntlid) is null)
        {
            return NvmeStatus.InvalidControllerIdentifier;
        }
        if ((c.Cdw11 & 1) == 0 || (c.Prp1 & (PrpList.PageSize - 1)) != 0 || dwords < 16 || dwords % 8 != 0 || dwords > NvmeController.MaxTransferBytes / 4)
        {
            return NvmeStatus.InvalidField;
        }
        int entries = (int)(dwords * 4 / UserDataChangeEntry.Size);
        // The host memory must be there now; zero it so no stale phase tag looks like an entry.
        if (!primary.TryWriteHost(c.Prp1, new byte[entries * UserDataChangeEntry.Size]))
        {
            return NvmeStatus.DataTransferError;
        }
        lock (_gate)
        {
            if (_queues.Count >= MaxQueues)
            {
                return NvmeStatus.ControllerDataQueueFailure;
            }
            ushort id = _nextId++;
            _queues[id] = new Queue { Cdqid = id, Cntlid = cntlid, Base = c.Prp1, Entries = entries };
            dw0 = id;
        }
        return NvmeStatus.Success;
    }

    /// <summary>Track Send SEL 0: LACT (MOS[3:0]) 1 = start, 0 = stop logging user-data changes into CDQ CDW11[15:0].</summary>
    public NvmeStatus TrackUserData(NvmeController primary, in SubmissionQueueEntry c)
    {
        int lact = (int)(c.Cdw10 >> 16) & 0xF;
        lock (_gate)
        {
            if (!_queues.TryGetValue((ushort)c.Cdw11, out var q))
            {
                return NvmeStatus.InvalidQueueIdentifier;
            }
            if (lact > 1)
            {
                return NvmeStatus.InvalidField;
            }
            if (lact == 1)
            {
                q.Logging = true;
            }
            else if (q.Logging)
            {
                q.Logging = false;
                Post(primary, q, new UserDataChangeEntry(0, 0, 0, q.Phase, UserDataChangeEntry.EsaLastStopped, 2), force: true);
            }
            UpdateAnyLoggingLocked();
            return NvmeStatus.Success;
        }
    }

    /// <summary>Set Features 0x21: CDW11 CDQID [15:0] (ETPT bit 31), CDW12 head pointer, CDW13 tail-pointer trigger.</summary>
    public NvmeStatus SetFeature(in SubmissionQueueEntry c)
    {
        lock (_gate)
        {
            if (!_queues.TryGetValue((ushort)c.Cdw11, out var q))
            {
                return NvmeStatus.InvalidQueueIdentifier;
            }
            if (c.Cdw12 >= (uint)q.Entries)
            {
                return NvmeStatus.InvalidField;
            }
            q.Head = (int)c.Cdw12;
            q.TailTrigger = (c.Cdw11 & (1u << 31)) != 0 ? c.Cdw13 : 0;
            return NvmeStatus.Success;
        }
    }

    /// <summary>Get Features 0x21: DW0 = the head pointer; with PRP1, the 8-byte {le32 head, le32 tail-pointer trigger}.</summary>
    public NvmeStatus GetFeature(NvmeController primary, in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        byte[] data = new byte[8];
        lock (_gate)
        {
            if (!_queues.TryGetValue((ushort)c.Cdw11, out var q))
            {
                return NvmeStatus.InvalidQueueIdentifier;
            }
            dw0 = (uint)q.Head;
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(data, (uint)q.Head);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(data.AsSpan(4), q.TailTrigger);
        }
        return c.Prp1 == 0 ? NvmeStatus.Success : primary.ToHost(in c, data);
    }

    /// <summary>
    /// Migration Send Suspend of <paramref name="cntlid"/>: queues logging for it get the "last (suspended)" marker and
    /// stop; with DUDMQ they are deleted as well.
    /// </summary>
    public void OnSuspend(ushort cntlid, bool deleteQueues)
    {
        lock (_gate)
        {
            foreach (var q in _queues.Values.Where(q => q.Cntlid == cntlid).ToList())
            {
                if (q.Logging)
                {
                    q.Logging = false;
                    Post(subsystem.Primary, q, new UserDataChangeEntry(0, 0, 0, q.Phase, UserDataChangeEntry.EsaLastSuspended, 2), force: true);
                }
                if (deleteQueues)
                {
                    _queues.Remove(q.Cdqid);
                }
            }
            UpdateAnyLoggingLocked();
        }
    }

    /// <summary>Called by a secondary after it changed blocks [slba, +nlb) of <paramref name="nsid"/>.</summary>
    public void LogChange(ushort cntlid, uint nsid, ulong slba, ulong nlb)
    {
        if (!_anyLogging)
        {
            return;
        }
        lock (_gate)
        {
            foreach (var q in _queues.Values)
            {
                if (q.Logging && q.Cntlid == cntlid)
                {
                    Post(subsystem.Primary, q, new UserDataChangeEntry(nsid, (uint)Math.Min(nlb, uint.MaxValue), slba, q.Phase, UserDataChangeEntry.EsaRange, 0), force: false);
                }
            }
            UpdateAnyLoggingLocked(); // a full or unreachable queue stopped logging
        }
    }

    private void UpdateAnyLoggingLocked()
    {
        bool any = false;
        foreach (var q in _queues.Values)
        {
            any |= q.Logging;
        }
        _anyLogging = any;
    }

    private static void Post(NvmeController primary, Queue q, UserDataChangeEntry e, bool force)
    {
        int free = (q.Head - q.Tail - 1 + q.Entries) % q.Entries;
        if (free == 0)
        {
            q.Logging = false;
            return;
        }
        if (free == 1 && !force)
        {
            // Last slot: the end marker says changes were lost, and logging stops.
            e = e with { Nsid = 0, Nlb = 0, Slba = 0, Esa = UserDataChangeEntry.EsaLastQueueFull, Lbacir = 2 };
            q.Logging = false;
        }
        Span<byte> b = stackalloc byte[UserDataChangeEntry.Size];
        (e with { Phase = q.Phase }).WriteTo(b);
        if (!primary.TryWriteHost(q.Base + (ulong)(q.Tail * UserDataChangeEntry.Size), b))
        {
            q.Logging = false;
            return;
        }
        q.Tail = (q.Tail + 1) % q.Entries;
        if (q.Tail == 0)
        {
            q.Phase = !q.Phase;
        }
    }
}
