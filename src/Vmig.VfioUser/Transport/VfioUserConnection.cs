using System.Buffers;
using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser.Transport;

/// <summary>Handles one incoming command. It must answer with <see cref="VfioUserConnection.SendReply"/> or
/// <see cref="VfioUserConnection.SendError"/> unless the command has NO_REPLY. The message is disposed after it returns.</summary>
public delegate void VfioUserRequestHandler(VfioUserConnection connection, VfioUserMessage request);

/// <summary>
/// One vfio-user connection (either end): 16-byte header framing, SCM_RIGHTS fds, msg_id matching.
/// One receive thread reads every message; commands go to the handler inline, replies wake their waiter.
/// Sends are serialized under one lock and go out as one sendmsg (header + payload + bulk, no copy of bulk).
/// A request sent FROM the receive thread (a device's DMA_READ while handling a doorbell) pumps the socket
/// itself until its reply arrives, deferring other commands until the current handler returns.
/// </summary>
/// <remarks>Shutdown is idempotent: <see cref="Dispose"/> from any thread fails pending requests with
/// <see cref="VfioUserConnectionClosedException"/> and raises <see cref="Closed"/> once.</remarks>
public sealed class VfioUserConnection : IDisposable
{
    /// <summary>Default bound on an incoming payload: 1 MiB of data plus headers, refused above (E2BIG) without allocating.</summary>
    public const int DefaultMaxPayloadSize = (1 << 20) + 4096;

    private const int SmallSend = 256;
    private const int DiscardChunk = 64 * 1024;

    private readonly FdSocket _socket;
    private readonly ILogger _logger;
    private readonly object _sendLock = new();
    private readonly ConcurrentDictionary<ushort, Pending> _pending = new();
    private readonly Queue<VfioUserMessage> _deferred = new();
    // Receive-thread scratch for fds: most messages carry none, so a message gets its own list only when some arrived.
    private readonly List<UnixFd> _scratchFds = [];
    private VfioUserRequestHandler? _handler;
    private Thread? _receiveThread;
    private int _nextId;
    private int _closed;
    private int _closedRaised;
    private string _closeReason = "closed";

    public VfioUserConnection(FdSocket socket, string name, ILogger? logger = null)
    {
        _socket = socket ?? throw new ArgumentNullException(nameof(socket));
        Name = name;
        _logger = logger ?? NullLogger.Instance;
    }

    /// <summary>For logs.</summary>
    public string Name { get; }

    /// <summary>Largest payload accepted (msg_size − 16). Larger messages are drained and refused with E2BIG.</summary>
    public int MaxPayloadSize { get; set; } = DefaultMaxPayloadSize;

    /// <summary>Most fds accepted with one message (our max_msg_fds). Commands with more get EINVAL.</summary>
    public int MaxIncomingFds { get; set; } = 16;

    /// <summary>Default timeout for <see cref="SendRequest"/>, in milliseconds.</summary>
    public int RequestTimeoutMs { get; set; } = 30_000;

    /// <summary>True once the connection is shut down.</summary>
    public bool IsClosed => Volatile.Read(ref _closed) != 0;

    /// <summary>Raised once when the connection ends, with the reason.</summary>
    public event Action<string>? Closed;

    /// <summary>Starts the receive thread. Commands go to <paramref name="handler"/>.</summary>
    public void Start(VfioUserRequestHandler handler)
    {
        _handler = handler ?? throw new ArgumentNullException(nameof(handler));
        _receiveThread = new Thread(ReceiveLoop) { IsBackground = true, Name = "vfio-user rx " + Name };
        _receiveThread.Start();
    }

    /// <summary>
    /// Sends a command and waits for its reply. Returns the reply (caller disposes it).
    /// </summary>
    /// <exception cref="VfioUserException">Error reply (errno from the peer) or ETIMEDOUT.</exception>
    /// <exception cref="VfioUserConnectionClosedException">The connection ended first.</exception>
    public VfioUserMessage SendRequest(VfioUserCommand command, ReadOnlySpan<byte> payload, ReadOnlySpan<byte> bulk = default,
        ReadOnlySpan<int> fds = default, int timeoutMs = 0)
    {
        var p = new Pending();
        ushort id;
        do
        {
            id = (ushort)Interlocked.Increment(ref _nextId);
        }
        while (!_pending.TryAdd(id, p));
        try
        {
            ThrowIfClosed();
            Send(new VfioUserHeader(id, command, Checked(payload.Length + bulk.Length), VfioUserHeaderFlags.Command), payload, bulk, fds);
            if (Thread.CurrentThread == _receiveThread)
            {
                PumpUntil(p);
            }
            else if (!p.Done.Wait(timeoutMs > 0 ? timeoutMs : RequestTimeoutMs))
            {
                throw new VfioUserException(Errno.ETIMEDOUT, $"{Name}: no reply to {command} within {(timeoutMs > 0 ? timeoutMs : RequestTimeoutMs)} ms", command);
            }
            if (p.Reply is null)
            {
                throw new VfioUserConnectionClosedException($"{Name}: {command}: {_closeReason}");
            }
            var reply = p.Reply;
            if (reply.Header.IsError)
            {
                int e = (int)reply.Header.ErrorNo;
                reply.Dispose();
                throw new VfioUserException(e == 0 ? Errno.EIO : e, $"{Name}: {command} failed: errno {e}", command);
            }
            if (reply.Header.Command != command)
            {
                reply.Dispose();
                throw new VfioUserException(Errno.EPROTO, $"{Name}: reply to {command} carries command {reply.Header.Command}", command);
            }
            return reply;
        }
        finally
        {
            _pending.TryRemove(id, out _);
            p.Done.Dispose();
        }
    }

