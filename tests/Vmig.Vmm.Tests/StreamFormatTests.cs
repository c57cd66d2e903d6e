using Vmig.Spec;
using System.Buffers.Binary;
using Vmig.Vmm;
using Vmig.Vmm.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Tests;

public class StreamFormatTests
{
    // Golden bytes computed independently (bitwise CRC-32C in Python), see docs/stream-format.md §7. Format 2.0:
    // 16-byte section headers (type, flags, length, header CRC, section CRC).
    private const string StreamHeaderGolden = "564d49475354524d02000000e421aacf";
    private const string StreamHeader21Golden = "564d49475354524d0200010093b908dc";
    private const string StreamHeader22Golden = "564d49475354524d020002000a11efe8";
    private const string OptionalRoundInfoGolden = "0d0000000300000023c010c42f32d0ee010203";
    private const string EndOfStateGolden = "09000100000000006ea01f686ea01f68";
    private const string CommitGolden = "100001000000000027d06ee727d06ee7";

    [Fact]
    public void Crc32C_MatchesTheStandardCheckValue() =>
        Assert.Equal(0xE3069283u, Crc32C.Compute("123456789"u8));

    [Fact]
    public void StreamHeader_GoldenBytes()
    {
        var ms = new MemoryStream();
        new SectionWriter(ms).WriteStreamHeader();
        Assert.Equal(StreamHeader22Golden, Convert.ToHexStringLower(ms.ToArray())); // this writer: 2.2
        ms = new MemoryStream();
        new SectionWriter(ms).WriteStreamHeader(minor: 1);
        Assert.Equal(StreamHeader21Golden, Convert.ToHexStringLower(ms.ToArray()));
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
        w.Write(SectionType.Commit, []);
        Assert.Equal(OptionalRoundInfoGolden + EndOfStateGolden + CommitGolden, Convert.ToHexStringLower(ms.ToArray()));
        Assert.Equal(19 + 16 + 16, w.BytesWritten);
    }

    [Fact]
    public void Reader_RoundTripsSectionsAndEndsCleanly()
    {
        var ms = new MemoryStream(Convert.FromHexString(StreamHeaderGolden + OptionalRoundInfoGolden + EndOfStateGolden));
        var r = new SectionReader(ms);
        Assert.Equal(2, r.ReadStreamHeader().Major);
        Assert.True(r.ReadNext());
        Assert.Equal(SectionType.RoundInfo, r.Type);
        Assert.Equal(new byte[] { 1, 2, 3 }, r.Payload.ToArray());
        Assert.True(r.ReadNext());
        Assert.Equal(SectionType.EndOfState, r.Type);
        Assert.Equal(0, r.Payload.Length);
        Assert.False(r.ReadNext());
    }

