using System.Buffers.Binary;
using System.Text;
using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.Conformance;

/// <summary>One message read by a <see cref="RawPeer"/>: the 16-byte header, the payload bytes and how many fds came with it.</summary>
public sealed record RawMessage(VfioUserHeader Header, byte[] Payload, int FdCount)
{
    /// <summary>The errno of an error reply (header flags ERROR), else 0.</summary>
    public int Errno => Header.IsError ? (int)Header.ErrorNo : 0;

    /// <summary>A reply without the ERROR flag.</summary>
    public bool IsSuccess => Header.IsReply && !Header.IsError;
}

/// <summary>
/// A vfio-user client with no protocol smarts: it writes whatever header and payload bytes it is given (lying
/// msg_size, wrong fd counts, unknown commands, commands before VERSION) and reads back raw messages with a
/// timeout. Used by the conformance suite's resilience checks, the protocol fuzzer and malformed-input tests,
/// where a typed client cannot produce the bad bytes. Server→client commands (DMA_READ/DMA_WRITE) that arrive
/// while waiting are answered with an EFAULT error reply, so a server pumping for a DMA reply never waits on us.
/// </summary>
public sealed class RawPeer : IDisposable
{
    /// <summary>Largest payload read back (bigger replies are a protocol failure: <see cref="InvalidDataException"/>).</summary>
    public const int MaxReplyPayload = 64 << 20;

    private readonly FdSocket _socket;
    private readonly UnixFd _pollFd;
    private ushort _nextId = 0x100;

    /// <summary>Wraps a connected socket (owned from here on).</summary>
    public RawPeer(FdSocket socket)
    {
        _socket = socket ?? throw new ArgumentNullException(nameof(socket));
        _pollFd = new UnixFd(socket.Fd, ownsHandle: false);
    }

    /// <summary>Connects to <paramref name="socketPath"/> (no VERSION is sent).</summary>
    /// <exception cref="System.Net.Sockets.SocketException">Nothing listens there.</exception>
    public static RawPeer Connect(string socketPath) => new(FdSocket.Connect(socketPath));

    /// <summary>When true (default), commands from the peer (a server's DMA_READ/DMA_WRITE) are answered with EFAULT and
    /// skipped by <see cref="Receive"/>; when false they are returned like replies (a raw peer playing the server).</summary>
    public bool AnswerPeerCommands { get; set; } = true;

    /// <summary>Server→client commands answered with EFAULT while waiting for replies.</summary>
    public int ServerRequestsAnswered { get; private set; }

    /// <summary>A fresh message id (wraps at 16 bits).</summary>
    public ushort NextId() => _nextId++;

    /// <summary>Sends header + payload. <paramref name="messageSize"/> overrides msg_size (default: 16 + payload length, the truth).</summary>
    /// <exception cref="NativeException">The peer is gone.</exception>
    public void Send(ushort id, VfioUserCommand command, ReadOnlySpan<byte> payload, uint? messageSize = null,
        VfioUserHeaderFlags flags = VfioUserHeaderFlags.Command, ReadOnlySpan<int> fds = default, uint errorNo = 0)
    {
        Span<byte> h = stackalloc byte[VfioUserHeader.Size];
        new VfioUserHeader(id, command, messageSize ?? (uint)(VfioUserHeader.Size + payload.Length), flags, errorNo).WriteTo(h);
        _socket.Send(h, payload, fds);
    }

    /// <summary>Sends arbitrary bytes (at least one) with optional fds, no framing added.</summary>
    public void SendBytes(ReadOnlySpan<byte> bytes, ReadOnlySpan<int> fds = default) => _socket.Send(bytes, default, fds);

