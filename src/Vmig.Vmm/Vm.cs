using Vmig.Guest;

namespace Vmig.Vmm;

/// <summary>One vCPU of a <see cref="VmConfig"/>: its program kind and boot arguments.</summary>
public sealed record VcpuConfig(string Kind, string Arguments);

/// <summary>How to build a VM (fresh, or as the target of a migration/restore).</summary>
public sealed class VmConfig
{
    /// <summary>VM name (carried in the description).</summary>
    public string Name { get; init; } = "vm";

    /// <summary>Guest RAM bytes (multiple of 4096). Ignored on a target, which takes the source's size.</summary>
    public ulong MemorySize { get; init; }

    /// <summary>vCPUs and their programs. Ignored on a target (programs come from the stream).</summary>
    public IReadOnlyList<VcpuConfig> Vcpus { get; init; } = [];

    /// <summary>Program factories by kind; a target must know every kind the source runs.</summary>
    public GuestProgramRegistry Programs { get; init; } = new();

    /// <summary>
    /// Guest "firmware": runs before programs are created, e.g. to bring up guest drivers and register them as
    /// services. The flag is true when the guest is re-created from migrated/restored RAM (attach to state in
    /// RAM instead of initializing it).
    /// </summary>
    public Action<GuestEnvironment, bool>? SetupGuest { get; init; }
}

/// <summary>Where a VM is in its life.</summary>
public enum VmRunState
{
    /// <summary>Built; vCPUs not started (or an incoming VM still receiving state).</summary>
    Created,
    /// <summary>vCPUs running.</summary>
    Running,
    /// <summary>vCPUs paused at a consistent point.</summary>
    Paused,
    /// <summary>Migrated away: this instance must never run again.</summary>
    MigratedAway,
}

/// <summary>
/// A VM: guest RAM (memfd, DMA-mapped into every device at iova = gpa), its devices with their MSI-X eventfds,
/// and vCPU threads running guest programs. Build with <see cref="Create"/>, run with <see cref="Start"/>,
/// <see cref="Pause"/>/<see cref="Resume"/>; migrate with <c>MigrationSource</c>.
/// </summary>
public sealed class Vm : IDisposable
{
    private readonly VmConfig _config;
    private readonly List<Vcpu> _vcpus = [];
    private readonly Dictionary<string, VmPciFunction> _functions = new(StringComparer.Ordinal);
    private readonly object _lock = new();
    private bool _disposed;

