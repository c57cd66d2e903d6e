using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using Vmig.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>
/// Receives a live migration (ARCHITECTURE §4 steps 1, 4): checks the VM description and every device before any
/// state moves, loads RAM/vCPU/device state, loads the devices (RESUMING→STOP for all, →RUNNING_P2P for P2P ones),
/// sends TargetReady and waits for the source's Commit (docs/stream-format.md §4.1); only then →RUNNING, runs the
/// vCPUs and tells the source. Without Commit, or on any failure before the vCPUs run, it tells the source (if it
/// can), resets and releases its devices and throws; nothing of the incoming VM survives. Once committed it keeps
/// the VM even if its result cannot be delivered.
/// </summary>
public static class MigrationTarget
{
    /// <summary>Accepts one migration on <paramref name="listener"/> (plus its extra connections).</summary>
    /// <param name="listener">A started listener; the source connects its main and extra connections to it.</param>
    /// <param name="guest">Guest software (program registry, guest setup); sizes come from the source.</param>
    /// <param name="deviceFactory">
    /// Opens this host's device for a described one (e.g. connects to the VF's vfio-user socket). It may throw or
    /// return a device whose description differs: both refuse the migration with the reason.
    /// </param>
    /// <param name="options">Target parameters.</param>
    /// <param name="cancellationToken">Cancels the wait and the transfer (the incoming VM is discarded).</param>
    /// <returns>The running (or, with StartVcpus=false, paused) VM.</returns>
    /// <exception cref="VmMigrationException">Refused or failed; the report says why.</exception>
    public static Task<Vm> AcceptAsync(TcpListener listener, VmConfig guest, Func<DeviceDescription, IVmDevice> deviceFactory,
        MigrationTargetOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(listener);
        ArgumentNullException.ThrowIfNull(guest);
        ArgumentNullException.ThrowIfNull(deviceFactory);
        var o = options ?? new MigrationTargetOptions();
        return AcceptCore(listener, guest, deviceFactory, o, cancellationToken);
    }

    private static async Task<Vm> AcceptCore(TcpListener listener, VmConfig guest, Func<DeviceDescription, IVmDevice> deviceFactory,
        MigrationTargetOptions o, CancellationToken ct)
    {
        MigrationConnection main;
        try
        {
            main = await MigrationConnection.AcceptAsync(listener, o.Tls, o.ReceiveTimeout, ct).ConfigureAwait(false);
        }
        catch
        {
            o.PreallocatedMemory?.Dispose(); // consumed by this migration, which failed before it began
            throw;
        }
        return await Task.Factory.StartNew(
            () => new TargetSession(listener, guest, deviceFactory, o, ct).Run(main),
            CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default).ConfigureAwait(false);
    }
}

/// <summary>Applies an incoming state stream to an incoming <see cref="Vm"/>; shared by the target and restore.</summary>
internal sealed class StateLoader : IDisposable
{
    private readonly Vm _vm;
    private readonly VmDescription _description;
    private readonly byte[]?[] _vcpus;
    private readonly bool[] _deviceEnded;
    private readonly DeviceDataLoader _deviceData;
    private readonly bool _deviceChannel;
    private readonly object _roundGate = new();
    private uint _deviceRound;
    private Exception? _deviceChannelFailure;

    /// <param name="vm">The incoming VM.</param>
    /// <param name="description">Its description.</param>
    /// <param name="deviceChannel">
    /// Device sections arrive on a connection of their own (docs/stream-format.md §4.2), handled by
    /// <see cref="HandleDeviceChannel"/> on that connection's thread; the main connection must then carry none.
    /// </param>
    public StateLoader(Vm vm, VmDescription description, bool deviceChannel = false)
    {
        _vm = vm;
        _description = description;
        _deviceChannel = deviceChannel;
        _vcpus = new byte[description.Vcpus.Count][];
        _deviceEnded = new bool[description.Devices.Count];
        PageRounds = new PageRounds(vm.Memory.PageCount);
        _deviceData = new DeviceDataLoader(vm.Devices);
    }

