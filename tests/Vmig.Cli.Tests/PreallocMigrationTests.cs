using System.Text.Json;

namespace Vmig.Cli.Tests;

/// <summary>`vmig migrate` to `vmig vm --incoming --mem-prealloc SIZE` (QEMU's -m SIZE -mem-prealloc -incoming), as processes.</summary>
public sealed class PreallocMigrationTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-prealloc-").FullName;
    private readonly VmigProcesses _procs = new();

    public void Dispose()
    {
        _procs.Dispose();
        Directory.Delete(_dir, true);
    }

    [Fact]
    public void A_target_with_preallocated_ram_of_another_size_refuses_and_one_of_the_right_size_receives_the_vm_intact()
    {
        File.WriteAllText(Path.Combine(_dir, "p0.json"), JsonSerializer.Serialize(new
        {
            name = "p0",
            memory = "32M",
            runtimeDir = Path.Combine(_dir, "src"),
            workloads = new[] { new { kind = "memory-dirtier", size = "8M", rate = "4M" } },
        }));
        _procs.Start("vm", "--config", Path.Combine(_dir, "p0.json"));
        string ctl = Path.Combine(_dir, "src", "p0.ctl");
        VmigProcesses.WaitFor(() => File.Exists(ctl), ctl);

        // 16 MiB preallocated cannot hold a 32 MiB VM: refused at the handshake, the source keeps running.
        int port = VmigProcess.FreePort();
        _procs.Start("vm", "--incoming", $"tcp:127.0.0.1:{port}", "--name", "p0", "--runtime-dir", Path.Combine(_dir, "dst1"), "--mem-prealloc", "16M");
        Thread.Sleep(2000);
        var (bad, badOut) = VmigProcess.Run(TimeSpan.FromMinutes(2), "migrate", ctl, "--to", $"tcp:127.0.0.1:{port}");
        Assert.True(bad != 0, badOut);
        Assert.Contains("preallocated", badOut, StringComparison.Ordinal);
        Assert.Equal("Running", VmigProcesses.Control(ctl, "{\"op\":\"status\"}").GetProperty("result").GetProperty("state").GetString());

        port = VmigProcess.FreePort();
        _procs.Start("vm", "--incoming", $"tcp:127.0.0.1:{port}", "--name", "p0", "--runtime-dir", Path.Combine(_dir, "dst2"), "--mem-prealloc", "32M");
        Thread.Sleep(2000);
        string json = Path.Combine(_dir, "report.json");
        var (code, output) = VmigProcess.Run(TimeSpan.FromMinutes(2), "migrate", ctl, "--to", $"tcp:127.0.0.1:{port}", "--json", json);
        Assert.True(code == 0, output);
        using var r = JsonDocument.Parse(File.ReadAllText(json));
        Assert.Equal("completed", r.RootElement.GetProperty("Outcome").GetString());
        string ctl2 = Path.Combine(_dir, "dst2", "p0.ctl");
        VmigProcesses.WaitFor(() => File.Exists(ctl2), ctl2);
        var v = VmigProcesses.Control(ctl2, "{\"op\":\"verify\"}").GetProperty("result");
        // The dirtier's pages are checked against its registers: RAM the migration did not fill would read as zeros.
        Assert.Equal(0, v.GetProperty("corrupt").GetInt64());
    }
}
