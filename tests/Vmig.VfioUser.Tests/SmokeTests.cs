using System.Buffers.Binary;
using Vmig.Migration;
using Vmig.Native;
using Vmig.TestPeer;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.VfioUser.Tests;

public sealed class SmokeTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-vu-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Client_drives_sample_device_over_a_real_socket_with_memfd_dma_and_eventfd_irq()
    {
        using var dev = new SampleDevice();
        using var server = new VfioUserServer(dev, Path.Combine(_dir, "d.sock"));
        server.Start();
        using var client = VfioUserClient.Connect(server.SocketPath);

        var info = client.GetDeviceInfo();
        Assert.Equal(9, info.NumRegions);
        var bar = client.GetRegionInfo(0);
        Assert.True(bar.Flags.HasFlag(RegionFlags.Mmap));
        Assert.NotNull(bar.MmapFd);
        Assert.Equal([(4096UL, 61440UL)], bar.SparseAreas);
        bar.MmapFd!.Dispose();

        using var ramFd = MemFd.Create("ram", 1 << 20);
        using var ram = Mapping.Map(ramFd, 0, 1 << 20);
        ram.GetSpan(0x2000, 5).Fill(0xAB);
        client.DmaMap(0, 1 << 20, ramFd, 0, DmaProt.Read | DmaProt.Write);
        using var irq = EventFd.Create();
        client.SetIrqEventFds(VfioPci.MsixIrqIndex, 0, [irq]);

        Span<byte> v = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(v, 0x2000);
        client.WriteRegion(0, SampleDevice.RegSrc, v);
        BinaryPrimitives.WriteUInt64LittleEndian(v, 0x1000);
        client.WriteRegion(0, SampleDevice.RegDst, v);
        BinaryPrimitives.WriteUInt64LittleEndian(v, 5);
        client.WriteRegion(0, SampleDevice.RegLen, v);
        client.WriteRegion(0, SampleDevice.RegDoorbell, [1]);

        Assert.Equal(1UL, irq.Wait(5000));
        Span<byte> got = stackalloc byte[5];
        client.ReadRegion(0, 0x1000, got);
        Assert.Equal(new byte[] { 0xAB, 0xAB, 0xAB, 0xAB, 0xAB }, got.ToArray());
    }

    [Fact]
    public void Device_state_moves_between_two_servers_byte_identical()
    {
        using var a = new SampleDevice();
        using var b = new SampleDevice();
        using var sa = new VfioUserServer(a, Path.Combine(_dir, "a.sock"));
        using var sb = new VfioUserServer(b, Path.Combine(_dir, "b.sock"));
        sa.Start();
        sb.Start();
        new Random(1).NextBytes(a.Bar[4096..]);
        using var src = VfioUserClient.Connect(sa.SocketPath);
        using var dst = VfioUserClient.Connect(sb.SocketPath);
        Assert.Equal(MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, src.GetMigrationFlags());
        Assert.Equal(DeviceState.PreCopy, src.SetState(DeviceState.PreCopy));
        Assert.True(src.GetPrecopyInfo().InitialBytes > 0);
        dst.SetState(DeviceState.Resuming);
        var buf = new byte[1 << 20];
        int n;
        while ((n = src.ReadMigrationData(buf)) > 0)
        {
            dst.WriteMigrationData(buf.AsSpan(0, n));
        }
        src.SetState(DeviceState.StopCopy);
        do
        {
            n = src.ReadMigrationData(buf);
            dst.WriteMigrationData(buf.AsSpan(0, n));
        }
        while (n == buf.Length);
        dst.SetState(DeviceState.Running);
        Assert.Equal(DeviceState.Running, dst.GetState());
        Assert.True(a.Bar.SequenceEqual(b.Bar));
    }
}
