using System.Buffers.Binary;
using Vmig.Spec.Nvme;
using static Vmig.Guest.Nvme.NvmeDriverState;

namespace Vmig.Guest.Nvme;

/// <summary>
/// Primary-controller management through the admin queue, for a host-side agent that opened the PF (interface 2 of
/// ARCHITECTURE §3): Virtualization Management, the secondary controller list, and TP4159 migration commands naming a
/// secondary by CNTLID. Data moves through a 64 KiB transfer buffer in the driver's region (the PF's host memory).
/// </summary>
public sealed partial class NvmeDriver
{
    /// <summary>Bytes moved per Migration Send/Receive or Track Receive command.</summary>
    public const int TransferChunk = 64 * 1024;

    private ulong TransferBuffer() => ReservedBuffer(OffTransferBuffer, TransferChunk);

    /// <summary>Identify CNS 15h: the secondary controllers (CNTLID, VF number, online, VQ/VI resources).</summary>
    public IReadOnlyList<SecondaryControllerEntry> SecondaryControllers() =>
        SecondaryControllerEntry.ReadList(IdentifyRaw(IdentifyCns.SecondaryControllerList, 0, 0));

    /// <summary>Virtualization Management (admin 1Ch). Returns the completion (DW0 = resources assigned).</summary>
    public NvmeCompletion VirtualizationManagement(VirtualizationAction action, VirtualizationResource rt, ushort cntlid, ushort count) =>
        ExecuteRaw(0, new SubmissionQueueEntry
        {
            Opcode = (byte)NvmeAdminOpcode.VirtualizationManagement,
            Cdw10 = (uint)action | ((uint)rt << 8) | ((uint)cntlid << 16),
            Cdw11 = count,
        });

    /// <summary>Migration Send / Suspend of secondary <paramref name="cntlid"/> (DUDMQ deletes its user data migration queues).</summary>
    public NvmeStatus SuspendSecondary(ushort cntlid, SuspendType type = SuspendType.Suspend, bool deleteUserDataQueues = false) =>
        ExecuteRaw(0, new SubmissionQueueEntry
        {
            Opcode = (byte)NvmeAdminOpcode.MigrationSend,
            Cdw10 = (uint)MigrationSendSelect.Suspend,
            Cdw11 = cntlid | ((uint)type << 16) | (deleteUserDataQueues ? 1u << 31 : 0),
        }).Status;

