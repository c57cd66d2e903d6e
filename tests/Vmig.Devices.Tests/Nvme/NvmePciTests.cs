using System.Buffers.Binary;
using Vmig.Devices.Nvme;
using Vmig.Devices.Tests.Pci;
using Vmig.Guest.Nvme;
using Vmig.Migration;
using Vmig.Spec.Nvme;
using Vmig.Spec.Pci;
using Vmig.VfioUser.Protocol;

using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>The NVMe functions through the PCI model: config space, MSI-X, BME gating, SR-IOV, and interface-1 migration.</summary>
public sealed class NvmePciTests
{
    private const long RamSize = 16 << 20;

    private static (GuestRam Ram, InProcessPciFunction Fn) Attach(NvmeFunction f)
    {
        var ram = new GuestRam(RamSize, (int)f.Irqs[VfioPci.MsixIrqIndex].Count, iova: 0);
        f.OnAttached(ram.Context);
        return (ram, new InProcessPciFunction(f, ram.Irqs));
    }

    [Fact]
    public void Pf_and_vf_config_space_identify_an_nvme_controller_with_msix_in_bar0()
    {
        using var rig = new NvmeRig();
        var pf = rig.Subsystem.PrimaryFunction;
        byte[] cfg = new byte[64];
        pf.ReadConfig(0, cfg);
        Assert.Equal(0x1B36, BinaryPrimitives.ReadUInt16LittleEndian(cfg));
        Assert.Equal(0x5A10, BinaryPrimitives.ReadUInt16LittleEndian(cfg.AsSpan(2)));
        Assert.Equal(new byte[] { 0x02, 0x08, 0x01 }, cfg.AsSpan(9, 3).ToArray());
        Assert.Equal(0x4u, BinaryPrimitives.ReadUInt32LittleEndian(cfg.AsSpan(0x10)) & 0x7); // 64-bit memory BAR
        Assert.Equal(NvmeController.Bar0Size, (int)pf.Regions[0].Size);
        Assert.Null(pf.Migration);
        byte[] sr = new byte[4];
        pf.ReadConfig(NvmeFunction.SriovCapabilityOffset + PciSriov.TotalVfs, sr.AsSpan(0, 2));
        Assert.Equal(2, BinaryPrimitives.ReadUInt16LittleEndian(sr));
        Assert.Null(rig.Subsystem.GetVfFunction(0));
        rig.Subsystem.EnableVfs(2);
        var vf = rig.Subsystem.GetVfFunction(1)!;
        vf.ReadConfig(0, cfg);
        Assert.Equal(0x5A11, BinaryPrimitives.ReadUInt16LittleEndian(cfg.AsSpan(2)));
        Assert.NotNull(vf.Migration);
        Assert.Equal(MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, vf.Migration!.MigrationFlags);
        Assert.Equal((ushort)2, vf.Controller.Cntlid);
    }

