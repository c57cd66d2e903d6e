using System.Buffers;
using System.Buffers.Binary;
using System.Numerics;
using Microsoft.Extensions.Logging;
using Vmig.Migration;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Transport;

namespace Vmig.VfioUser.Internal;

/// <summary>DEVICE_FEATURE, MIG_DATA_READ and MIG_DATA_WRITE (vfio-user.rst; kernel rules from vfio_main.c).</summary>
internal sealed partial class ServerSession
{
    /// <summary>Kernel limit on DMA logging ranges per START (PAGE_SIZE / sizeof(range) on 4 KiB pages).</summary>
    private const int MaxLoggingRanges = 256;

    private MigrationEndpoint Mig => _server.Migration;

    private FeatureSupport? SupportFor(ushort feature)
    {
        var caps = Mig.Caps;
        if (feature == VmigFeatures.PrecopyInfo)
        {
            return Mig.Driver is not null && caps.VmigPrecopyInfo && (Mig.Driver.Flags & MigrationFlags.PreCopy) != 0
                ? new FeatureSupport(FeatureOps.Get, 16) : null;
        }
        var f = (Migration.DeviceFeature)feature;
        return f switch
        {
            Migration.DeviceFeature.Migration or Migration.DeviceFeature.MigDeviceState when Mig.Driver is null => null,
            Migration.DeviceFeature.MigDataSize when Mig.Driver is null || !caps.VmigMigDataSize => null,
            _ => FeatureSupport.VfioUser(f),
        };
    }

    private int DeviceFeature(VfioUserConnection c, VfioUserMessage m)
    {
        if (!DeviceFeatureHead.TryRead(m.Payload, out var head))
        {
            return Errno.EINVAL;
        }
        int e = FeatureRequest.Validate(head.Argsz, head.Flags, SupportFor(head.Feature), out var action);
        if (e != 0)
        {
            return e;
        }
        var data = m.Payload[DeviceFeatureHead.WireSize..];
        if (action == FeatureAction.None)
        {
            c.SendReply(m.Header, m.Payload);
            return 0;
        }
        if (action == FeatureAction.Set && data.Length < (int)(FeatureSupport.VfioUser((Migration.DeviceFeature)head.Feature)?.MinPayloadSize ?? 0))
        {
            return Errno.EINVAL;
        }
        switch (head.Feature)
        {
            case (ushort)Migration.DeviceFeature.Migration:
                return ReplyGet(c, m, head, stackalloc byte[8], static (d, s) => BinaryPrimitives.WriteUInt64LittleEndian(d, (ulong)s.Mig.VisibleFlags), this);
            case (ushort)Migration.DeviceFeature.MigDeviceState when action == FeatureAction.Get:
                return ReplyGet(c, m, head, stackalloc byte[8], static (d, s) =>
                {
                    BinaryPrimitives.WriteUInt32LittleEndian(d, (uint)s.Mig.Driver!.State);
                    BinaryPrimitives.WriteInt32LittleEndian(d[4..], -1);
                }, this);
            case (ushort)Migration.DeviceFeature.MigDeviceState:
                return SetDeviceState(c, m, BinaryPrimitives.ReadUInt32LittleEndian(data));
            case (ushort)Migration.DeviceFeature.MigDataSize:
                return ReplyGet(c, m, head, stackalloc byte[8], static (d, s) => BinaryPrimitives.WriteUInt64LittleEndian(d, s.Mig.Driver!.GetStopCopySize()), this);
            case VmigFeatures.PrecopyInfo:
                e = Mig.Driver!.GetPrecopyInfo(out var info);
                if (e != 0)
                {
                    return e;
                }
                Span<byte> pi = stackalloc byte[16];
                BinaryPrimitives.WriteUInt64LittleEndian(pi, info.InitialBytes);
                BinaryPrimitives.WriteUInt64LittleEndian(pi[8..], info.DirtyBytes);
                return ReplyGet(c, m, head, pi, static (_, _) => { }, this);
            case (ushort)Migration.DeviceFeature.DmaLoggingStart:
                return LoggingStart(c, m, data);
            case (ushort)Migration.DeviceFeature.DmaLoggingStop:
                e = _dma.StopLogging();
                if (e == 0)
                {
                    c.SendReply(m.Header, m.Payload);
                }
                return e;
            case (ushort)Migration.DeviceFeature.DmaLoggingReport:
                return LoggingReport(c, m, head, data);
            default:
                return Errno.ENOTTY;
        }
    }

    private int ReplyGet(VfioUserConnection c, VfioUserMessage m, DeviceFeatureHead head, Span<byte> data, SpanAction fill, ServerSession self)
    {
        if (head.Argsz < DeviceFeatureHead.WireSize + (uint)data.Length)
        {
            return Errno.EINVAL;
        }
        fill(data, self);
        Span<byte> h = stackalloc byte[DeviceFeatureHead.WireSize];
        new DeviceFeatureHead((uint)(DeviceFeatureHead.WireSize + data.Length), head.Flags).WriteTo(h);
        c.SendReply(m.Header, h, data);
        return 0;
    }