    /// <summary>Sends a command with NO_REPLY set.</summary>
    public void SendNoReply(VfioUserCommand command, ReadOnlySpan<byte> payload, ReadOnlySpan<byte> bulk = default, ReadOnlySpan<int> fds = default)
    {
        ThrowIfClosed();
        ushort id = (ushort)Interlocked.Increment(ref _nextId);
        Send(new VfioUserHeader(id, command, Checked(payload.Length + bulk.Length), VfioUserHeaderFlags.Command | VfioUserHeaderFlags.NoReply), payload, bulk, fds);
    }

    /// <summary>Sends the reply to <paramref name="request"/>: payload then bulk, with optional fds. No-op for NO_REPLY commands.</summary>
    public void SendReply(in VfioUserHeader request, ReadOnlySpan<byte> payload, ReadOnlySpan<byte> bulk = default, ReadOnlySpan<int> fds = default)
    {
        if (request.NoReply)
        {
            return;
        }
        Send(new VfioUserHeader(request.MessageId, request.Command, Checked(payload.Length + bulk.Length), VfioUserHeaderFlags.Reply), payload, bulk, fds);
    }

    /// <summary>Sends an error reply (header only, flags REPLY|ERROR, error_no = <paramref name="errno"/>). No-op for NO_REPLY commands.</summary>
    public void SendError(in VfioUserHeader request, int errno)
    {
        if (request.NoReply)
        {
            return;
        }
        Send(new VfioUserHeader(request.MessageId, request.Command, VfioUserHeader.Size, VfioUserHeaderFlags.Reply | VfioUserHeaderFlags.Error, (uint)errno), default, default, default);
    }

    private static uint Checked(int payload) => payload > int.MaxValue - VfioUserHeader.Size
        ? throw new ArgumentOutOfRangeException(nameof(payload))
        : (uint)(payload + VfioUserHeader.Size);

    private void Send(VfioUserHeader header, ReadOnlySpan<byte> payload, ReadOnlySpan<byte> bulk, ReadOnlySpan<int> fds)
    {
        byte[]? rented = null;
        try
        {
            Span<byte> small = stackalloc byte[SmallSend];
            scoped ReadOnlySpan<byte> first, second;
            if (VfioUserHeader.Size + payload.Length <= SmallSend)
            {
                header.WriteTo(small);
                payload.CopyTo(small[VfioUserHeader.Size..]);
                first = small[..(VfioUserHeader.Size + payload.Length)];
                second = bulk;
            }
            else if (bulk.IsEmpty)
            {
                header.WriteTo(small);
                first = small[..VfioUserHeader.Size];
                second = payload;
            }
            else
            {
                rented = ArrayPool<byte>.Shared.Rent(VfioUserHeader.Size + payload.Length);
                header.WriteTo(rented);
                payload.CopyTo(rented.AsSpan(VfioUserHeader.Size));
                first = rented.AsSpan(0, VfioUserHeader.Size + payload.Length);
                second = bulk;
            }
            lock (_sendLock)
            {
                ThrowIfClosed();
                _socket.Send(first, second, fds);
            }
        }
        catch (NativeException e)
        {
            Close($"send failed: {e.Message}");
            throw new VfioUserConnectionClosedException($"{Name}: {header.Command}: {e.Message}");
        }
        finally
        {
            if (rented is not null)
            {
                ArrayPool<byte>.Shared.Return(rented);
            }
        }
    }

    private void ThrowIfClosed()
    {
        if (IsClosed)
        {
            throw new VfioUserConnectionClosedException($"{Name}: {_closeReason}");
        }
    }

    private void ReceiveLoop()
    {
        try
        {
            while (!IsClosed)
            {
                while (_deferred.Count > 0)
                {
                    Dispatch(_deferred.Dequeue());
                }
                var m = ReceiveOne();
                if (m is null)
                {
                    Close("peer closed the connection");
                    break;
                }
                if (m.Header.IsReply)
                {
                    CompleteReply(m);
                }
                else
                {
                    Dispatch(m);
                }
            }
        }
        catch (Exception e) when (e is NativeException or EndOfStreamException or ObjectDisposedException or VfioUserException)
        {
            Close(IsClosed ? _closeReason : $"receive failed: {e.Message}");
        }
        finally
        {
            while (_deferred.Count > 0)
            {
                _deferred.Dequeue().Dispose();
            }
            Close(_closeReason);
        }
    }