    [Fact]
    public void Guest_driver_runs_io_on_a_vf_through_the_pci_model_with_msix()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        var (ram, fn) = Attach(rig.Subsystem.GetVfFunction(0)!);
        using var _ = ram;
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 3, Interrupts = true });
        Assert.True(rig.Subsystem.GetVfFunction(0)!.IsMsixEnabled);
        Assert.True(rig.Subsystem.GetVfFunction(0)!.IsBusMasterEnabled);
        byte[] d = Pattern(16384, 4);
        ram.Write(Buf, d);
        Assert.True(drv.Write(3, rig.Nsid, 64, 32, 512, Buf).IsSuccess);
        Assert.Equal(d, rig.ReadFile(64 * 512, d.Length));
        ram.Write(Buf, new byte[d.Length]);
        Assert.True(drv.Read(2, rig.Nsid, 64, 32, 512, Buf).IsSuccess);
        byte[] back = new byte[d.Length];
        ram.Read(Buf, back);
        Assert.Equal(d, back);
    }

    [Fact]
    public void Driver_shares_vectors_when_a_vf_has_fewer_interrupt_resources_than_msix_entries()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1, queues: 9, vectors: 3);
        var f = rig.Subsystem.GetVfFunction(0)!;
        var (ram, fn) = Attach(f);
        using var _ = ram;
        Assert.Equal(9, fn.MsixVectorCount);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 8 });
        Assert.Equal(8, drv.IoQueueCount);
        Assert.All(f.Controller.WithLock(s => s.Cqs.Where(c => c is not null).Select(c => c!.Vector).ToList()), v => Assert.True(v < 3));
        for (int q = 1; q <= 8; q++)
        {
            Assert.True(drv.Read(q, rig.Nsid, (ulong)q, 1, 512, Buf).IsSuccess);
        }
    }

    [Fact]
    public void Clearing_bus_master_enable_stops_all_dma_and_the_controller_reports_fatal_status()
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = Attach(rig.Subsystem.PrimaryFunction);
        using var _ = ram;
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, Interrupts = false });
        byte[] cmd = new byte[2];
        fn.ReadConfig(PciConfig.Command, cmd);
        BinaryPrimitives.WriteUInt16LittleEndian(cmd, (ushort)(BinaryPrimitives.ReadUInt16LittleEndian(cmd) & ~PciConfig.CommandBusMaster));
        fn.WriteConfig(PciConfig.Command, cmd);
        ram.Write(Buf, Pattern(512, 1));
        Assert.Throws<NvmeDriverException>(() => drv.Wait(1, drv.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, rig.Nsid, 0, 1), Buf, 512), 200));
        Assert.Equal(new byte[512], rig.ReadFile(0, 512));
        byte[] csts = new byte[4];
        fn.MmioRead(0, NvmeRegisters.Csts, csts);
        Assert.Equal((uint)ControllerStatus.Cfs, BinaryPrimitives.ReadUInt32LittleEndian(csts) & 2);
    }

    [Fact]
    public void Function_level_reset_of_a_vf_resets_its_controller_only()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        rig.ProvisionVf(2);
        var (ram1, fn1) = Attach(rig.Subsystem.GetVfFunction(0)!);
        var (ram2, fn2) = Attach(rig.Subsystem.GetVfFunction(1)!);
        using var r1 = ram1;
        using var r2 = ram2;
        var d1 = NvmeDriver.Initialize(ram1, fn1, Region, RegionSize);
        NvmeDriver.Initialize(ram2, fn2, Region, RegionSize);
        rig.Subsystem.GetVfFunction(1)!.FunctionLevelReset();
        Assert.False(rig.Subsystem.Secondaries[1].IsReady);
        Assert.True(rig.Subsystem.Secondaries[0].IsReady);
        Assert.True(d1.Read(1, rig.Nsid, 0, 8, 512, Buf).IsSuccess);
    }

    private static byte[] Drain(IMigrationDevice m)
    {
        var ms = new MemoryStream();
        byte[] b = new byte[4096];
        int n;
        while ((n = m.ReadData(b)) > 0)
        {
            ms.Write(b, 0, n);
            if (n < b.Length)
            {
                break;
            }
        }
        return ms.ToArray();
    }

    [Fact]
    public void Vf_migration_driver_moves_a_running_vf_through_the_vfio_arcs()
    {
        using var src = new NvmeRig();
        src.ProvisionVf(1);
        var sf = src.Subsystem.GetVfFunction(0)!;
        var (ramA, fnA) = Attach(sf);
        using var ra = ramA;
        var drvA = NvmeDriver.Initialize(ramA, fnA, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2 });
        var m = sf.Migration!;

        // PRE_COPY: only the early compatibility header.
        m.Step(DeviceState.Running, DeviceState.PreCopy);
        var info = m.GetPrecopyInfo();
        Assert.True(info.InitialBytes > 0);
        byte[] pre = Drain(m);
        Assert.Equal((int)info.InitialBytes, pre.Length);
        Assert.Equal(0UL, m.GetPrecopyInfo().InitialBytes);
        m.Step(DeviceState.PreCopy, DeviceState.PreCopyP2P);
        // Writes submitted after the P2P quiesce but before stop are fetched or travel: none may be lost.
        var cids = new List<(ushort, int)>();
        for (int i = 0; i < 4; i++)
        {
            ramA.Write(Buf + (ulong)(i * 512), Pattern(512, 20 + i));
            cids.Add((drvA.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, src.Nsid, 300 + (ulong)i, 1), Buf + (ulong)(i * 512), 512), i));
        }
        Assert.True(m.GetStopCopySize() > 16UL);
        m.Step(DeviceState.PreCopyP2P, DeviceState.StopCopy);
        byte[] rest = Drain(m);
        m.Step(DeviceState.StopCopy, DeviceState.Stop);

        using var dst = new NvmeRig(sharedNamespacePath: src.NamespacePath);
        dst.ProvisionVf(1);
        var tf = dst.Subsystem.GetVfFunction(0)!;
        var (ramB, fnB) = Attach(tf);
        using var rb = ramB;
        ramA.View.GetSpan(0, (int)RamSize).CopyTo(ramB.View.GetSpan(0, (int)RamSize));
        var tm = tf.Migration!;
        tm.Step(DeviceState.Running, DeviceState.RunningP2P);
        tm.Step(DeviceState.RunningP2P, DeviceState.Stop);
        tm.Step(DeviceState.Stop, DeviceState.Resuming);
        tm.WriteData(pre);
        tm.WriteData(rest.AsSpan(0, 7));
        tm.WriteData(rest.AsSpan(7));
        tm.Step(DeviceState.Resuming, DeviceState.Stop);
        tm.Step(DeviceState.Stop, DeviceState.RunningP2P);
        tm.Step(DeviceState.RunningP2P, DeviceState.Running);

        // The VF's config space (BME, MSI-X) came with the stream.
        Assert.True(tf.IsBusMasterEnabled);
        Assert.True(tf.IsMsixEnabled);
        var drvB = NvmeDriver.Attach(ramB, new InProcessPciFunction(tf, ramB.Irqs), Region);
        foreach (var (cid, i) in cids)
        {
            Assert.True(drvB.Wait(1, cid, 2000).Status.IsSuccess);
            Assert.Equal(Pattern(512, 20 + i), src.ReadFile((300 + i) * 512, 512));
        }
        ramB.Write(Buf, Pattern(512, 77));
        Assert.True(drvB.Write(2, dst.Nsid, 5, 1, 512, Buf).IsSuccess);
        Assert.Equal(Pattern(512, 77), src.ReadFile(5 * 512, 512));
    }

    [Fact]
    public void Incompatible_target_is_refused_at_the_header_before_any_state_moves()
    {
        using var src = new NvmeRig();
        src.ProvisionVf(1);
        var m = src.Subsystem.GetVfFunction(0)!.Migration!;
        m.Step(DeviceState.Running, DeviceState.PreCopy);
        byte[] pre = Drain(m);

        using var dst = new NvmeRig(lbaSize: 4096);
        dst.ProvisionVf(1);
        var tm = dst.Subsystem.GetVfFunction(0)!.Migration!;
        tm.Step(DeviceState.Running, DeviceState.RunningP2P);
        tm.Step(DeviceState.RunningP2P, DeviceState.Stop);
        tm.Step(DeviceState.Stop, DeviceState.Resuming);
        var e = Assert.Throws<MigrationException>(() => tm.WriteData(pre));
        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Contains("LBA format", e.Message);
        Assert.Throws<MigrationException>(() => tm.Step(DeviceState.Resuming, DeviceState.Stop));
        Assert.False(dst.Subsystem.Secondaries[0].IsReady);
        Assert.Equal(true, dst.Subsystem.Migration.IsSuspended(1));

        // A foreign stream is refused at its first record; a stream with no state cannot commit.
        dst.ProvisionVf(2);
        var tm2 = dst.Subsystem.GetVfFunction(1)!.Migration!;
        tm2.Step(DeviceState.Running, DeviceState.RunningP2P);
        tm2.Step(DeviceState.RunningP2P, DeviceState.Stop);
        tm2.Step(DeviceState.Stop, DeviceState.Resuming);
        Assert.Contains("not an NVMe", Assert.Throws<MigrationException>(() => tm2.WriteData(new byte[32])).Message);
        tm2.Step(DeviceState.Stop, DeviceState.Resuming);
        Assert.Contains("no controller state", Assert.Throws<MigrationException>(() => tm2.Step(DeviceState.Resuming, DeviceState.Stop)).Message);
    }

    [Fact]
    public void Memory_change_tracking_on_the_primary_reports_exactly_the_pages_the_vf_wrote()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        var (ram, fn) = Attach(rig.Subsystem.GetVfFunction(0)!);
        using var _ = ram;
        var vf = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, ShadowDoorbells = false });
        ulong cq1 = ram.ReadUInt64(Region + NvmeDriverState.OffQueues + NvmeDriverState.QueueDescSize + NvmeDriverState.QCqBase);

        var (pram, pfn) = Attach(rig.Subsystem.PrimaryFunction);
        using var pr = pram;
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var pf = NvmeDriver.Initialize(pram, pfn, Region, RegionSize, new NvmeDriverOptions { Interrupts = false });
        var start = new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.TrackSend, Cdw10 = 1 | (1u << 16), Cdw11 = 1 };
        Assert.True(pf.ExecuteRaw(0, start).Status.IsSuccess);
        Assert.Equal(NvmeStatus.CommandSequenceError, pf.ExecuteRaw(0, start).Status);

        // The VF reads 8 KiB: the device writes two buffer pages and one CQ entry; writing to the disk writes no guest page.
        Assert.True(vf.Read(1, rig.Nsid, 0, 16, 512, Buf + 0x3000).IsSuccess);
        ram.Write(Buf + 0x8000, Pattern(512, 1));
        Assert.True(vf.Write(1, rig.Nsid, 0, 1, 512, Buf + 0x8000).IsSuccess);

        ulong page = pf.Allocate(4096);
        var recv = new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.TrackReceive, Cdw11 = 1, Cdw15 = 1023 };
        pf.Execute(0, recv, page, 4096);
        byte[] b = new byte[4096];
        pram.Read(page, b);
        Assert.True(TrackedMemoryChangesHeader.TryRead(b, out var h));
        Assert.Equal((ushort)1, h.Cntlid);
        Assert.False(h.More);
        var runs = Enumerable.Range(0, (int)h.Ntmcd).Select(i =>
        {
            TrackedMemoryChange.TryRead(b.AsSpan(16 + (16 * i)), out var r);
            return r;
        }).OrderBy(r => r.Saddr).ToList();
        var expected = new[] { new TrackedMemoryChange(Buf + 0x3000, 2), new TrackedMemoryChange(cq1, 1) }.OrderBy(r => r.Saddr).ToList();
        Assert.Equal(expected, runs);

        // Read-and-clear: nothing new since.
        pf.Execute(0, recv, page, 4096);
        pram.Read(page, b);
        Assert.True(TrackedMemoryChangesHeader.TryRead(b, out h));
        Assert.Equal(0u, h.Ntmcd);
        // A buffer too small for all runs keeps the rest for the next call.
        Assert.True(vf.Read(1, rig.Nsid, 0, 1, 512, Buf + 0x20000).IsSuccess);
        Assert.True(vf.Read(1, rig.Nsid, 0, 1, 512, Buf + 0x40000).IsSuccess);
        pf.Execute(0, recv with { Cdw15 = (32 / 4) - 1 }, page, 32);
        pram.Read(page, b.AsSpan(0, 32));
        Assert.True(TrackedMemoryChangesHeader.TryRead(b, out h));
        Assert.Equal((1u, true), (h.Ntmcd, h.More));
        var rest = new List<TrackedMemoryChange>();
        Assert.True(rig.Subsystem.Migration.ReceiveTrackedChanges(1, 16, rest, out bool more).IsSuccess);
        Assert.False(more);
        Assert.Equal(2, rest.Count);

        // The host agent's driver API (interface 2) issues the same Track Send / Track Receive commands.
        Assert.Equal(NvmeStatus.CommandSequenceError, pf.TrackSecondaryMemory(1, start: true)); // already started
        Assert.True(vf.Read(1, rig.Nsid, 0, 16, 512, Buf + 0x3000).IsSuccess);
        Assert.Equal(expected, pf.ReceiveSecondaryMemoryChanges(1).OrderBy(r => r.Saddr).ToList());
        Assert.Empty(pf.ReceiveSecondaryMemoryChanges(1));

        Assert.True(pf.ExecuteRaw(0, start with { Cdw10 = 1 }).Status.IsSuccess);
        Assert.True(pf.TrackSecondaryMemory(1, start: true).IsSuccess);
        Assert.True(pf.TrackSecondaryMemory(1, start: false).IsSuccess);
        Assert.Equal((NvmeStatus?)NvmeStatus.CommandSequenceError, Assert.Throws<NvmeDriverException>(() => pf.ReceiveSecondaryMemoryChanges(1)).Status);
        Assert.Equal(NvmeStatus.CommandSequenceError, pf.ExecuteRaw(0, recv, page, 4096).Status);
        Assert.Equal(NvmeStatus.InvalidControllerIdentifier, pf.ExecuteRaw(0, start with { Cdw11 = 7 }).Status);
        Assert.Equal(NvmeStatus.InvalidField, pf.ExecuteRaw(0, start with { Cdw10 = 5 }).Status);
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, pf.ExecuteRaw(0, start with { Cdw10 = 1u << 16 }).Status); // SEL 0 names a CDQ that does not exist
    }
}
