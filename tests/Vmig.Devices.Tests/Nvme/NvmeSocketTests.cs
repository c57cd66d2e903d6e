using Vmig.Guest;
using Vmig.Guest.Nvme;
using Vmig.Migration;
using Vmig.Native;
using Vmig.Spec.Nvme;
using Vmig.VfioUser;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;
using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>A guest's view of a function through a vfio-user client over a real UNIX socket (MSI-X = eventfds sent with SET_IRQS).</summary>
internal sealed class ClientPciFunction : IGuestPciFunction, IDisposable
{
    private readonly VfioUserClient _client;
    private readonly EventFd[] _vectors;

    public ClientPciFunction(VfioUserClient client, TestGuestRam ram)
    {
        _client = client;
        client.DmaMap(0, ram.Size, ram.Fd, 0, DmaProt.Read | DmaProt.Write);
        _vectors = new EventFd[client.GetIrqInfo(VfioPci.MsixIrqIndex).Count];
        for (int i = 0; i < _vectors.Length; i++)
        {
            _vectors[i] = EventFd.Create();
        }
        client.SetIrqEventFds(VfioPci.MsixIrqIndex, 0, _vectors);
    }

    public int MsixVectorCount => _vectors.Length;
    public void ReadConfig(int offset, Span<byte> data) => _client.ReadRegion(VfioPci.ConfigRegionIndex, (ulong)offset, data);
    public void WriteConfig(int offset, ReadOnlySpan<byte> data) => _client.WriteRegion(VfioPci.ConfigRegionIndex, (ulong)offset, data);
    public void MmioRead(int bar, ulong offset, Span<byte> data) => _client.ReadRegion(bar, offset, data);
    public void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data) => _client.WriteRegion(bar, offset, data);
    public bool WaitInterrupt(int vector, int timeoutMs) => _vectors[vector].Wait(timeoutMs) > 0;

    public void Dispose()
    {
        foreach (var v in _vectors)
        {
            v.Dispose();
        }
    }
}

/// <summary>NVMe VFs served on real vfio-user sockets: guest driver I/O and a VF migration with the SDK's DeviceMigrator.</summary>
public sealed class NvmeSocketTests
{
    private static string SocketPath() => Path.Combine(Path.GetTempPath(), $"vmig-nvme-{Guid.NewGuid():N}"[..24] + ".sock");

