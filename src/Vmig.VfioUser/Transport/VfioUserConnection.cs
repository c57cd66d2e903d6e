using System.Buffers;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser.Transport;

/// <summary>Handles one incoming command. It must answer with <see cref="VfioUserConnection.SendReply"/> or
/// <see cref="VfioUserConnection.SendError"/> unless the command has NO_REPLY. The message is disposed after it returns.</summary>
public delegate void VfioUserRequestHandler(VfioUserConnection connection, VfioUserMessage request);

/// <summary>
/// Handles chosen commands with their payload still on the socket (zero-copy receive): the bytes are read with
/// <see cref="VfioUserPayloadReader"/> straight into memory the handler picks (MIG_DATA_WRITE into device state).
/// </summary>
public interface IVfioUserStreamHandler
{
    /// <summary>Whether to stream this command's payload (header only seen; called on the receive thread). False: it is
    /// buffered and goes to the ordinary <see cref="VfioUserRequestHandler"/>.</summary>
    bool ShouldStream(in VfioUserHeader header);

    /// <summary>
    /// Handles the command and answers it (SendReply/SendError), reading as much of the payload as it wants; the
    /// connection drains whatever is left afterwards, so the stream stays in frame. Runs on the receive thread while it
    /// holds the read role: it must not send a request and wait for its reply (nobody would read it).
    /// An exception from a <paramref name="payload"/> read (socket failure, end of stream) must propagate: the
    /// connection then closes. Any other exception is answered with EIO after the payload is drained.
    /// </summary>
    void HandleStream(VfioUserConnection connection, in VfioUserHeader header, VfioUserPayloadReader payload);
}

/// <summary>The unread payload of a streamed command (<see cref="IVfioUserStreamHandler"/>). Valid only during the call.</summary>
public sealed class VfioUserPayloadReader
{
    private readonly VfioUserConnection _owner;

    internal VfioUserPayloadReader(VfioUserConnection owner) => _owner = owner;

    /// <summary>Payload bytes not read yet.</summary>
    public long Remaining { get; private set; }

    internal void Begin(long length) => Remaining = length;

    /// <summary>Receives exactly <c>destination.Length</c> (≤ <see cref="Remaining"/>) payload bytes from the socket into
    /// <paramref name="destination"/>, blocking until they are all in.</summary>
    /// <exception cref="ArgumentOutOfRangeException">More than <see cref="Remaining"/> asked.</exception>
    /// <exception cref="EndOfStreamException">The peer closed mid-message (let it propagate).</exception>
    /// <exception cref="NativeException">A socket error (let it propagate).</exception>
    public void ReadExactly(Span<byte> destination)
    {
        if (destination.Length > Remaining)
        {
            throw new ArgumentOutOfRangeException(nameof(destination), $"{destination.Length} bytes asked, {Remaining} left in the payload");
        }
        _owner.ReceivePayload(destination);
        Remaining -= destination.Length;
    }

    /// <summary>Reads and discards the rest of the payload (bounded: the message passed the connection's size bound).</summary>
    public void DrainRemaining()
    {
        _owner.DrainPayload(Remaining);
        Remaining = 0;
    }
}

/// <summary>
/// One vfio-user connection (either end): 16-byte header framing, SCM_RIGHTS fds, msg_id matching.
/// Sends are serialized under one lock and go out as one sendmsg (header + payload + bulk, no copy of bulk).
/// Receiving is leader/follower: one thread at a time holds the read role. A thread waiting for its reply takes the
/// role itself when it is free and reads from the socket, so the reply reaches it without a thread hand-off (and a
/// bulk reply can land straight in its buffer, <see cref="SendRequestInto"/>); replies it reads for other callers are
/// handed to them, commands it reads go to the receive thread. The receive thread reads only while nobody waits for a
/// reply, and runs every command handler, one at a time, in arrival order. A request sent FROM a handler (a device's
/// DMA_READ while handling a doorbell) waits the same way; commands that arrive meanwhile run after the handler returns.
/// </summary>
/// <remarks>Shutdown is idempotent: <see cref="Dispose"/> from any thread fails pending requests with
/// <see cref="VfioUserConnectionClosedException"/> and raises <see cref="Closed"/> once.</remarks>
public sealed class VfioUserConnection : IDisposable
{
    /// <summary>Default bound on an incoming payload: 1 MiB of data plus headers, refused above (E2BIG) without allocating.</summary>
    public const int DefaultMaxPayloadSize = (1 << 20) + 4096;

