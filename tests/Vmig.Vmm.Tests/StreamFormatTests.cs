using Vmig.Spec;
using System.Buffers.Binary;
using Vmig.Vmm;
using Vmig.Vmm.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Tests;

public class StreamFormatTests
{
    // Golden bytes computed independently (bitwise CRC-32C in Python), see docs/stream-format.md §5.
    private const string StreamHeaderGolden = "564d49475354524d01000000dda888ad";
    private const string StreamHeader11Golden = "564d49475354524d01000100aa302abe";
    private const string OptionalRoundInfoGolden = "0d000000030000002f32d0ee010203";
    private const string EndOfStateGolden = "09000100000000006ea01f68";

    [Fact]
    public void Crc32C_MatchesTheStandardCheckValue() =>
        Assert.Equal(0xE3069283u, Crc32C.Compute("123456789"u8));

    [Fact]
    public void StreamHeader_GoldenBytes_CurrentIs11And10StillWritable()
    {
        var ms = new MemoryStream();
        new SectionWriter(ms).WriteStreamHeader();
        Assert.Equal(StreamHeader11Golden, Convert.ToHexStringLower(ms.ToArray()));
        ms = new MemoryStream();
        new SectionWriter(ms).WriteStreamHeader(minor: 0);
        Assert.Equal(StreamHeaderGolden, Convert.ToHexStringLower(ms.ToArray()));
    }

    [Fact]
    public void Sections_GoldenBytes()
    {
        var ms = new MemoryStream();
        var w = new SectionWriter(ms);
        w.Write(SectionType.RoundInfo, [1, 2, 3]);
        w.Write(SectionType.EndOfState, []);
        Assert.Equal(OptionalRoundInfoGolden + EndOfStateGolden, Convert.ToHexStringLower(ms.ToArray()));
        Assert.Equal(15 + 12, w.BytesWritten);
    }

    [Fact]
    public void Reader_RoundTripsSectionsAndEndsCleanly()
    {
        var ms = new MemoryStream(Convert.FromHexString(StreamHeaderGolden + OptionalRoundInfoGolden + EndOfStateGolden));
        var r = new SectionReader(ms);
        Assert.Equal(1, r.ReadStreamHeader().Major);
        Assert.True(r.ReadNext());
        Assert.Equal(SectionType.RoundInfo, r.Type);
        Assert.Equal(new byte[] { 1, 2, 3 }, r.Payload.ToArray());
        Assert.True(r.ReadNext());
        Assert.Equal(SectionType.EndOfState, r.Type);
        Assert.Equal(0, r.Payload.Length);
        Assert.False(r.ReadNext());
    }

    [Theory]
    [InlineData(12)] // first payload byte
    [InlineData(0)]  // type
    [InlineData(4)]  // length's low byte changes what the CRC covers
    [InlineData(8)]  // the CRC itself
    public void Reader_RejectsAnyFlippedBit(int offset)
    {
        byte[] b = Convert.FromHexString(OptionalRoundInfoGolden);
        b[offset] ^= 0x01;
        var r = new SectionReader(new MemoryStream(b));
        Assert.ThrowsAny<IOException>(() => r.ReadNext());
    }

