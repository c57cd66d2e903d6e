using System.Text.Json;

namespace Vmig.Cli.Tests;

/// <summary>`vmig conform` against every vmig device kind, served by a real `vmig host` process (issue 9).</summary>
public sealed class RealDeviceConformanceTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-conform-").FullName;
    private readonly VmigProcesses _procs = new();

    public void Dispose()
    {
        _procs.Dispose();
        Directory.Delete(_dir, true);
    }

    [Fact]
    public void Nvme_and_accelerator_vfs_pass_the_conformance_suite()
    {
        File.WriteAllText(Path.Combine(_dir, "host.json"), JsonSerializer.Serialize(new
        {
            name = "c",
            runtimeDir = Path.Combine(_dir, "run"),
            nvme = new[] { new { name = "nvme0", vfs = 1, namespaces = new[] { new { path = Path.Combine(_dir, "ns.img"), size = "8M" } } } },
            accelerators = new[] { new { name = "accel0", vfs = 1, deviceMemory = "4M" } },
        }));
        _procs.Start("host", "--config", Path.Combine(_dir, "host.json"));
        VmigProcesses.WaitFor(() => File.Exists(Path.Combine(_dir, "run", "host.json")), "device host");
        foreach (string fn in new[] { "nvme0-vf0", "accel0-vf0" })
        {
            string junit = Path.Combine(_dir, fn + ".xml");
            var (code, output) = VmigProcess.Run(TimeSpan.FromMinutes(2), "conform", Path.Combine(_dir, "run", fn + ".sock"), "--junit", junit);
            Assert.True(code == 0, fn + ":\n" + output);
            Assert.Contains(" 0 failed", output, StringComparison.Ordinal);
            Assert.Contains("failures=\"0\"", File.ReadAllText(junit), StringComparison.Ordinal);
        }
    }
}
