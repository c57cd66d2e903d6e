namespace Vmig.Migration;

/// <summary>
/// What a migratable device implements (the analogue of a VFIO variant driver's <c>mig_ops</c>):
/// single direct arcs plus the data stream. The SDK walks multi-step paths with
/// <see cref="MigrationStateMachine"/>, calls <see cref="Step"/> once per arc, and only calls
/// <see cref="ReadData"/> in a saving state (PRE_COPY, PRE_COPY_P2P, STOP_COPY) and
/// <see cref="WriteData"/> in RESUMING.
/// </summary>
/// <remarks>Calls are serialized by the SDK (never two at once for one device).</remarks>
public interface IMigrationDevice
{
    /// <summary>Supported flags; must include <see cref="MigrationFlags.StopCopy"/> and be one of the four defined sets.</summary>
    MigrationFlags MigrationFlags { get; }

    /// <summary>
    /// Performs the direct arc <paramref name="from"/> → <paramref name="to"/> (reference §1.3). An arc that
    /// opens a save or resume session (STOP→STOP_COPY, RUNNING→PRE_COPY, RUNNING_P2P→PRE_COPY_P2P,
    /// STOP→RESUMING) starts it; an arc that leaves the saving group or RESUMING ends it.
    /// </summary>
    /// <exception cref="MigrationException">The arc failed. <see cref="MigrationException.ReachedState"/> says where
    /// the device really is (often <paramref name="from"/>, or <see cref="DeviceState.Error"/>).</exception>
    void Step(DeviceState from, DeviceState to);

    /// <summary>
    /// Copies up to <c>buffer.Length</c> bytes of the save stream. Returns the count; fewer than asked means
    /// "no more": the permanent end in STOP_COPY, "nothing more for now" in PRE_COPY.
    /// </summary>
    /// <exception cref="MigrationException">The stream failed (errno in <see cref="MigrationException.Errno"/>).</exception>
    int ReadData(Span<byte> buffer);

    /// <summary>Consumes resume-stream bytes (any segmentation). Validation may be deferred to RESUMING→STOP.</summary>
    /// <exception cref="MigrationException">The data is invalid (EINVAL) or too large (EFBIG).</exception>
    void WriteData(ReadOnlySpan<byte> data);

    /// <summary>VFIO_MIG_GET_PRECOPY_INFO: bytes of initial and dirty state still to read. Only meaningful in PRE_COPY / PRE_COPY_P2P.</summary>
    PrecopyInfo GetPrecopyInfo();

    /// <summary>VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: estimated bytes STOP_COPY would produce now.</summary>
    ulong GetStopCopySize();

    /// <summary>Device reset (DEVICE_RESET/FLR): the SDK sets the state to RUNNING; the device drops any open session.</summary>
    void OnReset();
}

/// <summary><c>struct vfio_precopy_info</c> payload: initial_bytes, dirty_bytes (u64 each).</summary>
public readonly record struct PrecopyInfo(ulong InitialBytes, ulong DirtyBytes);

/// <summary>A failed migration step or stream operation, with the errno to report and the state reached.</summary>
public sealed class MigrationException : Exception
{
    public MigrationException(int errno, string message, DeviceState? reachedState = null)
        : base(message) { Errno = errno; ReachedState = reachedState; }

    /// <summary>Linux errno (22 EINVAL, 5 EIO, 19 ENODEV…).</summary>
    public int Errno { get; }

    /// <summary>Where the device is after the failure; null means "unchanged (the arc's source state)".</summary>
    public DeviceState? ReachedState { get; }
}
