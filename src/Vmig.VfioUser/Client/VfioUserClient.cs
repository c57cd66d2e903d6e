using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;
using Vmig.VfioUser.Transport;

namespace Vmig.VfioUser.Client;

/// <summary>Client settings, proposed in VERSION.</summary>
public sealed record VfioUserClientOptions
{
    /// <summary>max_msg_fds we can receive per message.</summary>
    public int MaxMsgFds { get; init; } = 16;
    /// <summary>max_data_xfer_size we accept, in bytes (server→client DMA and our reply buffers).</summary>
    public uint MaxDataXferSize { get; init; } = 1 << 20;
    /// <summary>Ask for the vmig extensions (MIG_DATA_SIZE, pre-copy info, P2P states).</summary>
    public bool RequestExtensions { get; init; } = true;
    /// <summary>Ask for twin-socket mode.</summary>
    public bool RequestTwinSocket { get; init; }
    /// <summary>Send the legacy "migration" capability object (QEMU does).</summary>
    public bool SendMigrationCapability { get; init; } = true;
    /// <summary>Minor version proposed.</summary>
    public ushort Minor { get; init; } = 2;
    /// <summary>Per-request timeout in milliseconds.</summary>
    public int TimeoutMs { get; init; } = 30_000;
    public ILoggerFactory? Loggers { get; init; }
}

/// <summary>vfio_device_info.</summary>
public sealed record DeviceInfo(DeviceInfoFlags Flags, int NumRegions, int NumIrqs);

/// <summary>vfio_region_info plus the sparse-mmap areas and the mmap fd (owned by the caller) when the region is mappable.</summary>
public sealed record RegionInfo(int Index, RegionFlags Flags, ulong Size, ulong MmapOffset, UnixFd? MmapFd, IReadOnlyList<(ulong Offset, ulong Size)> SparseAreas);

/// <summary>vfio_irq_info.</summary>
public sealed record IrqInfo(int Index, IrqInfoFlags Flags, uint Count);

/// <summary>Serves the server's DMA_READ / DMA_WRITE requests for windows mapped without an fd.</summary>
public interface IClientDmaHandler
{
    /// <summary>Returns 0 or an errno.</summary>
    int Read(ulong address, Span<byte> destination);

    /// <summary>Returns 0 or an errno.</summary>
    int Write(ulong address, ReadOnlySpan<byte> source);
}

/// <summary>SET MIG_DEVICE_STATE failed; <see cref="ReachedState"/> is where a GET says the device is now.</summary>
public sealed class VfioUserMigrationException : VfioUserException
{
    public VfioUserMigrationException(int errno, DeviceState requested, DeviceState? reached)
        : base(errno, $"SET {requested} failed with errno {errno}; device is in {(reached?.ToString() ?? "an unknown state")}", VfioUserCommand.DeviceFeature)
    {
        Requested = requested;
        ReachedState = reached;
    }

    public DeviceState Requested { get; }
    public DeviceState? ReachedState { get; }
}

/// <summary>
/// The VMM side of vfio-user: attaches to any vfio-user server, negotiates, and drives the device — regions,
/// DMA windows, IRQ eventfds, reset, features, migration and dirty logging. Blocking and thread-safe; every
/// failure is a <see cref="VfioUserException"/> carrying the errno.
/// </summary>
public sealed class VfioUserClient : IDisposable
{
    private readonly VfioUserConnection _conn;
    private readonly VfioUserClientOptions _options;
    private readonly ILogger _logger;
    private VfioUserConnection? _twin;
    private VfioUserCapabilities _server = new();

    private VfioUserClient(FdSocket socket, VfioUserClientOptions options)
    {
        _options = options;
        var loggers = options.Loggers ?? NullLoggerFactory.Instance;
        _logger = loggers.CreateLogger("vfio-user.client");
        _conn = new VfioUserConnection(socket, "client", loggers.CreateLogger("vfio-user.connection"))
        {
            MaxIncomingFds = options.MaxMsgFds,
            MaxPayloadSize = (int)options.MaxDataXferSize + 4096,
            RequestTimeoutMs = options.TimeoutMs,
        };
    }