    /// <summary>
    /// Reads the next message within <paramref name="timeoutMs"/>. Returns null at end of stream (the peer closed).
    /// Server→client commands are answered (EFAULT) and skipped.
    /// </summary>
    /// <exception cref="TimeoutException">Nothing complete arrived in time.</exception>
    /// <exception cref="InvalidDataException">The peer's msg_size is below 16 or above <see cref="MaxReplyPayload"/>.</exception>
    public RawMessage? Receive(int timeoutMs)
    {
        var deadline = Environment.TickCount64 + timeoutMs;
        Span<byte> hb = stackalloc byte[VfioUserHeader.Size];
        while (true)
        {
            int left = (int)Math.Max(0, deadline - Environment.TickCount64);
            if (!FdIo.PollIn(_pollFd, left))
            {
                throw new TimeoutException($"no message within {timeoutMs} ms");
            }
            var fds = new List<UnixFd>();
            try
            {
                if (!_socket.Receive(hb, fds, out _))
                {
                    return null;
                }
                var h = VfioUserHeader.ReadFrom(hb);
                if (h.MessageSize < VfioUserHeader.Size || h.MessageSize - VfioUserHeader.Size > MaxReplyPayload)
                {
                    throw new InvalidDataException($"peer sent msg_size {h.MessageSize}");
                }
                var payload = new byte[h.MessageSize - VfioUserHeader.Size];
                if (payload.Length > 0 && !_socket.Receive(payload, fds, out _))
                {
                    return null;
                }
                if (h.IsCommand && AnswerPeerCommands)
                {
                    ServerRequestsAnswered++;
                    if (!h.NoReply)
                    {
                        Send(h.MessageId, h.Command, default, null, VfioUserHeaderFlags.Reply | VfioUserHeaderFlags.Error, default, (uint)Errno.EFAULT);
                    }
                    continue;
                }
                return new RawMessage(h, payload, fds.Count);
            }
            catch (EndOfStreamException)
            {
                return null;
            }
            catch (NativeException e) when (e.Errno is EConnReset or EPipe)
            {
                // The peer closed with data unread (RST): the same as an orderly close for us.
                return null;
            }
            finally
            {
                foreach (var f in fds)
                {
                    f.Dispose();
                }
            }
        }
    }

    /// <summary>Sends a command with a fresh id and waits for the reply carrying that id (replies to other ids are skipped).</summary>
    /// <returns>The reply, or null if the peer closed the connection (before or after the send).</returns>
    /// <exception cref="TimeoutException">No reply in time.</exception>
    public RawMessage? Request(VfioUserCommand command, ReadOnlySpan<byte> payload, int timeoutMs, ReadOnlySpan<int> fds = default, uint? messageSize = null)
    {
        ushort id = NextId();
        try
        {
            Send(id, command, payload, messageSize, VfioUserHeaderFlags.Command, fds);
        }
        catch (NativeException e) when (e.Errno is EConnReset or EPipe)
        {
            return null;
        }
        return WaitFor(id, timeoutMs);
    }

    private const int EPipe = 32;
    private const int EConnReset = Errno.ECONNRESET;

    /// <summary>Waits for the reply with <paramref name="id"/>, dropping others. Null if the peer closed.</summary>
    /// <exception cref="TimeoutException">No such reply in time.</exception>
    public RawMessage? WaitFor(ushort id, int timeoutMs)
    {
        var deadline = Environment.TickCount64 + timeoutMs;
        while (true)
        {
            var m = Receive((int)Math.Max(1, deadline - Environment.TickCount64));
            if (m is null || m.Header.MessageId == id)
            {
                return m;
            }
        }
    }

    /// <summary>VERSION 0.<paramref name="minor"/> with the given capabilities JSON (null: a plain default offer).</summary>
    public RawMessage? Negotiate(int timeoutMs, string? json = null, ushort minor = 0)
    {
        json ??= """{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}""";
        return Request(VfioUserCommand.Version, VersionPayload(0, minor, json), timeoutMs);
    }

    /// <summary>A VERSION payload: major u16, minor u16, then the JSON and a NUL (no JSON at all when <paramref name="json"/> is null).</summary>
    public static byte[] VersionPayload(ushort major, ushort minor, string? json)
    {
        int n = json is null ? 0 : Encoding.UTF8.GetByteCount(json) + 1;
        var p = new byte[VersionHead.Size + n];
        new VersionHead(major, minor).WriteTo(p);
        if (json is not null)
        {
            Encoding.UTF8.GetBytes(json, p.AsSpan(VersionHead.Size));
        }
        return p;
    }

    /// <summary>DEVICE_FEATURE payload: argsz, flags, then <paramref name="data"/>.</summary>
    public static byte[] FeaturePayload(uint argsz, uint flags, ReadOnlySpan<byte> data = default)
    {
        var p = new byte[DeviceFeatureHead.WireSize + data.Length];
        new DeviceFeatureHead(argsz, flags).WriteTo(p);
        data.CopyTo(p.AsSpan(DeviceFeatureHead.WireSize));
        return p;
    }

    /// <summary>GET MIG_DEVICE_STATE; returns the state or -errno (int.MinValue if the connection closed).</summary>
    public int GetState(int timeoutMs)
    {
        var r = Request(VfioUserCommand.DeviceFeature, FeaturePayload(16, DeviceFeatureHead.Get | 2), timeoutMs);
        if (r is null)
        {
            return int.MinValue;
        }
        if (!r.IsSuccess || r.Payload.Length < 12)
        {
            return -Math.Max(1, r.Errno);
        }
        return (int)BinaryPrimitives.ReadUInt32LittleEndian(r.Payload.AsSpan(8));
    }

    public void Dispose()
    {
        _pollFd.Dispose();
        _socket.Dispose();
    }
}
