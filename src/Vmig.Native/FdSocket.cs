using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace Vmig.Native;

/// <summary>
/// A connected AF_UNIX stream socket used with blocking sendmsg/recvmsg so that file descriptors travel
/// as SCM_RIGHTS ancillary data. .NET's Socket API silently drops received fds, so every read goes
/// through <see cref="Receive"/>. The socket is never used with .NET async operations: those switch
/// the fd to O_NONBLOCK behind our back (measured; see shared/reference/dotnet-on-this-machine.md).
/// </summary>
public sealed unsafe class FdSocket : IDisposable
{
    /// <summary>The most fds one message may carry in either direction (control buffer size).</summary>
    public const int MaxFdsPerMessage = 64;

    /// <summary>Most iovecs one <see cref="SendGather"/> sendmsg carries (well under IOV_MAX = 1024); more are sent in turns.</summary>
    public const int MaxGatherIov = 64;

    private readonly SafeHandle _handle;
    private readonly Socket? _socket;
    private int _shutdown;

    /// <summary>Wraps a connected .NET socket (which must only ever have been used synchronously).</summary>
    public FdSocket(Socket socket)
    {
        ArgumentNullException.ThrowIfNull(socket);
        _socket = socket;
        _handle = socket.SafeHandle;
    }

    private FdSocket(UnixFd fd) => _handle = fd;

    /// <summary>A connected pair from socketpair(2) (tests, in-process peers).</summary>
    public static (FdSocket A, FdSocket B) CreatePair()
    {
        int* sv = stackalloc int[2];
        // SAFETY: sv holds two ints as socketpair requires.
        if (Libc.socketpair(Libc.AF_UNIX, Libc.SOCK_STREAM | Libc.SOCK_CLOEXEC, 0, sv) != 0)
        {
            throw NativeException.FromLastError("socketpair");
        }
        return (new FdSocket(new UnixFd(sv[0])), new FdSocket(new UnixFd(sv[1])));
    }

