using Vmig.Spec.Nvme;

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

    internal NvmeMigrationController(NvmeSubsystem subsystem) => _subsystem = subsystem;

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

    // ---- admin command forms (primary's admin queue) ----

    internal NvmeStatus Execute(NvmeController primary, in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        byte sel = (byte)c.Cdw10;
        ushort cntlid = (ushort)c.Cdw11;
        if ((NvmeAdminOpcode)c.Opcode == NvmeAdminOpcode.MigrationSend)
        {
            switch ((MigrationSendSelect)sel)
            {
                case MigrationSendSelect.Suspend:
                    return Suspend(cntlid, (SuspendType)(byte)(c.Cdw11 >> 16));
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

    internal NvmeStatus SetCdqFeature(in SubmissionQueueEntry c) => NvmeStatus.InvalidField;

    internal NvmeStatus GetCdqFeature(NvmeController primary, in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        return NvmeStatus.InvalidField;
    }

    /// <summary>Identify CNS 20h: NV = 1 (NVMe-defined format version 0), NUUID = 0. Vendor state rides inside that format.</summary>
    internal static void WriteSupportedFormats(Span<byte> page)
    {
        page[0] = 1;
        page[1] = 0;
        page[2] = 0;
        page[3] = 0;
    }
}
