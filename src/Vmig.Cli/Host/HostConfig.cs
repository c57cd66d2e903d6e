namespace Vmig.Cli.Host;

/// <summary>`vmig host --config FILE`: the device host's functions. Sizes accept K/M/G suffixes ("64M").</summary>
public sealed class HostConfig
{
    /// <summary>Host name, used in socket names and logs.</summary>
    public string Name { get; set; } = "host";

    /// <summary>Where sockets and the ready file go (default /tmp/vmig/NAME).</summary>
    public string? RuntimeDir { get; set; }

    public List<NvmeConfig> Nvme { get; set; } = [];

    public List<AcceleratorConfig> Accelerators { get; set; } = [];
}

/// <summary>One NVMe subsystem: a primary controller (PF, host-only socket) and secondaries (VFs, one socket each).</summary>
public sealed class NvmeConfig
{
    public string Name { get; set; } = "nvme0";

    /// <summary>Namespaces on raw image files (created at <see cref="NamespaceConfig.Size"/> if missing).</summary>
    public List<NamespaceConfig> Namespaces { get; set; } = [];

    /// <summary>Secondary controllers (VFs) to enable and serve.</summary>
    public int Vfs { get; set; } = 1;

    /// <summary>Flexible I/O queues given to each secondary (plus its admin queue).</summary>
    public int QueuesPerVf { get; set; } = 4;

    /// <summary>Flexible interrupt vectors given to each secondary.</summary>
    public int VectorsPerVf { get; set; } = 4;
}

public sealed class NamespaceConfig
{
    /// <summary>Image file path (relative paths are relative to the config file).</summary>
    public string Path { get; set; } = "";

    /// <summary>Size when the file has to be created, e.g. "64M". An existing file keeps its size.</summary>
    public string? Size { get; set; }

    /// <summary>LBA data size: 512 or 4096.</summary>
    public int LbaSize { get; set; } = 512;
}

/// <summary>One accelerator PF with VFs, each with on-device memory.</summary>
public sealed class AcceleratorConfig
{
    public string Name { get; set; } = "accel0";
    public int Vfs { get; set; } = 1;

    /// <summary>Device memory per VF, e.g. "64M" (memfd-backed, allocated lazily).</summary>
    public string DeviceMemory { get; set; } = "64M";

    /// <summary>Largest job ring (power of two).</summary>
    public int MaxRingEntries { get; set; } = 1024;
}
