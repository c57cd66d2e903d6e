using Vmig.Devices.Accelerator;
using Vmig.Devices.Tests.Nvme;
using Vmig.Guest;
using Vmig.Guest.Accelerator;
using Vmig.Guest.Nvme;
using Vmig.Migration;
using Vmig.Native;
using Vmig.Spec.Accelerator;
using Vmig.Spec.Nvme;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;
using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests;

/// <summary>
/// Issue 9 item 5, isolation: through its VF socket and its DMA windows a guest cannot read or change another VF's
/// data or device memory, the PF, or its own migration state. Every VF is served on its own real vfio-user socket
/// (as `vmig host` serves them); each test drives one VF the way a guest (driver over MMIO + DMA) or its VMM
/// (the socket) can, and checks the other function or the hidden state did not move.
/// </summary>
public sealed class IsolationTests() : SocketTestScope("vmig-isolation-")
{
    private const long RamSize = 16 << 20;
    private const ulong ForeignIova = 0x4000_0000;

    /// <summary>Accelerator PF with two VFs, each on its own socket, each VF's guest RAM mapped into its DMA window.</summary>
    private (AcceleratorPf Pf, VfioUserClient[] Clients, TestGuestRam[] Rams, ClientPciFunction[] Fns) TwoAccelVfs()
    {
        var pf = Own(new AcceleratorPf(2, AcceleratorProfile.Create(1 << 20, 64)));
        pf.EnableVfs(2);
        var clients = new VfioUserClient[2];
        var rams = new TestGuestRam[2];
        var fns = new ClientPciFunction[2];
        for (int i = 0; i < 2; i++)
        {
            clients[i] = Serve(pf.GetVf(i), $"accel-vf{i}");
            rams[i] = Own(new TestGuestRam(RamSize));
            fns[i] = Own(new ClientPciFunction(clients[i], rams[i]));
            new Random(10 + i).NextBytes(pf.GetVf(i).Memory.GetSpan(0, 1 << 20));
        }
        return (pf, clients, rams, fns);
    }

    /// <summary>An NVMe subsystem with two provisioned VFs (CNTLID 1, 2) on the shared namespace, each on its own socket with its own guest RAM.</summary>
    private (NvmeRig Rig, VfioUserClient C1, VfioUserClient C2, TestGuestRam Ram1, TestGuestRam Ram2, ClientPciFunction Fn1, ClientPciFunction Fn2) TwoNvmeVfs()
    {
        var rig = Own(new NvmeRig(vfs: 2));
        rig.ProvisionVf(1);
        rig.ProvisionVf(2);
        var c1 = Serve(rig.Subsystem.GetVfFunction(0)!, "nvme-vf0");
        var c2 = Serve(rig.Subsystem.GetVfFunction(1)!, "nvme-vf1");
        var ram1 = Own(new TestGuestRam(RamSize));
        var ram2 = Own(new TestGuestRam(RamSize));
        return (rig, c1, c2, ram1, ram2, Own(new ClientPciFunction(c1, ram1)), Own(new ClientPciFunction(c2, ram2)));
    }

    [Fact]
    public void AcceleratorVf_jobs_cannot_reach_device_memory_beyond_their_own_vf()
    {
        var (pf, _, rams, fns) = TwoAccelVfs();
        byte[] vf0Before = pf.GetVf(0).Memory.GetSpan(0, 1 << 20).ToArray();
        var drv = AcceleratorDriver.Initialize(rams[1], fns[1], 0x10_0000, 16);
        // VF 1's device memory is [0, 1 MiB). Every job that reaches past it — where another VF's memory would sit in
        // a flat device address space — is refused, and nothing of VF 0 is read or written.
        rams[1].Write(0x20_0000, new byte[4096]);
        foreach (var job in new[]
        {
            new AcceleratorJob(AcceleratorOpcode.CopyFromDevice, 0, 1, 0x20_0000, 1 << 20, 4096),
            new AcceleratorJob(AcceleratorOpcode.CopyFromDevice, 0, 2, 0x20_0000, (1 << 20) - 8, 16),
            new AcceleratorJob(AcceleratorOpcode.CopyToDevice, 0, 3, 0x20_0000, 1 << 20, 4096),
            new AcceleratorJob(AcceleratorOpcode.Fill, 0, 4, 0, (1 << 20) - 8, 4096, 0xDEAD_BEEF),
            new AcceleratorJob(AcceleratorOpcode.Crc32C, 0, 5, 0x20_0000, 2 << 20, 4096),
            new AcceleratorJob(AcceleratorOpcode.CopyFromDevice, 0, 6, 0x20_0000, ulong.MaxValue - 100, 4096),
        })
        {
            Assert.Equal(AcceleratorJobStatus.DeviceRangeError, drv.Run(job).Status);
        }
        var back = new byte[4096];
        rams[1].Read(0x20_0000, back);
        Assert.All(back, b => Assert.Equal(0, b));
        Assert.True(pf.GetVf(0).Memory.GetSpan(0, 1 << 20).SequenceEqual(vf0Before), "VF 0's device memory changed");
        // The same VF still works inside its own memory.
        Assert.Equal(AcceleratorJobStatus.Success, drv.Run(new AcceleratorJob(AcceleratorOpcode.CopyFromDevice, 0, 7, 0x20_0000, 0, 4096)).Status);
    }