    public PageRounds PageRounds { get; }

    public long Pages { get; private set; }

    /// <summary>Timestamp of SwitchoverStart (0 if none came).</summary>
    public long SwitchoverTicks { get; private set; }

    /// <summary>How long a main-connection RoundInfo waits for the device connection to reach its round. Default 60 s.</summary>
    public TimeSpan DeviceRoundTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// Handles the current section of <paramref name="r"/> (the main connection). Returns true on EndOfState. Calls
    /// <paramref name="onInitialDataSent"/> for DeviceInitialDataSent (the target acks) and <paramref name="onRoundInfo"/>
    /// with the round of a RoundInfo (the target answers RoundApplied) once that round is loaded, device data included
    /// (with a device connection: once it passed the same round).
    /// </summary>
    public bool Handle(SectionReader r, Action<int>? onInitialDataSent, Action<uint>? onRoundInfo = null)
    {
        var p = r.Payload;
        switch (r.Type)
        {
            case SectionType.RamPages:
                Pages += RamPages.Apply(_vm.Memory, p, PageRounds);
                return false;
            case SectionType.DeviceData or SectionType.DeviceInitialDataSent or SectionType.DeviceEnd:
                if (_deviceChannel)
                {
                    throw new StreamFormatException($"{r.Type} on the main connection while a device connection is in use");
                }
                HandleDevice(r, onInitialDataSent);
                return false;
            case SectionType.VcpuState:
                {
                    if (p.Length < 4)
                    {
                        throw new StreamFormatException("VcpuState shorter than 4 bytes");
                    }
                    uint i = BinaryPrimitives.ReadUInt32LittleEndian(p);
                    if (i >= _vcpus.Length || p.Length - 4 != Guest.GuestEnvironment.RegisterSize)
                    {
                        throw new StreamFormatException($"VcpuState for vCPU {i} with {p.Length - 4} register bytes is invalid");
                    }
                    _vcpus[i] = p[4..].ToArray();
                    return false;
                }
            case SectionType.SwitchoverStart:
                SwitchoverTicks = Stopwatch.GetTimestamp();
                return false;
            case SectionType.RoundInfo:
                if (p.Length >= 4 && onRoundInfo is not null)
                {
                    // RoundApplied promises the round is loaded, device data included.
                    uint round = SectionIo.ReadRound(p);
                    if (_deviceChannel)
                    {
                        WaitForDeviceRound(round);
                    }
                    else
                    {
                        _deviceData.Drain();
                    }
                    onRoundInfo(round);
                }
                return false;
            case SectionType.EndOfState:
                return true;
            default:
                throw new StreamFormatException($"unexpected section {r.Type} in the state stream");
        }
    }

    /// <summary>
    /// Handles the current section of the device connection (§4.2), on its receive thread: DeviceData,
    /// DeviceInitialDataSent (<paramref name="onInitialDataSent"/> acks on the main connection), DeviceEnd, and RoundInfo
    /// (everything before it is then written to the devices, and a main-connection RoundInfo of that round may be
    /// answered). Returns true on ChannelEnd.
    /// </summary>
    /// <exception cref="StreamFormatException">Any other section, or a malformed one.</exception>
    public bool HandleDeviceChannel(SectionReader r, Action<int>? onInitialDataSent)
    {
        switch (r.Type)
        {
            case SectionType.DeviceData or SectionType.DeviceInitialDataSent or SectionType.DeviceEnd:
                HandleDevice(r, onInitialDataSent);
                return false;
            case SectionType.RoundInfo:
                {
                    uint round = SectionIo.ReadRound(r.Payload);
                    _deviceData.Drain();
                    lock (_roundGate)
                    {
                        _deviceRound = Math.Max(_deviceRound, round);
                        Monitor.PulseAll(_roundGate);
                    }
                    return false;
                }
            case SectionType.ChannelEnd:
                return true;
            default:
                throw new StreamFormatException($"unexpected {r.Type} on the device connection");
        }
    }

