using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Spectre.Console;
using Vmig.Cli.Demo;

namespace Vmig.Cli.Commands;

/// <summary>`vmig demo`: the whole thing on one machine.</summary>
internal static class DemoCommand
{
    public static Command Create()
    {
        var migrations = new Option<int>("--migrations", "-n") { Description = "live migrations (A→B, B→A, …)", DefaultValueFactory = _ => 2 };
        var memory = new Option<string>("--memory") { Description = "guest RAM", DefaultValueFactory = _ => "256M" };
        var devMem = new Option<string>("--device-memory") { Description = "accelerator VF device memory", DefaultValueFactory = _ => "64M" };
        var downtime = new Option<double>("--downtime-limit") { Description = "downtime limit in ms", DefaultValueFactory = _ => 50 };
        var between = new Option<double>("--run-seconds") { Description = "seconds the workload runs before and between migrations", DefaultValueFactory = _ => 2 };
        var dirty = new Option<string>("--dirty-rate") { Description = "memory dirtier rate per second", DefaultValueFactory = _ => "32M" };
        var json = new Option<string?>("--json") { Description = "write the full report (every migration's report and progress samples, the verifier) as JSON" };
        var svg = new Option<string?>("--svg") { Description = "SVG timeline path (default WORKDIR/timeline.svg)" };
        var dir = new Option<string?>("--dir") { Description = "work directory (configs, logs, namespace file, sockets)" };
        var cmd = new Command("demo", """
            Run everything on one machine: two device hosts (NVMe subsystem on a shared namespace file + accelerator) and a VM
            (NVMe VF with a verifying fio job, accelerator VF with a CRC job mix, a memory dirtier) as separate processes;
            live-migrate the VM between the hosts, verify every acknowledged write, print a summary, write an SVG timeline.
            Exit code 1 if any migration fails or any write is lost or corrupt.
            Example: vmig demo -n 4 --json demo.json
            """)
        { migrations, memory, devMem, downtime, between, dirty, json, svg, dir };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            var o = new DemoOptions
            {
                Migrations = p.GetValue(migrations),
                Memory = p.GetValue(memory)!,
                DeviceMemory = p.GetValue(devMem)!,
                DowntimeLimitMs = p.GetValue(downtime),
                RunBetween = TimeSpan.FromSeconds(p.GetValue(between)),
                DirtyRate = p.GetValue(dirty)!,
                Dir = p.GetValue(dir),
            };
            if (o.Migrations < 1)
            {
                throw new ArgumentException("--migrations must be at least 1");
            }
            DemoReport report = null!;
            AnsiConsole.Progress().AutoClear(false).Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
                .Start(ctx =>
                {
                    ProgressTask? current = null;
                    var runner = new DemoRunner(o, msg =>
                    {
                        if (current is not null)
                        {
                            current.Value = current.MaxValue;
                            current.StopTask();
                        }
                        current = ctx.AddTask(Markup.Escape(msg), maxValue: 1);
                    }, e =>
                    {
                        if (current is null)
                        {
                            return;
                        }
                        double sent = e["bytesSent"]!.GetValue<double>(), rem = e["bytesRemaining"]!.GetValue<double>();
                        current.MaxValue = Math.Max(1, sent + rem);
                        current.Value = sent;
                    });
                    report = runner.Run();
                    if (current is not null)
                    {
                        current.Value = current.MaxValue;
                    }
                });
            string svgPath = p.GetValue(svg) ?? Path.Combine(report.WorkDir, "timeline.svg");
            if (report.Migrations.Count > 0)
            {
                TimelineSvg.Write(svgPath, report.Migrations);
                report = report with { Svg = svgPath };
            }
            var t = new Table().Title("migrations").AddColumns("#", "from → to", "outcome", "total", "downtime", "bytes", "rounds");
            foreach (var m in report.Migrations)
            {
                t.AddRow(m.Index.ToString(CultureInfo.InvariantCulture), $"{m.From} → {m.To}", m.Outcome == "completed" ? "[green]completed[/]" : $"[red]{Markup.Escape(m.Error ?? "failed")}[/]",
                    $"{m.TotalMs:F0} ms", $"{m.DowntimeMs:F1} ms", DemoRunner.Mb(m.Bytes), m.Rounds.ToString(CultureInfo.InvariantCulture));
            }
            AnsiConsole.Write(t);
            if (report.Verifier is JsonObject v)
            {
                var vt = new Table().Title("verifier").AddColumns("writes", "reads", "verified blocks", "lost", "corrupt", "accelerator CRC checks");
                vt.AddRow(v["writes"]!.ToString(), v["reads"]!.ToString(), v["verified"]!.ToString(),
                    v["lost"]!.GetValue<long>() == 0 ? "[green]0[/]" : $"[red]{v["lost"]}[/]",
                    v["corrupt"]!.GetValue<long>() == 0 ? "[green]0[/]" : $"[red]{v["corrupt"]}[/]", v["accelChecks"]!.ToString());
                AnsiConsole.Write(vt);
            }
            if (report.Svg is not null)
            {
                AnsiConsole.MarkupLineInterpolated($"timeline: {report.Svg}");
            }
            AnsiConsole.MarkupLineInterpolated($"work directory (configs, logs): {report.WorkDir}");
            if (p.GetValue(json) is string jp)
            {
                File.WriteAllText(jp, JsonSerializer.Serialize(report, CliJson.Options));
                AnsiConsole.MarkupLineInterpolated($"report: {jp}");
            }
            if (!report.Passed)
            {
                AnsiConsole.MarkupLineInterpolated($"[red]demo FAILED: {report.Failure}[/]");
                return 1;
            }
            AnsiConsole.MarkupLine("[green]demo passed: every migration completed, nothing lost, nothing corrupt[/]");
            return 0;
        }));
        return cmd;
    }
}