    private const int SmallSend = 256;
    private const int DiscardChunk = 64 * 1024;
    // SO_RCVTIMEO and poll interval: how often a blocked reader looks at its deadline and at shutdown.
    private const int TickMs = 100;
    // How long the receive thread stays parked while callers read, before it looks again, on a connection that has
    // not carried a command from the peer yet (see _commandsSeen): LazyParkMs at first, doubled each time it finds
    // callers still at it, up to LazyParkMaxMs; back to LazyParkMs once it finds the connection idle.
    private const int LazyParkMs = 1;
    private const int LazyParkMaxMs = 16;

    private readonly FdSocket _socket;
    private readonly ILogger _logger;
    private readonly object _sendLock = new();
    // Guards everything below it: the read role, pending requests, the command queue and the receive thread's state.
    private readonly object _gate = new();
    private readonly Dictionary<ushort, Pending> _pending = [];
    private readonly Queue<VfioUserMessage> _commands = new();
    private readonly EventFd _wake;
    // Reader scratch for fds: most messages carry none, so a message gets its own list only when some arrived.
    // Only the holder of the read role touches it.
    private readonly List<UnixFd> _scratchFds = [];
    private bool _reading;
    private bool _rxReading;
    private int _waiters;
    private int _roleWaiters;
    private RxState _rx = RxState.Busy;
    private bool _wakeSignaled;
    // Until a caller first finds the receive thread holding the read role, the receive thread blocks in recvmsg itself
    // (one syscall per message, as a server with no requests of its own needs). From then on it polls first and reads
    // only when nobody waits for a reply.
    private bool _pollMode;
    // Set once the peer has sent a command (every server connection; a client once the server does DMA by message).
    // Before that, the last caller to leave does not wake the parked receive thread: it looks again within
    // LazyParkMs by itself. Waking it at the end of every call would cost a thread wake-up per round trip; the price is
    // that the peer's first command may wait up to the current park time (≤ LazyParkMaxMs) if it arrives just after a
    // call. The park time backs off while calls keep coming back to back (a MIG_DATA stream of 1 MiB calls), so the
    // receive thread wakes ~60 times a second, not once a millisecond, while nothing can need it.
    private bool _commandsSeen;
    private int _lazyParkMs = LazyParkMs;
    private VfioUserRequestHandler? _handler;
    private IVfioUserStreamHandler? _streamHandler;
    private VfioUserPayloadReader? _payloadReader;
    private Thread? _receiveThread;
    private int _nextId;
    private int _closed;
    private int _closedRaised;
    private int _disposed;
    private int _wakeDisposed;
    private string _closeReason = "closed";

    public VfioUserConnection(FdSocket socket, string name, ILogger? logger = null)
    {
        _socket = socket ?? throw new ArgumentNullException(nameof(socket));
        Name = name;
        _logger = logger ?? NullLogger.Instance;
        _wake = EventFd.Create();
        try
        {
            _socket.SetReceiveTimeout(TickMs);
        }
        catch (NativeException e)
        {
            // Not a socket we can tune (already closed): the first receive reports the real error.
            _logger.LogDebug("{Name}: SO_RCVTIMEO: {Message}", name, e.Message);
        }
    }

    /// <summary>For logs.</summary>
    public string Name { get; }

    /// <summary>Largest payload accepted (msg_size − 16). Larger messages are drained and refused with E2BIG.</summary>
    public int MaxPayloadSize { get; set; } = DefaultMaxPayloadSize;

    /// <summary>Most fds accepted with one message (our max_msg_fds). Commands with more get EINVAL.</summary>
    public int MaxIncomingFds { get; set; } = 16;

    /// <summary>Default timeout for <see cref="SendRequest"/>, in milliseconds (checked every 100 ms while waiting).</summary>
    public int RequestTimeoutMs { get; set; } = 30_000;

    /// <summary>True once the connection is shut down.</summary>
    public bool IsClosed => Volatile.Read(ref _closed) != 0;

    /// <summary>Raised once when the connection ends, with the reason.</summary>
    public event Action<string>? Closed;

