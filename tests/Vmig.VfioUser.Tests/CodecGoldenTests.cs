using System.Text;
using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser.Tests;

/// <summary>Golden bytes for every fixed payload, typed from vfio-user.rst / vfio.h layouts (little-endian), and round trips.</summary>
public sealed class CodecGoldenTests
{
    private delegate void Writer(Span<byte> destination);

    private static byte[] Write(int size, Writer write)
    {
        var b = new byte[size];
        write(b);
        return b;
    }

    [Fact]
    public void Header_command_reply_and_error_reply_have_the_spec_layout()
    {
        byte[] cmd = [0x34, 0x12, 0x10, 0x00, 0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
        byte[] err = [0x34, 0x12, 0x10, 0x00, 0x10, 0x00, 0x00, 0x00, 0x21, 0x00, 0x00, 0x00, 0x16, 0x00, 0x00, 0x00];
        byte[] noReply = [0x01, 0x00, 0x0A, 0x00, 0x24, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
        Assert.Equal(cmd, Write(16, b => new VfioUserHeader(0x1234, VfioUserCommand.DeviceFeature, 24, VfioUserHeaderFlags.Command).WriteTo(b)));
        Assert.Equal(err, Write(16, b => new VfioUserHeader(0x1234, VfioUserCommand.DeviceFeature, 16, VfioUserHeaderFlags.Reply | VfioUserHeaderFlags.Error, 22).WriteTo(b)));
        Assert.Equal(noReply, Write(16, b => new VfioUserHeader(1, VfioUserCommand.RegionWrite, 36, VfioUserHeaderFlags.NoReply).WriteTo(b)));
        var h = VfioUserHeader.ReadFrom(err);
        Assert.True(h.IsReply && h.IsError && !h.IsCommand && !h.NoReply);
        Assert.Equal((0x1234, VfioUserCommand.DeviceFeature, 16u, 22u), (h.MessageId, h.Command, h.MessageSize, h.ErrorNo));
        Assert.True(VfioUserHeader.ReadFrom(noReply).NoReply);
        Assert.Equal(20, VfioUserHeader.ReadFrom(noReply).PayloadSize);
    }

    [Fact]
    public void Version_payload_is_major_minor_then_nul_terminated_json()
    {
        const string json = """{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"max_dma_maps":65535,"pgsizes":4096}}""";
        Assert.Equal(json, new VfioUserCapabilities().ToJson());
        byte[] expected = [0x00, 0x00, 0x02, 0x00, .. Encoding.ASCII.GetBytes(json), 0x00];
        var head = Write(4, b => new VersionHead(0, 2).WriteTo(b));
        Assert.Equal(expected, head.Concat(Encoding.UTF8.GetBytes(json + "\0")).ToArray());
        Assert.True(VersionHead.TryRead(expected, out var v));
        Assert.Equal(new VersionHead(0, 2), v);
        Assert.Equal(0, VfioUserCapabilities.TryParse(expected.AsSpan(4), out var caps, out _));
        Assert.Equal(new VfioUserCapabilities(), caps);
        Assert.False(VersionHead.TryRead([0, 0, 2], out _));
    }

    [Fact]
    public void Dma_map_and_unmap_layouts()
    {
        byte[] map =
        [
            0x20, 0, 0, 0, 0x03, 0, 0, 0,
            0x00, 0x10, 0, 0, 0, 0, 0, 0,
            0x00, 0x00, 0x00, 0x80, 0, 0, 0, 0,
            0x00, 0x00, 0x10, 0x00, 0, 0, 0, 0,
        ];
        byte[] unmap =
        [
            0x18, 0, 0, 0, 0x02, 0, 0, 0,
            0x00, 0x00, 0x00, 0x80, 0, 0, 0, 0,
            0x00, 0x00, 0x10, 0x00, 0, 0, 0, 0,
        ];
        var m = new DmaMapRequest(32, DmaMapRequest.FlagRead | DmaMapRequest.FlagWrite, 0x1000, 0x8000_0000, 0x10_0000);
        var u = new DmaUnmapRequest(24, DmaUnmapRequest.FlagAll, 0x8000_0000, 0x10_0000);
        Assert.Equal(map, Write(DmaMapRequest.WireSize, m.WriteTo));
        Assert.Equal(unmap, Write(DmaUnmapRequest.WireSize, u.WriteTo));
        Assert.True(DmaMapRequest.TryRead(map, out var m2) && m2 == m);
        Assert.True(DmaUnmapRequest.TryRead(unmap, out var u2) && u2 == u);
        Assert.False(DmaMapRequest.TryRead(map.AsSpan(0, 31), out _));
        Assert.False(DmaUnmapRequest.TryRead(unmap.AsSpan(0, 23), out _));
    }

    [Fact]
    public void Device_info_irq_info_io_fds_and_set_irqs_layouts()
    {
        byte[] info = [0x10, 0, 0, 0, 0x03, 0, 0, 0, 0x09, 0, 0, 0, 0x05, 0, 0, 0];
        byte[] irq = [0x10, 0, 0, 0, 0x09, 0, 0, 0, 0x02, 0, 0, 0, 0x04, 0, 0, 0];
        byte[] iofds = [0x10, 0, 0, 0, 0, 0, 0, 0, 0x07, 0, 0, 0, 0, 0, 0, 0];
        byte[] setIrqs = [0x14, 0, 0, 0, 0x24, 0, 0, 0, 0x02, 0, 0, 0, 0x01, 0, 0, 0, 0x03, 0, 0, 0];
        Assert.Equal(info, Write(16, new DeviceInfoPayload(16, 3, 9, 5).WriteTo));
        Assert.Equal(irq, Write(16, new IrqInfoPayload(16, (uint)(IrqInfoFlags.Eventfd | IrqInfoFlags.NoResize), 2, 4).WriteTo));
        Assert.Equal(iofds, Write(16, new RegionIoFdsPayload(16, 0, 7, 0).WriteTo));
        var s = new IrqSetPayload(20, IrqSetFlags.DataEventfd | IrqSetFlags.ActionTrigger, 2, 1, 3);
        Assert.Equal(setIrqs, Write(20, s.WriteTo));
        Assert.True(DeviceInfoPayload.TryRead(info, out var i2) && i2 == new DeviceInfoPayload(16, 3, 9, 5));
        Assert.True(IrqInfoPayload.TryRead(irq, out var q2) && q2.Count == 4 && q2.Index == 2);
        Assert.True(RegionIoFdsPayload.TryRead(iofds, out var f2) && f2.Index == 7);
        Assert.True(IrqSetPayload.TryRead(setIrqs, out var s2) && s2 == s);
        Assert.False(IrqSetPayload.TryRead(setIrqs.AsSpan(0, 19), out _));
        Assert.False(DeviceInfoPayload.TryRead(info.AsSpan(0, 15), out _));
    }

    [Fact]
    public void Region_info_with_a_sparse_mmap_capability_layout()
    {
        byte[] expected =
        [
            0x40, 0, 0, 0, 0x0F, 0, 0, 0, 0x00, 0, 0, 0, 0x20, 0, 0, 0,
            0x00, 0x00, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0x01, 0x00, 0x01, 0x00, 0, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0,
            0x00, 0x10, 0, 0, 0, 0, 0, 0, 0x00, 0xF0, 0, 0, 0, 0, 0, 0,
        ];
        var b = new byte[64];
        new RegionInfoPayload(64, 0xF, 0, 32, 0x10000, 0).WriteTo(b);
        SparseMmapCap.WriteTo(b.AsSpan(32), 0, [(0x1000UL, 0xF000UL)]);
        Assert.Equal(expected, b);
        Assert.Equal(32, SparseMmapCap.SizeFor(1));
        Assert.True(RegionInfoPayload.TryRead(expected, out var r) && r.CapOffset == 32 && r.Size == 0x10000);
        Assert.True(SparseMmapCap.TryRead(expected, 32, out var areas));
        Assert.Equal([(0x1000UL, 0xF000UL)], areas);
        // A lying nr_areas or cap_offset is refused without reading past the buffer.
        var lying = (byte[])expected.Clone();
        lying[40] = 0xFF;
        Assert.False(SparseMmapCap.TryRead(lying, 32, out _));
        Assert.False(SparseMmapCap.TryRead(expected, 60, out _));
        Assert.False(SparseMmapCap.TryRead(expected, 8, out _));
    }

    [Fact]
    public void Region_access_write_multi_and_dma_access_layouts()
    {
        byte[] region = [0x10, 0, 0, 0, 0, 0, 0, 0, 0x07, 0, 0, 0, 0x04, 0, 0, 0];
        byte[] multi = [0x08, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0xAA, 0xBB, 0xCC, 0xDD, 0, 0, 0, 0];
        byte[] dma = [0x00, 0x20, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0];
        Assert.Equal(region, Write(16, new RegionAccessHead(0x10, 7, 4).WriteTo));
        Assert.Equal(multi, Write(24, new WriteMultiEntry(0x1008, 0, 4, 0xDDCCBBAA).WriteTo));
        Assert.Equal(dma, Write(16, new DmaAccessHead(0x2000, 0x40).WriteTo));
        Assert.True(RegionAccessHead.TryRead(region, out var r) && r == new RegionAccessHead(0x10, 7, 4));
        Assert.True(WriteMultiEntry.TryRead(multi, out var w) && w.Data == 0xDDCCBBAA && w.Count == 4);
        Assert.True(DmaAccessHead.TryRead(dma, out var d) && d.Count == 0x40);
        Assert.False(RegionAccessHead.TryRead(region.AsSpan(0, 15), out _));
        Assert.False(WriteMultiEntry.TryRead(multi.AsSpan(0, 23), out _));
        Assert.False(DmaAccessHead.TryRead(dma.AsSpan(0, 15), out _));
    }

    /// <summary>Reference §3.4 byte examples: the 8-byte vfio_device_feature head then inline data.</summary>
    [Fact]
    public void Device_feature_examples_from_reference_3_4()
    {
        byte[] probeMigration = [0x08, 0, 0, 0, 0x01, 0x00, 0x04, 0x00];
        byte[] getMigration = [0x10, 0, 0, 0, 0x01, 0x00, 0x01, 0x00];
        byte[] setStopCopy = [0x10, 0, 0, 0, 0x02, 0x00, 0x02, 0x00];
        byte[] getState = [0x10, 0, 0, 0, 0x02, 0x00, 0x01, 0x00];
        byte[] loggingStop = [0x08, 0, 0, 0, 0x07, 0x00, 0x02, 0x00];
        byte[] loggingStart = [0x28, 0, 0, 0, 0x06, 0x00, 0x02, 0x00];
        byte[] loggingReport = [0x28, 0, 0, 0, 0x08, 0x00, 0x01, 0x00];
        Assert.Equal(probeMigration, Write(8, new DeviceFeatureHead(8, DeviceFeatureHead.Probe | 1).WriteTo));
        Assert.Equal(getMigration, Write(8, new DeviceFeatureHead(16, DeviceFeatureHead.Get | 1).WriteTo));
        Assert.Equal(setStopCopy, Write(8, new DeviceFeatureHead(16, DeviceFeatureHead.Set | 2).WriteTo));
        Assert.Equal(getState, Write(8, new DeviceFeatureHead(16, DeviceFeatureHead.Get | 2).WriteTo));
        Assert.Equal(loggingStop, Write(8, new DeviceFeatureHead(8, DeviceFeatureHead.Set | 7).WriteTo));
        Assert.Equal(loggingStart, Write(8, new DeviceFeatureHead(40, DeviceFeatureHead.Set | 6).WriteTo));
        Assert.Equal(loggingReport, Write(8, new DeviceFeatureHead(40, DeviceFeatureHead.Get | 8).WriteTo));
        Assert.True(DeviceFeatureHead.TryRead(probeMigration, out var f) && f.Feature == 1 && f.Flags == 0x00040001);
        Assert.False(DeviceFeatureHead.TryRead(probeMigration.AsSpan(0, 7), out _));
    }

    [Fact]
    public void Mig_data_head_layout()
    {
        byte[] read = [0x08, 0x10, 0, 0, 0x00, 0x10, 0, 0];
        Assert.Equal(read, Write(8, new MigDataHead(0x1008, 0x1000).WriteTo));
        Assert.True(MigDataHead.TryRead(read, out var h) && h == new MigDataHead(0x1008, 0x1000));
        Assert.False(MigDataHead.TryRead(read.AsSpan(0, 7), out _));
    }

    [Fact]
    public void Capabilities_parse_qemus_offer_from_reference_3_3()
    {
        const string qemu = """{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}""";
        Assert.Equal(0, VfioUserCapabilities.TryParse(Encoding.UTF8.GetBytes(qemu + "\0"), out var c, out string? why));
        Assert.Null(why);
        Assert.Equal(16, c.MaxMsgFds);
        Assert.True(c.Migration && c.WriteMultiple);
        Assert.Equal(4096UL, c.MigrationPgSize);
        Assert.Equal(268435456UL, c.MigrationMaxBitmapSize);
        Assert.False(c.VmigP2P || c.VmigMigDataSize || c.VmigPrecopyInfo || c.TwinSocketSupported);
    }

    [Fact]
    public void Capabilities_produce_and_parse_back_every_field()
    {
        var c = new VfioUserCapabilities
        {
            MaxMsgFds = 8,
            MaxDataXferSize = 65536,
            MaxDmaMaps = 12,
            PgSizes = 4096 | 2097152,
            WriteMultiple = true,
            TwinSocketSupported = true,
            TwinSocketFdIndex = 0,
            Migration = true,
            MigrationPgSize = 4096,
            VmigMigDataSize = true,
            VmigPrecopyInfo = true,
            VmigP2P = true,
        };
        string json = c.ToJson();
        Assert.Equal("""{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":65536,"max_dma_maps":12,"pgsizes":2101248,"write_multiple":true,"twin_socket":{"supported":true,"fd_index":0},"migration":{"pgsize":4096},"vmig":{"mig_data_size":true,"precopy_info":true,"p2p":true}}}""", json);
        Assert.Equal(0, VfioUserCapabilities.TryParse(Encoding.UTF8.GetBytes(json + "\0"), out var back, out _));
        Assert.Equal(c, back);
    }

    [Theory]
    [InlineData("{\"capabilities\":{\"max_msg_fds\":8}", "truncated")]
    [InlineData("{\"capabilities\":{\"max_msg_fds\":\"8\"}}", "string for a number")]
    [InlineData("{\"capabilities\":{\"max_msg_fds\":-1}}", "negative")]
    [InlineData("{\"capabilities\":{\"max_msg_fds\":2000}}", "over 1024")]
    [InlineData("{\"capabilities\":{\"max_data_xfer_size\":0}}", "zero transfer size")]
    [InlineData("{\"capabilities\":{\"max_data_xfer_size\":134217728}}", "over 64 MiB")]
    [InlineData("{\"capabilities\":{\"pgsizes\":1000}}", "page size not a multiple of 4 KiB")]
    [InlineData("{\"capabilities\":{\"twin_socket\":5}}", "twin_socket not an object")]
    [InlineData("{\"capabilities\":{\"migration\":\"yes\"}}", "migration not an object")]
    [InlineData("{\"capabilities\":{\"write_multiple\":1}}", "number for a bool")]
    [InlineData("{\"capabilities\":3}", "capabilities not an object")]
    [InlineData("[1,2]", "root not an object")]
    [InlineData("nul", "not JSON")]
    public void Capabilities_reject_malformed_json_with_einval(string json, string what)
    {
        int e = VfioUserCapabilities.TryParse(Encoding.UTF8.GetBytes(json + "\0"), out var c, out string? why);
        Assert.True(e == Errno.EINVAL, what);
        Assert.NotNull(why);
        Assert.Equal(new VfioUserCapabilities(), c);
    }

    [Fact]
    public void Capabilities_without_a_nul_terminator_are_refused()
    {
        Assert.Equal(Errno.EINVAL, VfioUserCapabilities.TryParse("{}"u8, out _, out string? why));
        Assert.Contains("NUL", why, StringComparison.Ordinal);
        Assert.Equal(0, VfioUserCapabilities.TryParse(ReadOnlySpan<byte>.Empty, out var d, out _));
        Assert.Equal(VfioUserCapabilities.DefaultMaxDataXferSize, d.MaxDataXferSize);
    }
}