    [Fact]
    public void AcceleratorVf_dma_cannot_use_a_window_mapped_only_for_another_vf()
    {
        var (pf, clients, rams, fns) = TwoAccelVfs();
        // VF 0's VMM maps a second window (a "secret" memfd) at ForeignIova; VF 1 has nothing there.
        using var secretFd = MemFd.Create("secret", 1 << 20);
        using var secret = Mapping.Map(secretFd, 0, 1 << 20);
        new Random(77).NextBytes(secret.GetSpan(0, 1 << 20));
        byte[] secretBefore = secret.GetSpan(0, 1 << 20).ToArray();
        clients[0].DmaMap(ForeignIova, 1 << 20, secretFd, 0, DmaProt.Read | DmaProt.Write);
        byte[] vf1MemBefore = pf.GetVf(1).Memory.GetSpan(0, 1 << 20).ToArray();

        var drv = AcceleratorDriver.Initialize(rams[1], fns[1], 0x10_0000, 16);
        Assert.Equal(AcceleratorJobStatus.GuestAddressFault, drv.Run(new AcceleratorJob(AcceleratorOpcode.CopyToDevice, 0, 1, ForeignIova, 0, 4096)).Status);
        Assert.Equal(AcceleratorJobStatus.GuestAddressFault, drv.Run(new AcceleratorJob(AcceleratorOpcode.CopyFromDevice, 0, 2, ForeignIova, 0, 4096)).Status);
        Assert.Equal(AcceleratorJobStatus.GuestAddressFault, drv.Run(new AcceleratorJob(AcceleratorOpcode.Crc32C, 0, 3, ForeignIova, 0, 4096)).Status);
        Assert.True(secret.GetSpan(0, 1 << 20).SequenceEqual(secretBefore), "VF 1 wrote into VF 0's window");
        Assert.True(pf.GetVf(1).Memory.GetSpan(0, 1 << 20).SequenceEqual(vf1MemBefore), "VF 1 read VF 0's window into its memory");

        // Control: VF 0 itself can use that window.
        var drv0 = AcceleratorDriver.Initialize(rams[0], fns[0], 0x10_0000, 16);
        Assert.Equal(AcceleratorJobStatus.Success, drv0.Run(new AcceleratorJob(AcceleratorOpcode.CopyToDevice, 0, 1, ForeignIova, 0, 4096)).Status);
        Assert.True(pf.GetVf(0).Memory.GetSpan(0, 4096).SequenceEqual(secretBefore.AsSpan(0, 4096)));
    }

