using System.Buffers.Binary;
using System.Diagnostics;
using System.Text.Json;
using Vmig.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>The VmDescription section's JSON: session id (binds extra connections), connection count, the VM.</summary>
/// <param name="SessionId">Ties the extra connections (ChannelHello) to this migration.</param>
/// <param name="Connections">RAM connections, the main one included (1-16).</param>
/// <param name="Vm">The VM: RAM size, vCPU programs, devices.</param>
/// <param name="DeviceChannel">
/// (2.2) The source asks for a device-data connection next to the RAM ones (docs/stream-format.md §4.2). A 2.0/2.1
/// target ignores the unknown JSON member; the source uses the connection only if the target's header says 2.2+.
/// </param>
internal sealed record MigrationHello(Guid SessionId, int Connections, VmDescription Vm, bool DeviceChannel = false)
{
    public const int MaxVcpus = 1024;
    public const int MaxDevices = 256;

    public byte[] ToUtf8() => JsonSerializer.SerializeToUtf8Bytes(this, MigrationReport.JsonOptions);

    /// <summary>Parses and bounds-checks; throws <see cref="StreamFormatException"/> on anything wrong.</summary>
    public static MigrationHello Parse(ReadOnlySpan<byte> utf8)
    {
        MigrationHello? h;
        try
        {
            h = JsonSerializer.Deserialize<MigrationHello>(utf8, MigrationReport.JsonOptions);
        }
        catch (JsonException e)
        {
            throw new StreamFormatException($"VM description is not valid JSON: {e.Message}");
        }
        if (h?.Vm?.Vcpus is null || h.Vm.Devices is null || h.Vm.Name is null)
        {
            throw new StreamFormatException("VM description lacks name, vCPUs or devices");
        }
        if (h.Connections is < 1 or > 16 || h.Vm.Vcpus.Count > MaxVcpus || h.Vm.Devices.Count > MaxDevices
            || h.Vm.MemorySize == 0 || h.Vm.MemorySize % GuestRam.PageSize != 0
            || h.Vm.Devices.Any(d => d is null || d.Name is null || d.Kind is null || d.Profile is null) || h.Vm.Vcpus.Any(k => k is null))
        {
            throw new StreamFormatException("VM description is out of bounds (connections 1-16, ≤ 1024 vCPUs, ≤ 256 devices, page-aligned RAM)");
        }
        return h;
    }
}

/// <summary>Device state walks with the recovery rules of QEMU's vfio_migration_set_state (reference §4.5).</summary>
internal static class DeviceControl
{
    /// <summary>Puts a source device back to RUNNING; if that fails, resets it (reset = RUNNING by definition).</summary>
    /// <returns>Null on success, else what went wrong (the device may be unusable).</returns>
    public static string? RecoverToRunning(IVmDevice device)
    {
        try
        {
            if (device.GetState() != DeviceState.Running)
            {
                device.SetState(DeviceState.Running);
            }
            return null;
        }
        catch (Exception e) when (e is IOException or MigrationException or InvalidOperationException)
        {
            try
            {
                device.Reset();
                return null;
            }
            catch (Exception e2) when (e2 is IOException or MigrationException or InvalidOperationException)
            {
                return $"device {device.Description.Name}: back to RUNNING failed ({e.Message}) and reset failed ({e2.Message})";
            }
        }
    }

    /// <summary>Stops device dirty logging, ignoring failures (used on teardown paths).</summary>
    public static void StopLoggingQuietly(IVmDevice device)
    {
        try
        {
            device.StopDirtyLogging();
        }
        catch (Exception e) when (e is IOException or MigrationException or InvalidOperationException)
        {
            // Teardown: the log dies with the session anyway.
        }
    }

    public static bool HasP2P(IVmDevice d) => (d.Description.MigrationFlags & MigrationFlags.P2P) != 0;

    public static bool HasPreCopy(IVmDevice d) => (d.Description.MigrationFlags & MigrationFlags.PreCopy) != 0;

