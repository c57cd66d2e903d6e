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

        const int Slice = 1000;
        (double, double) Vmig() => Measure.Ops(Slice, () => client.WriteRegion(0, 0x100, value));
        (double, double) Raw() => Measure.Ops(Slice, raw.Ping);
        (double, double) ConnToRaw() => Measure.Ops(Slice, () =>
        {
            using var r = conn.SendRequest(VfioUserCommand.RegionWrite, headBytes, value);
        });

        int slices = ops / Slice;
        ctx.Progress($"region: {ctx.Options.RunCount} runs × {slices} interleaved slices × {Slice} round trips");
        var (b, v) = Measure.Paired(ctx.Options.RunCount, slices, Raw, Vmig, perOp: true);
        var f = Measure.Figure("region", "REGION_WRITE 4 B round trip", "µs/op", b, v,
            "raw UNIX-socket ping-pong, 36 B → 32 B, blocking sendmsg/recvmsg, server thread in another process", 1.5, GoalDirection.AtMost);
        var (b2, c2) = Measure.Paired(ctx.Options.RunCount, slices, Raw, ConnToRaw, perOp: true);
        var cf = Summary.Of(c2.Zip(b2, (x, y) => x / y).ToList());
        f.Extra["client-transport-only ratio (VfioUserConnection → raw server), median"] = cf.Median;
        f.Extra["client-transport-only ratio min"] = cf.Min;
        f.Extra["client-transport-only ratio max"] = cf.Max;
        ctx.Report.Figures.Add(f);
    }
}
