using System.Net;
using System.Net.Sockets;
using Vmig.Migration;
using Vmig.Vmm.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Tests;

/// <summary>Device data on its own connection, concurrently with RAM (stream 2.2, docs/stream-format.md §4.2).</summary>
public sealed class DeviceChannelTests : IDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);

    public DeviceChannelTests() => _listener.Start();

    public void Dispose()
    {
        _listener.Stop();
        _listener.Dispose();
    }

    private static VmConfig TargetGuest() => new() { Programs = TestVms.Registry() };

    /// <summary>32 MiB VM, RAM above 8 MiB filled with random bytes (round 1 is large), dirtier at 1-5 MiB.</summary>
    private static Vm BusyVm(params IVmDevice[] devices)
    {
        var vm = TestVms.Dirtier(32, "gpa=1M,size=4M,rate=20", devices);
        var fill = new byte[TestVms.MiB];
        for (ulong m = 8; m < 32; m++)
        {
            Random.Shared.NextBytes(fill);
            vm.Memory.Write(m * TestVms.MiB, fill);
        }
        return vm;
    }

    [Theory]
    [InlineData(true)]  // device data on its own connection, concurrently with RAM
    [InlineData(false)] // device data after RAM on the main connection (as with a 2.0/2.1 target)
    public async Task RamAndDeviceData_OnConcurrentConnectionsOrOne_TargetIsByteIdentical(bool deviceConnection)
    {
        var slog = new List<string>();
        var a = new FakeDevice("a", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, slog, dmaGpa: 0x2000);
        var b = new FakeDevice("b", MigrationFlags.StopCopy, slog, dmaGpa: 0x5000);
        Random.Shared.NextBytes(a.Bar0);
        Random.Shared.NextBytes(b.Bar0);
        using var src = BusyVm(a, b);
        src.Start();
        TestVms.WaitUntil(() => a.Counter > 10 && src.Vcpus[0].Slices > 10);
        var targets = new Dictionary<string, FakeDevice>();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => targets[d.Name] = new FakeDevice(d.Name, d.MigrationFlags, [], dmaGpa: 0x7000),
            new MigrationTargetOptions { StartVcpus = false });
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint,
            new MigrationOptions { MaxRounds = 4, DeviceDataConnection = deviceConnection, ParallelConnections = deviceConnection ? 2 : 1 });
        using var dst = await target;

        Assert.Equal("completed", report.Outcome);
        Assert.Equal(deviceConnection, report.DeviceDataConnection);
        Assert.True(report.BytesBySection["DeviceData"] > 0, report.ToJson());
        // All of RAM but the page the target's devices DMA to since they run (0x7000).
        Assert.True(src.Memory.GetHostSpan(0, 0x7000).SequenceEqual(dst.Memory.GetHostSpan(0, 0x7000)), "RAM differs below 0x7000");
        int rest = (int)(32 * TestVms.MiB) - 0x8000;
        Assert.True(src.Memory.GetHostSpan(0x8000, rest).SequenceEqual(dst.Memory.GetHostSpan(0x8000, rest)), "RAM differs above 0x8000");
        Assert.Equal(a.Bar0, targets["a"].Bar0);
        Assert.Equal(b.Bar0, targets["b"].Bar0);
        Assert.True(targets["a"].Counter >= a.Counter);
        Assert.Equal(a.Counter, dst.Memory.ReadUInt64(0x2000));
        Assert.Equal(b.Counter, dst.Memory.ReadUInt64(0x5000));
        Assert.Contains("a:Running->PreCopy", slog);
        TestVms.PauseAndVerify(dst);
    }

    [Theory]
    [InlineData(true)]  // the source device's MIG_DATA_READ fails: the source's device-send thread
    [InlineData(false)] // the target device's MIG_DATA_WRITE fails: the target's device-receive side
    public async Task DeviceFailsOnTheDeviceConnection_MigrationAbortsAndTheSourceKeepsRunning(bool onSource)
    {
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, [], dmaGpa: 0x3000) { FailSaveRead = onSource };
        using var src = BusyVm(dev);
        src.Start();
        FakeDevice? t = null;
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => t = new FakeDevice(d.Name, d.MigrationFlags, [], dmaGpa: 0x7000) { FailLoadWrite = !onSource });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 3 }));
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.True(e.Report.DeviceDataConnection);
        var te = await Assert.ThrowsAsync<VmMigrationException>(() => target);
        Assert.Equal("failed", te.Report.Outcome);
        // Each side names the root cause, not the connection cut that followed it.
        Assert.Contains(onSource ? "injected save read failure" : "injected load write failure", onSource ? e.Report.Error : te.Report.Error, StringComparison.Ordinal);
        Assert.True(t!.Disposed && t.ResetCount > 0);
        AssertSourceRunsOn(src, dev);
    }

    [Fact]
    public async Task RamConnectionCut_WhileDeviceDataFlowsOnItsOwnConnection_SourceRollsBack()
    {
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, [], dmaGpa: 0x3000);
        using var src = BusyVm(dev);
        src.Start();
        var deviceTypes = new List<SectionType>();
        var mainTypes = new List<SectionType>();
        var fake = Task.Run(() =>
        {
            using var s = _listener.AcceptSocket();
            using var ns = new NetworkStream(s);
            var r = new SectionReader(ns, 4 << 20);
            r.ReadStreamHeader();
            r.Expect(SectionType.VmDescription);
            Assert.True(MigrationHello.Parse(r.Payload).DeviceChannel);
            var w = new SectionWriter(ns);
            w.WriteStreamHeader(); // 2.2: the source opens the device connection
            w.Write(SectionType.HandshakeReply, SectionIo.StatusPayload(0, null));
            w.Flush();
            using var ds = _listener.AcceptSocket();
            var drain = Task.Run(() =>
            {
                using var dns = new NetworkStream(ds);
                var dr = new SectionReader(dns, 4 << 20);
                dr.ReadStreamHeader();
                try
                {
                    while (dr.ReadNext())
                    {
                        deviceTypes.Add(dr.Type);
                    }
                }
                catch (IOException)
                {
                    // The source closed it when the main connection failed.
                }
            });
            for (int n = 0; n < 5 && r.ReadNext();)
            {
                mainTypes.Add(r.Type);
                n += r.Type == SectionType.RamPages ? 1 : 0;
            }
            s.LingerState = new LingerOption(true, 0); // RST: a cut, not a clean close
            s.Close();
            drain.Wait(TimeSpan.FromSeconds(30));
        });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 3 }));
        await fake;
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.Equal(SectionType.ChannelHello, deviceTypes[0]);
        Assert.Contains(SectionType.DeviceData, deviceTypes);
        Assert.DoesNotContain(SectionType.DeviceData, mainTypes);
        AssertSourceRunsOn(src, dev);
    }

    [Fact]
    public async Task TargetOlderThan22_DeviceDataStaysOnTheMainConnectionAndNoDeviceConnectionIsOpened()
    {
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy, [], dmaGpa: 0x3000);
        Random.Shared.NextBytes(dev.Bar0);
        using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20", [dev]);
        src.Start();
        var types = new List<SectionType>();
        bool extraConnection = true;
        var fake = Task.Run(() =>
        {
            using var s = _listener.AcceptSocket();
            using var ns = new NetworkStream(s);
            var (r, _) = MigrationTests.AcceptHandshake(ns); // a 2.0 target: it ignores the DeviceChannel request
            while (r.ReadNext())
            {
                types.Add(r.Type);
                if (r.Type == SectionType.EndOfState)
                {
                    break;
                }
            }
            // The source opens every connection before pre-copy: one it opened would wait in the backlog.
            extraConnection = _listener.Pending();
            // Closing without TargetReady: the source rolls back.
        });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 2 }));
        await fake;
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.False(e.Report.DeviceDataConnection);
        Assert.False(extraConnection, "the source opened a device connection to a target older than 2.2");
        Assert.Contains(SectionType.DeviceData, types);
        Assert.InRange(types.IndexOf(SectionType.DeviceEnd), 0, types.IndexOf(SectionType.EndOfState));
        AssertSourceRunsOn(src, dev);
    }

    [Fact]
    public async Task SourceDeviceThrowsInvalidOperationInTheCleanupAfterCommit_MigrationStillCompletes()
    {
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, [], dmaGpa: 0x3000) { FailStopAfterStopCopy = true };
        using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20", [dev]);
        src.Start();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => new FakeDevice(d.Name, d.MigrationFlags, [], dmaGpa: 0x7000),
            new MigrationTargetOptions { StartVcpus = false });
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 3 });
        using var dst = await target;
        // The target runs the VM: the source's cleanup error is recorded, never reported as "in doubt" or a failure.
        Assert.Equal("completed", report.Outcome);
        Assert.Equal(VmRunState.MigratedAway, src.State);
        Assert.Contains("injected: adapter refuses STOP", report.CleanupError, StringComparison.Ordinal);
        TestVms.PauseAndVerify(dst);
    }

    [Fact]
    public void Hello_DeviceChannelRoundTripsAndDefaultsToFalseForAnOlderSource()
    {
        var vm = new VmDescription("v", 4096, [], []);
        var h = MigrationHello.Parse(new MigrationHello(Guid.NewGuid(), 2, vm, DeviceChannel: true).ToUtf8());
        Assert.True(h.DeviceChannel);
        // A 2.1 source's VmDescription has no DeviceChannel member.
        var old = MigrationHello.Parse("""{"SessionId":"7d7a6c1e-0000-0000-0000-000000000001","Connections":1,"Vm":{"Name":"v","MemorySize":4096,"Vcpus":[],"Devices":[]}}"""u8);
        Assert.False(old.DeviceChannel);
    }

    private static void AssertSourceRunsOn(Vm src, FakeDevice dev)
    {
        Assert.Equal(VmRunState.Running, src.State);
        Assert.Equal(DeviceState.Running, dev.GetState());
        long s0 = src.Vcpus[0].Slices;
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > s0 + 5);
        ulong c0 = dev.Counter;
        TestVms.WaitUntil(() => dev.Counter > c0 + 3); // the source device DMAs again
        TestVms.PauseAndVerify(src);
    }
}
