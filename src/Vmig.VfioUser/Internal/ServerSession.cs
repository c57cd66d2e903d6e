using System.Buffers;
using System.Text;
using Microsoft.Extensions.Logging;
using Vmig.Native;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;
using Vmig.VfioUser.Transport;

namespace Vmig.VfioUser.Internal;

/// <summary>
/// One attached client of a <see cref="VfioUserServer"/>: negotiation, DMA windows, IRQs, region access,
/// reset, features and migration data. Every handler validates sizes, flags and bounds before it allocates
/// or touches the device, and answers with the errno libvfio-user uses for the same fault.
/// </summary>
internal sealed partial class ServerSession : IMessageDma, IVfioUserStreamHandler
{
    /// <summary>The protocol version we speak: major 0, minor up to 2 (libvfio-user 0.2; QEMU sends 0.0).</summary>
    public const ushort Major = 0;
    public const ushort MaxMinor = 2;

    private readonly VfioUserServer _server;
    private readonly VfioUserDevice _device;
    private readonly ILogger _logger;
    private readonly DmaSpace _dma;
    private readonly IrqTable _irqs;
    private VfioUserCapabilities? _peer;
    private VfioUserCapabilities? _negotiated;
    private VfioUserConnection? _twin;
    private Migration.MigrationGatherList? _gather;

    public ServerSession(VfioUserServer server, VfioUserConnection connection, ILogger logger)
    {
        _server = server;
        _device = server.Device;
        Connection = connection;
        _logger = logger;
        _dma = new DmaSpace { MaxWindows = (int)Math.Min(server.Options.MaxDmaMaps, int.MaxValue), MessageDma = this };
        _irqs = new IrqTable(_device.Irqs);
        connection.MaxIncomingFds = server.Options.MaxMsgFds;
        // Region writes, DMA_MAP and MIG_DATA_WRITE carry at most max_data_xfer_size of data plus a small head.
        connection.MaxPayloadSize = (int)server.Options.MaxDataXferSize + 4096;
    }

    public VfioUserConnection Connection { get; }

    public void Start() => Connection.Start(Handle, _device.Migration is null ? null : this);

    /// <summary>Client gone: unmap windows, close eventfds, tell the device. Device and migration state are kept (spec "Client Disconnection").</summary>
    public void Detach()
    {
        _twin?.Dispose();
        if (_negotiated is not null)
        {
            _device.OnDetached();
        }
        _dma.Dispose();
        _irqs.Dispose();
        Connection.Dispose();
    }

    private void Handle(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        var h = m.Header;
        int admit = Admit(h, m.FdCount, m.FdsTruncated);
        if (admit != 0)
        {
            c.SendError(h, admit);
            return;
        }
        int err = h.Command switch
        {
            VfioUserCommand.Version => Version(c, m),
            VfioUserCommand.DmaMap => DmaMap(c, m),
            VfioUserCommand.DmaUnmap => DmaUnmap(c, m),
            VfioUserCommand.DeviceGetInfo => GetInfo(c, m),
            VfioUserCommand.DeviceGetRegionInfo => GetRegionInfo(c, m),
            VfioUserCommand.DeviceGetRegionIoFds => GetRegionIoFds(c, m),
            VfioUserCommand.DeviceGetIrqInfo => GetIrqInfo(c, m),
            VfioUserCommand.DeviceSetIrqs => SetIrqs(c, m),
            VfioUserCommand.RegionRead => RegionRead(c, m),
            VfioUserCommand.RegionWrite => RegionWrite(c, m),
            VfioUserCommand.RegionWriteMulti => RegionWriteMulti(c, m),
            VfioUserCommand.DeviceReset => DeviceReset(c, m),
            VfioUserCommand.DeviceFeature => DeviceFeature(c, m),
            VfioUserCommand.MigDataRead => MigDataRead(c, m),
            VfioUserCommand.MigDataWrite => MigDataWrite(c, m),
            // DMA_READ/WRITE go server→client only; 14 was v1 DIRTY_PAGES; anything else is unknown.
            _ => Errno.EINVAL,
        };
        if (err != 0)
        {
            _logger.LogDebug("{Name}: {Command} → errno {Errno}", c.Name, h.Command, err);
            c.SendError(h, err);
        }
    }

