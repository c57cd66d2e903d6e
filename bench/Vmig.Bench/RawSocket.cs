using System.Buffers.Binary;
using System.Net.Sockets;
using Vmig.Native;

namespace Vmig.Bench;

/// <summary>
/// The raw baseline: a UNIX-socket server with the same message shapes as vfio-user (16-byte header whose bytes
/// 4..8 are msg_size, then the payload) and no protocol work: blocking sendmsg/recvmsg(MSG_WAITALL) through
/// <see cref="FdSocket"/> (the same syscalls the vfio-user transport uses), one dedicated thread per client (as the
/// vfio-user server has), read the header, read the payload, answer.
/// Commands (header bytes 2..4): 10 = ping (reply header + the first 16 payload bytes: REGION_WRITE's reply shape);
/// 17 = read (payload u32 argsz, u32 size; reply header + 8 + size bytes sent straight from a state buffer of the
/// server's size, walking through it like a save stream); 18 = write (payload 8 + data, received straight into the
/// state buffer at a walking cursor; reply header + 8).
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
        // One array (up to ~2 GiB): replies are sent straight from it and writes land in it, as a zero-copy server would.
        _state = GC.AllocateUninitializedArray<byte>((int)Math.Min(stateBytes, Array.MaxLength & ~0xFFFFF));
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

    private void Serve(Socket socket)
    {
        var s = new FdSocket(socket);
        byte[] head = new byte[16];
        byte[] payload = new byte[4096];
        byte[] reply = new byte[64];
        long cursor = 0;
        try
        {
            while (true)
            {
                if (!s.Receive(head, null, out _))
                {
                    return;
                }
                int size = (int)BinaryPrimitives.ReadUInt32LittleEndian(head.AsSpan(4)) - 16;
                ushort cmd = BinaryPrimitives.ReadUInt16LittleEndian(head.AsSpan(2));
                head.CopyTo(reply, 0);
                // flags = REPLY, error_no = 0: a vfio-user connection can talk to this server too (breakdown runs).
                BinaryPrimitives.WriteUInt64LittleEndian(reply.AsSpan(8), 1);
                if (cmd == 18)
                {
                    // Write: the 8-byte head, then the data straight into the state at a walking cursor (no copy).
                    int n = size - 8;
                    if (n < 0 || n > _state.Length || !s.Receive(payload.AsSpan(0, 8), null, out _))
                    {
                        return;
                    }
                    if (cursor + n > _state.Length)
                    {
                        cursor = 0;
                    }
                    if (n > 0 && !s.Receive(_state.AsSpan((int)cursor, n), null, out _))
                    {
                        return;
                    }
                    cursor += n;
                    BinaryPrimitives.WriteUInt32LittleEndian(reply.AsSpan(4), 24);
                    payload.AsSpan(0, 8).CopyTo(reply.AsSpan(16));
                    s.Send(reply.AsSpan(0, 24), default, default);
                    continue;
                }
                if (size < 0 || size > payload.Length || (size > 0 && !s.Receive(payload.AsSpan(0, size), null, out _)))
                {
                    return;
                }
                if (cmd == 17)
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
                    s.Send(reply.AsSpan(0, 24), _state.AsSpan((int)cursor, n), default);
                    cursor += n;
                }
                else
                {
                    BinaryPrimitives.WriteUInt32LittleEndian(reply.AsSpan(4), 32);
                    payload.AsSpan(0, 16).CopyTo(reply.AsSpan(16));
                    s.Send(reply.AsSpan(0, 32), default, default);
                }
            }
        }
        catch (Exception e) when (e is NativeException or EndOfStreamException or ObjectDisposedException)
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

/// <summary>The baseline client: the same request shapes as the vfio-user client, on one thread, with blocking
/// sendmsg (header and data gathered) and recvmsg(MSG_WAITALL) through <see cref="FdSocket"/> and no protocol work.</summary>
internal sealed class RawClient : IDisposable
{
    private readonly FdSocket _s;
    private readonly byte[] _head = new byte[64];
    private ushort _id;

    public RawClient(string path) => _s = FdSocket.Connect(path);

    /// <summary>REGION_WRITE-shaped round trip: 16 + 16 + 4 bytes out, 16 + 16 back.</summary>
    public void Ping()
    {
        WriteHead(10, 36);
        _s.Send(_head.AsSpan(0, 36), default, default);
        Receive(_head.AsSpan(0, 32));
    }

    /// <summary>MIG_DATA_READ-shaped: 24 bytes out; 24 + n back, the data landing in <paramref name="buffer"/>.</summary>
    public int Read(Span<byte> buffer)
    {
        WriteHead(17, 24);
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(16), (uint)(8 + buffer.Length));
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(20), (uint)buffer.Length);
        _s.Send(_head.AsSpan(0, 24), default, default);
        Receive(_head.AsSpan(0, 24));
        int n = (int)BinaryPrimitives.ReadUInt32LittleEndian(_head.AsSpan(20));
        Receive(buffer[..n]);
        return n;
    }

    /// <summary>MIG_DATA_WRITE-shaped: 24 + n bytes out (gathered), 24 back.</summary>
    public void Write(ReadOnlySpan<byte> data)
    {
        WriteHead(18, 24 + data.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(16), (uint)(8 + data.Length));
        BinaryPrimitives.WriteUInt32LittleEndian(_head.AsSpan(20), (uint)data.Length);
        _s.Send(_head.AsSpan(0, 24), data, default);
        Receive(_head.AsSpan(0, 24));
    }

    private void Receive(Span<byte> b)
    {
        if (!_s.Receive(b, null, out _))
        {
            throw new EndOfStreamException("raw server closed");
        }
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
