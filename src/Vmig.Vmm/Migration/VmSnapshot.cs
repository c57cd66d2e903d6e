using System.Diagnostics;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>
/// Checkpoint/restart with the migration stream format: a snapshot is the stream a source would send with a single
/// (final) round and no replies; restoring reads it back like a target.
/// </summary>
public static class VmSnapshot
{
    /// <summary>
    /// Writes <paramref name="vm"/>'s state to <paramref name="destination"/>: pauses the vCPUs, moves the devices
    /// to STOP_COPY in the P2P-safe order, writes RAM, vCPU and device state, then returns the devices to RUNNING
    /// and resumes the vCPUs if they were running.
    /// </summary>
    /// <returns>A report (Outcome "completed"; DowntimeMilliseconds = how long the VM was paused).</returns>
    /// <exception cref="IOException">Writing or a device step failed; the VM is running again (devices recovered to RUNNING).</exception>
    public static MigrationReport Save(Vm vm, System.IO.Stream destination)
    {
        ArgumentNullException.ThrowIfNull(vm);
        ArgumentNullException.ThrowIfNull(destination);
        var report = new MigrationReport { StartedAt = DateTimeOffset.UtcNow, Connections = 1 };
        var total = Stopwatch.StartNew();
        bool wasRunning = vm.State == VmRunState.Running;
        var writer = new SectionWriter(destination);
        vm.Pause();
        try
        {
            DeviceControl.QuiesceAndStopCopy(vm.Devices);
            writer.WriteStreamHeader();
            writer.Write(SectionType.VmDescription, new MigrationHello(Guid.NewGuid(), 1, vm.Description).ToUtf8());
            var sender = new StateSender(vm, [writer], null, 1 << 20);
            var all = new PageBitmap(vm.Memory.PageCount);
            all.SetAll();
            var sw = Stopwatch.StartNew();
            var (pages, zeros, _) = sender.SendRam(all, 1, firstPass: true);
            sender.SendVcpus();
            long dev = sender.SendDeviceStopCopy();
            sender.SendEnd();
            report.Rounds.Add(new RoundReport(1, pages, zeros, writer.BytesWritten, dev, sw.Elapsed.TotalMilliseconds, writer.BytesWritten / Math.Max(sw.Elapsed.TotalSeconds, 1e-6)));
            report.Outcome = "completed";
        }
        finally
        {
            string? problem = null;
            foreach (var d in vm.Devices)
            {
                problem ??= DeviceControl.RecoverToRunning(d);
            }
            if (wasRunning)
            {
                vm.Resume();
            }
            report.DowntimeMilliseconds = total.Elapsed.TotalMilliseconds;
            report.TotalMilliseconds = total.Elapsed.TotalMilliseconds;
            report.TotalBytes = writer.BytesWritten;
            foreach (var (t, n) in writer.BytesByType)
            {
                report.BytesBySection[t.ToString()] = n;
            }
            report.Error = problem;
        }
        return report;
    }

    /// <summary>
    /// Restores a VM from a snapshot: checks the description against this host (program kinds, devices via
    /// <paramref name="deviceFactory"/>), loads the state, commits the devices and re-creates the guest.
    /// </summary>
    /// <param name="source">The snapshot stream (e.g. a file).</param>
    /// <param name="guest">Guest software (program registry, guest setup).</param>
    /// <param name="deviceFactory">Opens this host's device for each described one.</param>
    /// <param name="maxMemorySize">Largest guest RAM accepted (bounds allocation).</param>
    /// <param name="start">Start the vCPUs (default) or leave the VM paused.</param>
    /// <exception cref="StreamFormatException">The file is malformed or truncated.</exception>
    /// <exception cref="VmMigrationException">This host cannot take the VM (reason in the report).</exception>
    public static Vm Restore(System.IO.Stream source, VmConfig guest, Func<DeviceDescription, IVmDevice> deviceFactory, ulong maxMemorySize = 64UL << 30, bool start = true)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(guest);
        ArgumentNullException.ThrowIfNull(deviceFactory);
        var reader = new SectionReader(source, Math.Max(RamPages.MaxPayload, 4 << 20));
        reader.ReadStreamHeader();
        reader.Expect(SectionType.VmDescription);
        var hello = MigrationHello.Parse(reader.Payload);
        if (hello.Connections != 1)
        {
            throw new StreamFormatException($"a snapshot has one connection, this stream says {hello.Connections}");
        }
        var devices = StateLoader.OpenDevices(hello.Vm, guest, deviceFactory, maxMemorySize, out string reason)
            ?? throw new VmMigrationException($"cannot restore here: {reason}", new MigrationReport { Outcome = "refused", Error = reason });
        Vm vm;
        try
        {
            vm = Vm.CreateIncoming(hello.Vm, guest, devices);
        }
        catch
        {
            StateLoader.Release(devices);
            throw;
        }
        var loader = new StateLoader(vm, hello.Vm);
        try
        {
            while (true)
            {
                if (!reader.ReadNext())
                {
                    throw new StreamFormatException("snapshot ends before its end-of-state section");
                }
                if (reader.Type is SectionType.ChannelEnd)
                {
                    continue;
                }
                if (loader.Handle(reader, null))
                {
                    break;
                }
            }
            loader.Commit();
            if (start)
            {
                vm.Start();
            }
            return vm;
        }
        catch
        {
            loader.Dispose();
            vm.Dispose();
            throw;
        }
    }
}
