using System.Globalization;

namespace Vmig.Vmm;

/// <summary>
/// CPU time (user + system) of the calling thread in ms, from /proc/thread-self/stat (fields 14 and 15, in USER_HZ
/// ticks: 100 per second on Linux, so a 10 ms resolution). Feeds the migration report's per-stage CPU figures, which
/// say what two cores can overlap at best; 0 where /proc is unavailable.
/// </summary>
internal static class ThreadCpu
{
    private const double MillisecondsPerTick = 10.0;

    public static double Milliseconds()
    {
        try
        {
            string stat = File.ReadAllText("/proc/thread-self/stat");
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
