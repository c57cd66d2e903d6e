using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Runtime.ExceptionServices;
using Vmig.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>
/// Live-migrates a running <see cref="Vm"/> to a target VMM (ARCHITECTURE §4): handshake, RAM and device
/// pre-copy rounds with dirty logging, convergence against the downtime limit, switchover-ack, P2P-safe
/// switchover, final state, and the target's result. Any failure before the target runs returns every device
/// to RUNNING and resumes the vCPUs.
/// </summary>
public static class MigrationSource
{
    /// <summary>Migrates <paramref name="vm"/> to the target listening at <paramref name="target"/>.</summary>
    /// <returns>The report (Outcome "completed"); the source VM is then <see cref="VmRunState.MigratedAway"/>.</returns>
    /// <exception cref="VmMigrationException">
    /// Refused at handshake (nothing touched), rolled back (source running again; the report says why), or in
    /// doubt (Commit was sent but no result came back: the source stays paused, because the target may be
    /// running; resume it only if you know the target is not — <see cref="MigrationRecovery"/>).
    /// </exception>
    public static Task<MigrationReport> RunAsync(Vm vm, EndPoint target, MigrationOptions? options = null,
        IProgress<MigrationProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(vm);
        ArgumentNullException.ThrowIfNull(target);
        var o = options ?? new MigrationOptions();
        ArgumentOutOfRangeException.ThrowIfLessThan(o.ParallelConnections, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(o.ParallelConnections, 16);
        ArgumentOutOfRangeException.ThrowIfLessThan(o.MaxRounds, 1);
        // A DeviceData section (4-byte header + one read) must fit the target reader's 4 MiB payload limit.
        ArgumentOutOfRangeException.ThrowIfLessThan(o.DeviceReadChunk, 4096);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(o.DeviceReadChunk, (4 << 20) - 4);
        return Task.Factory.StartNew(
            () => new SourceSession(vm, o, progress, cancellationToken).Run(target),
            CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }
}

/// <summary>Operator recovery after an in-doubt migration.</summary>
public static class MigrationRecovery
{
    /// <summary>
    /// Resumes a source left paused by an "in-doubt" migration: every device back to RUNNING (reset if that fails),
    /// dirty logging off, vCPUs running. Call it only when you know the target is not running the VM (e.g. its
    /// process is gone); otherwise two copies of the VM run.
    /// </summary>
    /// <returns>Null, or what could not be recovered (a device that neither returned to RUNNING nor reset).</returns>
    /// <exception cref="InvalidOperationException">The VM completed a migration (it must never run again).</exception>
    public static string? ResumeInDoubtSource(Vm vm)
    {
        ArgumentNullException.ThrowIfNull(vm);
        if (vm.State == VmRunState.MigratedAway)
        {
            throw new InvalidOperationException("this VM completed its migration; it must not run again");
        }
        string? problem = null;
        foreach (var d in vm.Devices)
        {
            if (d.SupportsDirtyLogging)
            {
                DeviceControl.StopLoggingQuietly(d);
            }
            problem ??= DeviceControl.RecoverToRunning(d);
        }
        vm.Resume();
        return problem;
    }

    /// <summary>
    /// Gives up a source left paused by an "in-doubt" migration because the target runs the VM: marks it
    /// <see cref="VmRunState.MigratedAway"/> (it never runs again) and stops its devices (STOP_COPY → STOP, as after a
    /// completed migration). Call it only when you know the target is running the VM.
    /// </summary>
    /// <returns>Null, or the devices that did not reach STOP (they are released by the caller anyway).</returns>
    public static string? DiscardInDoubtSource(Vm vm)
    {
        ArgumentNullException.ThrowIfNull(vm);
        vm.MarkMigratedAway();
        string? problem = null;
        foreach (var d in vm.Devices)
        {
            try
            {
                d.SetState(DeviceState.Stop);
            }
            catch (Exception e) when (e is IOException or MigrationException or InvalidOperationException)
            {
                problem ??= $"device {d.Description.Name}: STOP failed ({e.Message})";
            }
        }
        return problem;
    }
}

/// <summary>Sends a VM's state to a set of section writers; shared by live migration and snapshots.</summary>
internal sealed class StateSender
{
    private readonly Vm _vm;
    private readonly IReadOnlyList<SectionWriter> _channels;
    private readonly Throttle? _throttle;
    private readonly long[] _channelPages;
    private readonly DeviceDataPump _devicePump;
    private readonly byte[]?[] _frames;
    private readonly SectionWriter? _deviceChannel;

    /// <param name="vm">The VM whose state is sent.</param>
    /// <param name="channels">RAM connections' writers; the first is the main connection.</param>
    /// <param name="throttle">Bandwidth cap shared by every connection, or null.</param>
    /// <param name="deviceChunk">Bytes per MIG_DATA_READ.</param>
    /// <param name="deviceChannel">The device-data connection (stream 2.2, §4.2), or null: device sections go on the main one.</param>
    public StateSender(Vm vm, IReadOnlyList<SectionWriter> channels, Throttle? throttle, int deviceChunk, SectionWriter? deviceChannel = null)
    {
        _vm = vm;
        _channels = channels;
        _deviceChannel = deviceChannel;
        _throttle = throttle;
        _channelPages = new long[channels.Count];
        _devicePump = new DeviceDataPump(deviceChunk);
        _frames = new byte[channels.Count][];
    }

    public SectionWriter Main => _channels[0];

    /// <summary>Told the CPU ms of each device-read helper thread when it ends (report figures).</summary>
    public Action<double>? OnDeviceReadCpu
    {
        get => _devicePump.OnReaderCpu;
        init => _devicePump.OnReaderCpu = value;
    }

    /// <summary>Where device sections (DeviceData, DeviceInitialDataSent, DeviceEnd) go: the device connection or the main one.</summary>
    public SectionWriter DeviceWriter => _deviceChannel ?? Main;

    /// <summary>True when device data has its own connection (and may be sent concurrently with RAM).</summary>
    public bool HasDeviceChannel => _deviceChannel is not null;

    public long PagesOnChannel(int i) => _channelPages[i];

    /// <summary>Bytes written on every connection. Not exact while a device thread writes (a racy read of its counter).</summary>
    public long BytesWritten => _channels.Sum(c => c.BytesWritten) + (_deviceChannel?.BytesWritten ?? 0);

    /// <summary>
    /// Sends the pages set in <paramref name="dirty"/>, spread over the channels. <paramref name="firstPass"/> means the
    /// receiver's RAM is still all zero (round 1, snapshots): memfd holes are dropped from <paramref name="dirty"/>
    /// without reading them and zero pages are omitted instead of sent as ZERO records. Returns (pages read, of those
    /// zero, holes skipped unread). Pages are read through the VMM's mapping (<see cref="RamSectionBuilder"/>): outside the
    /// first pass <paramref name="dirty"/> must hold only pages that were written (a hole would be allocated by the read).
    /// </summary>
    public (long Pages, long ZeroPages, long HolePages) SendRam(PageBitmap dirty, uint round, bool firstPass = false)
    {
        long holes = 0;
        if (firstPass)
        {
            long before = dirty.Count();
            holes = before - _vm.Memory.KeepAllocatedPages(dirty);
        }
        var runs = dirty.Runs(RamPages.MaxPagesPerSection).ToList();
        long pages = 0, zeros = 0;
        if (_channels.Count == 1 || runs.Count < 2)
        {
            (pages, zeros) = SendRuns(0, runs, 0, 1, round, firstPass);
        }
        else
        {
            var tasks = new Task<(long, long)>[_channels.Count];
            for (int k = 0; k < tasks.Length; k++)
            {
                int ch = k;
                tasks[k] = Task.Factory.StartNew(() => SendRuns(ch, runs, ch, tasks.Length, round, firstPass), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
            }
            try
            {
                Task.WaitAll(tasks);
            }
            catch (AggregateException e)
            {
                throw e.InnerExceptions[0] is IOException io ? new IOException(io.Message, io) : new IOException("a RAM channel failed", e.InnerExceptions[0]);
            }
            foreach (var t in tasks)
            {
                pages += t.Result.Item1;
                zeros += t.Result.Item2;
            }
        }
        return (pages, zeros, holes);
    }

    /// <summary>Sends every vCPU's register block (vCPUs must be paused).</summary>
    public void SendVcpus()
    {
        foreach (var v in _vm.Vcpus)
        {
            byte[] regs = v.Registers;
            var payload = new byte[4 + regs.Length];
            BinaryPrimitives.WriteUInt32LittleEndian(payload, (uint)v.Index);
            regs.CopyTo(payload, 4);
            Main.Write(SectionType.VcpuState, payload);
        }
    }

    /// <summary>Device pre-copy data of device <paramref name="index"/> on <see cref="DeviceWriter"/>.</summary>
    public long SendDevicePrecopy(int index, long cap) =>
        _devicePump.Send(_vm.Devices[index], index, 0, DeviceWriter, cap, _throttle);

    /// <summary>Device stop-copy data until the end of its stream, then DeviceEnd, for every device.</summary>
    public long SendDeviceStopCopy()
    {
        long total = 0;
        for (int i = 0; i < _vm.Devices.Count; i++)
        {
            total += _devicePump.Send(_vm.Devices[i], i, 1, DeviceWriter, long.MaxValue, _throttle);
            DeviceWriter.Write(SectionType.DeviceEnd, SectionIo.DeviceIndexPayload(i));
        }
        DeviceWriter.Flush();
        return total;
    }

    /// <summary>
    /// On the device connection only: marks the end of round <paramref name="round"/>'s device sections (a RoundInfo
    /// carrying just the round, §4.2) and flushes; the target answers the main connection's RoundInfo only after it.
    /// </summary>
    public void SendDeviceRoundEnd(uint round)
    {
        if (_deviceChannel is null)
        {
            return;
        }
        _deviceChannel.Write(SectionType.RoundInfo, SectionIo.RoundPayload(round));
        _deviceChannel.Flush();
    }

    /// <summary>ChannelEnd on every extra channel (the device one included), then EndOfState on the main one; flushes all.</summary>
    public void SendEnd()
    {
        if (_deviceChannel is not null)
        {
            _deviceChannel.Write(SectionType.ChannelEnd, new byte[8]);
            _deviceChannel.Flush();
        }
        for (int i = 1; i < _channels.Count; i++)
        {
            var p = new byte[8];
            BinaryPrimitives.WriteInt64LittleEndian(p, _channelPages[i]);
            _channels[i].Write(SectionType.ChannelEnd, p);
            _channels[i].Flush();
        }
        Main.Write(SectionType.EndOfState, []);
        Main.Flush();
    }

    /// <summary>
    /// Packs runs i = start, start+step, … into RamPages sections of up to <see cref="RamPages.MaxPayload"/> bytes (many
    /// runs per section), each planned and then built in the channel's frame straight from guest RAM (CRC fused into the
    /// copy: <see cref="RamSectionBuilder"/>) and written in one call.
    /// </summary>
    private (long, long) SendRuns(int channel, List<(long FirstPage, int Count)> runs, int start, int step, uint round, bool omitZero)
    {
        var w = _channels[channel];
        var frame = _frames[channel] ??= new byte[SectionHeader.Size + RamPages.MaxPayload];
        var builder = new RamSectionBuilder(_vm.Memory, omitZero);
        long pages = 0, zeros = 0;
        for (int i = start; i < runs.Count; i += step)
        {
            var (first, count) = runs[i];
            while (count > 0)
            {
                int planned = builder.Plan(first, count, out int z);
                pages += planned;
                zeros += z;
                first += planned;
                count -= planned;
                if (count > 0)
                {
                    Emit(w, frame, builder, round);
                }
            }
        }
        if (!builder.IsEmpty)
        {
            Emit(w, frame, builder, round);
        }
        w.Flush();
        _channelPages[channel] += pages;
        return (pages, zeros);
    }

    private void Emit(SectionWriter w, byte[] frame, RamSectionBuilder builder, uint round)
    {
        int len = builder.Build(frame, round, out _);
        w.WriteBuilt(SectionType.RamPages, frame, len);
        _throttle?.Consume(len + SectionHeader.Size);
    }
}

internal sealed class SourceSession
{
    private readonly Vm _vm;
    private readonly MigrationOptions _o;
    private readonly IProgress<MigrationProgress>? _progress;
    private readonly CancellationToken _ct;
    private readonly MigrationReport _report = new();
    private readonly List<MigrationConnection> _connections = [];
    private readonly List<IVmDevice> _logging = [];
    private readonly Stopwatch _total = new();
    private readonly Stopwatch _phase = new();
    private bool _anyDeviceWithoutLog;
    private ushort _targetMinor;

    public SourceSession(Vm vm, MigrationOptions o, IProgress<MigrationProgress>? progress, CancellationToken ct)
    {
        _vm = vm;
        _o = o;
        _progress = progress;
        _ct = ct;
    }

    public MigrationReport Run(EndPoint target)
    {
        _report.StartedAt = DateTimeOffset.UtcNow;
        double cpu0 = ThreadCpu.Milliseconds();
        _report.Connections = _o.ParallelConnections;
        _report.Tls = _o.Tls is not null;
        _total.Start();
        _phase.Start();
        bool wasRunning = _vm.State == VmRunState.Running;
        bool touched = false, committed = false;
        long pauseTicks = 0;
        using var reg = _ct.Register(CloseAll);
        try
        {
            if (_vm.State == VmRunState.MigratedAway)
            {
                throw new InvalidOperationException("this VM already migrated away");
            }
            // STOP_COPY is mandatory (reference §1.2): a device without it blocks migration, as in QEMU.
            var blocker = _vm.Devices.FirstOrDefault(d => (d.Description.MigrationFlags & MigrationFlags.StopCopy) == 0);
            if (blocker is not null)
            {
                throw new InvalidOperationException($"device {blocker.Description.Name} is not migratable (no STOP_COPY)");
            }
            // --- handshake: nothing on the source changes until the target says yes.
            Report(MigrationPhase.Handshake, 0, 0, 0, 0, 0);
            long t = Stopwatch.GetTimestamp();
            var main = MigrationConnection.Connect(target, _o.Tls, _o.ReplyTimeout, _ct);
            _connections.Add(main);
            t = Step("handshake.connect", t);
            var hello = new MigrationHello(Guid.NewGuid(), _o.ParallelConnections, _vm.Description,
                DeviceChannel: _o.DeviceDataConnection && _vm.Devices.Count > 0);
            main.Writer.WriteStreamHeader();
            main.Writer.Write(SectionType.VmDescription, hello.ToUtf8());
            main.Writer.Flush();
            // Off the critical path, while the target sets up: the timings parsed between Commit and TargetResult.
            SectionIo.WarmUpTimings();
            _targetMinor = main.Reader.ReadStreamHeader().Minor;
            main.Reader.Expect(SectionType.HandshakeReply);
            Step("handshake.target-setup", t);
            var (status, reason) = SectionIo.ReadStatus(main.Reader.Payload);
            if (status != 0)
            {
                _report.Outcome = "refused";
                _report.Error = reason;
                throw new VmMigrationException($"target refused the migration: {reason}", _report);
            }
            var ram = new List<MigrationConnection> { main };
            for (int i = 1; i < _o.ParallelConnections; i++)
            {
                ram.Add(OpenChannel(target, hello, i));
            }
            // A 2.1 target ignored the request (unknown JSON member) and expects device data on the main connection.
            bool deviceChannel = hello.DeviceChannel && _targetMinor >= 2;
            var device = deviceChannel ? OpenChannel(target, hello, _o.ParallelConnections) : null;
            _report.DeviceDataConnection = deviceChannel;
            EndPhase("handshake");

            touched = true;
            var throttle = _o.MaxBandwidth > 0 ? new Throttle(_o.MaxBandwidth) : null;
            var sender = new StateSender(_vm, ram.Select(c => c.Writer).ToArray(), throttle, _o.DeviceReadChunk, device?.Writer)
            {
                OnDeviceReadCpu = ms => AddCpu("device-read", ms),
            };
            var dirty = new PageBitmap(_vm.Memory.PageCount);
            var (round, precopy) = PreCopy(sender, dirty);

            // --- switchover-ack: every pre-copy device's initial bytes are loaded on the target, and (1.1 target) the
            // target has applied the last round, so its receive backlog does not land in the downtime.
            t = Stopwatch.GetTimestamp();
            WaitForTarget(main, precopy.Count, _targetMinor >= 1 ? round : 0);
            Step("switchover.wait-target", t);

            // --- switchover (downtime starts).
            main.Writer.Write(SectionType.SwitchoverStart, []);
            pauseTicks = Stopwatch.GetTimestamp();
            _vm.Pause();
            t = Step("downtime.pause-vcpus", pauseTicks);
            Report(MigrationPhase.Switchover, round, sender.BytesWritten, 0, 0, 0);
            DeviceControl.QuiesceAndStopCopy(_vm.Devices, (name, ticks) => Step(name, ticks));
            EndPhase("switchover");

            var sw = Stopwatch.StartNew();
            long before = sender.BytesWritten;
            t = Stopwatch.GetTimestamp();
            CollectDirty(dirty);
            t = Step("downtime.dirty-collect", t);
            long pages = 0, zeros = 0, devBytes = 0;
            // With a device connection the stop-copy data goes out while the final RAM does (the dirty reports were
            // taken above: nothing on this thread touches a device meanwhile).
            Overlap(sender.HasDeviceChannel, () =>
            {
                long t1 = Stopwatch.GetTimestamp();
                (pages, zeros, _) = sender.SendRam(dirty, (uint)(round + 1));
                dirty.Clear();
                t1 = Step("downtime.ram", t1);
                sender.SendVcpus();
                Step("downtime.vcpus", t1);
            }, () =>
            {
                long t1 = Stopwatch.GetTimestamp();
                devBytes = sender.SendDeviceStopCopy();
                Step("downtime.device-data", t1);
            });
            t = Stopwatch.GetTimestamp();
            sender.SendEnd();
            long endSent = Step("downtime.flush", t);
            AddRound(round + 1, pages, zeros, sender.BytesWritten - before, devBytes, sw.Elapsed);
            Report(MigrationPhase.StopCopy, round + 1, sender.BytesWritten, 0, 0, 0);
            EndPhase("stop-copy");
            // Off the critical path: the target is loading while the logs stop (the devices are stopped already, and
            // the final reports were taken).
            t = Stopwatch.GetTimestamp();
            foreach (var d in _logging)
            {
                DeviceControl.StopLoggingQuietly(d);
            }
            _logging.Clear();
            Step("cleanup.stop-logging", t);

            // --- two-phase end (docs/stream-format.md §4.1): no TargetReady → we resume; after Commit the target
            // runs, and only a TargetResult tells us so.
            Report(MigrationPhase.WaitingForTarget, round + 1, sender.BytesWritten, 0, 0, 0);
            CommitProtocol.AwaitReady(main.Reader);
            long readyTicks = Stopwatch.GetTimestamp();
            Step("downtime.target-ready", endSent);
            committed = true; // before the first byte of Commit: from then on the target may be running
            CommitProtocol.SendCommit(main.Writer);
            var result = ReadTargetResult(main);
            Step("downtime.commit-round-trip", readyTicks);
            _report.CommitRoundTripMilliseconds = Stopwatch.GetElapsedTime(readyTicks).TotalMilliseconds;
            _report.TargetDowntimeMilliseconds = result.DowntimeMicroseconds / 1000.0;
            _report.TargetCommitWaitMilliseconds = result.CommitWaitMicroseconds / 1000.0;
            _report.DowntimeMilliseconds = Stopwatch.GetElapsedTime(pauseTicks).TotalMilliseconds;
            EndPhase("target-resume");
            if (result.Status != 0)
            {
                // The target failed after Commit but before its vCPUs ran, and discarded the VM: ours is the only copy.
                committed = false;
                throw new IOException($"target failed before running the VM: {result.Reason}");
            }

            _vm.MarkMigratedAway();
            t = Stopwatch.GetTimestamp();
            // Outside the downtime (as QEMU's save_cleanup): STOP_COPY → STOP ends the device sessions. The VM runs on the
            // target now, so nothing here may turn the outcome into a failure: an escaping exception would reach the
            // catch below with committed set and report "in doubt" for a migration that completed. Any error of a
            // device adapter (I/O, a refused arc, one already disposed: InvalidOperationException/ObjectDisposedException)
            // is recorded; the device is released by the owner anyway.
            foreach (var d in _vm.Devices)
            {
                try
                {
                    d.SetState(DeviceState.Stop);
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    _report.CleanupError ??= $"device {d.Description.Name}: STOP after the migration failed ({e.GetType().Name}: {e.Message})";
                }
            }
            Step("cleanup.devices-stop", t);
            EndPhase("cleanup");
            _report.Outcome = "completed";
            Report(MigrationPhase.Completed, round + 1, sender.BytesWritten, 0, 0, 0);
            return _report;
        }
        catch (VmMigrationException)
        {
            throw;
        }
        // Whatever went wrong (socket, stream format, a device step, a bug in a device adapter), the source VM must come
        // back: every failure before the commit point rolls back.
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            _report.Error = _ct.IsCancellationRequested ? $"cancelled ({e.Message})" : e.Message;
            if (committed)
            {
                _report.Outcome = "in-doubt";
                Report(MigrationPhase.InDoubt, 0, 0, 0, 0, 0);
                throw new VmMigrationException($"migration in doubt: the target was told to commit but its result did not arrive ({e.Message}); the source stays paused", _report, e);
            }
            if (touched)
            {
                string? problem = Rollback(wasRunning);
                if (problem is not null)
                {
                    _report.Error += "; " + problem;
                }
            }
            _report.Outcome = touched ? "rolled-back" : "not-started";
            Report(MigrationPhase.RolledBack, 0, 0, 0, 0, 0);
            throw new VmMigrationException($"migration failed, source {(wasRunning ? "running again" : "unchanged")}: {e.Message}", _report, e);
        }
        finally
        {
            _total.Stop();
            _report.TotalMilliseconds = _total.Elapsed.TotalMilliseconds;
            AddCpu("main", ThreadCpu.Milliseconds() - cpu0);
            foreach (var c in _connections)
            {
                _report.TotalBytes += c.Writer.BytesWritten;
                foreach (var (t, n) in c.Writer.BytesByType)
                {
                    _report.BytesBySection[t.ToString()] = _report.BytesBySection.GetValueOrDefault(t.ToString()) + n;
                }
            }
            CloseAll();
        }
    }

    private (int Round, List<int> Precopy) PreCopy(StateSender sender, PageBitmap dirty)
    {
        // Start own logging from a clean slate, and every device's DMA logging over all of RAM.
        long t = Stopwatch.GetTimestamp();
        _vm.Memory.FetchAndClearDirty(new PageBitmap(_vm.Memory.PageCount));
        foreach (var d in _vm.Devices)
        {
            if (d.SupportsDirtyLogging)
            {
                d.StartDirtyLogging(GuestRam.PageSize, [(0UL, _vm.Memory.Size)]);
                _logging.Add(d);
            }
            else
            {
                _anyDeviceWithoutLog = true;
            }
        }
        var precopy = new List<int>();
        for (int i = 0; i < _vm.Devices.Count; i++)
        {
            if (DeviceControl.HasPreCopy(_vm.Devices[i]))
            {
                _vm.Devices[i].SetState(DeviceState.PreCopy);
                precopy.Add(i);
            }
        }
        _report.PrecopyDevices = precopy.Count;
        Step("precopy.start-logging", t);
        var initialSent = new bool[_vm.Devices.Count];
        dirty.SetAll();
        int round = 0;
        double bandwidth = 0;
        while (true)
        {
            _ct.ThrowIfCancellationRequested();
            round++;
            var sw = Stopwatch.StartNew();
            long before = sender.BytesWritten;
            t = Stopwatch.GetTimestamp();
            if (round > 1)
            {
                CollectDirty(dirty);
                t = Step("precopy.dirty-collect", t);
            }
            long pages = 0, zeros = 0, holes = 0, devBytes = 0;
            // RAM on this thread, device data on a helper thread when it has its own connection (§4.2): the device round
            // trips (MIG_DATA_READ over the device's socket) wait while RAM computes, and the other way round.
            Overlap(sender.HasDeviceChannel, () =>
            {
                long t1 = Stopwatch.GetTimestamp();
                (pages, zeros, holes) = sender.SendRam(dirty, (uint)round, firstPass: round == 1);
                dirty.Clear();
                Step("precopy.ram", t1);
            }, () =>
            {
                long t1 = Stopwatch.GetTimestamp();
                foreach (int i in precopy)
                {
                    devBytes += sender.SendDevicePrecopy(i, _o.MaxDevicePrecopyBytesPerRound);
                    if (!initialSent[i] && (!_vm.Devices[i].SupportsPrecopyInfo || _vm.Devices[i].GetPrecopyInfo().InitialBytes == 0))
                    {
                        sender.DeviceWriter.Write(SectionType.DeviceInitialDataSent, SectionIo.DeviceIndexPayload(i));
                        initialSent[i] = true;
                    }
                }
                sender.SendDeviceRoundEnd((uint)round);
                Step("precopy.device-data", t1);
            });
            t = Stopwatch.GetTimestamp();
            long bytes = sender.BytesWritten - before;
            double secs = Math.Max(sw.Elapsed.TotalSeconds, 1e-6);
            // Rounds with little data measure latency, not bandwidth: keep the best rate seen on a large round.
            if (bytes >= (1 << 20) || bandwidth == 0)
            {
                bandwidth = Math.Max(bandwidth, bytes / secs);
            }
            long dirtyNow = _vm.Memory.DirtyPageCount() * GuestRam.PageSize;
            double dirtyRate = dirtyNow / secs;
            long remaining = dirtyNow + DevicePending(precopy) + (_anyDeviceWithoutLog ? (long)_vm.Memory.Size : 0);
            var info = new byte[32];
            BinaryPrimitives.WriteUInt32LittleEndian(info, (uint)round);
            BinaryPrimitives.WriteInt64LittleEndian(info.AsSpan(8), dirtyNow / GuestRam.PageSize);
            BinaryPrimitives.WriteInt64LittleEndian(info.AsSpan(16), bytes);
            BinaryPrimitives.WriteInt64LittleEndian(info.AsSpan(24), (long)(secs * 1e6));
            sender.Main.Write(SectionType.RoundInfo, info);
            sender.Main.Flush();
            Step("precopy.estimate", t);
            AddRound(round, pages, zeros, bytes, devBytes, sw.Elapsed, holes);
            // Nothing left (e.g. an idle VM whose first pass found only holes): converged, whatever the bandwidth.
            double expected = remaining == 0 ? 0 : bandwidth > 0 ? remaining / bandwidth : double.PositiveInfinity;
            Report(MigrationPhase.PreCopy, round, sender.BytesWritten, remaining, dirtyRate, bandwidth, expected);
            bool allInitial = precopy.All(i => initialSent[i]);
            // With devices logging DMA, "remaining" lacks what they dirtied until a report is taken: run at least a
            // second round so the estimate includes it (and the devices' first, slowest report is not in the downtime).
            bool estimated = round > 1 || _logging.Count == 0;
            if ((allInitial && estimated && expected <= _o.DowntimeLimit.TotalSeconds) || (round >= _o.MaxRounds && allInitial) || round >= _o.MaxRounds * 4)
            {
                if (!allInitial)
                {
                    throw new IOException("a pre-copy device never finished its initial data");
                }
                EndPhase("pre-copy");
                return (round, precopy);
            }
        }
    }

    /// <summary>
    /// Runs <paramref name="ram"/> here and, when <paramref name="concurrent"/>, <paramref name="device"/> on a helper
    /// thread at the same time (else after <paramref name="ram"/>). A failure of either closes every connection (the
    /// other then fails fast, and the target sees the cut) and the first failure is rethrown only after both ended:
    /// nothing touches a device once this returns, so a rollback can follow.
    /// </summary>
    private void Overlap(bool concurrent, Action ram, Action device)
    {
        if (!concurrent)
        {
            ram();
            device();
            return;
        }
        Exception? first = null;
        var helper = new Thread(() =>
        {
            double cpu0 = ThreadCpu.Milliseconds();
            try
            {
                device();
            }
            catch (Exception e)
            {
                Interlocked.CompareExchange(ref first, e, null);
                CloseAll();
            }
            AddCpu("device-send", ThreadCpu.Milliseconds() - cpu0);
        })
        { IsBackground = true, Name = "vmig device data send" };
        helper.Start();
        try
        {
            ram();
        }
        catch (Exception e)
        {
            Interlocked.CompareExchange(ref first, e, null);
            CloseAll();
        }
        helper.Join();
        if (first is not null)
        {
            ExceptionDispatchInfo.Capture(first).Throw();
        }
    }

    private void AddCpu(string role, double ms)
    {
        lock (_report.CpuMilliseconds)
        {
            _report.CpuMilliseconds[role] = _report.CpuMilliseconds.GetValueOrDefault(role) + ms;
        }
    }

    private MigrationConnection OpenChannel(EndPoint target, MigrationHello hello, int index)
    {
        var c = MigrationConnection.Connect(target, _o.Tls, _o.ReplyTimeout, _ct);
        lock (_connections)
        {
            _connections.Add(c);
        }
        c.Writer.WriteStreamHeader();
        var p = new byte[24];
        hello.SessionId.TryWriteBytes(p);
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(16), (uint)index);
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(20), (uint)hello.Connections);
        c.Writer.Write(SectionType.ChannelHello, p);
        c.Writer.Flush();
        return c;
    }

