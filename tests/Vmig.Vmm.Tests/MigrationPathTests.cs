using System.Buffers.Binary;
using Vmig.Migration;
using Vmig.Native;
using Vmig.Vmm.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Tests;

/// <summary>The migration fast paths: hole skipping, in-place RAM sections, framed writes, and the device-data pipes.</summary>
public sealed class MigrationPathTests
{
    [Fact]
    public void PageBitmap_ClearRange_ClearsExactlyTheRangeAcrossWordBoundaries()
    {
        var b = new PageBitmap(300);
        b.SetAll();
        b.ClearRange(5, 200); // partial head word, whole words, partial tail word
        Assert.Equal(100, b.Count());
        Assert.True(b.Get(4));
        Assert.False(b.Get(5));
        Assert.False(b.Get(204));
        Assert.True(b.Get(205));
        b.ClearRange(290, 1000); // clamped to the page count
        Assert.Equal(90, b.Count());
    }

    [Fact]
    public void GuestRam_KeepAllocatedPages_KeepsOnlyWrittenPages_FoundWithoutReading()
    {
        using var ram = GuestRam.Create(1 << 20); // 256 pages, all holes
        ram.Write(3 * 4096 + 100, [1]);
        ram.Write(100 * 4096, new byte[2 * 4096]); // written zeros are data too (allocated), not holes
        ram.GetHostSpan(255 * 4096, 8).Fill(7);
        var pages = new PageBitmap(ram.PageCount);
        pages.SetAll();
        Assert.Equal(4, ram.KeepAllocatedPages(pages));
        Assert.True(pages.Get(3) && pages.Get(100) && pages.Get(101) && pages.Get(255));
        Assert.False(pages.Get(0) || pages.Get(4) || pages.Get(99) || pages.Get(254));
    }

    [Fact]
    public void MemFd_NextDataExtent_ReportsExtentsAndNullPastTheLastOne()
    {
        using var fd = MemFd.Create("extents", 64 * 4096);
        using (var m = Mapping.Map(fd, 0, 64 * 4096))
        {
            m.GetSpan(10 * 4096, 3 * 4096).Fill(1);
        }
        Assert.Equal((10L * 4096, 13L * 4096), MemFd.NextDataExtent(fd, 0));
        Assert.Equal((11L * 4096, 13L * 4096), MemFd.NextDataExtent(fd, 11 * 4096));
        Assert.Null(MemFd.NextDataExtent(fd, 13 * 4096));
    }

    [Fact]
    public void RamSectionBuilder_PacksRunsIntoRecords_AndFirstPassOmitsZeroPages()
    {
        using var src = GuestRam.Create(64 * 4096);
        // Pages: 0 data, 1-2 zero, 3-5 data, 6 zero, 7 data.
        foreach (int p in new[] { 0, 3, 4, 5, 7 })
        {
            src.Write((ulong)p * 4096, Enumerable.Repeat((byte)(p + 1), 4096).ToArray());
        }
        var frame = new byte[SectionHeader.Size + RamPages.MaxPayload];
        var first = new RamSectionBuilder(src, omitZeroPages: true);
        Assert.Equal(8, first.Plan(0, 8, out int zeros));
        Assert.Equal(3, zeros);
        // Three data records (1 + 3 + 1 pages), no ZERO records.
        Assert.Equal(RamPages.PayloadHeaderSize + (3 * RamPages.RecordHeaderSize) + (5 * 4096), first.PayloadLength);
        int len1 = first.Build(frame, 1, out _);
        var section1 = frame.AsSpan(0, SectionHeader.Size + len1).ToArray();

        // A later round: zero pages as ZERO records, two runs in one section.
        src.Write(40 * 4096, Enumerable.Repeat((byte)0x40, 4096).ToArray());
        var later = new RamSectionBuilder(src, omitZeroPages: false);
        Assert.Equal(2, later.Plan(39, 2, out zeros));
        Assert.Equal(1, zeros);
        Assert.Equal(2, later.Plan(1, 2, out zeros));
        Assert.Equal(2, zeros);
        // Run 39-40: ZERO record + data record; run 1-2: one ZERO record of two pages (runs never merge records).
        Assert.Equal(RamPages.PayloadHeaderSize + (3 * RamPages.RecordHeaderSize) + 4096, later.PayloadLength);
        int len2 = later.Build(frame, 2, out _);
        var section2 = frame.AsSpan(0, SectionHeader.Size + len2).ToArray();

        // Both sections read back through SectionReader (header and section CRCs as built) and load the same RAM.
        var reader = new SectionReader(new MemoryStream([.. section1, .. section2]), RamPages.MaxPayload);
        using var dst = GuestRam.Create(64 * 4096);
        dst.Write(2 * 4096, Enumerable.Repeat((byte)9, 4096).ToArray()); // older data the ZERO record must clear
        var rounds = new PageRounds(dst.PageCount);
        rounds.TryClaim(2, 1, out _);
        Assert.True(reader.ReadNext());
        Assert.Equal(SectionType.RamPages, reader.Type);
        Assert.Equal(5, RamPages.Apply(dst, reader.Payload, rounds));
        Assert.True(reader.ReadNext());
        Assert.Equal(4, RamPages.Apply(dst, reader.Payload, rounds));
        Assert.False(reader.ReadNext());
        Assert.True(src.GetHostSpan(0, 64 * 4096).SequenceEqual(dst.GetHostSpan(0, 64 * 4096)));
    }