    [Fact]
    public void Reader_RejectsCorruptedPayloadWithCrcError()
    {
        byte[] b = Convert.FromHexString(OptionalRoundInfoGolden);
        b[^1] ^= 0x80;
        var e = Assert.Throws<StreamFormatException>(() => new SectionReader(new MemoryStream(b)).ReadNext());
        Assert.Contains("CRC", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Reader_FailsOnUnknownMandatorySection()
    {
        var ms = new MemoryStream();
        new SectionWriter(ms).WriteRaw(0x7777, SectionFlags.Mandatory, [9, 9]);
        ms.Position = 0;
        var e = Assert.Throws<StreamFormatException>(() => new SectionReader(ms).ReadNext());
        Assert.Contains("unknown mandatory", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Reader_SkipsUnknownOptionalSection()
    {
        var ms = new MemoryStream();
        var w = new SectionWriter(ms);
        w.WriteRaw(0x7777, SectionFlags.None, new byte[1000]);
        w.Write(SectionType.EndOfState, []);
        ms.Position = 0;
        var r = new SectionReader(ms);
        Assert.True(r.ReadNext());
        Assert.Equal(SectionType.EndOfState, r.Type);
        Assert.Equal(1, r.SkippedSections);
    }

    [Fact]
    public void Reader_RejectsReservedFlagBits()
    {
        var ms = new MemoryStream();
        new SectionWriter(ms).WriteRaw((ushort)SectionType.EndOfState, (SectionFlags)0x8001, []);
        ms.Position = 0;
        Assert.Throws<StreamFormatException>(() => new SectionReader(ms).ReadNext());
    }

    [Fact]
    public void Reader_BoundsLengthBeforeAllocating()
    {
        // A header claiming 4 GiB - 1 bytes, followed by nothing: must be refused on the length, not by running out
        // of memory or waiting for data.
        var b = new byte[12];
        BinaryPrimitives.WriteUInt16LittleEndian(b, (ushort)SectionType.RamPages);
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(2), 1);
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(4), uint.MaxValue);
        var e = Assert.Throws<StreamFormatException>(() => new SectionReader(new MemoryStream(b), maxPayload: 1 << 20).ReadNext());
        Assert.Contains("exceeds the limit", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Reader_ReportsTruncation()
    {
        byte[] b = Convert.FromHexString(OptionalRoundInfoGolden);
        Assert.Throws<EndOfStreamException>(() => new SectionReader(new MemoryStream(b[..14])).ReadNext());
        Assert.Throws<EndOfStreamException>(() => new SectionReader(new MemoryStream(b[..5])).ReadNext());
    }

    [Fact]
    public void Reader_RejectsBadMagicAndUnknownMajorVersion()
    {
        byte[] b = Convert.FromHexString(StreamHeaderGolden);
        b[0] = (byte)'X';
        Assert.Throws<StreamFormatException>(() => new SectionReader(new MemoryStream(b)).ReadStreamHeader());
        var ms = new MemoryStream();
        new SectionWriter(ms).WriteStreamHeader(major: 2, minor: 0);
        ms.Position = 0;
        var e = Assert.Throws<StreamFormatException>(() => new SectionReader(ms).ReadStreamHeader());
        Assert.Contains("version 2.0", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void RamPages_EncodeApplyRoundTripWithZeroPagesAndRoundOrdering()
    {
        using var src = GuestRam.Create(64 * 1024);
        using var dst = GuestRam.Create(64 * 1024);
        src.Write(4096 * 3, new byte[] { 0xAB, 0xCD });
        src.Write(4096 * 5, Enumerable.Repeat((byte)7, 4096).ToArray());
        var buf = new byte[RamPages.MaxPayload];
        int len = RamPages.Encode(src, 2, 0, 16, buf, out int zeros);
        Assert.Equal(14, zeros);
        // Two data pages + records for runs [0-2]z [3]d [4]z [5]d [6-15]z = 5 records.
        Assert.Equal(8 + (5 * 16) + (2 * 4096), len);
        var rounds = new PageRounds(dst.PageCount);
        // Round 1 wrote page 0 with data; round 2's ZERO record for it must clear it.
        using (var earlier = GuestRam.Create(64 * 1024))
        {
            earlier.Write(0, Enumerable.Repeat((byte)0xEE, 4096).ToArray());
            var b1 = new byte[RamPages.MaxPayload];
            RamPages.Apply(dst, b1.AsSpan(0, RamPages.Encode(earlier, 1, 0, 1, b1, out _)), rounds);
            Assert.Equal(0xEE, dst.GetHostSpan(0, 1)[0]);
        }
        Assert.Equal(16, RamPages.Apply(dst, buf.AsSpan(0, len), rounds));
        Assert.True(src.GetHostSpan(0, 65536).SequenceEqual(dst.GetHostSpan(0, 65536)));

        // An older round arriving late (another connection) must not overwrite newer pages.
        using var old = GuestRam.Create(64 * 1024);
        old.Write(4096 * 5, Enumerable.Repeat((byte)1, 4096).ToArray());
        int oldLen = RamPages.Encode(old, 1, 5, 1, buf, out _);
        RamPages.Apply(dst, buf.AsSpan(0, oldLen), rounds);
        Assert.Equal(7, dst.GetHostSpan(4096 * 5, 1)[0]);
    }

    [Fact]
    public void RamPages_RejectsRangesOutsideRam()
    {
        using var ram = GuestRam.Create(8192);
        var p = new byte[8 + 16];
        BinaryPrimitives.WriteUInt64LittleEndian(p.AsSpan(8), 4096);
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(16), 2); // pages 1-2 of a 2-page RAM
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(20), RamPages.ZeroFlag);
        Assert.Throws<StreamFormatException>(() => RamPages.Apply(ram, p, new PageRounds(ram.PageCount)));
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(16), 1);
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(20), 0); // data flag but no data
        Assert.Throws<StreamFormatException>(() => RamPages.Apply(ram, p, new PageRounds(ram.PageCount)));
    }
}
