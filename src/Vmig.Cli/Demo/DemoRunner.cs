using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Vmig.Cli.Config;
using Vmig.Cli.Host;
using Vmig.Cli.Vm;

namespace Vmig.Cli.Demo;

/// <summary>What `vmig demo` runs. Defaults are the README's demo; CI uses a shorter one.</summary>
internal sealed record DemoOptions
{
    public int Migrations { get; init; } = 2;
    public string Memory { get; init; } = "256M";
    public string DeviceMemory { get; init; } = "64M";
    public string NamespaceSize { get; init; } = "64M";
    public string DirtyRate { get; init; } = "32M";
    public double DowntimeLimitMs { get; init; } = 50;
    public int MaxRounds { get; init; } = 30;
    /// <summary>How long the workload runs before the first and between migrations.</summary>
    public TimeSpan RunBetween { get; init; } = TimeSpan.FromSeconds(2);
    public string? Dir { get; init; }
    public bool Keep { get; init; }
}

/// <summary>One migration of the demo, with the progress samples the SVG timeline draws.</summary>
internal sealed record DemoMigration(int Index, string From, string To, string Outcome, double TotalMs, double DowntimeMs, long Bytes, int Rounds,
    string? Error, JsonObject? Report, List<JsonObject> Events);

/// <summary>The whole demo: migrations, the verifier's counts, where things are.</summary>
internal sealed record DemoReport(string WorkDir, List<DemoMigration> Migrations, JsonObject? Verifier, bool Passed, string? Svg, string? Failure);

/// <summary>
/// `vmig demo`: two device hosts (each an NVMe subsystem on a shared namespace file and an accelerator) and a VM
/// (NVMe VF with a verifying fio job, accelerator VF with a job mix, a memory dirtier) as separate processes;
/// live-migrates the VM between the hosts N times, verifies every acknowledged write, and reports.
/// </summary>
internal sealed class DemoRunner(DemoOptions o, Action<string> say, Action<JsonObject>? onProgress = null)
{
    private readonly List<ChildProcess> _children = [];

