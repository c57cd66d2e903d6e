using System.Buffers;
using System.Buffers.Binary;
using Vmig.Spec.Nvme;

namespace Vmig.Devices.Nvme;

/// <summary>Admin command set (NVMe Base 2.x §5).</summary>
public sealed partial class NvmeController
{
    /// <summary>ONCS advertised by every controller.</summary>
    internal const OptionalNvmCommands SupportedNvmCommands =
        OptionalNvmCommands.Compare | OptionalNvmCommands.DatasetManagement | OptionalNvmCommands.WriteZeroes;

    private NvmeStatus ExecuteAdmin(in SubmissionQueueEntry c, out uint dw0, out bool complete)
    {
        dw0 = 0;
        complete = true;
        switch ((NvmeAdminOpcode)c.Opcode)
        {
            case NvmeAdminOpcode.Identify:
                return Identify(in c);
            case NvmeAdminOpcode.CreateIoCompletionQueue:
                return CreateIoCq(in c);
            case NvmeAdminOpcode.CreateIoSubmissionQueue:
                return CreateIoSq(in c);
            case NvmeAdminOpcode.DeleteIoSubmissionQueue:
                return DeleteIoSq(in c);
            case NvmeAdminOpcode.DeleteIoCompletionQueue:
                return DeleteIoCq(in c);
            case NvmeAdminOpcode.SetFeatures:
                return SetFeatures(in c, out dw0);
            case NvmeAdminOpcode.GetFeatures:
                return GetFeatures(in c, out dw0);
            case NvmeAdminOpcode.GetLogPage:
                return GetLogPage(in c);
            case NvmeAdminOpcode.AsynchronousEventRequest:
                if (State.OutstandingAers.Count > Aerl)
                {
                    return NvmeStatus.AsyncEventRequestLimitExceeded;
                }
                if (State.OutstandingAers.Contains(c.Cid))
                {
                    return NvmeStatus.CommandIdConflict;
                }
                State.OutstandingAers.Add(c.Cid);
                complete = false;
                DeliverEventsLocked();
                return NvmeStatus.Success;
            case NvmeAdminOpcode.Abort:
                // CQE DW0 bit 0: 0 = the command was aborted, 1 = it was not (§5.1).
                dw0 = Abort((ushort)c.Cdw10, (ushort)(c.Cdw10 >> 16)) ? 0u : 1u;
                return NvmeStatus.Success;
            case NvmeAdminOpcode.KeepAlive:
                return NvmeStatus.Success;
            case NvmeAdminOpcode.DoorbellBufferConfig:
                return DoorbellBufferConfig(in c);
            case NvmeAdminOpcode.NamespaceAttachment when IsPrimary:
                return NamespaceAttachment(in c);
            case NvmeAdminOpcode.NamespaceManagement when IsPrimary:
                return NamespaceManagement(in c, out dw0);
            case NvmeAdminOpcode.VirtualizationManagement when IsPrimary:
                return VirtualizationManagement(in c, out dw0);
            case NvmeAdminOpcode.MigrationSend or NvmeAdminOpcode.MigrationReceive or NvmeAdminOpcode.TrackSend or NvmeAdminOpcode.TrackReceive
                or NvmeAdminOpcode.ControllerDataQueue when IsPrimary:
                return _subsystem.Migration.Execute(this, in c, out dw0);
            default:
                return NvmeStatus.InvalidOpcode;
        }
    }

