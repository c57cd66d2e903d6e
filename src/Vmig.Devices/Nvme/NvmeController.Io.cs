using System.Buffers;
using Vmig.Spec.Nvme;

namespace Vmig.Devices.Nvme;

/// <summary>NVM command set I/O commands (NVM Command Set Specification 1.x §3).</summary>
public sealed partial class NvmeController
{
    private NvmeStatus ExecuteIo(in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        var op = (NvmeIoOpcode)c.Opcode;
        if (op == NvmeIoOpcode.Flush)
        {
            return Flush(c.Nsid);
        }
        if (op is not (NvmeIoOpcode.Read or NvmeIoOpcode.Write or NvmeIoOpcode.Compare or NvmeIoOpcode.WriteZeroes or NvmeIoOpcode.DatasetManagement))
        {
            return NvmeStatus.InvalidOpcode;
        }
        var ns = _subsystem.GetAttachedNamespace(Cntlid, c.Nsid);
        if (ns is null)
        {
            return NvmeStatus.InvalidNamespaceOrFormat;
        }
        if (op == NvmeIoOpcode.DatasetManagement)
        {
            return DatasetManagement(in c, ns);
        }
        ulong slba = c.Cdw10_11;
        ulong nlb = (c.Cdw12 & 0xFFFF) + 1UL;
        if (!ns.Contains(slba, nlb))
        {
            return NvmeStatus.LbaOutOfRange;
        }
        var s = State;
        if (op == NvmeIoOpcode.WriteZeroes)
        {
            // DEAC (CDW12 bit 25, DLFEAT bit 3): deallocate as well; the blocks read as zeroes either way.
            if ((c.Cdw12 & (1u << 25)) != 0)
            {
                ns.Deallocate(slba, nlb);
            }
            else
            {
                ns.WriteZeroes(slba, nlb);
            }
            LogUserDataChange(ns.Nsid, slba, nlb);
            s.HostWriteCommands++;
            s.BlocksWritten512 += nlb * (ulong)ns.LbaSize / 512;
            return NvmeStatus.Success;
        }
        long bytes = (long)nlb * ns.LbaSize;
        if (bytes > MaxTransferBytes)
        {
            return NvmeStatus.InvalidField;
        }
        int len = (int)bytes;
        var st = PrpList.Build(_dma!, c.Prp1, c.Prp2, len, _segments);
        if (!st.IsSuccess)
        {
            return st;
        }
        if (_segments.Count == 1 && op is (NvmeIoOpcode.Read or NvmeIoOpcode.Write) && TryTransferInPlace(op, ns, slba, _segments[0].Address, len))
        {
            return CompleteReadWrite(in c, op, ns, slba, nlb, len);
        }
        byte[] buf = ArrayPool<byte>.Shared.Rent(len);
        try
        {
            var data = buf.AsSpan(0, len);
            switch (op)
            {
                case NvmeIoOpcode.Read:
                    ns.Read(slba, data);
                    if (!PrpList.CopyToHost(_dma!, _segments, data))
                    {
                        return NvmeStatus.DataTransferError;
                    }
                    return CompleteReadWrite(in c, op, ns, slba, nlb, len);
                case NvmeIoOpcode.Write:
                    if (!PrpList.CopyFromHost(_dma!, _segments, data))
                    {
                        return NvmeStatus.DataTransferError;
                    }
                    ns.Write(slba, data);
                    return CompleteReadWrite(in c, op, ns, slba, nlb, len);
                default: // Compare
                    if (!PrpList.CopyFromHost(_dma!, _segments, data))
                    {
                        return NvmeStatus.DataTransferError;
                    }
                    byte[] media = ArrayPool<byte>.Shared.Rent(len);
                    try
                    {
                        ns.Read(slba, media.AsSpan(0, len));
                        s.HostReadCommands++;
                        return media.AsSpan(0, len).SequenceEqual(data) ? NvmeStatus.Success : NvmeStatus.CompareFailure;
                    }
                    finally
                    {
                        ArrayPool<byte>.Shared.Return(media);
                    }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buf);
        }
    }

