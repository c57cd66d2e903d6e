using Vmig.InProcess;
using Vmig.Devices.Nvme;
using Vmig.Guest.Nvme;
using Vmig.Spec.Nvme;

using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>Secondary controllers (VFs): provisioning, isolation, namespace attachment rules, SR-IOV enable/disable.</summary>
public sealed class NvmeSubsystemTests
{

    private static NvmeDriver Init(TestGuestRam ram, NvmeDirectFunction fn, int queues = 2) =>
        NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = queues, Interrupts = true });

    [Fact]
    public void Data_written_through_a_vf_lands_in_the_namespace_file_at_the_right_offset()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        var (ram, fn) = rig.Connect(1, vectors: 5);
        var drv = Init(ram, fn, 4);
        Assert.Equal(4, drv.IoQueueCount);
        var id = drv.IdentifyController();
        Assert.Equal((ushort)1, id.Cntlid);
        Assert.Equal(0x06, id.Cmic);
        Assert.Equal(OptionalAdminCommands.DoorbellBufferConfig, id.Oacs);
        byte[] data = new byte[3 * 4096];
        new Random(7).NextBytes(data);
        ram.Write(Buf, data);
        Assert.True(drv.Write(3, rig.Nsid, 777, 24, 512, Buf).IsSuccess);
        Assert.Equal(data, rig.ReadFile(777 * 512, data.Length));
    }

    [Fact]
    public void Two_vfs_are_isolated_from_each_other()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        rig.ProvisionVf(2, attach: false);
        var (ram1, fn1) = rig.Connect(1, vectors: 5);
        var (ram2, fn2) = rig.Connect(2, vectors: 5);
        var d1 = Init(ram1, fn1);
        var d2 = Init(ram2, fn2);
        // VF2 has no namespace attached: it cannot reach VF1's data.
        Assert.Empty(d2.ActiveNamespaces());
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, d2.Read(1, rig.Nsid, 0, 1, 512, Buf));
        // Each VF's DMA goes to its own RAM only.
        byte[] data = Enumerable.Repeat((byte)0xAB, 4096).ToArray();
        ram1.Write(Buf, data);
        Assert.True(d1.Write(1, rig.Nsid, 0, 8, 512, Buf).IsSuccess);
        byte[] other = new byte[4096];
        ram2.Read(Buf, other);
        Assert.All(other, b => Assert.Equal(0, b));
        // VF2's bad input (a doorbell past its queue, a controller fatal error) leaves VF1 running.
        fn2.MmioWrite(0, (ulong)NvmeRegisters.SqTailDoorbell(0), BitConverter.GetBytes(100000u));
        Assert.False(rig.Subsystem.Secondaries[1].WithLock(s => (s.Csts & ControllerStatus.Cfs) == 0));
        Assert.True(rig.Subsystem.Secondaries[0].WithLock(s => (s.Csts & ControllerStatus.Cfs) == 0));
        Assert.True(d1.Read(2, rig.Nsid, 0, 8, 512, Buf).IsSuccess);
        // Resetting VF2 does not touch VF1.
        rig.Subsystem.Secondaries[1].Reset();
        Assert.True(d1.Read(1, rig.Nsid, 0, 8, 512, Buf).IsSuccess);
        // The same namespace attached to both is shared: NMIC reports it.
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [2]).IsSuccess);
        var d2b = Init(ram2, fn2);
        Assert.Equal(1, d2b.IdentifyNamespace(rig.Nsid).Nmic);
        Assert.True(d2b.Read(1, rig.Nsid, 0, 8, 512, Buf).IsSuccess);
        ram2.Read(Buf, other);
        Assert.Equal(data, other);
    }

    [Fact]
    public void Vf_queue_and_vector_limits_come_from_assigned_resources()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1, queues: 3, vectors: 2);
        var (ram, fn) = rig.Connect(1, vectors: 2);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 8, Interrupts = true });
        Assert.Equal(2, drv.IoQueueCount); // 3 VQ resources = admin + 2 I/O queue pairs
        ulong mem = drv.Allocate(4096);
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier,
            drv.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.CreateIoCompletionQueue, Prp1 = mem, Cdw10 = 3 | (15u << 16), Cdw11 = 1 }).Status);
        Assert.True(drv.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.DeleteIoSubmissionQueue, Cdw10 = 2 }).Status.IsSuccess);
        Assert.True(drv.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.DeleteIoCompletionQueue, Cdw10 = 2 }).Status.IsSuccess);
        Assert.Equal(NvmeStatus.InvalidInterruptVector,
            drv.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.CreateIoCompletionQueue, Prp1 = mem, Cdw10 = 2 | (15u << 16), Cdw11 = 3 | (2u << 16) }).Status);
    }

    [Fact]
    public void Offline_secondary_never_becomes_ready_and_virtualization_management_rules_hold()
    {
        using var rig = new NvmeRig();
        var sub = rig.Subsystem;
        sub.EnableVfs(2);
        var (ram, fn) = rig.Connect(1, vectors: 5);
        Assert.Throws<NvmeDriverException>(() => NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { TimeoutMs = 300 }));

        Assert.Equal(NvmeStatus.InvalidNumberOfControllerResources, sub.VirtualizationManagement(VirtualizationAction.SecondaryOnline, 0, 1, 0, out _));
        Assert.Equal(NvmeStatus.InvalidControllerIdentifier, sub.VirtualizationManagement(VirtualizationAction.SecondaryAssign, VirtualizationResource.Queue, 9, 2, out _));
        Assert.Equal(NvmeStatus.InvalidControllerIdentifier, sub.VirtualizationManagement(VirtualizationAction.SecondaryAssign, VirtualizationResource.Queue, 0, 2, out _));
        Assert.Equal(NvmeStatus.InvalidResourceIdentifier, sub.VirtualizationManagement(VirtualizationAction.SecondaryAssign, (VirtualizationResource)5, 1, 2, out _));
        Assert.Equal(NvmeStatus.InvalidNumberOfControllerResources, sub.VirtualizationManagement(VirtualizationAction.SecondaryAssign, VirtualizationResource.Queue, 1, 10, out _));
        Assert.True(sub.VirtualizationManagement(VirtualizationAction.SecondaryAssign, VirtualizationResource.Queue, 1, 4, out uint dw0).IsSuccess);
        Assert.Equal(4u, dw0);
        Assert.True(sub.VirtualizationManagement(VirtualizationAction.SecondaryAssign, VirtualizationResource.Interrupt, 1, 4, out _).IsSuccess);
        Assert.True(sub.VirtualizationManagement(VirtualizationAction.SecondaryOnline, 0, 1, 0, out _).IsSuccess);
        Assert.Equal(NvmeStatus.InvalidSecondaryControllerState, sub.VirtualizationManagement(VirtualizationAction.SecondaryAssign, VirtualizationResource.Queue, 1, 2, out _));
        Assert.Equal(NvmeStatus.InvalidField, sub.VirtualizationManagement((VirtualizationAction)0xF, 0, 1, 0, out _));
        var entry = sub.SecondaryList().Single(e => e.Scid == 1);
        Assert.Equal((true, (ushort)4, (ushort)4, (ushort)1), (entry.Online, entry.Nvq, entry.Nvi, entry.Vfn));
        Assert.Equal(4u, sub.PrimaryCapabilities().Vqrfa);

        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize);
        Assert.Equal(2, drv.IoQueueCount);
        // Taking the secondary offline resets it: its host sees RDY drop.
        Assert.True(sub.VirtualizationManagement(VirtualizationAction.SecondaryOffline, 0, 1, 0, out _).IsSuccess);
        Assert.False(sub.Secondaries[0].IsReady);
    }

    [Fact]
    public void Virtualization_management_and_attachment_through_the_primary_admin_queue()
    {
        using var rig = new NvmeRig();
        rig.Subsystem.EnableVfs(2);
        var (ram, fn) = rig.Connect(0);
        var pf = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { Interrupts = false });
        SubmissionQueueEntry Vm(VirtualizationAction a, VirtualizationResource rt, ushort cntlid, ushort n) =>
            new() { Opcode = (byte)NvmeAdminOpcode.VirtualizationManagement, Cdw10 = (uint)a | ((uint)rt << 8) | ((uint)cntlid << 16), Cdw11 = n };
        Assert.True(pf.Execute(0, Vm(VirtualizationAction.SecondaryAssign, VirtualizationResource.Queue, 2, 3)).Dw0 == 3);
        pf.Execute(0, Vm(VirtualizationAction.SecondaryAssign, VirtualizationResource.Interrupt, 2, 2));
        pf.Execute(0, Vm(VirtualizationAction.SecondaryOnline, 0, 2, 0));
        Assert.True(rig.Subsystem.Secondaries[1].Online);

        ulong list = pf.Allocate(4096);
        byte[] ids = new byte[4096];
        ControllerList.Write(ids, [2]);
        ram.Write(list, ids);
        SubmissionQueueEntry Attach(uint sel, uint nsid) => new() { Opcode = (byte)NvmeAdminOpcode.NamespaceAttachment, Nsid = nsid, Cdw10 = sel };
        Assert.True(pf.ExecuteRaw(0, Attach(0, rig.Nsid), list, 4096).Status.IsSuccess);
        Assert.Equal(NvmeStatus.NamespaceAlreadyAttached, pf.ExecuteRaw(0, Attach(0, rig.Nsid), list, 4096).Status);
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, pf.ExecuteRaw(0, Attach(0, 7), list, 4096).Status);
        Assert.Equal(NvmeStatus.InvalidField, pf.ExecuteRaw(0, Attach(5, rig.Nsid), list, 4096).Status);
        Assert.Equal([rig.Nsid], rig.Subsystem.AttachedNamespaceIds(2));

        // The VF sees the namespace; then the PF detaches it and the VF gets a Namespace Attribute Changed notice.
        var (vram, vfn) = rig.Connect(2, vectors: 2);
        var vf = NvmeDriver.Initialize(vram, vfn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2 });
        Assert.Equal([rig.Nsid], vf.ActiveNamespaces());
        vf.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.SetFeatures, Cdw10 = (uint)FeatureId.AsynchronousEventConfiguration, Cdw11 = 1 << 8 });
        ushort aer = vf.Submit(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.AsynchronousEventRequest });
        Assert.True(pf.ExecuteRaw(0, Attach(1, rig.Nsid), list, 4096).Status.IsSuccess);
        var ev = AsyncEvent.FromDw0(vf.Wait(0, aer, 2000).Dw0);
        Assert.Equal(new AsyncEvent(AsyncEventType.Notice, 0, LogPageId.ChangedNamespaceList), ev);
        ulong page = vf.Allocate(4096);
        vf.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.GetLogPage, Cdw10 = (uint)LogPageId.ChangedNamespaceList | (1023u << 16) }, page, 4096);
        Assert.Equal(rig.Nsid, vram.ReadUInt32(page));
        Assert.Empty(vf.ActiveNamespaces());
        Assert.Equal(NvmeStatus.NamespaceNotAttached, pf.ExecuteRaw(0, Attach(1, rig.Nsid), list, 4096).Status);
        // Controller list naming a controller that does not exist, or empty
        ControllerList.Write(ids, [9]);
        ram.Write(list, ids);
        Assert.Equal(NvmeStatus.ControllerListInvalid, pf.ExecuteRaw(0, Attach(0, rig.Nsid), list, 4096).Status);
        ControllerList.Write(ids, []);
        ram.Write(list, ids);
        Assert.Equal(NvmeStatus.ControllerListInvalid, pf.ExecuteRaw(0, Attach(0, rig.Nsid), list, 4096).Status);
        // Primary-only commands are invalid opcodes on a secondary.
        Assert.Equal(NvmeStatus.InvalidOpcode, vf.ExecuteRaw(0, Attach(0, rig.Nsid), page, 4096).Status);
        Assert.Equal(NvmeStatus.InvalidOpcode, vf.ExecuteRaw(0, Vm(VirtualizationAction.SecondaryOnline, 0, 1, 0)).Status);
        Assert.Equal(NvmeStatus.InvalidField, vf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.Identify, Cdw10 = 0x15 }, page, 4096).Status);
    }

    [Fact]
    public void Disabling_vfs_takes_their_secondaries_offline_and_resets_them()
    {
        using var rig = new NvmeRig();
        var seen = new List<int>();
        rig.Subsystem.VfEnableChanged += n => seen.Add(n);
        rig.ProvisionVf(1);
        rig.ProvisionVf(2);
        Assert.Equal(2, rig.Subsystem.EnabledVfs);
        Assert.NotNull(rig.Subsystem.GetVfFunction(1));
        var (ram, fn) = rig.Connect(2, vectors: 5);
        var drv = Init(ram, fn);
        Assert.True(drv.Read(1, rig.Nsid, 0, 1, 512, Buf).IsSuccess);
        // NumVFs can only change with VF Enable clear: every VF goes away, then one comes back.
        rig.Subsystem.EnableVfs(1);
        Assert.Equal([2, 0, 1], seen);
        Assert.Equal(1, rig.Subsystem.EnabledVfs);
        Assert.Null(rig.Subsystem.GetVfFunction(1));
        Assert.NotNull(rig.Subsystem.GetVfFunction(0));
        Assert.All(rig.Subsystem.Secondaries, c => Assert.False(c.Online));
        Assert.False(rig.Subsystem.Secondaries[1].IsReady);
        var sriov = rig.Subsystem.PrimaryFunction.SriovSettings;
        Assert.Equal((true, (ushort)1), (sriov.VfEnable, sriov.NumVfs));
        rig.Subsystem.EnableVfs(0);
        Assert.Equal(0, rig.Subsystem.EnabledVfs);
        Assert.False(rig.Subsystem.PrimaryFunction.SriovSettings.VfEnable);
    }

    [Fact]
    public void Namespace_files_are_validated_and_sized_from_the_file()
    {
        using var rig = new NvmeRig(lbaSize: 4096);
        Assert.Equal((ulong)(NvmeRig.NamespaceBytes / 4096), rig.Subsystem.GetNamespace(rig.Nsid)!.BlockCount);
        string small = Path.Combine(rig.Dir.FullName, "small.img");
        File.WriteAllBytes(small, new byte[100]);
        Assert.Throws<ArgumentException>(() => rig.Subsystem.AddNamespace(small, 512));
        Assert.Throws<ArgumentException>(() => rig.Subsystem.AddNamespace(rig.NamespacePath, 1024));
        Assert.Throws<ArgumentException>(() => rig.Subsystem.AddNamespace(rig.NamespacePath, 512, rig.Nsid));
        string odd = Path.Combine(rig.Dir.FullName, "odd.img");
        File.WriteAllBytes(odd, new byte[512 * 3 + 100]);
        uint nsid = rig.Subsystem.AddNamespace(odd, 512);
        Assert.Equal(2u, nsid);
        Assert.Equal(3UL, rig.Subsystem.GetNamespace(nsid)!.BlockCount);
    }

    [Fact]
    public void Namespace_management_creates_and_deletes_file_backed_namespaces_through_the_primary()
    {
        string nsDir = Path.Combine(Path.GetTempPath(), "vmig-nsmgmt-" + Guid.NewGuid().ToString("N"));
        using var rig = new NvmeRig(options: new NvmeSubsystemOptions { NamespaceDirectory = nsDir });
        try
        {
            rig.ProvisionVf(1, attach: false);
            var (pram, pfn) = rig.Connect(0);
            var pf = NvmeDriver.Initialize(pram, pfn, Region, RegionSize, new NvmeDriverOptions { Interrupts = false });
            ulong page = pf.Allocate(4096);
            byte[] idns = new byte[4096];
            new IdentifyNamespace { Nsze = 256, Ncap = 256, Flbas = 1 }.WriteTo(idns);
            pram.Write(page, idns);
            var create = new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.NamespaceManagement, Cdw10 = 0 };
            uint nsid = pf.Execute(0, create, page, 4096).Dw0;
            Assert.Equal(2u, nsid);
            Assert.Equal(256L * 4096, new FileInfo(Path.Combine(nsDir, "ns2.img")).Length);
            Assert.True(rig.Subsystem.AttachNamespace(nsid, [1]).IsSuccess);

            var (vram, vfn) = rig.Connect(1, vectors: 5);
            var vf = Init(vram, vfn);
            Assert.Equal([nsid], vf.ActiveNamespaces());
            Assert.Equal(4096, vf.IdentifyNamespace(nsid).FormattedLbaSize);
            vram.Write(Buf, Pattern(4096, 9));
            Assert.True(vf.Write(1, nsid, 255, 1, 4096, Buf).IsSuccess);
            Assert.Equal(NvmeStatus.LbaOutOfRange, vf.Write(1, nsid, 256, 1, 4096, Buf));

            Assert.True(pf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.NamespaceManagement, Cdw10 = 1, Nsid = nsid }).Status.IsSuccess);
            Assert.False(File.Exists(Path.Combine(nsDir, "ns2.img")));
            Assert.Empty(vf.ActiveNamespaces());
            Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, pf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.NamespaceManagement, Cdw10 = 1, Nsid = nsid }).Status);
            // An LBA format the controller does not offer
            new IdentifyNamespace { Nsze = 16, Flbas = 5 }.WriteTo(idns);
            pram.Write(page, idns);
            Assert.Equal(new NvmeStatus(StatusCodeType.CommandSpecific, 0x0A, Dnr: true), pf.ExecuteRaw(0, create, page, 4096).Status);
            // The namespace given by the host side (not created by command) keeps its file when deleted.
            Assert.True(rig.Subsystem.DeleteNamespace(rig.Nsid).IsSuccess);
            Assert.True(File.Exists(rig.NamespacePath));
        }
        finally
        {
            if (Directory.Exists(nsDir))
            {
                Directory.Delete(nsDir, recursive: true);
            }
        }
    }

    [Fact]
    public void Namespace_management_without_a_directory_is_refused()
    {
        using var rig = new NvmeRig();
        Assert.Equal(NvmeStatus.InvalidField, rig.Subsystem.CreateNamespace(16, 512, out _));
    }
}
