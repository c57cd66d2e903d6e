using System.CommandLine;
using System.Globalization;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Spectre.Console;
using Vmig.Cli.Config;
using Vmig.Cli.Vm;
using Vmig.Vmm;
using Vmig.Vmm.Migration;

namespace Vmig.Cli.Commands;

/// <summary>`vmig vm`, `vmig migrate`, `vmig snapshot`, `vmig status`, `vmig resolve`.</summary>
internal static class VmCommands
{
    public static Command CreateVm()
    {
        var config = new Option<string?>("--config", "-c") { Description = "VM config (JSON or YAML) for a fresh boot" };
        var incoming = new Option<string?>("--incoming") { Description = "wait for a migration on tcp:HOST:PORT" };
        var restore = new Option<string?>("--restore") { Description = "restore the VM from a snapshot file" };
        var name = new Option<string?>("--name") { Description = "VM name for --incoming/--restore (control socket NAME.ctl)" };
        var devices = new Option<string[]>("--device") { Description = "NAME=SOCKET: the VF this host gives device NAME (--incoming/--restore); repeat per device", AllowMultipleArgumentsPerToken = true };
        var runtimeDir = new Option<string?>("--runtime-dir") { Description = "where the control socket goes (default /tmp/vmig/vms)" };
        var tlsCert = new Option<string?>("--tls-cert") { Description = "--incoming: server certificate (PEM)" };
        var tlsKey = new Option<string?>("--tls-key") { Description = "--incoming: server key (PEM)" };
        var tlsCa = new Option<string?>("--tls-ca") { Description = "--incoming: CA that client certificates must chain to (optional)" };
        var memPrealloc = new Option<string?>("--mem-prealloc")
        {
            Description = "--incoming: allocate and fault in SIZE bytes of guest RAM (e.g. 1G) before waiting, as QEMU's -m SIZE -mem-prealloc -incoming; "
                + "the migration then copies into mapped pages instead of allocating them, and a VM of another size is refused at the handshake",
        };
        var cmd = new Command("vm", """
            Run a VM: guest RAM shared with its vfio-user devices, guest drivers and workloads on vCPU threads.
            Exactly one of --config (fresh boot), --incoming (migration target) or --restore (snapshot).
            The VM answers `vmig status|migrate|snapshot NAME` on its control socket until it quits or migrates away.
            Examples:
              vmig vm --config vm0.json
              vmig vm --incoming tcp:0.0.0.0:7070 --name vm0 --device nvme0=/tmp/vmig/hostB/nvme0-vf0.sock --device accel0=/tmp/vmig/hostB/accel0-vf0.sock
            """)
        { config, incoming, restore, name, devices, runtimeDir, tlsCert, tlsKey, tlsCa, memPrealloc };
        cmd.Validators.Add(r =>
        {
            int modes = (r.GetValue(config) is null ? 0 : 1) + (r.GetValue(incoming) is null ? 0 : 1) + (r.GetValue(restore) is null ? 0 : 1);
            if (modes != 1)
            {
                r.AddError("give exactly one of --config, --incoming or --restore");
            }
            if (r.GetValue(memPrealloc) is not null && r.GetValue(incoming) is null)
            {
                r.AddError("--mem-prealloc goes with --incoming");
            }
        });
        cmd.SetAction(p => CliContext.Run(() =>
        {
            using var loggers = CliContext.CreateLoggers(p);
            var log = loggers.CreateLogger("vmig.vm");
            var deviceMap = ParseDevices(p.GetValue(devices) ?? []);
            string dir = p.GetValue(runtimeDir) ?? ControlClient.DefaultDir;
            Vmm.Vm vm;
            if (p.GetValue(config) is string cfgPath)
            {
                var cfg = ConfigLoader.Load<VmConfigFile>(cfgPath);
                dir = p.GetValue(runtimeDir) ?? cfg.RuntimeDir ?? dir;
                vm = VmBuilder.CreateFresh(cfg, Path.GetDirectoryName(Path.GetFullPath(cfgPath))!, loggers);
                vm.Start();
            }
            else if (p.GetValue(restore) is string snap)
            {
                string vmName = p.GetValue(name) ?? "vm0";
                using var f = File.OpenRead(snap);
                vm = VmSnapshot.Restore(f, VmBuilder.IncomingGuest(vmName), d => OpenDevice(d, deviceMap, loggers));
            }
            else
            {
                string vmName = p.GetValue(name) ?? "vm0";
                var ep = VmControl.ParseTcp(p.GetValue(incoming)!);
                var listener = new TcpListener(ep);
                listener.Start();
                AnsiConsole.MarkupLineInterpolated($"vm {vmName}: waiting for a migration on {ep}");
                var tls = p.GetValue(tlsCert) is string cert ? new MigrationTlsOptions { CertificatePath = cert, KeyPath = p.GetValue(tlsKey), TrustedCertificatePath = p.GetValue(tlsCa) } : null;
                GuestRam? ram = null;
                if (p.GetValue(memPrealloc) is string pre)
                {
                    ulong size = Guest.Workloads.SizeParser.Parse(pre, "--mem-prealloc");
                    ulong max = new MigrationTargetOptions().MaxMemorySize;
                    if (size > max)
                    {
                        throw new ArgumentException($"--mem-prealloc {pre}: more than the {max >> 30} GiB a migration target accepts");
                    }
                    var sw = System.Diagnostics.Stopwatch.StartNew();
                    ram = GuestRam.Create(size, $"vmig-{vmName}-ram", prefault: true);
                    AnsiConsole.MarkupLineInterpolated($"vm {vmName}: {ram.Size >> 20} MiB of guest RAM preallocated in {sw.ElapsedMilliseconds} ms");
                }
                try
                {
                    // The target consumes the preallocated RAM (it disposes it on refusal or failure).
                    vm = MigrationTarget.AcceptAsync(listener, VmBuilder.IncomingGuest(vmName), d => OpenDevice(d, deviceMap, loggers),
                        new MigrationTargetOptions { Tls = tls, PreallocatedMemory = ram }).GetAwaiter().GetResult();
                }
                finally
                {
                    listener.Stop();
                }
            }
            using (vm)
            {
                using var control = new VmControl(vm, Path.Combine(dir, vm.Name + ".ctl"), log);
                using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; control.Dispose(); });
                using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; control.Dispose(); });
                AnsiConsole.MarkupLineInterpolated($"vm [bold]{vm.Name}[/] {vm.State} ({vm.Memory.Size >> 20} MiB, {vm.Vcpus.Count} vCPUs, {vm.Devices.Count} devices); control socket {control.SocketPath}");
                var serve = control.RunAsync();
                Task.WaitAny(control.Finished, serve);
                if (vm.State == VmRunState.MigratedAway)
                {
                    // The VM runs elsewhere now: hand the VFs back clean, as closing a VFIO device resets it.
                    foreach (var d in vm.Devices)
                    {
                        try
                        {
                            d.Reset();
                        }
                        catch (IOException e)
                        {
                            log.LogWarning("reset of {Device} after migration failed: {Error}", d.Description.Name, e.Message);
                        }
                    }
                }
                AnsiConsole.MarkupLineInterpolated($"vm {vm.Name}: {vm.State}; exiting");
            }
            return 0;
        }));
        return cmd;
    }

    private static Dictionary<string, string> ParseDevices(string[] specs)
    {
        var map = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (string s in specs)
        {
            int eq = s.IndexOf('=', StringComparison.Ordinal);
            if (eq <= 0)
            {
                throw new ArgumentException($"--device '{s}' is not NAME=SOCKET");
            }
            map[s[..eq]] = s[(eq + 1)..];
        }
        return map;
    }

    private static IVmDevice OpenDevice(DeviceDescription d, Dictionary<string, string> map, ILoggerFactory loggers) =>
        map.TryGetValue(d.Name, out string? sock)
            ? VmBuilder.ConnectDevice(d.Name, sock, loggers, d.Kind)
            : throw new InvalidDataException($"this host has no device for '{d.Name}' ({d.Kind}); pass --device {d.Name}=SOCKET");

    public static Command CreateMigrate()
    {
        var vm = new Argument<string>("vm") { Description = "VM name (control socket /tmp/vmig/vms/NAME.ctl) or control socket path" };
        var to = new Option<string>("--to") { Description = "target: tcp:HOST:PORT where `vmig vm --incoming` listens", Required = true };
        var downtime = new Option<double>("--downtime-limit") { Description = "downtime limit in ms", DefaultValueFactory = _ => 300 };
        var bandwidth = new Option<string?>("--max-bandwidth") { Description = "bytes per second, e.g. 500M (default unlimited)" };
        var rounds = new Option<int>("--max-rounds") { Description = "most pre-copy rounds", DefaultValueFactory = _ => 30 };
        var parallel = new Option<int>("--parallel") { Description = "TCP connections for RAM", DefaultValueFactory = _ => 1 };
        var tlsCert = new Option<string?>("--tls-cert") { Description = "client certificate (PEM), enables TLS" };
        var tlsKey = new Option<string?>("--tls-key") { Description = "client key (PEM)" };
        var tlsCa = new Option<string?>("--tls-ca") { Description = "CA certificate the target's certificate must chain to" };
        var json = new Option<string?>("--json") { Description = "write the migration report to this file" };
        var cmd = new Command("migrate", """
            Live-migrate a running VM (RAM, vCPUs, devices) to a target VM process, with a live progress bar.
            Example: vmig migrate vm0 --to tcp:127.0.0.1:7070 --downtime-limit 50
            """)
        { vm, to, downtime, bandwidth, rounds, parallel, tlsCert, tlsKey, tlsCa, json };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            var req = new JsonObject
            {
                ["op"] = "migrate",
                ["to"] = p.GetValue(to),
                ["downtimeLimitMs"] = p.GetValue(downtime),
                ["maxRounds"] = p.GetValue(rounds),
                ["parallel"] = p.GetValue(parallel),
                ["maxBandwidth"] = p.GetValue(bandwidth) is string b ? (long)Guest.Workloads.SizeParser.Parse(b, "--max-bandwidth") : 0,
            };
            if (p.GetValue(tlsCert) is string c)
            {
                req["tls"] = new JsonObject { ["cert"] = c, ["key"] = p.GetValue(tlsKey), ["ca"] = p.GetValue(tlsCa) };
            }
            else if (p.GetValue(tlsCa) is string ca)
            {
                req["tls"] = new JsonObject { ["ca"] = ca };
            }
            using var client = ControlClient.Connect(p.GetValue(vm)!);
            JsonObject? final = null;
            AnsiConsole.Progress().AutoClear(false).Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask("handshake", maxValue: 1);
                    final = client.Call(req, e =>
                    {
                        double sent = e["bytesSent"]!.GetValue<double>();
                        double rem = e["bytesRemaining"]!.GetValue<double>();
                        task.MaxValue = Math.Max(1, sent + rem);
                        task.Value = sent;
                        task.Description = string.Create(CultureInfo.InvariantCulture,
                            $"{e["phase"]} r{e["round"]} {sent / 1048576:F0}/{(sent + rem) / 1048576:F0} MiB dirty {e["dirtyRate"]!.GetValue<double>() / 1048576:F0} MiB/s bw {e["bandwidth"]!.GetValue<double>() / 1048576:F0} MiB/s ~{e["expectedDowntimeMs"]!.GetValue<double>():F0} ms");
                    });
                    task.Value = task.MaxValue;
                });
            if (p.GetValue(json) is string path && (final!["result"] ?? final["report"]) is JsonNode r)
            {
                File.WriteAllText(path, r.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
            }
            if (final!["event"]!.GetValue<string>() != "done")
            {
                AnsiConsole.MarkupLineInterpolated($"[red]migration failed: {final["message"]}[/] (source running: {final["sourceRunning"]})");
                if (final["inDoubt"]?.GetValue<bool>() == true)
                {
                    AnsiConsole.MarkupLineInterpolated($"[yellow]in doubt, resolve with: vmig resolve {p.GetValue(vm)} --discard (the target runs the VM: check it with vmig status) or --resume (it does not); the source stays paused until then[/]");
                }
                return 1;
            }
            PrintReport(final["result"]!.AsObject());
            return 0;
        }));
        return cmd;
    }

    internal static void PrintReport(JsonObject r)
    {
        var t = new Table().AddColumns("outcome", "total", "downtime", "rounds", "bytes", "connections", "TLS");
        t.AddRow(r["Outcome"]?.ToString() ?? "?", $"{r["TotalMilliseconds"]?.GetValue<double>():F1} ms", $"{r["DowntimeMilliseconds"]?.GetValue<double>():F1} ms",
            (r["Rounds"] as JsonArray)?.Count.ToString(CultureInfo.InvariantCulture) ?? "?", $"{r["TotalBytes"]?.GetValue<long>() / 1048576.0:F1} MiB",
            r["Connections"]?.ToString() ?? "1", r["Tls"]?.ToString() ?? "false");
        AnsiConsole.Write(t);
    }

    public static Command CreateSnapshot()
    {
        var vm = new Argument<string>("vm") { Description = "VM name or control socket path" };
        var to = new Option<string>("--to") { Description = "snapshot file to write", Required = true };
        var cmd = new Command("snapshot", "Write a running VM's state (RAM, vCPUs, devices) to a file; the VM keeps running. Restore with `vmig vm --restore FILE`.\nExample: vmig snapshot vm0 --to vm0.snap") { vm, to };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            using var client = ControlClient.Connect(p.GetValue(vm)!);
            var r = client.Call(new JsonObject { ["op"] = "snapshot", ["to"] = Path.GetFullPath(p.GetValue(to)!) });
            if (r["event"]!.GetValue<string>() != "done")
            {
                AnsiConsole.MarkupLineInterpolated($"[red]snapshot failed: {r["message"]}[/]");
                return 1;
            }
            AnsiConsole.MarkupLineInterpolated($"snapshot written: {p.GetValue(to)} ({r["result"]?["TotalBytes"]} bytes)");
            return 0;
        }));
        return cmd;
    }

    public static Command CreateResolve()
    {
        var vm = new Argument<string>("vm") { Description = "VM name or control socket path" };
        var resume = new Option<bool>("--resume") { Description = "the target does NOT run the VM: resume it here" };
        var discard = new Option<bool>("--discard") { Description = "the target runs the VM: give this paused copy up (the process exits)" };
        var cmd = new Command("resolve", """
            Resolve a source VM left paused "in doubt" by a migration (Commit sent, the target's result lost): exactly
            one of --resume or --discard. Check the target first (`vmig status` on it); choosing wrong runs the VM twice
            or nowhere. `vmig status NAME` shows inDoubt.
            Example: vmig resolve vm0 --resume
            """)
        { vm, resume, discard };
        cmd.Validators.Add(r =>
        {
            if (r.GetValue(resume) == r.GetValue(discard))
            {
                r.AddError("give exactly one of --resume or --discard");
            }
        });
        cmd.SetAction(p => CliContext.Run(() =>
        {
            using var client = ControlClient.Connect(p.GetValue(vm)!);
            var r = client.Call(new JsonObject { ["op"] = "resolve", ["action"] = p.GetValue(resume) ? "resume" : "discard" });
            if (r["event"]!.GetValue<string>() != "done")
            {
                AnsiConsole.MarkupLineInterpolated($"[red]resolve failed: {r["message"]}[/]");
                return 1;
            }
            AnsiConsole.MarkupLineInterpolated($"vm {p.GetValue(vm)}: {r["result"]?["state"]}{(r["result"]?["problem"] is JsonNode pr ? $" ({pr})" : "")}");
            return 0;
        }));
        return cmd;
    }

    public static Command CreateStatus()
    {
        var vm = new Argument<string>("vm") { Description = "VM name or control socket path" };
        var jsonOut = new Option<bool>("--json") { Description = "print the raw JSON status" };
        var cmd = new Command("status", "Show a VM's state, vCPUs and devices.\nExample: vmig status vm0") { vm, jsonOut };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            using var client = ControlClient.Connect(p.GetValue(vm)!);
            var r = client.Call(new JsonObject { ["op"] = "status" });
            var s = r["result"]!.AsObject();
            if (p.GetValue(jsonOut))
            {
                Console.WriteLine(s.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
                return 0;
            }
            AnsiConsole.MarkupLineInterpolated($"vm [bold]{s["name"]}[/] {s["state"]}, {s["memoryBytes"]!.GetValue<long>() >> 20} MiB, pid {s["pid"]}");
            if (s["inDoubt"]?.GetValue<bool>() == true)
            {
                AnsiConsole.MarkupLineInterpolated($"[yellow]migration in doubt: paused until `vmig resolve {s["name"]} --resume|--discard`[/]");
            }
            else if (s["lastMigration"] is JsonNode last)
            {
                AnsiConsole.MarkupLineInterpolated($"last migration: {last}");
            }
            var t = new Table().AddColumns("vCPU", "program", "slices", "fault");
            foreach (var v in s["vcpus"]!.AsArray())
            {
                t.AddRow(v!["index"]!.ToString(), v["kind"]!.ToString(), v["slices"]!.ToString(), Markup.Escape(v["fault"]?.ToString() ?? ""));
            }
            AnsiConsole.Write(t);
            var d = new Table().AddColumns("device", "kind", "migration");
            foreach (var x in s["devices"]!.AsArray())
            {
                d.AddRow(x!["name"]!.ToString(), x["kind"]!.ToString(), x["migrationFlags"]!.ToString());
            }
            AnsiConsole.Write(d);
            return 0;
        }));
        return cmd;
    }
}