    /// <summary>
    /// A one-segment Read or Write with the file I/O done straight on guest memory the DMA space lends (pread into it,
    /// pwrite from it), saving a bounce buffer and a copy per command. False (nothing done) when the space does not
    /// lend that range; the caller then copies.
    /// </summary>
    private bool TryTransferInPlace(NvmeIoOpcode op, NvmeNamespace ns, ulong slba, ulong address, int len) =>
        op == NvmeIoOpcode.Read
            ? _dma!.TryLendWritable(address, len, (ns, slba), static (span, a) => a.ns.Read(a.slba, span))
            : _dma!.TryLendReadable(address, len, (ns, slba), static (span, a) => a.ns.Write(a.slba, span));

    /// <summary>The accounting and write-back rules shared by both Read/Write data paths, after the data moved.</summary>
    private NvmeStatus CompleteReadWrite(in SubmissionQueueEntry c, NvmeIoOpcode op, NvmeNamespace ns, ulong slba, ulong nlb, int len)
    {
        var s = State;
        if (op == NvmeIoOpcode.Read)
        {
            s.HostReadCommands++;
            s.BlocksRead512 += (ulong)len / 512;
            return NvmeStatus.Success;
        }
        LogUserDataChange(ns.Nsid, slba, nlb);
        bool fua = (c.Cdw12 & (1u << 30)) != 0;
        if (fua || !s.VolatileWriteCacheEnabled)
        {
            ns.Flush();
        }
        s.HostWriteCommands++;
        s.BlocksWritten512 += (ulong)len / 512;
        return NvmeStatus.Success;
    }

    /// <summary>Storage pre-copy: tell the primary's Controller Data Queues (if logging for us) which blocks changed.</summary>
    private void LogUserDataChange(uint nsid, ulong slba, ulong nlb)
    {
        if (!IsPrimary)
        {
            _subsystem.Migration.DataQueues.LogChange(Cntlid, nsid, slba, nlb);
        }
    }

    private NvmeStatus Flush(uint nsid)
    {
        if (nsid == 0xFFFFFFFF)
        {
            _subsystem.FlushNamespacesOf(Cntlid);
            return NvmeStatus.Success;
        }
        var ns = _subsystem.GetAttachedNamespace(Cntlid, nsid);
        if (ns is null)
        {
            return NvmeStatus.InvalidNamespaceOrFormat;
        }
        ns.Flush();
        return NvmeStatus.Success;
    }

    private NvmeStatus DatasetManagement(in SubmissionQueueEntry c, NvmeNamespace ns)
    {
        int nr = (int)(c.Cdw10 & 0xFF) + 1;
        bool deallocate = (c.Cdw11 & 4) != 0;
        byte[] raw = new byte[nr * DatasetManagementRange.Size];
        var st = FromHost(in c, raw);
        if (!st.IsSuccess)
        {
            return st;
        }
        if (!deallocate)
        {
            // Integral read/write hints (IDR/IDW) are advisory: nothing to do.
            return NvmeStatus.Success;
        }
        var ranges = new DatasetManagementRange[nr];
        for (int i = 0; i < nr; i++)
        {
            DatasetManagementRange.TryRead(raw.AsSpan(i * DatasetManagementRange.Size), out ranges[i]);
            if (!ns.Contains(ranges[i].Slba, ranges[i].Nlb))
            {
                // Validate every range before touching any block, so a bad list changes nothing.
                return NvmeStatus.LbaOutOfRange;
            }
        }
        foreach (var r in ranges)
        {
            if (r.Nlb != 0)
            {
                ns.Deallocate(r.Slba, r.Nlb);
                LogUserDataChange(ns.Nsid, r.Slba, r.Nlb);
            }
        }
        return NvmeStatus.Success;
    }
}