    private Vm(VmConfig config, string name, GuestRam memory, IReadOnlyList<IVmDevice> devices)
    {
        _config = config;
        Name = name;
        Memory = memory;
        Devices = devices;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var d in devices)
        {
            if (!seen.Add(d.Description.Name))
            {
                throw new ArgumentException($"two devices are named '{d.Description.Name}'", nameof(devices));
            }
            d.DmaMap(0, memory.Size, memory.Fd, 0);
            _functions[d.Description.Name] = new VmPciFunction(d);
        }
        Guest = new GuestEnvironment(memory, _functions.ToDictionary(kv => kv.Key, kv => (IGuestPciFunction)kv.Value, StringComparer.Ordinal));
    }

    /// <summary>VM name.</summary>
    public string Name { get; }

    /// <summary>Guest RAM.</summary>
    public GuestRam Memory { get; }

    /// <summary>Devices in index order (owned: disposed with the VM).</summary>
    public IReadOnlyList<IVmDevice> Devices { get; }

    /// <summary>The guest's view (RAM, PCI functions, driver services).</summary>
    public GuestEnvironment Guest { get; }

    /// <summary>vCPUs by index.</summary>
    public IReadOnlyList<Vcpu> Vcpus => _vcpus;

    /// <summary>Current run state.</summary>
    public VmRunState State { get; private set; }

    /// <summary>The description sent in a migration handshake.</summary>
    public VmDescription Description =>
        new(Name, Memory.Size, _vcpus.Select(v => v.Kind).ToArray(), Devices.Select(d => d.Description).ToArray());

    /// <summary>
    /// Boots a fresh VM: creates RAM, maps it into every device, wires MSI-X, runs <see cref="VmConfig.SetupGuest"/>
    /// and starts each vCPU's program (which lays out its state). vCPUs do not run until <see cref="Start"/>.
    /// Takes ownership of <paramref name="devices"/>.
    /// </summary>
    /// <exception cref="ArgumentException">Bad config (RAM size, duplicate device names).</exception>
    /// <exception cref="KeyNotFoundException">A vCPU names an unknown program kind.</exception>
    /// <exception cref="FormatException">A program rejected its arguments.</exception>
    public static Vm Create(VmConfig config, IReadOnlyList<IVmDevice>? devices = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        var ram = GuestRam.Create(config.MemorySize, $"vmig-{config.Name}");
        Vm? vm = null;
        try
        {
            vm = new Vm(config, config.Name, ram, devices ?? []);
            config.SetupGuest?.Invoke(vm.Guest, false);
            for (int i = 0; i < config.Vcpus.Count; i++)
            {
                var vc = config.Vcpus[i];
                var regs = new byte[GuestEnvironment.RegisterSize];
                var program = config.Programs.Get(vc.Kind).Start(vm.Guest, vc.Arguments, regs);
                vm._vcpus.Add(new Vcpu(i, vc.Kind, program, regs));
            }
            return vm;
        }
        catch
        {
            if (vm is not null)
            {
                vm.Dispose();
            }
            else
            {
                ram.Dispose();
            }
            throw;
        }
    }

    /// <summary>
    /// Builds the shell of an incoming VM (target of a migration or a restore): RAM of the described size, the
    /// given devices mapped and wired, no vCPUs yet. <see cref="ResumeGuest"/> creates the programs once RAM
    /// and registers have arrived. Takes ownership of <paramref name="devices"/>.
    /// </summary>
    /// <param name="description">What the source sent.</param>
    /// <param name="config">This host's guest software.</param>
    /// <param name="devices">The opened devices, in the description's order.</param>
    /// <param name="ram">
    /// RAM created beforehand (e.g. prefaulted, <see cref="Migration.MigrationTargetOptions.PreallocatedMemory"/>): it must be
    /// fresh (zero-filled, never written) and of the described size; the VM owns it from then on, even if this throws.
    /// Null: a new zero-filled memfd.
    /// </param>
    /// <exception cref="ArgumentException"><paramref name="ram"/> has another size than the description.</exception>
    public static Vm CreateIncoming(VmDescription description, VmConfig config, IReadOnlyList<IVmDevice> devices, GuestRam? ram = null)
    {
        ArgumentNullException.ThrowIfNull(description);
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(devices);
        if (ram is not null && ram.Size != description.MemorySize)
        {
            ram.Dispose();
            throw new ArgumentException($"preallocated guest RAM has {ram.Size} bytes, the incoming VM {description.MemorySize}", nameof(ram));
        }
        ram ??= GuestRam.Create(description.MemorySize, $"vmig-{description.Name}");
        try
        {
            return new Vm(config, description.Name, ram, devices);
        }
        catch
        {
            ram.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Re-creates the guest of an incoming VM from its RAM and the received register blocks (one per vCPU, in
    /// index order, with their kinds): runs <see cref="VmConfig.SetupGuest"/> in resume mode, then each factory's
    /// Resume. vCPUs stay paused until <see cref="Start"/>.
    /// </summary>
    /// <exception cref="InvalidOperationException">vCPUs already exist.</exception>
    public void ResumeGuest(IReadOnlyList<(string Kind, byte[] Registers)> vcpus)
    {
        ArgumentNullException.ThrowIfNull(vcpus);
        if (_vcpus.Count != 0)
        {
            throw new InvalidOperationException("the guest already has vCPUs");
        }
        _config.SetupGuest?.Invoke(Guest, true);
        for (int i = 0; i < vcpus.Count; i++)
        {
            var (kind, regs) = vcpus[i];
            if (regs.Length != GuestEnvironment.RegisterSize)
            {
                throw new InvalidDataException($"vCPU {i}: register block of {regs.Length} bytes, expected {GuestEnvironment.RegisterSize}");
            }
            var program = _config.Programs.Get(kind).Resume(Guest, regs);
            _vcpus.Add(new Vcpu(i, kind, program, (byte[])regs.Clone()));
        }
    }

    /// <summary>Starts (or restarts) every vCPU.</summary>
    /// <exception cref="InvalidOperationException">The VM migrated away.</exception>
    public void Start()
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (State == VmRunState.MigratedAway)
            {
                throw new InvalidOperationException("this VM migrated away and must not run again");
            }
            foreach (var v in _vcpus)
            {
                v.Resume();
            }
            State = VmRunState.Running;
        }
    }

    /// <summary>Pauses every vCPU at a consistent point; returns when all are parked.</summary>
    public void Pause()
    {
        lock (_lock)
        {
            foreach (var v in _vcpus)
            {
                v.Pause();
            }
            if (State != VmRunState.MigratedAway)
            {
                State = VmRunState.Paused;
            }
        }
    }

    /// <summary>Resumes after <see cref="Pause"/>. Same as <see cref="Start"/>.</summary>
    public void Resume() => Start();

    /// <summary>Marks the VM as migrated away (vCPUs stay paused forever; <see cref="Start"/> refuses).</summary>
    internal void MarkMigratedAway()
    {
        lock (_lock)
        {
            foreach (var v in _vcpus)
            {
                v.Pause();
            }
            State = VmRunState.MigratedAway;
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }
            _disposed = true;
        }
        foreach (var v in _vcpus)
        {
            v.Dispose();
        }
        foreach (var d in Devices)
        {
            d.Dispose();
        }
        foreach (var f in _functions.Values)
        {
            f.Dispose();
        }
        Memory.Dispose();
    }
}