    /// <summary>The server's capabilities from its VERSION reply.</summary>
    public VfioUserCapabilities ServerCapabilities => _server;

    /// <summary>Negotiated protocol minor version.</summary>
    public ushort Minor { get; private set; }

    /// <summary>The server answered DEVICE_FEATURE MIG_DATA_SIZE (vmig extension).</summary>
    public bool SupportsStopCopySize => _server.VmigMigDataSize;

    /// <summary>The server answers the pre-copy info feature (vmig extension).</summary>
    public bool SupportsPrecopyInfo => _server.VmigPrecopyInfo;

    /// <summary>The P2P states are in use with this server (vmig extension).</summary>
    public bool SupportsP2P => _server.VmigP2P;

    /// <summary>Server→client DMA for windows without an fd. Null answers EFAULT.</summary>
    public IClientDmaHandler? DmaHandler { get; set; }

    /// <summary>True once the connection has ended.</summary>
    public bool IsClosed => _conn.IsClosed;

    /// <summary>Raised once when the connection to the server ends.</summary>
    public event Action<string>? Disconnected
    {
        add => _conn.Closed += value;
        remove => _conn.Closed -= value;
    }

    /// <summary>Connects to the server socket at <paramref name="socketPath"/> and negotiates (VERSION).</summary>
    /// <exception cref="System.Net.Sockets.SocketException">No server listens there.</exception>
    /// <exception cref="VfioUserException">Negotiation failed.</exception>
    public static VfioUserClient Connect(string socketPath, VfioUserClientOptions? options = null) =>
        Attach(FdSocket.Connect(socketPath), options);

    /// <summary>Negotiates over an already connected socket (tests, socket pairs).</summary>
    public static VfioUserClient Attach(FdSocket socket, VfioUserClientOptions? options = null)
    {
        var c = new VfioUserClient(socket, options ?? new VfioUserClientOptions());
        try
        {
            c._conn.Start(c.HandleServerRequest);
            c.Negotiate();
            return c;
        }
        catch
        {
            c.Dispose();
            throw;
        }
    }

    private void Negotiate()
    {
        var ours = new VfioUserCapabilities
        {
            MaxMsgFds = _options.MaxMsgFds,
            MaxDataXferSize = _options.MaxDataXferSize,
            WriteMultiple = true,
            TwinSocketSupported = _options.RequestTwinSocket,
            Migration = _options.SendMigrationCapability,
            MigrationPgSize = _options.SendMigrationCapability ? 4096 : null,
            MigrationMaxBitmapSize = _options.SendMigrationCapability ? 256UL << 20 : null,
            VmigMigDataSize = _options.RequestExtensions,
            VmigPrecopyInfo = _options.RequestExtensions,
            VmigP2P = _options.RequestExtensions,
        };
        byte[] json = Encoding.UTF8.GetBytes(ours.ToJson() + "\0");
        var req = new byte[VersionHead.Size + json.Length];
        new VersionHead(0, _options.Minor).WriteTo(req);
        json.CopyTo(req, VersionHead.Size);
        using var reply = _conn.SendRequest(VfioUserCommand.Version, req);
        if (!VersionHead.TryRead(reply.Payload, out var v) || v.Major != 0 || v.Minor > _options.Minor)
        {
            throw new VfioUserException(Errno.EPROTO, $"server answered version {v.Major}.{v.Minor} to our 0.{_options.Minor}", VfioUserCommand.Version);
        }
        int e = VfioUserCapabilities.TryParse(reply.Payload[VersionHead.Size..], out var caps, out string? why);
        if (e != 0)
        {
            throw new VfioUserException(e, "bad server capabilities: " + why, VfioUserCommand.Version);
        }
        // The reply must be a subset of what we proposed (spec): drop extensions we did not ask for.
        if (!_options.RequestExtensions)
        {
            caps = caps with { VmigMigDataSize = false, VmigPrecopyInfo = false, VmigP2P = false };
        }
        Minor = v.Minor;
        _server = caps;
        if (caps.TwinSocketSupported && _options.RequestTwinSocket)
        {
            if (caps.TwinSocketFdIndex is not int idx || idx < 0 || idx >= reply.FdCount)
            {
                throw new VfioUserException(Errno.EPROTO, "twin_socket reply names no valid fd", VfioUserCommand.Version);
            }
            var fd = reply.TakeFd(idx)!;
            _twin = new VfioUserConnection(FdSocket.FromFd(fd), "client twin", _logger) { MaxPayloadSize = (int)_options.MaxDataXferSize + 4096 };
            _twin.Start(HandleServerRequest);
        }
    }

