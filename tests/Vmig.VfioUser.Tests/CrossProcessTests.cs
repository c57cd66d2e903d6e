using Vmig.Conformance;
using Vmig.Migration;
using Vmig.Native;
using Vmig.TestPeer;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.VfioUser.Tests;

/// <summary>Server and client in SEPARATE processes: the server is `Vmig.TestPeer serve SOCKET` started with dotnet.</summary>
public sealed class CrossProcessTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-xp-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Client_drives_a_device_in_another_process_with_memfd_dma_eventfd_irq_and_survives_malformed_input()
    {
        string sock = Path.Combine(_dir, "peer.sock");
        using var peer = PeerProcess.Start(["serve", sock]);
        using (var raw = RawPeer.Connect(sock))
        {
            Assert.True(raw.Negotiate(10_000)!.IsSuccess);
            ushort id = raw.NextId();
            raw.Send(id, VfioUserCommand.RegionWrite, new byte[(1 << 20) + 8192]);
            Assert.Equal(Errno.E2BIG, raw.WaitFor(id, 10_000)!.Errno);
            Assert.Equal(Errno.EINVAL, raw.Request((VfioUserCommand)77, new byte[4], 10_000)!.Errno);
            Assert.Equal((int)DeviceState.Running, raw.GetState(10_000));
        }
        VfioUserClient? client = null;
        for (int i = 0; client is null; i++)
        {
            try
            {
                client = VfioUserClient.Connect(sock);
            }
            catch (VfioUserException) when (i < 100)
            {
                // The peer may still be tearing down the raw session (one client at a time).
                Thread.Sleep(20);
            }
        }
        using var c = client;
        using var ramFd = MemFd.Create("xp-ram", 1 << 20);
        using var ram = Mapping.Map(ramFd, 0, 1 << 20);
        new Random(9).NextBytes(ram.GetSpan(0x3000, 256));
        c.DmaMap(0, 1 << 20, ramFd, 0, DmaProt.Read | DmaProt.Write);
        using var irq = EventFd.Create();
        c.SetIrqEventFds(VfioPci.MsixIrqIndex, 0, [irq]);
        Assert.Equal(0u, SampleDeviceDriver.RunDma(c, SampleDeviceDriver.GuestToBar, 0x3000, 0x4000, 256));
        Assert.Equal(1UL, irq.Wait(10_000));
        var got = new byte[256];
        c.ReadRegion(0, 0x4000, got);
        Assert.Equal(ram.GetSpan(0x3000, 256).ToArray(), got);
        // BAR -> guest memory: the other process writes into our memfd.
        Assert.Equal(0u, SampleDeviceDriver.RunDma(c, SampleDeviceDriver.BarToGuest, 0x9000, 0x4000, 256));
        Assert.Equal(1UL, irq.Wait(10_000));
        Assert.Equal(got, ram.GetSpan(0x9000, 256).ToArray());
        // The BAR is also mmap-able through the region fd (sparse area from 4 KiB).
        var info = c.GetRegionInfo(0);
        using var barFd = info.MmapFd!;
        using var bar = Mapping.Map(barFd, 0, 0x10000, writable: false);
        Assert.Equal(got, bar.GetSpan(0x4000, 256).ToArray());
    }

    [Fact]
    public void A_dma_window_past_the_end_of_its_file_is_refused_so_device_dma_cannot_sigbus_the_server()
    {
        string sock = Path.Combine(_dir, "bus.sock");
        using var peer = PeerProcess.Start(["serve", sock]);
        using var c = VfioUserClient.Connect(sock);
        using var small = MemFd.Create("small", 64 * 1024);
        // 1 MiB window over a 64 KiB file: mmap would succeed, and a device access past 64 KiB would raise SIGBUS.
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.DmaMap(0, 1 << 20, small, 0, DmaProt.Read | DmaProt.Write)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.DmaMap(0, 64 * 1024, small, 4096, DmaProt.Read | DmaProt.Write)).Errno);
        c.DmaMap(0, 64 * 1024, small, 0, DmaProt.Read | DmaProt.Write);
        Assert.Equal(0u, SampleDeviceDriver.RunDma(c, SampleDeviceDriver.BarToGuest, 0x8000, 0x1000, 4096));
        Assert.False(peer.HasExited);
    }

    [Fact]
    public void Device_state_migrates_between_two_server_processes_byte_identical()
    {
        string a = Path.Combine(_dir, "a.sock"), b = Path.Combine(_dir, "b.sock");
        using var pa = PeerProcess.Start(["serve", a, "7"]);
        using var pb = PeerProcess.Start(["serve", b, "7"]);
        using var src = VfioUserClient.Connect(a);
        using var dst = VfioUserClient.Connect(b);
        var data = new byte[0xF000];
        new Random(11).NextBytes(data);
        src.WriteRegion(0, 0x1000, data);
        Assert.NotEqual(pa.Ask("checksum"), pb.Ask("checksum"));
        src.SetState(DeviceState.PreCopy);
        dst.SetState(DeviceState.Resuming);
        var buf = new byte[64 * 1024];
        int n;
        while ((n = src.ReadMigrationData(buf)) > 0)
        {
            dst.WriteMigrationData(buf.AsSpan(0, n));
        }
        // Written during pre-copy: carried again as a dirty page.
        src.WriteRegion(0, 0x7010, [0xEE, 0xEE]);
        src.SetState(DeviceState.StopCopy);
        do
        {
            n = src.ReadMigrationData(buf);
            dst.WriteMigrationData(buf.AsSpan(0, n));
        }
        while (n == buf.Length);
        Assert.Equal(DeviceState.Running, dst.SetState(DeviceState.Running));
        string? sa = pa.Ask("checksum");
        Assert.NotNull(sa);
        Assert.Equal(sa, pb.Ask("checksum"));
    }
}
