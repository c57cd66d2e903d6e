namespace Vmig.VfioUser.Protocol;

/// <summary>Linux errno values carried in vfio-user error replies (header error_no).</summary>
public static class Errno
{
    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EIO = 5;
    public const int E2BIG = 7;
    public const int EBADF = 9;
    public const int EAGAIN = 11;
    public const int ENOMEM = 12;
    public const int EACCES = 13;
    public const int EFAULT = 14;
    public const int EBUSY = 16;
    public const int EEXIST = 17;
    public const int ENODEV = 19;
    public const int EINVAL = 22;
    public const int ENOTTY = 25;
    public const int EFBIG = 27;
    public const int ENOSPC = 28;
    public const int ESPIPE = 29;
    public const int ERANGE = 34;
    public const int ENOSYS = 38;
    public const int ENOMSG = 42;
    public const int EPROTO = 71;
    public const int EOVERFLOW = 75;
    public const int EMSGSIZE = 90;
    public const int ENOTSUP = 95;
    public const int ECONNRESET = 104;
    public const int ETIMEDOUT = 110;

    /// <summary>libvfio-user refuses error_no values above this (lib/private.h).</summary>
    public const int Max = 4096;
}