    private delegate void SpanAction(Span<byte> data, ServerSession self);

    private int SetDeviceState(VfioUserConnection c, VfioUserMessage m, uint requested)
    {
        var target = (DeviceState)requested;
        if (requested >= MigrationStateMachine.StateCount
            || (!Mig.Caps.VmigP2P && target is DeviceState.RunningP2P or DeviceState.PreCopyP2P))
        {
            // Not offered to this client: an unsupported target, EINVAL with the state unchanged (vfio_main.c).
            return Errno.EINVAL;
        }
        int e = Mig.Driver!.SetState(target, out var reached);
        if (e != 0)
        {
            _logger.LogMigrationFailure(c.Name, target, reached, e);
            return e;
        }
        Span<byte> reply = stackalloc byte[16];
        m.Payload[..8].CopyTo(reply);
        BinaryPrimitives.WriteUInt32LittleEndian(reply[8..], (uint)reached);
        BinaryPrimitives.WriteInt32LittleEndian(reply[12..], -1);
        c.SendReply(m.Header, reply);
        return 0;
    }

    private int LoggingStart(VfioUserConnection c, VfioUserMessage m, ReadOnlySpan<byte> data)
    {
        ulong pageSize = BinaryPrimitives.ReadUInt64LittleEndian(data);
        uint n = BinaryPrimitives.ReadUInt32LittleEndian(data[8..]);
        if (n > MaxLoggingRanges)
        {
            return Errno.E2BIG;
        }
        if ((ulong)data.Length != 16 + (16UL * n))
        {
            return Errno.EINVAL;
        }
        // Our granule is 4 KiB pages or any larger power of two the client hints; smaller hints get 4 KiB.
        ulong granule = pageSize < 4096 || !BitOperations.IsPow2(pageSize) ? 4096 : pageSize;
        var ranges = new (ulong Iova, ulong Length)[n];
        for (int i = 0; i < n; i++)
        {
            ulong iova = BinaryPrimitives.ReadUInt64LittleEndian(data[(16 + (16 * i))..]);
            ulong len = BinaryPrimitives.ReadUInt64LittleEndian(data[(24 + (16 * i))..]);
            if (len == 0 || (iova & (granule - 1)) != 0 || (len & (granule - 1)) != 0)
            {
                return Errno.EINVAL;
            }
            if (iova + len < iova)
            {
                return Errno.EOVERFLOW;
            }
            ranges[i] = (iova, len);
        }
        Array.Sort(ranges);
        for (int i = 1; i < ranges.Length; i++)
        {
            if (ranges[i].Iova < ranges[i - 1].Iova + ranges[i - 1].Length)
            {
                return Errno.EINVAL;
            }
        }
        // Like libvfio-user we log every fd-backed window; the ranges only narrow what a report may ask.
        int e = _dma.StartLogging(granule);
        if (e != 0)
        {
            return e;
        }
        var reply = m.Payload.ToArray();
        BinaryPrimitives.WriteUInt64LittleEndian(reply.AsSpan(DeviceFeatureHead.WireSize), granule);
        c.SendReply(m.Header, reply);
        return 0;
    }

    private int LoggingReport(VfioUserConnection c, VfioUserMessage m, DeviceFeatureHead head, ReadOnlySpan<byte> data)
    {
        // A GET's argsz is the reply size it accepts; the request must still carry iova, length and page_size.
        if (data.Length < 24)
        {
            return Errno.EINVAL;
        }
        ulong iova = BinaryPrimitives.ReadUInt64LittleEndian(data);
        ulong length = BinaryPrimitives.ReadUInt64LittleEndian(data[8..]);
        ulong pageSize = BinaryPrimitives.ReadUInt64LittleEndian(data[16..]);
        if (length == 0 || pageSize < 4096 || !BitOperations.IsPow2(pageSize))
        {
            return Errno.EINVAL;
        }
        int e = DirtyBitmap.TryGetByteLength(iova, length, pageSize, out ulong bytes);
        if (e != 0)
        {
            return e;
        }
        if (bytes > Math.Min(_negotiated!.MaxDataXferSize, _peer!.MaxDataXferSize))
        {
            // The reply could not travel in one message; the client asks for smaller ranges.
            return Errno.E2BIG;
        }
        if (head.Argsz < DeviceFeatureHead.WireSize + 24 + bytes)
        {
            return Errno.EINVAL;
        }
        ulong[] words = ArrayPool<ulong>.Shared.Rent((int)(bytes / 8));
        try
        {
            var span = words.AsSpan(0, (int)(bytes / 8));
            e = _dma.Report(iova, length, pageSize, span);
            if (e != 0)
            {
                return e;
            }
            Span<byte> h = stackalloc byte[DeviceFeatureHead.WireSize + 24];
            new DeviceFeatureHead((uint)(DeviceFeatureHead.WireSize + 24 + bytes), head.Flags).WriteTo(h);
            data[..24].CopyTo(h[DeviceFeatureHead.WireSize..]);
            if (!BitConverter.IsLittleEndian)
            {
                throw new PlatformNotSupportedException("vfio-user bitmaps are host-endian u64; only little-endian hosts are supported");
            }
            c.SendReply(m.Header, h, System.Runtime.InteropServices.MemoryMarshal.AsBytes(span));
            return 0;
        }
        finally
        {
            ArrayPool<ulong>.Shared.Return(words);
        }
    }