    [Fact]
    public void RamSectionBuilder_SplitsARunWhenTheSectionIsFull_WithCrcsTheReaderAccepts()
    {
        using var src = GuestRam.Create(1024 * 4096);
        for (int p = 0; p < 1024; p++)
        {
            src.WriteUInt32((ulong)p * 4096, (uint)p + 1);
        }
        var b = new RamSectionBuilder(src, omitZeroPages: true);
        Assert.Equal(200, b.Plan(0, 200, out _));
        // 1,052,680 − (8 + 16 + 200 × 4096) bytes are left: a record header and 56 whole pages.
        Assert.Equal(56, b.Plan(200, 256, out _));
        Assert.Equal(RamPages.PayloadHeaderSize + (2 * RamPages.RecordHeaderSize) + (256 * 4096), b.PayloadLength);
        Assert.Throws<ArgumentOutOfRangeException>(() => b.Plan(0, 257, out _));
        var frame = new byte[SectionHeader.Size + RamPages.MaxPayload];
        int len = b.Build(frame, 1, out uint crc);
        Assert.Equal(SectionHeader.ComputeCrc((ushort)SectionType.RamPages, SectionFlags.Mandatory, frame.AsSpan(SectionHeader.Size, len)), crc);
        Assert.True(SectionHeader.TryRead(frame, out var h) && h.Crc == crc && h.Length == (uint)len);
        Assert.True(b.IsEmpty);
        // The rest of the run starts the next section.
        Assert.Equal(200, b.Plan(256, 200, out _));
        using var dst = GuestRam.Create(1024 * 4096);
        var rounds = new PageRounds(dst.PageCount);
        Assert.Equal(256, RamPages.Apply(dst, frame.AsSpan(SectionHeader.Size, len), rounds));
        len = b.Build(frame, 1, out _);
        Assert.Equal(200, RamPages.Apply(dst, frame.AsSpan(SectionHeader.Size, len), rounds));
        Assert.True(src.GetHostSpan(0, 456 * 4096).SequenceEqual(dst.GetHostSpan(0, 456 * 4096)));
        Assert.True(b.IsEmpty);
    }

    [Fact]
    public void RamSectionBuilder_WhileTheGuestWritesThePages_TheCrcCoversExactlyTheBytesInTheFrame()
    {
        // A vCPU storing into the pages while they are copied: each built section must still pass the reader's CRC
        // check (the CRC is fused into the copy, so it is over the frame's bytes, torn or not). A CRC taken from RAM in a
        // separate pass would disagree with the copy whenever a store lands between the two.
        using var ram = GuestRam.Create(256 * 4096);
        ram.GetHostSpan(0, 256 * 4096).Fill(1);
        using var stop = new CancellationTokenSource();
        long stores = 0;
        var writer = new Thread(() =>
        {
            var r = new Random(7);
            while (!stop.IsCancellationRequested)
            {
                // Never zero, so the planned records (all data) stay valid.
                ram.GetHostSpan((ulong)r.Next(256 * 4096 / 8) * 8, 8).Fill((byte)r.Next(1, 256));
                stores++;
            }
        });
        writer.Start();
        try
        {
            var frame = new byte[SectionHeader.Size + RamPages.MaxPayload];
            var b = new RamSectionBuilder(ram, omitZeroPages: false);
            for (int i = 0; i < 200; i++)
            {
                Assert.Equal(256, b.Plan(0, 256, out _));
                int len = b.Build(frame, 2, out _);
                var reader = new SectionReader(new MemoryStream(frame, 0, SectionHeader.Size + len), RamPages.MaxPayload);
                Assert.True(reader.ReadNext()); // throws StreamFormatException on a CRC mismatch
            }
        }
        finally
        {
            stop.Cancel();
            writer.Join();
        }
        Assert.True(stores > 1000, $"the writer thread made only {stores} stores");
    }