    /// <summary>The checks every command passes before its handler runs: fds only where they belong, VERSION first,
    /// the migration state's command gate. 0 or the errno to answer.</summary>
    private int Admit(in VfioUserHeader h, int fdCount, bool fdsTruncated)
    {
        if (fdsTruncated)
        {
            return Errno.EINVAL;
        }
        if (_negotiated is null && h.Command != VfioUserCommand.Version)
        {
            // libvfio-user requires VERSION first; we answer rather than drop the client.
            return Errno.EINVAL;
        }
        if (fdCount > 0 && h.Command is not (VfioUserCommand.DmaMap or VfioUserCommand.DeviceSetIrqs))
        {
            // VERSION in particular must carry no fds (libvfio-user tran.c).
            return Errno.EINVAL;
        }
        return _server.Migration.IsCommandAllowed(h.Command) ? 0 : Errno.EINVAL;
    }

    private int Version(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (_negotiated is not null)
        {
            return Errno.EINVAL;
        }
        if (!VersionHead.TryRead(m.Payload, out var v))
        {
            return Errno.EINVAL;
        }
        if (v.Major != Major)
        {
            _logger.LogWarning("{Name}: client proposes major {Major}; we speak {Ours}", c.Name, v.Major, Major);
            c.SendError(m.Header, Errno.ENOTSUP);
            Connection.Dispose();
            return 0;
        }
        int e = VfioUserCapabilities.TryParse(m.Payload[VersionHead.Size..], out var peer, out string? why);
        if (e != 0)
        {
            _logger.LogWarning("{Name}: bad VERSION capabilities: {Why}", c.Name, why);
            return e;
        }
        var o = _server.Options;
        var mig = _device.Migration;
        bool twin = peer.TwinSocketSupported && o.OfferTwinSocket && peer.MaxMsgFds >= 1;
        var ours = new VfioUserCapabilities
        {
            MaxMsgFds = o.MaxMsgFds,
            MaxDataXferSize = o.MaxDataXferSize,
            MaxDmaMaps = o.MaxDmaMaps,
            PgSizes = VfioUserCapabilities.DefaultPgSizes,
            WriteMultiple = peer.WriteMultiple,
            TwinSocketSupported = twin,
            TwinSocketFdIndex = twin ? 0 : null,
            Migration = peer.Migration && mig is not null,
            MigrationPgSize = peer.Migration && mig is not null ? 4096 : null,
            VmigMigDataSize = o.OfferExtensions && mig is not null && peer.VmigMigDataSize,
            VmigPrecopyInfo = o.OfferExtensions && mig is not null && peer.VmigPrecopyInfo,
            VmigP2P = o.OfferExtensions && mig is not null && peer.VmigP2P,
        };
        if (peer.Migration && peer.MigrationPgSize is ulong pg && pg != 4096)
        {
            // libvfio-user refuses a migration.pgsize other than its page size.
            return Errno.EINVAL;
        }
        byte[] json = Encoding.UTF8.GetBytes(ours.ToJson() + "\0");
        var reply = new byte[VersionHead.Size + json.Length];
        new VersionHead(Major, Math.Min(v.Minor, MaxMinor)).WriteTo(reply);
        json.CopyTo(reply, VersionHead.Size);
        FdSocket? twinServerEnd = null;
        FdSocket? twinClientEnd = null;
        if (twin)
        {
            (twinServerEnd, twinClientEnd) = FdSocket.CreatePair();
        }
        _peer = peer;
        _negotiated = ours;
        _server.Migration.Negotiate(ours);
        if (twinClientEnd is not null)
        {
            c.SendReply(m.Header, reply, default, [twinClientEnd.Fd]);
            // Only close our descriptor: Dispose would shutdown(2) the socket the client now holds.
            twinClientEnd.CloseKeepingConnection();
            _twin = new VfioUserConnection(twinServerEnd!, c.Name + " twin", _logger);
            // The twin socket carries only server→client commands; anything the client sends on it is refused.
            _twin.Start(static (tc, tm) => tc.SendError(tm.Header, Errno.EINVAL));
        }
        else
        {
            c.SendReply(m.Header, reply);
        }
        _device.OnAttached(new DeviceContext(_dma, _irqs, _logger));
        return 0;
    }

