using System.Buffers.Binary;
using System.Net.Sockets;

namespace Vmig.Bench;

/// <summary>
/// The raw baseline: a UNIX-socket server with the same message shapes as vfio-user (16-byte header whose bytes
/// 4..8 are msg_size, then the payload) and no protocol work: blocking sockets, one dedicated thread per client
/// (as the vfio-user server has), read the header, read the payload, answer.
/// Commands (header bytes 2..4): 10 = ping (reply header + the first 16 payload bytes: REGION_WRITE's reply shape);
/// 17 = read (payload u32 argsz, u32 size; reply header + 8 + size bytes taken from a state buffer of the server's
/// size, walking through it like a save stream); 18 = write (payload 8 + data; reply header + 8).
/// </summary>
internal sealed class RawServer : IDisposable
{
    private readonly Socket _listener;
    private readonly byte[] _state;
    private readonly Thread _accept;
    private readonly List<Socket> _clients = [];
    private int _disposed;

    public RawServer(string path, long stateBytes)
    {
        // A pinned array (up to ~2 GiB) so Socket.Send can gather header + state slice in one sendmsg.
        _state = GC.AllocateUninitializedArray<byte>((int)Math.Min(stateBytes, Array.MaxLength & ~0xFFFFF), pinned: true);
        new Random(7).NextBytes(_state);
        if (File.Exists(path))
        {
            File.Delete(path);
        }
        _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _listener.Bind(new UnixDomainSocketEndPoint(path));
        _listener.Listen(8);
        _accept = new Thread(AcceptLoop) { IsBackground = true, Name = "raw accept" };
        _accept.Start();
    }

    private void AcceptLoop()
    {
        while (Volatile.Read(ref _disposed) == 0)
        {
            Socket s;
            try
            {
                s = _listener.Accept();
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                return;
            }
            lock (_clients)
            {
                _clients.Add(s);
            }
            new Thread(() => Serve(s)) { IsBackground = true, Name = "raw serve" }.Start();
        }
    }

    private void Serve(Socket s)
    {
        byte[] head = new byte[16];
        byte[] payload = GC.AllocateUninitializedArray<byte>((1 << 20) + 4096, pinned: true);
        byte[] reply = new byte[64];
        long cursor = 0;
        var segs = new List<ArraySegment<byte>>(2) { default, default };
        try
        {
            while (true)
            {
                if (!RawIo.ReceiveExactly(s, head))
                {
                    return;
                }
                int size = (int)BinaryPrimitives.ReadUInt32LittleEndian(head.AsSpan(4)) - 16;
                if (size < 0 || size > payload.Length || !RawIo.ReceiveExactly(s, payload.AsSpan(0, size)))
                {
                    return;
                }
                ushort cmd = BinaryPrimitives.ReadUInt16LittleEndian(head.AsSpan(2));
                head.CopyTo(reply, 0);
                // flags = REPLY, error_no = 0: a vfio-user connection can talk to this server too (breakdown runs).
                BinaryPrimitives.WriteUInt64LittleEndian(reply.AsSpan(8), 1);
                switch (cmd)
                {
                    case 10:
                        BinaryPrimitives.WriteUInt32LittleEndian(reply.AsSpan(4), 32);
                        payload.AsSpan(0, 16).CopyTo(reply.AsSpan(16));
                        RawIo.SendAll(s, reply.AsSpan(0, 32));
                        break;
                    case 17:
                        {
                            int n = (int)BinaryPrimitives.ReadUInt32LittleEndian(payload.AsSpan(4));
                            n = Math.Min(n, _state.Length);
                            if (cursor + n > _state.Length)
                            {
                                cursor = 0;
                            }
                            BinaryPrimitives.WriteUInt32LittleEndian(reply.AsSpan(4), (uint)(24 + n));
                            BinaryPrimitives.WriteUInt32LittleEndian(reply.AsSpan(16), (uint)(8 + n));
                            BinaryPrimitives.WriteUInt32LittleEndian(reply.AsSpan(20), (uint)n);
                            segs[0] = new ArraySegment<byte>(reply, 0, 24);
                            segs[1] = new ArraySegment<byte>(_state, (int)cursor, n);
                            RawIo.SendAll(s, segs, 24 + n);
                            cursor += n;
                            break;
                        }
                    default:
                        BinaryPrimitives.WriteUInt32LittleEndian(reply.AsSpan(4), 24);
                        payload.AsSpan(0, 8).CopyTo(reply.AsSpan(16));
                        RawIo.SendAll(s, reply.AsSpan(0, 24));
                        break;
                }
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
        finally
        {
            s.Dispose();
        }
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        _listener.Dispose();
        lock (_clients)
        {
            foreach (var c in _clients)
            {
                c.Dispose();
            }
        }
    }
}

/// <summary>Blocking full-buffer socket I/O for the baseline (never async, so the socket stays blocking).</summary>
internal static class RawIo
{
    public static bool ReceiveExactly(Socket s, Span<byte> buffer)
    {
        int got = 0;
        while (got < buffer.Length)
        {
            int n = s.Receive(buffer[got..], SocketFlags.None);
            if (n == 0)
            {
                return false;
            }
            got += n;
        }
        return true;
    }

    public static void SendAll(Socket s, ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty)
        {
            data = data[s.Send(data, SocketFlags.None)..];
        }
    }

    public static void SendAll(Socket s, List<ArraySegment<byte>> segs, int total)
    {
        int sent = s.Send(segs, SocketFlags.None);
        if (sent == total)
        {
            return;
        }
        // Partial gather write: finish the rest segment by segment.
        int skip = sent;
        foreach (var seg in segs)
        {
            if (skip >= seg.Count)
            {
                skip -= seg.Count;
                continue;
            }
            SendAll(s, seg.AsSpan(skip));
            skip = 0;
        }
    }

    public static Socket Connect(string path)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Connect(new UnixDomainSocketEndPoint(path));
        return s;
    }
}

