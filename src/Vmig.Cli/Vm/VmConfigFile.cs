namespace Vmig.Cli.Vm;

/// <summary>`vmig vm --config FILE`: a VM. Sizes accept K/M/G suffixes.</summary>
public sealed class VmConfigFile
{
    public string Name { get; set; } = "vm0";

    /// <summary>Guest RAM, e.g. "256M".</summary>
    public string Memory { get; set; } = "256M";

    /// <summary>Where the control socket NAME.ctl goes (default /tmp/vmig/vms).</summary>
    public string? RuntimeDir { get; set; }

    /// <summary>Assigned functions: a name the guest sees and the vfio-user socket of the VF.</summary>
    public List<VmDeviceConfig> Devices { get; set; } = [];

    /// <summary>Guest workloads, one vCPU per fio clone (numjobs) and one per other workload.</summary>
    public List<VmWorkloadConfig> Workloads { get; set; } = [];
}

public sealed class VmDeviceConfig
{
    /// <summary>Name in the VM (e.g. "nvme0"); the target of a migration attaches its own VF under the same name.</summary>
    public string Name { get; set; } = "";

    /// <summary>vfio-user socket path of the VF.</summary>
    public string Socket { get; set; } = "";
}

public sealed class VmWorkloadConfig
{
    /// <summary>"fio" (needs <see cref="Device"/> and <see cref="Job"/>) or "memory-dirtier" (needs <see cref="Size"/>, optional <see cref="Rate"/>).</summary>
    public string Kind { get; set; } = "fio";

    /// <summary>fio: the NVMe device name.</summary>
    public string? Device { get; set; }

    /// <summary>fio: a job file path (relative to the config) or the job text itself (when it contains a newline).</summary>
    public string? Job { get; set; }

    /// <summary>memory-dirtier: bytes of RAM it sweeps, e.g. "32M".</summary>
    public string? Size { get; set; }

    /// <summary>memory-dirtier: write rate per second, e.g. "64M" (0 or absent = as fast as it can).</summary>
    public string? Rate { get; set; }
}
