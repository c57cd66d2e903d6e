using System.Diagnostics;
using System.Globalization;

namespace Vmig.Bench;

/// <summary>What a scenario gets: options, progress, the report to add to, and peer processes.</summary>
internal sealed class BenchContext
{
    private readonly IProgress<string>? _progress;

    public BenchContext(BenchOptions options, IProgress<string>? progress, BenchReport report, string dir)
    {
        Options = options;
        _progress = progress;
        Report = report;
        Directory = dir;
    }

    public BenchOptions Options { get; }
    public BenchReport Report { get; }
    public string Directory { get; }

    public void Progress(string message) => _progress?.Report(message);

    public PeerProcess StartPeer(string kind, string name, long bytes) =>
        PeerProcess.Start(Options, kind, Path.Combine(Directory, name + ".sock"), bytes);

    /// <summary>One "state" peer process serving <paramref name="count"/> devices; returns it and their socket paths.</summary>
    public (PeerProcess Peer, string[] Sockets) StartStatePeers(string name, int count, long bytes)
    {
        string[] socks = Enumerable.Range(0, count).Select(i => Path.Combine(Directory, $"{name}-{i}.sock")).ToArray();
        return (PeerProcess.Start(Options, "state", string.Join(',', socks), bytes), socks);
    }
}

/// <summary>
/// `vmig bench`: runs the scenarios, each next to its baseline measured in the same run, and returns every figure
/// as a ratio with median and spread. Peer servers run in separate processes (this assembly in "serve" mode).
/// </summary>
public static class BenchRunner
{
    /// <summary>Scenario ids in run order.</summary>
    public static IReadOnlyList<string> ScenarioIds { get; } = ["region", "migdata", "nvme", "accel", "vm", "downtime"];

    /// <summary>Runs the selected scenarios. A scenario that fails is recorded in <see cref="BenchReport.Skipped"/>
    /// with the reason and the rest still run.</summary>
    public static BenchReport Run(BenchOptions options, IProgress<string>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        var report = new BenchReport { StartedAt = DateTimeOffset.UtcNow, Quick = options.Quick, Machine = MachineInfo.Describe() };
        string dir = options.WorkDirectory ?? System.IO.Directory.CreateTempSubdirectory("vmig-bench-").FullName;
        var ctx = new BenchContext(options, progress, report, dir);
        var sw = Stopwatch.StartNew();
        long mib = 1 << 20;
        var scenarios = new (string Id, Action Run)[]
        {
            ("region", () => RegionWriteScenario.Run(ctx)),
            ("migdata", () => MigDataScenario.Run(ctx, options.Quick ? [64 * mib] : [256 * mib, 1024 * mib])),
            ("nvme", () => NvmeScenario.Run(ctx)),
            ("accel", () => AccelScenario.Run(ctx)),
            ("vm", () => VmScenario.Run(ctx)),
            ("downtime", () => DowntimeScenario.Run(ctx)),
        };
        try
        {
            foreach (var (id, run) in scenarios)
            {
                if (!options.Wants(id))
                {
                    continue;
                }
                progress?.Report($"== {id}");
                try
                {
                    run();
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    report.Skipped[id] = e.GetType().Name + ": " + e.Message;
                    progress?.Report($"{id} failed: {e}");
                }
            }
        }
        finally
        {
            if (options.WorkDirectory is null)
            {
                try
                {
                    System.IO.Directory.Delete(dir, recursive: true);
                }
                catch (IOException)
                {
                }
            }
        }
        report.TotalSeconds = sw.Elapsed.TotalSeconds;
        return report;
    }

    /// <summary>A plain-text table of the figures (one line each: ratio median [min..max], goal, verdict).</summary>
    public static string FormatTable(BenchReport report)
    {
        ArgumentNullException.ThrowIfNull(report);
        var sb = new System.Text.StringBuilder();
        var ci = CultureInfo.InvariantCulture;
        sb.AppendLine(ci, $"{"scenario",-8} {"figure",-58} {"vmig",12} {"baseline",12} {"ratio (median [min..max])",28} {"goal",8} verdict");
        foreach (var f in report.Figures)
        {
            string ratio = f.Ratio is { } r ? string.Format(ci, "{0:F3} [{1:F3}..{2:F3}]", r.Median, r.Min, r.Max) : "-";
            string goal = f.Goal is double g ? (f.Direction == GoalDirection.AtMost ? "≤" : "≥") + g.ToString("0.##", ci) : "";
            string verdict = f.GoalMet switch { true => "met", false => "MISSED", null => "" };
            sb.AppendLine(ci, $"{f.Scenario,-8} {Trim(f.Name, 58),-58} {Fmt(f.Value.Median),12} {(f.Baseline is null ? "" : Fmt(f.Baseline.Median)),12} {ratio,28} {goal,8} {verdict}  ({f.Unit})");
            foreach (var (k, v) in f.Extra)
            {
                sb.AppendLine(ci, $"{"",-8}   {k}: {Fmt(v)}");
            }
        }
        foreach (var g in report.Growth)
        {
            sb.AppendLine(ci, $"growth: {g.Name} ({g.XUnit} → {g.YUnit}): {string.Join("  ", g.Points.Select(p => $"{Fmt(p.X)}→{Fmt(p.Y)}"))}");
        }
        foreach (var (k, v) in report.Skipped)
        {
            sb.AppendLine(ci, $"skipped {k}: {v}");
        }
        foreach (var n in report.Notes)
        {
            sb.AppendLine("note: " + n);
        }
        return sb.ToString();
    }

    private static string Trim(string s, int n) => s.Length <= n ? s : s[..(n - 1)] + "…";

    private static string Fmt(double v) => Math.Abs(v) >= 1000 ? v.ToString("F0", CultureInfo.InvariantCulture)
        : Math.Abs(v) >= 10 ? v.ToString("F1", CultureInfo.InvariantCulture) : v.ToString("F3", CultureInfo.InvariantCulture);
}

/// <summary>Cores and memory from /proc.</summary>
internal static class MachineInfo
{
    public static string Describe()
    {
        string cpu = "?";
        long memKb = 0;
        try
        {
            cpu = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? "?";
            string? m = File.ReadLines("/proc/meminfo").FirstOrDefault(l => l.StartsWith("MemTotal:", StringComparison.Ordinal));
            if (m is not null)
            {
                memKb = long.Parse(m.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture);
            }
        }
        catch (IOException)
        {
        }
        return string.Create(CultureInfo.InvariantCulture, $"{Environment.ProcessorCount} cores ({cpu}), {memKb / 1024} MiB RAM, {Environment.OSVersion}");
    }
}
