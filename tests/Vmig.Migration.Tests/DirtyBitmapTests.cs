using Vmig.Migration;

namespace Vmig.Migration.Tests;

public class DirtyBitmapTests
{
    private const ulong K4 = 4096;

    [Fact]
    public void WireBytesAreLittleEndianWordsLsbFirst()
    {
        // 72 pages of 4 KiB at 0x10000 -> 2 words (16 bytes).
        var bm = new DirtyBitmap(0x10000, 72 * K4, K4);
        foreach (ulong p in new ulong[] { 0, 1, 8, 63, 64, 71 })
        {
            bm.SetPage(p);
        }
        var wire = new byte[bm.ByteLength];
        bm.WriteTo(wire);
        byte[] golden =
        [
            0x03, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, // word 0: bits 0, 1, 8, 63
            0x81, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // word 1: bits 0 (page 64), 7 (page 71)
        ];
        Assert.Equal(golden, wire);
    }

    [Theory]
    [InlineData(1 * K4, K4, 8UL)]           // 1 page
    [InlineData(64 * K4, K4, 8UL)]          // 64 pages: one word
    [InlineData(65 * K4, K4, 16UL)]         // 65 pages: two words
    [InlineData(K4 + 1, K4, 8UL)]           // partial last page counts
    [InlineData(128UL << 30, 2UL << 20, 8UL * 1024)] // 128 GiB in 2 MiB pages = 65536 pages
    public void ByteLengthIsRoundupPagesTo64Over8(ulong length, ulong pageSize, ulong expected)
    {
        Assert.Equal(0, DirtyBitmap.TryGetByteLength(0, length, pageSize, out ulong bytes));
        Assert.Equal(expected, bytes);
        Assert.Equal((int)expected, new DirtyBitmap(0, length, pageSize).ByteLength);
    }

    [Theory]
    [InlineData(0UL, 0UL, K4)]               // empty range
    [InlineData(0UL, K4, 3000UL)]            // page size not a power of two
    [InlineData(0UL, K4, 0UL)]               // page size zero
    [InlineData(0x800UL, K4, K4)]            // iova not page-aligned
    [InlineData(0xFFFF_FFFF_FFFF_F000UL, 2 * K4, K4)] // wraps past 2^64
    [InlineData(0UL, 1UL << 62, 1UL)]        // bitmap far beyond the 256 MiB cap
    public void BadGeometryIsRejectedBeforeAllocating(ulong iova, ulong length, ulong pageSize)
    {
        Assert.Equal(22, DirtyBitmap.TryGetByteLength(iova, length, pageSize, out _));
        Assert.Throws<ArgumentException>(() => new DirtyBitmap(iova, length, pageSize));
        Assert.False(DirtyBitmap.TryRead(iova, length, pageSize, new byte[64], out var bm));
        Assert.Null(bm);
    }

    [Fact]
    public void LargestAllowedBitmapIs256MiB()
    {
        Assert.Equal(0, DirtyBitmap.TryGetByteLength(0, (1UL << 31) * K4, K4, out ulong bytes));
        Assert.Equal(DirtyBitmap.MaxByteLength, bytes);
        Assert.Equal(22, DirtyBitmap.TryGetByteLength(0, ((1UL << 31) + 64) * K4, K4, out _));
    }

    [Fact]
    public void ReadRoundTripsWireBytes()
    {
        var bm = new DirtyBitmap(0x4000_0000, 100 * K4, K4);
        bm.SetPage(3);
        bm.SetPage(70);
        bm.SetPage(99);
        var wire = new byte[bm.ByteLength + 5]; // extra trailing bytes are ignored
        bm.WriteTo(wire);
        Assert.True(DirtyBitmap.TryRead(0x4000_0000, 100 * K4, K4, wire, out var back));
        Assert.Equal(bm.Words.ToArray(), back!.Words.ToArray());
        Assert.Equal(new ulong[] { 0x4000_3000, 0x4004_6000, 0x4006_3000 }, back.EnumerateDirtyPages());
    }

    [Fact]
    public void ReadRejectsShortBuffersAndBitsPastTheLastPage()
    {
        Assert.False(DirtyBitmap.TryRead(0, 100 * K4, K4, new byte[15], out _));
        var wire = new byte[16];
        wire[15] = 0x80; // page 127 of a 100-page range
        Assert.False(DirtyBitmap.TryRead(0, 100 * K4, K4, wire, out _));
        wire[15] = 0;
        wire[12] = 0x08; // bit 99 = byte 12 bit 3: the last valid page
        Assert.True(DirtyBitmap.TryRead(0, 100 * K4, K4, wire, out var bm));
        Assert.True(bm!.IsPageSet(99));
    }

    [Fact]
    public void WriteToRejectsAShortDestination()
    {
        var bm = new DirtyBitmap(0, 65 * K4, K4);
        Assert.Throws<ArgumentException>(() => bm.WriteTo(new byte[8]));
    }