    /// <summary>Why the device connection failed, or null.</summary>
    public Exception? DeviceChannelFailure
    {
        get
        {
            lock (_roundGate)
            {
                return _deviceChannelFailure;
            }
        }
    }

    /// <summary>The device connection failed: a main-connection RoundInfo waiting for it fails at once.</summary>
    public void DeviceChannelFailed(Exception e)
    {
        lock (_roundGate)
        {
            _deviceChannelFailure ??= e;
            Monitor.PulseAll(_roundGate);
        }
    }

    private void WaitForDeviceRound(uint round)
    {
        var waited = Stopwatch.StartNew();
        lock (_roundGate)
        {
            while (_deviceRound < round && _deviceChannelFailure is null)
            {
                var left = DeviceRoundTimeout - waited.Elapsed;
                if (left <= TimeSpan.Zero || !Monitor.Wait(_roundGate, left))
                {
                    throw new TimeoutException($"the device connection did not reach round {round} within {DeviceRoundTimeout}");
                }
            }
            if (_deviceChannelFailure is not null)
            {
                throw new IOException($"the device connection failed: {_deviceChannelFailure.Message}", _deviceChannelFailure);
            }
        }
    }

    private void HandleDevice(SectionReader r, Action<int>? onInitialDataSent)
    {
        var p = r.Payload;
        switch (r.Type)
        {
            case SectionType.DeviceData:
                {
                    int d = SectionIo.ReadDeviceIndex(p, _deviceEnded.Length);
                    if (_deviceEnded[d])
                    {
                        throw new StreamFormatException($"device {d}: data after its end");
                    }
                    _deviceData.Enqueue(d, r);
                    break;
                }
            case SectionType.DeviceInitialDataSent:
                {
                    int d = SectionIo.ReadDeviceIndex(p, _deviceEnded.Length);
                    if ((_description.Devices[d].MigrationFlags & MigrationFlags.PreCopy) == 0)
                    {
                        throw new StreamFormatException($"device {d}: initial-data marker for a device without PRE_COPY");
                    }
                    // The ack promises the bytes are loaded into the device.
                    _deviceData.Drain();
                    onInitialDataSent?.Invoke(d);
                    break;
                }
            default:
                _deviceEnded[SectionIo.ReadDeviceIndex(p, _deviceEnded.Length)] = true;
                break;
        }
    }

    /// <summary>
    /// After EndOfState: checks completeness, commits devices (RESUMING→STOP all, →RUNNING_P2P, →RUNNING) and
    /// re-creates the guest programs (a snapshot restore: no source to ask).
    /// </summary>
    public void Commit()
    {
        Prepare();
        Run();
    }

    /// <summary>
    /// First half on a live target: checks completeness and loads the device states (RESUMING→STOP for all, which
    /// validates them, then →RUNNING_P2P for P2P devices). Nothing runs yet; <see cref="Run"/> after the source's Commit.
    /// </summary>
    /// <param name="step">Told "device-data-drain" once every MIG_DATA_WRITE is done and "device-load" after the devices.</param>
    public void Prepare(Action<string>? step = null)
    {
        for (int i = 0; i < _vcpus.Length; i++)
        {
            if (_vcpus[i] is null)
            {
                throw new StreamFormatException($"the stream ended without state for vCPU {i}");
            }
        }
        for (int d = 0; d < _deviceEnded.Length; d++)
        {
            if (!_deviceEnded[d])
            {
                throw new StreamFormatException($"the stream ended without the end of device {d}'s data");
            }
        }
        _deviceData.Drain();
        _deviceData.Dispose();
        step?.Invoke("device-data-drain");
        DeviceControl.LoadAndQuiesce(_vm.Devices);
        step?.Invoke("device-load");
    }