    private int DmaMap(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!DmaMapRequest.TryRead(m.Payload, out var r) || r.Argsz < DmaMapRequest.WireSize)
        {
            return Errno.EINVAL;
        }
        if ((r.Flags & ~(DmaMapRequest.FlagRead | DmaMapRequest.FlagWrite)) != 0 || m.FdCount > 1 || r.Size == 0
            || r.Address + r.Size < r.Address || r.Offset + r.Size < r.Offset)
        {
            return Errno.EINVAL;
        }
        if ((r.Address & 4095) != 0 || (r.Size & 4095) != 0)
        {
            // pgsizes = 4096: windows are page granular (so are dirty bitmaps).
            return Errno.EINVAL;
        }
        var prot = (DmaProt)r.Flags;
        Mapping? map = null;
        if (m.FdCount == 1)
        {
            using var fd = m.TakeFd(0)!;
            if ((r.Offset & 4095) != 0 || r.Size > long.MaxValue)
            {
                return Errno.EINVAL;
            }
            try
            {
                // mmap succeeds past the end of the file, but a device access there raises SIGBUS and kills the
                // server: the window must lie inside the file as it is now.
                long fileSize = MemFd.GetSize(fd);
                if (r.Offset > (ulong)fileSize || r.Size > (ulong)fileSize - r.Offset)
                {
                    return Errno.EINVAL;
                }
                map = Mapping.Map(fd, (long)r.Offset, (long)r.Size, writable: (prot & DmaProt.Write) != 0);
            }
            catch (NativeException e)
            {
                return e.Errno;
            }
        }
        int err = _dma.Map(r.Address, r.Size, prot, map);
        if (err != 0)
        {
            map?.Dispose();
            return err;
        }
        c.SendReply(m.Header, default);
        return 0;
    }

    private int DmaUnmap(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!DmaUnmapRequest.TryRead(m.Payload, out var r) || r.Argsz < DmaUnmapRequest.WireSize)
        {
            return Errno.EINVAL;
        }
        if (r.Flags == DmaUnmapRequest.FlagAll)
        {
            if (r.Address != 0 || r.Size != 0)
            {
                return Errno.EINVAL;
            }
            _dma.UnmapAll();
        }
        else if (r.Flags != 0)
        {
            return Errno.EINVAL;
        }
        else
        {
            int e = _dma.Unmap(r.Address, r.Size);
            if (e != 0)
            {
                return e;
            }
        }
        Span<byte> reply = stackalloc byte[DmaUnmapRequest.WireSize];
        (r with { Argsz = DmaUnmapRequest.WireSize }).WriteTo(reply);
        c.SendReply(m.Header, reply);
        return 0;
    }

    private int GetInfo(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!DeviceInfoPayload.TryRead(m.Payload, out var r) || r.Argsz < DeviceInfoPayload.WireSize)
        {
            return Errno.EINVAL;
        }
        Span<byte> reply = stackalloc byte[DeviceInfoPayload.WireSize];
        new DeviceInfoPayload(DeviceInfoPayload.WireSize, (uint)_device.InfoFlags, (uint)_device.Regions.Count, (uint)_device.Irqs.Count).WriteTo(reply);
        c.SendReply(m.Header, reply);
        return 0;
    }

    private int GetRegionInfo(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!RegionInfoPayload.TryRead(m.Payload, out var r) || r.Argsz < RegionInfoPayload.WireSize || r.Index >= (uint)_device.Regions.Count)
        {
            return Errno.EINVAL;
        }
        var d = _device.Regions[(int)r.Index];
        var flags = d.Flags;
        bool mmap = (flags & RegionFlags.Mmap) != 0 && d.MmapFd is not null;
        if (!mmap)
        {
            flags &= ~RegionFlags.Mmap;
        }
        int capSize = mmap && d.SparseAreas is { Count: > 0 } ? SparseMmapCap.SizeFor(d.SparseAreas.Count) : 0;
        uint full = (uint)(RegionInfoPayload.WireSize + capSize);
        bool withCaps = capSize > 0 && r.Argsz >= full;
        if (capSize > 0)
        {
            flags |= RegionFlags.Caps;
        }
        var reply = new byte[withCaps ? full : RegionInfoPayload.WireSize];
        new RegionInfoPayload(full, (uint)flags, r.Index, withCaps ? (uint)RegionInfoPayload.WireSize : 0, d.Size, mmap ? d.MmapOffset : 0).WriteTo(reply);
        if (withCaps)
        {
            SparseMmapCap.WriteTo(reply.AsSpan(RegionInfoPayload.WireSize), 0, d.SparseAreas!);
        }
        if (mmap)
        {
            bool added = false;
            try
            {
                d.MmapFd!.DangerousAddRef(ref added);
                c.SendReply(m.Header, reply, default, [d.MmapFd.Fd]);
            }
            finally
            {
                if (added)
                {
                    d.MmapFd!.DangerousRelease();
                }
            }
        }
        else
        {
            c.SendReply(m.Header, reply);
        }
        return 0;
    }

    private int GetRegionIoFds(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!RegionIoFdsPayload.TryRead(m.Payload, out var r) || r.Argsz < RegionIoFdsPayload.WireSize
            || r.Flags != 0 || r.Index >= (uint)_device.Regions.Count)
        {
            return Errno.EINVAL;
        }
        // We offer no ioeventfd/ioregionfd sub-regions: count 0 means "use REGION_WRITE".
        Span<byte> reply = stackalloc byte[RegionIoFdsPayload.WireSize];
        new RegionIoFdsPayload(RegionIoFdsPayload.WireSize, 0, r.Index, 0).WriteTo(reply);
        c.SendReply(m.Header, reply);
        return 0;
    }

    private int GetIrqInfo(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!IrqInfoPayload.TryRead(m.Payload, out var r) || r.Argsz < IrqInfoPayload.WireSize || r.Index >= (uint)_device.Irqs.Count)
        {
            return Errno.EINVAL;
        }
        var d = _device.Irqs[(int)r.Index];
        Span<byte> reply = stackalloc byte[IrqInfoPayload.WireSize];
        new IrqInfoPayload(IrqInfoPayload.WireSize, (uint)d.Flags, r.Index, d.Count).WriteTo(reply);
        c.SendReply(m.Header, reply);
        return 0;
    }

    private int SetIrqs(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!IrqSetPayload.TryRead(m.Payload, out var r) || r.Argsz < IrqSetPayload.WireSize)
        {
            return Errno.EINVAL;
        }
        var fds = new List<UnixFd>(m.FdCount);
        for (int i = 0; i < m.FdCount; i++)
        {
            fds.Add(m.TakeFd(i)!);
        }
        int e = _irqs.Apply(r, m.Payload[IrqSetPayload.WireSize..], fds);
        if (e != 0)
        {
            foreach (var f in fds)
            {
                f.Dispose();
            }
            return e;
        }
        c.SendReply(m.Header, default);
        return 0;
    }

    private int CheckRegionAccess(uint region, ulong offset, uint count, RegionFlags need)
    {
        if (region >= (uint)_device.Regions.Count || count == 0 || count > _negotiated!.MaxDataXferSize)
        {
            return Errno.EINVAL;
        }
        var d = _device.Regions[(int)region];
        if ((d.Flags & need) == 0)
        {
            return Errno.EINVAL;
        }
        if (offset >= d.Size || count > d.Size - offset)
        {
            return Errno.EINVAL;
        }
        return 0;
    }

    private int RegionRead(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!RegionAccessHead.TryRead(m.Payload, out var r) || m.Length != RegionAccessHead.WireSize)
        {
            return Errno.EINVAL;
        }
        int e = CheckRegionAccess(r.Region, r.Offset, r.Count, RegionFlags.Read);
        if (e != 0)
        {
            return e;
        }
        byte[] buf = ArrayPool<byte>.Shared.Rent((int)r.Count);
        try
        {
            var data = buf.AsSpan(0, (int)r.Count);
            e = _device.ReadRegion((int)r.Region, r.Offset, data);
            if (e != 0)
            {
                return e;
            }
            Span<byte> head = stackalloc byte[RegionAccessHead.WireSize];
            r.WriteTo(head);
            c.SendReply(m.Header, head, data);
            return 0;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buf);
        }
    }

    private int RegionWrite(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (!RegionAccessHead.TryRead(m.Payload, out var r) || (ulong)m.Length != RegionAccessHead.WireSize + (ulong)r.Count)
        {
            return Errno.EINVAL;
        }
        int e = CheckRegionAccess(r.Region, r.Offset, r.Count, RegionFlags.Write);
        if (e != 0)
        {
            return e;
        }
        e = _device.WriteRegion((int)r.Region, r.Offset, m.Payload.Slice(RegionAccessHead.WireSize, (int)r.Count));
        if (e != 0)
        {
            return e;
        }
        Span<byte> head = stackalloc byte[RegionAccessHead.WireSize];
        r.WriteTo(head);
        c.SendReply(m.Header, head);
        return 0;
    }

    private int RegionWriteMulti(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        var p = m.Payload;
        if (p.Length < 8)
        {
            return Errno.EINVAL;
        }
        ulong n = BitConverter.ToUInt64(p);
        if (n == 0 || n > WriteMultiEntry.MaxEntries || (ulong)p.Length != 8 + (n * WriteMultiEntry.WireSize))
        {
            return Errno.EINVAL;
        }
        // Validate every entry before performing any, so a bad entry leaves the device untouched.
        for (int i = 0; i < (int)n; i++)
        {
            WriteMultiEntry.TryRead(p.Slice(8 + (i * WriteMultiEntry.WireSize)), out var w);
            int e = w.Count is 0 or > WriteMultiEntry.MaxData ? Errno.EINVAL : CheckRegionAccess(w.Region, w.Offset, w.Count, RegionFlags.Write);
            if (e != 0)
            {
                return e;
            }
        }
        for (int i = 0; i < (int)n; i++)
        {
            var entry = p.Slice(8 + (i * WriteMultiEntry.WireSize), WriteMultiEntry.WireSize);
            WriteMultiEntry.TryRead(entry, out var w);
            int e = _device.WriteRegion((int)w.Region, w.Offset, entry.Slice(16, (int)w.Count));
            if (e != 0)
            {
                return e;
            }
        }
        Span<byte> reply = stackalloc byte[8];
        BitConverter.TryWriteBytes(reply, n);
        c.SendReply(m.Header, reply);
        return 0;
    }

    private int DeviceReset(VfioUserConnection c, Transport.VfioUserMessage m)
    {
        if (m.Length != 0)
        {
            return Errno.EINVAL;
        }
        int refused = _device.PrepareReset();
        if (refused != 0)
        {
            return refused;
        }
        // ARCHITECTURE §6: reset returns the migration state to RUNNING (kernel UAPI) and ends any data stream.
        _server.Migration.Reset();
        _device.Reset();
        c.SendReply(m.Header, default);
        return 0;
    }

    // IMessageDma: windows without an fd are reached with DMA_READ/DMA_WRITE to the client (on the twin socket when negotiated).
    public int Read(ulong iova, Span<byte> destination)
    {
        var conn = _twin ?? Connection;
        int max = (int)(_peer?.MaxDataXferSize ?? VfioUserCapabilities.DefaultMaxDataXferSize);
        Span<byte> req = stackalloc byte[DmaAccessHead.WireSize];
        Span<byte> head = stackalloc byte[DmaAccessHead.WireSize];
        for (int done = 0; done < destination.Length;)
        {
            int n = Math.Min(max, destination.Length - done);
            var ask = new DmaAccessHead(iova + (ulong)done, (ulong)n);
            ask.WriteTo(req);
            try
            {
                // The data lands straight in the device's buffer when this thread reads the reply itself.
                int len = conn.SendRequestInto(VfioUserCommand.DmaRead, req, default, head, destination.Slice(done, n));
                if (len != DmaAccessHead.WireSize + n || !DmaAccessHead.TryRead(head, out var rh) || rh.Count != (ulong)n)
                {
                    return Errno.EIO;
                }
            }
            catch (VfioUserException e)
            {
                return e.Errno;
            }
            done += n;
        }
        return 0;
    }

    public int Write(ulong iova, ReadOnlySpan<byte> source)
    {
        var conn = _twin ?? Connection;
        int max = (int)(_peer?.MaxDataXferSize ?? VfioUserCapabilities.DefaultMaxDataXferSize);
        Span<byte> head = stackalloc byte[DmaAccessHead.WireSize];
        for (int done = 0; done < source.Length;)
        {
            int n = Math.Min(max, source.Length - done);
            new DmaAccessHead(iova + (ulong)done, (ulong)n).WriteTo(head);
            try
            {
                using var reply = conn.SendRequest(VfioUserCommand.DmaWrite, head, source.Slice(done, n));
            }
            catch (VfioUserException e)
            {
                return e.Errno;
            }
            done += n;
        }
        return 0;
    }
}
