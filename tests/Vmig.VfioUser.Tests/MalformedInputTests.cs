using System.Buffers.Binary;
using Vmig.Conformance;
using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser.Tests;

/// <summary>
/// One malformed input per validation rule, sent with raw bytes: each gets the errno the server promises AND the
/// next valid request on the same connection is still answered.
/// </summary>
public sealed class MalformedInputTests
{
    private static byte[] Region(ulong offset, uint region, uint count, int data = 0)
    {
        var b = new byte[RegionAccessHead.WireSize + data];
        new RegionAccessHead(offset, region, count).WriteTo(b);
        return b;
    }

    private static byte[] Map(ulong iova, ulong size, uint flags = 3)
    {
        var b = new byte[DmaMapRequest.WireSize];
        new DmaMapRequest(DmaMapRequest.WireSize, flags, 0, iova, size).WriteTo(b);
        return b;
    }

    private static byte[] IrqSet(IrqSetFlags flags, uint index, uint start, uint count, int extra = 0)
    {
        var b = new byte[IrqSetPayload.WireSize + extra];
        new IrqSetPayload((uint)b.Length, flags, index, start, count).WriteTo(b);
        return b;
    }

    private static byte[] Multi(int entries, uint count = 4, int declared = -1)
    {
        var b = new byte[8 + (entries * WriteMultiEntry.WireSize)];
        BinaryPrimitives.WriteUInt64LittleEndian(b, (ulong)(declared < 0 ? entries : declared));
        for (int i = 0; i < entries; i++)
        {
            new WriteMultiEntry(0x40, 7, count, 0).WriteTo(b.AsSpan(8 + (i * WriteMultiEntry.WireSize)));
        }
        return b;
    }

    private static byte[] SetState(uint state)
    {
        var d = new byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(d, state);
        BinaryPrimitives.WriteInt32LittleEndian(d.AsSpan(4), -1);
        return RawPeer.FeaturePayload(16, DeviceFeatureHead.Set | 2, d);
    }