    private long DevicePending(List<int> precopy)
    {
        long sum = 0;
        for (int i = 0; i < _vm.Devices.Count; i++)
        {
            var d = _vm.Devices[i];
            if (precopy.Contains(i) && d.SupportsPrecopyInfo)
            {
                var p = d.GetPrecopyInfo();
                sum += (long)Math.Min(p.InitialBytes + p.DirtyBytes, long.MaxValue / 4);
            }
            else if (d.SupportsStopCopySize)
            {
                sum += (long)Math.Min(d.GetStopCopySize(), long.MaxValue / 4);
            }
        }
        return sum;
    }

    private void CollectDirty(PageBitmap dirty)
    {
        _vm.Memory.FetchAndClearDirty(dirty);
        if (_anyDeviceWithoutLog)
        {
            // A device that cannot log its DMA may have written anywhere (QEMU treats all of RAM as dirty too). Holes
            // (pages no one ever wrote) are dropped: pages are read through the mapping, where a load would allocate each
            // hole, and the target's copy of a hole is zero anyway (it only ever got data for pages that were written
            // then, and guest RAM is never hole-punched).
            dirty.SetAll();
            _vm.Memory.KeepAllocatedPages(dirty);
            return;
        }
        if (_logging.Count == 0)
        {
            return;
        }
        var bitmap = new ulong[(_vm.Memory.PageCount + 63) / 64];
        foreach (var d in _logging)
        {
            Array.Clear(bitmap);
            d.ReportDirty(0, _vm.Memory.Size, GuestRam.PageSize, bitmap);
            dirty.OrRange(0, bitmap);
        }
    }

