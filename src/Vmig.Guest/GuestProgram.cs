namespace Vmig.Guest;

/// <summary>
/// A program a vCPU runs (drivers + workload). The contract that makes it migratable:
/// <list type="bullet">
/// <item>All durable state lives in guest RAM (through <see cref="GuestEnvironment.Memory"/>) or in the vCPU's
/// register block passed to <see cref="RunSlice"/>. Fields of the object are caches only.</item>
/// <item><see cref="RunSlice"/> returns at a consistent point within a few milliseconds (it must not block
/// longer, e.g. wait for interrupts with a short timeout). Between slices the vCPU may be paused, its RAM and
/// registers copied, and the program re-created elsewhere with <see cref="IGuestProgramFactory.Resume"/>.</item>
/// <item>Device commands in flight at a pause stay in flight: the re-created program finds them in its RAM
/// state and reaps their completions from the (migrated) device.</item>
/// </list>
/// </summary>
public interface IGuestProgram
{
    /// <summary>
    /// Runs until the next consistent point. <paramref name="registers"/> is the vCPU's register block
    /// (<see cref="GuestEnvironment.RegisterSize"/> bytes), read and written in place.
    /// </summary>
    /// <returns>False when the program has finished (the vCPU then idles).</returns>
    bool RunSlice(Span<byte> registers);
}

/// <summary>Creates a kind of guest program, fresh or from migrated state.</summary>
public interface IGuestProgramFactory
{
    /// <summary>Stable name carried in the VM description (e.g. "memory-dirtier", "fio").</summary>
    string Kind { get; }

    /// <summary>Boots the program: lays out its state in RAM and fills <paramref name="registers"/> (zeroed on entry).</summary>
    /// <param name="environment">Guest RAM and devices.</param>
    /// <param name="arguments">Kind-specific text (e.g. an fio job file); validated here.</param>
    /// <param name="registers">The vCPU register block.</param>
    /// <exception cref="FormatException">The arguments are invalid.</exception>
    IGuestProgram Start(GuestEnvironment environment, string arguments, Span<byte> registers);

    /// <summary>Re-creates the program from RAM and <paramref name="registers"/> (after restore or migration).</summary>
    /// <exception cref="InvalidDataException">The state in RAM or registers is not this program's.</exception>
    IGuestProgram Resume(GuestEnvironment environment, ReadOnlySpan<byte> registers);
}

/// <summary>What a guest program sees: RAM, PCI functions, and named services (guest drivers).</summary>
public sealed class GuestEnvironment
{
    /// <summary>Bytes in each vCPU's register block.</summary>
    public const int RegisterSize = 256;

    private readonly Dictionary<string, object> _services = new(StringComparer.Ordinal);

    public GuestEnvironment(IGuestMemory memory, IReadOnlyDictionary<string, IGuestPciFunction> functions)
    {
        Memory = memory ?? throw new ArgumentNullException(nameof(memory));
        Functions = functions ?? throw new ArgumentNullException(nameof(functions));
    }

    /// <summary>Guest RAM.</summary>
    public IGuestMemory Memory { get; }

    /// <summary>PCI functions by device name (as in the VM description).</summary>
    public IReadOnlyDictionary<string, IGuestPciFunction> Functions { get; }

    /// <summary>Registers a service (a guest driver such as a block device) under <paramref name="name"/>.</summary>
    public void AddService(string name, object service)
    {
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(service);
        lock (_services)
        {
            _services[name] = service;
        }
    }

    /// <summary>The service named <paramref name="name"/> of type <typeparamref name="T"/>.</summary>
    /// <exception cref="KeyNotFoundException">No such service (or of another type).</exception>
    public T GetService<T>(string name)
        where T : class
    {
        lock (_services)
        {
            if (_services.TryGetValue(name, out object? o) && o is T t)
            {
                return t;
            }
        }
        throw new KeyNotFoundException($"no guest service '{name}' of type {typeof(T).Name}");
    }
}

/// <summary>Program factories by <see cref="IGuestProgramFactory.Kind"/>.</summary>
public sealed class GuestProgramRegistry
{
    private readonly Dictionary<string, IGuestProgramFactory> _factories = new(StringComparer.Ordinal);

    /// <summary>Adds a factory (replacing one of the same kind). Returns this registry.</summary>
    public GuestProgramRegistry Add(IGuestProgramFactory factory)
    {
        ArgumentNullException.ThrowIfNull(factory);
        _factories[factory.Kind] = factory;
        return this;
    }

    /// <summary>True if <paramref name="kind"/> is known.</summary>
    public bool Contains(string kind) => _factories.ContainsKey(kind);

    /// <summary>The factory for <paramref name="kind"/>.</summary>
    /// <exception cref="KeyNotFoundException">Unknown kind.</exception>
    public IGuestProgramFactory Get(string kind) =>
        _factories.TryGetValue(kind, out var f) ? f : throw new KeyNotFoundException($"unknown guest program kind '{kind}'");
}