    [Theory]
    [InlineData(16)] // first payload byte
    [InlineData(0)]  // type
    [InlineData(4)]  // length's low byte: caught by the header CRC before any payload is read
    [InlineData(8)]  // the header CRC itself
    [InlineData(12)] // the section CRC
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
        // A header (with a valid header CRC) claiming 4 GiB - 1 bytes, followed by nothing: must be refused on the
        // length, not by running out of memory or waiting for data.
        var b = new byte[SectionHeader.Size];
        new SectionHeader((ushort)SectionType.RamPages, SectionFlags.Mandatory, uint.MaxValue, 0).WriteTo(b);
        var e = Assert.Throws<StreamFormatException>(() => new SectionReader(new MemoryStream(b), maxPayload: 1 << 20).ReadNext());
        Assert.Contains("exceeds the limit", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(SectionType.EndOfState, 16u)]
    [InlineData(SectionType.DeviceEnd, 20u)]
    [InlineData(SectionType.VcpuState, 4u + 256 + 1)]
    [InlineData(SectionType.RamPages, (uint)RamPages.MaxPayload + 1)]
    [InlineData(SectionType.Commit, 1u)]
    public void Reader_BoundsLengthByTheSectionTypeBeforeWaitingForThePayload(SectionType type, uint length)
    {
        // A header with a valid header CRC but a length the type can never have, and no payload behind it on a stream
        // that stays open: the reader must fail at once, not block waiting for bytes (issue 9: fail fast).
        var b = new byte[SectionHeader.Size];
        new SectionHeader((ushort)type, SectionFlags.Mandatory, length, 0).WriteTo(b);
        var pipe = new BlockingAfter(b);
        var e = Assert.Throws<StreamFormatException>(() => new SectionReader(pipe, 4 << 20).ReadNext());
        Assert.Contains("type's maximum", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(4, 0x10)]  // length 0 → 16 on a final EndOfState: before 2.0 the reader waited for 16 bytes
    [InlineData(6, 0x01)]  // length's third byte
    [InlineData(2, 0x01)]  // flags
    public void Reader_CorruptedHeaderFailsAtOnceOnAnOpenStream(int offset, byte bit)
    {
        byte[] b = Convert.FromHexString(EndOfStateGolden);
        b[offset] ^= bit;
        var e = Assert.Throws<StreamFormatException>(() => new SectionReader(new BlockingAfter(b), 4 << 20).ReadNext());
        Assert.Contains("header CRC", e.Message, StringComparison.Ordinal);
    }

    /// <summary>A stream that yields its bytes, then fails the test instead of blocking (a live socket that stays silent).</summary>
    private sealed class BlockingAfter(byte[] data) : MemoryStream(data)
    {
        public override int Read(byte[] buffer, int offset, int count)
        {
            int n = base.Read(buffer, offset, count);
            return n > 0 || count == 0 ? n : throw new InvalidOperationException("the reader waited for bytes beyond the header");
        }

        public override int Read(Span<byte> buffer)
        {
            var tmp = new byte[buffer.Length];
            int n = Read(tmp, 0, tmp.Length);
            tmp.AsSpan(0, n).CopyTo(buffer);
            return n;
        }
    }

    [Fact]
    public void Reader_RejectsBadMagicAndUnknownMajorVersion()
    {
        byte[] b = Convert.FromHexString(StreamHeaderGolden);
        b[0] = (byte)'X';
        Assert.Throws<StreamFormatException>(() => new SectionReader(new MemoryStream(b)).ReadStreamHeader());
        var ms = new MemoryStream();
        new SectionWriter(ms).WriteStreamHeader(major: 3, minor: 0);
        ms.Position = 0;
        var e = Assert.Throws<StreamFormatException>(() => new SectionReader(ms).ReadStreamHeader());
        Assert.Contains("version 3.0", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(false)] // one writer: claimed pages written as runs with pwrite
    [InlineData(true)]  // parallel connections: page by page under the stripe locks
    public void RamPages_EncodeApplyRoundTripWithZeroPagesAndRoundOrdering(bool concurrent)
    {
        using var src = GuestRam.Create(64 * 1024);
        using var dst = GuestRam.Create(64 * 1024);
        src.Write(4096 * 3, new byte[] { 0xAB, 0xCD });
        src.Write(4096 * 5, Enumerable.Repeat((byte)7, 4096).ToArray());
        var buf = new byte[RamPages.MaxPayload];
        int len = EncodeRun(src, 2, 0, 16, buf, out int zeros);
        Assert.Equal(14, zeros);
        // Two data pages + records for runs [0-2]z [3]d [4]z [5]d [6-15]z = 5 records.
        Assert.Equal(8 + (5 * 16) + (2 * 4096), len);
        var rounds = new PageRounds(dst.PageCount) { Concurrent = concurrent };
        // Round 1 wrote page 0 with data; round 2's ZERO record for it must clear it.
        using (var earlier = GuestRam.Create(64 * 1024))
        {
            earlier.Write(0, Enumerable.Repeat((byte)0xEE, 4096).ToArray());
            var b1 = new byte[RamPages.MaxPayload];
            RamPages.Apply(dst, b1.AsSpan(0, EncodeRun(earlier, 1, 0, 1, b1, out _)), rounds);
            Assert.Equal(0xEE, dst.GetHostSpan(0, 1)[0]);
        }
        Assert.Equal(16, RamPages.Apply(dst, buf.AsSpan(0, len), rounds));
        Assert.True(src.GetHostSpan(0, 65536).SequenceEqual(dst.GetHostSpan(0, 65536)));

        // An older round arriving late (another connection) must not overwrite newer pages.
        using var old = GuestRam.Create(64 * 1024);
        old.Write(4096 * 5, Enumerable.Repeat((byte)1, 4096).ToArray());
        int oldLen = EncodeRun(old, 1, 5, 1, buf, out _);
        RamPages.Apply(dst, buf.AsSpan(0, oldLen), rounds);
        Assert.Equal(7, dst.GetHostSpan(4096 * 5, 1)[0]);

        // A record only partly superseded: round 4 wrote page 5, then round 3 brings pages 4-6. Pages 4 and 6 take
        // round 3's bytes (the write is split around page 5), page 5 keeps round 4's.
        using var r4 = GuestRam.Create(64 * 1024);
        r4.Write(4096 * 5, Enumerable.Repeat((byte)4, 4096).ToArray());
        RamPages.Apply(dst, buf.AsSpan(0, EncodeRun(r4, 4, 5, 1, buf, out _)), rounds);
        using var r3 = GuestRam.Create(64 * 1024);
        r3.Write(4096 * 4, Enumerable.Repeat((byte)3, 3 * 4096).ToArray());
        Assert.Equal(3, RamPages.Apply(dst, buf.AsSpan(0, EncodeRun(r3, 3, 4, 3, buf, out _)), rounds));
        Assert.True(dst.GetHostSpan(4096 * 4, 4096).ToArray().All(x => x == 3));
        Assert.True(dst.GetHostSpan(4096 * 5, 4096).ToArray().All(x => x == 4));
        Assert.True(dst.GetHostSpan(4096 * 6, 4096).ToArray().All(x => x == 3));
    }

    /// <summary>One payload: the 8-byte header and the run [first, first+count), all-zero pages as ZERO records. Returns its length.</summary>
    private static int EncodeRun(GuestRam ram, uint round, long first, int count, byte[] buffer, out int zeroPages)
    {
        var builder = new RamSectionBuilder(ram, omitZeroPages: false);
        Assert.Equal(count, builder.Plan(first, count, out zeroPages));
        var frame = new byte[SectionHeader.Size + RamPages.MaxPayload];
        int length = builder.Build(frame, round, out _);
        frame.AsSpan(SectionHeader.Size, length).CopyTo(buffer);
        return length;
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
