using Vmig.Devices.Nvme;
using Vmig.Guest;
using Vmig.Guest.Nvme;
using Vmig.Migration;
using Vmig.Spec.Nvme;
using Vmig.VfioUser;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Server;
using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>
/// The shadow-doorbell poller follows the function's life: it polls again when a vfio-user client reconnects to a
/// controller that kept its Doorbell Buffer Config, it polls on a migration target once the VF is RUNNING, and it parks
/// the moment the VF leaves RUNNING (so it does not compete for CPU with the VMM's stop-copy), leaving EventIdx armed.
/// Over real sockets.
/// </summary>
public sealed class NvmePollerLifecycleTests
{
    private const int Lba = 512;

    /// <summary>
    /// Fewer MMIO doorbells than this for 50 QD1 reads means the poller fetched some of them: with no poller every read
    /// rings. Not lower: on a loaded 2-core machine the poller's 0.5 ms idle window can lapse between reads (as in
    /// NvmePollingTests' after-wake-up burst).
    /// </summary>
    private const int PolledBurstDoorbellLimit = 50;

    /// <summary>Secondary controller 1 of a fresh subsystem, served as VF 0 on a real vfio-user socket.</summary>
    private sealed class ServedVf : IDisposable
    {
        public ServedVf(string? sharedNamespacePath = null)
        {
            Rig = new NvmeRig(sharedNamespacePath: sharedNamespacePath);
            Rig.ProvisionVf(1);
            SocketPath = Path.Combine(Path.GetTempPath(), $"vmig-nvpl-{Guid.NewGuid():N}"[..24] + ".sock");
            Server = new VfioUserServer(Rig.Subsystem.GetVfFunction(0)!, SocketPath);
            Server.Start();
        }

        public NvmeRig Rig { get; }
        public VfioUserServer Server { get; }
        public string SocketPath { get; }
        public NvmeController Controller => Rig.Subsystem.GetController(1)!;

        private readonly List<IDisposable> _clients = [];

        /// <summary>Connects a client for <paramref name="ram"/> (kept until disposal); its guest view counts doorbells.</summary>
        public DoorbellCounter Connect(TestGuestRam ram, out VfioUserClient client)
        {
            client = VfioUserClient.Connect(SocketPath);
            var fn = new ClientPciFunction(client, ram);
            _clients.Add(client);
            _clients.Add(fn);
            return new DoorbellCounter(fn);
        }

        /// <summary>
        /// A first client brings the driver up (shadow doorbells, one poll queue), reads once and disconnects; returns
        /// when the server has detached it. The controller keeps its state, Doorbell Buffer Config included.
        /// </summary>
        public void BringUpAndDisconnect(TestGuestRam ram)
        {
            using (var client = VfioUserClient.Connect(SocketPath))
            using (var fn = new ClientPciFunction(client, ram))
            {
                var drv = PolledShadowDriver(ram, fn);
                Assert.True(drv.UsesShadowDoorbells);
                Assert.True(Controller.ShadowPollingActive);
                for (int i = 0; i < 20; i++)
                {
                    Assert.True(drv.Read(1, Rig.Nsid, (ulong)i, 1, Lba, Buf).IsSuccess);
                }
            }
            Assert.True(SpinWait.SpinUntil(() => !Server.HasClient, 5000), "the server still has the first client");
        }

        public void Dispose()
        {
            for (int i = _clients.Count - 1; i >= 0; i--)
            {
                _clients[i].Dispose();
            }
            Server.Dispose();
            Rig.Dispose();
        }
    }

