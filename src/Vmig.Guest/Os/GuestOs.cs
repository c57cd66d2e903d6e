using System.Buffers.Binary;
using System.Text;
using Vmig.Guest.Accelerator;
using Vmig.Guest.Nvme;
using Vmig.Guest.Workloads;

namespace Vmig.Guest.Os;

/// <summary>Which guest driver a PCI function gets, from its class code (config offset 0x09, 3 bytes).</summary>
public enum GuestDriverKind : uint
{
    None = 0,
    /// <summary>Class 01h/08h/02h: NVM Express.</summary>
    Nvme = 1,
    /// <summary>Class 12h/00h/00h: vmig accelerator.</summary>
    Accelerator = 2,
}

/// <summary>Where one driver lives in guest RAM (decided at first boot; read back from the boot block on resume).</summary>
public sealed record GuestDriverPlan(string Function, GuestDriverKind Kind, ulong RegionGpa, ulong RegionSize, int IoQueues);

/// <summary>
/// The guest "operating system": at first boot it probes every PCI function by class code, brings up its driver in
/// a region of guest RAM and records (function, kind, state address) in a boot block at GPA 0; after a migration or
/// restore it reads the boot block back and re-attaches every driver to its state in RAM — exactly what a real
/// guest's memory carries across a migration. It registers the drivers as services for guest programs:
/// "NAME" (the driver) and, for NVMe, "NAME.qN" (a block device on I/O queue N, namespace 1).
/// </summary>
public static class GuestOs
{
    /// <summary>Boot block: u64 magic, u32 count, u32 reserved, then entries of 64 bytes.</summary>
    public const ulong BootBlockGpa = 0;
    public const ulong BootBlockSize = 4096;
    /// <summary>First GPA a plan hands out (the low 64 KiB hold the boot block).</summary>
    public const ulong FirstFreeGpa = 64 * 1024;
    /// <summary>Guest RAM per NVMe driver (queues, PRP lists, bounce buffers).</summary>
    public const ulong NvmeRegionSize = 8UL << 20;
    /// <summary>Job ring entries of the accelerator driver.</summary>
    public const uint AcceleratorRingEntries = 256;
    private const ulong Magic = 0x31534F4749_4D56; // "VMIGOS1"
    private const int EntrySize = 64;
    private const int NameMax = 40;
    private const int MaxEntries = (int)((BootBlockSize - 16) / EntrySize);

    /// <summary>Reads the class code of a function and maps it to a driver.</summary>
    public static GuestDriverKind Probe(IGuestPciFunction function)
    {
        ArgumentNullException.ThrowIfNull(function);
        Span<byte> cc = stackalloc byte[4];
        function.ReadConfig(0x08, cc);
        uint classCode = (uint)(cc[1] | (cc[2] << 8) | (cc[3] << 16));
        return classCode switch
        {
            0x010802 => GuestDriverKind.Nvme,
            0x120000 => GuestDriverKind.Accelerator,
            _ => GuestDriverKind.None,
        };
    }

    /// <summary>
    /// Lays out drivers for <paramref name="functions"/> (name → kind, in name order) from <see cref="FirstFreeGpa"/>;
    /// returns the plan and, in <paramref name="nextFree"/>, the first GPA after the drivers (page aligned).
    /// </summary>
    public static IReadOnlyList<GuestDriverPlan> Plan(IEnumerable<(string Name, GuestDriverKind Kind, int IoQueues)> functions, out ulong nextFree)
    {
        ArgumentNullException.ThrowIfNull(functions);
        var plan = new List<GuestDriverPlan>();
        ulong gpa = FirstFreeGpa;
        foreach (var (name, kind, queues) in functions.OrderBy(f => f.Name, StringComparer.Ordinal))
        {
            ulong size = kind switch
            {
                GuestDriverKind.Nvme => NvmeRegionSize,
                GuestDriverKind.Accelerator => AlignUp(AcceleratorDriver.FootprintBytes(AcceleratorRingEntries)),
                _ => 0,
            };
            if (size == 0)
            {
                continue;
            }
            plan.Add(new GuestDriverPlan(name, kind, gpa, size, Math.Max(1, queues)));
            gpa += size;
        }
        nextFree = gpa;
        return plan;
    }