    /// <summary>
    /// Reads the target's replies until every pre-copy device is acked and, when <paramref name="appliedRound"/> &gt; 0
    /// (a target whose stream header says 2.1 or later), RoundApplied for that round came. Both are bounded only by the
    /// reply timeout: a peer announcing 2.1 must send RoundApplied (docs/stream-format.md §4).
    /// </summary>
    private void WaitForTarget(MigrationConnection main, int acks, int appliedRound)
    {
        var acked = new HashSet<int>();
        bool applied = appliedRound == 0;
        while (acked.Count < acks || !applied)
        {
            if (!main.Reader.ReadNext())
            {
                throw new EndOfStreamException("target closed the connection before acknowledging switchover");
            }
            switch (main.Reader.Type)
            {
                case SectionType.TargetResult:
                    throw new IOException($"target failed: {TargetResult.Read(main.Reader.Payload).Reason}");
                case SectionType.SwitchoverAck:
                    acked.Add(SectionIo.ReadDeviceIndex(main.Reader.Payload, _vm.Devices.Count));
                    break;
                case SectionType.RoundApplied:
                    applied |= SectionIo.ReadRound(main.Reader.Payload) >= appliedRound;
                    break;
                default:
                    throw new StreamFormatException($"expected SwitchoverAck or RoundApplied, got {main.Reader.Type}");
            }
        }
    }

