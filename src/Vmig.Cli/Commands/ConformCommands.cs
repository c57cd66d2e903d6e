using System.CommandLine;
using System.Globalization;
using Spectre.Console;
using Vmig.Conformance;

namespace Vmig.Cli.Commands;

/// <summary>`vmig conform SOCKET` and `vmig fuzz SOCKET`.</summary>
internal static class ConformCommands
{
    public static Command CreateConform()
    {
        var sock = new Argument<string>("socket") { Description = "vfio-user server socket (any server that advertises migration)" };
        var json = new Option<string?>("--json") { Description = "write the report as JSON" };
        var junit = new Option<string?>("--junit") { Description = "write the report as JUnit XML" };
        var noExt = new Option<bool>("--no-extensions") { Description = "do not ask for the vmig extensions (check the base protocol only)" };
        var resetKeeps = new Option<bool>("--reset-keeps-state") { Description = "the server keeps its migration state on DEVICE_RESET (libvfio-user); skip the kernel's reset→RUNNING checks" };
        var cmd = new Command("conform", """
            Run the conformance suite against a vfio-user migration server: negotiation, feature probing, the next-step
            result of every state pair for its flags, data-stream semantics, command gating, reset, dirty logging,
            argsz/flag validation, resilience to malformed messages. Each check: pass, fail or skip with the spec clause.
            Exit code 1 on any failure.
            Example: vmig conform /tmp/vmig/hostA/nvme0-vf0.sock --junit conform.xml
            """)
        { sock, json, junit, noExt, resetKeeps };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            var report = ConformanceSuite.Run(p.GetValue(sock)!, new ConformanceOptions
            {
                RequestExtensions = !p.GetValue(noExt),
                ExpectResetToRunning = !p.GetValue(resetKeeps),
                Progress = c =>
                {
                    string mark = c.Outcome switch
                    {
                        CheckOutcome.Pass => "[green]pass[/]",
                        CheckOutcome.Fail => "[red]FAIL[/]",
                        _ => "[grey]skip[/]",
                    };
                    AnsiConsole.MarkupLine($"{mark} {Markup.Escape(c.Id)}{(c.Outcome == CheckOutcome.Pass ? "" : " — " + Markup.Escape(c.Reason) + " [grey](" + Markup.Escape(c.SpecClause) + ")[/]")}");
                },
            });
            if (p.GetValue(json) is string j)
            {
                File.WriteAllText(j, report.ToJson());
            }
            if (p.GetValue(junit) is string x)
            {
                File.WriteAllText(x, report.ToJUnitXml());
            }
            AnsiConsole.MarkupLineInterpolated($"{report.Passed} passed, {report.Failed} failed, {report.Skipped} skipped in {report.Duration.TotalSeconds:F1} s (flags {report.MigrationFlags?.ToString(CultureInfo.InvariantCulture) ?? "none"})");
            return report.Success ? 0 : 1;
        }));
        return cmd;
    }

    public static Command CreateFuzz()
    {
        var sock = new Argument<string>("socket") { Description = "vfio-user server socket" };
        var seed = new Option<int>("--seed") { Description = "generator seed (same seed, same cases)", DefaultValueFactory = _ => 1 };
        var seconds = new Option<double>("--seconds") { Description = "how long to run", DefaultValueFactory = _ => 60 };
        var pid = new Option<int?>("--pid") { Description = "the server's pid, for crash detection and its memory (VmRSS) bound" };
        var json = new Option<string?>("--json") { Description = "write the report as JSON" };
        var cmd = new Command("fuzz", """
            Fuzz a vfio-user server with mutated real message sequences (bit flips, lying lengths and counts, truncation,
            wrong fd counts, commands out of order or in the wrong state). Reports messages sent, distinct errnos, crashes,
            hangs and memory growth. Reproducible from the seed. Exit code 1 on any crash, hang or memory overrun.
            Example: vmig fuzz /tmp/vmig/hostA/nvme0-vf0.sock --seconds 300 --pid 4242
            """)
        { sock, seed, seconds, pid, json };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            var r = ProtocolFuzzer.Run(p.GetValue(sock)!, new FuzzOptions
            {
                Seed = p.GetValue(seed),
                Duration = TimeSpan.FromSeconds(p.GetValue(seconds)),
                ServerPid = p.GetValue(pid),
                Log = s => AnsiConsole.MarkupLineInterpolated($"[grey]{s}[/]"),
            });
            if (p.GetValue(json) is string j)
            {
                File.WriteAllText(j, r.ToJson());
            }
            AnsiConsole.MarkupLineInterpolated($"{r.Summary()}");
            return r.Success ? 0 : 1;
        }));
        return cmd;
    }
}