    public DemoReport Run()
    {
        string dir = o.Dir ?? Path.Combine(Path.GetTempPath(), $"vmig-demo-{Environment.ProcessId}");
        Directory.CreateDirectory(dir);
        var migrations = new List<DemoMigration>();
        JsonObject? verifier = null;
        string? failure = null;
        try
        {
            string ns = Path.Combine(dir, "ns0.img");
            var hosts = new[] { "hostA", "hostB" };
            foreach (string h in hosts)
            {
                ConfigLoader.SaveJson(Path.Combine(dir, h + ".json"), new HostConfig
                {
                    Name = h,
                    RuntimeDir = Path.Combine(dir, h),
                    Nvme = [new NvmeConfig { Name = "nvme0", Vfs = 1, QueuesPerVf = 4, VectorsPerVf = 4, Namespaces = [new NamespaceConfig { Path = ns, Size = o.NamespaceSize }] }],
                    Accelerators = [new AcceleratorConfig { Name = "accel0", Vfs = 1, DeviceMemory = o.DeviceMemory }],
                });
            }
            File.WriteAllText(Path.Combine(dir, "job.fio"), """
                ; the demo's verifying workload: every acknowledged write is recorded in a ledger in guest RAM
                [global]
                bs=4k
                iodepth=16
                size=16M
                verify=crc32c
                time_based=1
                runtime=3600

                [randrw]
                rw=randrw
                rwmixread=30
                numjobs=2
                """);
            ConfigLoader.SaveJson(Path.Combine(dir, "vm.json"), new VmConfigFile
            {
                Name = "vm0",
                Memory = o.Memory,
                RuntimeDir = Path.Combine(dir, "vm-0"),
                Devices = [new VmDeviceConfig { Name = "nvme0", Socket = Sock(dir, "hostA", "nvme0-vf0") }, new VmDeviceConfig { Name = "accel0", Socket = Sock(dir, "hostA", "accel0-vf0") }],
                Workloads = [new VmWorkloadConfig { Kind = "fio", Device = "nvme0", Job = "job.fio" }, new VmWorkloadConfig { Kind = "memory-dirtier", Size = "32M", Rate = o.DirtyRate }],
            });
            foreach (string h in hosts)
            {
                say($"starting device host {h}");
                var c = Spawn(Path.Combine(dir, h + ".log"), "host", "--config", Path.Combine(dir, h + ".json"));
                c.WaitUntil(() => File.Exists(Path.Combine(dir, h, "host.json")), TimeSpan.FromSeconds(60), $"device host {h}");
            }
            say("booting vm0 on hostA (NVMe VF + accelerator VF; fio verify, accel job mix, memory dirtier)");
            string control = Path.Combine(dir, "vm-0", "vm0.ctl");
            var vm = Spawn(Path.Combine(dir, "vm-0.log"), "vm", "--config", Path.Combine(dir, "vm.json"));
            vm.WaitUntil(() => File.Exists(control), TimeSpan.FromSeconds(60), "vm0");
            string at = "hostA";
            for (int i = 1; i <= o.Migrations; i++)
            {
                Thread.Sleep(o.RunBetween);
                string to = at == "hostA" ? "hostB" : "hostA";
                int port = FreePort();
                string tdir = Path.Combine(dir, $"vm-{i}");
                say($"migration {i}: {at} → {to}");
                var target = Spawn(Path.Combine(dir, $"vm-{i}.log"), "vm", "--incoming", $"tcp:127.0.0.1:{port}", "--name", "vm0", "--runtime-dir", tdir,
                    "--device", $"nvme0={Sock(dir, to, "nvme0-vf0")}", "--device", $"accel0={Sock(dir, to, "accel0-vf0")}");
                target.WaitUntil(() => target.LogContains("waiting for a migration"), TimeSpan.FromSeconds(60), $"incoming vm0 on {to}");
                var m = Migrate(i, at, to, control, port);
                migrations.Add(m);
                if (m.Outcome != "completed")
                {
                    failure = $"migration {i} failed: {m.Error}";
                    target.Stop(TimeSpan.FromSeconds(5));
                    break;
                }
                vm.WaitForExit(TimeSpan.FromSeconds(30));
                vm = target;
                control = Path.Combine(tdir, "vm0.ctl");
                target.WaitUntil(() => File.Exists(control), TimeSpan.FromSeconds(30), "migrated vm0");
                at = to;
            }
            Thread.Sleep(o.RunBetween);
            say($"verifying every acknowledged write on {at}");
            using (var c = ControlClient.Connect(control))
            {
                var v = c.Call(new JsonObject { ["op"] = "verify", ["resume"] = false });
                verifier = v["result"] as JsonObject;
                if (verifier is null)
                {
                    failure ??= "verify failed: " + v["message"];
                }
            }
            using (var c = ControlClient.Connect(control))
            {
                c.Call(new JsonObject { ["op"] = "quit" });
            }
            vm.WaitForExit(TimeSpan.FromSeconds(20));
        }
        catch (Exception e) when (e is IOException or TimeoutException or InvalidOperationException or SocketException)
        {
            failure = e.Message;
        }
        finally
        {
            for (int i = _children.Count - 1; i >= 0; i--)
            {
                _children[i].Dispose();
            }
        }
        bool clean = verifier is not null && verifier["lost"]!.GetValue<long>() == 0 && verifier["corrupt"]!.GetValue<long>() == 0 && verifier["writes"]!.GetValue<long>() > 0;
        bool passed = failure is null && clean && migrations.Count == o.Migrations && migrations.All(m => m.Outcome == "completed");
        if (failure is null && !clean)
        {
            failure = "the verifier found lost or corrupt writes (or no writes at all)";
        }
        return new DemoReport(dir, migrations, verifier, passed, null, failure);
    }

    private DemoMigration Migrate(int index, string from, string to, string control, int port)
    {
        var events = new List<JsonObject>();
        using var c = ControlClient.Connect(control);
        var sw = Stopwatch.StartNew();
        var final = c.Call(new JsonObject
        {
            ["op"] = "migrate",
            ["to"] = $"tcp:127.0.0.1:{port}",
            ["downtimeLimitMs"] = o.DowntimeLimitMs,
            ["maxRounds"] = o.MaxRounds,
        }, e =>
        {
            events.Add(e);
            onProgress?.Invoke(e);
        });
        var report = (final["result"] ?? final["report"]) as JsonObject;
        string outcome = final["event"]!.GetValue<string>() == "done" ? "completed" : "failed";
        return new DemoMigration(index, from, to, outcome,
            report?["TotalMilliseconds"]?.GetValue<double>() ?? sw.Elapsed.TotalMilliseconds,
            report?["DowntimeMilliseconds"]?.GetValue<double>() ?? 0,
            report?["TotalBytes"]?.GetValue<long>() ?? 0,
            (report?["Rounds"] as JsonArray)?.Count ?? 0,
            final["message"]?.GetValue<string>(), report, events);
    }

    private ChildProcess Spawn(string log, params string[] args)
    {
        var c = ChildProcess.Start(log, args);
        _children.Add(c);
        return c;
    }

    private static string Sock(string dir, string host, string fn) => Path.Combine(dir, host, fn + ".sock");

    private static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    internal static string Mb(long bytes) => (bytes / 1048576.0).ToString("F1", CultureInfo.InvariantCulture) + " MiB";
}