    [Fact]
    public void AcceleratorVf_socket_cannot_reach_its_hidden_migration_registers()
    {
        var (pf, clients, rams, fns) = TwoAccelVfs();
        var c = clients[0];
        // The region is only the guest part; the hidden part behind it refuses reads and writes.
        Assert.Equal(AcceleratorIds.VfRegisterVisibleSize, c.GetRegionInfo(AcceleratorIds.VfRegisterBar).Size);
        var cmd = BitConverter.GetBytes((uint)AcceleratorMigrationCommand.SuspendResponder);
        foreach (int off in new[] { AcceleratorMigrationRegister.Command, AcceleratorMigrationRegister.Status, AcceleratorMigrationRegister.DirtyPages })
        {
            Assert.ThrowsAny<Exception>(() => c.WriteRegion(AcceleratorIds.VfRegisterBar, (ulong)off, cmd));
            Assert.ThrowsAny<Exception>(() => c.ReadRegion(AcceleratorIds.VfRegisterBar, (ulong)off, new byte[4]));
        }
        // Nor through any other region index (BAR1-5, ROM, VGA).
        foreach (int r in new[] { 1, 3, 4, 5, 6, 8 })
        {
            Assert.ThrowsAny<Exception>(() => c.WriteRegion(r, 0, cmd));
        }
        Assert.Equal(0u, pf.GetVf(0).ReadHiddenRegister(AcceleratorMigrationRegister.Status)); // not suspended, not tracking
        var drv = AcceleratorDriver.Initialize(rams[0], fns[0], 0x10_0000, 16);
        Assert.Equal(AcceleratorJobStatus.Success, drv.Run(new AcceleratorJob(AcceleratorOpcode.Fill, 0, 1, 0, 0, 4096, 1)).Status);
    }

    [Fact]
    public void Vf_socket_migration_ops_change_only_its_own_function()
    {
        var (pf, clients, rams, fns) = TwoAccelVfs();
        byte[] vf1Mem = pf.GetVf(1).Memory.GetSpan(0, 1 << 20).ToArray();
        var drv1 = AcceleratorDriver.Initialize(rams[1], fns[1], 0x10_0000, 16);

        // VF 0's socket: stop the device, read its whole state, then reset it (all the migration ops the socket has).
        clients[0].StartDirtyLogging(4096, [(0UL, (ulong)RamSize)]);
        clients[0].SetState(DeviceState.StopCopy);
        var saved = new MemoryStream();
        var buf = new byte[1 << 20];
        int n;
        do
        {
            n = clients[0].ReadMigrationData(buf);
            saved.Write(buf, 0, n);
        }
        while (n == buf.Length);

        // VF 1 is untouched: running, not logging, still serving jobs, its memory unchanged.
        Assert.Equal(DeviceState.Running, clients[1].GetState());
        Assert.Equal(0u, pf.GetVf(1).ReadHiddenRegister(AcceleratorMigrationRegister.Status));
        Assert.Equal(AcceleratorJobStatus.Success, drv1.Run(new AcceleratorJob(AcceleratorOpcode.Crc32C, 0, 1, 0x20_0000, 0, 1 << 20)).Status);
        Assert.Equal(Vmig.Spec.Crc32C.Compute(vf1Mem), rams[1].ReadUInt32(0x20_0000));
        Assert.True(pf.GetVf(1).Memory.GetSpan(0, 1 << 20).SequenceEqual(vf1Mem));

        // The state read through VF 0's socket is VF 0's: loaded into a fresh VF it gives VF 0's memory, not VF 1's.
        var other = Own(new AcceleratorPf(1, AcceleratorProfile.Create(1 << 20, 64)));
        other.EnableVfs(1);
        var dst = Serve(other.GetVf(0), "accel-dst");
        dst.SetState(DeviceState.Resuming);
        dst.WriteMigrationData(saved.ToArray());
        dst.SetState(DeviceState.Stop);
        Assert.True(other.GetVf(0).Memory.GetSpan(0, 1 << 20).SequenceEqual(pf.GetVf(0).Memory.GetSpan(0, 1 << 20)));
        Assert.False(other.GetVf(0).Memory.GetSpan(0, 1 << 20).SequenceEqual(vf1Mem));
        clients[0].Reset();
        Assert.Equal(DeviceState.Running, clients[1].GetState());
    }

    [Fact]
    public void Vf_state_never_passes_through_its_own_dma_window()
    {
        // The VF's migration data go to its VMM through the socket (MIG_DATA_READ), never into guest memory: a full
        // save of a VF whose device memory holds a marker leaves every byte of the guest's DMA window as it was.
        var (pf, clients, rams, _) = TwoAccelVfs();
        pf.GetVf(0).Memory.GetSpan(0, 1 << 20).Fill(0x5A);
        byte[] before = new byte[RamSize];
        rams[0].Read(0, before);
        clients[0].SetState(DeviceState.PreCopy);
        var buf = new byte[256 << 10];
        while (clients[0].ReadMigrationData(buf) > 0)
        {
        }
        clients[0].SetState(DeviceState.StopCopy);
        long total = 0;
        int n;
        while ((n = clients[0].ReadMigrationData(buf)) > 0)
        {
            total += n;
        }
        byte[] after = new byte[RamSize];
        rams[0].Read(0, after);
        Assert.True(before.AsSpan().SequenceEqual(after), "the save wrote into the guest's DMA window");
    }