    /// <summary>
    /// Abort (§5.1) of command <paramref name="cid"/> on SQ <paramref name="sqid"/>. Commands run to completion once
    /// fetched, so only two kinds can still be aborted: an outstanding Asynchronous Event Request (completed here with
    /// Command Abort Requested) and a command submitted (between the SQ's head and tail) but not yet fetched, e.g. while
    /// its CQ is full (its slot is marked; it completes with Command Abort Requested when fetched, without running).
    /// Anything else (already completed, unknown CID or SQ) is "not aborted". Lock held.
    /// </summary>
    private bool Abort(ushort sqid, ushort cid)
    {
        var s = State;
        if (sqid == 0 && s.OutstandingAers.Contains(cid) && s.Sqs[0] is { } asq && s.Cqs[0] is { } acq && FreeCqSlots(acq) >= 2)
        {
            // Two free slots: one for the AER's completion, one for the Abort's own.
            s.OutstandingAers.Remove(cid);
            PostCompletion(acq, asq, cid, NvmeStatus.AbortRequested, 0);
            return true;
        }
        if (sqid > NvmeControllerState.MaxQueueId || s.Sqs[sqid] is not { } sq || s.AbortedSlots.Count >= NvmeControllerState.MaxAbortedSlots)
        {
            return false;
        }
        if (sqid != 0 && s.ShadowDoorbellBase != 0)
        {
            ReadShadow(sq);
        }
        Span<byte> raw = stackalloc byte[SubmissionQueueEntry.Size];
        for (int slot = sq.Head; slot != sq.Tail; slot = (slot + 1) % sq.Entries)
        {
            if (!_dma!.TryRead(sq.BaseAddress + ((ulong)slot * SubmissionQueueEntry.Size), raw))
            {
                return false;
            }
            if (BinaryPrimitives.ReadUInt16LittleEndian(raw[2..]) == cid && !s.AbortedSlots.Contains((sqid, (ushort)slot)))
            {
                s.AbortedSlots.Add((sqid, (ushort)slot));
                return true;
            }
        }
        return false;
    }

    private static int FreeCqSlots(CompletionQueueState cq) => cq.Entries - 1 - ((cq.Tail - cq.Head + cq.Entries) % cq.Entries);

    // ---- data transfer helpers ----

    /// <summary>Sends <paramref name="data"/> to the host buffer of the command (PRP1/PRP2).</summary>
    internal NvmeStatus ToHost(in SubmissionQueueEntry c, ReadOnlySpan<byte> data)
    {
        var st = PrpList.Build(_dma!, c.Prp1, c.Prp2, data.Length, _segments);
        if (!st.IsSuccess)
        {
            return st;
        }
        return PrpList.CopyToHost(_dma!, _segments, data) ? NvmeStatus.Success : NvmeStatus.DataTransferError;
    }

    /// <summary>Reads the command's host buffer into <paramref name="data"/>.</summary>
    internal NvmeStatus FromHost(in SubmissionQueueEntry c, Span<byte> data)
    {
        var st = PrpList.Build(_dma!, c.Prp1, c.Prp2, data.Length, _segments);
        if (!st.IsSuccess)
        {
            return st;
        }
        return PrpList.CopyFromHost(_dma!, _segments, data) ? NvmeStatus.Success : NvmeStatus.DataTransferError;
    }

    // ---- Identify ----

