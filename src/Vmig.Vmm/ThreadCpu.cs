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

    /// <summary>
    /// CPU ms of each live thread of process <paramref name="pid"/>, summed by thread name (the kernel's comm: .NET sets
    /// it from Thread.Name, cut to 15 bytes; unnamed pool threads share ".NET TP Worker" and the like), from
    /// /proc/PID/task/*/stat. Threads that already exited are absent: compare the sum with <see cref="OfProcess"/>.
    /// Empty where /proc is unavailable.
    /// </summary>
    public static Dictionary<string, double> ByThreadName(int pid)
    {
        var result = new Dictionary<string, double>(StringComparer.Ordinal);
        string[] tasks;
        try
        {
            tasks = Directory.GetDirectories($"/proc/{pid.ToString(CultureInfo.InvariantCulture)}/task");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return result;
        }
        foreach (string task in tasks)
        {
            if (ReadStat(Path.Combine(task, "stat")) is { } s)
            {
                result[s.Name] = result.GetValueOrDefault(s.Name) + s.Milliseconds;
            }
        }
        return result;
    }

    private static double OfStatFile(string path) => ReadStat(path)?.Milliseconds ?? 0;

    /// <summary>(comm, user + system ms) of one stat file, or null if it is gone or unreadable.</summary>
    private static (string Name, double Milliseconds)? ReadStat(string path)
    {
        try
        {
            string stat = File.ReadAllText(path);
            int open = stat.IndexOf('(', StringComparison.Ordinal), close = stat.LastIndexOf(')');
            // The command name (field 2) may hold spaces: count fields after its closing parenthesis (state is field 3).
            string[] f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            double ms = (long.Parse(f[11], CultureInfo.InvariantCulture) + long.Parse(f[12], CultureInfo.InvariantCulture)) * MillisecondsPerTick;
            return (open >= 0 && close > open ? stat[(open + 1)..close] : "?", ms);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException or IndexOutOfRangeException or ArgumentOutOfRangeException)
        {
            return null;
        }
    }
}