    /// <summary>Sends the case's setup messages (which must succeed), then the bad message; returns its reply.</summary>
    private static RawMessage Run(RawPeer p, string name)
    {
        void Ok(VfioUserCommand c, byte[] payload)
        {
            var r = p.Request(c, payload, 5000);
            Assert.True(r is { IsSuccess: true }, $"{name}: setup {c} failed with errno {r?.Errno}");
        }
        RawMessage? Bad(VfioUserCommand c, byte[] payload, int[]? fds = null) => fds is null ? p.Request(c, payload, 5000) : p.Request(c, payload, 5000, fds);
        using var ev = EventFd.Create();
        using var mem = MemFd.Create("bad", 4096);
        RawMessage? reply = name switch
        {
            "short-dma-map" => Bad(VfioUserCommand.DmaMap, new byte[16]),
            "short-dma-unmap" => Bad(VfioUserCommand.DmaUnmap, new byte[8]),
            "short-get-info" => Bad(VfioUserCommand.DeviceGetInfo, new byte[8]),
            "short-region-info" => Bad(VfioUserCommand.DeviceGetRegionInfo, new byte[16]),
            "short-io-fds" => Bad(VfioUserCommand.DeviceGetRegionIoFds, new byte[8]),
            "short-irq-info" => Bad(VfioUserCommand.DeviceGetIrqInfo, new byte[8]),
            "short-set-irqs" => Bad(VfioUserCommand.DeviceSetIrqs, new byte[10]),
            "short-region-read" => Bad(VfioUserCommand.RegionRead, new byte[8]),
            "short-region-write" => Bad(VfioUserCommand.RegionWrite, new byte[8]),
            "short-write-multi" => Bad(VfioUserCommand.RegionWriteMulti, new byte[4]),
            "short-feature" => Bad(VfioUserCommand.DeviceFeature, new byte[4]),
            "short-mig-data-read" => Bad(VfioUserCommand.MigDataRead, new byte[4]),
            "short-mig-data-write" => Bad(VfioUserCommand.MigDataWrite, new byte[4]),
            "reset-with-payload" => Bad(VfioUserCommand.DeviceReset, new byte[4]),
            "region-read-with-data" => Bad(VfioUserCommand.RegionRead, Region(0, 7, 4, data: 4)),
            "region-write-lying-count" => Bad(VfioUserCommand.RegionWrite, Region(0x40, 7, 100, data: 4)),
            "huge-count" => Bad(VfioUserCommand.RegionRead, Region(0, 0, 0x7FFF_FFFF)),
            "zero-count" => Bad(VfioUserCommand.RegionRead, Region(0, 0, 0)),
            "fd-on-region-read" => Bad(VfioUserCommand.RegionRead, Region(0, 7, 4), [ev.Handle.Fd]),
            "two-fds-on-dma-map" => Bad(VfioUserCommand.DmaMap, Map(0x10_0000, 4096), [mem.Fd, mem.Fd]),
            "fd-on-get-info" => Bad(VfioUserCommand.DeviceGetInfo, new byte[16], [ev.Handle.Fd]),
            "unknown-command" => Bad((VfioUserCommand)99, new byte[8]),
            "command-14" => Bad(VfioUserCommand.DirtyPagesRemoved, new byte[16]),
            "dma-read-to-server" => Bad(VfioUserCommand.DmaRead, new byte[16]),
            "dma-write-to-server" => Bad(VfioUserCommand.DmaWrite, new byte[20]),
            "region-out-of-bounds" => Bad(VfioUserCommand.RegionRead, Region(0xFFFC, 0, 8)),
            "region-offset-past-end" => Bad(VfioUserCommand.RegionRead, Region(0x10000, 0, 1)),
            "offset-count-overflow" => Bad(VfioUserCommand.RegionRead, Region(ulong.MaxValue - 3, 0, 8)),
            "region-index-out-of-range" => Bad(VfioUserCommand.RegionRead, Region(0, 9, 4)),
            "region-without-read" => Bad(VfioUserCommand.RegionRead, Region(0, 1, 4)),
            "region-without-write" => Bad(VfioUserCommand.RegionWrite, Region(0, 1, 4, data: 4)),
            "region-info-index-out-of-range" => Bad(VfioUserCommand.DeviceGetRegionInfo, Payload(new RegionInfoPayload(32, 0, 9, 0, 0, 0).WriteTo, 32)),
            "irq-info-index-out-of-range" => Bad(VfioUserCommand.DeviceGetIrqInfo, Payload(new IrqInfoPayload(16, 0, 5, 0).WriteTo, 16)),
            "dma-overlap" => Do(() => Ok(VfioUserCommand.DmaMap, Map(0x10_0000, 0x10000)), () => Bad(VfioUserCommand.DmaMap, Map(0x10_8000, 0x10000))),
            "dma-unaligned-address" => Bad(VfioUserCommand.DmaMap, Map(0x10_0001, 0x1000)),
            "dma-unaligned-size" => Bad(VfioUserCommand.DmaMap, Map(0x10_0000, 0x1001)),
            "dma-zero-size" => Bad(VfioUserCommand.DmaMap, Map(0x10_0000, 0)),
            "dma-wrapping-window" => Bad(VfioUserCommand.DmaMap, Map(ulong.MaxValue - 0xFFF, 0x2000)),
            "dma-unknown-flags" => Bad(VfioUserCommand.DmaMap, Map(0x10_0000, 0x1000, flags: 0x10)),
            "unmap-unknown-window" => Bad(VfioUserCommand.DmaUnmap, Payload(new DmaUnmapRequest(24, 0, 0x50_0000, 0x1000).WriteTo, 24)),
            "unmap-part-of-a-window" => Do(() => Ok(VfioUserCommand.DmaMap, Map(0x20_0000, 0x2000)), () => Bad(VfioUserCommand.DmaUnmap, Payload(new DmaUnmapRequest(24, 0, 0x20_0000, 0x1000).WriteTo, 24))),
            "unmap-bad-flags" => Bad(VfioUserCommand.DmaUnmap, Payload(new DmaUnmapRequest(24, 1, 0x20_0000, 0x1000).WriteTo, 24)),
            "set-irqs-bad-flags" => Bad(VfioUserCommand.DeviceSetIrqs, IrqSet((IrqSetFlags)0xFFFF, 2, 0, 1)),
            "set-irqs-two-data-types" => Bad(VfioUserCommand.DeviceSetIrqs, IrqSet(IrqSetFlags.DataNone | IrqSetFlags.DataBool | IrqSetFlags.ActionTrigger, 2, 0, 1, 1)),
            "set-irqs-out-of-range" => Bad(VfioUserCommand.DeviceSetIrqs, IrqSet(IrqSetFlags.DataNone | IrqSetFlags.ActionTrigger, 2, 3, 2)),
            "set-irqs-start-overflow" => Bad(VfioUserCommand.DeviceSetIrqs, IrqSet(IrqSetFlags.DataNone | IrqSetFlags.ActionTrigger, 2, uint.MaxValue, 2)),
            "set-irqs-bool-too-short" => Bad(VfioUserCommand.DeviceSetIrqs, IrqSet(IrqSetFlags.DataBool | IrqSetFlags.ActionMask, 0, 0, 1)),
            "set-irqs-mask-not-maskable" => Bad(VfioUserCommand.DeviceSetIrqs, IrqSet(IrqSetFlags.DataNone | IrqSetFlags.ActionMask, 2, 0, 1)),
            "set-irqs-fd-count-mismatch" => Bad(VfioUserCommand.DeviceSetIrqs, IrqSet(IrqSetFlags.DataEventfd | IrqSetFlags.ActionTrigger, 2, 0, 2), [ev.Handle.Fd]),
            "set-irqs-absent-index" => Bad(VfioUserCommand.DeviceSetIrqs, IrqSet(IrqSetFlags.DataNone | IrqSetFlags.ActionTrigger, 1, 0, 1)),
            "version-twice" => Bad(VfioUserCommand.Version, RawPeer.VersionPayload(0, 0, "{}")),
            "write-multi-over-200" => Bad(VfioUserCommand.RegionWriteMulti, Multi(201)),
            "write-multi-count-over-8" => Bad(VfioUserCommand.RegionWriteMulti, Multi(2, count: 9)),
            "write-multi-lying-wr-cnt" => Bad(VfioUserCommand.RegionWriteMulti, Multi(2, declared: 3)),
            "write-multi-zero" => Bad(VfioUserCommand.RegionWriteMulti, Multi(0)),
            "mig-data-read-over-max" => Do(() => Ok(VfioUserCommand.DeviceFeature, SetState(3)), () => Bad(VfioUserCommand.MigDataRead, Payload(new MigDataHead(8 + (1 << 20) + 1, (1 << 20) + 1).WriteTo, 8))),
            "mig-data-read-argsz-small" => Do(() => Ok(VfioUserCommand.DeviceFeature, SetState(3)), () => Bad(VfioUserCommand.MigDataRead, Payload(new MigDataHead(8, 16).WriteTo, 8))),
            "mig-data-read-in-running" => Bad(VfioUserCommand.MigDataRead, Payload(new MigDataHead(24, 16).WriteTo, 8)),
            "mig-data-write-lying-size" => Do(() => Ok(VfioUserCommand.DeviceFeature, SetState(4)), () => Bad(VfioUserCommand.MigDataWrite, [.. Payload(new MigDataHead(8, 100).WriteTo, 8), 1, 2, 3])),
            "feature-argsz-below-8" => Bad(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(7, DeviceFeatureHead.Get | 1)),
            "feature-get-and-set" => Bad(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | DeviceFeatureHead.Set | 2, new byte[8])),
            "feature-unknown-flag" => Bad(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(16, (1u << 20) | DeviceFeatureHead.Get | 1)),
            "feature-unknown" => Bad(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | 0x55)),
            "feature-mig-data-size-not-negotiated" => Bad(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | 9)),
            "feature-set-state-8" => Bad(VfioUserCommand.DeviceFeature, SetState(8)),
            "feature-set-state-error" => Bad(VfioUserCommand.DeviceFeature, SetState(0)),
            "feature-set-p2p-not-negotiated" => Bad(VfioUserCommand.DeviceFeature, SetState(5)),
            "feature-set-stop-copy-to-pre-copy" => Do(() => Ok(VfioUserCommand.DeviceFeature, SetState(3)), () => Bad(VfioUserCommand.DeviceFeature, SetState(6))),
            "logging-too-many-ranges" => Bad(VfioUserCommand.DeviceFeature, Start(257)),
            "logging-overlapping-ranges" => Bad(VfioUserCommand.DeviceFeature, Start(2, overlap: true)),
            "logging-report-short-payload" => Do(() => Ok(VfioUserCommand.DeviceFeature, Start(1)), () => Bad(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(8 + 24 + 64, DeviceFeatureHead.Get | 8, new byte[8]))),
            "logging-stop-not-started" => Bad(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(8, DeviceFeatureHead.Set | 7)),
            "dma-map-in-stop" => Do(() => Ok(VfioUserCommand.DeviceFeature, SetState(1)), () => Bad(VfioUserCommand.DmaMap, Map(0x30_0000, 0x1000))),
            "get-info-in-stop-copy" => Do(() => Ok(VfioUserCommand.DeviceFeature, SetState(3)), () => Bad(VfioUserCommand.DeviceGetInfo, Payload(new DeviceInfoPayload(16, 0, 0, 0).WriteTo, 16))),
            _ => throw new ArgumentException(name),
        };
        Assert.NotNull(reply);
        return reply;
    }

    private static RawMessage? Do(Action setup, Func<RawMessage?> bad)
    {
        setup();
        return bad();
    }

    private delegate void Writer(Span<byte> d);

    private static byte[] Payload(Writer w, int size)
    {
        var b = new byte[size];
        w(b);
        return b;
    }

    private static byte[] Start(int ranges, bool overlap = false)
    {
        var d = new byte[16 + (16 * ranges)];
        BinaryPrimitives.WriteUInt64LittleEndian(d, 4096);
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(8), (uint)ranges);
        for (int i = 0; i < ranges; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(16 + (16 * i)), overlap ? 0x10_0000UL + (ulong)(i * 0x1000) : 0x10_0000UL * (ulong)(i + 1));
            BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(24 + (16 * i)), 0x2000);
        }
        return RawPeer.FeaturePayload((uint)(8 + d.Length), DeviceFeatureHead.Set | 6, d);
    }

    [Theory]
    [InlineData("short-dma-map", Errno.EINVAL)]
    [InlineData("short-dma-unmap", Errno.EINVAL)]
    [InlineData("short-get-info", Errno.EINVAL)]
    [InlineData("short-region-info", Errno.EINVAL)]
    [InlineData("short-io-fds", Errno.EINVAL)]
    [InlineData("short-irq-info", Errno.EINVAL)]
    [InlineData("short-set-irqs", Errno.EINVAL)]
    [InlineData("short-region-read", Errno.EINVAL)]
    [InlineData("short-region-write", Errno.EINVAL)]
    [InlineData("short-write-multi", Errno.EINVAL)]
    [InlineData("short-feature", Errno.EINVAL)]
    [InlineData("short-mig-data-read", Errno.EINVAL)]
    [InlineData("short-mig-data-write", Errno.EINVAL)]
    [InlineData("reset-with-payload", Errno.EINVAL)]
    [InlineData("region-read-with-data", Errno.EINVAL)]
    [InlineData("region-write-lying-count", Errno.EINVAL)]
    [InlineData("huge-count", Errno.EINVAL)]
    [InlineData("zero-count", Errno.EINVAL)]
    [InlineData("fd-on-region-read", Errno.EINVAL)]
    [InlineData("two-fds-on-dma-map", Errno.EINVAL)]
    [InlineData("fd-on-get-info", Errno.EINVAL)]
    [InlineData("unknown-command", Errno.EINVAL)]
    [InlineData("command-14", Errno.EINVAL)]
    [InlineData("dma-read-to-server", Errno.EINVAL)]
    [InlineData("dma-write-to-server", Errno.EINVAL)]
    [InlineData("region-out-of-bounds", Errno.EINVAL)]
    [InlineData("region-offset-past-end", Errno.EINVAL)]
    [InlineData("offset-count-overflow", Errno.EINVAL)]
    [InlineData("region-index-out-of-range", Errno.EINVAL)]
    [InlineData("region-without-read", Errno.EINVAL)]
    [InlineData("region-without-write", Errno.EINVAL)]
    [InlineData("region-info-index-out-of-range", Errno.EINVAL)]
    [InlineData("irq-info-index-out-of-range", Errno.EINVAL)]
    [InlineData("dma-overlap", Errno.EEXIST)]
    [InlineData("dma-unaligned-address", Errno.EINVAL)]
    [InlineData("dma-unaligned-size", Errno.EINVAL)]
    [InlineData("dma-zero-size", Errno.EINVAL)]
    [InlineData("dma-wrapping-window", Errno.EINVAL)]
    [InlineData("dma-unknown-flags", Errno.EINVAL)]
    [InlineData("unmap-unknown-window", Errno.ENOENT)]
    [InlineData("unmap-part-of-a-window", Errno.ENOENT)]
    [InlineData("unmap-bad-flags", Errno.EINVAL)]
    [InlineData("set-irqs-bad-flags", Errno.EINVAL)]
    [InlineData("set-irqs-two-data-types", Errno.EINVAL)]
    [InlineData("set-irqs-out-of-range", Errno.EINVAL)]
    [InlineData("set-irqs-start-overflow", Errno.EINVAL)]
    [InlineData("set-irqs-bool-too-short", Errno.EINVAL)]
    [InlineData("set-irqs-mask-not-maskable", Errno.EINVAL)]
    [InlineData("set-irqs-fd-count-mismatch", Errno.EINVAL)]
    [InlineData("set-irqs-absent-index", Errno.EINVAL)]
    [InlineData("version-twice", Errno.EINVAL)]
    [InlineData("write-multi-over-200", Errno.EINVAL)]
    [InlineData("write-multi-count-over-8", Errno.EINVAL)]
    [InlineData("write-multi-lying-wr-cnt", Errno.EINVAL)]
    [InlineData("write-multi-zero", Errno.EINVAL)]
    [InlineData("mig-data-read-over-max", Errno.EINVAL)]
    [InlineData("mig-data-read-argsz-small", Errno.EINVAL)]
    [InlineData("mig-data-read-in-running", Errno.EINVAL)]
    [InlineData("mig-data-write-lying-size", Errno.EINVAL)]
    [InlineData("feature-argsz-below-8", Errno.EINVAL)]
    [InlineData("feature-get-and-set", Errno.EINVAL)]
    [InlineData("feature-unknown-flag", Errno.EINVAL)]
    [InlineData("feature-unknown", Errno.ENOTTY)]
    [InlineData("feature-mig-data-size-not-negotiated", Errno.ENOTTY)]
    [InlineData("feature-set-state-8", Errno.EINVAL)]
    [InlineData("feature-set-state-error", Errno.EINVAL)]
    [InlineData("feature-set-p2p-not-negotiated", Errno.EINVAL)]
    [InlineData("feature-set-stop-copy-to-pre-copy", Errno.EINVAL)]
    [InlineData("logging-too-many-ranges", Errno.E2BIG)]
    [InlineData("logging-overlapping-ranges", Errno.EINVAL)]
    [InlineData("logging-report-short-payload", Errno.EINVAL)]
    [InlineData("logging-stop-not-started", Errno.EINVAL)]
    [InlineData("dma-map-in-stop", Errno.EINVAL)]
    [InlineData("get-info-in-stop-copy", Errno.EINVAL)]
    public void Malformed_request_gets_its_errno_and_the_next_request_is_answered(string name, int errno)
    {
        using var s = new TestServer();
        using var p = s.Raw();
        var r = Run(p, name);
        Assert.True(r.Header.IsReply && r.Header.IsError, $"{name}: not an error reply ({r.Header})");
        Assert.Equal(errno, r.Errno);
        Assert.Equal(16u, r.Header.MessageSize);
        // Still in frame and serving: DEVICE_FEATURE GET state works in every state.
        Assert.True(p.GetState(5000) > 0, $"{name}: the next request was not answered");
    }

    [Fact]
    public void Lying_msg_size_over_the_bound_gets_e2big_and_the_stream_stays_in_frame()
    {
        using var s = new TestServer();
        using var p = s.Raw();
        ushort id = p.NextId();
        // 1 MiB + 8 KiB of payload: over max_data_xfer_size + 4 KiB. The server drains it without allocating it.
        p.Send(id, VfioUserCommand.RegionWrite, new byte[(1 << 20) + 8192]);
        var r = p.WaitFor(id, 10_000)!;
        Assert.Equal(Errno.E2BIG, r.Errno);
        Assert.Equal((int)Migration.DeviceState.Running, p.GetState(5000));
    }

    [Fact]
    public void Msg_size_below_the_header_closes_the_connection_and_a_new_client_is_served()
    {
        using var s = new TestServer();
        using (var p = s.Raw())
        {
            p.Send(p.NextId(), VfioUserCommand.DeviceGetInfo, default, messageSize: 8);
            Assert.Null(p.Receive(5000));
        }
        using var q = s.Raw();
        Assert.Equal((int)Migration.DeviceState.Running, q.GetState(5000));
    }

    [Fact]
    public void Commands_before_version_are_refused_and_version_then_succeeds()
    {
        using var s = new TestServer();
        using var p = s.Raw(negotiate: false);
        var r = p.Request(VfioUserCommand.DeviceGetInfo, new byte[16], 5000)!;
        Assert.Equal(Errno.EINVAL, r.Errno);
        Assert.Equal(Errno.EINVAL, p.Request(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | 2), 5000)!.Errno);
        Assert.True(p.Negotiate(5000)!.IsSuccess);
        Assert.Equal((int)Migration.DeviceState.Running, p.GetState(5000));
    }

    [Fact]
    public void Version_with_fds_or_malformed_json_is_refused_and_a_good_version_still_works()
    {
        using var s = new TestServer();
        using var p = s.Raw(negotiate: false);
        using var ev = EventFd.Create();
        Assert.Equal(Errno.EINVAL, p.Request(VfioUserCommand.Version, RawPeer.VersionPayload(0, 0, "{}"), 5000, [ev.Handle.Fd])!.Errno);
        Assert.Equal(Errno.EINVAL, p.Request(VfioUserCommand.Version, RawPeer.VersionPayload(0, 0, "{\"capabilities\":"), 5000)!.Errno);
        Assert.Equal(Errno.EINVAL, p.Request(VfioUserCommand.Version, [0, 0], 5000)!.Errno);
        Assert.True(p.Negotiate(5000)!.IsSuccess);
    }

    [Fact]
    public void Stray_reply_from_the_client_is_ignored()
    {
        using var s = new TestServer();
        using var p = s.Raw();
        p.Send(0x4444, VfioUserCommand.RegionRead, new byte[16], flags: VfioUserHeaderFlags.Reply);
        p.Send(0x4445, VfioUserCommand.DeviceGetInfo, new byte[16], flags: VfioUserHeaderFlags.Command | VfioUserHeaderFlags.NoReply);
        Assert.Equal((int)Migration.DeviceState.Running, p.GetState(5000));
    }

    [Fact]
    public void A_second_client_is_refused_while_the_first_keeps_working()
    {
        using var s = new TestServer();
        using var first = s.Raw();
        using var second = RawPeer.Connect(s.Path);
        RawMessage? r;
        try
        {
            r = second.Negotiate(5000);
        }
        catch (NativeException)
        {
            r = null;
        }
        Assert.Null(r);
        Assert.Equal((int)Migration.DeviceState.Running, first.GetState(5000));
    }
}
