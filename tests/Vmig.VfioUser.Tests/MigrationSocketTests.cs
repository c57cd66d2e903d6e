using System.Buffers.Binary;
using Vmig.Migration;
using Vmig.Native;
using Vmig.TestPeer;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.VfioUser.Tests;

/// <summary>Migration over real sockets against <see cref="SampleDevice"/>: next-step tables, arcs, stream semantics,
/// reset, gating, dirty logging, extension visibility and message-based DMA.</summary>
public sealed class MigrationSocketTests
{
    // NEXT[from][to] for each defined flag set, typed by hand from reference §1.5 (full) and §1.6 (the three smaller
    // sets). Indices are the wire values ERROR=0 STOP=1 RUNNING=2 STOP_COPY=3 RESUMING=4 RUNNING_P2P=5 PRE_COPY=6
    // PRE_COPY_P2P=7; 0 = refused (EINVAL); a row of zeros = a state the set lacks.
    private static readonly int[][] Full =
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 5, 3, 4, 5, 5, 5],
        [0, 5, 2, 5, 5, 5, 6, 5],
        [0, 1, 1, 3, 1, 1, 0, 0],
        [0, 1, 1, 1, 4, 1, 1, 1],
        [0, 1, 2, 1, 1, 5, 2, 7],
        [0, 2, 2, 7, 2, 2, 6, 7],
        [0, 5, 5, 3, 5, 5, 6, 7],
    ];

    private static readonly int[][] StopCopyP2P =
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 5, 3, 4, 5, 0, 0],
        [0, 5, 2, 5, 5, 5, 0, 0],
        [0, 1, 1, 3, 1, 1, 0, 0],
        [0, 1, 1, 1, 4, 1, 0, 0],
        [0, 1, 2, 1, 1, 5, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ];

    private static readonly int[][] StopCopyPre =
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 2, 3, 4, 0, 2, 0],
        [0, 1, 2, 1, 1, 0, 6, 0],
        [0, 1, 1, 3, 1, 0, 0, 0],
        [0, 1, 1, 1, 4, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 2, 2, 3, 2, 0, 6, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ];

    private static readonly int[][] StopCopyOnly =
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 2, 3, 4, 0, 0, 0],
        [0, 1, 2, 1, 1, 0, 0, 0],
        [0, 1, 1, 3, 1, 0, 0, 0],
        [0, 1, 1, 1, 4, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ];

    private static int[][] TableFor(MigrationFlags f) => (ulong)f switch
    {
        1 => StopCopyOnly,
        3 => StopCopyP2P,
        5 => StopCopyPre,
        _ => Full,
    };

    private static List<(DeviceState, DeviceState)>? ExpectedPath(int[][] t, int from, int to)
    {
        if (to > 7 || t[from][from] == 0 || t[to][to] == 0)
        {
            return null;
        }
        var arcs = new List<(DeviceState, DeviceState)>();
        for (int cur = from; cur != to;)
        {
            int n = t[cur][to];
            if (n == 0)
            {
                return null;
            }
            arcs.Add(((DeviceState)cur, (DeviceState)n));
            cur = n;
        }
        return arcs;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(5)]
    [InlineData(7)]
    public void Every_from_to_pair_walks_the_table_path_and_the_device_sees_its_arcs_in_order(ulong flagValue)
    {
        var flags = (MigrationFlags)flagValue;
        var t = TableFor(flags);
        using var s = new TestServer(flags);
        using var c = VfioUserClient.Connect(s.Path);
        Assert.Equal(flags, c.GetMigrationFlags());
        int pairs = 0;
        for (int from = 1; from <= 7; from++)
        {
            if (t[from][from] == 0)
            {
                continue;
            }
            for (int to = 0; to <= 8; to++)
            {
                c.Reset();
                Assert.Equal(DeviceState.Running, c.GetState());
                if (from != (int)DeviceState.Running)
                {
                    c.SetState((DeviceState)from);
                }
                if (from == (int)DeviceState.Resuming)
                {
                    // A valid (empty) SampleDevice image, so RESUMING->STOP commits instead of refusing an empty load.
                    c.WriteMigrationData([0x50, 0x4D, 0x41, 0x53, 0x00, 0x00, 0x01, 0x00]);
                }
                int mark = s.Device.Arcs.Count;
                var expected = ExpectedPath(t, from, to);
                if (expected is null)
                {
                    var e = Assert.Throws<VfioUserMigrationException>(() => c.SetState((DeviceState)to));
                    Assert.Equal(Errno.EINVAL, e.Errno);
                    Assert.Equal((DeviceState)from, e.ReachedState);
                    Assert.Equal(mark, s.Device.Arcs.Count);
                }
                else
                {
                    Assert.Equal((DeviceState)to, c.SetState((DeviceState)to));
                    Assert.Equal((DeviceState)to, c.GetState());
                    var seen = s.Device.Arcs.Skip(mark).Select(a => (a.From, a.To)).ToList();
                    Assert.True(expected.SequenceEqual(seen), $"{(DeviceState)from}->{(DeviceState)to}: expected [{string.Join(", ", expected)}], device saw [{string.Join(", ", seen)}]");
                }
                pairs++;
            }
        }
        Assert.Equal(9 * (flagValue switch { 1 => 4, 3 or 5 => 5, _ => 7 }), pairs);
    }

    private static byte[] ReadAll(VfioUserClient c, int chunk)
    {
        using var ms = new MemoryStream();
        while (c.ReadMigrationData(chunk, ms) == chunk)
        {
        }
        return ms.ToArray();
    }

    [Fact]
    public void Stop_copy_stream_ends_with_a_short_reply_for_good_and_any_read_size_gives_the_same_bytes()
    {
        using var s = new TestServer();
        new Random(7).NextBytes(s.Device.Bar[4096..]);
        using var c = VfioUserClient.Connect(s.Path);
        c.SetState(DeviceState.StopCopy);
        var big = ReadAll(c, 1 << 20);
        Assert.Equal(8 + (16 * (4096 + 4)), big.Length);
        Assert.Equal(0, c.ReadMigrationData(4096, Stream.Null));
        Assert.Equal(0, c.ReadMigrationData(1, Stream.Null));
        foreach (int chunk in new[] { 4096, 777, 65536 + 3 })
        {
            c.Reset();
            c.SetState(DeviceState.StopCopy);
            Assert.Equal(big, ReadAll(c, chunk));
        }
        // STOP_COPY -> STOP ends the stream: reads are refused.
        c.SetState(DeviceState.Stop);
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.ReadMigrationData(16, Stream.Null)).Errno);
    }

    [Fact]
    public void Pre_copy_short_reply_means_nothing_for_now_and_new_writes_produce_more_data()
    {
        using var s = new TestServer();
        using var c = VfioUserClient.Connect(s.Path);
        c.SetState(DeviceState.PreCopy);
        var initial = c.GetPrecopyInfo();
        Assert.True(initial.InitialBytes > 0);
        var first = ReadAll(c, 1 << 20);
        Assert.True(first.Length > 16 * 4096);
        Assert.Equal(0, c.ReadMigrationData(4096, Stream.Null));
        Assert.Equal(DeviceState.PreCopy, c.GetState());
        Assert.Equal(new PrecopyInfo(0, 0), c.GetPrecopyInfo());
        // The device runs: a write dirties page 5, which the stream then carries again ("for now" was temporary).
        c.WriteRegion(0, (5 * 4096) + 12, [1, 2, 3]);
        Assert.Equal(4096UL + 4, c.GetPrecopyInfo().DirtyBytes);
        var more = ReadAll(c, 1 << 20);
        Assert.Equal(4096 + 4, more.Length);
        Assert.Equal(5, BinaryPrimitives.ReadInt32LittleEndian(more));
        Assert.Equal(0, c.ReadMigrationData(4096, Stream.Null));
    }

    [Fact]
    public void Failed_load_of_a_corrupt_stream_fails_resuming_to_stop_reports_the_state_and_applies_nothing()
    {
        using var s = new TestServer();
        new Random(3).NextBytes(s.Device.Bar[4096..]);
        using var c = VfioUserClient.Connect(s.Path);
        c.SetState(DeviceState.StopCopy);
        var stream = ReadAll(c, 1 << 20);
        c.Reset();
        var before = s.Device.Bar.ToArray();
        // A page record pointing outside the BAR, at the end: detected only when the whole stream is validated.
        var corrupt = (byte[])stream.Clone();
        BinaryPrimitives.WriteInt32LittleEndian(corrupt.AsSpan(8 + (15 * 4100)), 99);
        new Random(4).NextBytes(corrupt.AsSpan(8 + 4, 4096));
        c.SetState(DeviceState.Resuming);
        c.WriteMigrationData(corrupt);
        var e = Assert.Throws<VfioUserMigrationException>(() => c.SetState(DeviceState.Running));
        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Equal(DeviceState.Resuming, e.ReachedState);
        Assert.Equal(DeviceState.Resuming, c.GetState());
        Assert.True(before.AsSpan().SequenceEqual(s.Device.Bar), "a failed load must not be half-applied");
        c.Reset();
        Assert.Equal(DeviceState.Running, c.GetState());
        // The genuine stream still loads.
        c.SetState(DeviceState.Resuming);
        c.WriteMigrationData(stream);
        Assert.Equal(DeviceState.Running, c.SetState(DeviceState.Running));
    }

    [Fact]
    public void A_failed_load_fails_the_same_way_when_retried_and_never_turns_into_eio()
    {
        using var s = new TestServer();
        using var c = VfioUserClient.Connect(s.Path);
        c.SetState(DeviceState.Resuming);
        c.WriteMigrationData([1, 2, 3]);
        for (int i = 0; i < 3; i++)
        {
            var e = Assert.Throws<VfioUserMigrationException>(() => c.SetState(DeviceState.Stop));
            Assert.Equal((Errno.EINVAL, DeviceState.Resuming), (e.Errno, e.ReachedState));
        }
        c.Reset();
        Assert.Equal(DeviceState.Running, c.GetState());
    }

    [Fact]
    public void Reset_during_pre_copy_ends_the_stream_and_returns_running()
    {
        using var s = new TestServer();
        using var c = VfioUserClient.Connect(s.Path);
        c.SetState(DeviceState.PreCopy);
        Assert.Equal(4096, c.ReadMigrationData(4096, Stream.Null));
        c.Reset();
        Assert.Equal(DeviceState.Running, c.GetState());
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.ReadMigrationData(4096, Stream.Null)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.GetPrecopyInfo()).Errno);
        // A new pre-copy starts from the beginning (the magic header again).
        c.SetState(DeviceState.PreCopy);
        var head = new MemoryStream();
        c.ReadMigrationData(8, head);
        Assert.Equal(0x53414D50u, BinaryPrimitives.ReadUInt32LittleEndian(head.ToArray()));
    }

    [Fact]
    public void Commands_are_gated_per_state()
    {
        using var s = new TestServer();
        using var c = VfioUserClient.Connect(s.Path);
        Span<byte> cfg = stackalloc byte[4];
        foreach (var st in new[] { DeviceState.Stop, DeviceState.StopCopy })
        {
            c.Reset();
            c.SetState(st);
            Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.DmaMap(0x10_0000, 0x1000, null, 0, DmaProt.Read)).Errno);
            Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.GetDeviceInfo()).Errno);
            Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.SetIrqs(VfioPci.MsixIrqIndex, IrqSetFlags.ActionTrigger, 0, 0)).Errno);
            c.ReadRegion(VfioPci.ConfigRegionIndex, 0, cfg);
            Assert.Equal(0x1af4, BinaryPrimitives.ReadUInt16LittleEndian(cfg));
            Assert.Equal(st, c.GetState());
        }
        foreach (var st in new[] { DeviceState.Running, DeviceState.Resuming, DeviceState.PreCopy, DeviceState.RunningP2P })
        {
            c.Reset();
            c.SetState(st);
            c.DmaMap(0x10_0000, 0x1000, null, 0, DmaProt.Read);
            c.DmaUnmap(0x10_0000, 0x1000);
            Assert.Equal(9, c.GetDeviceInfo().NumRegions);
        }
        // MIG_DATA_WRITE only in RESUMING.
        c.Reset();
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.WriteMigrationData([1])).Errno);
    }

    /// <summary>Makes SampleDevice DMA-write <paramref name="len"/> bytes of its BAR at guest <paramref name="iova"/>.</summary>
    private static void DeviceWrites(VfioUserClient c, ulong iova, int len) =>
        Assert.Equal(0u, SampleDeviceDriver.RunDma(c, SampleDeviceDriver.BarToGuest, iova, 0x1000, (ulong)len));

    private static int Raw(VfioUserClient c, uint flags, ReadOnlySpan<byte> data, uint argsz)
    {
        var p = new byte[8 + data.Length];
        new DeviceFeatureHead(argsz, flags).WriteTo(p);
        data.CopyTo(p.AsSpan(8));
        try
        {
            using var r = c.SendRaw(VfioUserCommand.DeviceFeature, p);
            return 0;
        }
        catch (VfioUserException e)
        {
            return e.Errno;
        }
    }

    [Fact]
    public void Dirty_logging_bitmaps_have_kernel_bit_order_fold_page_sizes_clear_on_read_and_reject_bad_ranges()
    {
        using var s = new TestServer();
        using var c = VfioUserClient.Connect(s.Path);
        const ulong iova = 0x4000_0000, size = 1 << 20;
        using var mem = MemFd.Create("guest", (long)size);
        c.DmaMap(iova, size, mem, 0, DmaProt.Read | DmaProt.Write);
        Assert.Equal(4096UL, c.StartDirtyLogging(4096, [(iova, size)]));
        Assert.Equal(Errno.EBUSY, Assert.Throws<VfioUserException>(() => c.StartDirtyLogging(4096, [(iova, size)])).Errno);
        Assert.Equal(0UL, c.ReportDirty(iova, size, 4096).Count());

        DeviceWrites(c, iova + (3 * 4096), 16);
        DeviceWrites(c, iova + (70 * 4096) + 100, 8);
        var bm = c.ReportDirty(iova, size, 4096);
        Assert.Equal([iova + (3 * 4096), iova + (70 * 4096)], bm.EnumerateDirtyPages());
        Assert.Equal(1UL << 3, bm.Words[0]);
        Assert.Equal(1UL << 6, bm.Words[1]);
        Assert.Equal(0UL, c.ReportDirty(iova, size, 4096).Count());

        DeviceWrites(c, iova + (3 * 4096), 16);
        DeviceWrites(c, iova + (70 * 4096), 8);
        DeviceWrites(c, iova + (71 * 4096), 8);
        Assert.Equal([iova, iova + (17 * 16384)], c.ReportDirty(iova, size, 16384).EnumerateDirtyPages());

        // A report over part of the window: bits are relative to the report's iova.
        DeviceWrites(c, iova + (70 * 4096), 8);
        var part = c.ReportDirty(iova + (64 * 4096), 64 * 4096, 4096);
        Assert.Equal([iova + (70 * 4096)], part.EnumerateDirtyPages());
        Assert.Equal(1UL << 6, part.Words[0]);

        // Writes from the client through its own mapping are not device DMA: not logged.
        using (var view = Mapping.Map(mem, 0, (long)size))
        {
            view.GetSpan(9 * 4096, 4).Fill(1);
        }
        Assert.Equal(0UL, c.ReportDirty(iova, size, 4096).Count());

        var report = new byte[24];
        BinaryPrimitives.WriteUInt64LittleEndian(report, iova);
        BinaryPrimitives.WriteUInt64LittleEndian(report.AsSpan(8), size);
        BinaryPrimitives.WriteUInt64LittleEndian(report.AsSpan(16), 3 * 4096);
        Assert.Equal(Errno.EINVAL, Raw(c, DeviceFeatureHead.Get | 8, report, 8 + 24 + 128));
        BinaryPrimitives.WriteUInt64LittleEndian(report.AsSpan(16), 2048);
        Assert.Equal(Errno.EINVAL, Raw(c, DeviceFeatureHead.Get | 8, report, 8 + 24 + 128));
        BinaryPrimitives.WriteUInt64LittleEndian(report, iova + 512);
        BinaryPrimitives.WriteUInt64LittleEndian(report.AsSpan(16), 4096);
        Assert.Equal(Errno.EINVAL, Raw(c, DeviceFeatureHead.Get | 8, report, 8 + 24 + 32));
        BinaryPrimitives.WriteUInt64LittleEndian(report, iova);
        Assert.Equal(Errno.EINVAL, Raw(c, DeviceFeatureHead.Get | 8, report, 8 + 24 + 8));

        c.StopDirtyLogging();
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.ReportDirty(iova, size, 4096)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(c.StopDirtyLogging).Errno);
        // Unaligned START range is rejected.
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => c.StartDirtyLogging(4096, [(iova + 1, 4096)])).Errno);
    }

    [Fact]
    public void Dirty_logging_ignores_a_huge_window_served_by_messages_instead_of_allocating_a_bitmap_for_it()
    {
        using var s = new TestServer();
        using var c = VfioUserClient.Connect(s.Path);
        // 4 EiB without an fd: DMA to it goes through messages and is tracked by the client (libvfio-user #751).
        c.DmaMap(1UL << 62, 1UL << 62, null, 0, DmaProt.Read | DmaProt.Write);
        using var mem = MemFd.Create("guest", 1 << 20);
        c.DmaMap(0x4000_0000, 1 << 20, mem, 0, DmaProt.Read | DmaProt.Write);
        Assert.Equal(4096UL, c.StartDirtyLogging(4096, []));
        DeviceWrites(c, 0x4000_0000 + (2 * 4096), 8);
        Assert.Equal([0x4000_0000UL + (2 * 4096)], c.ReportDirty(0x4000_0000, 1 << 20, 4096).EnumerateDirtyPages());
        c.StopDirtyLogging();
    }

    [Fact]
    public void P2P_states_are_invisible_to_a_client_that_did_not_negotiate_them()
    {
        using var s = new TestServer();
        using var c = VfioUserClient.Connect(s.Path, new VfioUserClientOptions { RequestExtensions = false });
        Assert.False(c.SupportsP2P || c.SupportsStopCopySize || c.SupportsPrecopyInfo);
        Assert.Equal(MigrationFlags.StopCopy | MigrationFlags.PreCopy, c.GetMigrationFlags());
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserMigrationException>(() => c.SetState(DeviceState.RunningP2P)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserMigrationException>(() => c.SetState(DeviceState.PreCopyP2P)).Errno);
        Assert.Equal(Errno.ENOTTY, Assert.Throws<VfioUserException>(() => c.GetStopCopySize()).Errno);
        Assert.Equal(Errno.ENOTTY, Assert.Throws<VfioUserException>(() => c.GetPrecopyInfo()).Errno);
        // The device still routes internally through its P2P states; the client only ever sees the endpoints.
        c.SetState(DeviceState.PreCopy);
        c.SetState(DeviceState.StopCopy);
        Assert.Equal(DeviceState.StopCopy, c.GetState());
        Assert.Contains(s.Device.Arcs, a => a.To == DeviceState.PreCopyP2P);
    }

    private sealed class GuestRam(ulong baseIova, int size) : IClientDmaHandler
    {
        public byte[] Memory { get; } = new byte[size];
        public int Reads { get; private set; }
        public int Writes { get; private set; }

        public int Read(ulong address, Span<byte> destination)
        {
            Reads++;
            Memory.AsSpan((int)(address - baseIova), destination.Length).CopyTo(destination);
            return 0;
        }

        public int Write(ulong address, ReadOnlySpan<byte> source)
        {
            Writes++;
            source.CopyTo(Memory.AsSpan((int)(address - baseIova)));
            return 0;
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void A_window_mapped_without_an_fd_is_served_with_dma_messages(bool twinSocket)
    {
        using var s = new TestServer();
        using var c = VfioUserClient.Connect(s.Path, new VfioUserClientOptions { RequestTwinSocket = twinSocket });
        Assert.Equal(twinSocket, c.ServerCapabilities.TwinSocketSupported);
        var ram = new GuestRam(0x20_0000, 0x10000);
        c.DmaHandler = ram;
        c.DmaMap(0x20_0000, 0x10000, null, 0, DmaProt.Read | DmaProt.Write);
        new Random(5).NextBytes(ram.Memory.AsSpan(0x100, 32));
        Assert.Equal(0u, SampleDeviceDriver.RunDma(c, SampleDeviceDriver.GuestToBar, 0x20_0100, 0x2000, 32));
        Assert.Equal(1, ram.Reads);
        Assert.True(ram.Memory.AsSpan(0x100, 32).SequenceEqual(s.Device.Bar.Slice(0x2000, 32)));
        // BAR -> guest at another address.
        Assert.Equal(0u, SampleDeviceDriver.RunDma(c, SampleDeviceDriver.BarToGuest, 0x20_8000, 0x2000, 32));
        Assert.True(ram.Memory.AsSpan(0x8000, 32).SequenceEqual(s.Device.Bar.Slice(0x2000, 32)));
        Assert.Equal(1, ram.Writes);
        // Outside the window: the device reports a DMA error and the client was not asked.
        Assert.Equal(2u, SampleDeviceDriver.RunDma(c, SampleDeviceDriver.GuestToBar, 0x90_0000, 0x2000, 32));
        Assert.Equal(1, ram.Reads);
    }
}