    private void HandleServerRequest(VfioUserConnection c, VfioUserMessage m)
    {
        var h = m.Header;
        if (h.Command is not (VfioUserCommand.DmaRead or VfioUserCommand.DmaWrite) || m.FdCount != 0
            || !DmaAccessHead.TryRead(m.Payload, out var a) || a.Count == 0 || a.Count > _options.MaxDataXferSize)
        {
            c.SendError(h, Errno.EINVAL);
            return;
        }
        var handler = DmaHandler;
        if (handler is null)
        {
            c.SendError(h, Errno.EFAULT);
            return;
        }
        Span<byte> head = stackalloc byte[DmaAccessHead.WireSize];
        a.WriteTo(head);
        if (h.Command == VfioUserCommand.DmaRead)
        {
            if (m.Length != DmaAccessHead.WireSize)
            {
                c.SendError(h, Errno.EINVAL);
                return;
            }
            byte[] rented = ArrayPool<byte>.Shared.Rent((int)a.Count);
            try
            {
                var data = rented.AsSpan(0, (int)a.Count);
                int e = handler.Read(a.Address, data);
                if (e != 0)
                {
                    c.SendError(h, e);
                    return;
                }
                c.SendReply(h, head, data);
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(rented);
            }
        }
        else
        {
            if ((ulong)m.Length != DmaAccessHead.WireSize + a.Count)
            {
                c.SendError(h, Errno.EINVAL);
                return;
            }
            int e = handler.Write(a.Address, m.Payload[DmaAccessHead.WireSize..]);
            if (e != 0)
            {
                c.SendError(h, e);
                return;
            }
            c.SendReply(h, head);
        }
    }

    /// <summary>Sends any command and returns the raw reply (conformance, fuzzing). Error replies throw.</summary>
    public VfioUserMessage SendRaw(VfioUserCommand command, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds = default) =>
        _conn.SendRequest(command, payload, default, fds);

    /// <summary>DEVICE_GET_INFO.</summary>
    public DeviceInfo GetDeviceInfo()
    {
        Span<byte> req = stackalloc byte[DeviceInfoPayload.WireSize];
        new DeviceInfoPayload(DeviceInfoPayload.WireSize, 0, 0, 0).WriteTo(req);
        using var r = _conn.SendRequest(VfioUserCommand.DeviceGetInfo, req);
        if (!DeviceInfoPayload.TryRead(r.Payload, out var p))
        {
            throw Short(VfioUserCommand.DeviceGetInfo);
        }
        return new DeviceInfo((DeviceInfoFlags)p.Flags, (int)p.NumRegions, (int)p.NumIrqs);
    }

    /// <summary>DEVICE_GET_REGION_INFO with room for capabilities (retries once with the argsz the server asks for).</summary>
    public RegionInfo GetRegionInfo(int index)
    {
        uint argsz = 256;
        for (int attempt = 0; attempt < 2; attempt++)
        {
            Span<byte> req = stackalloc byte[RegionInfoPayload.WireSize];
            new RegionInfoPayload(argsz, 0, (uint)index, 0, 0, 0).WriteTo(req);
            using var r = _conn.SendRequest(VfioUserCommand.DeviceGetRegionInfo, req);
            if (!RegionInfoPayload.TryRead(r.Payload, out var p))
            {
                throw Short(VfioUserCommand.DeviceGetRegionInfo);
            }
            if (p.Argsz > r.Length && p.Argsz <= 65536 && attempt == 0)
            {
                argsz = p.Argsz;
                continue;
            }
            var areas = new List<(ulong, ulong)>();
            if ((p.Flags & (uint)RegionFlags.Caps) != 0 && p.CapOffset != 0 && !SparseMmapCap.TryRead(r.Payload, p.CapOffset, out areas))
            {
                throw new VfioUserException(Errno.EPROTO, $"region {index}: malformed capability chain", VfioUserCommand.DeviceGetRegionInfo);
            }
            UnixFd? fd = (p.Flags & (uint)RegionFlags.Mmap) != 0 && r.FdCount > 0 ? r.TakeFd(0) : null;
            return new RegionInfo(index, (RegionFlags)p.Flags, p.Size, p.Offset, fd, areas);
        }
        throw new VfioUserException(Errno.EPROTO, "region info argsz keeps growing", VfioUserCommand.DeviceGetRegionInfo);
    }

