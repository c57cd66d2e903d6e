using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser;

/// <summary>A vfio-user request failed: the peer sent an error reply, or the request could not be sent or answered.</summary>
public class VfioUserException : IOException
{
    public VfioUserException(int errno, string message, VfioUserCommand? command = null) : base(message)
    {
        Errno = errno;
        Command = command;
    }

    /// <summary>Linux errno (from the error reply's error_no, or the local failure).</summary>
    public int Errno { get; }

    /// <summary>The command that failed, when known.</summary>
    public VfioUserCommand? Command { get; }
}

/// <summary>The connection is closed (peer gone, protocol violation, or local shutdown). Errno ECONNRESET.</summary>
public sealed class VfioUserConnectionClosedException : VfioUserException
{
    public VfioUserConnectionClosedException(string message) : base(Protocol.Errno.ECONNRESET, message) { }
}
