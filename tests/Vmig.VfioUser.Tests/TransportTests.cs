using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text;
using Vmig.Native;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Transport;

namespace Vmig.VfioUser.Tests;

/// <summary>
/// <see cref="VfioUserConnection"/>'s leader/follower receive over a real socketpair: callers reading their own
/// replies, replies read for other callers, peer commands (DMA_READ) arriving while callers read, replies received
/// straight into caller spans, timeouts, oversized replies and shutdown.
/// </summary>
public sealed class TransportTests
{
    private static byte Pattern(ulong address, int i) => (byte)((address >> 3) + (ulong)i * 7 + 1);

    private static void ServeDmaRead(VfioUserConnection c, VfioUserMessage m)
    {
        if (m.Header.Command != VfioUserCommand.DmaRead || !DmaAccessHead.TryRead(m.Payload, out var a) || a.Count > 4096)
        {
            c.SendError(m.Header, Errno.EINVAL);
            return;
        }
        var data = new byte[a.Count];
        for (int i = 0; i < data.Length; i++)
        {
            data[i] = Pattern(a.Address, i);
        }
        Span<byte> head = stackalloc byte[DmaAccessHead.WireSize];
        a.WriteTo(head);
        c.SendReply(m.Header, head, data);
    }

    /// <summary>Peer side: for every REGION_READ {offset, region, count} it first DMA_READs count bytes at offset from
    /// the caller's side, checks them, then answers head + those bytes. Replies go out of order: each command is handled
    /// on a pool thread after a short random delay.</summary>
    private static void PeerRegionReadViaDma(VfioUserConnection s, VfioUserMessage m, ConcurrentBag<string> failures, bool outOfOrder)
    {
        if (m.Header.Command != VfioUserCommand.RegionRead || !RegionAccessHead.TryRead(m.Payload, out var r))
        {
            s.SendError(m.Header, Errno.EINVAL);
            return;
        }
        var header = m.Header;
        void Answer()
        {
            try
            {
                Span<byte> req = stackalloc byte[DmaAccessHead.WireSize];
                new DmaAccessHead(r.Offset, r.Count).WriteTo(req);
                var data = new byte[r.Count];
                Span<byte> head = stackalloc byte[DmaAccessHead.WireSize];
                int len = s.SendRequestInto(VfioUserCommand.DmaRead, req, default, head, data);
                for (int i = 0; i < data.Length; i++)
                {
                    if (data[i] != Pattern(r.Offset, i))
                    {
                        failures.Add($"peer DMA_READ at {r.Offset:x} byte {i} wrong");
                        break;
                    }
                }
                if (len != DmaAccessHead.WireSize + (int)r.Count)
                {
                    failures.Add($"peer DMA_READ reply length {len}");
                }
                Span<byte> rh = stackalloc byte[RegionAccessHead.WireSize];
                r.WriteTo(rh);
                s.SendReply(header, rh, data);
            }
            catch (VfioUserException e)
            {
                failures.Add("peer: " + e.Message);
            }
        }
        if (!outOfOrder)
        {
            Answer();
            return;
        }
        int delay = Random.Shared.Next(3);
        ThreadPool.UnsafeQueueUserWorkItem(_ =>
        {
            if (delay > 0)
            {
                Thread.Sleep(delay);
            }
            Answer();
        }, null);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Concurrent_callers_get_their_own_replies_while_the_peer_dma_reads_from_them(bool outOfOrder)
    {
        var (a, b) = FdSocket.CreatePair();
        var failures = new ConcurrentBag<string>();
        using var client = new VfioUserConnection(a, "t-client");
        using var peer = new VfioUserConnection(b, "t-peer");
        int served = 0;
        client.Start((c, m) =>
        {
            Interlocked.Increment(ref served);
            ServeDmaRead(c, m);
        });
        peer.Start((s, m) => PeerRegionReadViaDma(s, m, failures, outOfOrder));

        const int Threads = 4, Calls = 150;
        var workers = Enumerable.Range(0, Threads).Select(t => new Thread(() =>
        {
            try
            {
                var req = new byte[RegionAccessHead.WireSize];
                for (int i = 0; i < Calls; i++)
                {
                    ulong offset = (ulong)((t * 100_000) + (i * 64));
                    int count = 1 + ((t + i) % 200);
                    new RegionAccessHead(offset, (uint)t, (uint)count).WriteTo(req);
                    byte[] got;
                    if (i % 2 == 0)
                    {
                        using var reply = client.SendRequest(VfioUserCommand.RegionRead, req, timeoutMs: 20_000);
                        Assert.Equal(RegionAccessHead.WireSize + count, reply.Length);
                        Assert.True(RegionAccessHead.TryRead(reply.Payload, out var echo));
                        Assert.Equal(offset, echo.Offset);
                        got = reply.Payload[RegionAccessHead.WireSize..].ToArray();
                    }
                    else
                    {
                        var head = new byte[RegionAccessHead.WireSize];
                        got = new byte[count + 8];
                        int len = client.SendRequestInto(VfioUserCommand.RegionRead, req, default, head, got, timeoutMs: 20_000);
                        Assert.Equal(RegionAccessHead.WireSize + count, len);
                        Assert.True(RegionAccessHead.TryRead(head, out var echo));
                        Assert.Equal(offset, echo.Offset);
                        Assert.True(got.AsSpan(count).IndexOfAnyExcept((byte)0) < 0, "bytes past the reply stay untouched");
                        got = got[..count];
                    }
                    for (int k = 0; k < count; k++)
                    {
                        if (got[k] != Pattern(offset, k))
                        {
                            failures.Add($"thread {t} call {i}: byte {k} is {got[k]}, expected {Pattern(offset, k)}");
                            break;
                        }
                    }
                }
            }
            catch (Exception e)
            {
                failures.Add($"thread {t}: {e}");
            }
        })).ToList();
        workers.ForEach(w => w.Start());
        workers.ForEach(w => Assert.True(w.Join(60_000)));
        Assert.Empty(failures);
        Assert.Equal(Threads * Calls, Volatile.Read(ref served));
        Assert.False(client.IsClosed);
    }

    [Fact]
    public void A_peer_command_arriving_right_after_the_last_call_returns_is_served_without_waiting_for_a_tick()
    {
        var (a, b) = FdSocket.CreatePair();
        using var client = new VfioUserConnection(a, "client");
        using var peer = new VfioUserConnection(b, "peer");
        client.Start(ServeDmaRead);
        peer.Start(static (s, m) =>
        {
            // A slow reply: the client's receive thread parks while the caller waits.
            Thread.Sleep(3);
            s.SendReply(m.Header, default);
        });
        var req = new byte[DmaAccessHead.WireSize];
        var head = new byte[DmaAccessHead.WireSize];
        var data = new byte[64];
        var rounds = new List<double>();
        for (int i = 0; i < 20; i++)
        {
            var sw = Stopwatch.StartNew();
            using (client.SendRequest(VfioUserCommand.DeviceReset, default, timeoutMs: 5000))
            {
            }
            // Nobody waits on the client now: its receive thread alone must pick this up.
            new DmaAccessHead((ulong)i * 64, 64).WriteTo(req);
            Assert.Equal(DmaAccessHead.WireSize + 64, peer.SendRequestInto(VfioUserCommand.DmaRead, req, default, head, data, timeoutMs: 5000));
            Assert.Equal(Pattern((ulong)i * 64, 63), data[63]);
            rounds.Add(sw.Elapsed.TotalMilliseconds);
        }
        // A receive thread that missed its wake-up would only look again after its 100 ms tick, so every round would
        // take ≥ 100 ms; a served one takes the 3 ms sleep plus two round trips. The median ignores the odd round a
        // loaded CI machine stretches.
        rounds.Sort();
        Assert.True(rounds[rounds.Count / 2] < 50, $"median round {rounds[rounds.Count / 2]:F1} ms (rounds: {string.Join(", ", rounds.Select(r => r.ToString("F0")))})");
    }

    [Fact]
    public void A_caller_reads_its_own_reply_even_when_no_receive_thread_runs()
    {
        var (a, b) = FdSocket.CreatePair();
        using var client = new VfioUserConnection(a, "no-rx");
        using var peer = new VfioUserConnection(b, "peer");
        peer.Start((s, m) => s.SendReply(m.Header, m.Payload));
        // client.Start is never called: only the calling thread can read the socket.
        var head = new byte[2];
        var tail = new byte[8];
        for (int i = 0; i < 50; i++)
        {
            byte[] p = BitConverter.GetBytes(i);
            using var r = client.SendRequest(VfioUserCommand.DeviceGetInfo, p, timeoutMs: 5000);
            Assert.Equal(p, r.Payload.ToArray());
            Assert.Equal(4, client.SendRequestInto(VfioUserCommand.DeviceGetInfo, p, default, head, tail, timeoutMs: 5000));
            Assert.Equal(p, head.Concat(tail[..2]).ToArray());
        }
    }

    [Fact]
    public void A_request_without_reply_times_out_and_its_late_reply_is_dropped_while_the_next_request_works()
    {
        var (a, b) = FdSocket.CreatePair();
        using var client = new VfioUserConnection(a, "client");
        using var peer = new VfioUserConnection(b, "peer");
        VfioUserHeader? held = null;
        peer.Start((s, m) =>
        {
            if (held is null)
            {
                held = m.Header;
                return;
            }
            // The late reply to the first request goes out before this one's.
            s.SendReply(held.Value, [9]);
            s.SendReply(m.Header, [1, 2]);
        });
        client.Start(static (c, m) => c.SendError(m.Header, Errno.EINVAL));
        var sw = Stopwatch.StartNew();
        var e = Assert.Throws<VfioUserException>(() => client.SendRequest(VfioUserCommand.DeviceReset, default, timeoutMs: 300));
        sw.Stop();
        Assert.Equal(Errno.ETIMEDOUT, e.Errno);
        Assert.InRange(sw.ElapsedMilliseconds, 250, 5000);
        using var r = client.SendRequest(VfioUserCommand.DeviceReset, default, timeoutMs: 5000);
        Assert.Equal(new byte[] { 1, 2 }, r.Payload.ToArray());
    }

    [Fact]
    public void An_oversized_reply_fails_its_caller_with_e2big_at_once_and_the_stream_stays_in_frame()
    {
        var (a, b) = FdSocket.CreatePair();
        using var client = new VfioUserConnection(a, "client") { MaxPayloadSize = 1024 };
        using var peer = new VfioUserConnection(b, "peer");
        int n = 0;
        peer.Start((s, m) => s.SendReply(m.Header, new byte[Interlocked.Increment(ref n) == 1 ? 5000 : 3]));
        client.Start(static (c, m) => c.SendError(m.Header, Errno.EINVAL));
        var sw = Stopwatch.StartNew();
        var e = Assert.Throws<VfioUserException>(() => client.SendRequest(VfioUserCommand.DeviceGetInfo, default, timeoutMs: 20_000));
        Assert.Equal(Errno.E2BIG, e.Errno);
        Assert.True(sw.ElapsedMilliseconds < 10_000, "failed fast, not by timeout");
        using var r = client.SendRequest(VfioUserCommand.DeviceGetInfo, default, timeoutMs: 5000);
        Assert.Equal(3, r.Length);
    }

    [Fact]
    public void Reply_into_caller_spans_reports_errno_refuses_a_reply_longer_than_the_spans_and_keeps_framing()
    {
        var (a, b) = FdSocket.CreatePair();
        using var client = new VfioUserConnection(a, "client");
        using var peer = new VfioUserConnection(b, "peer");
        peer.Start((s, m) =>
        {
            int mode = m.Payload[0];
            switch (mode)
            {
                case 0:
                    s.SendError(m.Header, Errno.ENOSPC);
                    break;
                case 1:
                    s.SendReply(m.Header, new byte[64]);
                    break;
                default:
                    s.SendReply(m.Header, [1, 2, 3]);
                    break;
            }
        });
        client.Start(static (c, m) => c.SendError(m.Header, Errno.EINVAL));
        var head = new byte[4];
        var tail = new byte[16];
        // Sentinels: neither the error reply nor the refused (drained) one may write into the spans.
        head.AsSpan().Fill(0xAA);
        tail.AsSpan().Fill(0xAA);
        var e = Assert.Throws<VfioUserException>(() => client.SendRequestInto(VfioUserCommand.MigDataRead, [0], default, head, tail, 5000));
        Assert.Equal(Errno.ENOSPC, e.Errno);
        e = Assert.Throws<VfioUserException>(() => client.SendRequestInto(VfioUserCommand.MigDataRead, [1], default, head, tail, 5000));
        Assert.Equal(Errno.EPROTO, e.Errno);
        Assert.Equal(new byte[] { 0xAA, 0xAA, 0xAA, 0xAA }, head);
        Assert.Equal(3, client.SendRequestInto(VfioUserCommand.MigDataRead, [2], default, head, tail, 5000));
        // A reply shorter than the head fills the head first and touches nothing past its 3 bytes.
        Assert.Equal(new byte[] { 1, 2, 3, 0xAA }, head);
        Assert.True(tail.AsSpan().IndexOfAnyExcept((byte)0xAA) < 0, "tail untouched");
    }

    [Fact]
    public void Dispose_while_a_caller_reads_fails_it_promptly_and_raises_closed_once()
    {
        var (a, b) = FdSocket.CreatePair();
        var client = new VfioUserConnection(a, "client");
        using var peer = new VfioUserConnection(b, "peer");
        peer.Start(static (s, m) => { });
        int closed = 0;
        client.Closed += _ => Interlocked.Increment(ref closed);
        client.Start(static (c, m) => c.SendError(m.Header, Errno.EINVAL));
        Exception? seen = null;
        var t = new Thread(() =>
        {
            try
            {
                using var r = client.SendRequest(VfioUserCommand.DeviceReset, default, timeoutMs: 30_000);
            }
            catch (Exception e)
            {
                seen = e;
            }
        });
        t.Start();
        Thread.Sleep(200);
        var sw = Stopwatch.StartNew();
        client.Dispose();
        client.Dispose();
        Assert.True(t.Join(10_000));
        Assert.True(sw.ElapsedMilliseconds < 5000);
        Assert.IsType<VfioUserConnectionClosedException>(seen);
        Assert.Equal(1, Volatile.Read(ref closed));
    }

    /// <summary>A scripted vfio-user server end for <see cref="VfioUserClient"/>: answers VERSION (max_data_xfer_size
    /// 64 KiB), and every MIG_DATA_READ with <paramref name="migDataRead"/>.</summary>
    private static (VfioUserClient Client, VfioUserConnection Server) Scripted(Action<VfioUserConnection, VfioUserMessage, MigDataHead> migDataRead)
    {
        var (a, b) = FdSocket.CreatePair();
        var server = new VfioUserConnection(b, "scripted");
        server.Start((s, m) =>
        {
            if (m.Header.Command == VfioUserCommand.Version)
            {
                byte[] json = Encoding.UTF8.GetBytes(new VfioUserCapabilities { MaxMsgFds = 8, MaxDataXferSize = 65536 }.ToJson() + "\0");
                var reply = new byte[VersionHead.Size + json.Length];
                new VersionHead(0, 2).WriteTo(reply);
                json.CopyTo(reply, VersionHead.Size);
                s.SendReply(m.Header, reply);
            }
            else if (m.Header.Command == VfioUserCommand.MigDataRead && MigDataHead.TryRead(m.Payload, out var h))
            {
                migDataRead(s, m, h);
            }
            else
            {
                s.SendError(m.Header, Errno.EINVAL);
            }
        });
        return (VfioUserClient.Attach(a, new VfioUserClientOptions { TimeoutMs = 10_000 }), server);
    }

    private static void MigReply(VfioUserConnection s, VfioUserMessage m, uint sizeField, ReadOnlySpan<byte> data)
    {
        Span<byte> head = stackalloc byte[MigDataHead.WireSize];
        new MigDataHead((uint)(MigDataHead.WireSize + data.Length), sizeField).WriteTo(head);
        s.SendReply(m.Header, head, data);
    }

    [Fact]
    public void Mig_data_read_lands_in_the_caller_buffer_split_at_max_data_xfer_size_and_stops_at_a_short_reply()
    {
        long served = 0;
        const long Total = 150_000;
        var (client, server) = Scripted((s, m, h) =>
        {
            int n = (int)Math.Min(h.Size, Total - served);
            var d = new byte[n];
            for (int i = 0; i < n; i++)
            {
                d[i] = (byte)((served + i) * 31 % 251);
            }
            served += n;
            MigReply(s, m, (uint)n, d);
        });
        using (server)
        using (client)
        {
            var buf = new byte[200_000];
            buf.AsSpan().Fill(0xEE);
            Assert.Equal((int)Total, client.ReadMigrationData(buf));
            for (int i = 0; i < Total; i++)
            {
                Assert.Equal((byte)(i * 31 % 251), buf[i]);
            }
            Assert.Equal(0xEE, buf[Total]);
            // Stream ended: an empty reply reads 0.
            Assert.Equal(0, client.ReadMigrationData(buf));
        }
    }

    [Fact]
    public void Mig_data_read_reports_the_server_errno_and_stays_usable()
    {
        int call = 0;
        var (client, server) = Scripted((s, m, h) =>
        {
            if (Interlocked.Increment(ref call) == 1)
            {
                s.SendError(m.Header, Errno.EIO);
            }
            else
            {
                MigReply(s, m, 4, [1, 2, 3, 4]);
            }
        });
        using (server)
        using (client)
        {
            var buf = new byte[16];
            var e = Assert.Throws<VfioUserException>(() => client.ReadMigrationData(buf));
            Assert.Equal(Errno.EIO, e.Errno);
            Assert.Equal(4, client.ReadMigrationData(buf));
            Assert.Equal(new byte[] { 1, 2, 3, 4 }, buf[..4]);
        }
    }

    [Theory]
    [InlineData(0)] // more payload than asked for (caller buffer too small): drained, EPROTO
    [InlineData(1)] // size field larger than the request
    [InlineData(2)] // size field disagrees with the payload length
    [InlineData(3)] // reply shorter than the fixed MIG_DATA head
    public void Mig_data_read_refuses_a_reply_that_does_not_fit_the_request_and_the_next_read_still_works(int lie)
    {
        int call = 0;
        var (client, server) = Scripted((s, m, h) =>
        {
            if (Interlocked.Increment(ref call) > 1)
            {
                MigReply(s, m, 2, [7, 8]);
                return;
            }
            switch (lie)
            {
                case 0:
                    MigReply(s, m, h.Size + 100, new byte[h.Size + 100]);
                    break;
                case 1:
                    MigReply(s, m, h.Size + 1, new byte[h.Size]);
                    break;
                case 2:
                    MigReply(s, m, 3, new byte[5]);
                    break;
                default:
                    s.SendReply(m.Header, [1, 2]);
                    break;
            }
        });
        using (server)
        using (client)
        {
            var buf = new byte[32];
            var e = Assert.Throws<VfioUserException>(() => client.ReadMigrationData(buf));
            Assert.Equal(Errno.EPROTO, e.Errno);
            Assert.Equal(2, client.ReadMigrationData(buf));
            Assert.Equal(new byte[] { 7, 8 }, buf[..2]);
            Assert.False(client.IsClosed);
        }
    }

    [Fact]
    public void An_fd_sent_with_a_reply_reaches_the_caller_that_read_it()
    {
        var (a, b) = FdSocket.CreatePair();
        using var client = new VfioUserConnection(a, "client");
        using var peer = new VfioUserConnection(b, "peer");
        using var ev = EventFd.Create();
        peer.Start((s, m) => s.SendReply(m.Header, [1], default, [ev.Handle.Fd]));
        client.Start(static (c, m) => c.SendError(m.Header, Errno.EINVAL));
        using var r = client.SendRequest(VfioUserCommand.DeviceGetRegionInfo, default, timeoutMs: 5000);
        Assert.Equal(1, r.FdCount);
        using var got = EventFd.FromHandle(r.TakeFd(0)!);
        got.Signal(5);
        Assert.Equal(5UL, ev.Wait(1000));
    }
}
