using System.Text.Json;
using System.Text.Json.Serialization;
using Vmig.Guest.Workloads;

namespace Vmig.Vmm.Migration;

/// <summary>Migration phases, in order.</summary>
public enum MigrationPhase
{
    Handshake,
    PreCopy,
    Switchover,
    StopCopy,
    WaitingForTarget,
    Cleanup,
    Completed,
    RolledBack,
    InDoubt,
}

/// <summary>A progress event.</summary>
/// <param name="Phase">Current phase.</param>
/// <param name="Round">Pre-copy round (1-based; 0 before the first).</param>
/// <param name="BytesSent">Stream bytes sent so far (all connections).</param>
/// <param name="BytesRemaining">Estimated bytes still to send (dirty RAM + device pending).</param>
/// <param name="DirtyRateBytesPerSecond">RAM dirtied per second during the last round.</param>
/// <param name="BandwidthBytesPerSecond">Measured send rate of the last round.</param>
/// <param name="ExpectedDowntime">Remaining ÷ bandwidth.</param>
public sealed record MigrationProgress(
    MigrationPhase Phase, int Round, long BytesSent, long BytesRemaining,
    double DirtyRateBytesPerSecond, double BandwidthBytesPerSecond, TimeSpan ExpectedDowntime);

/// <summary>One pre-copy (or the final) round.</summary>
/// <param name="Round">1-based round number; the final (paused) round is last.</param>
/// <param name="Pages">RAM pages sent.</param>
/// <param name="ZeroPages">Of those, sent as ZERO records.</param>
/// <param name="Bytes">Stream bytes of the round (RAM and device data).</param>
/// <param name="DeviceBytes">Device migration bytes of the round.</param>
/// <param name="Milliseconds">Duration.</param>
/// <param name="BandwidthBytesPerSecond">Bytes ÷ duration.</param>
/// <param name="HolePages">Pages skipped unread because they are holes in the memfd (first pass only).</param>
public sealed record RoundReport(int Round, long Pages, long ZeroPages, long Bytes, long DeviceBytes, double Milliseconds, double BandwidthBytesPerSecond, long HolePages = 0);

/// <summary>The final report of a migration or snapshot (serializable with <see cref="ToJson"/>).</summary>
public sealed class MigrationReport
{
    /// <summary>"completed", "refused" (target said no), "not-started" (no connection/handshake), "rolled-back" (source resumed) or "in-doubt" (source stays paused).</summary>
    public string Outcome { get; set; } = "running";

    /// <summary>Why it did not complete.</summary>
    public string? Error { get; set; }

    public DateTimeOffset StartedAt { get; set; }

    public double TotalMilliseconds { get; set; }

    /// <summary>Source vCPU pause → target's "running" result received by the source (an upper bound of the guest-visible pause).</summary>
    public double DowntimeMilliseconds { get; set; }

    /// <summary>The target's own measure: switchover start received → its vCPUs running.</summary>
    public double TargetDowntimeMilliseconds { get; set; }

    /// <summary>
    /// The target's wait between sending TargetReady and receiving Commit: what the two-phase end adds to the
    /// downtime (≈ one round trip plus the source's reaction).
    /// </summary>
    public double TargetCommitWaitMilliseconds { get; set; }

    /// <summary>Source: TargetReady received → TargetResult received (Commit out, target devices RUNNING and vCPUs started, result back).</summary>
    public double CommitRoundTripMilliseconds { get; set; }

    /// <summary>Duration per phase name.</summary>
    public Dictionary<string, double> PhaseMilliseconds { get; } = [];

    /// <summary>
    /// Where the time went, source side, in milliseconds per step (summed over rounds), measured with Stopwatch
    /// timestamps: "handshake.connect", "handshake.target-setup" (target opens devices, creates RAM, DMA_MAP),
    /// "precopy.start-logging", "precopy.ram" (hole scan included), "precopy.device-data", "precopy.dirty-collect",
    /// "precopy.estimate" (device pre-copy/stop-copy sizes, RoundInfo),
    /// "switchover.wait-target" (acks and the target catching up), "downtime.pause-vcpus", "downtime.device-p2p",
    /// "downtime.device-stop-copy", "downtime.dirty-collect", "downtime.ram", "downtime.vcpus", "downtime.device-data",
    /// "downtime.flush", "downtime.target-ready" (end of state sent → TargetReady received), "downtime.commit-round-trip"
    /// (Commit sent → TargetResult received), "cleanup.stop-logging", "cleanup.devices-stop".
    /// </summary>
    public Dictionary<string, double> StepMilliseconds { get; } = [];

    /// <summary>
    /// The target's own steps (from its optional TargetTimings section; empty from a target that does not send it):
    /// "setup.open-devices" (each device connected, checked and moved to RESUMING), "setup.ram-and-dma-map" (memfd
    /// created, mapped, DMA_MAP to every device, MSI-X wired), "setup.reply", "receive" (state stream until EndOfState),
    /// "backlog" (from SwitchoverStart to EndOfState), "channels" (extra connections finishing), "device-data-drain"
    /// (queued MIG_DATA_WRITEs finishing), "device-load" (RESUMING→STOP, →RUNNING_P2P), "commit-wait" (TargetReady sent →
    /// Commit received), "device-run" (→RUNNING), "guest-resume" (programs re-created), "vcpu-start", "total".
    /// </summary>
    public Dictionary<string, double> TargetStepMilliseconds { get; } = [];

    /// <summary>Stream bytes per section type name (headers included, all connections).</summary>
    public Dictionary<string, long> BytesBySection { get; } = [];

    public long TotalBytes { get; set; }

    public List<RoundReport> Rounds { get; } = [];

    public int Connections { get; set; }

    public bool Tls { get; set; }

    /// <summary>
    /// CPU time (user + system, ms; 10 ms resolution) per source thread role: "main" (handshake, RAM read, zero check,
    /// CRC, RAM sends), "device-send" (device sections to the socket), "device-read" (MIG_DATA_READ). The target's
    /// roles are in <see cref="TargetStepMilliseconds"/> as "cpu.*".
    /// </summary>
    public Dictionary<string, double> CpuMilliseconds { get; } = [];

    /// <summary>
    /// After a completed migration: the first source device that failed to reach STOP in the cleanup (the VM runs on
    /// the target regardless), or null.
    /// </summary>
    public string? CleanupError { get; set; }

    /// <summary>Device data went on a connection of its own, concurrently with RAM (stream 2.2, §4.2).</summary>
    public bool DeviceDataConnection { get; set; }

    /// <summary>Devices that went through pre-copy.</summary>
    public int PrecopyDevices { get; set; }

    /// <summary>Filled by the caller after a verify pass (null if none ran).</summary>
    public VerifierCounts? Verifier { get; set; }

    /// <summary>Indented JSON (System.Text.Json, enums as strings).</summary>
    public string ToJson() => JsonSerializer.Serialize(this, JsonOptions);

    internal static readonly JsonSerializerOptions JsonOptions = new()
    {
        WriteIndented = true,
        Converters = { new JsonStringEnumConverter() },
    };
}

/// <summary>A migration that did not complete. <see cref="Report"/> says how far it got and whether the source resumed.</summary>
public sealed class VmMigrationException : IOException
{
    public VmMigrationException(string message, MigrationReport report, Exception? inner = null)
        : base(message, inner) => Report = report;

    /// <summary>The report (Outcome "refused", "rolled-back" or "in-doubt").</summary>
    public MigrationReport Report { get; }
}