    private static NvmeDriver PolledShadowDriver(TestGuestRam ram, IGuestPciFunction fn) =>
        NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, PollQueues = 1, ShadowDoorbells = true });

    [Fact]
    public void A_client_reconnecting_to_a_controller_with_shadow_doorbells_gets_its_poller_back()
    {
        using var vf = new ServedVf();
        var rig = vf.Rig;
        var ctrl = vf.Controller;
        using var ram = new TestGuestRam(16 << 20);
        vf.BringUpAndDisconnect(ram);
        // The client is gone: the device was detached (no guest memory, so no poller thread).
        Assert.Null(ctrl.ShadowPollerThreadName);
        Assert.False(ctrl.ShadowPollingActive);
        Assert.True(ctrl.IsReady);

        // Same guest, new connection (e.g. the VMM restarted its vfio-user client): the controller was not reset and
        // still has its shadow doorbell and EventIdx buffers.
        var fn2 = vf.Connect(ram, out _);
        var drv2 = NvmeDriver.Attach(ram, fn2, Region);
        Assert.True(drv2.UsesShadowDoorbells);
        // Attached, memory mapped, but not polled yet: polling before the client's DMA_MAP would have failed the
        // controller, so the poller waits for the host to show its memory is there.
        Assert.NotNull(ctrl.ShadowPollerThreadName);
        Assert.False(ctrl.ShadowPollingActive);

        // The first command after the reconnect rings (the detached controller left EventIdx armed) and brings the
        // poller back; the controller did not fail by polling before the client's DMA_MAP.
        ram.Write(Buf, Pattern(Lba, 5));
        Assert.True(drv2.Write(1, rig.Nsid, 300, 1, Lba, Buf).IsSuccess);
        Assert.Equal(Pattern(Lba, 5), rig.ReadFile(300L * Lba, Lba));
        Assert.True(ctrl.ShadowPollingActive);
        Assert.Equal(0, ctrl.WithLock(s => (int)s.Csts & 2)); // CSTS.CFS
        AssertBurstIsPolled(drv2, fn2, rig.Nsid);
    }

    [Fact]
    public void A_vf_migrated_with_shadow_doorbells_polls_on_the_target_once_running_and_not_while_stopped()
    {
        using var srcVf = new ServedVf();
        var src = srcVf.Rig;
        using var srcClient = VfioUserClient.Connect(srcVf.SocketPath);
        using var ramA = new TestGuestRam(16 << 20);
        using var fnA = new ClientPciFunction(srcClient, ramA);
        var drvA = PolledShadowDriver(ramA, fnA);
        var srcCtrl = srcVf.Controller;
        for (int i = 0; i < 20; i++)
        {
            ramA.Write(Buf, Pattern(Lba, i));
            Assert.True(drvA.Write(1, src.Nsid, (ulong)i, 1, Lba, Buf).IsSuccess);
        }
        Assert.True(srcCtrl.ShadowPollingActive);

        using var dstVf = new ServedVf(src.NamespacePath);
        var dst = dstVf.Rig;
        var dstCtrl = dstVf.Controller;
        using var ramB = new TestGuestRam(16 << 20);
        var fnB = dstVf.Connect(ramB, out var dstClient);

        // Source: the poller stops as soon as the VF leaves RUNNING, before the VMM's stop-copy starts.
        srcClient.SetState(DeviceState.RunningP2P);
        Assert.False(srcCtrl.ShadowPollingActive);
        srcClient.SetState(DeviceState.Stop);
        Assert.False(srcCtrl.ShadowPollingActive);
        // Submitted while the source is stopped (the EventIdx left armed makes the driver ring; a suspended controller
        // only records the tail): it travels in the SQ and runs on the target.
        ramA.Write(Buf, Pattern(Lba, 61));
        ushort late = drvA.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, src.Nsid, 61, 1), Buf, Lba, tag: 61);
        srcClient.SetState(DeviceState.StopCopy);
        byte[] stream = ReadAll(srcClient);
        srcClient.SetState(DeviceState.Stop);
        ramB.CopyFrom(ramA);

        dstClient.SetState(DeviceState.Resuming);
        dstClient.WriteMigrationData(stream);
        dstClient.SetState(DeviceState.Stop);
        Assert.False(dstCtrl.ShadowPollingActive);
        dstClient.SetState(DeviceState.RunningP2P);
        Assert.False(dstCtrl.ShadowPollingActive);
        dstClient.SetState(DeviceState.Running);
        Assert.True(dstCtrl.ShadowPollingActive);

        var drvB = NvmeDriver.Attach(ramB, fnB, Region);
        Assert.True(drvB.UsesShadowDoorbells);
        Assert.Equal(61UL, drvB.Wait(1, late, 2000).Tag);
        Assert.Equal(Pattern(Lba, 61), dst.ReadFile(61L * Lba, Lba));
        Assert.True(drvB.Read(1, dst.Nsid, 7, 1, Lba, Buf + 0x10000).IsSuccess);
        var back = new byte[Lba];
        ramB.Read(Buf + 0x10000, back);
        Assert.Equal(Pattern(Lba, 7), back);
        AssertBurstIsPolled(drvB, fnB, dst.Nsid);
    }

    [Fact]
    public void A_vf_out_of_running_rings_every_doorbell_and_back_to_running_after_a_cancelled_migration_polls_again()
    {
        using var vf = new ServedVf();
        var rig = vf.Rig;
        var ctrl = vf.Controller;
        using var ram = new TestGuestRam(16 << 20);
        var fn = vf.Connect(ram, out var client);
        var drv = PolledShadowDriver(ram, fn);
        Assert.True(drv.Read(1, rig.Nsid, 0, 1, Lba, Buf).IsSuccess);

        client.SetState(DeviceState.RunningP2P);
        Assert.False(ctrl.ShadowPollingActive);
        // RUNNING_P2P is still a running device: commands work, but with the poller parked EventIdx is armed, so every
        // one rings its MMIO doorbell (a poller parked with EventIdx one behind would leave them unseen: timeouts).
        long rings = fn.DoorbellWrites;
        for (int i = 0; i < 10; i++)
        {
            Assert.True(drv.Read(1, rig.Nsid, (ulong)i, 1, Lba, Buf).IsSuccess);
        }
        Assert.True(fn.DoorbellWrites - rings >= 10, $"{fn.DoorbellWrites - rings} doorbells for 10 reads in RUNNING_P2P");
        client.SetState(DeviceState.Stop);
        Assert.False(ctrl.ShadowPollingActive);
        client.SetState(DeviceState.RunningP2P);
        Assert.False(ctrl.ShadowPollingActive);
        client.SetState(DeviceState.Running);
        Assert.True(ctrl.ShadowPollingActive);
        AssertBurstIsPolled(drv, fn, rig.Nsid);
    }

    [Fact]
    public void A_command_queued_through_the_shadow_page_without_a_doorbell_runs_when_the_vf_leaves_running()
    {
        using var vf = new ServedVf();
        var rig = vf.Rig;
        using var ram = new TestGuestRam(16 << 20);
        vf.BringUpAndDisconnect(ram);

        // Reattached and not yet polling (no doorbell seen), the host queues a write through the shadow page and its
        // doorbell is lost: the state a source is in when the host wrote its shadow tail just before EventIdx was armed.
        var fn2 = vf.Connect(ram, out var client2);
        fn2.Swallow = true;
        var drv2 = NvmeDriver.Attach(ram, fn2, Region);
        ram.Write(Buf, Pattern(Lba, 9));
        drv2.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, rig.Nsid, 90, 1), Buf, Lba, tag: 9);
        Thread.Sleep(20);
        Assert.False(drv2.TryTakeAnyCompletion(1, out _));

        // Leaving RUNNING arms EventIdx and looks once more: the write runs here, before the function stops, instead
        // of travelling in the SQ to the target (where it would run inside the downtime).
        client2.SetState(DeviceState.RunningP2P);
        Assert.True(drv2.TryTakeAnyCompletion(1, out var c));
        Assert.Equal(9UL, c.Tag);
        Assert.True(c.Status.IsSuccess);
        Assert.Equal(Pattern(Lba, 9), rig.ReadFile(90L * Lba, Lba));
    }

    [Fact]
    public void Admin_commands_do_not_wake_an_idle_poller_into_its_spin_phase()
    {
        // Only I/O queues have shadow doorbells. A resumed guest's Identify (inside the VMM's downtime) woke the poller
        // into 0.5 ms of spinning and yielding next to the VMM; an admin doorbell now leaves a blocked poller blocked.
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var drv = PolledShadowDriver(ram, fn);
        string name = rig.Subsystem.Primary.ShadowPollerThreadName!;
        Thread.Sleep(NvmeController.PollerIdleMicroseconds / 1000 + 200); // past the idle window: armed and blocked
        double cpu0 = NvmePollingTests.ThreadCpuSeconds(name);
        var sw = System.Diagnostics.Stopwatch.StartNew();
        int commands = 0;
        while (sw.ElapsedMilliseconds < 600)
        {
            Assert.True(drv.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.GetFeatures, Cdw10 = (uint)FeatureId.Arbitration }).Status.IsSuccess);
            commands++;
            Thread.Sleep(1);
        }
        double used = NvmePollingTests.ThreadCpuSeconds(name) - cpu0;
        // Woken by each, the poller would spin/yield ~0.5 ms per ~1.1 ms cycle: ~0.25 s of CPU. Blocked: none.
        Assert.True(used < 0.06, $"the poller used {used:F3} s of CPU over {commands} admin commands");
    }

    /// <summary>50 QD1 reads right after the previous command do not all need an MMIO doorbell: a poller fetched some.</summary>
    private static void AssertBurstIsPolled(NvmeDriver drv, DoorbellCounter fn, uint nsid)
    {
        long rings = fn.DoorbellWrites;
        for (int i = 0; i < 50; i++)
        {
            Assert.True(drv.Read(1, nsid, (ulong)i, 1, Lba, Buf).IsSuccess);
        }
        long used = fn.DoorbellWrites - rings;
        Assert.True(used < PolledBurstDoorbellLimit, $"{used} MMIO doorbells for 50 reads: the shadow doorbells are not being polled");
    }

    private static byte[] ReadAll(VfioUserClient client)
    {
        var all = new List<byte>();
        var buf = new byte[65536];
        int n;
        while ((n = client.ReadMigrationData(buf)) > 0)
        {
            all.AddRange(buf.AsSpan(0, n).ToArray());
        }
        return [.. all];
    }

    /// <summary>Counts BAR0 writes at or above 0x1000 (doorbells), and drops them if told to; everything else passes through.</summary>
    private sealed class DoorbellCounter(IGuestPciFunction inner) : IGuestPciFunction
    {
        private long _doorbellWrites;

        public long DoorbellWrites => Interlocked.Read(ref _doorbellWrites);

        /// <summary>Drop doorbell writes (counted, never delivered): a host whose ring is lost.</summary>
        public bool Swallow { get; set; }

        public int MsixVectorCount => inner.MsixVectorCount;

        public void ReadConfig(int offset, Span<byte> data) => inner.ReadConfig(offset, data);

        public void WriteConfig(int offset, ReadOnlySpan<byte> data) => inner.WriteConfig(offset, data);

        public void MmioRead(int bar, ulong offset, Span<byte> data) => inner.MmioRead(bar, offset, data);

        public void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data)
        {
            if (bar == 0 && offset >= 0x1000)
            {
                Interlocked.Increment(ref _doorbellWrites);
                if (Swallow)
                {
                    return;
                }
            }
            inner.MmioWrite(bar, offset, data);
        }

        public bool WaitInterrupt(int vector, int timeoutMs) => inner.WaitInterrupt(vector, timeoutMs);
    }
}
