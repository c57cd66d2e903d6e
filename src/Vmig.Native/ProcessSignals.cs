namespace Vmig.Native;

/// <summary>Signals to other processes (.NET's Process.Kill only sends SIGKILL; graceful shutdown needs SIGTERM).</summary>
public static class ProcessSignals
{
    public const int SIGTERM = 15;
    public const int SIGKILL = 9;

    /// <summary>Sends <paramref name="signal"/> to <paramref name="pid"/>. False if the process is gone (ESRCH) or not ours.</summary>
    public static bool Send(int pid, int signal) => Libc.kill(pid, signal) == 0;
}
