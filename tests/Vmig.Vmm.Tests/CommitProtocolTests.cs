using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Vmig.Migration;
using Vmig.Vmm;
using Vmig.Vmm.Migration;
using Vmig.Vmm.Stream;
using Xunit.Abstractions;

namespace Vmig.Vmm.Tests;

/// <summary>
/// The two-phase end of a live migration (docs/stream-format.md §4.1) over real loopback TCP: the target runs only
/// after Commit, discards without it, keeps running once committed even if its result is lost; the source rolls
/// back on a failure reported after Commit; the added downtime is about one round trip.
/// </summary>
public sealed class CommitProtocolTests : IDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly ITestOutputHelper _out;

    public CommitProtocolTests(ITestOutputHelper output)
    {
        _out = output;
        _listener.Start();
    }

    public void Dispose()
    {
        _listener.Stop();
        _listener.Dispose();
    }

    private static VmConfig TargetGuest() => new() { Programs = TestVms.Registry() };

    /// <summary>The S→T stream of a paused VM with one P2P device (a snapshot is exactly that stream, one connection).</summary>
    private static byte[] StateStream()
    {
        var a = new FakeDevice("a", MigrationFlags.StopCopy | MigrationFlags.P2P, [], dmaGpa: 0x2000);
        using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20", [a]);
        src.Start();
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > 10);
        src.Pause();
        var ms = new MemoryStream();
        VmSnapshot.Save(src, ms);
        return ms.ToArray();
    }

    /// <summary>Acts as a source: sends the whole state, reads the handshake reply and TargetReady.</summary>
    private (Socket Socket, NetworkStream Stream, SectionReader Reader) SendStateUntilReady(byte[] state)
    {
        var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        s.Connect(_listener.LocalEndpoint);
        var ns = new NetworkStream(s, ownsSocket: false);
        var send = Task.Run(() => ns.Write(state));
        var r = new SectionReader(ns, 4 << 20);
        r.ReadStreamHeader();
        r.Expect(SectionType.HandshakeReply);
        Assert.Equal(0u, SectionIo.ReadStatus(r.Payload).Status);
        Assert.True(send.Wait(TimeSpan.FromSeconds(30)));
        r.Expect(SectionType.TargetReady);
        return (s, ns, r);
    }

    [Fact]
    public async Task Target_ReadyButNeverCommitted_NeverRunsTheVmAndDiscardsIt()
    {
        byte[] state = StateStream();
        var tlog = new List<string>();
        FakeDevice? t = null;
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => t = new FakeDevice(d.Name, d.MigrationFlags, tlog, dmaGpa: 0x7000));
        var (s, ns, _) = SendStateUntilReady(state);
        // Ready: the device state is loaded and the device quiesced in RUNNING_P2P, not running.
        Assert.Equal(DeviceState.RunningP2P, t!.GetState());
        Assert.False(target.IsCompleted);
        // The source goes away without a Commit (it rolled back): the target must discard, never run.
        s.LingerState = new LingerOption(true, 0);
        ns.Dispose();
        s.Dispose();
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => target);
        Assert.Equal("failed", e.Report.Outcome);
        Assert.True(t.Disposed && t.ResetCount > 0);
        Assert.DoesNotContain("a:RunningP2P->Running", tlog);
    }

    [Fact]
    public async Task Target_CommittedButTheSourceVanished_KeepsRunningTheVm()
    {
        byte[] state = StateStream();
        FakeDevice? t = null;
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => t = new FakeDevice(d.Name, d.MigrationFlags, [], dmaGpa: 0x7000));
        var (s, ns, _) = SendStateUntilReady(state);
        var w = new SectionWriter(ns);
        w.Write(SectionType.Commit, []);
        w.Flush();
        // Reset at once: the target's TargetResult may not be deliverable. It got Commit, so it runs regardless
        // (the source, not knowing, stays paused in doubt: the VM runs in exactly one place).
        s.LingerState = new LingerOption(true, 0);
        ns.Dispose();
        s.Dispose();
        using var vm = await target;
        Assert.Equal(VmRunState.Running, vm.State);
        Assert.Equal(DeviceState.Running, t!.GetState());
        TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 10);
        TestVms.PauseAndVerify(vm);
    }

    [Fact]
    public async Task Source_TargetFailsAfterCommitWithoutRunning_RollsBackAndRuns()
    {
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.P2P, [], dmaGpa: 0x3000);
        using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20", [dev]);
        src.Start();
        var fake = FakeTargetAfterEndOfState((r, w) =>
        {
            w.Write(SectionType.TargetReady, []);
            w.Flush();
            r.Expect(SectionType.Commit);
            w.Write(SectionType.TargetResult, new TargetResult(1, 0, 0, "device refused RUNNING").ToPayload());
            w.Flush();
        });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 2 }));
        await fake;
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.Contains("device refused RUNNING", e.Report.Error, StringComparison.Ordinal);
        Assert.Equal(VmRunState.Running, src.State);
        Assert.Equal(DeviceState.Running, dev.GetState());
        long s0 = src.Vcpus[0].Slices;
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > s0 + 5);
        TestVms.PauseAndVerify(src);
    }

    [Fact]
    public async Task Source_TargetClaimsRunningBeforeCommit_IsRefusedAndRollsBack()
    {
        using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20");
        src.Start();
        var fake = FakeTargetAfterEndOfState((r, w) =>
        {
            // A 1.x-style target: runs and reports at once. The source must not take that as a commit.
            w.Write(SectionType.TargetResult, new TargetResult(0, 1, 0, "").ToPayload());
            w.Flush();
            r.ReadNext();
        });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 2 }));
        await fake;
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.Contains("before the commit", e.Report.Error, StringComparison.Ordinal);
        Assert.Equal(VmRunState.Running, src.State);
    }

    [Fact]
    public async Task TwoPhaseEnd_ReportsTheCommitWaitNextToALoopbackRoundTrip()
    {
        // Loopback TCP round trip measured here, in the same process and moment, as the yardstick.
        double rtt = MeasureLoopbackRoundTripMs();
        var waits = new List<double>();
        var downs = new List<double>();
        for (int i = 0; i < 5; i++)
        {
            using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20");
            src.Start();
            var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => throw new InvalidOperationException());
            var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 3 });
            using var dst = await target;
            Assert.Equal("completed", report.Outcome);
            Assert.True(report.TargetCommitWaitMilliseconds > 0);
            Assert.True(report.CommitRoundTripMilliseconds > 0);
            Assert.True(report.TargetCommitWaitMilliseconds <= report.TargetDowntimeMilliseconds, "the commit wait is part of the target downtime");
            waits.Add(report.TargetCommitWaitMilliseconds);
            downs.Add(report.TargetDowntimeMilliseconds);
        }
        waits.Sort();
        downs.Sort();
        double median = waits[waits.Count / 2];
        _out.WriteLine($"loopback RTT median {rtt:F3} ms; commit wait median {median:F3} ms (min {waits[0]:F3}, max {waits[^1]:F3}); target downtime median {downs[downs.Count / 2]:F2} ms");
        // No bound on the figure here: speed belongs in bench/, never in a timed unit test.
        // Measured at 0.027 ms against a 0.022 ms loopback RTT when this was written.
    }

    [Fact]
    public async Task CorruptedLengthOfTheLastSection_FailsAtOnceAndTheSourceResumes()
    {
        // A proxy flips bit 0x10 of EndOfState's length (0 → 16): with 1.0 framing the target waited for 16 payload
        // bytes that never came until a timeout. Now the header CRC refuses it at once: the target reports the failure,
        // the source rolls back, long before the 30 s timeouts set here.
        using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20");
        src.Start();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => throw new InvalidOperationException(),
            new MigrationTargetOptions { ReceiveTimeout = TimeSpan.FromSeconds(30) });
        using var proxyListener = new TcpListener(IPAddress.Loopback, 0);
        proxyListener.Start();
        var proxy = Task.Run(() => FlipEndOfStateLength(proxyListener, _listener.LocalEndpoint));
        var sw = Stopwatch.StartNew();
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, proxyListener.LocalEndpoint,
            new MigrationOptions { MaxRounds = 2, ReplyTimeout = TimeSpan.FromSeconds(30) }));
        double seconds = sw.Elapsed.TotalSeconds;
        var te = await Assert.ThrowsAsync<VmMigrationException>(() => target);
        Assert.True(await proxy.WaitAsync(TimeSpan.FromSeconds(30)), "the proxy never saw EndOfState");
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.Contains("header CRC", e.Report.Error, StringComparison.Ordinal);
        Assert.Contains("header CRC", te.Report.Error, StringComparison.Ordinal);
        Assert.True(seconds < 10, $"took {seconds:F1} s");
        Assert.Equal(VmRunState.Running, src.State);
        TestVms.PauseAndVerify(src);
    }

    /// <summary>Forwards one migration connection, flipping bit 0x10 in the length of the S→T EndOfState section. True if it did.</summary>
    private static bool FlipEndOfStateLength(TcpListener listener, EndPoint target)
    {
        using var a = listener.AcceptSocket();
        using var b = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        b.Connect(target);
        using var sa = new NetworkStream(a);
        using var sb = new NetworkStream(b);
        var back = Task.Run(() =>
        {
            try
            {
                sb.CopyTo(sa);
            }
            catch (IOException)
            {
            }
        });
        bool flipped = false;
        try
        {
            var head = new byte[StreamHeader.Size];
            sa.ReadExactly(head);
            sb.Write(head);
            var h = new byte[SectionHeader.Size];
            var payload = new byte[1 << 20];
            while (sa.ReadAtLeast(h, h.Length, throwOnEndOfStream: false) == h.Length)
            {
                int len = BitConverter.ToInt32(h, 4);
                if (BitConverter.ToUInt16(h, 0) == (ushort)SectionType.EndOfState)
                {
                    h[4] ^= 0x10;
                    flipped = true;
                }
                sb.Write(h);
                for (int left = len; left > 0;)
                {
                    int n = sa.Read(payload, 0, Math.Min(left, payload.Length));
                    if (n == 0)
                    {
                        return flipped;
                    }
                    sb.Write(payload, 0, n);
                    left -= n;
                }
            }
        }
        catch (IOException)
        {
            // One side closed: the migration is over.
        }
        back.Wait(TimeSpan.FromSeconds(30));
        return flipped;
    }

    /// <summary>A fake target on <see cref="_listener"/>: accepts the handshake, reads the whole state, then runs <paramref name="end"/>.</summary>
    private Task FakeTargetAfterEndOfState(Action<SectionReader, SectionWriter> end) => Task.Run(() =>
    {
        using var s = _listener.AcceptSocket();
        using var ns = new NetworkStream(s);
        var (r, w) = MigrationTests.AcceptHandshake(ns);
        while (r.ReadNext() && r.Type != SectionType.EndOfState)
        {
        }
        end(r, w);
    });

    private static double MeasureLoopbackRoundTripMs()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        using var a = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        a.Connect(l.LocalEndpoint);
        using var b = l.AcceptSocket();
        b.NoDelay = true;
        var echo = Task.Run(() =>
        {
            var x = new byte[16];
            for (int i = 0; i < 200; i++)
            {
                b.Receive(x);
                b.Send(x);
            }
        });
        var buf = new byte[16];
        var times = new List<double>();
        for (int i = 0; i < 200; i++)
        {
            long t0 = Stopwatch.GetTimestamp();
            a.Send(buf);
            a.Receive(buf);
            times.Add(Stopwatch.GetElapsedTime(t0).TotalMilliseconds);
        }
        echo.Wait();
        times.Sort();
        return times[times.Count / 2];
    }
}