    [Fact]
    public void MarkRangeDirtiesEveryTouchedPageClippedToTheRange()
    {
        var bm = new DirtyBitmap(0x10000, 8 * K4, K4);
        bm.MarkRange(0x10FFF, 2);               // straddles pages 0 and 1
        bm.MarkRange(0x0F000, 0x1800);          // starts before the range: the part inside (0x10000..0x107FF) is page 0
        bm.MarkRange(0x17800, 0x10000);         // runs past the end: page 7 only
        bm.MarkRange(0x30000, K4);              // entirely outside
        bm.MarkRange(0x13000, 0);               // empty
        bm.MarkRange(0xFFFF_FFFF_FFFF_F000, 0x2000); // wraps: outside, must not throw
        Assert.Equal(new ulong[] { 0x10000, 0x11000, 0x17000 }, bm.EnumerateDirtyPages());
        Assert.Equal(3UL, bm.Count());
        Assert.True(bm.IsDirty(0x11ABC));
        Assert.False(bm.IsDirty(0x12000));
        Assert.False(bm.IsDirty(0x18000));
        Assert.False(bm.IsDirty(0x0F000));
    }

    [Fact]
    public void PageIndexOutsideTheBitmapThrows()
    {
        var bm = new DirtyBitmap(0, 10 * K4, K4);
        Assert.Throws<ArgumentOutOfRangeException>(() => bm.SetPage(10));
        Assert.Throws<ArgumentOutOfRangeException>(() => bm.IsPageSet(64));
    }

    [Fact]
    public void OrMergesAndClearEmpties()
    {
        var a = new DirtyBitmap(0, 130 * K4, K4);
        var b = new DirtyBitmap(0, 130 * K4, K4);
        a.SetPage(1);
        b.SetPage(1);
        b.SetPage(129);
        a.Or(b);
        Assert.Equal(2UL, a.Count());
        Assert.True(a.IsPageSet(129));
        a.Clear();
        Assert.Equal(0UL, a.Count());
        Assert.Empty(a.EnumerateDirtyPages());
        Assert.Throws<ArgumentException>(() => a.Or(new DirtyBitmap(0, 130 * K4, 2 * K4)));
        Assert.Throws<ArgumentException>(() => a.Or(new DirtyBitmap(K4, 130 * K4, K4)));
    }

    [Fact]
    public void FoldOrsFinePagesIntoCoarsePages()
    {
        // 72 fine 4 KiB pages -> 18 coarse 16 KiB pages.
        var fine = new DirtyBitmap(0x100000, 72 * K4, K4);
        foreach (ulong p in new ulong[] { 0, 5, 6, 63, 64, 71 })
        {
            fine.SetPage(p);
        }
        var coarse = fine.Fold(4 * K4);
        Assert.Equal(18UL, coarse.PageCount);
        Assert.Equal(4 * K4, coarse.PageSize);
        // fine 0 -> 0; 5,6 -> 1; 63 -> 15; 64 -> 16; 71 -> 17
        var wire = new byte[coarse.ByteLength];
        coarse.WriteTo(wire);
        Assert.Equal(new byte[] { 0x03, 0x80, 0x03, 0, 0, 0, 0, 0 }, wire);
        Assert.Equal(5UL, coarse.Count());
        Assert.Equal(6UL, fine.Count()); // the source is untouched
    }

    [Fact]
    public void FoldToTheSamePageSizeCopies()
    {
        var fine = new DirtyBitmap(0, 3 * K4, K4);
        fine.SetPage(2);
        var same = fine.Fold(K4);
        Assert.NotSame(fine, same);
        Assert.Equal(fine.Words.ToArray(), same.Words.ToArray());
    }

    [Fact]
    public void FoldToAHugePageCoversAPartialTail()
    {
        var fine = new DirtyBitmap(0, 600 * K4, K4); // 2.34 MiB
        fine.SetPage(599);
        var huge = fine.Fold(2UL << 20);
        Assert.Equal(2UL, huge.PageCount);
        Assert.Equal(new ulong[] { 2UL << 20 }, huge.EnumerateDirtyPages());
    }

    [Theory]
    [InlineData(2048UL)]   // finer than the source
    [InlineData(12288UL)]  // not a power of two
    public void FoldRejectsBadPageSizes(ulong pageSize)
    {
        var bm = new DirtyBitmap(0, 16 * K4, K4);
        Assert.Throws<ArgumentException>(() => bm.Fold(pageSize));
    }

    [Fact]
    public void FoldRejectsAnIovaNotAlignedToTheCoarsePage()
    {
        var bm = new DirtyBitmap(K4, 16 * K4, K4);
        Assert.Throws<ArgumentException>(() => bm.Fold(4 * K4));
    }
}
