using Vmig.Native;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Transport;

namespace Vmig.Bench;

/// <summary>
/// Scenario "region": a 4-byte REGION_WRITE round trip through <see cref="VfioUserClient"/> to a
/// <see cref="Vmig.VfioUser.Server.VfioUserServer"/> in another process, next to a raw blocking UNIX-socket
/// ping-pong of the same shape (36 bytes out, 32 back) against a raw server in another process. A third series
/// sends the same message through the bare <see cref="VfioUserConnection"/> to the raw server: that splits the
/// overhead into client transport (connection vs raw) and server side (the rest). Goal: ≤ 1.5× raw.
/// </summary>
internal static class RegionWriteScenario
{
    public static void Run(BenchContext ctx)
    {
        int ops = ctx.Options.Quick ? 20_000 : 50_000;
        using var vPeer = ctx.StartPeer("state", "region-vfio", 1 << 20);
        using var rPeer = ctx.StartPeer("raw", "region-raw", 1 << 20);
        using var client = VfioUserClient.Connect(vPeer.SocketPath);
        using var raw = new RawClient(rPeer.SocketPath);
        using var conn = new VfioUserConnection(FdSocket.Connect(rPeer.SocketPath), "bench-raw");
        conn.Start(static (c, m) => c.SendError(m.Header, Errno.EINVAL));

        byte[] value = [1, 2, 3, 4];
        Span<byte> head = stackalloc byte[RegionAccessHead.WireSize];
        new RegionAccessHead(0x100, 0, 4).WriteTo(head);
        byte[] headBytes = head.ToArray();

        double Vmig()
        {
            return Measure.Seconds(() =>
            {
                for (int i = 0; i < ops; i++)
                {
                    client.WriteRegion(0, 0x100, value);
                }
            }) / ops * 1e6;
        }

        double Raw()
        {
            return Measure.Seconds(() =>
            {
                for (int i = 0; i < ops; i++)
                {
                    raw.Ping();
                }
            }) / ops * 1e6;
        }

        double ConnToRaw()
        {
            return Measure.Seconds(() =>
            {
                for (int i = 0; i < ops; i++)
                {
                    using var r = conn.SendRequest(VfioUserCommand.RegionWrite, headBytes, value);
                }
            }) / ops * 1e6;
        }

        ctx.Progress($"region: warm-up, then {ctx.Options.RunCount} runs × {ops} round trips");
        var (b, v) = Measure.Paired(ctx.Options.RunCount, Raw, Vmig, () =>
        {
            for (int i = 0; i < 3; i++)
            {
                Raw();
                Vmig();
                ConnToRaw();
            }
        });
        var f = Measure.Figure("region", "REGION_WRITE 4 B round trip", "µs/op", b, v,
            "raw UNIX-socket ping-pong, 36 B → 32 B, blocking, server thread in another process", 1.5, GoalDirection.AtMost);
        var (b2, c2) = Measure.Paired(ctx.Options.RunCount, Raw, ConnToRaw, () => { });
        var cf = Summary.Of(c2.Zip(b2, (x, y) => x / y).ToList());
        f.Extra["client-transport-only ratio (VfioUserConnection → raw server)"] = cf.Median;
        f.Extra["client-transport-only µs/op"] = Summary.Of(c2).Median;
        ctx.Report.Figures.Add(f);
    }
}
