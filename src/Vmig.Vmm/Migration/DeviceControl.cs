using System.Buffers.Binary;
using System.Text.Json;
using Vmig.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>The VmDescription section's JSON: session id (binds extra connections), connection count, the VM.</summary>
internal sealed record MigrationHello(Guid SessionId, int Connections, VmDescription Vm)
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
    /// to STOP_COPY (devices without P2P go there directly, as the kernel routes them).
    /// </summary>
    public static void QuiesceAndStopCopy(IReadOnlyList<IVmDevice> devices)
    {
        foreach (var d in devices)
        {
            if (HasP2P(d))
            {
                DeviceState cur = d.GetState();
                d.SetState(cur == DeviceState.PreCopy ? DeviceState.PreCopyP2P : DeviceState.RunningP2P);
            }
        }
        foreach (var d in devices)
        {
            d.SetState(DeviceState.StopCopy);
        }
    }

    /// <summary>
    /// Start side on a target or restore, first half: every device RESUMING→STOP (load and validate), then every P2P
    /// device →RUNNING_P2P. A live target stops here until the source's Commit (two-phase end).
    /// </summary>
    public static void LoadAndQuiesce(IReadOnlyList<IVmDevice> devices)
    {
        foreach (var d in devices)
        {
            d.SetState(DeviceState.Stop);
        }
        foreach (var d in devices)
        {
            if (HasP2P(d))
            {
                d.SetState(DeviceState.RunningP2P);
            }
        }
    }

    /// <summary>Second half: every device →RUNNING (after every P2P peer is at least RUNNING_P2P).</summary>
    public static void RunAll(IReadOnlyList<IVmDevice> devices)
    {
        foreach (var d in devices)
        {
            d.SetState(DeviceState.Running);
        }
    }

    /// <summary>Reads a device's save stream until a short read (or <paramref name="cap"/> bytes), one DeviceData section per read.</summary>
    /// <returns>Device bytes sent.</returns>
    public static long SendDeviceData(IVmDevice device, int index, byte phase, SectionWriter writer, byte[] buffer, long cap, Throttle? throttle)
    {
        long total = 0;
        int chunk = buffer.Length - 4;
        while (true)
        {
            int n = device.ReadMigrationData(buffer.AsSpan(4, chunk));
            if (n < 0 || n > chunk)
            {
                throw new IOException($"device {device.Description.Name}: MIG_DATA_READ returned {n} for a {chunk}-byte buffer");
            }
            if (n > 0)
            {
                BinaryPrimitives.WriteUInt16LittleEndian(buffer, (ushort)index);
                buffer[2] = phase;
                buffer[3] = 0;
                writer.Write(SectionType.DeviceData, buffer.AsSpan(0, 4 + n));
                throttle?.Consume(4 + n + SectionHeader.Size);
                total += n;
            }
            if (n < chunk || total >= cap)
            {
                return total;
            }
        }
    }
}
