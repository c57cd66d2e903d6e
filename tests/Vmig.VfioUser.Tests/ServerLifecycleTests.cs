using System.Collections.Concurrent;
using Vmig.Conformance;
using Vmig.VfioUser.Server;

namespace Vmig.VfioUser.Tests;

/// <summary>One client at a time: a session's end and the next session's start never overlap on the device.</summary>
public sealed class ServerLifecycleTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-life-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void A_client_reconnecting_at_once_attaches_only_after_the_previous_detach_finished()
    {
        var device = new SlowDetachDevice();
        using var server = new VfioUserServer(device, Path.Combine(_dir, "s.sock"));
        server.Start();
        const int rounds = 3;
        for (int round = 0; round < rounds; round++)
        {
            using (var first = Connect(server.SocketPath))
            {
            }
            // The first session's detach sleeps 100 ms; this client is accepted while it runs.
            using var second = Connect(server.SocketPath);
        }
        Assert.True(SpinWait.SpinUntil(() => device.Events.Count >= 6 * rounds, 10_000), string.Join(",", device.Events));
        // Before the fix the server freed its client slot before detaching, so the next attach landed inside the
        // previous detach (attach, detach-begin, attach, detach-end) and was then undone by it.
        var events = device.Events.ToArray();
        string[] cycle = ["attach", "detach-begin", "detach-end"];
        Assert.Equal(Enumerable.Range(0, 6 * rounds).Select(i => cycle[i % 3]), events);
    }

    private static RawPeer Connect(string path)
    {
        for (int i = 0; ; i++)
        {
            var p = RawPeer.Connect(path);
            if (p.Negotiate(5000) is { IsSuccess: true })
            {
                return p;
            }
            p.Dispose();
            Assert.True(i < 200, "server does not take a new client");
            Thread.Sleep(10);
        }
    }

    private sealed class SlowDetachDevice : VfioUserDevice
    {
        public ConcurrentQueue<string> Events { get; } = new();

        public override IReadOnlyList<RegionDescriptor> Regions => [];

        public override IReadOnlyList<IrqDescriptor> Irqs => [];

        public override int ReadRegion(int index, ulong offset, Span<byte> data) => Protocol.Errno.EINVAL;

        public override int WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data) => Protocol.Errno.EINVAL;

        public override void OnAttached(DeviceContext context)
        {
            base.OnAttached(context);
            Events.Enqueue("attach");
        }

        public override void OnDetached()
        {
            Events.Enqueue("detach-begin");
            Thread.Sleep(100);
            base.OnDetached();
            Events.Enqueue("detach-end");
        }
    }
}
