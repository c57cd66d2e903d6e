using System.Runtime.InteropServices;

namespace Vmig.Native;

/// <summary>An owned Linux file descriptor (memfd, eventfd, socket, received fd). Closed exactly once.</summary>
public sealed class UnixFd : SafeHandle
{
    /// <summary>Takes ownership of <paramref name="fd"/>.</summary>
    public UnixFd(int fd) : base(new IntPtr(-1), ownsHandle: true) => SetHandle(new IntPtr(fd));

    /// <summary>Wraps <paramref name="fd"/> without taking ownership.</summary>
    public UnixFd(int fd, bool ownsHandle) : base(new IntPtr(-1), ownsHandle) => SetHandle(new IntPtr(fd));

    public override bool IsInvalid => handle.ToInt64() < 0;

    /// <summary>The fd number. Valid while this handle is alive and not closed.</summary>
    public int Fd => (int)handle.ToInt64();

    /// <summary>A second, independently owned fd for the same open file (dup(2)).</summary>
    /// <exception cref="NativeException">dup failed (EMFILE…).</exception>
    public UnixFd Duplicate()
    {
        bool added = false;
        try
        {
            DangerousAddRef(ref added);
            int nfd = Libc.dup(Fd);
            if (nfd < 0)
            {
                throw NativeException.FromLastError("dup");
            }
            return new UnixFd(nfd);
        }
        finally
        {
            if (added)
            {
                DangerousRelease();
            }
        }
    }

    protected override bool ReleaseHandle() => Libc.close((int)handle.ToInt64()) == 0;
}

/// <summary>A failed system call, carrying its errno.</summary>
public sealed class NativeException : IOException
{
    public NativeException(string call, int errno)
        : base($"{call} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})") { Errno = errno; Call = call; }

    /// <summary>The Linux errno value.</summary>
    public int Errno { get; }

    /// <summary>The system call that failed.</summary>
    public string Call { get; }

    internal static NativeException FromLastError(string call) => new(call, Marshal.GetLastPInvokeError());
}