    /// <summary>
    /// Stop side of the switchover, P2P-safe: every P2P device to RUNNING_P2P/PRE_COPY_P2P first, then every device
    /// to STOP_COPY (devices without P2P go there directly, as the kernel routes them). Within a stage the devices move
    /// in parallel (each has its own connection); the stages stay ordered, which is all the P2P rule asks (reference
    /// §2.3: no device leaves a P2P state for STOP before all are quiesced). <paramref name="step"/> receives
    /// "downtime.device-p2p" and "downtime.device-stop-copy" with the stage's start timestamp.
    /// </summary>
    public static void QuiesceAndStopCopy(IReadOnlyList<IVmDevice> devices, Action<string, long>? step = null)
    {
        long t = Stopwatch.GetTimestamp();
        if (devices.Count == 1)
        {
            // One device: the P2P rule has nothing to order, and the device's own FSM walks RUNNING(_P2P)/PRE_COPY(_P2P)
            // → STOP_COPY in one request (one round trip less in the downtime).
            devices[0].SetState(DeviceState.StopCopy);
            step?.Invoke("downtime.device-stop-copy", t);
            return;
        }
        ForEachDevice(devices, d =>
        {
            if (HasP2P(d))
            {
                DeviceState cur = d.GetState();
                d.SetState(cur == DeviceState.PreCopy ? DeviceState.PreCopyP2P : DeviceState.RunningP2P);
            }
        });
        step?.Invoke("downtime.device-p2p", t);
        t = Stopwatch.GetTimestamp();
        ForEachDevice(devices, d => d.SetState(DeviceState.StopCopy));
        step?.Invoke("downtime.device-stop-copy", t);
    }

    /// <summary>
    /// Start side on a target or restore, first half: every device RESUMING→STOP (load and validate), then every P2P
    /// device →RUNNING_P2P; each stage in parallel over the devices, the stages in order. A live target stops here
    /// until the source's Commit (two-phase end). One device: a single request to its final state of this half (its
    /// FSM passes STOP, where it validates the state and fails the request if it must).
    /// </summary>
    public static void LoadAndQuiesce(IReadOnlyList<IVmDevice> devices)
    {
        if (devices.Count == 1)
        {
            devices[0].SetState(HasP2P(devices[0]) ? DeviceState.RunningP2P : DeviceState.Stop);
            return;
        }
        ForEachDevice(devices, d => d.SetState(DeviceState.Stop));
        ForEachDevice(devices, d =>
        {
            if (HasP2P(d))
            {
                d.SetState(DeviceState.RunningP2P);
            }
        });
    }

    /// <summary>Second half: every device →RUNNING (after every P2P peer is at least RUNNING_P2P), in parallel.</summary>
    public static void RunAll(IReadOnlyList<IVmDevice> devices) => ForEachDevice(devices, d => d.SetState(DeviceState.Running));

    /// <summary>
    /// Runs <paramref name="action"/> for every device, concurrently when there are several (the calling thread takes
    /// part, so a busy thread pool degrades to sequential, never to waiting). Every device's action runs to its end;
    /// then the first failure (in device order) is rethrown as it was thrown.
    /// </summary>
    public static void ForEachDevice(IReadOnlyList<IVmDevice> devices, Action<IVmDevice> action)
    {
        if (devices.Count <= 1)
        {
            foreach (var d in devices)
            {
                action(d);
            }
            return;
        }
        var errors = new Exception?[devices.Count];
        Parallel.For(0, devices.Count, i =>
        {
            try
            {
                action(devices[i]);
            }
            catch (Exception e)
            {
                errors[i] = e;
            }
        });
        var first = errors.FirstOrDefault(e => e is not null);
        if (first is not null)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(first).Throw();
        }
    }

    /// <summary>Bytes before the device data in a DeviceData frame: section header room, then u16 index, u8 phase, u8 0.</summary>
    public const int DeviceFrameOverhead = SectionHeader.Size + 4;

    /// <summary>Writes the DeviceData payload header (u16 index, u8 phase, u8 0) into a frame built for <see cref="Stream.SectionWriter.WriteFramed"/>.</summary>
    public static void WriteDeviceDataHeader(byte[] frame, int index, byte phase)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(SectionHeader.Size), checked((ushort)index));
        frame[SectionHeader.Size + 2] = phase;
        frame[SectionHeader.Size + 3] = 0;
    }
}