    /// <summary>Connects to a listening UNIX socket at <paramref name="path"/>.</summary>
    /// <exception cref="SocketException">Connection refused, no such file…</exception>
    public static FdSocket Connect(string path)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            s.Connect(new UnixDomainSocketEndPoint(path));
            return new FdSocket(s);
        }
        catch
        {
            s.Dispose();
            throw;
        }
    }

    /// <summary>The descriptor number, e.g. to pass this socket to a peer with SCM_RIGHTS. Valid until dispose.</summary>
    public int Fd => (int)_handle.DangerousGetHandle();

    /// <summary>Wraps an fd received from a peer (twin socket) or inherited; takes ownership.</summary>
    public static FdSocket FromFd(UnixFd fd) => new(fd);

    /// <summary>Sends <paramref name="first"/> then <paramref name="second"/> as one byte sequence, with
    /// <paramref name="fds"/> attached to the first byte. Blocks until everything is written.</summary>
    /// <exception cref="NativeException">The peer is gone (EPIPE, ECONNRESET) or another socket error.</exception>
    public void Send(ReadOnlySpan<byte> first, ReadOnlySpan<byte> second, ReadOnlySpan<int> fds)
    {
        if (fds.Length > MaxFdsPerMessage)
        {
            throw new ArgumentOutOfRangeException(nameof(fds), $"at most {MaxFdsPerMessage} fds per message");
        }
        if (first.IsEmpty && second.IsEmpty)
        {
            throw new ArgumentException("SOCK_STREAM needs at least one data byte to carry fds", nameof(first));
        }
        bool added = false;
        try
        {
            _handle.DangerousAddRef(ref added);
            int fd = (int)_handle.DangerousGetHandle();
            int ctlLen = fds.IsEmpty ? 0 : CmsgSpace(fds.Length * sizeof(int));
            byte* ctl = stackalloc byte[CmsgSpace(MaxFdsPerMessage * sizeof(int))];
            int off1 = 0, off2 = 0;
            bool fdsSent = fds.IsEmpty;
            Libc.IoVec* iov = stackalloc Libc.IoVec[2];
            fixed (byte* p1 = first)
            fixed (byte* p2 = second)
            {
                while (off1 < first.Length || off2 < second.Length)
                {
                    // SAFETY: iovecs point into the pinned spans at offsets < their lengths; ctl is a stack
                    // buffer sized for MaxFdsPerMessage; msghdr lives on this frame for the syscall.
                    int n = 0;
                    if (off1 < first.Length)
                    {
                        iov[n++] = new Libc.IoVec { Base = p1 + off1, Len = (nuint)(first.Length - off1) };
                    }
                    if (off2 < second.Length)
                    {
                        iov[n++] = new Libc.IoVec { Base = p2 + off2, Len = (nuint)(second.Length - off2) };
                    }
                    var msg = new Libc.MsgHdr { Iov = iov, IovLen = (nuint)n };
                    if (!fdsSent)
                    {
                        var c = (Libc.CmsgHdr*)ctl;
                        c->Len = (nuint)(sizeof(Libc.CmsgHdr) + fds.Length * sizeof(int));
                        c->Level = Libc.SOL_SOCKET;
                        c->Type = Libc.SCM_RIGHTS;
                        fds.CopyTo(new Span<int>(ctl + sizeof(Libc.CmsgHdr), fds.Length));
                        msg.Control = ctl;
                        msg.ControlLen = (nuint)ctlLen;
                    }
                    nint w = SendOnce(fd, &msg);
                    if (w < 0)
                    {
                        continue;
                    }
                    fdsSent = true;
                    long left = w;
                    int a = (int)Math.Min(left, first.Length - off1);
                    off1 += a;
                    left -= a;
                    off2 += (int)left;
                }
            }
        }
        finally
        {
            if (added)
            {
                _handle.DangerousRelease();
            }
        }
    }

    /// <summary>
    /// Sends <paramref name="first"/> then every segment of <paramref name="segments"/> in order as one byte sequence,
    /// with vectored sendmsg (up to <see cref="MaxGatherIov"/> iovecs per call): no segment is copied. Blocks until
    /// everything is written. The segments must not change until this returns (they are read by the kernel in place).
    /// </summary>
    /// <exception cref="NativeException">The peer is gone (EPIPE, ECONNRESET) or another socket error.</exception>
    public void SendGather(ReadOnlySpan<byte> first, ReadOnlySpan<ReadOnlyMemory<byte>> segments)
    {
        if (segments.IsEmpty)
        {
            Send(first, default, default);
            return;
        }
        var pins = System.Buffers.ArrayPool<System.Buffers.MemoryHandle>.Shared.Rent(segments.Length);
        int pinned = 0;
        bool added = false;
        try
        {
            for (; pinned < segments.Length; pinned++)
            {
                pins[pinned] = segments[pinned].Pin();
            }
            _handle.DangerousAddRef(ref added);
            int fd = (int)_handle.DangerousGetHandle();
            Libc.IoVec* iov = stackalloc Libc.IoVec[MaxGatherIov];
            // Cursor: segment index (-1 = first) and bytes of it already sent.
            int seg = first.IsEmpty ? 0 : -1;
            long done = 0;
            fixed (byte* p0 = first)
            {
                while (true)
                {
                    while (seg >= 0 && seg < segments.Length && done == segments[seg].Length)
                    {
                        seg++;
                        done = 0;
                    }
                    if (seg >= segments.Length)
                    {
                        return;
                    }
                    // SAFETY: every iovec points into `first` (pinned by fixed) or into a segment pinned above, at an
                    // offset below its length; at most MaxGatherIov entries are written to the stack array.
                    int n = 0;
                    for (int i = seg; i < segments.Length && n < MaxGatherIov; i++)
                    {
                        long skip = i == seg ? done : 0;
                        if (i < 0)
                        {
                            iov[n++] = new Libc.IoVec { Base = p0 + skip, Len = (nuint)(first.Length - skip) };
                        }
                        else if (segments[i].Length > skip)
                        {
                            iov[n++] = new Libc.IoVec { Base = (byte*)pins[i].Pointer + skip, Len = (nuint)(segments[i].Length - skip) };
                        }
                    }
                    var msg = new Libc.MsgHdr { Iov = iov, IovLen = (nuint)n };
                    nint w = SendOnce(fd, &msg);
                    if (w < 0)
                    {
                        continue;
                    }
                    // Advance the cursor by w bytes.
                    long left = w;
                    while (left > 0)
                    {
                        long len = seg < 0 ? first.Length : segments[seg].Length;
                        long k = Math.Min(left, len - done);
                        done += k;
                        left -= k;
                        if (done == len)
                        {
                            seg++;
                            done = 0;
                        }
                    }
                }
            }
        }
        finally
        {
            if (added)
            {
                _handle.DangerousRelease();
            }
            for (int i = 0; i < pinned; i++)
            {
                pins[i].Dispose();
            }
            System.Buffers.ArrayPool<System.Buffers.MemoryHandle>.Shared.Return(pins, clearArray: true);
        }
    }

    /// <summary>
    /// Fills <paramref name="buffer"/> completely, collecting any fds that arrive into <paramref name="fds"/>
    /// (caller owns them). Returns false on orderly end of stream before the first byte; throws
    /// <see cref="EndOfStreamException"/> on end of stream mid-buffer. <paramref name="fdsTruncated"/> is set when
    /// the peer sent more than <see cref="MaxFdsPerMessage"/> fds (MSG_CTRUNC: the kernel closed the excess).
    /// Blocks however long the first byte takes, even with a receive timeout set.
    /// </summary>
    /// <exception cref="NativeException">A socket error.</exception>
    public bool Receive(Span<byte> buffer, List<UnixFd>? fds, out bool fdsTruncated)
    {
        while (true)
        {
            // Blocking: only TimedOut (SO_RCVTIMEO, nothing consumed) comes back short of a result.
            var status = TryReceive(buffer, fds, dontWait: false, out fdsTruncated);
            if (status != ReceiveStatus.TimedOut)
            {
                return status == ReceiveStatus.Received;
            }
        }
    }

    /// <summary>
    /// Like <see cref="Receive"/>, but gives up before the first byte: with <paramref name="dontWait"/> when nothing is
    /// queued (<see cref="ReceiveStatus.WouldBlock"/>, one recvmsg with MSG_DONTWAIT), otherwise when the
    /// <see cref="SetReceiveTimeout"/> interval passes with nothing queued (<see cref="ReceiveStatus.TimedOut"/>).
    /// Once the first byte is in, it blocks until the buffer is full (the rest of a message is on its way).
    /// </summary>
    /// <exception cref="NativeException">A socket error.</exception>
    /// <exception cref="EndOfStreamException">End of stream mid-buffer.</exception>
    public ReceiveStatus TryReceive(Span<byte> buffer, List<UnixFd>? fds, bool dontWait, out bool fdsTruncated)
    {
        fdsTruncated = false;
        bool added = false;
        try
        {
            _handle.DangerousAddRef(ref added);
            int fd = (int)_handle.DangerousGetHandle();
            int ctlCap = CmsgSpace(MaxFdsPerMessage * sizeof(int));
            byte* ctl = stackalloc byte[ctlCap];
            int got = 0;
            fixed (byte* p = buffer)
            {
                while (got < buffer.Length)
                {
                    // SAFETY: the iovec points into the pinned buffer past the bytes already received;
                    // ctl is a stack buffer of ctlCap bytes.
                    var iov = new Libc.IoVec { Base = p + got, Len = (nuint)(buffer.Length - got) };
                    var msg = new Libc.MsgHdr { Iov = &iov, IovLen = 1, Control = ctl, ControlLen = (nuint)ctlCap };
                    int flags = Libc.MSG_CMSG_CLOEXEC | Libc.MSG_WAITALL | (dontWait && got == 0 ? Libc.MSG_DONTWAIT : 0);
                    nint r = Libc.recvmsg(fd, &msg, flags);
                    if (r < 0)
                    {
                        int e = Marshal.GetLastPInvokeError();
                        if (e == Libc.EINTR)
                        {
                            continue;
                        }
                        if (e == Libc.EAGAIN)
                        {
                            if (got == 0)
                            {
                                // Nothing of this buffer consumed yet: the caller may give up without losing framing.
                                return dontWait ? ReceiveStatus.WouldBlock : ReceiveStatus.TimedOut;
                            }
                            WaitReadable(fd);
                            continue;
                        }
                        throw new NativeException("recvmsg", e);
                    }
                    fdsTruncated |= (msg.Flags & Libc.MSG_CTRUNC) != 0;
                    CollectFds(&msg, fds);
                    if (r == 0)
                    {
                        if (got == 0)
                        {
                            return ReceiveStatus.EndOfStream;
                        }
                        throw new EndOfStreamException($"peer closed after {got} of {buffer.Length} bytes");
                    }
                    got += (int)r;
                }
            }
            return ReceiveStatus.Received;
        }
        finally
        {
            if (added)
            {
                _handle.DangerousRelease();
            }
        }
    }

    /// <summary>
    /// Sets SO_RCVTIMEO: a blocking receive with nothing queued returns after <paramref name="milliseconds"/> (see
    /// <see cref="TryReceive"/>; <see cref="Receive"/> keeps waiting). 0 = never time out.
    /// </summary>
    /// <exception cref="NativeException">setsockopt failed.</exception>
    public void SetReceiveTimeout(int milliseconds)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(milliseconds);
        bool added = false;
        try
        {
            _handle.DangerousAddRef(ref added);
            // struct timeval { long tv_sec; long tv_usec; } on LP64.
            long* tv = stackalloc long[2];
            tv[0] = milliseconds / 1000;
            tv[1] = milliseconds % 1000 * 1000L;
            // SAFETY: tv is a 16-byte stack buffer, as SO_RCVTIMEO expects on LP64.
            if (Libc.setsockopt((int)_handle.DangerousGetHandle(), Libc.SOL_SOCKET, Libc.SO_RCVTIMEO, tv, 16) != 0)
            {
                throw NativeException.FromLastError("setsockopt(SO_RCVTIMEO)");
            }
        }
        finally
        {
            if (added)
            {
                _handle.DangerousRelease();
            }
        }
    }

    /// <summary>
    /// Waits until the socket has something to read (data, end of stream or an error) or <paramref name="wake"/> (an
    /// eventfd, may be null) is readable, or <paramref name="timeoutMs"/> passes (-1: forever). Consumes nothing.
    /// Returns whether the socket is readable; <paramref name="woken"/> says whether <paramref name="wake"/> is.
    /// </summary>
    /// <exception cref="NativeException">poll failed.</exception>
    public bool WaitReadable(int timeoutMs, UnixFd? wake, out bool woken)
    {
        woken = false;
        bool added = false, wakeAdded = false;
        try
        {
            _handle.DangerousAddRef(ref added);
            wake?.DangerousAddRef(ref wakeAdded);
            Libc.PollFd* p = stackalloc Libc.PollFd[2];
            p[0] = new Libc.PollFd { Fd = (int)_handle.DangerousGetHandle(), Events = Libc.POLLIN };
            p[1] = new Libc.PollFd { Fd = wake?.Fd ?? -1, Events = Libc.POLLIN };
            while (true)
            {
                // SAFETY: p is a two-entry stack array; poll ignores the negative fd of an absent wake entry.
                int r = Libc.poll(p, wake is null ? 1u : 2u, timeoutMs);
                if (r < 0)
                {
                    int e = Marshal.GetLastPInvokeError();
                    if (e == Libc.EINTR)
                    {
                        continue;
                    }
                    throw new NativeException("poll", e);
                }
                woken = wake is not null && (p[1].REvents & Libc.POLLIN) != 0;
                return (p[0].REvents & (Libc.POLLIN | Libc.POLLHUP | Libc.POLLERR)) != 0;
            }
        }
        finally
        {
            if (wakeAdded)
            {
                wake!.DangerousRelease();
            }
            if (added)
            {
                _handle.DangerousRelease();
            }
        }
    }

    /// <summary>Shuts the socket down in both directions, waking a blocked <see cref="Receive"/>. Idempotent.</summary>
    public void Shutdown()
    {
        if (Interlocked.Exchange(ref _shutdown, 1) != 0)
        {
            return;
        }
        bool added = false;
        try
        {
            _handle.DangerousAddRef(ref added);
            _ = Libc.shutdown((int)_handle.DangerousGetHandle(), Libc.SHUT_RDWR);
        }
        catch (ObjectDisposedException)
        {
        }
        finally
        {
            if (added)
            {
                _handle.DangerousRelease();
            }
        }
    }

    /// <summary>
    /// Closes this descriptor WITHOUT shutting the connection down. Use it for an end whose copy was passed to a
    /// peer with SCM_RIGHTS (twin socket): shutdown(2) acts on the socket, not the descriptor, so <see cref="Dispose"/>
    /// would cut the peer's copy off too.
    /// </summary>
    public void CloseKeepingConnection()
    {
        Interlocked.Exchange(ref _shutdown, 1);
        if (_socket is not null)
        {
            _socket.Dispose();
        }
        else
        {
            _handle.Dispose();
        }
    }

    public void Dispose()
    {
        Shutdown();
        if (_socket is not null)
        {
            _socket.Dispose();
        }
        else
        {
            _handle.Dispose();
        }
    }

    private static void CollectFds(Libc.MsgHdr* msg, List<UnixFd>? fds)
    {
        // SAFETY: walks the control buffer the kernel filled, bounded by msg->ControlLen.
        byte* c = (byte*)msg->Control;
        byte* end = c + (long)msg->ControlLen;
        while (c != null && c + sizeof(Libc.CmsgHdr) <= end)
        {
            var h = (Libc.CmsgHdr*)c;
            if (h->Len < (nuint)sizeof(Libc.CmsgHdr) || c + (long)h->Len > end)
            {
                break;
            }
            if (h->Level == Libc.SOL_SOCKET && h->Type == Libc.SCM_RIGHTS)
            {
                int count = (int)(((long)h->Len - sizeof(Libc.CmsgHdr)) / sizeof(int));
                int* f = (int*)(c + sizeof(Libc.CmsgHdr));
                for (int i = 0; i < count; i++)
                {
                    var owned = new UnixFd(f[i]);
                    if (fds is null)
                    {
                        owned.Dispose();
                    }
                    else
                    {
                        fds.Add(owned);
                    }
                }
            }
            c += CmsgAlign((int)h->Len);
        }
    }

    /// <summary>One sendmsg (MSG_NOSIGNAL): the bytes written, or -1 after EINTR or EAGAIN (having waited for room),
    /// when the caller retries with the same message.</summary>
    private static nint SendOnce(int fd, Libc.MsgHdr* msg)
    {
        nint w = Libc.sendmsg(fd, msg, Libc.MSG_NOSIGNAL);
        if (w >= 0)
        {
            return w;
        }
        int e = Marshal.GetLastPInvokeError();
        if (e == Libc.EAGAIN)
        {
            WaitWritable(fd);
        }
        else if (e != Libc.EINTR)
        {
            throw new NativeException("sendmsg", e);
        }
        return -1;
    }

    private static void WaitReadable(int fd) => PollRaw(fd, Libc.POLLIN);

    private static void WaitWritable(int fd) => PollRaw(fd, Libc.POLLOUT);

    private static void PollRaw(int fd, short events)
    {
        var p = new Libc.PollFd { Fd = fd, Events = events };
        // SAFETY: p is a local.
        _ = Libc.poll(&p, 1, 1000);
    }

    private static int CmsgAlign(int len) => (len + 7) & ~7;

    private static int CmsgSpace(int dataLen) => CmsgAlign(sizeof(Libc.CmsgHdr)) + CmsgAlign(dataLen);
}

/// <summary>How <see cref="FdSocket.TryReceive"/> ended.</summary>
public enum ReceiveStatus
{
    /// <summary>The buffer is full.</summary>
    Received,
    /// <summary>Orderly end of stream before the first byte.</summary>
    EndOfStream,
    /// <summary>The receive timeout passed with nothing queued; nothing was consumed.</summary>
    TimedOut,
    /// <summary>Non-blocking attempt with nothing queued; nothing was consumed.</summary>
    WouldBlock,
}