    /// <summary>DEVICE_GET_REGION_IO_FDS: the number of ioeventfd/ioregionfd sub-regions offered (0 = none).</summary>
    public int GetRegionIoFdCount(int index)
    {
        Span<byte> req = stackalloc byte[RegionIoFdsPayload.WireSize];
        new RegionIoFdsPayload(RegionIoFdsPayload.WireSize, 0, (uint)index, 0).WriteTo(req);
        using var r = _conn.SendRequest(VfioUserCommand.DeviceGetRegionIoFds, req);
        return RegionIoFdsPayload.TryRead(r.Payload, out var p) ? (int)p.Count : throw Short(VfioUserCommand.DeviceGetRegionIoFds);
    }

    /// <summary>DEVICE_GET_IRQ_INFO.</summary>
    public IrqInfo GetIrqInfo(int index)
    {
        Span<byte> req = stackalloc byte[IrqInfoPayload.WireSize];
        new IrqInfoPayload(IrqInfoPayload.WireSize, 0, (uint)index, 0).WriteTo(req);
        using var r = _conn.SendRequest(VfioUserCommand.DeviceGetIrqInfo, req);
        return IrqInfoPayload.TryRead(r.Payload, out var p)
            ? new IrqInfo(index, (IrqInfoFlags)p.Flags, p.Count)
            : throw Short(VfioUserCommand.DeviceGetIrqInfo);
    }

    /// <summary>REGION_READ of <c>data.Length</c> bytes (split at the server's max_data_xfer_size), received straight
    /// into <paramref name="data"/>.</summary>
    /// <exception cref="VfioUserException">The server's errno; EPROTO when a reply's size does not match the request.</exception>
    public void ReadRegion(int index, ulong offset, Span<byte> data)
    {
        int max = (int)_server.MaxDataXferSize;
        Span<byte> req = stackalloc byte[RegionAccessHead.WireSize];
        Span<byte> head = stackalloc byte[RegionAccessHead.WireSize];
        for (int done = 0; done < data.Length;)
        {
            int n = Math.Min(max, data.Length - done);
            new RegionAccessHead(offset + (ulong)done, (uint)index, (uint)n).WriteTo(req);
            int len = _conn.SendRequestInto(VfioUserCommand.RegionRead, req, default, head, data.Slice(done, n));
            if (len != RegionAccessHead.WireSize + n)
            {
                throw Short(VfioUserCommand.RegionRead);
            }
            done += n;
        }
    }