    [Fact]
    public void Vf_io_and_migration_over_vfio_user_sockets_keep_every_acknowledged_write()
    {
        using var src = new NvmeRig();
        src.ProvisionVf(1);
        string sp = SocketPath();
        using var srcServer = new VfioUserServer(src.Subsystem.GetVfFunction(0)!, sp);
        srcServer.Start();
        using var srcClient = VfioUserClient.Connect(sp);
        using var ramA = new TestGuestRam(16 << 20);
        using var fnA = new ClientPciFunction(srcClient, ramA);
        var drvA = NvmeDriver.Initialize(ramA, fnA, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2 });
        for (int i = 0; i < 8; i++)
        {
            ramA.Write(Buf + (ulong)(i * 4096), Pattern(4096, i));
            Assert.True(drvA.Write(1 + (i % 2), src.Nsid, (ulong)(i * 16), 8, 512, Buf + (ulong)(i * 4096)).IsSuccess);
        }
        // Completed by the device, not yet reaped by the guest, when the VM stops:
        ramA.Write(Buf + 0x40000, Pattern(4096, 50));
        ushort unreaped = drvA.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, src.Nsid, 900, 8), Buf + 0x40000, 4096, tag: 50);
        ushort aer = drvA.Submit(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.AsynchronousEventRequest });

        using var dst = new NvmeRig(sharedNamespacePath: src.NamespacePath);
        dst.ProvisionVf(1);
        string dp = SocketPath();
        using var dstServer = new VfioUserServer(dst.Subsystem.GetVfFunction(0)!, dp);
        dstServer.Start();
        using var dstClient = VfioUserClient.Connect(dp);
        using var ramB = new TestGuestRam(16 << 20);
        using var fnB = new ClientPciFunction(dstClient, ramB);
        ramB.CopyFrom(ramA); // the VMM's RAM migration (the guest is idle)

        var report = DeviceMigrator.Migrate(srcClient, dstClient);
        Assert.True(report.PreCopyBytes > 0); // the compatibility header went early
        Assert.Equal(DeviceState.Stop, srcClient.GetState());
        Assert.Equal(DeviceState.Running, dstClient.GetState());

        var drvB = NvmeDriver.Attach(ramB, fnB, Region);
        var c = drvB.Wait(1, unreaped, 2000);
        Assert.Equal(50UL, c.Tag);
        Assert.Equal(Pattern(4096, 50), src.ReadFile(900 * 512, 4096));
        for (int i = 0; i < 8; i++)
        {
            Assert.Equal(Pattern(4096, i), src.ReadFile(i * 16 * 512, 4096));
        }
        // The outstanding AER moved too: an error event on the target completes it.
        fnB.MmioWrite(0, (ulong)NvmeRegisters.SqTailDoorbell(9), BitConverter.GetBytes(1u));
        Assert.Equal(AsyncEventType.ErrorStatus, AsyncEvent.FromDw0(drvB.Wait(0, aer, 2000).Dw0).Type);
        ramB.Write(Buf, Pattern(4096, 99));
        Assert.True(drvB.Write(2, dst.Nsid, 2000, 8, 512, Buf).IsSuccess);
        ramB.Write(Buf, new byte[4096]);
        Assert.True(drvB.Read(1, dst.Nsid, 2000, 8, 512, Buf).IsSuccess);
        byte[] back = new byte[4096];
        ramB.Read(Buf, back);
        Assert.Equal(Pattern(4096, 99), back);
    }

    [Fact]
    public void Vf_dma_logging_goes_through_the_primary_track_commands_and_reports_exactly_the_pages_the_secondary_wrote()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        string sp = SocketPath();
        using var server = new VfioUserServer(rig.Subsystem.GetVfFunction(0)!, sp);
        server.Start();
        using var client = VfioUserClient.Connect(sp);
        using var ram = new TestGuestRam(16 << 20);
        using var fn = new ClientPciFunction(client, ram);
        // No shadow doorbells: then the device's only writes to guest memory are read data and completion entries.
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, ShadowDoorbells = false });
        for (int i = 0; i < 4; i++)
        {
            ram.Write(Buf, Pattern(8192, i));
            Assert.True(drv.Write(1, rig.Nsid, (ulong)(i * 16), 16, 512, Buf).IsSuccess);
        }
        var primary = rig.Subsystem.Migration;

        Assert.Equal(4096UL, client.StartDirtyLogging(4096, []));
        // The VF's DMA_LOGGING_START became Track Send / Track Memory Changes on the primary: a host agent's own start
        // for the same secondary is refused as already started.
        Assert.Equal(NvmeStatus.CommandSequenceError, primary.TrackMemoryChanges(1, start: true));
        Assert.Equal(Errno.EBUSY, Assert.Throws<VfioUserException>(() => client.StartDirtyLogging(4096, [])).Errno);

        // The guest writes RAM itself (SQ entries, its own bookkeeping): not the device, so not tracked.
        ram.Write(Buf + 0x200000, Pattern(4096, 7));
        ulong[] targets = [Buf + 0x10000, Buf + 0x30000, Buf + 0x80000];
        Assert.True(drv.Read(1, rig.Nsid, 0, 8, 512, targets[0]).IsSuccess);          // one page
        Assert.True(drv.Read(1, rig.Nsid, 16, 16, 512, targets[1]).IsSuccess);        // two pages
        Assert.True(drv.Read(1, rig.Nsid, 32, 8, 512, targets[2] + 2048).IsSuccess); // straddles two pages
        ulong cqBase = ram.ReadUInt64(drv.StateGpa + NvmeDriverState.OffQueues + NvmeDriverState.QueueDescSize + NvmeDriverState.QCqBase);
        var expected = new SortedSet<ulong> { targets[0], targets[1], targets[1] + 4096, targets[2], targets[2] + 4096, cqBase & ~4095UL };

        // A report of one range leaves the pages outside it pending for a later report.
        var part = client.ReportDirty(targets[1], 8192, 4096);
        Assert.Equal([targets[1], targets[1] + 4096], part.EnumerateDirtyPages().ToArray());
        var rest = client.ReportDirty(0, ram.Size, 4096);
        expected.Remove(targets[1]);
        expected.Remove(targets[1] + 4096);
        Assert.Equal(expected.ToArray(), rest.EnumerateDirtyPages().ToArray());
        Assert.Equal(0UL, client.ReportDirty(0, ram.Size, 4096).Count()); // read and cleared

        // Folded to a larger page size: 64 KiB pages holding the written 4 KiB pages.
        Assert.True(drv.Read(1, rig.Nsid, 0, 8, 512, targets[2]).IsSuccess);
        var folded = client.ReportDirty(0, ram.Size, 65536);
        Assert.Equal(new[] { cqBase & ~65535UL, targets[2] & ~65535UL }.Distinct().Order().ToArray(), folded.EnumerateDirtyPages().ToArray());

        // One 8-page run across a 64-page bitmap word (Buf is 256 KiB aligned: pages 60-67 of its block), reported in
        // two ranges that split it at the word boundary.
        ulong across = Buf + (60 * 4096);
        Assert.True(drv.Read(1, rig.Nsid, 0, 64, 512, across).IsSuccess);
        ulong[] Pages(ulong from, int n) => Enumerable.Range(0, n).Select(i => from + (ulong)(i * 4096)).ToArray();
        Assert.Equal(Pages(Buf + (64 * 4096), 4), client.ReportDirty(Buf + (64 * 4096), 4 * 4096, 4096).EnumerateDirtyPages().ToArray());
        Assert.Equal(Pages(across, 4).Append(cqBase & ~4095UL).Order().ToArray(), client.ReportDirty(0, ram.Size, 4096).EnumerateDirtyPages().ToArray());

        client.StopDirtyLogging();
        // Stopped on the primary too: Track Receive for the secondary has nothing started.
        Assert.Equal(NvmeStatus.CommandSequenceError, primary.ReceiveTrackedChanges(1, 16, [], out _));
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(client.StopDirtyLogging).Errno);
    }
}
