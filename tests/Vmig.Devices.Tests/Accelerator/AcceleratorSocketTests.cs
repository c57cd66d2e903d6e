using Vmig.Devices.Accelerator;
using Vmig.Devices.Tests.Nvme;
using Vmig.Guest;
using Vmig.Guest.Accelerator;
using Vmig.Migration;
using Vmig.Native;
using Vmig.Spec.Accelerator;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Tests.Accelerator;

/// <summary>
/// The accelerator served over real vfio-user sockets: a "VMM" (clients here) maps one guest RAM memfd into two
/// device hosts' VFs and moves the VF's state from one to the other with MIG_DATA_READ/WRITE (DeviceMigrator).
/// </summary>
public sealed class AcceleratorSocketTests() : SocketTestScope("vmig-accel-")
{
    private const long RamSize = 16 << 20;

    private (AcceleratorPf Pf, VfioUserClient Client) Host(string name)
    {
        var pf = Own(new AcceleratorPf(1, AcceleratorProfile.Create(64 << 20, 64)));
        pf.EnableVfs(1);
        return (pf, Serve(pf.GetVf(0), name));
    }

    [Fact]
    public void RegionInfo_ShowsOnlyTheVisibleRegisterPart_AndHiddenAccessFails()
    {
        var (_, client) = Host("a");
        Assert.Equal(AcceleratorIds.VfRegisterVisibleSize, client.GetRegionInfo(0).Size);
        Assert.Equal(0ul, client.GetRegionInfo(1).Size);
        Assert.Equal(4096ul, client.GetRegionInfo(VfioPci.ConfigRegionIndex).Size);
        Assert.Equal((uint)AcceleratorIds.VfMsixVectors, client.GetIrqInfo(VfioPci.MsixIrqIndex).Count);
        Assert.ThrowsAny<Exception>(() => client.ReadRegion(0, AcceleratorMigrationRegister.Status, new byte[4]));
        Assert.Equal(MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, client.GetMigrationFlags());
    }

    [Fact]
    public void BusyVf_MovesBetweenDeviceHostsOverSockets_JobsCompleteExactlyOnce()
    {
        // One guest RAM memfd, DMA-mapped into both device hosts (ClientPciFunction maps it), as a VMM does.
        using var ram = new TestGuestRam(RamSize);
        var (srcPf, srcClient) = Host("src");
        var (dstPf, dstClient) = Host("dst");
        using var srcFn = new ClientPciFunction(srcClient, ram);
        using var dstFn = new ClientPciFunction(dstClient, ram);

        var driver = AcceleratorDriver.Initialize(ram, srcFn, 0x10_0000, 32);
        var data = new byte[512 * 1024];
        new Random(9).NextBytes(data);
        ram.Write(0x20_0000, data);
        Assert.Equal(AcceleratorJobStatus.Success, driver.Run(new AcceleratorJob(AcceleratorOpcode.CopyToDevice, 0, 0, 0x20_0000, 0x1000, (ulong)data.Length)).Status);
        // After the first pre-copy round, the guest queues long jobs (CRC of all 64 MiB of device memory, far longer than a
        // suspend round trip even on an idle machine): the switchover
        // follows within a round trip, so the source finishes only what it fetched by then and the rest move.
        var slots = new List<uint>();
        var onPreCopy = new SyncProgress(p =>
        {
            if (p.Phase == DeviceMigrationPhase.PreCopy && slots.Count == 0)
            {
                for (int i = 0; i < 24; i++)
                {
                    slots.Add(driver.Submit(new AcceleratorJob(AcceleratorOpcode.Crc32C, 0, 0, 0x30_0000 + (ulong)i * 4, 0, 64 << 20)));
                }
            }
        });

        // One pre-copy round: the switchover follows the submission at once (more rounds gave the device time to finish them all).
        var report = DeviceMigrator.Migrate(srcClient, dstClient, new DeviceMigrationOptions { MaxPreCopyRounds = 1 }, onPreCopy);
        Assert.Equal(24, slots.Count);
        Assert.Equal(DeviceState.Stop, srcClient.GetState());
        Assert.Equal(DeviceState.Running, dstClient.GetState());
        Assert.True(report.StopCopyBytes > 0);

        var moved = AcceleratorDriver.Attach(ram, dstFn, 0x10_0000);
        var seen = new HashSet<uint>();
        uint crc = Vmig.Spec.Crc32C.Compute(dstPf.GetVf(0).Memory.GetSpan(0, 64 << 20));
        foreach (var s in slots)
        {
            var c = moved.Wait(s);
            Assert.Equal(AcceleratorJobStatus.Success, c.Status);
            Assert.Equal(crc, c.Result);
            Assert.True(seen.Add(c.Sequence));
        }
        Assert.Equal(25u, dstPf.GetVf(0).Registers.CompletedJobs);
        Assert.True(srcPf.GetVf(0).Registers.CompletedJobs < 25, "every job finished on the source: nothing was in flight at the switchover");
        Assert.True(srcPf.GetVf(0).Memory.GetSpan(0, 64 << 20).SequenceEqual(dstPf.GetVf(0).Memory.GetSpan(0, 64 << 20)));
        var back = new byte[data.Length];
        Assert.Equal(AcceleratorJobStatus.Success, moved.Run(new AcceleratorJob(AcceleratorOpcode.CopyFromDevice, 0, 0, 0x28_0000, 0x1000, (ulong)data.Length)).Status);
        ram.Read(0x28_0000, back);
        Assert.Equal(data, back);
    }

    private sealed class SyncProgress(Action<DeviceMigrationProgress> report) : IProgress<DeviceMigrationProgress>
    {
        public void Report(DeviceMigrationProgress value) => report(value);
    }
}
