using System.Globalization;
using Microsoft.Extensions.Logging;
using Vmig.Guest;
using Vmig.Guest.Os;
using Vmig.Guest.Workloads;
using Vmig.VfioUser.Client;
using Vmig.Vmm;

namespace Vmig.Cli.Vm;

/// <summary>Builds VMs from a <see cref="VmConfigFile"/> (fresh boot) or for an incoming migration / restore.</summary>
internal static class VmBuilder
{
    /// <summary>Every guest program kind vmig ships; a target must know every kind the source runs.</summary>
    public static GuestProgramRegistry Programs() => new GuestProgramRegistry()
        .Add(FioWorkload.Factory)
        .Add(MemoryDirtier.Factory)
        .Add(AcceleratorJobMix.Factory);

    /// <summary>Connects one VF and wraps it as a VM device, probing kind and profile from the device itself.</summary>
    public static VfioUserVmDevice ConnectDevice(string name, string socket, ILoggerFactory loggers, string? expectKind = null)
    {
        var client = VfioUserClient.Connect(socket, new VfioUserClientOptions { Loggers = loggers });
        try
        {
            var (kind, profile) = DeviceProfile.Read(client);
            string k = DeviceProfile.KindName(kind);
            if (expectKind is not null && expectKind != k)
            {
                throw new InvalidDataException($"device {name} at {socket} is a {k}, the migrating VM has a {expectKind} there");
            }
            return new VfioUserVmDevice(client, name, k, profile);
        }
        catch
        {
            client.Dispose();
            throw;
        }
    }

    /// <summary>The guest configuration of a target/restored VM: same programs, drivers re-attached from the boot block in RAM.</summary>
    public static VmConfig IncomingGuest(string name) => new()
    {
        Name = name,
        Programs = Programs(),
        SetupGuest = (env, resumed) => GuestOs.Boot(env, resumed: true, plan: null),
    };

    /// <summary>Connects the devices, lays out the guest (drivers, then workload state) and creates a VM ready to start.</summary>
    /// <exception cref="ArgumentException">A config field is invalid (the message names it).</exception>
    public static Vmm.Vm CreateFresh(VmConfigFile cfg, string baseDir, ILoggerFactory loggers)
    {
        ulong memory = SizeParser.Parse(cfg.Memory, "memory");
        var devices = new List<VfioUserVmDevice>();
        try
        {
            foreach (var d in cfg.Devices)
            {
                if (string.IsNullOrWhiteSpace(d.Name) || string.IsNullOrWhiteSpace(d.Socket))
                {
                    throw new ArgumentException("devices[]: name and socket are required");
                }
                devices.Add(ConnectDevice(d.Name, d.Socket, loggers));
            }
            var fioQueues = new Dictionary<string, int>(StringComparer.Ordinal);
            var jobs = new List<(VmWorkloadConfig W, string Text, IReadOnlyList<FioJob> Jobs)>();
            foreach (var w in cfg.Workloads.Where(w => w.Kind == "fio"))
            {
                string dev = w.Device ?? throw new ArgumentException("workloads[fio].device is required");
                if (!devices.Any(x => x.Description.Name == dev && x.Description.Kind == "nvme"))
                {
                    throw new ArgumentException($"workloads[fio].device '{dev}' is not an NVMe device of this VM");
                }
                string text = w.Job is null ? throw new ArgumentException("workloads[fio].job is required")
                    : w.Job.Contains('\n', StringComparison.Ordinal) ? w.Job : File.ReadAllText(Path.Combine(baseDir, w.Job));
                var parsed = FioJobParser.Parse(text);
                jobs.Add((w, text, parsed));
                fioQueues[dev] = fioQueues.GetValueOrDefault(dev) + parsed.Sum(j => j.NumJobs);
            }
            var plan = GuestOs.Plan(devices.Select(d => (d.Description.Name,
                d.Description.Kind switch { "nvme" => GuestDriverKind.Nvme, "accel" => GuestDriverKind.Accelerator, _ => GuestDriverKind.None },
                fioQueues.GetValueOrDefault(d.Description.Name, 1))), out ulong next);
            var vcpus = new List<VcpuConfig>();
            var queueNext = new Dictionary<string, int>(StringComparer.Ordinal);
            foreach (var (w, text, parsed) in jobs)
            {
                for (int j = 0; j < parsed.Count; j++)
                {
                    for (int k = 0; k < parsed[j].NumJobs; k++)
                    {
                        int q = queueNext[w.Device!] = queueNext.GetValueOrDefault(w.Device!) + 1;
                        ulong gpa = Take(ref next, FioWorkload.StateSize(parsed[j]), memory);
                        vcpus.Add(new VcpuConfig("fio", string.Create(CultureInfo.InvariantCulture, $"device={w.Device}.q{q},gpa={gpa},job={j},clone={k}\n{text}")));
                    }
                }
            }
            foreach (var d in devices.Where(d => d.Description.Kind == "accel"))
            {
                ulong gpa = Take(ref next, 4096, memory);
                vcpus.Add(new VcpuConfig("accel-mix", string.Create(CultureInfo.InvariantCulture, $"device={d.Description.Name},gpa={gpa},len=65536,regions=8")));
            }
            foreach (var w in cfg.Workloads.Where(w => w.Kind == "memory-dirtier"))
            {
                ulong size = SizeParser.Parse(w.Size ?? "16M", "workloads[memory-dirtier].size");
                ulong gpa = Take(ref next, size, memory);
                // The dirtier's rate argument is in MiB/s; the config gives bytes/s with a suffix ("64M").
                ulong rate = w.Rate is null ? 0 : SizeParser.Parse(w.Rate, "workloads[memory-dirtier].rate");
                ulong mibPerSecond = rate == 0 ? 0 : Math.Max(1, rate >> 20);
                vcpus.Add(new VcpuConfig("memory-dirtier", string.Create(CultureInfo.InvariantCulture, $"gpa={gpa},size={size},rate={mibPerSecond}")));
            }
            foreach (var w in cfg.Workloads.Where(w => w.Kind is not ("fio" or "memory-dirtier")))
            {
                throw new ArgumentException($"workloads[].kind '{w.Kind}' is not fio or memory-dirtier");
            }
            var config = new VmConfig
            {
                Name = cfg.Name,
                MemorySize = memory,
                Vcpus = vcpus,
                Programs = Programs(),
                SetupGuest = (env, resumed) => GuestOs.Boot(env, resumed, resumed ? null : plan),
            };
            return Vmm.Vm.Create(config, devices);
        }
        catch
        {
            foreach (var d in devices)
            {
                d.Dispose();
            }
            throw;
        }
    }

    private static ulong Take(ref ulong next, ulong bytes, ulong memory)
    {
        ulong gpa = next;
        next += (bytes + 4095) & ~4095UL;
        if (next > memory)
        {
            throw new ArgumentException($"memory: {memory} bytes of guest RAM cannot hold the drivers and workloads (need at least {next})");
        }
        return gpa;
    }
}