    [Fact]
    public void SectionWriter_WriteFramed_WritesTheSameBytesAsWrite()
    {
        byte[] payload = Enumerable.Range(0, 5000).Select(i => (byte)i).ToArray();
        var a = new MemoryStream();
        new SectionWriter(a).Write(SectionType.DeviceData, payload);
        var frame = new byte[SectionHeader.Size + payload.Length + 7];
        payload.CopyTo(frame, SectionHeader.Size);
        var b = new MemoryStream();
        var w = new SectionWriter(b);
        w.WriteFramed(SectionType.DeviceData, frame, payload.Length);
        Assert.Equal(a.ToArray(), b.ToArray());
        Assert.Equal(SectionHeader.Size + payload.Length, w.BytesWritten);
    }

    [Theory]
    [InlineData(100)]              // one short read: inline, no helper thread
    [InlineData(4096 * 5)]         // exact multiple: the last read returns 0
    [InlineData(300_000)]          // sections over the loader's inline limit: helper thread
    [InlineData((4096 * 7) + 123)] // several full chunks and a tail
    public void DeviceDataPump_SendsTheWholeStreamInOrder_AndTheLoaderWritesItBack(int length)
    {
        byte[] state = Enumerable.Range(0, length).Select(i => (byte)(i * 31)).ToArray();
        var src = new StreamDevice(state);
        var ms = new MemoryStream();
        var writer = new SectionWriter(ms);
        long sent = new DeviceDataPump(length > 100_000 ? 128 * 1024 : 4096).Send(src, 0, 1, writer, long.MaxValue, null);
        Assert.Equal(length, sent);

        ms.Position = 0;
        var reader = new SectionReader(ms);
        var dst = new StreamDevice([]);
        using (var loader = new DeviceDataLoader([dst]))
        {
            while (reader.ReadNext())
            {
                Assert.Equal(SectionType.DeviceData, reader.Type);
                Assert.Equal(1, reader.Payload[2]); // phase
                loader.Enqueue(SectionIo.ReadDeviceIndex(reader.Payload, 1), reader);
            }
            loader.Drain();
        }
        Assert.Equal(state, dst.Written.ToArray());
    }

    [Fact]
    public void DeviceDataPump_StopsAtTheCap()
    {
        var src = new StreamDevice(new byte[4096 * 10]);
        long sent = new DeviceDataPump(4096).Send(src, 0, 0, new SectionWriter(new MemoryStream()), 4096 * 3, null);
        Assert.Equal(4096 * 3, sent);
        Assert.Equal(4096 * 3, src.Position);
    }

    [Fact]
    public void DeviceDataPump_ReadFailureOnTheHelperThread_IsRethrownAfterItStopped()
    {
        var src = new StreamDevice(new byte[4096 * 10]) { FailAtRead = 3 };
        var e = Assert.Throws<IOException>(() => new DeviceDataPump(4096).Send(src, 0, 0, new SectionWriter(new MemoryStream()), long.MaxValue, null));
        Assert.Contains("read 3 failed", e.Message, StringComparison.Ordinal);
        Assert.Equal(3, src.Reads); // nothing read after the failure
    }

    [Fact]
    public void DeviceDataLoader_SmallSectionWithNothingQueued_IsWrittenBeforeEnqueueReturns()
    {
        var dst = new StreamDevice([]);
        var ms = new MemoryStream();
        new SectionWriter(ms).Write(SectionType.DeviceData, [0, 0, 1, 0, 9, 8, 7]);
        ms.Position = 0;
        var reader = new SectionReader(ms);
        Assert.True(reader.ReadNext());
        using var loader = new DeviceDataLoader([dst]);
        loader.Enqueue(0, reader);
        Assert.Equal(new byte[] { 9, 8, 7 }, dst.Written.ToArray()); // the stop-copy tail: no hand-off in the downtime
    }

