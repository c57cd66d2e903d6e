using System.CommandLine;
using Spectre.Console;
using Vmig.Bench;

namespace Vmig.Cli.Commands;

/// <summary>`vmig bench`: the benchmark scenarios, each figure a ratio to a baseline measured in the same run.</summary>
internal static class BenchCommand
{
    public static Command Create()
    {
        var quick = new Option<bool>("--quick") { Description = "smaller sizes and fewer runs (minutes, not tens of minutes)" };
        var json = new Option<string?>("--json") { Description = "write the full report as JSON" };
        var svg = new Option<string?>("--svg") { Description = "directory for the growth plots (SVG)" };
        var runs = new Option<int?>("--runs") { Description = "measured runs per figure (median and spread over these)" };
        var scenarios = new Argument<string[]>("scenario")
        {
            Description = $"scenarios to run: {string.Join(", ", BenchRunner.ScenarioIds)} (default: all)",
            Arity = ArgumentArity.ZeroOrMore,
        };
        var cmd = new Command("bench", """
            Benchmarks, each next to its baseline measured in the same run (raw UNIX socket, raw TCP, pread/pwrite, memcpy),
            reported as ratios with the median and spread: REGION_WRITE round trip, MIG_DATA throughput, NVMe IOPS through a
            VF, accelerator device-memory migration, whole-VM migration and how it grows. Results and method: bench/RESULTS.md.
            Micro-benchmarks (BenchmarkDotNet): dotnet run -c Release --project bench/Vmig.Bench -- micro
            Example: vmig bench --quick --json bench.json
            """)
        { quick, json, svg, runs, scenarios };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            var progress = new SyncProgress(m => AnsiConsole.MarkupLineInterpolated($"[grey]{DateTime.UtcNow:HH:mm:ss} {m}[/]"));
            var report = BenchRunner.Run(new BenchOptions { Quick = p.GetValue(quick), Scenarios = p.GetValue(scenarios) ?? [], Runs = p.GetValue(runs) }, progress);
            Console.Out.WriteLine($"vmig bench {(p.GetValue(quick) ? "--quick " : "")}— {report.Machine}; {report.Runtime}; {report.TotalSeconds:F0} s");
            Console.Out.Write(BenchRunner.FormatTable(report));
            if (p.GetValue(json) is string j)
            {
                File.WriteAllText(j, report.ToJson());
            }
            if (p.GetValue(svg) is string dir)
            {
                Directory.CreateDirectory(dir);
                foreach (var g in report.Growth)
                {
                    File.WriteAllText(Path.Combine(dir, Svg.FileName(g)), Svg.Plot(g));
                }
            }
            return report.Skipped.Count == 0 ? 0 : 1;
        }));
        return cmd;
    }

    private sealed class SyncProgress(Action<string> write) : IProgress<string>
    {
        public void Report(string value) => write(value);
    }
}