    private NvmeStatus Identify(in SubmissionQueueEntry c)
    {
        byte[] buf = ArrayPool<byte>.Shared.Rent(4096);
        try
        {
            var page = buf.AsSpan(0, 4096);
            page.Clear();
            var cns = (IdentifyCns)(byte)c.Cdw10;
            ushort cntid = (ushort)(c.Cdw10 >> 16);
            NvmeStatus st;
            switch (cns)
            {
                case IdentifyCns.Controller:
                    IdentifyControllerData().WriteTo(page);
                    st = NvmeStatus.Success;
                    break;
                case IdentifyCns.Namespace:
                    st = IdentifyNamespaceData(c.Nsid, page);
                    break;
                case IdentifyCns.ActiveNamespaceList:
                    st = ActiveNamespaceList(c.Nsid, page);
                    break;
                case IdentifyCns.NamespaceIdDescriptorList:
                    st = NamespaceIdDescriptors(c.Nsid, page);
                    break;
                case IdentifyCns.PrimaryControllerCapabilities when IsPrimary:
                    _subsystem.PrimaryCapabilities().WriteTo(page);
                    st = NvmeStatus.Success;
                    break;
                case IdentifyCns.SecondaryControllerList when IsPrimary:
                    SecondaryControllerEntry.WriteList(page, _subsystem.SecondaryList(cntid));
                    st = NvmeStatus.Success;
                    break;
                case IdentifyCns.ControllerList:
                    ControllerList.Write(page, _subsystem.ControllerIds(cntid));
                    st = NvmeStatus.Success;
                    break;
                case IdentifyCns.AttachedControllerList when IsPrimary:
                    st = _subsystem.AttachedControllerList(c.Nsid, cntid, page);
                    break;
                case IdentifyCns.SupportedControllerStateFormats when IsPrimary:
                    NvmeMigrationController.WriteSupportedFormats(page);
                    st = NvmeStatus.Success;
                    break;
                default:
                    st = NvmeStatus.InvalidField;
                    break;
            }
            return st.IsSuccess ? ToHost(in c, page) : st;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buf);
        }
    }

    /// <summary>The Identify Controller data of this controller.</summary>
    public IdentifyController IdentifyControllerData()
    {
        var o = _subsystem.Options;
        var oacs = OptionalAdminCommands.DoorbellBufferConfig;
        if (IsPrimary)
        {
            oacs |= OptionalAdminCommands.NamespaceManagement | OptionalAdminCommands.VirtualizationManagement
                | OptionalAdminCommands.HostManagedLiveMigration;
        }
        return new IdentifyController
        {
            Vid = o.VendorId,
            Ssvid = o.VendorId,
            Sn = o.SerialNumber,
            Mn = o.ModelNumber,
            Fr = o.FirmwareRevision,
            Rab = 6,
            Ieee = 0x000000,
            // CMIC bit 1: the subsystem may have several controllers; bit 2: this controller belongs to an SR-IOV VF.
            Cmic = (byte)(IsPrimary ? 0x02 : 0x06),
            Mdts = Mdts,
            Cntlid = Cntlid,
            Ver = Version,
            Oaes = 1 << 8, // Namespace Attribute Notices
            Cntrltype = 1,
            Oacs = oacs,
            Acl = NvmeControllerState.MaxAbortedSlots - 1,
            Aerl = Aerl,
            Frmw = 0x03, // slot 1 read-only, one slot
            Lpa = 0,
            Elpe = NvmeControllerState.ErrorLogDepth - 1,
            Npss = 0,
            Wctemp = 343,
            Cctemp = 358,
            Tnvmcap = _subsystem.TotalCapacityBytes,
            Kas = 0,
            Sqes = 0x66,
            Cqes = 0x44,
            Maxcmd = (ushort)(Capabilities.Mqes + 1),
            Nn = NvmeSubsystem.MaxNamespaces,
            Oncs = SupportedNvmCommands,
            Vwc = 1,
            Sgls = 0,
            Mnan = 0,
            Subnqn = o.Subnqn,
            Psd0MaxPower = 2500,
        };
    }

    private NvmeStatus IdentifyNamespaceData(uint nsid, Span<byte> page)
    {
        if (nsid == 0 || nsid == 0xFFFFFFFF || nsid > NvmeSubsystem.MaxNamespaces)
        {
            return NvmeStatus.InvalidNamespaceOrFormat;
        }
        var ns = _subsystem.GetAttachedNamespace(Cntlid, nsid);
        if (ns is not null)
        {
            ns.Identify(_subsystem.IsShared(nsid)).WriteTo(page);
        }
        // A valid but inactive NSID returns a zero-filled structure (§5.17.2.1).
        return NvmeStatus.Success;
    }

    private NvmeStatus ActiveNamespaceList(uint start, Span<byte> page)
    {
        if (start >= 0xFFFFFFFE)
        {
            return NvmeStatus.InvalidNamespaceOrFormat;
        }
        int i = 0;
        foreach (uint id in _subsystem.AttachedNamespaceIds(Cntlid))
        {
            if (id > start && i < 1024)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(page[(4 * i++)..], id);
            }
        }
        return NvmeStatus.Success;
    }

    private NvmeStatus NamespaceIdDescriptors(uint nsid, Span<byte> page)
    {
        var ns = _subsystem.GetAttachedNamespace(Cntlid, nsid);
        if (ns is null)
        {
            return NvmeStatus.InvalidNamespaceOrFormat;
        }
        byte[] eui = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(eui, ns.Eui64);
        byte[] nguid = new byte[16];
        BinaryPrimitives.WriteUInt128BigEndian(nguid, ns.Nguid);
        int o = 0;
        foreach (var d in new[] { new NamespaceIdDescriptor(NamespaceIdType.Eui64, eui), new NamespaceIdDescriptor(NamespaceIdType.Nguid, nguid), new NamespaceIdDescriptor(NamespaceIdType.Csi, [0]) })
        {
            d.WriteTo(page[o..]);
            o += d.Size;
        }
        return NvmeStatus.Success;
    }

    // ---- queues ----

    /// <summary>I/O queue pairs this controller can allocate (VQ resources minus the admin queue).</summary>
    internal int MaxIoQueues => Math.Clamp(QueueResources - 1, 0, NvmeControllerState.MaxQueueId);

    private int EffectiveSqs => State.AllocatedSqs != 0 ? State.AllocatedSqs : MaxIoQueues;
    private int EffectiveCqs => State.AllocatedCqs != 0 ? State.AllocatedCqs : MaxIoQueues;

    private NvmeStatus CheckQueueMemory(ulong baseAddr, int entries, int entrySize)
    {
        Span<byte> probe = stackalloc byte[4];
        if ((baseAddr & (PrpList.PageSize - 1)) != 0)
        {
            return NvmeStatus.InvalidField;
        }
        // The queue must be reachable now; if the host unmaps it later, fetch/post failures set CSTS.CFS.
        return _dma!.TryRead(baseAddr, probe) && _dma.TryRead(baseAddr + (ulong)((entries * entrySize) - 4), probe)
            ? NvmeStatus.Success
            : NvmeStatus.InvalidField;
    }

    private NvmeStatus CreateIoCq(in SubmissionQueueEntry c)
    {
        var s = State;
        int qid = (int)(c.Cdw10 & 0xFFFF);
        int entries = (int)(c.Cdw10 >> 16) + 1;
        bool pc = (c.Cdw11 & 1) != 0;
        bool ien = (c.Cdw11 & 2) != 0;
        ushort iv = (ushort)(c.Cdw11 >> 16);
        if (qid == 0 || qid > EffectiveCqs || s.Cqs[qid] is not null)
        {
            return NvmeStatus.InvalidQueueIdentifier;
        }
        if (entries < 2 || entries > Capabilities.Mqes + 1)
        {
            return NvmeStatus.InvalidQueueSize;
        }
        if (!pc || new ControllerConfiguration(s.Cc).Iocqes != 4)
        {
            return NvmeStatus.InvalidField;
        }
        if (ien && iv >= Math.Min(VectorResources, _pendingVectors.Length))
        {
            return NvmeStatus.InvalidInterruptVector;
        }
        var mem = CheckQueueMemory(c.Prp1, entries, CompletionQueueEntry.Size);
        if (!mem.IsSuccess)
        {
            return mem;
        }
        s.Cqs[qid] = new CompletionQueueState { Qid = (ushort)qid, BaseAddress = c.Prp1, Entries = entries, InterruptsEnabled = ien, Vector = iv };
        s.QueueCountLocked = true;
        return NvmeStatus.Success;
    }

    private NvmeStatus CreateIoSq(in SubmissionQueueEntry c)
    {
        var s = State;
        int qid = (int)(c.Cdw10 & 0xFFFF);
        int entries = (int)(c.Cdw10 >> 16) + 1;
        bool pc = (c.Cdw11 & 1) != 0;
        int cqid = (int)(c.Cdw11 >> 16);
        if (qid == 0 || qid > EffectiveSqs || s.Sqs[qid] is not null)
        {
            return NvmeStatus.InvalidQueueIdentifier;
        }
        if (cqid == 0 || cqid > NvmeControllerState.MaxQueueId || s.Cqs[cqid] is null)
        {
            return NvmeStatus.CompletionQueueInvalid;
        }
        if (entries < 2 || entries > Capabilities.Mqes + 1)
        {
            return NvmeStatus.InvalidQueueSize;
        }
        if (!pc || new ControllerConfiguration(s.Cc).Iosqes != 6)
        {
            return NvmeStatus.InvalidField;
        }
        var mem = CheckQueueMemory(c.Prp1, entries, SubmissionQueueEntry.Size);
        if (!mem.IsSuccess)
        {
            return mem;
        }
        s.Sqs[qid] = new SubmissionQueueState
        {
            Qid = (ushort)qid, BaseAddress = c.Prp1, Entries = entries, Cqid = (ushort)cqid, Priority = (byte)((c.Cdw11 >> 1) & 3),
        };
        s.QueueCountLocked = true;
        if (s.EventIdxBase != 0)
        {
            WriteEventIdx(armed: !PollerActiveLocked);
        }
        return NvmeStatus.Success;
    }

    private NvmeStatus DeleteIoSq(in SubmissionQueueEntry c)
    {
        int qid = (int)(c.Cdw10 & 0xFFFF);
        if (qid == 0 || qid > NvmeControllerState.MaxQueueId || State.Sqs[qid] is null)
        {
            return NvmeStatus.InvalidQueueIdentifier;
        }
        // Nothing of this SQ is in flight (commands run to completion when fetched), so no "aborted due to SQ deletion".
        State.Sqs[qid] = null;
        State.AbortedSlots.RemoveAll(a => a.Sqid == qid);
        return NvmeStatus.Success;
    }

    private NvmeStatus DeleteIoCq(in SubmissionQueueEntry c)
    {
        int qid = (int)(c.Cdw10 & 0xFFFF);
        if (qid == 0 || qid > NvmeControllerState.MaxQueueId || State.Cqs[qid] is null)
        {
            return NvmeStatus.InvalidQueueIdentifier;
        }
        foreach (var sq in State.Sqs)
        {
            if (sq is not null && sq.Qid != 0 && sq.Cqid == qid)
            {
                return NvmeStatus.InvalidQueueDeletion;
            }
        }
        State.Cqs[qid] = null;
        return NvmeStatus.Success;
    }

    // ---- features ----

    private NvmeStatus SetFeatures(in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        var s = State;
        if ((c.Cdw10 & (1u << 31)) != 0)
        {
            return NvmeStatus.FeatureNotSaveable;
        }
        switch ((FeatureId)(byte)c.Cdw10)
        {
            case FeatureId.Arbitration:
                s.Arbitration = c.Cdw11;
                return NvmeStatus.Success;
            case FeatureId.VolatileWriteCache:
                bool wasOn = s.VolatileWriteCacheEnabled;
                s.VolatileWriteCacheEnabled = (c.Cdw11 & 1) != 0;
                if (wasOn && !s.VolatileWriteCacheEnabled)
                {
                    _subsystem.FlushNamespacesOf(Cntlid);
                }
                return NvmeStatus.Success;
            case FeatureId.NumberOfQueues:
                {
                    uint nsqr = c.Cdw11 & 0xFFFF;
                    uint ncqr = c.Cdw11 >> 16;
                    if (nsqr == 0xFFFF || ncqr == 0xFFFF)
                    {
                        return NvmeStatus.InvalidField;
                    }
                    if (s.QueueCountLocked)
                    {
                        return NvmeStatus.CommandSequenceError;
                    }
                    int max = Math.Max(MaxIoQueues, 1);
                    s.AllocatedSqs = (ushort)Math.Min(nsqr + 1, (uint)max);
                    s.AllocatedCqs = (ushort)Math.Min(ncqr + 1, (uint)max);
                    dw0 = NumberOfQueuesDw0();
                    return NvmeStatus.Success;
                }
            case FeatureId.InterruptCoalescing:
                s.InterruptCoalescing = c.Cdw11 & 0xFFFF;
                return NvmeStatus.Success;
            case FeatureId.AsynchronousEventConfiguration:
                s.AsyncEventConfig = c.Cdw11;
                return NvmeStatus.Success;
            case FeatureId.KeepAliveTimer:
                // KATO in ms; recorded (Identify KAS = 0: this PCIe controller does not enforce a keep-alive timeout).
                s.KeepAliveTimer = c.Cdw11;
                return NvmeStatus.Success;
            case FeatureId.PowerManagement:
                // NPSS = 0: power state 0 is the only one (NVMe Base 2.0 §5.27.1.2).
                if ((c.Cdw11 & 0x1F) != 0)
                {
                    return NvmeStatus.InvalidField;
                }
                s.PowerManagement = c.Cdw11 & 0xFF;
                return NvmeStatus.Success;
            case FeatureId.TemperatureThreshold:
                return SetTemperatureThreshold(s, c.Cdw11);
            case FeatureId.ErrorRecovery:
                // DULBE needs deallocated-block errors (NSFEAT bit 2), which our namespaces do not report.
                if ((c.Cdw11 & (1u << 16)) != 0)
                {
                    return NvmeStatus.InvalidField;
                }
                s.ErrorRecovery = c.Cdw11 & 0xFFFF;
                return NvmeStatus.Success;
            case FeatureId.InterruptVectorConfiguration:
                {
                    if (!TryInterruptVector(c.Cdw11, out ulong bit))
                    {
                        return NvmeStatus.InvalidField;
                    }
                    bool cd = (c.Cdw11 & (1u << 16)) != 0;
                    s.CoalescingDisabledVectors = cd ? s.CoalescingDisabledVectors | bit : s.CoalescingDisabledVectors & ~bit;
                    return NvmeStatus.Success;
                }
            case FeatureId.WriteAtomicityNormal:
                s.WriteAtomicityNormal = c.Cdw11 & 1;
                return NvmeStatus.Success;
            case FeatureId.ControllerDataQueue when IsPrimary:
                return _subsystem.Migration.SetCdqFeature(in c);
            default:
                return NvmeStatus.InvalidField;
        }
    }

    private uint NumberOfQueuesDw0()
    {
        int sq = Math.Max(EffectiveSqs, 1);
        int cq = Math.Max(EffectiveCqs, 1);
        return (uint)(sq - 1) | ((uint)(cq - 1) << 16);
    }

    private NvmeStatus GetFeatures(in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        var s = State;
        var sel = (FeatureSelect)((c.Cdw10 >> 8) & 7);
        var fid = (FeatureId)(byte)c.Cdw10;
        if (sel == FeatureSelect.SupportedCapabilities)
        {
            // Bit 2: changeable; nothing is saveable or namespace specific.
            dw0 = fid is FeatureId.Arbitration or FeatureId.VolatileWriteCache or FeatureId.NumberOfQueues
                or FeatureId.InterruptCoalescing or FeatureId.AsynchronousEventConfiguration or FeatureId.KeepAliveTimer
                or FeatureId.PowerManagement or FeatureId.TemperatureThreshold or FeatureId.ErrorRecovery
                or FeatureId.InterruptVectorConfiguration or FeatureId.WriteAtomicityNormal ? 4u : 0u;
            return dw0 != 0 ? NvmeStatus.Success : NvmeStatus.InvalidField;
        }
        if ((int)sel > 3)
        {
            return NvmeStatus.InvalidField;
        }
        bool current = sel == FeatureSelect.Current;
        switch (fid)
        {
            case FeatureId.Arbitration:
                dw0 = current ? s.Arbitration : 0;
                return NvmeStatus.Success;
            case FeatureId.VolatileWriteCache:
                dw0 = !current || s.VolatileWriteCacheEnabled ? 1u : 0u;
                return NvmeStatus.Success;
            case FeatureId.NumberOfQueues:
                dw0 = NumberOfQueuesDw0();
                return NvmeStatus.Success;
            case FeatureId.InterruptCoalescing:
                dw0 = current ? s.InterruptCoalescing : 0;
                return NvmeStatus.Success;
            case FeatureId.AsynchronousEventConfiguration:
                dw0 = current ? s.AsyncEventConfig : 0;
                return NvmeStatus.Success;
            case FeatureId.KeepAliveTimer:
                dw0 = current ? s.KeepAliveTimer : 0;
                return NvmeStatus.Success;
            case FeatureId.PowerManagement:
                dw0 = current ? s.PowerManagement : 0;
                return NvmeStatus.Success;
            case FeatureId.TemperatureThreshold:
                return GetTemperatureThreshold(s, c.Cdw11, current, out dw0);
            case FeatureId.ErrorRecovery:
                dw0 = current ? s.ErrorRecovery : 0;
                return NvmeStatus.Success;
            case FeatureId.InterruptVectorConfiguration:
                {
                    if (!TryInterruptVector(c.Cdw11, out ulong bit))
                    {
                        return NvmeStatus.InvalidField;
                    }
                    dw0 = (c.Cdw11 & 0xFFFF) | (current && (s.CoalescingDisabledVectors & bit) != 0 ? 1u << 16 : 0);
                    return NvmeStatus.Success;
                }
            case FeatureId.WriteAtomicityNormal:
                dw0 = current ? s.WriteAtomicityNormal : 0;
                return NvmeStatus.Success;
            case FeatureId.ControllerDataQueue when IsPrimary:
                return _subsystem.Migration.GetCdqFeature(this, in c, out dw0);
            default:
                return NvmeStatus.InvalidField;
        }
    }

    /// <summary>
    /// Interrupt Vector Configuration CDW11 IV [15:0]: valid below the controller's vector resources (and 64, the width
    /// of <see cref="NvmeControllerState.CoalescingDisabledVectors"/>); <paramref name="bit"/> is its CD mask bit.
    /// </summary>
    private bool TryInterruptVector(uint cdw11, out ulong bit)
    {
        uint iv = cdw11 & 0xFFFF;
        bool ok = iv < (uint)Math.Max(VectorResources, 1) && iv < 64;
        bit = ok ? 1UL << (int)iv : 0;
        return ok;
    }

    // Temperature Threshold CDW11 (NVMe Base 2.0 §5.27.1.4): TMPTH [15:0] kelvin, TMPSEL [19:16] (0 = composite;
    // sensors 1-8 are not implemented → Invalid Field), THSEL [21:20] (0 over, 1 under).
    private static NvmeStatus SetTemperatureThreshold(NvmeControllerState s, uint cdw11)
    {
        uint sel = (cdw11 >> 16) & 0xF, th = (cdw11 >> 20) & 3;
        if (sel != 0 || th > 1)
        {
            return NvmeStatus.InvalidField;
        }
        if (th == 0)
        {
            s.OverTemperatureThreshold = (ushort)cdw11;
        }
        else
        {
            s.UnderTemperatureThreshold = (ushort)cdw11;
        }
        return NvmeStatus.Success;
    }

    private static NvmeStatus GetTemperatureThreshold(NvmeControllerState s, uint cdw11, bool current, out uint dw0)
    {
        dw0 = 0;
        uint sel = (cdw11 >> 16) & 0xF, th = (cdw11 >> 20) & 3;
        if (sel != 0 || th > 1)
        {
            return NvmeStatus.InvalidField;
        }
        dw0 = th == 0 ? (current ? s.OverTemperatureThreshold : NvmeControllerState.DefaultOverTemperature) : (current ? s.UnderTemperatureThreshold : 0u);
        return NvmeStatus.Success;
    }

    // ---- log pages ----

    private NvmeStatus GetLogPage(in SubmissionQueueEntry c)
    {
        var s = State;
        var lid = (LogPageId)(byte)c.Cdw10;
        bool rae = (c.Cdw10 & (1u << 15)) != 0;
        long numd = ((long)(c.Cdw11 & 0xFFFF) << 16 | (c.Cdw10 >> 16)) + 1;
        ulong offset = c.Cdw12_13;
        long len = numd * 4;
        if (len > MaxTransferBytes || (offset & 3) != 0)
        {
            return NvmeStatus.InvalidField;
        }
        byte[] page;
        AsyncEventType? clears = null;
        switch (lid)
        {
            case LogPageId.ErrorInformation:
                page = new byte[NvmeControllerState.ErrorLogDepth * ErrorInformationEntry.Size];
                for (int i = 0; i < s.ErrorLog.Count; i++)
                {
                    s.ErrorLog[i].WriteTo(page.AsSpan(i * ErrorInformationEntry.Size));
                }
                clears = AsyncEventType.ErrorStatus;
                break;
            case LogPageId.SmartHealth:
                page = new byte[SmartHealthLog.Size];
                new SmartHealthLog
                {
                    CompositeTemperature = 308,
                    AvailableSpare = 100,
                    AvailableSpareThreshold = 10,
                    DataUnitsRead = (s.BlocksRead512 + 999) / 1000,
                    DataUnitsWritten = (s.BlocksWritten512 + 999) / 1000,
                    HostReadCommands = s.HostReadCommands,
                    HostWriteCommands = s.HostWriteCommands,
                    PowerCycles = 1,
                    ErrorLogEntries = s.ErrorCount,
                }.WriteTo(page);
                clears = AsyncEventType.SmartHealthStatus;
                break;
            case LogPageId.FirmwareSlot:
                page = new byte[FirmwareSlotLog.Size];
                new FirmwareSlotLog(1, _subsystem.Options.FirmwareRevision).WriteTo(page);
                break;
            case LogPageId.ChangedNamespaceList:
                page = new byte[4096];
                _subsystem.TakeChangedNamespaces(Cntlid, page);
                clears = AsyncEventType.Notice;
                break;
            default:
                return NvmeStatus.InvalidLogPage;
        }
        if (offset > (ulong)page.Length)
        {
            return NvmeStatus.InvalidField;
        }
        byte[] outBuf = new byte[len];
        int avail = (int)Math.Min((ulong)len, (ulong)page.Length - offset);
        page.AsSpan((int)offset, avail).CopyTo(outBuf);
        var st = ToHost(in c, outBuf);
        if (st.IsSuccess && !rae && clears is { } t)
        {
            // Reading the log page (without Retain Asynchronous Event) re-enables events of its type; events that
            // happened meanwhile were kept and are reported now.
            s.MaskedEventTypes &= (byte)~(1 << (int)t);
            _deliverAfterCompletion = true;
        }
        return st;
    }

    // ---- Doorbell Buffer Config ----

    private NvmeStatus DoorbellBufferConfig(in SubmissionQueueEntry c)
    {
        Span<byte> probe = stackalloc byte[8];
        if (c.Prp1 == 0 || c.Prp2 == 0 || (c.Prp1 & (PrpList.PageSize - 1)) != 0 || (c.Prp2 & (PrpList.PageSize - 1)) != 0
            || c.Prp1 == c.Prp2
            || !_dma!.TryRead(c.Prp1, probe) || !_dma.TryRead(c.Prp1 + PrpList.PageSize - 8, probe)
            || !_dma.TryRead(c.Prp2, probe) || !_dma.TryWriteUInt32(c.Prp2 + PrpList.PageSize - 4, 0))
        {
            return NvmeStatus.InvalidField;
        }
        State.ShadowDoorbellBase = c.Prp1;
        State.EventIdxBase = c.Prp2;
        if (_pollingAllowed && CreatePollerLocked())
        {
            // The host is busy configuring queues: start in the spin phase.
            _poller!.Wake(busy: true);
        }
        WriteEventIdx(armed: !PollerActiveLocked);
        return NvmeStatus.Success;
    }

    // ---- primary-only management ----

    private NvmeStatus NamespaceAttachment(in SubmissionQueueEntry c)
    {
        int sel = (int)(c.Cdw10 & 0xF);
        if (sel > 1)
        {
            return NvmeStatus.InvalidField;
        }
        byte[] list = new byte[4096];
        var st = FromHost(in c, list);
        if (!st.IsSuccess)
        {
            return st;
        }
        if (!ControllerList.TryRead(list, out var ids))
        {
            return NvmeStatus.ControllerListInvalid;
        }
        return sel == 0 ? _subsystem.AttachNamespace(c.Nsid, ids) : _subsystem.DetachNamespace(c.Nsid, ids);
    }

    /// <summary>
    /// Namespace Management (0Dh): SEL 0 create from the host's Identify Namespace data (NSZE, FLBAS; DW0 = new NSID),
    /// SEL 1 delete NSID (0xFFFFFFFF = all).
    /// </summary>
    private NvmeStatus NamespaceManagement(in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        switch (c.Cdw10 & 0xF)
        {
            case 0:
                {
                    byte[] data = new byte[IdentifyNamespace.Size];
                    var st = FromHost(in c, data);
                    if (!st.IsSuccess)
                    {
                        return st;
                    }
                    Vmig.Spec.Nvme.IdentifyNamespace.TryRead(data, out var want);
                    int fmt = want.Flbas & 0xF;
                    if (fmt >= NvmeNamespace.LbaFormats.Count)
                    {
                        return NvmeStatus.InvalidFormat;
                    }
                    st = _subsystem.CreateNamespace(want.Nsze, NvmeNamespace.LbaFormats[fmt].DataSize, out uint nsid);
                    dw0 = nsid;
                    return st;
                }
            case 1:
                if (c.Nsid == 0xFFFFFFFF)
                {
                    foreach (uint id in _subsystem.NamespaceIds())
                    {
                        _subsystem.DeleteNamespace(id);
                    }
                    return NvmeStatus.Success;
                }
                return _subsystem.DeleteNamespace(c.Nsid);
            default:
                return NvmeStatus.InvalidField;
        }
    }

    private NvmeStatus VirtualizationManagement(in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        var act = (VirtualizationAction)(c.Cdw10 & 0xF);
        var rt = (VirtualizationResource)((c.Cdw10 >> 8) & 7);
        ushort cntlid = (ushort)(c.Cdw10 >> 16);
        ushort nr = (ushort)c.Cdw11;
        return _subsystem.VirtualizationManagement(act, rt, cntlid, nr, out dw0);
    }
}
