using System.Globalization;

namespace Vmig.Vmm;

/// <summary>
/// CPU time (user + system) in ms from a Linux <c>stat</c> file (/proc/thread-self/stat, /proc/PID/stat): fields 14
/// and 15, in USER_HZ ticks (100 per second on Linux, so a 10 ms resolution). Feeds the migration report's per-stage
/// CPU figures and the bench's CPU budget, which say what two cores can overlap at best.
/// </summary>
public static class ThreadCpu
{
    private const double MillisecondsPerTick = 10.0;

    /// <summary>The calling thread's CPU time in ms; 0 where /proc is unavailable.</summary>
    public static double Milliseconds() => OfStatFile("/proc/thread-self/stat");

    /// <summary>Process <paramref name="pid"/>'s CPU time in ms (all its threads, exited ones included); 0 where /proc
    /// is unavailable or the process is gone.</summary>
    public static double OfProcess(int pid) => OfStatFile($"/proc/{pid.ToString(CultureInfo.InvariantCulture)}/stat");

    private static double OfStatFile(string path)
    {
        try
        {
            string stat = File.ReadAllText(path);
            // The command name (field 2) may hold spaces: count fields after its closing parenthesis (state is field 3).
            string[] f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            return (long.Parse(f[11], CultureInfo.InvariantCulture) + long.Parse(f[12], CultureInfo.InvariantCulture)) * MillisecondsPerTick;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException or IndexOutOfRangeException or ArgumentOutOfRangeException)
        {
            return 0;
        }
    }
}
