using System.Diagnostics;
using System.Text.Json;
using Vmig.Native;

namespace Vmig.Cli.Tests;

/// <summary>Real processes: two device hosts, a VM, an incoming VM, and `vmig migrate` killed with SIGTERM mid-way.</summary>
public sealed class MigrationInterruptTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-sigterm-").FullName;
    private readonly VmigProcesses _procs = new();

    public void Dispose()
    {
        _procs.Dispose();
        Directory.Delete(_dir, true);
    }

    private Process Start(params string[] args) => _procs.Start(args);

    private static void WaitFor(Func<bool> cond, string what) => VmigProcesses.WaitFor(cond, what);

    [Fact]
    public void Sigterm_to_vmig_migrate_mid_migration_leaves_the_vm_running_at_the_source_with_nothing_lost()
    {
        NvmeTwoHosts.StartHosts(_dir, (_, cfg) => Start("host", "--config", cfg), WaitFor);
        Start("vm", "--config", NvmeTwoHosts.WriteVmConfig(_dir, "8M"));
        string ctl = Path.Combine(_dir, "vmA", "vm0.ctl");
        WaitFor(() => File.Exists(ctl), "vm0 control socket");
        int port = VmigProcess.FreePort();
        var target = Start("vm", "--incoming", $"tcp:127.0.0.1:{port}", "--name", "vm0", "--runtime-dir", Path.Combine(_dir, "vmB"),
            "--device", $"nvme0={NvmeTwoHosts.TargetVfSocket(_dir)}");
        Thread.Sleep(2000);

        // 1 MiB/s makes the 64 MiB RAM copy take a minute: the SIGTERM lands in pre-copy.
        var migrate = Start("migrate", ctl, "--to", $"tcp:127.0.0.1:{port}", "--max-bandwidth", "1M");
        Thread.Sleep(2500);
        Assert.False(migrate.HasExited, "the migration should still be running");
        Assert.True(ProcessSignals.Send(migrate.Id, ProcessSignals.SIGTERM));
        Assert.True(migrate.WaitForExit(20_000));

        // The source rolls back: still Running, still answering; the target gave up.
        WaitFor(() => Status(ctl) == "Running", "source back to Running");
        Assert.True(target.WaitForExit(60_000), "the target should discard and exit");
        Assert.False(File.Exists(Path.Combine(_dir, "vmB", "vm0.ctl")));
        Thread.Sleep(500);
        var (code, output) = VmigProcess.Run(TimeSpan.FromSeconds(60), "status", ctl, "--json");
        Assert.Equal(0, code);
        Assert.Contains("\"Running\"", output, StringComparison.Ordinal);
        var reply = VmigProcesses.Control(ctl, "{\"op\":\"verify\"}");
        Assert.True(reply.TryGetProperty("result", out var res) && res.ValueKind == JsonValueKind.Object, "verify failed: " + reply);
        Assert.True(res.GetProperty("writes").GetInt64() > 0);
        Assert.Equal(0, res.GetProperty("lost").GetInt64());
        Assert.Equal(0, res.GetProperty("corrupt").GetInt64());
    }

    private static string? Status(string ctl)
    {
        var (code, output) = VmigProcess.Run(TimeSpan.FromSeconds(30), "status", ctl, "--json");
        if (code != 0)
        {
            return null;
        }
        int i = output.IndexOf('{', StringComparison.Ordinal);
        using var d = JsonDocument.Parse(output[i..]);
        return d.RootElement.GetProperty("state").GetString();
    }
}