    private void PumpUntil(Pending p)
    {
        while (!p.Done.IsSet)
        {
            var m = ReceiveOne();
            if (m is null)
            {
                Close("peer closed the connection");
                return;
            }
            if (m.Header.IsReply)
            {
                CompleteReply(m);
            }
            else
            {
                _deferred.Enqueue(m);
            }
        }
    }

    private void Dispatch(VfioUserMessage m)
    {
        try
        {
            _handler!(this, m);
        }
        catch (VfioUserConnectionClosedException)
        {
            throw;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // A device bug must not take the connection down: answer EIO and go on.
            _logger.LogError(e, "{Name}: handler for {Command} threw", Name, m.Header.Command);
            SendError(m.Header, Errno.EIO);
        }
        finally
        {
            m.Dispose();
        }
    }

    private void CompleteReply(VfioUserMessage m)
    {
        if (_pending.TryGetValue(m.Header.MessageId, out var p) && !p.Done.IsSet)
        {
            p.Reply = m;
            p.Done.Set();
        }
        else
        {
            _logger.LogWarning("{Name}: unexpected reply {Header}", Name, m.Header);
            m.Dispose();
        }
    }

    /// <summary>Reads one message. Returns null at end of stream. Oversized or fd-flooded messages are drained and
    /// answered here (E2BIG / EINVAL) so the stream stays in frame; a msg_size below 16 cannot be resynchronized and closes.</summary>
    private VfioUserMessage? ReceiveOne()
    {
        while (true)
        {
            Span<byte> hb = stackalloc byte[VfioUserHeader.Size];
            var fds = _scratchFds;
            if (!_socket.Receive(hb, fds, out bool truncated))
            {
                CloseAll(fds);
                return null;
            }
            var h = VfioUserHeader.ReadFrom(hb);
            if (h.MessageSize < VfioUserHeader.Size)
            {
                CloseAll(fds);
                throw new VfioUserException(Errno.EINVAL, $"{Name}: msg_size {h.MessageSize} is smaller than the header; framing lost");
            }
            long payload = h.MessageSize - VfioUserHeader.Size;
            if (payload > MaxPayloadSize)
            {
                CloseAll(fds);
                Drain(payload);
                _logger.LogWarning("{Name}: refused {Command}: msg_size {Size} over the {Max}-byte bound", Name, h.Command, h.MessageSize, MaxPayloadSize);
                if (h.IsCommand)
                {
                    SendError(h, Errno.E2BIG);
                }
                continue;
            }
            byte[]? buf = payload == 0 ? null : ArrayPool<byte>.Shared.Rent((int)payload);
            try
            {
                if (payload > 0)
                {
                    if (!_socket.Receive(buf.AsSpan(0, (int)payload), fds, out bool t2))
                    {
                        throw new EndOfStreamException("peer closed mid-message");
                    }
                    truncated |= t2;
                }
            }
            catch
            {
                if (buf is not null)
                {
                    ArrayPool<byte>.Shared.Return(buf);
                }
                CloseAll(fds);
                throw;
            }
            List<UnixFd>? owned = fds.Count == 0 ? null : [.. fds];
            fds.Clear();
            return new VfioUserMessage(h, buf, (int)payload, owned, truncated || (owned?.Count ?? 0) > MaxIncomingFds);
        }
    }

    private static void CloseAll(List<UnixFd> fds)
    {
        foreach (var f in fds)
        {
            f.Dispose();
        }
        fds.Clear();
    }

    private void Drain(long bytes)
    {
        byte[] chunk = ArrayPool<byte>.Shared.Rent(DiscardChunk);
        try
        {
            while (bytes > 0)
            {
                int n = (int)Math.Min(bytes, DiscardChunk);
                if (!_socket.Receive(chunk.AsSpan(0, n), null, out _))
                {
                    throw new EndOfStreamException("peer closed mid-message");
                }
                bytes -= n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(chunk);
        }
    }

    private void Close(string reason)
    {
        if (Interlocked.Exchange(ref _closed, 1) == 0)
        {
            _closeReason = reason;
            _socket.Shutdown();
            foreach (var p in _pending.Values)
            {
                try
                {
                    p.Done.Set();
                }
                catch (ObjectDisposedException)
                {
                }
            }
        }
        if (Thread.CurrentThread == _receiveThread || _receiveThread is null)
        {
            if (Interlocked.Exchange(ref _closedRaised, 1) == 0)
            {
                _logger.LogDebug("{Name}: connection closed: {Reason}", Name, _closeReason);
                Closed?.Invoke(_closeReason);
            }
        }
    }

    /// <summary>Shuts the connection down (idempotent) and waits for the receive thread unless called from it.</summary>
    public void Dispose()
    {
        Close("closed locally");
        var t = _receiveThread;
        if (t is not null && t != Thread.CurrentThread)
        {
            t.Join(5000);
        }
        _socket.Dispose();
    }

    private sealed class Pending
    {
        public ManualResetEventSlim Done { get; } = new(false);
        public VfioUserMessage? Reply { get; set; }
    }
}
