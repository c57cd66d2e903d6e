using Vmig.Spec;

namespace Vmig.Devices.Tests;

/// <summary>
/// Vmig.Spec.Crc32C against RFC 3720 B.4 vectors and a bit-at-a-time reference (written here, independent of the
/// implementation), over every length 0..4096 at odd alignments, across the three-lane block boundaries and the 512-bit
/// folding path's block and tail boundaries (with copy), single-bit flips in every fold lane, and split into chunks.
/// </summary>
public class Crc32CTests
{
    /// <summary>Bitwise CRC-32C: reflected 0x82F63B78, one bit a step; running value in, running value out.</summary>
    private static uint Reference(uint crc, ReadOnlySpan<byte> data)
    {
        foreach (byte b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++)
            {
                crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
            }
        }
        return crc;
    }

    private static uint Reference(ReadOnlySpan<byte> data) => ~Reference(0xFFFFFFFF, data);

    [Fact]
    public void CheckValueOf123456789IsE3069283()
    {
        Assert.Equal(0xE3069283u, Crc32C.Compute("123456789"u8));
        Assert.Equal(0xE3069283u, Reference("123456789"u8));
    }

    [Fact]
    public void EmptyInputIsZeroAndAppendKeepsTheRunningValue()
    {
        Assert.Equal(0u, Crc32C.Compute([]));
        Assert.Equal(0x12345678u, Crc32C.Append(0x12345678u, []));
    }

    public static TheoryData<string, byte[], uint> Rfc3720Vectors() => new()
    {
        // RFC 3720 appendix B.4; the RFC prints the CRC's bytes in wire (little-endian) order.
        { "32 bytes of zeros", new byte[32], 0x8A9136AA },
        { "32 bytes of 0xFF", Enumerable.Repeat((byte)0xFF, 32).ToArray(), 0x62A8AB43 },
        { "32 incrementing bytes 00..1F", Enumerable.Range(0, 32).Select(i => (byte)i).ToArray(), 0x46DD794E },
        { "32 decrementing bytes 1F..00", Enumerable.Range(0, 32).Select(i => (byte)(31 - i)).ToArray(), 0x113FDB5C },
        {
            "iSCSI SCSI Read (10) command PDU",
            Convert.FromHexString("01C00000" + "000000000000000000000000" + "14000000" + "00000400" + "00000014" + "00000018" + "28000000" + "00000000" + "02000000" + "00000000"),
            0xD9963A56
        },
    };

    [Theory]
    [MemberData(nameof(Rfc3720Vectors))]
    public void Rfc3720AppendixB4VectorsMatch(string name, byte[] data, uint expected)
    {
        Assert.True(expected == Crc32C.Compute(data), name);
        Assert.True(expected == Reference(data), name);
    }

    [Fact]
    public void EveryLengthUpTo4096AtOddAlignmentsMatchesTheBitwiseReference()
    {
        var buf = new byte[4096 + 8];
        new Random(32).NextBytes(buf);
        foreach (int align in new[] { 0, 1, 3, 5, 7 })
        {
            for (int len = 0; len <= 4096; len++)
            {
                var s = buf.AsSpan(align, len);
                uint want = Reference(s);
                if (Crc32C.Compute(s) != want)
                {
                    Assert.Fail($"length {len} at alignment {align}: 0x{Crc32C.Compute(s):X8}, reference 0x{want:X8}");
                }
            }
        }
    }

    [Theory]
    // Around the three-lane threshold, one full block (3 × 8 KiB lanes), block + tail, several blocks, 1 MiB + a record's header and trailer.
    [InlineData(3 * 16 * 8 - 1)]
    [InlineData(3 * 16 * 8)]
    [InlineData(3 * 16 * 8 + 7)]
    [InlineData(3 * 8192 - 8)]
    [InlineData(3 * 8192)]
    [InlineData(3 * 8192 + 1)]
    [InlineData(3 * 8192 + 383)]
    [InlineData(3 * 8192 + 384)]
    [InlineData(5 * 8192 + 13)]
    [InlineData(7 * 3 * 8192 + 24 * 17 + 5)]
    [InlineData((1 << 20) + 36)]
    public void LongInputsAcrossLaneBlockBoundariesMatchTheBitwiseReference(int length)
    {
        var buf = new byte[length + 3];
        new Random(length).NextBytes(buf);
        foreach (int align in new[] { 0, 3 })
        {
            var s = buf.AsSpan(align, length);
            Assert.Equal(Reference(s), Crc32C.Compute(s));
            uint want = Reference(0x5A5A5A5Au, s);
            Assert.Equal(want, Crc32C.Append(0x5A5A5A5Au, s));
            // On a CPU with the folding path Append never reaches the three-lane blocks at these lengths; run them
            // directly too, so the path CPUs without VPCLMULQDQ/AVX-512 take stays tested here.
            Assert.Equal(want, Crc32C.AppendUnfolded(0x5A5A5A5Au, s));
            var dst = new byte[length + 1];
            Assert.Equal(want, Crc32C.AppendCopyUnfolded(0x5A5A5A5Au, s, dst.AsSpan(1)));
            Assert.True(dst.AsSpan(1).SequenceEqual(s));
            Assert.Equal(0, dst[0]);
        }
    }

    [Theory]
    // The 512-bit folding path (when the CPU has VPCLMULQDQ + AVX-512): around its threshold (2 × 256 bytes), whole
    // 256-byte blocks with tails of every kind (none, < the three-lane threshold, ≥ it), a record's in-place slice.
    [InlineData(2 * 256 - 1)]
    [InlineData(2 * 256)]
    [InlineData(2 * 256 + 1)]
    [InlineData(3 * 256 - 1)]
    [InlineData(3 * 256)]
    [InlineData(4 * 256 + 383)]
    [InlineData(4 * 256 + 384)]
    [InlineData(17 * 256 + 255)]
    [InlineData(256 * 1024)]
    [InlineData((256 * 1024) + 4 + 32)]
    public void FoldingPathLengthsMatchTheBitwiseReferenceAndCopyExactly(int length)
    {
        var src = new byte[length + 5];
        new Random(length ^ 0x5EED).NextBytes(src);
        foreach (int align in new[] { 0, 5 })
        {
            var s = src.AsSpan(align, length);
            uint want = Reference(0xA5A5A5A5u, s);
            Assert.Equal(want, Crc32C.Append(0xA5A5A5A5u, s));
            var dst = new byte[length + 2];
            Assert.Equal(want, Crc32C.AppendCopy(0xA5A5A5A5u, s, dst.AsSpan(1)));
            Assert.True(dst.AsSpan(1, length).SequenceEqual(s));
            Assert.Equal(0, dst[0]);
            Assert.Equal(0, dst[^1]);
        }
    }

    [Fact]
    public void FoldingPathDetectsEverySingleBitFlipInEachAccumulatorLane()
    {
        // A wrong fold constant for one lane distance would make flips in that lane cancel or collide; a CRC detects
        // every single-bit error, so every flipped bit (one per 16-byte lane over three 256-byte blocks) must change it.
        var data = new byte[3 * 256];
        new Random(99).NextBytes(data);
        uint clean = Crc32C.Compute(data);
        Assert.Equal(Reference(data), clean);
        for (int lane = 0; lane < data.Length / 16; lane++)
        {
            int bit = (lane * 37) % 128;
            data[(lane * 16) + (bit / 8)] ^= (byte)(1 << (bit % 8));
            uint flipped = Crc32C.Compute(data);
            Assert.NotEqual(clean, flipped);
            Assert.Equal(Reference(data), flipped);
            data[(lane * 16) + (bit / 8)] ^= (byte)(1 << (bit % 8));
        }
    }

    [Fact]
    public void AllOnesAndAllZerosLongBuffersMatchTheBitwiseReference()
    {
        // Degenerate lane values (all lanes equal, all zero) must still join right.
        foreach (byte fill in new byte[] { 0x00, 0xFF })
        {
            var b = Enumerable.Repeat(fill, 100_000).ToArray();
            Assert.Equal(Reference(b), Crc32C.Compute(b));
        }
    }

    [Fact]
    public void ChunkedAppendEqualsOneShot()
    {
        var rng = new Random(7);
        var data = new byte[300_000];
        rng.NextBytes(data);
        uint whole = Crc32C.Compute(data);
        Assert.Equal(Reference(data), whole);
        for (int round = 0; round < 40; round++)
        {
            uint crc = Crc32C.Start;
            int at = 0;
            while (at < data.Length)
            {
                // Mix of tiny, mid and block-sized pieces so every piece takes a different mix of the two paths.
                int max = round % 3 == 0 ? 17 : round % 3 == 1 ? 5000 : 70_000;
                int n = Math.Min(data.Length - at, rng.Next(0, max + 1));
                crc = Crc32C.Append(crc, data.AsSpan(at, n));
                at += n;
            }
            Assert.Equal(whole, Crc32C.Finish(crc));
        }
    }

    [Fact]
    public void AppendCopyCopiesExactlyAndEqualsAppendForEveryLengthAndAlignment()
    {
        var src = new byte[8192 + 8];
        new Random(11).NextBytes(src);
        var dst = new byte[8192 + 24];
        var lengths = Enumerable.Range(0, 4097).Concat([3 * 16 * 8 * 2 + 5, 8192]);
        foreach (var (sa, da) in new[] { (0, 0), (1, 0), (0, 3), (5, 7) })
        {
            foreach (int len in lengths)
            {
                Array.Fill(dst, (byte)0xCC);
                var s = src.AsSpan(sa, len);
                uint got = Crc32C.AppendCopy(0x01020304u, s, dst.AsSpan(da));
                if (got != Reference(0x01020304u, s) || !dst.AsSpan(da, len).SequenceEqual(s)
                    || dst.AsSpan(0, da).IndexOfAnyExcept((byte)0xCC) >= 0 || dst.AsSpan(da + len).IndexOfAnyExcept((byte)0xCC) >= 0)
                {
                    Assert.Fail($"length {len}, source alignment {sa}, destination alignment {da}: wrong CRC or bytes outside the copy touched");
                }
            }
        }
    }

    [Fact]
    public void AppendCopyOfAMegabyteEqualsAppendAndCopy()
    {
        var src = new byte[(1 << 20) + 36];
        new Random(12).NextBytes(src);
        var dst = new byte[src.Length];
        Assert.Equal(Reference(Crc32C.Start, src), Crc32C.AppendCopy(Crc32C.Start, src, dst));
        Assert.True(dst.AsSpan().SequenceEqual(src));
    }

    [Fact]
    public void AppendCopyIntoAShorterDestinationThrowsAndWritesNothing()
    {
        var dst = new byte[100];
        Assert.Throws<ArgumentException>(() => Crc32C.AppendCopy(0, new byte[101], dst));
        Assert.True(dst.AsSpan().IndexOfAnyExcept((byte)0) < 0);
    }
}
