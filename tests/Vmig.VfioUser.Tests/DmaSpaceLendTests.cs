using System.Buffers;
using Vmig.Native;
using Vmig.VfioUser.Server;

namespace Vmig.VfioUser.Tests;

/// <summary>
/// DmaSpace.TryLendWritable / TryLendReadable: guest memory lent in place only inside one fd-backed window with the
/// right protection, dirty-logged like TryWrite; every refusal leaves the action uncalled so the caller can copy.
/// </summary>
public sealed class DmaSpaceLendTests : IDisposable
{
    private const ulong Base = 0x4000_0000;
    private const int Size = 64 << 10;
    private readonly UnixFd _fd = MemFd.Create("lend-ram", Size);
    private readonly Mapping _view;
    private readonly DmaSpace _dma = new();

    public DmaSpaceLendTests() => _view = Mapping.Map(_fd, 0, Size);

    public void Dispose()
    {
        _dma.Dispose();
        _view.Dispose();
        _fd.Dispose();
    }

    private void MapAll(DmaProt prot = DmaProt.Read | DmaProt.Write) =>
        Assert.Equal(0, _dma.Map(Base, Size, prot, Mapping.Map(_fd, 0, Size)));

    private static readonly SpanAction<byte, byte> Fill = static (span, b) => span.Fill(b);

    [Fact]
    public void LendWritable_StoresGoStraightIntoTheWindowsMemory()
    {
        MapAll();
        Assert.True(_dma.TryLendWritable(Base + 0x1000, 4096, (byte)0xAB, Fill));
        Assert.True(_view.GetSpan(0x1000, 4096).ToArray().All(b => b == 0xAB));
        Assert.Equal(0, _view.GetSpan(0x0FFF, 1)[0]);
        Assert.Equal(0, _view.GetSpan(0x2000, 1)[0]);
    }

    [Fact]
    public void LendWritable_WhileLogging_MarksEveryTouchedPageDirty()
    {
        MapAll();
        Assert.Equal(0, _dma.StartWriteLog(4096));
        // 16 bytes across the page 1 / page 2 boundary.
        Assert.True(_dma.TryLendWritable(Base + 0x2000 - 8, 16, (byte)1, Fill));
        var bits = new ulong[1];
        Assert.Equal(0, _dma.ReportWriteLog(Base, Size, 4096, bits));
        Assert.Equal(0b110UL, bits[0]);
    }

    [Fact]
    public void LendWritable_ActionThrows_PagesStillMarkedDirty()
    {
        MapAll();
        Assert.Equal(0, _dma.StartWriteLog(4096));
        Assert.Throws<IOException>(() => _dma.TryLendWritable(Base + 0x3000, 4096, 0, static (span, _) =>
        {
            span[..100].Fill(7); // a pread that failed halfway
            throw new IOException("EIO");
        }));
        var bits = new ulong[1];
        Assert.Equal(0, _dma.ReportWriteLog(Base, Size, 4096, bits));
        Assert.Equal(1UL << 3, bits[0]);
    }

    [Fact]
    public void LendReadable_SeesGuestBytes_AndLogsNothing()
    {
        MapAll();
        Assert.Equal(0, _dma.StartWriteLog(4096));
        _view.GetSpan(0x500, 4).Fill(0x5C);
        byte[] seen = [];
        Assert.True(_dma.TryLendReadable(Base + 0x500, 4, 0, (span, _) => seen = span.ToArray()));
        Assert.Equal(new byte[] { 0x5C, 0x5C, 0x5C, 0x5C }, seen);
        var bits = new ulong[1];
        Assert.Equal(0, _dma.ReportWriteLog(Base, Size, 4096, bits));
        Assert.Equal(0UL, bits[0]);
    }

    [Fact]
    public void Lend_AcrossTwoAdjacentWindows_IsRefused()
    {
        Assert.Equal(0, _dma.Map(Base, Size / 2, DmaProt.Read | DmaProt.Write, Mapping.Map(_fd, 0, Size / 2)));
        Assert.Equal(0, _dma.Map(Base + Size / 2, Size / 2, DmaProt.Read | DmaProt.Write, Mapping.Map(_fd, Size / 2, Size / 2)));
        bool called = false;
        Assert.False(_dma.TryLendWritable(Base + Size / 2 - 8, 16, 0, (_, _) => called = true));
        Assert.False(_dma.TryLendReadable(Base + Size / 2 - 8, 16, 0, (_, _) => called = true));
        Assert.False(called);
        // Each half on its own is lent.
        Assert.True(_dma.TryLendWritable(Base + Size / 2 - 8, 8, 0, (_, _) => called = true));
        Assert.True(called);
    }

    [Fact]
    public void Lend_WindowWithoutFd_IsRefused_EvenWithMessageDma()
    {
        Assert.Equal(0, _dma.Map(Base, Size, DmaProt.Read | DmaProt.Write, null));
        _dma.MessageDma = new NoMessages();
        bool called = false;
        Assert.False(_dma.TryLendWritable(Base, 4096, 0, (_, _) => called = true));
        Assert.False(_dma.TryLendReadable(Base, 4096, 0, (_, _) => called = true));
        Assert.False(called);
    }

    [Fact]
    public void Lend_NeedsTheWindowsProtection()
    {
        Assert.Equal(0, _dma.Map(Base, Size / 2, DmaProt.Read, Mapping.Map(_fd, 0, Size / 2)));
        Assert.Equal(0, _dma.Map(Base + Size / 2, Size / 2, DmaProt.Write, Mapping.Map(_fd, Size / 2, Size / 2)));
        bool called = false;
        Assert.False(_dma.TryLendWritable(Base, 16, 0, (_, _) => called = true)); // read-only window
        Assert.False(_dma.TryLendReadable(Base + Size / 2, 16, 0, (_, _) => called = true)); // write-only window
        Assert.False(called);
        Assert.True(_dma.TryLendReadable(Base, 16, 0, (_, _) => { }));
        Assert.True(_dma.TryLendWritable(Base + Size / 2, 16, 0, (_, _) => { }));
    }

    [Fact]
    public void Lend_OutsideEveryWindow_AfterUnmap_OrEmpty_IsRefused()
    {
        MapAll();
        bool called = false;
        Assert.False(_dma.TryLendWritable(Base + Size - 8, 16, 0, (_, _) => called = true)); // runs past the end
        Assert.False(_dma.TryLendWritable(Base, 0, 0, (_, _) => called = true));
        Assert.False(_dma.TryLendWritable(Base - 4096, 16, 0, (_, _) => called = true));
        Assert.Equal(0, _dma.Unmap(Base, Size));
        Assert.False(_dma.TryLendWritable(Base, 16, 0, (_, _) => called = true));
        Assert.False(called);
    }

    private sealed class NoMessages : IMessageDma
    {
        public int Read(ulong iova, Span<byte> destination) => 0;

        public int Write(ulong iova, ReadOnlySpan<byte> source) => 0;
    }
}
