using System.Globalization;

namespace Vmig.Bench;

/// <summary>
/// Console: <c>Vmig.Bench [--quick] [--json FILE] [--runs N] [--svg DIR] [SCENARIO…]</c> runs <see cref="BenchRunner"/>
/// and prints the table; <c>Vmig.Bench micro [BenchmarkDotNet args]</c> runs the micro-benchmarks;
/// <c>Vmig.Bench serve KIND SOCKET BYTES</c> is a peer process (started by the runner).
/// </summary>
internal static class Program
{
    private static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == "serve")
        {
            return PeerMain.Run(args);
        }
        if (args.Length > 0 && args[0] == "micro")
        {
            return Micro.Run(args[1..]);
        }
        bool quick = false;
        string? json = null, svg = null;
        int? runs = null;
        var scenarios = new List<string>();
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--quick":
                    quick = true;
                    break;
                case "--json" when i + 1 < args.Length:
                    json = args[++i];
                    break;
                case "--svg" when i + 1 < args.Length:
                    svg = args[++i];
                    break;
                case "--runs" when i + 1 < args.Length:
                    runs = int.Parse(args[++i], CultureInfo.InvariantCulture);
                    break;
                default:
                    if (args[i].StartsWith('-'))
                    {
                        Console.Error.WriteLine("usage: Vmig.Bench [--quick] [--json FILE] [--svg DIR] [--runs N] [region|migdata|nvme|accel|vm|downtime …] | micro [BDN args]");
                        return 2;
                    }
                    scenarios.Add(args[i]);
                    break;
            }
        }
        var progress = new SyncProgress(m => Console.Error.WriteLine($"[{DateTime.UtcNow:HH:mm:ss}] {m}"));
        var report = BenchRunner.Run(new BenchOptions { Quick = quick, Scenarios = scenarios, Runs = runs }, progress);
        Console.Out.WriteLine($"vmig bench {(quick ? "--quick " : "")}— {report.Machine}; {report.Runtime}; {report.TotalSeconds:F0} s");
        Console.Out.Write(BenchRunner.FormatTable(report));
        if (json is not null)
        {
            File.WriteAllText(json, report.ToJson());
        }
        if (svg is not null)
        {
            Directory.CreateDirectory(svg);
            foreach (var g in report.Growth)
            {
                File.WriteAllText(Path.Combine(svg, Svg.FileName(g)), Svg.Plot(g));
            }
        }
        return report.Skipped.Count == 0 ? 0 : 1;
    }

    /// <summary>Reports on the caller's thread (Progress&lt;T&gt; would post to the thread pool and reorder lines).</summary>
    private sealed class SyncProgress(Action<string> write) : IProgress<string>
    {
        public void Report(string value) => write(value);
    }
}