/// <summary>The baseline client: the same request shapes as the vfio-user client, on one thread, blocking.</summary>
internal sealed class RawClient : IDisposable
{
    private readonly Socket _s;
    private readonly byte[] _head = new byte[64];
    private readonly List<ArraySegment<byte>> _segs = [default, default];
    private ushort _id;

    public RawClient(string path) => _s = RawIo.Connect(path);

    /// <summary>REGION_WRITE-shaped round trip: 16 + 16 + 4 bytes out, 16 + 16 back.</summary>
    public void Ping()
    {
        WriteHead(10, 36);
        RawIo.SendAll(_s, _head.AsSpan(0, 36));
        RawIo.ReceiveExactly(_s, _head.AsSpan(0, 32));
    }

    /// <summary>MIG_DATA_READ-shaped: 24 bytes out; 24 + n back, the data landing in <paramref name="buffer"/>.</summary>
    public int Read(Span<byte> buffer)
    {
        WriteHead(17, 24);
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(16), (uint)(8 + buffer.Length));
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(20), (uint)buffer.Length);
        RawIo.SendAll(_s, _head.AsSpan(0, 24));
        if (!RawIo.ReceiveExactly(_s, _head.AsSpan(0, 24)))
        {
            throw new EndOfStreamException();
        }
        int n = (int)BinaryPrimitives.ReadUInt32LittleEndian(_head.AsSpan(20));
        RawIo.ReceiveExactly(_s, buffer[..n]);
        return n;
    }

    /// <summary>MIG_DATA_WRITE-shaped: 24 + n bytes out (gathered), 24 back.</summary>
    public void Write(ArraySegment<byte> data)
    {
        WriteHead(18, 24 + data.Count);
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(16), (uint)(8 + data.Count));
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(20), (uint)data.Count);
        _segs[0] = new ArraySegment<byte>(_head, 0, 24);
        _segs[1] = data;
        RawIo.SendAll(_s, _segs, 24 + data.Count);
        RawIo.ReceiveExactly(_s, _head.AsSpan(0, 24));
    }

    private void WriteHead(ushort cmd, int size)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(_head, ++_id);
        BinaryPrimitives.WriteUInt16LittleEndian(_head.AsSpan(2), cmd);
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(4), (uint)size);
        BinaryPrimitives.WriteUInt64LittleEndian(_head.AsSpan(8), 0);
    }

    public void Dispose() => _s.Dispose();
}
