using Microsoft.Extensions.Logging;
using Vmig.Devices.Accelerator;
using Vmig.Guest.Workloads;
using Vmig.VfioUser.Server;

namespace Vmig.Cli.Host;

/// <summary>One served socket of a device host.</summary>
/// <param name="Name">Function name, e.g. "nvme0-vf0".</param>
/// <param name="Kind">"nvme" or "accel".</param>
/// <param name="Role">"vf" (controlled function, handed to a VM) or "pf" (controlling function, host-only).</param>
/// <param name="Path">The vfio-user socket path.</param>
public sealed record ServedFunction(string Name, string Kind, string Role, string Path);

/// <summary>
/// The device host process (`vmig host`): builds the NVMe subsystems and accelerators of a <see cref="HostConfig"/>,
/// enables their VFs through the PF's SR-IOV capability, and serves every VF on its own vfio-user socket and every
/// PF on a host-only socket (mode 0600). Disposing stops every server and removes the sockets.
/// </summary>
public sealed partial class DeviceHost : IDisposable
{
    private readonly List<VfioUserServer> _servers = [];
    private readonly List<IDisposable> _owned = [];
    private readonly List<ServedFunction> _served = [];
    private readonly ILoggerFactory _loggers;

    private DeviceHost(string name, string runtimeDir, ILoggerFactory loggers)
    {
        Name = name;
        RuntimeDir = runtimeDir;
        _loggers = loggers;
    }

    public string Name { get; }
    public string RuntimeDir { get; }
    public IReadOnlyList<ServedFunction> Served => _served;

    /// <summary>Builds and starts everything in <paramref name="config"/>. Relative namespace paths resolve against <paramref name="baseDir"/>.</summary>
    /// <exception cref="ArgumentException">A config value is out of range (message names the field).</exception>
    public static DeviceHost Start(HostConfig config, string baseDir, ILoggerFactory loggers)
    {
        ArgumentNullException.ThrowIfNull(config);
        string dir = config.RuntimeDir ?? Path.Combine(Path.GetTempPath(), "vmig", config.Name);
        Directory.CreateDirectory(dir);
        var host = new DeviceHost(config.Name, dir, loggers);
        try
        {
            foreach (var n in config.Nvme)
            {
                host.StartNvme(n, baseDir);
            }
            foreach (var a in config.Accelerators)
            {
                host.StartAccelerator(a);
            }
            return host;
        }
        catch
        {
            host.Dispose();
            throw;
        }
    }

    private void StartAccelerator(AcceleratorConfig a)
    {
        if (a.Vfs is < 1 or > 64)
        {
            throw new ArgumentException($"accelerators[{a.Name}].vfs must be 1..64, not {a.Vfs}");
        }
        ulong mem = SizeParser.Parse(a.DeviceMemory, $"accelerators[{a.Name}].deviceMemory");
        var pf = new AcceleratorPf((ushort)a.Vfs, AcceleratorProfile.Create(mem, (uint)a.MaxRingEntries));
        _owned.Add(pf);
        Serve(pf, a.Name + "-pf", "accel", "pf");
        pf.EnableVfs(a.Vfs);
        for (int i = 0; i < a.Vfs; i++)
        {
            Serve(pf.GetVf(i), $"{a.Name}-vf{i}", "accel", "vf");
        }
    }

    private void Serve(VfioUserDevice device, string name, string kind, string role)
    {
        string path = Path.Combine(RuntimeDir, name + ".sock");
        var server = new VfioUserServer(device, path, null, _loggers);
        server.Start();
        if (role == "pf")
        {
            // The controlling function is the host's: never handed to a VM (ARCHITECTURE §3).
            File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        }
        _servers.Add(server);
        _served.Add(new ServedFunction(name, kind, role, path));
    }

    public void Dispose()
    {
        foreach (var s in _servers)
        {
            s.Dispose();
        }
        _servers.Clear();
        for (int i = _owned.Count - 1; i >= 0; i--)
        {
            _owned[i].Dispose();
        }
        _owned.Clear();
    }
}
