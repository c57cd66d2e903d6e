using System.Net.Sockets;
using System.Text.Json;

namespace Vmig.Cli.Tests;

/// <summary>
/// Issue 9 item 5 at the process level: a real `vmig host` serves each VF on its own socket and each PF on a
/// host-only one. A VM is handed VF sockets only; the PF socket is owner-only (0600), and a VF socket speaks for its
/// VF alone (its config space reports the VF device, not the PF).
/// </summary>
[System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
public sealed class HostIsolationTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-hostiso-").FullName;
    private readonly VmigProcesses _procs = new();

    public void Dispose()
    {
        _procs.Dispose();
        Directory.Delete(_dir, true);
    }

    [Fact]
    public void Pf_sockets_are_owner_only_and_every_vf_has_its_own_socket()
    {
        File.WriteAllText(Path.Combine(_dir, "host.json"), JsonSerializer.Serialize(new
        {
            name = "hostI",
            runtimeDir = Path.Combine(_dir, "run"),
            nvme = new[] { new { name = "nvme0", vfs = 2, namespaces = new[] { new { path = Path.Combine(_dir, "ns.img"), size = "4M" } } } },
            accelerators = new[] { new { name = "accel0", vfs = 2, deviceMemory = "1M" } },
        }));
        _procs.Start("host", "--config", Path.Combine(_dir, "host.json"));
        string manifest = Path.Combine(_dir, "run", "host.json");
        VmigProcesses.WaitFor(() => File.Exists(manifest), "device host manifest");
        string[] pfs = [Path.Combine(_dir, "run", "nvme0-pf.sock"), Path.Combine(_dir, "run", "accel0-pf.sock")];
        string[] vfs = ["nvme0-vf0", "nvme0-vf1", "accel0-vf0", "accel0-vf1"];
        foreach (string pf in pfs)
        {
            Assert.True(File.Exists(pf), pf);
            Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(pf));
        }
        foreach (string vf in vfs)
        {
            string path = Path.Combine(_dir, "run", vf + ".sock");
            Assert.True(File.Exists(path), path);
            // A live, separate listener per VF.
            using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            s.Connect(new UnixDomainSocketEndPoint(path));
        }
        // The manifest names exactly those PF sockets with role "pf" (host-only) and the VF sockets with role "vf".
        using var doc = JsonDocument.Parse(File.ReadAllText(manifest));
        var functions = doc.RootElement.EnumerateObject().First(p => p.NameEquals("functions") || p.NameEquals("Functions")).Value.EnumerateArray()
            .Select(f => (Role: Prop(f, "role"), Path: Prop(f, "path"))).ToList();
        Assert.Equal(pfs.Order(), functions.Where(f => f.Role == "pf").Select(f => f.Path).Order());
        Assert.Equal(vfs.Select(v => Path.Combine(_dir, "run", v + ".sock")).Order(), functions.Where(f => f.Role == "vf").Select(f => f.Path).Order());
    }

    private static string? Prop(JsonElement e, string name) =>
        e.EnumerateObject().FirstOrDefault(p => string.Equals(p.Name, name, StringComparison.OrdinalIgnoreCase)).Value.GetString();
}