    /// <summary>Migration Send / Resume of secondary <paramref name="cntlid"/>.</summary>
    public NvmeStatus ResumeSecondary(ushort cntlid) =>
        ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationSend, Cdw10 = (uint)MigrationSendSelect.Resume, Cdw11 = cntlid }).Status;

    /// <summary>
    /// Migration Receive / Get Controller State of <paramref name="cntlid"/>, in <see cref="TransferChunk"/> pieces:
    /// the header says the total size. <paramref name="suspended"/> is CQE DW0 bit 0 (CSUP).
    /// </summary>
    /// <exception cref="NvmeDriverException">A command failed (e.g. Controller Not Suspended) or the header is malformed.</exception>
    public byte[] GetSecondaryState(ushort cntlid, out bool suspended)
    {
        lock (_allocLock)
        {
            ulong buf = TransferBuffer();
            var recv = new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationReceive, Cdw11 = cntlid, Cdw15 = (TransferChunk / 4) - 1 };
            var c = Execute(0, recv, buf, TransferChunk);
            suspended = (c.Dw0 & 1) != 0;
            byte[] head = new byte[ControllerStateHeader.Size];
            _mem.Read(buf, head);
            if (!ControllerStateHeader.TryRead(head, out var h) || (h.Nvmecss + h.Vss) * 4 > 1 << 24)
            {
                throw new NvmeDriverException("controller state header is malformed");
            }
            int size = (int)(ControllerStateHeader.Size + ((h.Nvmecss + h.Vss) * 4));
            byte[] state = new byte[size];
            for (int off = 0; off < size; off += TransferChunk)
            {
                if (off > 0)
                {
                    Execute(0, recv with { Cdw12 = (uint)off, Cdw13 = (uint)((ulong)off >> 32) }, buf, TransferChunk);
                }
                _mem.Read(buf, state.AsSpan(off, Math.Min(TransferChunk, size - off)));
            }
            return state;
        }
    }

    /// <summary>
    /// Migration Send / Set Controller State on a suspended <paramref name="cntlid"/>, in SEQIND-marked chunks
    /// (first, middle…, last, or only). Returns the status of the last command sent.
    /// </summary>
    public NvmeStatus SetSecondaryState(ushort cntlid, ReadOnlySpan<byte> state)
    {
        lock (_allocLock)
        {
            ulong buf = TransferBuffer();
            int chunks = Math.Max(1, (state.Length + TransferChunk - 1) / TransferChunk);
            for (int i = 0; i < chunks; i++)
            {
                var part = state.Slice(i * TransferChunk, Math.Min(TransferChunk, state.Length - (i * TransferChunk)));
                int dwords = (part.Length + 3) / 4;
                byte[] padded = new byte[dwords * 4];
                part.CopyTo(padded);
                _mem.Write(buf, padded);
                var seq = chunks == 1 ? SequenceIndicator.Only : i == 0 ? SequenceIndicator.First : i == chunks - 1 ? SequenceIndicator.Last : SequenceIndicator.Middle;
                var st = ExecuteRaw(0, new SubmissionQueueEntry
                {
                    Opcode = (byte)NvmeAdminOpcode.MigrationSend,
                    Cdw10 = (uint)MigrationSendSelect.SetControllerState | ((uint)seq << 16),
                    Cdw11 = cntlid,
                    Cdw12 = (uint)(i * TransferChunk),
                    Cdw15 = (uint)(dwords - 1),
                }, buf, padded.Length).Status;
                if (!st.IsSuccess)
                {
                    return st;
                }
            }
            return NvmeStatus.Success;
        }
    }

    /// <summary>Track Send / Track Memory Changes: start or stop logging the host pages secondary <paramref name="cntlid"/> writes.</summary>
    public NvmeStatus TrackSecondaryMemory(ushort cntlid, bool start) =>
        ExecuteRaw(0, new SubmissionQueueEntry
        {
            Opcode = (byte)NvmeAdminOpcode.TrackSend,
            Cdw10 = (uint)TrackSendSelect.TrackMemoryChanges | ((start ? 1u : 0u) << 16),
            Cdw11 = cntlid,
        }).Status;

    /// <summary>Track Receive: the runs of 4 KiB pages secondary <paramref name="cntlid"/> wrote since the last call (read and cleared).</summary>
    /// <exception cref="NvmeDriverException">The command failed (e.g. tracking not started).</exception>
    public IReadOnlyList<TrackedMemoryChange> ReceiveSecondaryMemoryChanges(ushort cntlid)
    {
        lock (_allocLock)
        {
            ulong buf = TransferBuffer();
            var list = new List<TrackedMemoryChange>();
            while (true)
            {
                Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.TrackReceive, Cdw11 = cntlid, Cdw15 = (TransferChunk / 4) - 1 }, buf, TransferChunk);
                byte[] data = new byte[TransferChunk];
                _mem.Read(buf, data);
                if (!TrackedMemoryChangesHeader.TryRead(data, out var h) || h.Ntmcd > (TransferChunk - TrackedMemoryChangesHeader.Size) / TrackedMemoryChange.Size)
                {
                    throw new NvmeDriverException("Track Receive data is malformed");
                }
                for (int i = 0; i < h.Ntmcd; i++)
                {
                    TrackedMemoryChange.TryRead(data.AsSpan(TrackedMemoryChangesHeader.Size + (i * TrackedMemoryChange.Size)), out var r);
                    list.Add(r);
                }
                if (!h.More)
                {
                    return list;
                }
            }
        }
    }
}