    /// <summary>Starts the receive thread. Commands go to <paramref name="handler"/>, or, for those
    /// <paramref name="streamHandler"/> picks, to it with the payload still on the socket.</summary>
    /// <remarks>A command is streamed only when the receive thread reads it (in order after every queued command), it
    /// carries no fds and it is within <see cref="MaxPayloadSize"/>; otherwise it is buffered as usual.</remarks>
    public void Start(VfioUserRequestHandler handler, IVfioUserStreamHandler? streamHandler = null)
    {
        _handler = handler ?? throw new ArgumentNullException(nameof(handler));
        _streamHandler = streamHandler;
        _payloadReader = streamHandler is null ? null : new VfioUserPayloadReader(this);
        _receiveThread = new Thread(ReceiveLoop) { IsBackground = true, Name = "vfio-user rx " + Name };
        _receiveThread.Start();
    }

    /// <summary>
    /// Sends a command and waits for its reply. Returns the reply (caller disposes it).
    /// </summary>
    /// <exception cref="VfioUserException">Error reply (errno from the peer), ETIMEDOUT, or E2BIG when the reply was
    /// over <see cref="MaxPayloadSize"/> (drained).</exception>
    /// <exception cref="VfioUserConnectionClosedException">The connection ended first.</exception>
    public VfioUserMessage SendRequest(VfioUserCommand command, ReadOnlySpan<byte> payload, ReadOnlySpan<byte> bulk = default,
        ReadOnlySpan<int> fds = default, int timeoutMs = 0)
    {
        var p = Call(command, payload, bulk, fds, timeoutMs, default, default, direct: false);
        return p.Reply!;
    }

    /// <summary>
    /// Sends a command and receives its reply's payload into caller memory: the first <c>replyHead.Length</c> bytes
    /// into <paramref name="replyHead"/> (the reply's fixed fields), the rest into <paramref name="replyTail"/> (bulk
    /// data: MIG_DATA_READ, REGION_READ, DMA_READ). When this thread reads the reply itself — the usual case — the
    /// bytes go from the socket straight into the spans; when another reader got it first they are copied from its
    /// buffer. Returns the reply's payload length (msg_size − 16, at most head + tail); a shorter reply fills the head
    /// first. Fds sent with the reply are closed.
    /// </summary>
    /// <exception cref="VfioUserException">Error reply (errno from the peer), ETIMEDOUT, EPROTO when the reply is
    /// longer than head + tail (drained) or answers another command.</exception>
    /// <exception cref="VfioUserConnectionClosedException">The connection ended first.</exception>
    public int SendRequestInto(VfioUserCommand command, ReadOnlySpan<byte> payload, ReadOnlySpan<byte> bulk,
        Span<byte> replyHead, Span<byte> replyTail, int timeoutMs = 0)
    {
        var p = Call(command, payload, bulk, default, timeoutMs, replyHead, replyTail, direct: true);
        if (p.Reply is not { } r)
        {
            return p.DirectLength;
        }
        // Another reader took the reply into a pooled buffer: copy it out.
        using (r)
        {
            if (r.Length > replyHead.Length + replyTail.Length)
            {
                throw new VfioUserException(Errno.EPROTO, $"{Name}: reply to {command} has {r.Length} payload bytes, room for {replyHead.Length + replyTail.Length}", command);
            }
            int h = Math.Min(r.Length, replyHead.Length);
            r.Payload[..h].CopyTo(replyHead);
            r.Payload[h..].CopyTo(replyTail);
            return r.Length;
        }
    }

