using Vmig.Guest;
using Vmig.Guest.Nvme;
using Vmig.Migration;
using Vmig.Native;
using Vmig.Spec.Nvme;
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
}
