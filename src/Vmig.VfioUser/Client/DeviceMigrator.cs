using System.Diagnostics;
using Vmig.Migration;

namespace Vmig.VfioUser.Client;

/// <summary>Phases of a one-device migration.</summary>
public enum DeviceMigrationPhase
{
    Setup,
    PreCopy,
    StopCopy,
    Resume,
    Done,
    Failed,
}

/// <summary>A progress sample: phase, pre-copy round, bytes moved so far and, when the server offers it, what remains.</summary>
public sealed record DeviceMigrationProgress(DeviceMigrationPhase Phase, int Round, long BytesMoved, PrecopyInfo? Remaining, long StopCopyEstimate);

/// <summary>Tuning of a one-device migration.</summary>
public sealed record DeviceMigrationOptions
{
    /// <summary>Most pre-copy rounds before stop-copy (a round reads until the device says "nothing more for now").</summary>
    public int MaxPreCopyRounds { get; init; } = 8;
    /// <summary>Leave pre-copy once initial_bytes is 0 and dirty_bytes is at most this many bytes.</summary>
    public ulong DirtyBytesThreshold { get; init; } = 1 << 20;
    /// <summary>Chunk size per MIG_DATA_READ/WRITE in bytes (capped by both servers' max_data_xfer_size).</summary>
    public int ChunkSize { get; init; } = 1 << 20;
    /// <summary>Skip pre-copy even when the source offers it.</summary>
    public bool NoPreCopy { get; init; }
}

/// <summary>What happened: bytes per phase, rounds, and the stop-copy window (the device downtime).</summary>
public sealed record DeviceMigrationReport(
    MigrationFlags SourceFlags,
    MigrationFlags TargetFlags,
    int PreCopyRounds,
    long PreCopyBytes,
    long StopCopyBytes,
    TimeSpan Total,
    TimeSpan Downtime);

/// <summary>
/// Moves one device's state from one vfio-user server to another (`vmig device migrate --from --to`), using only
/// the base protocol plus the vmig extensions where the servers offer them:
/// target RUNNING→RESUMING; source RUNNING→PRE_COPY with read rounds while they shrink (when PRE_COPY is offered);
/// source →STOP_COPY and read to the short reply; target RESUMING→RUNNING (the target validates on RESUMING→STOP).
/// On success the source is left in STOP (the device now lives on the target; resuming both would be split brain).
/// On any failure before the target runs, the source goes back to RUNNING and the target is reset.
/// </summary>
public static class DeviceMigrator
{
    /// <exception cref="VfioUserException">A step failed; the source has been returned to RUNNING.</exception>
    public static DeviceMigrationReport Migrate(VfioUserClient source, VfioUserClient target, DeviceMigrationOptions? options = null,
        IProgress<DeviceMigrationProgress>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(target);
        options ??= new DeviceMigrationOptions();
        var total = Stopwatch.StartNew();
        var srcFlags = source.GetMigrationFlags();
        var dstFlags = target.GetMigrationFlags();
        int chunk = Math.Min(options.ChunkSize, Math.Min(source.MaxMigrationChunk, target.MaxMigrationChunk));
        var buf = new byte[chunk];
        long pre = 0, stop = 0;
        int rounds = 0;
        bool targetRunning = false;
        long estimate = source.SupportsStopCopySize ? (long)source.GetStopCopySize() : -1;
        progress?.Report(new(DeviceMigrationPhase.Setup, 0, 0, null, estimate));
        try
        {
            target.SetState(DeviceState.Resuming);
            if ((srcFlags & MigrationFlags.PreCopy) != 0 && !options.NoPreCopy)
            {
                source.SetState(DeviceState.PreCopy);
                ulong lastRound = ulong.MaxValue;
                // One PRECOPY_INFO per round: the answer at the end of a round is also the next round's start.
                PrecopyInfo? info = source.SupportsPrecopyInfo ? source.GetPrecopyInfo() : null;
                while (rounds < options.MaxPreCopyRounds)
                {
                    rounds++;
                    // A round reads at most what the device reported pending at its start (or the stop-copy estimate):
                    // a device that dirties faster than we read would otherwise never give the short read.
                    long cap = info is { } start
                        ? (long)Math.Min(start.InitialBytes + start.DirtyBytes, long.MaxValue / 2) + buf.Length
                        : estimate > 0 ? estimate + buf.Length : long.MaxValue;
                    long moved = Pump(source, target, buf, cap);
                    pre += moved;
                    info = source.SupportsPrecopyInfo ? source.GetPrecopyInfo() : null;
                    progress?.Report(new(DeviceMigrationPhase.PreCopy, rounds, pre, info, estimate));
                    if (info is { } i)
                    {
                        if (i.InitialBytes == 0 && i.DirtyBytes <= options.DirtyBytesThreshold)
                        {
                            break;
                        }
                    }
                    else if ((ulong)moved >= lastRound || moved == 0)
                    {
                        // Without pre-copy info, stop once a round no longer shrinks.
                        break;
                    }
                    lastRound = (ulong)moved;
                }
            }
            var down = Stopwatch.StartNew();
            source.SetState(DeviceState.StopCopy);
            stop = Pump(source, target, buf, long.MaxValue);
            progress?.Report(new(DeviceMigrationPhase.StopCopy, rounds, pre + stop, null, estimate));
            progress?.Report(new(DeviceMigrationPhase.Resume, rounds, pre + stop, null, estimate));
            target.SetState(DeviceState.Running);
            targetRunning = true;
            var downtime = down.Elapsed;
            source.SetState(DeviceState.Stop);
            progress?.Report(new(DeviceMigrationPhase.Done, rounds, pre + stop, null, estimate));
            return new DeviceMigrationReport(srcFlags, dstFlags, rounds, pre, stop, total.Elapsed, downtime);
        }
        catch (VfioUserException) when (!targetRunning)
        {
            progress?.Report(new(DeviceMigrationPhase.Failed, rounds, pre + stop, null, estimate));
            Recover(source, target);
            throw;
        }
    }

    /// <summary>Reads until a short reply (or <paramref name="cap"/> bytes), writing every chunk to the target. Returns the bytes moved.</summary>
    private static long Pump(VfioUserClient source, VfioUserClient target, byte[] buf, long cap)
    {
        long moved = 0;
        while (moved < cap)
        {
            int n = source.ReadMigrationData(buf);
            if (n > 0)
            {
                target.WriteMigrationData(buf.AsSpan(0, n));
                moved += n;
            }
            if (n < buf.Length)
            {
                return moved;
            }
        }
        return moved;
    }

    private static void Recover(VfioUserClient source, VfioUserClient target)
    {
        try
        {
            source.SetState(DeviceState.Running);
        }
        catch (VfioUserException)
        {
            // QEMU's policy (reference §4.5): if the recovery state cannot be reached, reset the device.
            TryReset(source);
        }
        TryReset(target);
    }

    private static void TryReset(VfioUserClient c)
    {
        try
        {
            c.Reset();
        }
        catch (VfioUserException)
        {
        }
    }
}
