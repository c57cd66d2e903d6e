namespace Vmig.Cli.Host;

public sealed partial class DeviceHost
{
    private void StartNvme(NvmeConfig n, string baseDir)
    {
        _ = baseDir;
        throw new ArgumentException($"nvme[{n.Name}]: the NVMe subsystem is not served by this build yet");
    }
}