    /// <summary>Second half: every device →RUNNING, then the guest programs are re-created (vCPUs still parked).</summary>
    /// <param name="step">Told "device-run" after the devices and "guest-resume" after the programs.</param>
    public void Run(Action<string>? step = null)
    {
        DeviceControl.RunAll(_vm.Devices);
        step?.Invoke("device-run");
        _vm.ResumeGuest(_vcpus.Select((r, i) => (_description.Vcpus[i], r!)).ToArray());
        step?.Invoke("guest-resume");
    }

    /// <summary>CPU ms of the MIG_DATA_WRITE helper thread (valid after <see cref="Prepare"/>).</summary>
    public double DeviceWriteCpuMilliseconds => _deviceData.HelperCpuMilliseconds;

    /// <summary>Stops the device-data helper thread (a discarded incoming VM).</summary>
    public void Dispose() => _deviceData.Dispose();

    /// <summary>
    /// Checks a description against this host and opens its devices; returns the devices, or null with a reason.
    /// Devices opened before a refusal are released.
    /// </summary>
    public static List<IVmDevice>? OpenDevices(VmDescription d, VmConfig guest, Func<DeviceDescription, IVmDevice> factory, ulong maxMemory, out string reason)
    {
        reason = "";
        if (d.MemorySize > maxMemory)
        {
            reason = $"guest RAM {d.MemorySize} bytes exceeds this host's limit of {maxMemory}";
            return null;
        }
        foreach (string kind in d.Vcpus)
        {
            if (!guest.Programs.Contains(kind))
            {
                reason = $"unknown guest program kind '{kind}'";
                return null;
            }
        }
        var devices = new List<IVmDevice>();
        try
        {
            foreach (var want in d.Devices)
            {
                IVmDevice dev = factory(want);
                devices.Add(dev);
                string? why = want.IncompatibilityWith(dev.Description);
                if (why is not null)
                {
                    throw new InvalidOperationException(why);
                }
                if (!string.Equals(dev.Description.Name, want.Name, StringComparison.Ordinal))
                {
                    throw new InvalidOperationException($"device factory returned '{dev.Description.Name}' for '{want.Name}'");
                }
                dev.SetState(DeviceState.Resuming);
            }
            return devices;
        }
        // SocketException: the device host is gone (ECONNREFUSED on its stale socket); refuse in the handshake reply
        // rather than letting it escape before the stream header is written (the source then saw "bad magic").
        catch (Exception e) when (e is IOException or MigrationException or InvalidOperationException or ArgumentException or KeyNotFoundException or SocketException)
        {
            reason = e.Message;
            Release(devices);
            return null;
        }
    }

    /// <summary>Resets and disposes devices of a discarded incoming VM.</summary>
    public static void Release(IEnumerable<IVmDevice> devices)
    {
        foreach (var dev in devices)
        {
            try
            {
                dev.Reset();
            }
            catch (Exception e) when (e is IOException or MigrationException or InvalidOperationException)
            {
                // Released anyway; the device host resets a VF whose client goes away.
            }
            dev.Dispose();
        }
    }
}

internal sealed class TargetSession
{
    private readonly TcpListener _listener;
    private readonly VmConfig _guest;
    private readonly Func<DeviceDescription, IVmDevice> _factory;
    private readonly MigrationTargetOptions _o;
    private readonly CancellationToken _ct;
    private readonly List<MigrationConnection> _connections = [];
    private readonly MigrationReport _report = new();
    private readonly Dictionary<string, long> _steps = [];
    private readonly List<Task> _receivers = [];
    private bool _resultSent;
    private bool _ramHandedOver;
    private double _deviceReceiveCpu;

    public TargetSession(TcpListener listener, VmConfig guest, Func<DeviceDescription, IVmDevice> factory, MigrationTargetOptions o, CancellationToken ct)
    {
        _listener = listener;
        _guest = guest;
        _factory = factory;
        _o = o;
        _ct = ct;
    }

