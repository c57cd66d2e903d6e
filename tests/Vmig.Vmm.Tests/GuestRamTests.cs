using Vmig.Native;
using Vmig.Vmm;

namespace Vmig.Vmm.Tests;

public class GuestRamTests
{
    [Fact]
    public void Write_MarksExactlyTheTouchedPages()
    {
        using var ram = GuestRam.Create(1 << 20);
        var b = new PageBitmap(ram.PageCount);
        ram.FetchAndClearDirty(b);
        Assert.Equal(0, b.Count());
        ram.Write(4096 - 2, new byte[4]);         // straddles pages 0 and 1
        ram.WriteUInt32(4096 * 7, 1);
        ram.WriteUInt64(4096 * 200 + 8, 2);
        ram.FetchAndClearDirty(b);
        Assert.Equal(new long[] { 0, 1, 7, 200 }, Enumerable.Range(0, (int)ram.PageCount).Where(p => b.Get(p)).Select(p => (long)p));
        var again = new PageBitmap(ram.PageCount);
        ram.FetchAndClearDirty(again);
        Assert.Equal(0, again.Count());
        _ = ram.ReadUInt64(4096 * 9);
        ram.Read(0, new byte[8192]);
        ram.FetchAndClearDirty(again);
        Assert.Equal(0, again.Count()); // reads never dirty
    }

    [Fact]
    public async Task ConcurrentWriters_NoDirtyPageIsMissed()
    {
        using var ram = GuestRam.Create(16 << 20);
        var collected = new PageBitmap(ram.PageCount);
        using var stop = new CancellationTokenSource();
        var fetcher = Task.Run(() =>
        {
            while (!stop.IsCancellationRequested)
            {
                ram.FetchAndClearDirty(collected);
            }
        });
        Parallel.For(0, 4, t =>
        {
            for (long p = t; p < ram.PageCount; p += 4)
            {
                ram.WriteUInt32((ulong)p * 4096 + 12, (uint)p);
            }
        });
        stop.Cancel();
        await fetcher;
        ram.FetchAndClearDirty(collected);
        Assert.Equal(ram.PageCount, collected.Count());
    }

    [Fact]
    public void Ram_IsASharedMemfdVisibleThroughAnotherMapping()
    {
        using var ram = GuestRam.Create(64 * 1024);
        ram.WriteUInt64(4096 * 3, 0x1122334455667788);
        using var other = Mapping.Map(ram.Fd, 0, 64 * 1024);
        Assert.Equal(0x1122334455667788, other.ReadInt64Volatile(4096 * 3));
        other.WriteUInt32Volatile(8, 0xCAFEBABE);
        Assert.Equal(0xCAFEBABEu, ram.ReadUInt32(8));
    }

    [Fact]
    public void Accesses_OutsideRamOrMisalignedThrow()
    {
        using var ram = GuestRam.Create(8192);
        Assert.Throws<ArgumentOutOfRangeException>(() => ram.Write(8190, new byte[4]));
        Assert.Throws<ArgumentOutOfRangeException>(() => ram.Read(ulong.MaxValue - 1, new byte[4]));
        Assert.Throws<ArgumentOutOfRangeException>(() => ram.WriteUInt32(2, 1));
        Assert.Throws<ArgumentOutOfRangeException>(() => GuestRam.Create(4097));
    }

    [Fact]
    public void PageBitmap_RunsAreMaximalAndCapped()
    {
        var b = new PageBitmap(200);
        foreach (int p in new[] { 0, 1, 2, 63, 64, 65, 130, 199 })
        {
            b.Set(p);
        }
        Assert.Equal(new[] { (0L, 2), (2L, 1), (63L, 2), (65L, 1), (130L, 1), (199L, 1) }, b.Runs(2).ToArray());
        Assert.Equal(new[] { (0L, 3), (63L, 3), (130L, 1), (199L, 1) }, b.Runs(256).ToArray());
        b.SetAll();
        Assert.Equal(200, b.Count());
        var other = new PageBitmap(200);
        other.OrRange(190, new ulong[] { 0b101, ulong.MaxValue });
        // Word 0 sets pages 190 and 192; word 1 would be pages 254-317, all beyond the bitmap.
        Assert.True(other.Get(190) && !other.Get(191) && other.Get(192));
        Assert.Equal(2, other.Count());
    }
}
