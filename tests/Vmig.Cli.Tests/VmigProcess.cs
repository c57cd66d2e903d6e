using System.Diagnostics;

namespace Vmig.Cli.Tests;

/// <summary>Runs the real `vmig` (the built vmig.dll next to the tests) as a child process.</summary>
internal static class VmigProcess
{
    public static string Dll => Path.Combine(AppContext.BaseDirectory, "vmig.dll");

    public static Process Start(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Dll);
        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }
        psi.Environment["NO_COLOR"] = "1";
        psi.Environment["COLUMNS"] = "200";
        return Process.Start(psi)!;
    }

    /// <summary>Runs to completion (or kills after <paramref name="timeout"/>); returns exit code and combined output.</summary>
    public static (int Code, string Output) Run(TimeSpan timeout, params string[] args)
    {
        using var p = Start(args);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(true);
            p.WaitForExit();
            return (-1, "TIMEOUT\n" + stdout.Result + stderr.Result);
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    /// <summary>A loopback TCP port free a moment ago (for `vmig vm --incoming tcp:127.0.0.1:PORT`).</summary>
    public static int FreePort()
    {
        var l = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        l.Start();
        int p = ((System.Net.IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return p;
    }
}

/// <summary>
/// The two-host NVMe setup of the process-level migration tests: `vmig host` A and B (NVMe "nvme0", one VF each, on
/// one shared 16 MiB namespace file; runtime dirs DIR/A and DIR/B) and a 64 MiB VM "vm0" on host A's VF (runtime dir
/// DIR/vmA) running a verifying fio job (4k randwrite, QD4) and a memory dirtier over 16 MiB.
/// </summary>
internal static class NvmeTwoHosts
{
    /// <summary>Host B's VF socket, the incoming VM's device.</summary>
    public static string TargetVfSocket(string dir) => Path.Combine(dir, "B", "nvme0-vf0.sock");

    /// <summary>
    /// Starts host A, then host B once A has written its manifest (<paramref name="start"/> gets the host letter and
    /// the config path): the first host creates the shared namespace file, and a second host opening it while it is
    /// being created failed with "being used by another process" (one harness error in 30 fault cases).
    /// </summary>
    public static void StartHosts(string dir, Action<string, string> start, Action<Func<bool>, string> waitFor)
    {
        string ns = Path.Combine(dir, "ns.img");
        foreach (string h in new[] { "A", "B" })
        {
            string cfg = Path.Combine(dir, $"host{h}.json");
            File.WriteAllText(cfg, System.Text.Json.JsonSerializer.Serialize(new
            {
                name = "host" + h,
                runtimeDir = Path.Combine(dir, h),
                nvme = new[] { new { name = "nvme0", vfs = 1, namespaces = new[] { new { path = ns, size = "16M" } } } },
            }));
            start(h, cfg);
            waitFor(() => File.Exists(Path.Combine(dir, h, "host.json")), "device host " + h);
        }
    }

    /// <summary>Writes job.fio and vm.json (the dirtier writing <paramref name="dirtierRate"/> per second); returns vm.json's path.</summary>
    public static string WriteVmConfig(string dir, string dirtierRate)
    {
        File.WriteAllText(Path.Combine(dir, "job.fio"), "[w]\nrw=randwrite\nbs=4k\niodepth=4\nsize=4M\nverify=crc32c\ntime_based=1\nruntime=600\n");
        string vm = Path.Combine(dir, "vm.json");
        File.WriteAllText(vm, System.Text.Json.JsonSerializer.Serialize(new
        {
            name = "vm0",
            memory = "64M",
            runtimeDir = Path.Combine(dir, "vmA"),
            devices = new[] { new { name = "nvme0", socket = Path.Combine(dir, "A", "nvme0-vf0.sock") } },
            workloads = new object[] { new { kind = "fio", device = "nvme0", job = "job.fio" }, new { kind = "memory-dirtier", size = "16M", rate = dirtierRate } },
        }));
        return vm;
    }
}

/// <summary>The vmig child processes of one test: started with output drained, killed and disposed at the end.</summary>
internal sealed class VmigProcesses : IDisposable
{
    private readonly List<Process> _procs = [];

    public Process Start(params string[] args)
    {
        var p = VmigProcess.Start(args);
        p.OutputDataReceived += (_, _) => { };
        p.ErrorDataReceived += (_, _) => { };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        _procs.Add(p);
        return p;
    }

    /// <summary>Waits up to 60 s for <paramref name="cond"/>.</summary>
    public static void WaitFor(Func<bool> cond, string what)
    {
        var sw = Stopwatch.StartNew();
        while (!cond())
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), "timed out waiting for " + what);
            Thread.Sleep(50);
        }
    }

    /// <summary>One request on a VM control socket; returns the final reply line.</summary>
    public static System.Text.Json.JsonElement Control(string ctl, string request)
    {
        using var c = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
        c.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(ctl));
        using var s = new System.Net.Sockets.NetworkStream(c);
        using var w = new StreamWriter(s) { AutoFlush = true };
        using var r = new StreamReader(s);
        w.WriteLine(request);
        while (true)
        {
            using var d = System.Text.Json.JsonDocument.Parse(r.ReadLine()!);
            if (d.RootElement.GetProperty("event").GetString() != "progress")
            {
                return d.RootElement.Clone();
            }
        }
    }

    public void Dispose()
    {
        foreach (var p in _procs)
        {
            if (!p.HasExited)
            {
                Vmig.Native.ProcessSignals.Send(p.Id, Vmig.Native.ProcessSignals.SIGTERM);
                if (!p.WaitForExit(5000))
                {
                    p.Kill(true);
                }
            }
            p.Dispose();
        }
    }
}
