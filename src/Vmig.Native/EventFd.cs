namespace Vmig.Native;

/// <summary>
/// An eventfd(2) counter: the interrupt line between a device host and a VMM (one per MSI-X vector).
/// <see cref="Signal"/> adds 1; <see cref="Wait"/> blocks until non-zero and returns and clears the count.
/// </summary>
public sealed class EventFd : IDisposable
{
    private EventFd(UnixFd fd) => Handle = fd;

    /// <summary>The owned descriptor (to send with SCM_RIGHTS, or to wait on).</summary>
    public UnixFd Handle { get; }

    /// <summary>Creates a new eventfd with counter 0.</summary>
    public static EventFd Create()
    {
        int fd = Libc.eventfd(0, Libc.EFD_CLOEXEC);
        if (fd < 0)
        {
            throw NativeException.FromLastError("eventfd");
        }
        return new EventFd(new UnixFd(fd));
    }

    /// <summary>Wraps a received eventfd (takes ownership).</summary>
    public static EventFd FromHandle(UnixFd fd) => new(fd);

    /// <summary>Adds <paramref name="value"/> to the counter (a write of 8 bytes).</summary>
    public void Signal(ulong value = 1) => FdIo.WriteUInt64(Handle, value);

    /// <summary>Blocks until the counter is non-zero, or <paramref name="timeoutMs"/> passes (-1: forever). Returns the count consumed, 0 on timeout.</summary>
    public ulong Wait(int timeoutMs = -1)
    {
        if (!FdIo.PollIn(Handle, timeoutMs))
        {
            return 0;
        }
        return FdIo.TryReadUInt64(Handle, out ulong v) ? v : 0;
    }

    public void Dispose() => Handle.Dispose();
}

/// <summary>Small synchronous read/write/poll helpers on raw fds.</summary>
public static unsafe class FdIo
{
    /// <summary>Writes one u64 (eventfd semantics). Throws <see cref="NativeException"/> on failure.</summary>
    public static void WriteUInt64(UnixFd fd, ulong value)
    {
        ArgumentNullException.ThrowIfNull(fd);
        bool added = false;
        try
        {
            fd.DangerousAddRef(ref added);
            while (true)
            {
                // SAFETY: value is a local on this stack frame; 8 bytes.
                nint n = Libc.write(fd.Fd, &value, 8);
                if (n == 8)
                {
                    return;
                }
                int e = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
                if (n < 0 && e == Libc.EINTR)
                {
                    continue;
                }
                throw new NativeException("write", n < 0 ? e : 5 /* EIO */);
            }
        }
        finally
        {
            if (added)
            {
                fd.DangerousRelease();
            }
        }
    }

    /// <summary>Reads one u64; false if the fd would block (non-blocking fd) or returned short.</summary>
    public static bool TryReadUInt64(UnixFd fd, out ulong value)
    {
        ArgumentNullException.ThrowIfNull(fd);
        ulong v = 0;
        bool added = false;
        try
        {
            fd.DangerousAddRef(ref added);
            while (true)
            {
                // SAFETY: v is a local; 8 bytes.
                nint n = Libc.read(fd.Fd, &v, 8);
                if (n < 0 && System.Runtime.InteropServices.Marshal.GetLastPInvokeError() == Libc.EINTR)
                {
                    continue;
                }
                value = v;
                return n == 8;
            }
        }
        finally
        {
            if (added)
            {
                fd.DangerousRelease();
            }
        }
    }

    /// <summary>Waits until <paramref name="fd"/> is readable. Returns false on timeout.</summary>
    public static bool PollIn(UnixFd fd, int timeoutMs)
    {
        ArgumentNullException.ThrowIfNull(fd);
        bool added = false;
        try
        {
            fd.DangerousAddRef(ref added);
            var p = new Libc.PollFd { Fd = fd.Fd, Events = Libc.POLLIN };
            while (true)
            {
                // SAFETY: p is a local; one entry.
                int r = Libc.poll(&p, 1, timeoutMs);
                if (r < 0 && System.Runtime.InteropServices.Marshal.GetLastPInvokeError() == Libc.EINTR)
                {
                    continue;
                }
                if (r < 0)
                {
                    throw NativeException.FromLastError("poll");
                }
                return r > 0;
            }
        }
        finally
        {
            if (added)
            {
                fd.DangerousRelease();
            }
        }
    }
}
