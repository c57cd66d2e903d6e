using Vmig.Native;

namespace Vmig.VfioUser.Tests;

/// <summary>SCM_RIGHTS over a real socket pair: a memfd written by one side is read by the other; an eventfd signalled by one side wakes the other.</summary>
public sealed class FdPassingTests
{
    [Fact]
    public void A_memfd_passed_over_a_socket_pair_shares_memory_both_ways()
    {
        var (a, b) = FdSocket.CreatePair();
        using var _a = a;
        using var _b = b;
        using var fd = MemFd.Create("pass", 8192);
        using var mine = Mapping.Map(fd, 0, 8192);
        mine.GetSpan(4096, 4).Fill(0x5A);
        a.Send([1, 2, 3], default, [fd.Fd]);
        var got = new List<UnixFd>();
        var buf = new byte[3];
        Assert.True(b.Receive(buf, got, out bool truncated));
        Assert.False(truncated);
        Assert.Equal(new byte[] { 1, 2, 3 }, buf);
        var theirs = Assert.Single(got);
        Assert.NotEqual(fd.Fd, theirs.Fd);
        using (theirs)
        {
            using var map = Mapping.Map(theirs, 0, 8192);
            Assert.Equal(new byte[] { 0x5A, 0x5A, 0x5A, 0x5A }, map.GetSpan(4096, 4).ToArray());
            map.GetSpan(0, 2).Fill(0xC3);
        }
        Assert.Equal(new byte[] { 0xC3, 0xC3 }, mine.GetSpan(0, 2).ToArray());
    }

    [Fact]
    public void An_eventfd_passed_over_a_socket_pair_wakes_the_sender()
    {
        var (a, b) = FdSocket.CreatePair();
        using var _a = a;
        using var _b = b;
        using var ev = EventFd.Create();
        a.Send([9], default, [ev.Handle.Fd]);
        var got = new List<UnixFd>();
        Assert.True(b.Receive(new byte[1], got, out _));
        using var theirs = EventFd.FromHandle(Assert.Single(got));
        Assert.Equal(0UL, ev.Wait(0));
        theirs.Signal(3);
        Assert.Equal(3UL, ev.Wait(5000));
    }

    [Fact]
    public void Fds_sent_without_a_receiver_list_are_closed_not_leaked()
    {
        var (a, b) = FdSocket.CreatePair();
        using var _a = a;
        using var _b = b;
        using var fd = MemFd.Create("drop", 4096);
        int before = Directory.GetFiles("/proc/self/fd").Length;
        for (int i = 0; i < 300; i++)
        {
            a.Send([1], default, [fd.Fd]);
            Assert.True(b.Receive(new byte[1], null, out _));
        }
        // A leak would add 300 descriptors; other tests running in parallel open far fewer than 150 at a time.
        int after = Directory.GetFiles("/proc/self/fd").Length;
        Assert.True(after < before + 150, $"{before} fds before, {after} after");
    }

    [Fact]
    public void Closing_our_copy_of_a_socket_passed_to_a_peer_keeps_the_peers_copy_connected()
    {
        var (a, b) = FdSocket.CreatePair();
        using var _a = a;
        using var _b = b;
        var (twinKeep, twinGive) = FdSocket.CreatePair();
        using var _k = twinKeep;
        a.Send([7], default, [twinGive.Fd]);
        twinGive.CloseKeepingConnection();
        var got = new List<UnixFd>();
        Assert.True(b.Receive(new byte[1], got, out _));
        using var theirs = FdSocket.FromFd(Assert.Single(got));
        theirs.Send([42], default, default);
        var one = new byte[1];
        Assert.True(twinKeep.Receive(one, null, out _));
        Assert.Equal(42, one[0]);
    }

    [Fact]
    public void TryReceive_gives_up_before_the_first_byte_without_consuming_it_and_WaitReadable_tells_socket_from_wake()
    {
        var (a, b) = FdSocket.CreatePair();
        using var _a = a;
        using var _b = b;
        using var wake = EventFd.Create();
        var buf = new byte[4];
        Assert.Equal(ReceiveStatus.WouldBlock, b.TryReceive(buf, null, dontWait: true, out _));
        b.SetReceiveTimeout(50);
        var sw = System.Diagnostics.Stopwatch.StartNew();
        Assert.Equal(ReceiveStatus.TimedOut, b.TryReceive(buf, null, dontWait: false, out _));
        Assert.InRange(sw.ElapsedMilliseconds, 30, 5000);
        Assert.False(b.WaitReadable(0, wake.Handle, out bool woken));
        Assert.False(woken);
        wake.Signal();
        Assert.False(b.WaitReadable(5000, wake.Handle, out woken));
        Assert.True(woken);
        // The first two bytes arrive alone: once a byte is in, TryReceive waits for the rest even with dontWait.
        a.Send([1, 2], default, default);
        Assert.True(b.WaitReadable(5000, null, out woken));
        Assert.False(woken);
        var late = new Thread(() =>
        {
            Thread.Sleep(100);
            a.Send([3, 4, 5], default, default);
        });
        late.Start();
        Assert.Equal(ReceiveStatus.Received, b.TryReceive(buf, null, dontWait: true, out _));
        Assert.True(late.Join(5000));
        Assert.Equal(new byte[] { 1, 2, 3, 4 }, buf);
        // Nothing of the next message was lost to the timeouts above.
        Assert.Equal(ReceiveStatus.Received, b.TryReceive(buf.AsSpan(0, 1), null, dontWait: true, out _));
        Assert.Equal(5, buf[0]);
        a.Shutdown();
        Assert.Equal(ReceiveStatus.EndOfStream, b.TryReceive(buf, null, dontWait: false, out _));
    }
}