    public Vm Run(MigrationConnection main)
    {
        _connections.Add(main);
        Vm? vm = null;
        List<IVmDevice>? devices = null;
        StateLoader? loader = null;
        using var reg = _ct.Register(CloseAll);
        double cpu0 = ThreadCpu.Milliseconds();
        try
        {
            long t0 = Stopwatch.GetTimestamp();
            main.Reader.ReadStreamHeader();
            main.Reader.Expect(SectionType.VmDescription);
            long t = Stopwatch.GetTimestamp();
            var hello = MigrationHello.Parse(main.Reader.Payload);
            string reason = "";
            if (_o.PreallocatedMemory is { } pre && pre.Size != hello.Vm.MemorySize)
            {
                // As QEMU with a different -m: the RAM this target was started with does not fit the incoming VM.
                reason = $"this target preallocated {pre.Size} bytes of guest RAM; the incoming VM has {hello.Vm.MemorySize}";
            }
            else
            {
                devices = StateLoader.OpenDevices(hello.Vm, _guest, _factory, _o.MaxMemorySize, out reason);
            }
            t = Step("setup.open-devices", t);
            main.Writer.WriteStreamHeader();
            if (devices is null)
            {
                main.Writer.Write(SectionType.HandshakeReply, SectionIo.StatusPayload(1, reason));
                main.Writer.Flush();
                _report.Outcome = "refused";
                _report.Error = reason;
                throw new VmMigrationException($"refused incoming migration: {reason}", _report);
            }
            var preallocated = _o.PreallocatedMemory;
            _ramHandedOver = true;
            vm = Vm.CreateIncoming(hello.Vm, _guest, devices, preallocated);
            devices = null;
            t = Step("setup.ram-and-dma-map", t);
            main.Writer.Write(SectionType.HandshakeReply, SectionIo.StatusPayload(0, null));
            main.Writer.Flush();
            t = Step("setup.reply", t);
            SectionIo.WarmUpTimings();

            loader = new StateLoader(vm, hello.Vm, hello.DeviceChannel) { DeviceRoundTimeout = _o.ReceiveTimeout };
            var receivers = AcceptChannels(main, hello, vm, loader);

            bool ended = false;
            while (!ended)
            {
                if (!main.Reader.ReadNext())
                {
                    throw new EndOfStreamException("source closed the stream before the end of state");
                }
                ended = loader.Handle(main.Reader, d => Reply(main, SectionType.SwitchoverAck, SectionIo.DeviceIndexPayload(d)),
                    round => Reply(main, SectionType.RoundApplied, SectionIo.RoundPayload(round)));
            }
            t = Step("receive", t);
            if (loader.SwitchoverTicks != 0)
            {
                Step("backlog", loader.SwitchoverTicks);
            }
            foreach (var r in receivers)
            {
                if (!r.Wait(_o.ReceiveTimeout))
                {
                    throw new TimeoutException("a RAM connection did not finish");
                }
            }
            t = Step("channels", t);
            // Two-phase end (docs/stream-format.md §4.1): everything loaded and devices at STOP / RUNNING_P2P, then
            // TargetReady; without the source's Commit this VM never runs (any failure below discards it).
            loader.Prepare(step => t = Step(step, t));
            ulong commitWaitUs = CommitProtocol.SendReadyAndAwaitCommit(main.Writer, main.Reader);
            t = Step("commit-wait", t);
            loader.Run(step => t = Step(step, t));
            if (_o.StartVcpus)
            {
                vm.Start();
            }
            else
            {
                vm.Pause();
            }
            Step("vcpu-start", t);
            Step("total", t0);
            // CPU per thread role (µs, 10 ms resolution): what two cores can overlap at best.
            _steps["cpu.main"] = (long)((ThreadCpu.Milliseconds() - cpu0) * 1000);
            _steps["cpu.device-receive"] = (long)(_deviceReceiveCpu * 1000);
            _steps["cpu.device-write"] = (long)(loader.DeviceWriteCpuMilliseconds * 1000);
            ulong downUs = loader.SwitchoverTicks == 0 ? 0 : (ulong)(Stopwatch.GetElapsedTime(loader.SwitchoverTicks).TotalMilliseconds * 1000);
            try
            {
                // Informational, optional (2.1); inside the try: a lost connection must not discard a committed VM.
                main.Writer.Write(SectionType.TargetTimings, SectionIo.TimingsPayload(_steps));
                SendResult(main, 0, downUs, commitWaitUs, null);
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException or NotSupportedException)
            {
                // Committed: the VM runs here even if the source never hears it (it stays paused in doubt). Discarding
                // now would leave a guest that already ran on shared storage, and none running.
            }
            CloseAll();
            return vm;
        }
        catch (VmMigrationException)
        {
            StopReceivers();
            loader?.Dispose();
            Discard(vm, devices);
            throw;
        }
        // Any failure discards the incoming VM and releases its devices.
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // A failed device connection closes the main one: the main loop's error is then only the consequence.
            e = loader?.DeviceChannelFailure ?? e;
            _report.Outcome = "failed";
            _report.Error = e.Message;
            try
            {
                SendResult(main, 1, 0, 0, e.Message);
            }
            catch (Exception e2) when (e2 is IOException or ObjectDisposedException or SocketException or NotSupportedException)
            {
                // The source is gone; it rolls back on its own when the connection drops.
            }
            StopReceivers();
            loader?.Dispose();
            Discard(vm, devices);
            throw new VmMigrationException($"incoming migration failed: {e.Message}", _report, e);
        }
    }

    /// <summary>
    /// Accepts the extra connections: Connections − 1 RAM ones (ChannelHello index 1…Connections − 1) and, when the
    /// VmDescription asked for it (2.2, §4.2), the device connection (index = Connections). Each gets a receive thread.
    /// </summary>
    private List<Task> AcceptChannels(MigrationConnection main, MigrationHello hello, Vm vm, StateLoader loader)
    {
        var tasks = _receivers;
        bool deviceSeen = false;
        var ramSeen = new HashSet<uint>();
        int extra = hello.Connections - 1 + (hello.DeviceChannel ? 1 : 0);
        for (int i = 0; i < extra; i++)
        {
            using var cts = CancellationTokenSource.CreateLinkedTokenSource(_ct);
            cts.CancelAfter(_o.ReceiveTimeout);
            var c = MigrationConnection.AcceptAsync(_listener, _o.Tls, _o.ReceiveTimeout, cts.Token).GetAwaiter().GetResult();
            lock (_connections)
            {
                _connections.Add(c);
            }
            c.Reader.ReadStreamHeader();
            c.Reader.Expect(SectionType.ChannelHello);
            var p = c.Reader.Payload;
            if (p.Length < 24 || new Guid(p[..16]) != hello.SessionId)
            {
                throw new StreamFormatException("an extra connection belongs to another migration session");
            }
            uint index = BinaryPrimitives.ReadUInt32LittleEndian(p[16..]);
            if (hello.DeviceChannel && index == (uint)hello.Connections && !deviceSeen)
            {
                deviceSeen = true;
                tasks.Add(Task.Factory.StartNew(() => ReceiveDeviceChannel(c, main, loader), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default));
                continue;
            }
            if (index < 1 || index >= (uint)hello.Connections || !ramSeen.Add(index))
            {
                throw new StreamFormatException($"extra connection index {index} is invalid or repeated (RAM connections 1-{hello.Connections - 1}{(hello.DeviceChannel ? $", device connection {hello.Connections}" : "")})");
            }
            loader.PageRounds.Concurrent = true;
            tasks.Add(Task.Factory.StartNew(() => ReceiveChannel(c, vm, loader), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default));
        }
        return tasks;
    }

    /// <summary>The device connection's receive loop (§4.2): device sections until ChannelEnd.</summary>
    private void ReceiveDeviceChannel(MigrationConnection c, MigrationConnection main, StateLoader loader)
    {
        double cpu0 = ThreadCpu.Milliseconds();
        try
        {
            while (true)
            {
                if (!c.Reader.ReadNext())
                {
                    throw new EndOfStreamException("the device connection closed before its end");
                }
                if (loader.HandleDeviceChannel(c.Reader, d => Reply(main, SectionType.SwitchoverAck, SectionIo.DeviceIndexPayload(d))))
                {
                    _deviceReceiveCpu = ThreadCpu.Milliseconds() - cpu0;
                    return;
                }
            }
        }
        catch (Exception e)
        {
            // Tell the source why (best effort: it may be what failed), then unblock the main loop (a RoundInfo waiting
            // for this connection, or a socket read) and the source's writers: the migration is failing.
            loader.DeviceChannelFailed(e);
            try
            {
                SendResult(main, 1, 0, 0, $"device connection: {e.Message}");
            }
            catch (Exception e2) when (e2 is IOException or ObjectDisposedException or SocketException or NotSupportedException)
            {
                // The main connection is gone too.
            }
            CloseAll();
            throw;
        }
    }

    /// <summary>A T→S section on the main connection; the main loop and the device connection's thread both reply.</summary>
    private static void Reply(MigrationConnection main, SectionType type, byte[] payload)
    {
        lock (main.Writer)
        {
            main.Writer.Write(type, payload);
            main.Writer.Flush();
        }
    }

    /// <summary>
    /// On failure: the connections are closed (so every receive thread ends soon); waits for the threads, so none
    /// writes to a device while it is reset and released. Their errors are the failure already being handled.
    /// </summary>
    private void StopReceivers()
    {
        CloseAll();
        foreach (var r in _receivers)
        {
            try
            {
                r.Wait(_o.ReceiveTimeout);
            }
            catch (AggregateException)
            {
                // Already reported through the main loop's failure.
            }
        }
    }

    private void ReceiveChannel(MigrationConnection c, Vm vm, StateLoader loader)
    {
        try
        {
            while (true)
            {
                if (!c.Reader.ReadNext())
                {
                    throw new EndOfStreamException("a RAM connection closed before its end");
                }
                if (c.Reader.Type == SectionType.ChannelEnd)
                {
                    return;
                }
                if (c.Reader.Type != SectionType.RamPages)
                {
                    throw new StreamFormatException($"unexpected {c.Reader.Type} on a RAM connection");
                }
                RamPages.Apply(vm.Memory, c.Reader.Payload, loader.PageRounds);
            }
        }
        catch
        {
            // Unblock the main loop: the migration is failing.
            CloseAll();
            throw;
        }
    }

    /// <summary>TargetResult on the main connection, at most once (the device connection's thread may fail first and tell why).</summary>
    private void SendResult(MigrationConnection main, uint status, ulong downtimeUs, ulong commitWaitUs, string? reason)
    {
        lock (main.Writer)
        {
            if (_resultSent)
            {
                return;
            }
            _resultSent = true;
            main.Writer.Write(SectionType.TargetResult, new TargetResult(status, downtimeUs, commitWaitUs, reason ?? "").ToPayload());
            main.Writer.Flush();
        }
    }

    private void Discard(Vm? vm, List<IVmDevice>? devices)
    {
        CloseAll();
        if (!_ramHandedOver)
        {
            // Consumed by this migration even when it never got as far as the VM (MigrationTargetOptions.PreallocatedMemory).
            _o.PreallocatedMemory?.Dispose();
        }
        if (vm is not null)
        {
            foreach (var d in vm.Devices)
            {
                try
                {
                    d.Reset();
                }
                catch (Exception e) when (e is IOException or MigrationException or InvalidOperationException)
                {
                    // Released below regardless.
                }
            }
            vm.Dispose();
        }
        if (devices is not null)
        {
            StateLoader.Release(devices);
        }
    }

    /// <summary>Records step <paramref name="name"/> as the µs since <paramref name="since"/>; returns now.</summary>
    private long Step(string name, long since)
    {
        long now = Stopwatch.GetTimestamp();
        _steps[name] = (long)(Stopwatch.GetElapsedTime(since, now).TotalMilliseconds * 1000);
        return now;
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
}