    private uint MaxMigTransfer => Math.Min(_negotiated!.MaxDataXferSize, _peer!.MaxDataXferSize);

    private int MigDataRead(VfioUserConnection c, VfioUserMessage m)
    {
        if (Mig.Driver is null)
        {
            return Errno.EINVAL;
        }
        if (!MigDataHead.TryRead(m.Payload, out var r) || m.Length != MigDataHead.WireSize
            || r.Size > MaxMigTransfer || r.Argsz < MigDataHead.WireSize + (ulong)r.Size)
        {
            return Errno.EINVAL;
        }
        // Zero-copy: the reply goes out as the device's segments (device state, small headers) in one vectored sendmsg;
        // a device without IMigrationDataSource fills one pooled buffer instead.
        var segments = _gather ??= new MigrationGatherList();
        try
        {
            int e = Mig.Driver.ReadDataGather((int)r.Size, segments, out int n);
            if (e != 0)
            {
                return e;
            }
            Span<byte> head = stackalloc byte[MigDataHead.WireSize];
            new MigDataHead((uint)(MigDataHead.WireSize + n), (uint)n).WriteTo(head);
            c.SendReplyGather(m.Header, head, segments.Segments);
            return 0;
        }
        finally
        {
            segments.Clear();
        }
    }

    /// <summary>MIG_DATA_WRITE head checks (libvfio-user <c>handle_mig_data_write</c>): size ≤ the negotiated
    /// max_data_xfer_size, argsz ≥ 8 + size, and the payload after the head is exactly size bytes.</summary>
    private bool IsValidMigDataWrite(MigDataHead r, long dataBytes) =>
        r.Size <= MaxMigTransfer && r.Argsz >= MigDataHead.WireSize + (ulong)r.Size && dataBytes == r.Size;

    // Buffered MIG_DATA_WRITE: the payload was received into a pooled buffer (streaming was not possible: the command
    // was read by a thread waiting for its own reply, or carried fds).
    private int MigDataWrite(VfioUserConnection c, VfioUserMessage m)
    {
        if (Mig.Driver is null)
        {
            return Errno.EINVAL;
        }
        if (!MigDataHead.TryRead(m.Payload, out var r) || !IsValidMigDataWrite(r, m.Length - MigDataHead.WireSize))
        {
            return Errno.EINVAL;
        }
        int e = Mig.Driver.WriteData(m.Payload.Slice(MigDataHead.WireSize, (int)r.Size));
        if (e != 0)
        {
            return e;
        }
        c.SendReply(m.Header, default);
        return 0;
    }

    bool IVfioUserStreamHandler.ShouldStream(in VfioUserHeader header) =>
        header.Command == VfioUserCommand.MigDataWrite && Mig.Driver is not null && _negotiated is not null;

    /// <summary>
    /// Zero-copy MIG_DATA_WRITE: the head is read and checked first, then the data goes from the socket straight into
    /// the spans the device gives (<see cref="MigrationStateDriver.GetWriteSpan"/>). On any error the rest of the
    /// payload is drained (bounded by the connection's MaxPayloadSize) before the error reply, so the connection stays
    /// in frame and answers the next command.
    /// </summary>
    void IVfioUserStreamHandler.HandleStream(VfioUserConnection c, in VfioUserHeader header, VfioUserPayloadReader payload)
    {
        int e = Admit(header, 0, false);
        if (e == 0)
        {
            e = MigDataWriteStream(payload);
        }
        payload.DrainRemaining();
        if (e != 0)
        {
            _logger.LogDebug("{Name}: {Command} → errno {Errno}", c.Name, header.Command, e);
            c.SendError(header, e);
            return;
        }
        c.SendReply(header, default);
    }

    private int MigDataWriteStream(VfioUserPayloadReader payload)
    {
        var driver = Mig.Driver!;
        if (payload.Remaining < MigDataHead.WireSize)
        {
            return Errno.EINVAL;
        }
        Span<byte> head = stackalloc byte[MigDataHead.WireSize];
        payload.ReadExactly(head);
        if (!MigDataHead.TryRead(head, out var r) || !IsValidMigDataWrite(r, payload.Remaining))
        {
            return Errno.EINVAL;
        }
        if (r.Size == 0)
        {
            // Nothing to place, but the state gate (EINVAL outside RESUMING) still answers.
            return driver.WriteData(default);
        }
        while (payload.Remaining > 0)
        {
            int e = driver.GetWriteSpan((int)payload.Remaining, out var span);
            if (e != 0)
            {
                return e;
            }
            payload.ReadExactly(span);
            e = driver.AdvanceWrite(span.Length);
            if (e != 0)
            {
                return e;
            }
        }
        return 0;
    }
}
