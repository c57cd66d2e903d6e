using Vmig.Guest.Nvme;
using Vmig.Spec.Nvme;

using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

public sealed class NvmeDriverTests
{

    [Theory]
    [InlineData(true, true)]
    [InlineData(true, false)]
    [InlineData(false, true)]
    [InlineData(false, false)]
    public void Primary_bring_up_identify_and_write_read_round_trip_lands_in_file(bool interrupts, bool shadow)
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2, Interrupts = interrupts, ShadowDoorbells = shadow });
        Assert.Equal(2, drv.IoQueueCount);
        Assert.Equal(shadow, drv.UsesShadowDoorbells);
        Assert.Equal(interrupts, drv.UsesInterrupts);

        var id = drv.IdentifyController();
        Assert.Equal((ushort)0, id.Cntlid);
        Assert.Equal("vmig emulated NVMe", id.Mn);
        Assert.True((id.Oacs & OptionalAdminCommands.VirtualizationManagement) != 0);
        Assert.Equal([rig.Nsid], drv.ActiveNamespaces());
        var ns = drv.IdentifyNamespace(rig.Nsid);
        Assert.Equal((ulong)(NvmeRig.NamespaceBytes / 512), ns.Nsze);
        Assert.Equal(512, ns.FormattedLbaSize);

        byte[] data = Pattern(8192, 1);
        ram.Write(Buf, data);
        Assert.True(drv.Write(1, rig.Nsid, 100, 16, 512, Buf).IsSuccess);
        Assert.Equal(data, rig.ReadFile(100 * 512, 8192));

        ram.Write(Buf, new byte[8192]);
        Assert.True(drv.Read(2, rig.Nsid, 100, 16, 512, Buf).IsSuccess);
        byte[] back = new byte[8192];
        ram.Read(Buf, back);
        Assert.Equal(data, back);
        if (interrupts)
        {
            Assert.True(fn.Interrupts > 0);
        }
    }

    [Fact]
    public void Multi_page_transfers_use_prp_lists_at_unaligned_buffers_and_4k_lba()
    {
        using var rig = new NvmeRig(lbaSize: 4096);
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize);
        Assert.Equal(4096, drv.IdentifyNamespace(rig.Nsid).FormattedLbaSize);
        foreach (var (blocks, off) in new[] { (1, 0UL), (2, 0UL), (3, 512UL), (64, 0UL), (256, 1024UL) })
        {
            byte[] data = Pattern(blocks * 4096, blocks);
            ram.Write(Buf + off, data);
            Assert.True(drv.Write(1, rig.Nsid, 10, blocks, 4096, Buf + off).IsSuccess);
            Assert.Equal(data, rig.ReadFile(10 * 4096, data.Length));
            ram.Write(Buf + off, new byte[data.Length]);
            Assert.True(drv.Read(1, rig.Nsid, 10, blocks, 4096, Buf + off).IsSuccess);
            byte[] back = new byte[data.Length];
            ram.Read(Buf + off, back);
            Assert.Equal(data, back);
        }
    }

    [Fact]
    public void Shadow_doorbells_cut_mmio_doorbell_writes_for_a_burst_of_io()
    {
        long Run(bool shadow)
        {
            using var rig = new NvmeRig();
            Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
            var (ram, fn) = rig.Connect(0);
            var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, ShadowDoorbells = shadow, Interrupts = false });
            long before = fn.DoorbellWrites;
            var cids = new List<ushort>();
            for (int round = 0; round < 8; round++)
            {
                cids.Clear();
                for (int i = 0; i < 32; i++)
                {
                    cids.Add(drv.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Read, rig.Nsid, (ulong)i, 1), Buf + (ulong)(i * 512), 512));
                }
                foreach (var cid in cids)
                {
                    Assert.True(drv.Wait(1, cid).Status.IsSuccess);
                }
            }
            return fn.DoorbellWrites - before;
        }
        long without = Run(false);
        long with = Run(true);
        Assert.True(without >= 256, $"without shadow: {without} doorbells");
        Assert.True(with < without / 4, $"with shadow {with} vs without {without}");
    }

    [Fact]
    public void Several_queues_used_concurrently_from_threads()
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 4 });
        Assert.Equal(4, drv.IoQueueCount);
        Parallel.For(1, 5, q =>
        {
            ulong buf = Buf + (ulong)(q * 0x10000);
            for (int i = 0; i < 20; i++)
            {
                byte[] d = Pattern(4096, q * 100 + i);
                ram.Write(buf, d);
                ulong lba = (ulong)(q * 1000 + i * 8);
                Assert.True(drv.Write(q, rig.Nsid, lba, 8, 512, buf).IsSuccess);
                Assert.Equal(d, rig.ReadFile((long)lba * 512, 4096));
            }
        });
    }

    [Fact]
    public void Reattached_driver_reaps_commands_in_flight_and_continues_from_guest_ram()
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var first = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2, Interrupts = false });
        var cids = new List<ushort>();
        for (int i = 0; i < 10; i++)
        {
            byte[] d = Pattern(512, i);
            ram.Write(Buf + (ulong)(i * 512), d);
            cids.Add(first.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, rig.Nsid, (ulong)i, 1), Buf + (ulong)(i * 512), 512, tag: 1000 + (ulong)i));
        }
        // The first driver object is dropped without reaping; a new one attaches from the state block alone.
        var second = NvmeDriver.Attach(ram, fn, Region);
        Assert.Equal(2, second.IoQueueCount);
        Assert.Equal(cids.Order(), second.InFlightCommands(1).Order());
        var seen = new HashSet<ulong>();
        foreach (var cid in cids)
        {
            var c = second.Wait(1, cid, 2000);
            Assert.True(c.Status.IsSuccess);
            seen.Add(c.Tag);
        }
        Assert.Equal(Enumerable.Range(1000, 10).Select(i => (ulong)i).ToHashSet(), seen);
        Assert.Empty(second.InFlightCommands(1));
        for (int i = 0; i < 10; i++)
        {
            Assert.Equal(Pattern(512, i), rig.ReadFile(i * 512, 512));
        }
        Assert.True(second.Read(2, rig.Nsid, 0, 1, 512, Buf + 0x100000).IsSuccess);
    }

    [Fact]
    public void Attach_refuses_memory_without_a_state_block()
    {
        using var ram = new TestGuestRam(1 << 20);
        Assert.Throws<NvmeDriverException>(() => NvmeDriver.Attach(ram, new NullFunction(), 0x1000));
    }

    private sealed class NullFunction : Vmig.Guest.IGuestPciFunction
    {
        public int MsixVectorCount => 0;
        public void ReadConfig(int offset, Span<byte> data) => data.Clear();
        public void WriteConfig(int offset, ReadOnlySpan<byte> data) { }
        public void MmioRead(int bar, ulong offset, Span<byte> data) => data.Clear();
        public void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data) { }
        public bool WaitInterrupt(int vector, int timeoutMs) => false;
    }

    [Theory]
    [InlineData(0)]
    [InlineData(50)]
    public void Queue_depth_loop_with_or_without_cq_polling_reaps_every_completion_with_its_data(int pollMicroseconds)
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, CompletionPollMicroseconds = pollMicroseconds });
        for (int i = 0; i < 16; i++)
        {
            ram.Write(Buf, Pattern(512, 200 + i));
            Assert.True(drv.Write(1, rig.Nsid, (ulong)i, 1, 512, Buf).IsSuccess);
        }
        for (int i = 0; i < 16; i++)
        {
            drv.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Read, rig.Nsid, (ulong)i, 1), Buf + (ulong)(i * 4096), 512, tag: (ulong)i);
        }
        var seen = new HashSet<ulong>();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        while (seen.Count < 16)
        {
            Assert.True(sw.ElapsedMilliseconds < 10_000, $"{seen.Count} of 16 completed");
            if (drv.TryTakeAnyCompletion(1, out var c))
            {
                Assert.True(c.Status.IsSuccess);
                Assert.True(seen.Add(c.Tag));
                continue;
            }
            drv.WaitForCompletions(1, 5);
        }
        for (int i = 0; i < 16; i++)
        {
            byte[] b = new byte[512];
            ram.Read(Buf + (ulong)(i * 4096), b);
            Assert.Equal(Pattern(512, 200 + i), b);
        }
    }
}