    private Pending Call(VfioUserCommand command, ReadOnlySpan<byte> payload, ReadOnlySpan<byte> bulk, ReadOnlySpan<int> fds,
        int timeoutMs, Span<byte> replyHead, Span<byte> replyTail, bool direct)
    {
        int timeout = timeoutMs > 0 ? timeoutMs : RequestTimeoutMs;
        var p = new Pending();
        bool handedOut = false;
        lock (_gate)
        {
            do
            {
                p.Id = (ushort)Interlocked.Increment(ref _nextId);
            }
            while (!_pending.TryAdd(p.Id, p));
            // Counted before the request leaves, so the receive thread keeps off the socket from now on.
            _waiters++;
        }
        try
        {
            ThrowIfClosed();
            Send(new VfioUserHeader(p.Id, command, Checked(payload.Length + bulk.Length), VfioUserHeaderFlags.Command), payload, bulk, fds);
            WaitForReply(p, command, Environment.TickCount64 + timeout, timeout, replyHead, replyTail, direct);
            if (p.LocalErrno != 0)
            {
                throw new VfioUserException(p.LocalErrno, $"{Name}: {command}: {p.LocalError}", command);
            }
            if (p.Reply is null && !p.DirectDone)
            {
                throw new VfioUserConnectionClosedException($"{Name}: {command}: {_closeReason}");
            }
            var h = p.Reply?.Header ?? p.DirectHeader;
            if (h.IsError)
            {
                int e = (int)h.ErrorNo;
                throw new VfioUserException(e == 0 ? Errno.EIO : e, $"{Name}: {command} failed: errno {e}", command);
            }
            if (h.Command != command)
            {
                throw new VfioUserException(Errno.EPROTO, $"{Name}: reply to {command} carries command {h.Command}", command);
            }
            handedOut = true;
            return p;
        }
        finally
        {
            lock (_gate)
            {
                _pending.Remove(p.Id);
                if (--_waiters == 0 && !_reading && _rx == RxState.Parked && _commandsSeen)
                {
                    // Nobody waits for a reply any more: the receive thread must watch the socket again, now.
                    WakeReceiver();
                }
            }
            if (!handedOut)
            {
                p.Reply?.Dispose();
            }
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

    /// <summary>
    /// Sends the reply to <paramref name="request"/>: <paramref name="payload"/> (a small head) then every segment of
    /// <paramref name="segments"/>, with one vectored sendmsg and no copy of the segments (zero-copy MIG_DATA_READ).
    /// No-op for NO_REPLY commands. The segments must not change until this returns.
    /// </summary>
    public void SendReplyGather(in VfioUserHeader request, ReadOnlySpan<byte> payload, ReadOnlySpan<ReadOnlyMemory<byte>> segments)
    {
        if (request.NoReply)
        {
            return;
        }
        long total = payload.Length;
        foreach (var seg in segments)
        {
            total += seg.Length;
        }
        if (total > int.MaxValue - VfioUserHeader.Size)
        {
            throw new ArgumentOutOfRangeException(nameof(segments));
        }
        var header = new VfioUserHeader(request.MessageId, request.Command, (uint)(total + VfioUserHeader.Size), VfioUserHeaderFlags.Reply);
        if (VfioUserHeader.Size + payload.Length > SmallSend)
        {
            throw new ArgumentOutOfRangeException(nameof(payload), $"a gathered reply's head is at most {SmallSend - VfioUserHeader.Size} bytes");
        }
        Span<byte> first = stackalloc byte[VfioUserHeader.Size + payload.Length];
        header.WriteTo(first);
        payload.CopyTo(first[VfioUserHeader.Size..]);
        try
        {
            lock (_sendLock)
            {
                ThrowIfClosed();
                _socket.SendGather(first, segments);
            }
        }
        catch (NativeException e)
        {
            Close($"send failed: {e.Message}");
            throw new VfioUserConnectionClosedException($"{Name}: {header.Command}: {e.Message}");
        }
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

    /// <summary>Waits until <paramref name="p"/> is answered, reading the socket whenever the read role is free.</summary>
    private void WaitForReply(Pending p, VfioUserCommand command, long deadline, int timeout, Span<byte> replyHead, Span<byte> replyTail, bool direct)
    {
        while (true)
        {
            lock (_gate)
            {
                while (true)
                {
                    if (p.Done || IsClosed)
                    {
                        return;
                    }
                    if (!_reading)
                    {
                        _reading = true;
                        break;
                    }
                    if (_rxReading)
                    {
                        // The receive thread sits in recvmsg and will hand this reply over; from now on it polls first.
                        _pollMode = true;
                    }
                    long left = deadline - Environment.TickCount64;
                    if (left <= 0)
                    {
                        throw TimedOut(command, timeout);
                    }
                    _roleWaiters++;
                    try
                    {
                        Monitor.Wait(_gate, (int)Math.Min(left, TickMs * 10));
                    }
                    finally
                    {
                        _roleWaiters--;
                    }
                }
            }
            ReadKind k = ReadAndFinish(dontWait: false, direct ? p : null, replyHead, replyTail);
            if (k == ReadKind.EndOfStream)
            {
                return;
            }
            if (k == ReadKind.TimedOut && !p.Done && Environment.TickCount64 >= deadline)
            {
                throw TimedOut(command, timeout);
            }
        }
    }

    private VfioUserException TimedOut(VfioUserCommand command, int timeout) =>
        new(Errno.ETIMEDOUT, $"{Name}: no reply to {command} within {timeout} ms", command);

    /// <summary>
    /// With the read role held: reads one message and, before giving the role up, delivers it (a reply to its waiter,
    /// a command to the queue), so commands keep their order whoever reads them. End of stream or a socket error closes
    /// the connection (<see cref="ReadKind.EndOfStream"/>).
    /// </summary>
    private ReadKind ReadAndFinish(bool dontWait, Pending? direct, Span<byte> replyHead, Span<byte> replyTail)
    {
        ReadKind k;
        VfioUserMessage? m = null;
        try
        {
            k = ReadOne(dontWait, direct, replyHead, replyTail, out m);
        }
        catch (Exception e) when (e is NativeException or EndOfStreamException or ObjectDisposedException or VfioUserException)
        {
            ReleaseRole();
            Close($"receive failed: {e.Message}");
            return ReadKind.EndOfStream;
        }
        VfioUserMessage? unexpected = null;
        lock (_gate)
        {
            if (k == ReadKind.Direct)
            {
                direct!.DirectDone = true;
                direct.Done = true;
            }
            else if (k == ReadKind.Streamed)
            {
                _commandsSeen = true;
            }
            else if (m is not null)
            {
                if (m.Header.IsReply)
                {
                    if (_pending.TryGetValue(m.Header.MessageId, out var owner) && !owner.Done)
                    {
                        owner.Reply = m;
                        owner.Done = true;
                    }
                    else
                    {
                        unexpected = m;
                    }
                }
                else
                {
                    _commandsSeen = true;
                    _commands.Enqueue(m);
                    WakeReceiver();
                }
            }
            ReleaseRoleLocked();
        }
        if (unexpected is not null)
        {
            _logger.LogWarning("{Name}: unexpected reply {Header}", Name, unexpected.Header);
            unexpected.Dispose();
        }
        if (k == ReadKind.EndOfStream)
        {
            Close("peer closed the connection");
        }
        return k;
    }

    private void ReleaseRole()
    {
        lock (_gate)
        {
            ReleaseRoleLocked();
        }
    }

    private void ReleaseRoleLocked()
    {
        _reading = false;
        _rxReading = false;
        if (_roleWaiters > 0)
        {
            Monitor.PulseAll(_gate);
        }
    }

    /// <summary>Wakes the receive thread out of its poll (under <see cref="_gate"/>): a command is queued, nobody waits for a
    /// reply any more, or the connection closed. One eventfd write until the thread has seen it.</summary>
    private void WakeReceiver()
    {
        if (_rx == RxState.Busy || _wakeSignaled)
        {
            return;
        }
        _wakeSignaled = true;
        try
        {
            _wake.Signal();
        }
        catch (Exception e) when (e is ObjectDisposedException or NativeException)
        {
            // Disposed: the receive thread is gone.
        }
    }

    private void ReceiveLoop()
    {
        try
        {
            while (!IsClosed)
            {
                VfioUserMessage? command = null;
                RxState next;
                lock (_gate)
                {
                    if (_commands.Count > 0)
                    {
                        command = _commands.Dequeue();
                        next = RxState.Busy;
                    }
                    else if (_reading || _waiters > 0)
                    {
                        // A caller reads (or is about to): stay off the socket until nobody waits.
                        next = RxState.Parked;
                    }
                    else if (_pollMode)
                    {
                        next = RxState.Polling;
                        _lazyParkMs = LazyParkMs;
                    }
                    else
                    {
                        _reading = true;
                        _rxReading = true;
                        next = RxState.Busy;
                        _lazyParkMs = LazyParkMs;
                    }
                    _rx = next;
                }
                if (command is not null)
                {
                    Dispatch(command);
                    continue;
                }
                if (next == RxState.Busy)
                {
                    ReadAndFinish(dontWait: false, null, default, default);
                    continue;
                }
                bool readable = false;
                if (next == RxState.Parked)
                {
                    // Consumes the wake-up if one came.
                    int park = _commandsSeen ? TickMs : _lazyParkMs;
                    if (_wake.Wait(park) == 0 && !_commandsSeen)
                    {
                        // Not woken: the next park (if callers are still reading) is longer.
                        _lazyParkMs = Math.Min(LazyParkMaxMs, _lazyParkMs * 2);
                    }
                }
                else
                {
                    readable = _socket.WaitReadable(TickMs, _wake.Handle, out bool woken);
                    if (woken)
                    {
                        _ = FdIo.TryReadUInt64(_wake.Handle, out _);
                    }
                }
                lock (_gate)
                {
                    _rx = RxState.Busy;
                    _wakeSignaled = false;
                    if (!readable || _reading || _waiters > 0 || _commands.Count > 0)
                    {
                        continue;
                    }
                    _reading = true;
                    _rxReading = true;
                }
                // Someone may have read the data between poll and taking the role: don't block for the next message.
                ReadAndFinish(dontWait: true, null, default, default);
            }
        }
        catch (Exception e) when (e is NativeException or EndOfStreamException or ObjectDisposedException or VfioUserException)
        {
            Close($"receive failed: {e.Message}");
        }
        finally
        {
            List<VfioUserMessage> left;
            lock (_gate)
            {
                _rx = RxState.Busy;
                left = [.. _commands];
                _commands.Clear();
            }
            foreach (var m in left)
            {
                m.Dispose();
            }
            Close(_closeReason);
            if (Volatile.Read(ref _disposed) != 0)
            {
                DisposeWake();
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

    /// <summary>
    /// Reads one message (the read role must be held). A reply to <paramref name="direct"/> lands in
    /// <paramref name="replyHead"/>/<paramref name="replyTail"/> (<see cref="ReadKind.Direct"/>); anything else becomes a
    /// <see cref="VfioUserMessage"/>. Oversized or fd-flooded messages are drained and answered here (E2BIG / EINVAL;
    /// an oversized reply fails its waiter with E2BIG) so the stream stays in frame; a msg_size below 16 cannot be
    /// resynchronized and throws.
    /// </summary>
    private ReadKind ReadOne(bool dontWait, Pending? direct, Span<byte> replyHead, Span<byte> replyTail, out VfioUserMessage? message)
    {
        message = null;
        Span<byte> hb = stackalloc byte[VfioUserHeader.Size];
        var fds = _scratchFds;
        var status = _socket.TryReceive(hb, fds, dontWait, out bool truncated);
        if (status != ReceiveStatus.Received)
        {
            CloseAll(fds);
            return status switch
            {
                ReceiveStatus.EndOfStream => ReadKind.EndOfStream,
                _ => ReadKind.TimedOut,
            };
        }
        var h = VfioUserHeader.ReadFrom(hb);
        if (h.MessageSize < VfioUserHeader.Size)
        {
            CloseAll(fds);
            throw new VfioUserException(Errno.EINVAL, $"{Name}: msg_size {h.MessageSize} is smaller than the header; framing lost");
        }
        long payload = h.MessageSize - VfioUserHeader.Size;
        if (direct is not null && h.IsReply && h.MessageId == direct.Id)
        {
            return ReadDirect(h, payload, direct, replyHead, replyTail);
        }
        if (payload > MaxPayloadSize)
        {
            CloseAll(fds);
            Drain(payload);
            _logger.LogWarning("{Name}: refused {Command}: msg_size {Size} over the {Max}-byte bound", Name, h.Command, h.MessageSize, MaxPayloadSize);
            if (h.IsCommand)
            {
                SendError(h, Errno.E2BIG);
            }
            else if (h.IsReply)
            {
                FailPending(h.MessageId, Errno.E2BIG, $"reply of {h.MessageSize} bytes is over the {MaxPayloadSize}-byte bound");
            }
            return ReadKind.Skipped;
        }
        if (_streamHandler is { } sh && h.IsCommand && fds.Count == 0 && !truncated && Thread.CurrentThread == _receiveThread
            && sh.ShouldStream(h))
        {
            // The receive thread reads only with its queue empty, so running the command now keeps arrival order.
            RunStream(sh, h, payload);
            return ReadKind.Streamed;
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
        message = new VfioUserMessage(h, buf, (int)payload, owned, truncated || (owned?.Count ?? 0) > MaxIncomingFds);
        return ReadKind.Message;
    }

    /// <summary>The reply this thread waits for, read from the socket straight into the caller's spans.</summary>
    private ReadKind ReadDirect(VfioUserHeader h, long payload, Pending p, Span<byte> replyHead, Span<byte> replyTail)
    {
        var fds = _scratchFds;
        try
        {
            p.DirectHeader = h;
            if (h.IsError || payload > replyHead.Length + replyTail.Length)
            {
                Drain(payload);
                if (!h.IsError)
                {
                    p.LocalErrno = Errno.EPROTO;
                    p.LocalError = $"reply has {payload} payload bytes, room for {replyHead.Length + replyTail.Length}";
                }
                return ReadKind.Direct;
            }
            int n1 = (int)Math.Min(payload, replyHead.Length);
            int n2 = (int)payload - n1;
            if ((n1 > 0 && !_socket.Receive(replyHead[..n1], fds, out _)) || (n2 > 0 && !_socket.Receive(replyTail[..n2], fds, out _)))
            {
                throw new EndOfStreamException("peer closed mid-message");
            }
            p.DirectLength = (int)payload;
            return ReadKind.Direct;
        }
        finally
        {
            // Replies read into caller memory carry no fds (MIG_DATA_READ, REGION_READ, DMA_READ): close any that came.
            CloseAll(fds);
        }
    }

    /// <summary>Runs a streamed command with the read role held; drains what the handler left of the payload.</summary>
    private void RunStream(IVfioUserStreamHandler sh, VfioUserHeader h, long payload)
    {
        var reader = _payloadReader!;
        reader.Begin(payload);
        try
        {
            sh.HandleStream(this, h, reader);
        }
        catch (Exception e) when (e is not (NativeException or EndOfStreamException or ObjectDisposedException or VfioUserException or OutOfMemoryException))
        {
            // A device bug must not take the connection down: answer EIO (after the payload, to stay in frame) and go on.
            _logger.LogError(e, "{Name}: streamed handler for {Command} threw", Name, h.Command);
            reader.DrainRemaining();
            SendError(h, Errno.EIO);
            return;
        }
        reader.DrainRemaining();
    }

    internal void ReceivePayload(Span<byte> destination)
    {
        if (destination.IsEmpty)
        {
            return;
        }
        var fds = _scratchFds;
        try
        {
            if (!_socket.Receive(destination, fds, out _))
            {
                throw new EndOfStreamException("peer closed mid-message");
            }
        }
        finally
        {
            // Fds belong to a message's first byte; any riding on payload bytes are closed.
            CloseAll(fds);
        }
    }

    internal void DrainPayload(long bytes) => Drain(bytes);

    private void FailPending(ushort id, int errno, string why)
    {
        lock (_gate)
        {
            if (_pending.TryGetValue(id, out var p) && !p.Done)
            {
                p.LocalErrno = errno;
                p.LocalError = why;
                p.Done = true;
            }
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
        if (bytes <= 0)
        {
            return;
        }
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
            lock (_gate)
            {
                foreach (var p in _pending.Values)
                {
                    p.Done = true;
                }
                Monitor.PulseAll(_gate);
                WakeReceiver();
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
        Volatile.Write(ref _disposed, 1);
        if (t is null || !t.IsAlive)
        {
            DisposeWake();
        }
    }

    // The eventfd goes when both Dispose has run and the receive thread has ended (Dispose may run on that thread).
    private void DisposeWake()
    {
        if (Interlocked.Exchange(ref _wakeDisposed, 1) == 0)
        {
            _wake.Dispose();
        }
    }

    private enum ReadKind
    {
        Message,
        Direct,
        Streamed,
        Skipped,
        TimedOut,
        EndOfStream,
    }

    private enum RxState
    {
        Busy,
        Parked,
        Polling,
    }

    /// <summary>One request waiting for its reply. Every field is written under <see cref="_gate"/>, or by the thread
    /// holding the read role for the direct fields.</summary>
    private sealed class Pending
    {
        public ushort Id;
        public bool Done;
        public VfioUserMessage? Reply;
        public bool DirectDone;
        public VfioUserHeader DirectHeader;
        public int DirectLength;
        public int LocalErrno;
        public string? LocalError;
    }
}