    /// <summary>After Commit: reads up to TargetResult, taking the target's step timings (TargetTimings, 2.1) on the way.</summary>
    private TargetResult ReadTargetResult(MigrationConnection main)
    {
        while (true)
        {
            if (!main.Reader.ReadNext())
            {
                throw new StreamFormatException("stream ended; expected section TargetResult");
            }
            switch (main.Reader.Type)
            {
                case SectionType.TargetResult:
                    return TargetResult.Read(main.Reader.Payload);
                case SectionType.TargetTimings:
                    foreach (var (k, us) in SectionIo.ReadTimings(main.Reader.Payload))
                    {
                        _report.TargetStepMilliseconds[k] = us / 1000.0;
                    }
                    break;
                default:
                    throw new StreamFormatException($"expected section TargetResult, got {main.Reader.Type}");
            }
        }
    }

    private string? Rollback(bool wasRunning)
    {
        CloseAll();
        string? problem = null;
        foreach (var d in _logging)
        {
            DeviceControl.StopLoggingQuietly(d);
        }
        _logging.Clear();
        foreach (var d in _vm.Devices)
        {
            problem ??= DeviceControl.RecoverToRunning(d);
        }
        if (wasRunning)
        {
            _vm.Resume();
        }
        return problem;
    }

    private void CloseAll()
    {
        lock (_connections)
        {
            foreach (var c in _connections)
            {
                c.Dispose();
            }
        }
    }

