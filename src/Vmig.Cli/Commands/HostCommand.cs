using System.CommandLine;
using System.Runtime.InteropServices;
using Spectre.Console;
using Vmig.Cli.Config;
using Vmig.Cli.Host;

namespace Vmig.Cli.Commands;

/// <summary>`vmig host --config FILE`: serve the configured device functions until SIGINT/SIGTERM.</summary>
internal static class HostCommand
{
    public static Command Create()
    {
        var config = new Option<string>("--config", "-c") { Description = "host config (JSON or YAML)", Required = true };
        var cmd = new Command("host", """
            Run a device host: NVMe subsystems and accelerators, one vfio-user socket per VF and a host-only socket per PF.
            Writes RUNTIME_DIR/host.json (what is served) once every socket listens; SIGINT/SIGTERM stops it cleanly.
            Example: vmig host --config hostA.json
            """)
        { config };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            string path = p.GetValue(config)!;
            var cfg = ConfigLoader.Load<HostConfig>(path);
            using var loggers = CliContext.CreateLoggers(p);
            using var stop = new ManualResetEventSlim();
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Set(); });
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Set(); });
            using var host = DeviceHost.Start(cfg, Path.GetDirectoryName(Path.GetFullPath(path))!, loggers);
            var t = new Table().Title($"vmig host [bold]{Markup.Escape(host.Name)}[/] (pid {Environment.ProcessId})").AddColumns("function", "kind", "role", "socket");
            foreach (var f in host.Served)
            {
                t.AddRow(Markup.Escape(f.Name), f.Kind, f.Role == "pf" ? "PF (host-only)" : "VF", Markup.Escape(f.Path));
            }
            AnsiConsole.Write(t);
            string ready = Path.Combine(host.RuntimeDir, "host.json");
            ConfigLoader.SaveJson(ready, new { host.Name, Pid = Environment.ProcessId, Functions = host.Served });
            stop.Wait();
            File.Delete(ready);
            AnsiConsole.MarkupLine("vmig host: stopped");
            return 0;
        }));
        return cmd;
    }
}