    /// <summary>REGION_WRITE (split at the server's max_data_xfer_size).</summary>
    public void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        int max = (int)_server.MaxDataXferSize;
        Span<byte> req = stackalloc byte[RegionAccessHead.WireSize];
        for (int done = 0; done < data.Length;)
        {
            int n = Math.Min(max, data.Length - done);
            new RegionAccessHead(offset + (ulong)done, (uint)index, (uint)n).WriteTo(req);
            using var r = _conn.SendRequest(VfioUserCommand.RegionWrite, req, data.Slice(done, n));
            done += n;
        }
    }

    /// <summary>REGION_WRITE_MULTI: up to 200 writes of ≤ 8 bytes each in one message.</summary>
    public void WriteRegionMulti(IReadOnlyList<(int Region, ulong Offset, ulong Value, int Count)> writes)
    {
        ArgumentNullException.ThrowIfNull(writes);
        if (writes.Count is 0 or > WriteMultiEntry.MaxEntries)
        {
            throw new ArgumentOutOfRangeException(nameof(writes), $"1..{WriteMultiEntry.MaxEntries} writes");
        }
        var req = new byte[8 + (writes.Count * WriteMultiEntry.WireSize)];
        BinaryPrimitives.WriteUInt64LittleEndian(req, (ulong)writes.Count);
        for (int i = 0; i < writes.Count; i++)
        {
            var w = writes[i];
            new WriteMultiEntry(w.Offset, (uint)w.Region, (uint)w.Count, w.Value).WriteTo(req.AsSpan(8 + (i * WriteMultiEntry.WireSize)));
        }
        using var r = _conn.SendRequest(VfioUserCommand.RegionWriteMulti, req);
    }

    /// <summary>DMA_MAP: guest memory [iova, +size) backed by <paramref name="fd"/> at <paramref name="fileOffset"/> (fd null: the server reaches it with DMA_READ/WRITE through <see cref="DmaHandler"/>).</summary>
    public void DmaMap(ulong iova, ulong size, UnixFd? fd, long fileOffset, DmaProt prot)
    {
        Span<byte> req = stackalloc byte[DmaMapRequest.WireSize];
        new DmaMapRequest(DmaMapRequest.WireSize, (uint)prot, fd is null ? 0 : (ulong)fileOffset, iova, size).WriteTo(req);
        if (fd is null)
        {
            using var r0 = _conn.SendRequest(VfioUserCommand.DmaMap, req);
            return;
        }
        bool added = false;
        try
        {
            fd.DangerousAddRef(ref added);
            using var r = _conn.SendRequest(VfioUserCommand.DmaMap, req, default, [fd.Fd]);
        }
        finally
        {
            if (added)
            {
                fd.DangerousRelease();
            }
        }
    }

    /// <summary>DMA_UNMAP of exactly one earlier window.</summary>
    public void DmaUnmap(ulong iova, ulong size)
    {
        Span<byte> req = stackalloc byte[DmaUnmapRequest.WireSize];
        new DmaUnmapRequest(DmaUnmapRequest.WireSize, 0, iova, size).WriteTo(req);
        using var r = _conn.SendRequest(VfioUserCommand.DmaUnmap, req);
    }

    /// <summary>DEVICE_SET_IRQS, DATA_EVENTFD|ACTION_TRIGGER: wires vectors start.. to eventfds (null entries are not allowed; pass an empty list to de-assign).</summary>
    public void SetIrqEventFds(int irqIndex, int start, IReadOnlyList<EventFd> fds)
    {
        ArgumentNullException.ThrowIfNull(fds);
        Span<byte> req = stackalloc byte[IrqSetPayload.WireSize];
        new IrqSetPayload(IrqSetPayload.WireSize, IrqSetFlags.DataEventfd | IrqSetFlags.ActionTrigger, (uint)irqIndex, (uint)start, (uint)fds.Count).WriteTo(req);
        var raw = new int[fds.Count];
        var refs = new List<UnixFd>();
        try
        {
            for (int i = 0; i < fds.Count; i++)
            {
                bool added = false;
                fds[i].Handle.DangerousAddRef(ref added);
                refs.Add(fds[i].Handle);
                raw[i] = fds[i].Handle.Fd;
            }
            using var r = _conn.SendRequest(VfioUserCommand.DeviceSetIrqs, req, default, raw);
        }
        finally
        {
            foreach (var h in refs)
            {
                h.DangerousRelease();
            }
        }
    }

    /// <summary>DEVICE_SET_IRQS with DATA_NONE: count 0 disables every vector of the index; otherwise performs the action.</summary>
    public void SetIrqs(int irqIndex, IrqSetFlags action, int start, int count, ReadOnlySpan<byte> boolData = default)
    {
        var data = boolData.IsEmpty ? IrqSetFlags.DataNone : IrqSetFlags.DataBool;
        var req = new byte[IrqSetPayload.WireSize + boolData.Length];
        new IrqSetPayload((uint)req.Length, data | action, (uint)irqIndex, (uint)start, (uint)count).WriteTo(req);
        boolData.CopyTo(req.AsSpan(IrqSetPayload.WireSize));
        using var r = _conn.SendRequest(VfioUserCommand.DeviceSetIrqs, req);
    }

    /// <summary>DEVICE_RESET (also returns the migration state to RUNNING on vmig servers).</summary>
    public void Reset()
    {
        using var r = _conn.SendRequest(VfioUserCommand.DeviceReset, default);
    }

    /// <summary>DEVICE_FEATURE with PROBE: 0 if supported for the named GET/SET, else the errno.</summary>
    public int ProbeFeature(ushort feature, bool get, bool set)
    {
        Span<byte> req = stackalloc byte[DeviceFeatureHead.WireSize];
        new DeviceFeatureHead(DeviceFeatureHead.WireSize, feature | DeviceFeatureHead.Probe | (get ? DeviceFeatureHead.Get : 0) | (set ? DeviceFeatureHead.Set : 0)).WriteTo(req);
        try
        {
            using var r = _conn.SendRequest(VfioUserCommand.DeviceFeature, req);
            return 0;
        }
        catch (VfioUserException e) when (e is not VfioUserConnectionClosedException)
        {
            return e.Errno;
        }
    }

    private VfioUserMessage FeatureGet(ushort feature, ReadOnlySpan<byte> data, int replyData)
    {
        var req = new byte[DeviceFeatureHead.WireSize + data.Length];
        new DeviceFeatureHead((uint)(DeviceFeatureHead.WireSize + Math.Max(replyData, data.Length)), feature | DeviceFeatureHead.Get).WriteTo(req);
        data.CopyTo(req.AsSpan(DeviceFeatureHead.WireSize));
        var r = _conn.SendRequest(VfioUserCommand.DeviceFeature, req);
        if (r.Length < DeviceFeatureHead.WireSize + replyData)
        {
            r.Dispose();
            throw Short(VfioUserCommand.DeviceFeature);
        }
        return r;
    }

    private void FeatureSet(ushort feature, ReadOnlySpan<byte> data)
    {
        var req = new byte[DeviceFeatureHead.WireSize + data.Length];
        new DeviceFeatureHead((uint)req.Length, feature | DeviceFeatureHead.Set).WriteTo(req);
        data.CopyTo(req.AsSpan(DeviceFeatureHead.WireSize));
        using var r = _conn.SendRequest(VfioUserCommand.DeviceFeature, req);
    }

    /// <summary>DEVICE_FEATURE MIGRATION GET: the migration flags (ENOTTY/EINVAL from servers without migration).</summary>
    public MigrationFlags GetMigrationFlags()
    {
        using var r = FeatureGet((ushort)Migration.DeviceFeature.Migration, default, 8);
        return (MigrationFlags)BinaryPrimitives.ReadUInt64LittleEndian(r.Payload[DeviceFeatureHead.WireSize..]);
    }

    /// <summary>MIG_DEVICE_STATE GET.</summary>
    public DeviceState GetState()
    {
        using var r = FeatureGet((ushort)Migration.DeviceFeature.MigDeviceState, default, 8);
        return (DeviceState)BinaryPrimitives.ReadUInt32LittleEndian(r.Payload[DeviceFeatureHead.WireSize..]);
    }

    /// <summary>MIG_DEVICE_STATE SET; returns the state reached (= target).</summary>
    /// <exception cref="VfioUserMigrationException">The server refused or failed; ReachedState comes from a GET.</exception>
    public DeviceState SetState(DeviceState target)
    {
        Span<byte> d = stackalloc byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(d, (uint)target);
        BinaryPrimitives.WriteInt32LittleEndian(d[4..], -1);
        try
        {
            FeatureSet((ushort)Migration.DeviceFeature.MigDeviceState, d);
            return target;
        }
        catch (VfioUserException e) when (e is not VfioUserConnectionClosedException)
        {
            DeviceState? reached = null;
            try
            {
                reached = GetState();
            }
            catch (VfioUserException)
            {
            }
            throw new VfioUserMigrationException(e.Errno, target, reached);
        }
    }

    /// <summary>MIG_DATA_READ until <c>buffer.Length</c> bytes or a short reply (requests are split at the server's
    /// max_data_xfer_size). Returns the count; fewer than asked means no more data (end of stream in STOP_COPY,
    /// "nothing more for now" in PRE_COPY). The data is received straight into <paramref name="buffer"/> (no staging copy).</summary>
    /// <exception cref="VfioUserException">The server's errno; EPROTO when a reply's size field does not match its payload
    /// or exceeds the request (bytes of <paramref name="buffer"/> past the returned count are then unspecified).</exception>
    public int ReadMigrationData(Span<byte> buffer)
    {
        int done = 0;
        Span<byte> req = stackalloc byte[MigDataHead.WireSize];
        Span<byte> head = stackalloc byte[MigDataHead.WireSize];
        while (done < buffer.Length)
        {
            int want = (int)Math.Min((uint)(buffer.Length - done), _server.MaxDataXferSize);
            MigDataReadRequest(req, want);
            int len = _conn.SendRequestInto(VfioUserCommand.MigDataRead, req, default, head, buffer.Slice(done, want));
            int n = MigDataCount(head[..Math.Min(len, MigDataHead.WireSize)], len, want);
            done += n;
            if (n < want)
            {
                break;
            }
        }
        return done;
    }

    /// <summary>One MIG_DATA_READ of up to <paramref name="size"/> bytes written straight from the receive buffer to
    /// <paramref name="destination"/>. Returns the count (short = no more, as <see cref="ReadMigrationData(Span{byte})"/>).</summary>
    public int ReadMigrationData(int size, Stream destination)
    {
        ArgumentNullException.ThrowIfNull(destination);
        int want = (int)Math.Min((uint)size, _server.MaxDataXferSize);
        Span<byte> req = stackalloc byte[MigDataHead.WireSize];
        MigDataReadRequest(req, want);
        using var r = _conn.SendRequest(VfioUserCommand.MigDataRead, req);
        int n = MigDataCount(r.Payload, r.Length, want);
        destination.Write(r.Payload.Slice(MigDataHead.WireSize, n));
        return n;
    }

    /// <summary>The largest MIG_DATA chunk the server accepts, in bytes.</summary>
    public int MaxMigrationChunk => (int)Math.Min(_server.MaxDataXferSize, _options.MaxDataXferSize);

    /// <summary>The MIG_DATA_READ request for <paramref name="size"/> bytes (argsz, size) into <paramref name="req"/>.</summary>
    private static void MigDataReadRequest(Span<byte> req, int size) =>
        new MigDataHead((uint)(MigDataHead.WireSize + size), (uint)size).WriteTo(req);

    /// <summary>The data count of a MIG_DATA_READ reply of <paramref name="replyLength"/> payload bytes starting with
    /// <paramref name="replyHead"/>, for a request of <paramref name="asked"/> bytes.</summary>
    /// <exception cref="VfioUserException">EPROTO: the reply is shorter than its head, its size field exceeds the request,
    /// or the payload length is not head + size.</exception>
    private static int MigDataCount(ReadOnlySpan<byte> replyHead, int replyLength, int asked) =>
        MigDataHead.TryRead(replyHead, out var h) && h.Size <= (uint)asked && replyLength == MigDataHead.WireSize + (int)h.Size
            ? (int)h.Size
            : throw MigDataMismatch();

    /// <summary>MIG_DATA_WRITE of <paramref name="data"/> (split at the server's max_data_xfer_size).</summary>
    public void WriteMigrationData(ReadOnlySpan<byte> data)
    {
        int max = MaxMigrationChunk;
        Span<byte> head = stackalloc byte[MigDataHead.WireSize];
        for (int done = 0; done < data.Length;)
        {
            int n = Math.Min(max, data.Length - done);
            // argsz covers the data too: libvfio-user refuses argsz < 8 + size, and so does vmig's server.
            new MigDataHead((uint)(MigDataHead.WireSize + n), (uint)n).WriteTo(head);
            using var r = _conn.SendRequest(VfioUserCommand.MigDataWrite, head, data.Slice(done, n));
            done += n;
        }
    }

    /// <summary>vmig pre-copy info (initial_bytes, dirty_bytes); EINVAL outside PRE_COPY/PRE_COPY_P2P.</summary>
    /// <exception cref="VfioUserException">ENOTTY when the extension was not negotiated.</exception>
    public PrecopyInfo GetPrecopyInfo()
    {
        using var r = FeatureGet(VmigFeatures.PrecopyInfo, default, 16);
        var d = r.Payload[DeviceFeatureHead.WireSize..];
        return new PrecopyInfo(BinaryPrimitives.ReadUInt64LittleEndian(d), BinaryPrimitives.ReadUInt64LittleEndian(d[8..]));
    }

    /// <summary>MIG_DATA_SIZE (feature 9): estimated STOP_COPY bytes. ENOTTY when not negotiated.</summary>
    public ulong GetStopCopySize()
    {
        using var r = FeatureGet((ushort)Migration.DeviceFeature.MigDataSize, default, 8);
        return BinaryPrimitives.ReadUInt64LittleEndian(r.Payload[DeviceFeatureHead.WireSize..]);
    }

    /// <summary>DMA_LOGGING_START over <paramref name="ranges"/> (empty = all mapped memory). Returns the granule the server picked.</summary>
    public ulong StartDirtyLogging(ulong pageSize, IReadOnlyList<(ulong Iova, ulong Length)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        var d = new byte[16 + (16 * ranges.Count)];
        BinaryPrimitives.WriteUInt64LittleEndian(d, pageSize);
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(8), (uint)ranges.Count);
        for (int i = 0; i < ranges.Count; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(16 + (16 * i)), ranges[i].Iova);
            BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(24 + (16 * i)), ranges[i].Length);
        }
        var req = new byte[DeviceFeatureHead.WireSize + d.Length];
        new DeviceFeatureHead((uint)req.Length, (ushort)Migration.DeviceFeature.DmaLoggingStart | DeviceFeatureHead.Set).WriteTo(req);
        d.CopyTo(req, DeviceFeatureHead.WireSize);
        using var r = _conn.SendRequest(VfioUserCommand.DeviceFeature, req);
        return r.Length >= DeviceFeatureHead.WireSize + 8 ? BinaryPrimitives.ReadUInt64LittleEndian(r.Payload[DeviceFeatureHead.WireSize..]) : pageSize;
    }

    /// <summary>DMA_LOGGING_STOP.</summary>
    public void StopDirtyLogging() => FeatureSet((ushort)Migration.DeviceFeature.DmaLoggingStop, default);

    /// <summary>DMA_LOGGING_REPORT (read and clear) of [iova, +length) at <paramref name="pageSize"/> into a new bitmap.</summary>
    public DirtyBitmap ReportDirty(ulong iova, ulong length, ulong pageSize)
    {
        int e = DirtyBitmap.TryGetByteLength(iova, length, pageSize, out ulong bytes);
        if (e != 0)
        {
            throw new VfioUserException(e, $"bad report range [{iova:x}, +{length:x}) page {pageSize}", VfioUserCommand.DeviceFeature);
        }
        Span<byte> d = stackalloc byte[24];
        BinaryPrimitives.WriteUInt64LittleEndian(d, iova);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], length);
        BinaryPrimitives.WriteUInt64LittleEndian(d[16..], pageSize);
        using var r = FeatureGet((ushort)Migration.DeviceFeature.DmaLoggingReport, d, 24 + (int)bytes);
        if (!DirtyBitmap.TryRead(iova, length, pageSize, r.Payload.Slice(DeviceFeatureHead.WireSize + 24, (int)bytes), out var bm) || bm is null)
        {
            throw Short(VfioUserCommand.DeviceFeature);
        }
        return bm;
    }

    private static VfioUserException MigDataMismatch() =>
        new(Errno.EPROTO, "MIG_DATA_READ reply size does not match its payload", VfioUserCommand.MigDataRead);

    private static VfioUserException Short(VfioUserCommand c) => new(Errno.EPROTO, $"{c}: reply too short", c);

    public void Dispose()
    {
        _twin?.Dispose();
        _conn.Dispose();
    }
}
