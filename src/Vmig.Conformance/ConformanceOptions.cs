using Vmig.VfioUser.Client;

namespace Vmig.Conformance;

/// <summary>
/// A device-specific way to make the device under test DMA-write guest memory, so dirty-logging bitmaps can be
/// checked bit by bit. The suite cannot know how to make an arbitrary device write; without a stimulus those checks
/// are skipped.
/// </summary>
public interface IDmaWriteStimulus
{
    /// <summary>Makes the device write <paramref name="length"/> bytes (1..4096) at guest IOVA <paramref name="iova"/>
    /// through its DMA window, and returns once the write has happened.</summary>
    void MakeDeviceWrite(VfioUserClient client, ulong iova, int length);
}

/// <summary>Settings of <see cref="ConformanceSuite.Run"/>.</summary>
public sealed record ConformanceOptions
{
    /// <summary>Per-request timeout in milliseconds; a server that answers nothing within it fails the check.</summary>
    public int TimeoutMs { get; init; } = 5000;

    /// <summary>Ask for the vmig extensions (MIG_DATA_SIZE, pre-copy info, P2P states) in VERSION. A server that does
    /// not offer them is checked on the base protocol; P2P states are then invisible (vfio-user.rst: "not used").</summary>
    public bool RequestExtensions { get; init; } = true;

    /// <summary>A save stream longer than this (bytes) counts as "never ends".</summary>
    public long MaxStreamBytes { get; init; } = 256L << 20;

    /// <summary>Checks that DEVICE_RESET returns the migration state to RUNNING (kernel UAPI and vmig, ARCHITECTURE §6).
    /// libvfio-user deliberately keeps the state (PR #854); set false to skip those expectations.</summary>
    public bool ExpectResetToRunning { get; init; } = true;

    /// <summary>Makes the device DMA-write, for the dirty-bitmap bit checks; null skips them.</summary>
    public IDmaWriteStimulus? DmaWriteStimulus { get; init; }

    /// <summary>Called after each check (progress output).</summary>
    public Action<CheckResult>? Progress { get; init; }
}
