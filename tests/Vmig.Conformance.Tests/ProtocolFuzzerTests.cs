using Vmig.TestPeer;
using Xunit.Abstractions;
using Vmig.VfioUser.Server;

namespace Vmig.Conformance.Tests;

public sealed class ProtocolFuzzerTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-fuzz-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Ten_seconds_of_fuzzing_a_server_in_another_process_finds_no_crash_no_hang_and_bounded_memory()
    {
        string sock = Path.Combine(_dir, "fuzz.sock");
        using var peer = PeerProcess.Start(["serve", sock]);
        var report = ProtocolFuzzer.Run(sock, new FuzzOptions { Seed = 20261121, Duration = TimeSpan.FromSeconds(10), ServerPid = peer.Pid, MessageTimeoutMs = 3000 });
        output.WriteLine(report.Summary());
        Assert.True(report.Success, report.Summary() + Environment.NewLine + string.Join(Environment.NewLine, report.Findings));
        Assert.Equal(0, report.Crashes);
        Assert.False(peer.HasExited);
        Assert.True(report.MessagesSent > 300, report.Summary());
        Assert.True(report.DistinctErrnos >= 3, report.Summary());
        // EIO is what the SDK answers when a request handler throws: none may.
        Assert.False(report.Errnos.ContainsKey(5), report.Summary());
        Assert.True(report.ConnectionsClosedByServer > 0, "msg_size below 16 must have closed some connections: " + report.Summary());
        Assert.True(report.StartRssBytes > 0 && report.RssGrowthBytes < (256L << 20), report.Summary());
        // Still a working device after all that (retry: the server may still be releasing the fuzzer's last connection).
        VfioUser.Client.VfioUserClient? c = null;
        for (int i = 0; c is null; i++)
        {
            try
            {
                c = VfioUser.Client.VfioUserClient.Connect(sock);
            }
            catch (VfioUser.VfioUserException) when (i < 100)
            {
                Thread.Sleep(20);
            }
        }
        using (c)
        {
            c.Reset();
            Assert.Equal(9, c.GetDeviceInfo().NumRegions);
        }
    }

    [Fact]
    public void The_same_seed_generates_the_same_message_sequence()
    {
        FuzzReport Once(int seed)
        {
            using var dev = new SampleDevice();
            using var server = new VfioUserServer(dev, Path.Combine(_dir, $"s{seed}-{Guid.NewGuid():N}.sock"));
            server.Start();
            return ProtocolFuzzer.Run(server.SocketPath, new FuzzOptions { Seed = seed, MaxCases = 150, Duration = TimeSpan.FromMinutes(2) });
        }
        var a = Once(5);
        var b = Once(5);
        var c = Once(6);
        Assert.True(a.Success && b.Success && c.Success, a.Summary());
        Assert.Equal(150, a.Cases);
        Assert.Equal(a.SequenceDigest, b.SequenceDigest);
        Assert.NotEqual(a.SequenceDigest, c.SequenceDigest);
    }
}