    [Fact]
    public void NvmeVf_cannot_read_or_write_a_namespace_attached_only_to_another_vf()
    {
        using var rig = new NvmeRig(vfs: 2);
        rig.ProvisionVf(1);
        rig.ProvisionVf(2, attach: false);
        string ns2Path = Path.Combine(rig.Dir.FullName, "ns2.img");
        using (var f = File.Create(ns2Path))
        {
            f.SetLength(1 << 20);
        }
        uint ns2 = rig.Subsystem.AddNamespace(ns2Path);
        Assert.True(rig.Subsystem.AttachNamespace(ns2, [2]).IsSuccess);
        byte[] secret = Pattern(4096, 5);
        File.WriteAllBytes(ns2Path, [.. secret, .. new byte[(1 << 20) - 4096]]);

        var c1 = Serve(rig.Subsystem.GetVfFunction(0)!, "nvme-vf0");
        var ram = Own(new TestGuestRam(RamSize));
        var fn = Own(new ClientPciFunction(c1, ram));
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1 });
        ram.Write(Buf, new byte[4096]);
        var st = drv.Read(1, ns2, 0, 8, 512, Buf);
        Assert.False(st.IsSuccess);
        Assert.Equal(Vmig.Spec.Nvme.NvmeStatus.InvalidNamespaceOrFormat.Sc, st.Sc);
        var back = new byte[4096];
        ram.Read(Buf, back);
        Assert.All(back, b => Assert.Equal(0, b));
        ram.Write(Buf, Pattern(4096, 9));
        Assert.False(drv.Write(1, ns2, 0, 8, 512, Buf).IsSuccess);
        Assert.Equal(secret, File.ReadAllBytes(ns2Path)[..4096]);
        // Its own namespace works.
        Assert.True(drv.Write(1, rig.Nsid, 0, 8, 512, Buf).IsSuccess);
    }

    [Fact]
    public void NvmeVf_dma_cannot_use_a_window_mapped_only_for_another_vf()
    {
        var (rig, c1, _, _, ram2, _, fn2) = TwoNvmeVfs();
        using var secretFd = MemFd.Create("secret", 1 << 20);
        using var secret = Mapping.Map(secretFd, 0, 1 << 20);
        new Random(4).NextBytes(secret.GetSpan(0, 1 << 20));
        byte[] secretBefore = secret.GetSpan(0, 1 << 20).ToArray();
        c1.DmaMap(ForeignIova, 1 << 20, secretFd, 0, DmaProt.Read | DmaProt.Write);
        byte[] disk = rig.ReadFile(0, 4096);

        var drv2 = NvmeDriver.Initialize(ram2, fn2, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1 });
        // Write: the device would read the data from ForeignIova (VF 1's window). Read: it would write there.
        var w = drv2.Write(1, rig.Nsid, 0, 8, 512, ForeignIova);
        var r = drv2.Read(1, rig.Nsid, 0, 8, 512, ForeignIova);
        Assert.Equal(Vmig.Spec.Nvme.NvmeStatus.DataTransferError, w with { Dnr = false, More = false });
        Assert.Equal(Vmig.Spec.Nvme.NvmeStatus.DataTransferError, r with { Dnr = false, More = false });
        Assert.Equal(disk, rig.ReadFile(0, 4096));
        Assert.True(secret.GetSpan(0, 1 << 20).SequenceEqual(secretBefore), "VF 2 wrote into VF 1's window");
        // Control: the same I/O from VF 2's own window works.
        ram2.Write(Buf, Pattern(4096, 3));
        Assert.True(drv2.Write(1, rig.Nsid, 0, 8, 512, Buf).IsSuccess);
        Assert.Equal(Pattern(4096, 3), rig.ReadFile(0, 4096));
    }

    [Fact]
    public void Vf_socket_cannot_reach_or_change_the_pf()
    {
        // The PF is served on its own (host-only) socket as `vmig host` does; the VF's socket is all a VM gets.
        var pf = Own(new AcceleratorPf(2, AcceleratorProfile.Create(1 << 20, 64)));
        var pfClient = Serve(pf, "accel-pf");
        pf.EnableVfs(2);
        var vf0 = Serve(pf.GetVf(0), "accel-vf0");
        var vf1 = Serve(pf.GetVf(1), "accel-vf1");
        byte[] pfConfig = new byte[4096];
        pfClient.ReadRegion(VfioPci.ConfigRegionIndex, 0, pfConfig);
        byte[] vf1Config = new byte[4096];
        vf1.ReadRegion(VfioPci.ConfigRegionIndex, 0, vf1Config);

        // The VF's config space has no SR-IOV capability: nothing in it names the PF's VF controls.
        byte[] vfConfig = new byte[4096];
        vf0.ReadRegion(VfioPci.ConfigRegionIndex, 0, vfConfig);
        for (int off = 0x100, hops = 0; off != 0 && hops < 64; hops++)
        {
            uint header = BitConverter.ToUInt32(vfConfig, off);
            Assert.NotEqual(0x10u, header & 0xFFFF); // PCI_EXT_CAP_ID_SRIOV
            off = (int)(header >> 20) & 0xFFC;
        }

        // A hostile VMM/guest writes all-ones over every dword of its VF's config space (errors ignored)...
        var ones = new byte[] { 0xFF, 0xFF, 0xFF, 0xFF };
        for (int off = 0; off < 4096; off += 4)
        {
            try
            {
                vf0.WriteRegion(VfioPci.ConfigRegionIndex, (ulong)off, ones);
            }
            catch (Exception e) when (e is VfioUser.VfioUserException or IOException)
            {
                // Refused writes are fine; what matters is what changed elsewhere.
            }
        }
        // ...and the PF and the other VF are untouched: same config bytes, same VF count, VF 1 still answers.
        byte[] pfAfter = new byte[4096];
        pfClient.ReadRegion(VfioPci.ConfigRegionIndex, 0, pfAfter);
        Assert.Equal(pfConfig, pfAfter);
        Assert.Equal(2, pf.Vfs.Count);
        byte[] vf1After = new byte[4096];
        vf1.ReadRegion(VfioPci.ConfigRegionIndex, 0, vf1After);
        Assert.Equal(vf1Config, vf1After);
        Assert.Equal(DeviceState.Running, vf1.GetState());
        // The VF socket carries no way to name another function: its device id is the VF's, its regions the VF's.
        Assert.Equal(AcceleratorIds.VfDeviceId, BitConverter.ToUInt16(vfConfig, 2));
        Assert.Equal(AcceleratorIds.VfRegisterVisibleSize, vf0.GetRegionInfo(0).Size);
    }

    [Fact]
    public void NvmeVf_socket_migration_ops_change_only_its_own_controller()
    {
        var (rig, c1, c2, ram1, ram2, fn1, fn2) = TwoNvmeVfs();
        // VF 1 without shadow doorbells: a running device's shadow-doorbell poller may write EventIdx into guest RAM at
        // any moment (it arms once idle), which would blur the check below that the save writes nothing there.
        var drv1 = NvmeDriver.Initialize(ram1, fn1, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, ShadowDoorbells = false });
        var drv2 = NvmeDriver.Initialize(ram2, fn2, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1 });
        ram1.Write(Buf, Pattern(4096, 1));
        Assert.True(drv1.Write(1, rig.Nsid, 0, 8, 512, Buf).IsSuccess);

        // VF 1's socket: dirty logging, STOP_COPY, its whole state read out (the PF's admin commands run underneath).
        byte[] ram1Before = new byte[RamSize];
        ram1.Read(0, ram1Before);
        c1.StartDirtyLogging(4096, [(0UL, (ulong)RamSize)]);
        c1.SetState(DeviceState.StopCopy);
        var buf = new byte[1 << 20];
        long total = 0;
        int n;
        while ((n = c1.ReadMigrationData(buf)) > 0)
        {
            total += n;
        }
        Assert.True(total > 0);
        // The controller state went to the VMM through the socket, not through the guest's own DMA window.
        byte[] ram1After = new byte[RamSize];
        ram1.Read(0, ram1After);
        Assert.True(ram1Before.AsSpan().SequenceEqual(ram1After), "the save wrote into VF 1's guest RAM");

        // VF 2 is untouched: RUNNING, and its guest's I/O goes on while VF 1 is stopped.
        Assert.Equal(DeviceState.Running, c2.GetState());
        for (int i = 0; i < 4; i++)
        {
            ram2.Write(Buf, Pattern(4096, 20 + i));
            Assert.True(drv2.Write(1, rig.Nsid, (ulong)(64 + (i * 8)), 8, 512, Buf).IsSuccess);
            Assert.Equal(Pattern(4096, 20 + i), rig.ReadFile((64 + (i * 8)) * 512, 4096));
        }
        // Back to RUNNING through its own socket, VF 1 serves its guest again.
        c1.SetState(DeviceState.Running);
        ram1.Write(Buf, Pattern(4096, 2));
        Assert.True(drv1.Write(1, rig.Nsid, 8, 8, 512, Buf).IsSuccess);
    }

    [Fact]
    public void NvmeVf_admin_queue_cannot_manage_namespaces_controllers_or_migrations()
    {
        // The controlling-function commands (namespace management/attachment, virtualization management, the NVMe live
        // migration commands Track/Migration Send/Receive and Controller Data Queue, Format) exist on the PF only: a
        // guest on VF 1 submitting them against VF 2 (CNTLID 2), the PF (CNTLID 0) or a namespace gets an error, and
        // nothing changes.
        var (rig, c1, c2, ram1, ram2, fn1, fn2) = TwoNvmeVfs();
        var drv1 = NvmeDriver.Initialize(ram1, fn1, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1 });
        var drv2 = NvmeDriver.Initialize(ram2, fn2, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1 });
        ram1.Write(Buf, new byte[4096]);
        var commands = new (NvmeAdminOpcode Op, uint Nsid, uint Cdw10, uint Cdw11)[]
        {
            (NvmeAdminOpcode.NamespaceAttachment, rig.Nsid, 1, 0),          // detach the namespace (controller list in the buffer)
            (NvmeAdminOpcode.NamespaceManagement, 0, 0, 0),                 // create a namespace
            (NvmeAdminOpcode.NamespaceManagement, rig.Nsid, 1, 0),          // delete the shared namespace
            (NvmeAdminOpcode.VirtualizationManagement, 0, 0x7 | (2u << 16), 0), // take CNTLID 2 offline
            (NvmeAdminOpcode.MigrationSend, 0, 0, 2),                       // suspend CNTLID 2
            (NvmeAdminOpcode.MigrationReceive, 0, 0, 2),                    // read CNTLID 2's state
            (NvmeAdminOpcode.TrackSend, 0, 0, 2),                           // start tracking for CNTLID 2
            (NvmeAdminOpcode.ControllerDataQueue, 0, 0, 2),
            (NvmeAdminOpcode.FormatNvm, rig.Nsid, 0, 0),
        };
        foreach (var (op, nsid, cdw10, cdw11) in commands)
        {
            ushort cid = drv1.Submit(0, new SubmissionQueueEntry { Opcode = (byte)op, Nsid = nsid, Cdw10 = cdw10, Cdw11 = cdw11 }, Buf, 4096);
            var st = drv1.Wait(0, cid, 5000).Status;
            // Refused as an opcode the VF does not have, not by a field check a better-formed command could pass.
            Assert.True(st with { Dnr = false, More = false } == NvmeStatus.InvalidOpcode with { Dnr = false }, $"{op} on a VF: {st}");
        }
        // VF 2 still runs and still reaches the namespace; VF 1 still owns its own I/O.
        Assert.Equal(DeviceState.Running, c2.GetState());
        ram2.Write(Buf, Pattern(4096, 7));
        Assert.True(drv2.Write(1, rig.Nsid, 128, 8, 512, Buf).IsSuccess);
        Assert.Equal(Pattern(4096, 7), rig.ReadFile(128 * 512, 4096));
        ram1.Write(Buf, Pattern(4096, 8));
        Assert.True(drv1.Write(1, rig.Nsid, 256, 8, 512, Buf).IsSuccess);
    }
}
