namespace Vmig.Migration;

/// <summary>Linux errno values this pure layer returns (same numbers as Vmig.VfioUser.Protocol.Errno).</summary>
internal static class Errno
{
    public const int EIO = 5;
    public const int EINVAL = 22;
    public const int ENOTTY = 25;
    public const int Max = 4096;
}