    private void AddRound(int round, long pages, long zeros, long bytes, long devBytes, TimeSpan t, long holes = 0) =>
        _report.Rounds.Add(new RoundReport(round, pages, zeros, bytes, devBytes, t.TotalMilliseconds, bytes / Math.Max(t.TotalSeconds, 1e-6), holes));

    /// <summary>Adds the time since <paramref name="since"/> (a Stopwatch timestamp) to step <paramref name="name"/>; returns now.</summary>
    private long Step(string name, long since)
    {
        long now = Stopwatch.GetTimestamp();
        lock (_report.StepMilliseconds)
        {
            _report.StepMilliseconds[name] = _report.StepMilliseconds.GetValueOrDefault(name) + Stopwatch.GetElapsedTime(since, now).TotalMilliseconds;
        }
        return now;
    }

    private void EndPhase(string name)
    {
        _report.PhaseMilliseconds[name] = _phase.Elapsed.TotalMilliseconds;
        _phase.Restart();
    }

    private void Report(MigrationPhase phase, int round, long sent, long remaining, double dirtyRate, double bandwidth, double expectedSeconds = 0) =>
        _progress?.Report(new MigrationProgress(phase, round, sent, remaining, dirtyRate, bandwidth,
            double.IsFinite(expectedSeconds) ? TimeSpan.FromSeconds(expectedSeconds) : TimeSpan.MaxValue));
}