    /// <summary>
    /// First boot with <paramref name="plan"/>, or (<paramref name="resumed"/>) re-attach from the boot block.
    /// Registers the driver services in <paramref name="environment"/>.
    /// </summary>
    /// <exception cref="InvalidDataException">Resumed, but the boot block is missing or names a function the VM lacks.</exception>
    public static void Boot(GuestEnvironment environment, bool resumed, IReadOnlyList<GuestDriverPlan>? plan)
    {
        ArgumentNullException.ThrowIfNull(environment);
        var mem = environment.Memory;
        var entries = resumed ? ReadBootBlock(mem) : plan ?? [];
        if (!resumed && entries.Count > MaxEntries)
        {
            throw new ArgumentException($"at most {MaxEntries} drivers", nameof(plan));
        }
        var written = new List<(GuestDriverPlan Plan, ulong StateGpa)>();
        foreach (var p in entries)
        {
            if (!environment.Functions.TryGetValue(p.Function, out var fn))
            {
                throw new InvalidDataException($"guest boot block names function '{p.Function}', which this VM does not have");
            }
            switch (p.Kind)
            {
                case GuestDriverKind.Nvme:
                    var nvme = resumed
                        ? NvmeDriver.Attach(mem, fn, p.RegionGpa)
                        : NvmeDriver.Initialize(mem, fn, p.RegionGpa, p.RegionSize, new NvmeDriverOptions { IoQueues = p.IoQueues });
                    environment.AddService(p.Function, nvme);
                    for (int q = 1; q <= nvme.IoQueueCount; q++)
                    {
                        environment.AddService($"{p.Function}.q{q}", NvmeBlockDevice.Open(nvme, q, 1));
                    }
                    written.Add((p, nvme.StateGpa));
                    break;
                case GuestDriverKind.Accelerator:
                    var accel = resumed
                        ? AcceleratorDriver.Attach(mem, fn, p.RegionGpa)
                        : AcceleratorDriver.Initialize(mem, fn, p.RegionGpa, AcceleratorRingEntries);
                    environment.AddService(p.Function, accel);
                    written.Add((p, p.RegionGpa));
                    break;
            }
        }
        if (!resumed)
        {
            WriteBootBlock(mem, written.Select(w => w.Plan with { RegionGpa = w.StateGpa }).ToList());
        }
    }

    private static void WriteBootBlock(IGuestMemory mem, IReadOnlyList<GuestDriverPlan> entries)
    {
        var block = new byte[BootBlockSize];
        BinaryPrimitives.WriteUInt32LittleEndian(block.AsSpan(8), (uint)entries.Count);
        for (int i = 0; i < entries.Count; i++)
        {
            var e = block.AsSpan(16 + (i * EntrySize), EntrySize);
            byte[] name = Encoding.UTF8.GetBytes(entries[i].Function);
            if (name.Length > NameMax)
            {
                throw new ArgumentException($"function name '{entries[i].Function}' is longer than {NameMax} bytes");
            }
            name.CopyTo(e);
            BinaryPrimitives.WriteUInt32LittleEndian(e[40..], (uint)entries[i].Kind);
            BinaryPrimitives.WriteUInt32LittleEndian(e[44..], (uint)entries[i].IoQueues);
            BinaryPrimitives.WriteUInt64LittleEndian(e[48..], entries[i].RegionGpa);
            BinaryPrimitives.WriteUInt64LittleEndian(e[56..], entries[i].RegionSize);
        }
        mem.Write(BootBlockGpa, block);
        // The magic goes last: a boot block with a magic is complete.
        mem.WriteUInt64(BootBlockGpa, Magic);
    }

    private static List<GuestDriverPlan> ReadBootBlock(IGuestMemory mem)
    {
        var block = new byte[BootBlockSize];
        mem.Read(BootBlockGpa, block);
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(block.AsSpan(8));
        if (BinaryPrimitives.ReadUInt64LittleEndian(block) != Magic || count > MaxEntries)
        {
            throw new InvalidDataException("no guest boot block in RAM (was this VM booted by vmig's guest OS?)");
        }
        var list = new List<GuestDriverPlan>();
        for (int i = 0; i < count; i++)
        {
            var e = block.AsSpan(16 + (i * EntrySize), EntrySize);
            string name = Encoding.UTF8.GetString(e[..NameMax]).TrimEnd('\0');
            list.Add(new GuestDriverPlan(name, (GuestDriverKind)BinaryPrimitives.ReadUInt32LittleEndian(e[40..]),
                BinaryPrimitives.ReadUInt64LittleEndian(e[48..]), BinaryPrimitives.ReadUInt64LittleEndian(e[56..]),
                (int)BinaryPrimitives.ReadUInt32LittleEndian(e[44..])));
        }
        return list;
    }

    private static ulong AlignUp(ulong v) => (v + 4095) & ~4095UL;
}
