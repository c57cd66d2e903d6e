using Vmig.Guest.Accelerator;
using Vmig.Guest.Nvme;

namespace Vmig.Guest.Workloads;

/// <summary>
/// Ready-made guest "firmware" steps for <c>VmConfig.SetupGuest</c>: bring up a guest driver on a fresh VM, or re-attach
/// it to its state in RAM on a migrated/restored one, and register what workloads use as a named service. Compose
/// several with <see cref="Combine"/>.
/// </summary>
public static class GuestSetup
{
    /// <summary>
    /// NVMe: the driver (state region [<paramref name="regionGpa"/>, +<paramref name="regionSize"/>)) on the PCI function
    /// named <paramref name="function"/>, registered as <c>service</c> (<see cref="NvmeDriver"/>) and, for each namespace
    /// queue pair k = 1..<paramref name="ioQueues"/>, as <c>service-qk</c> (<see cref="IGuestBlockDevice"/> on namespace
    /// <paramref name="nsid"/>, one per fio job).
    /// </summary>
    public static Action<GuestEnvironment, bool> Nvme(string function, string service, ulong regionGpa, ulong regionSize, uint nsid = 1, int ioQueues = 2) =>
        (env, resumed) =>
        {
            ArgumentNullException.ThrowIfNull(env);
            var fn = env.Functions[function];
            var driver = resumed
                ? NvmeDriver.Attach(env.Memory, fn, regionGpa)
                : NvmeDriver.Initialize(env.Memory, fn, regionGpa, regionSize, new NvmeDriverOptions { IoQueues = ioQueues });
            env.AddService(service, driver);
            for (int q = 1; q <= Math.Min(ioQueues, driver.IoQueueCount); q++)
            {
                env.AddService($"{service}-q{q}", NvmeBlockDevice.Open(driver, q, nsid));
            }
        };

    /// <summary>Accelerator: the driver (control block + ring at <paramref name="controlBlockGpa"/>) registered as <paramref name="service"/>.</summary>
    public static Action<GuestEnvironment, bool> Accelerator(string function, string service, ulong controlBlockGpa, uint ringEntries = 32) =>
        (env, resumed) =>
        {
            ArgumentNullException.ThrowIfNull(env);
            var fn = env.Functions[function];
            env.AddService(service, resumed
                ? AcceleratorDriver.Attach(env.Memory, fn, controlBlockGpa)
                : AcceleratorDriver.Initialize(env.Memory, fn, controlBlockGpa, ringEntries));
        };

    /// <summary>Runs several setup steps in order.</summary>
    public static Action<GuestEnvironment, bool> Combine(params Action<GuestEnvironment, bool>[] steps) =>
        (env, resumed) =>
        {
            foreach (var s in steps)
            {
                s(env, resumed);
            }
        };
}
