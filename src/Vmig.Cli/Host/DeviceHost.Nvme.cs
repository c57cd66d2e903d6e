using Vmig.Devices.Nvme;
using Vmig.Guest.Workloads;

namespace Vmig.Cli.Host;

public sealed partial class DeviceHost
{
    /// <summary>
    /// One NVMe subsystem: namespaces on image files (created sparse at their configured size if missing), attached
    /// to every secondary; each secondary gets its flexible queues and vectors from the primary (Virtualization
    /// Management) and is brought online; VFs are enabled through the PF's SR-IOV capability. The identity (serial,
    /// NQN) derives from the subsystem name only, so the same config on two hosts gives migration-compatible VFs.
    /// </summary>
    private void StartNvme(NvmeConfig n, string baseDir)
    {
        if (n.Vfs is < 1 or > 32)
        {
            throw new ArgumentException($"nvme[{n.Name}].vfs must be 1..32, not {n.Vfs}");
        }
        if (n.QueuesPerVf is < 1 or > 64 || n.VectorsPerVf is < 1 or > 64)
        {
            throw new ArgumentException($"nvme[{n.Name}].queuesPerVf and vectorsPerVf must be 1..64");
        }
        if (n.Namespaces.Count == 0)
        {
            throw new ArgumentException($"nvme[{n.Name}].namespaces: at least one namespace is required");
        }
        var sub = new NvmeSubsystem(new NvmeSubsystemOptions
        {
            SerialNumber = $"VMIG-{n.Name}".PadRight(20)[..20].Trim(),
            Subnqn = $"nqn.2026-11.io.vmig:nvme:{n.Name}",
            MaxSecondaryControllers = n.Vfs,
            MaxQueuesPerSecondary = (ushort)(n.QueuesPerVf + 1),
            MaxVectorsPerSecondary = (ushort)n.VectorsPerVf,
        });
        _owned.Add(sub);
        var cntlids = Enumerable.Range(1, n.Vfs).Select(i => (ushort)i).ToArray();
        for (int i = 0; i < n.Namespaces.Count; i++)
        {
            var ns = n.Namespaces[i];
            string field = $"nvme[{n.Name}].namespaces[{i}]";
            if (string.IsNullOrWhiteSpace(ns.Path))
            {
                throw new ArgumentException($"{field}.path is required");
            }
            if (ns.LbaSize is not (512 or 4096))
            {
                throw new ArgumentException($"{field}.lbaSize must be 512 or 4096, not {ns.LbaSize}");
            }
            string path = Path.IsPathRooted(ns.Path) ? ns.Path : Path.Combine(baseDir, ns.Path);
            if (!File.Exists(path))
            {
                ulong size = SizeParser.Parse(ns.Size ?? throw new ArgumentException($"{field}: {path} does not exist and no size is given"), $"{field}.size");
                using var f = File.Create(path);
                f.SetLength((long)size);
            }
            uint nsid = sub.AddNamespace(path, ns.LbaSize);
            var st = sub.AttachNamespace(nsid, cntlids);
            if (!st.IsSuccess)
            {
                throw new ArgumentException($"{field}: attaching NSID {nsid} failed: {st}");
            }
        }
        foreach (ushort c in cntlids)
        {
            sub.ProvisionSecondary(c, (ushort)(n.QueuesPerVf + 1), (ushort)n.VectorsPerVf);
        }
        Serve(sub.PrimaryFunction, n.Name + "-pf", "nvme", "pf");
        sub.EnableVfs(n.Vfs);
        for (int i = 0; i < n.Vfs; i++)
        {
            Serve(sub.GetVfFunction(i) ?? throw new InvalidOperationException($"VF {i} did not come up"), $"{n.Name}-vf{i}", "nvme", "vf");
        }
    }
}
