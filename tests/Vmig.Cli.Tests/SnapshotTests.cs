using System.Text.Json;

namespace Vmig.Cli.Tests;

public sealed class SnapshotTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-snap-").FullName;
    private readonly VmigProcesses _procs = new();

    public void Dispose()
    {
        _procs.Dispose();
        Directory.Delete(_dir, true);
    }

    [Fact]
    public void Snapshot_then_restore_in_a_new_process_continues_the_guest_with_consistent_memory()
    {
        File.WriteAllText(Path.Combine(_dir, "vm.json"), JsonSerializer.Serialize(new
        {
            name = "s0",
            memory = "64M",
            runtimeDir = Path.Combine(_dir, "a"),
            workloads = new[] { new { kind = "memory-dirtier", size = "16M", rate = "8M" } },
        }));
        var src = _procs.Start("vm", "--config", Path.Combine(_dir, "vm.json"));
        string ctl = Path.Combine(_dir, "a", "s0.ctl");
        VmigProcesses.WaitFor(() => File.Exists(ctl), ctl);
        Thread.Sleep(1000);
        string snap = Path.Combine(_dir, "s0.snap");
        var (code, output) = VmigProcess.Run(TimeSpan.FromSeconds(60), "snapshot", ctl, "--to", snap);
        Assert.True(code == 0, output);
        Assert.True(new FileInfo(snap).Length > 1 << 20);
        Assert.Equal("Running", VmigProcesses.Control(ctl, "{\"op\":\"status\"}").GetProperty("result").GetProperty("state").GetString());
        VmigProcesses.Control(ctl, "{\"op\":\"quit\"}");
        Assert.True(src.WaitForExit(20_000));

        _procs.Start("vm", "--restore", snap, "--name", "s0", "--runtime-dir", Path.Combine(_dir, "b"));
        string ctl2 = Path.Combine(_dir, "b", "s0.ctl");
        VmigProcesses.WaitFor(() => File.Exists(ctl2), ctl2);
        Thread.Sleep(500);
        var st = VmigProcesses.Control(ctl2, "{\"op\":\"status\"}").GetProperty("result");
        Assert.Equal("Running", st.GetProperty("state").GetString());
        Assert.True(st.GetProperty("vcpus")[0].GetProperty("slices").GetInt64() > 0);
        var v = VmigProcesses.Control(ctl2, "{\"op\":\"verify\"}").GetProperty("result");
        Assert.Equal(0, v.GetProperty("corrupt").GetInt64());

        // A corrupted snapshot is refused with a clear error, nothing starts.
        var bytes = File.ReadAllBytes(snap);
        bytes[bytes.Length / 2] ^= 0x40;
        string bad = Path.Combine(_dir, "bad.snap");
        File.WriteAllBytes(bad, bytes);
        var (code2, output2) = VmigProcess.Run(TimeSpan.FromSeconds(60), "vm", "--restore", bad, "--name", "s1", "--runtime-dir", Path.Combine(_dir, "c"));
        Assert.Equal(1, code2);
        Assert.Contains("CRC", output2, StringComparison.OrdinalIgnoreCase);
    }
}
