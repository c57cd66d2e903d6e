namespace Vmig.Vmm.Migration;

/// <summary>TLS for the migration connections (SslStream; TLS 1.2/1.3 as the OS offers).</summary>
public sealed class MigrationTlsOptions
{
    /// <summary>PEM certificate of this side (target: required server certificate; source: optional client certificate).</summary>
    public string? CertificatePath { get; init; }

    /// <summary>PEM private key for <see cref="CertificatePath"/> (omit if the certificate file holds it).</summary>
    public string? KeyPath { get; init; }

    /// <summary>
    /// PEM certificate the peer's certificate must equal or chain to (source: the target's certificate or its CA).
    /// Null: the OS trust store decides.
    /// </summary>
    public string? TrustedCertificatePath { get; init; }

    /// <summary>Host name the source expects in the target's certificate (default "localhost").</summary>
    public string TargetHost { get; init; } = "localhost";
}

/// <summary>Source-side migration parameters.</summary>
public sealed class MigrationOptions
{
    /// <summary>Switch over once the remaining work fits in this time at the measured bandwidth. Default 300 ms.</summary>
    public TimeSpan DowntimeLimit { get; init; } = TimeSpan.FromMilliseconds(300);

    /// <summary>Bandwidth cap for RAM and device data in bytes/s; 0 = unlimited.</summary>
    public long MaxBandwidth { get; init; }

    /// <summary>Pre-copy rounds before switchover regardless of convergence. Default 30.</summary>
    public int MaxRounds { get; init; } = 30;

    /// <summary>TCP connections for RAM (the first one also carries control and device data). 1-16, default 1.</summary>
    public int ParallelConnections { get; init; } = 1;

    /// <summary>TLS, or null for plain TCP.</summary>
    public MigrationTlsOptions? Tls { get; init; }

    /// <summary>
    /// Device data (pre-copy and stop-copy) on a connection of its own, sent concurrently with RAM, when the VM has
    /// devices and the target speaks stream 2.2 (docs/stream-format.md §4.2); otherwise it follows RAM on the main
    /// connection. Default true.
    /// </summary>
    public bool DeviceDataConnection { get; init; } = true;

    /// <summary>How long to wait for any reply of the target (handshake, switchover-acks, final result). Default 60 s.</summary>
    public TimeSpan ReplyTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>Cap on device pre-copy bytes read per device per round (a device may produce data forever). Default 256 MiB.</summary>
    public long MaxDevicePrecopyBytesPerRound { get; init; } = 256L << 20;

    /// <summary>Buffer for one MIG_DATA_READ, 4 KiB to 4 MiB − 4. Default 1 MiB (as QEMU).</summary>
    public int DeviceReadChunk { get; init; } = 1 << 20;
}

/// <summary>Target-side parameters.</summary>
public sealed class MigrationTargetOptions
{
    /// <summary>TLS (server certificate required) or null.</summary>
    public MigrationTlsOptions? Tls { get; init; }

    /// <summary>Largest guest RAM accepted from a source (bounds allocation before any state moves). Default 64 GiB.</summary>
    public ulong MaxMemorySize { get; init; } = 64UL << 30;

    /// <summary>Start the vCPUs after loading (false leaves the VM paused; tests compare RAM then). Default true.</summary>
    public bool StartVcpus { get; init; } = true;

    /// <summary>How long to wait for the source between sections and for extra channels. Default 60 s.</summary>
    public TimeSpan ReceiveTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// Guest RAM allocated before the migration arrives, as QEMU's <c>-m SIZE -mem-prealloc -incoming</c> does at target
    /// start: create it with <c>GuestRam.Create(size, name, prefault: true)</c> (fresh, zero-filled). Incoming pages are
    /// then copied through the already-mapped RAM (no page allocation inside the migration; docs/stream-format.md §4.3).
    /// The allocation's own time is the caller's to report. Consumed by the one migration it is given to: the incoming VM
    /// owns it, and it is disposed if the migration is refused or fails. A source whose RAM size differs is refused at
    /// the handshake (nothing else touched). Null (default): a fresh memfd of the source's size, filled with pwrite(2).
    /// </summary>
    public GuestRam? PreallocatedMemory { get; init; }
}