    [Fact]
    public void DeviceDataLoader_WriteFailure_SurfacesAtDrain()
    {
        var dst = new StreamDevice([]) { FailWrites = true };
        var ms = new MemoryStream();
        new SectionWriter(ms).Write(SectionType.DeviceData, new byte[(1 << 20) + 4]); // large: written by the helper thread
        ms.Position = 0;
        var reader = new SectionReader(ms);
        Assert.True(reader.ReadNext());
        using var loader = new DeviceDataLoader([dst]);
        loader.Enqueue(0, reader);
        var e = Assert.Throws<IOException>(loader.Drain);
        Assert.Contains("write refused", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void OneDevice_SwitchoverAndCommit_TakeOneRequestEach_ManyDevicesKeepTheP2PStages()
    {
        var log = new List<string>();
        var one = new FakeDevice("a", MigrationFlags.StopCopy | MigrationFlags.P2P, log);
        DeviceControl.QuiesceAndStopCopy([one]);
        Assert.Equal(DeviceState.StopCopy, one.GetState());
        Assert.Equal(1, one.Requests);

        var x = new FakeDevice("x", MigrationFlags.StopCopy | MigrationFlags.P2P, log);
        var y = new FakeDevice("y", MigrationFlags.StopCopy | MigrationFlags.P2P, log);
        DeviceControl.QuiesceAndStopCopy([x, y]);
        Assert.Equal(2, x.Requests);
        int lastP2P = Math.Max(log.IndexOf("x:Running->RunningP2P"), log.IndexOf("y:Running->RunningP2P"));
        int firstStop = Math.Min(log.IndexOf("x:RunningP2P->Stop"), log.IndexOf("y:RunningP2P->Stop"));
        Assert.True(lastP2P >= 0 && lastP2P < firstStop, string.Join(", ", log));
    }

    /// <summary>A device that is only a migration data stream: reads return the given state bytes in order, writes append.</summary>
    private sealed class StreamDevice(byte[] state) : IVmDevice
    {
        private readonly object _lock = new();

        public int Position { get; private set; }
        public int Reads { get; private set; }
        public int FailAtRead { get; init; } = -1;
        public bool FailWrites { get; init; }
        public MemoryStream Written { get; } = new();

        public DeviceDescription Description { get; } = new("s", "stream", "", MigrationFlags.StopCopy);
        public bool SupportsPrecopyInfo => false;
        public bool SupportsStopCopySize => false;
        public bool SupportsDirtyLogging => false;
        public int MsixVectorCount => 0;

        public int ReadMigrationData(Span<byte> buffer)
        {
            lock (_lock)
            {
                if (++Reads == FailAtRead)
                {
                    throw new IOException($"read {Reads} failed");
                }
                int n = Math.Min(buffer.Length, state.Length - Position);
                state.AsSpan(Position, n).CopyTo(buffer);
                Position += n;
                return n;
            }
        }

        public void WriteMigrationData(ReadOnlySpan<byte> data)
        {
            if (FailWrites)
            {
                throw new IOException("write refused");
            }
            Written.Write(data);
        }

        public void ReadRegion(int index, ulong offset, Span<byte> data) => throw new NotSupportedException();
        public void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data) => throw new NotSupportedException();
        public void DmaMap(ulong iova, ulong size, UnixFd fd, long fileOffset) => throw new NotSupportedException();
        public void DmaUnmap(ulong iova, ulong size) => throw new NotSupportedException();
        public void SetMsixEventFds(IReadOnlyList<EventFd> fds) => throw new NotSupportedException();
        public DeviceState GetState() => DeviceState.StopCopy;
        public DeviceState SetState(DeviceState target) => throw new NotSupportedException();
        public PrecopyInfo GetPrecopyInfo() => throw new NotSupportedException();
        public ulong GetStopCopySize() => throw new NotSupportedException();
        public void StartDirtyLogging(ulong pageSize, IReadOnlyList<(ulong Iova, ulong Length)> ranges) => throw new NotSupportedException();
        public void StopDirtyLogging() => throw new NotSupportedException();
        public void ReportDirty(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap) => throw new NotSupportedException();
        public void Reset() => throw new NotSupportedException();
        public void Dispose()
        {
        }
    }
}
