using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Transport;

namespace Vmig.Bench;

/// <summary>
/// Scenario "migdata": device state moved in 1 MiB MIG_DATA_READ / MIG_DATA_WRITE chunks from a source server
/// process through this client to a target server process (the <see cref="BenchStateDevice"/> state is N bytes of
/// memfd), next to the raw request/reply of the same shape (24 B request, 16+8+1 MiB reply; 16+8+1 MiB write,
/// 24 B reply) against two raw server processes. Three shapes: end to end (read then write), read only, write only.
/// Goal ≥ 0.8× (throughput ratio).
/// </summary>
internal static class MigDataScenario
{
    private const int Chunk = 1 << 20;

    public static void Run(BenchContext ctx, long[] sizes)
    {
        foreach (long size in sizes)
        {
            RunSize(ctx, "migdata", "state", size);
        }
    }

    private static void RunSize(BenchContext ctx, string scenario, string kind, long bytes)
    {
        string label = $"{bytes >> 20} MiB";
        ctx.Progress($"{scenario}: {label}: starting 4 peer processes");
        using var srcPeer = ctx.StartPeer(kind, scenario + "-src", bytes);
        using var dstPeer = ctx.StartPeer(kind, scenario + "-dst", bytes);
        using var rawA = ctx.StartPeer("raw", scenario + "-rawa", bytes);
        using var rawB = ctx.StartPeer("raw", scenario + "-rawb", bytes);
        using var src = VfioUserClient.Connect(srcPeer.SocketPath);
        using var dst = VfioUserClient.Connect(dstPeer.SocketPath);
        using var ra = new RawClient(rawA.SocketPath);
        using var rb = new RawClient(rawB.SocketPath);
        using var connA = new VfioUserConnection(FdSocket.Connect(rawA.SocketPath), "bench-raw");
        connA.Start(static (c, m) => c.SendError(m.Header, Errno.EINVAL));
        byte[] buf = GC.AllocateUninitializedArray<byte>(Chunk, pinned: true);
        new Random(3).NextBytes(buf);
        long streamBytes = 0;

        double VmigE2E()
        {
            src.SetState(DeviceState.StopCopy);
            dst.SetState(DeviceState.Resuming);
            long moved = 0;
            double s = Measure.Seconds(() =>
            {
                int n;
                do
                {
                    n = src.ReadMigrationData(buf);
                    if (n > 0)
                    {
                        dst.WriteMigrationData(buf.AsSpan(0, n));
                    }
                    moved += n;
                }
                while (n == Chunk);
            });
            src.SetState(DeviceState.Running);
            dst.SetState(DeviceState.Running);
            streamBytes = moved;
            return moved / Measure.MiB / s;
        }

        double VmigRead()
        {
            src.SetState(DeviceState.StopCopy);
            long moved = 0;
            double s = Measure.Seconds(() =>
            {
                int n;
                do
                {
                    n = src.ReadMigrationData(buf);
                    moved += n;
                }
                while (n == Chunk);
            });
            src.SetState(DeviceState.Running);
            return moved / Measure.MiB / s;
        }

        double VmigWrite()
        {
            dst.SetState(DeviceState.Resuming);
            long chunks = streamBytes / Chunk;
            double s = Measure.Seconds(() =>
            {
                for (long i = 0; i < chunks; i++)
                {
                    dst.WriteMigrationData(buf);
                }
            });
            int rest = (int)(streamBytes - (chunks * Chunk));
            dst.WriteMigrationData(buf.AsSpan(0, rest));
            dst.SetState(DeviceState.Running);
            return chunks * Chunk / Measure.MiB / s;
        }

        long Chunks() => Math.Max(1, streamBytes / Chunk);

        double RawE2E()
        {
            long chunks = Chunks();
            var seg = new ArraySegment<byte>(buf);
            return chunks * Chunk / Measure.MiB / Measure.Seconds(() =>
            {
                for (long i = 0; i < chunks; i++)
                {
                    int n = ra.Read(buf);
                    rb.Write(seg[..n]);
                }
            });
        }

        double RawRead()
        {
            long chunks = Chunks();
            return chunks * Chunk / Measure.MiB / Measure.Seconds(() =>
            {
                for (long i = 0; i < chunks; i++)
                {
                    ra.Read(buf);
                }
            });
        }

        double RawWrite()
        {
            long chunks = Chunks();
            var seg = new ArraySegment<byte>(buf);
            return chunks * Chunk / Measure.MiB / Measure.Seconds(() =>
            {
                for (long i = 0; i < chunks; i++)
                {
                    rb.Write(seg);
                }
            });
        }

        // The client's own transport against the raw server: separates client-side cost from server-side cost.
        double ConnRead()
        {
            long chunks = Chunks();
            Span<byte> req = stackalloc byte[MigDataHead.WireSize];
            new MigDataHead(MigDataHead.WireSize + Chunk, Chunk).WriteTo(req);
            byte[] r8 = req.ToArray();
            return chunks * Chunk / Measure.MiB / Measure.Seconds(() =>
            {
                for (long i = 0; i < chunks; i++)
                {
                    using var m = connA.SendRequest(VfioUserCommand.MigDataRead, r8);
                    m.Payload[MigDataHead.WireSize..].CopyTo(buf);
                }
            });
        }

        int runs = ctx.Options.RunCount;
        ctx.Progress($"{scenario}: {label}: end to end, {runs} runs");
        var (b, v) = Measure.Paired(runs, RawE2E, VmigE2E, () =>
        {
            VmigE2E();
            RawE2E();
        });
        ctx.Report.Figures.Add(Measure.Figure(scenario, $"MIG_DATA_READ→WRITE source→client→target, {label}", "MiB/s", b, v,
            "raw UNIX-socket read request/reply then write request/reply, same shapes, two raw server processes", 0.8, GoalDirection.AtLeast));
        ctx.Progress($"{scenario}: {label}: read only");
        (b, v) = Measure.Paired(runs, RawRead, VmigRead);
        var fr = Measure.Figure(scenario, $"MIG_DATA_READ only, {label}", "MiB/s", b, v,
            "raw UNIX-socket request 24 B / reply 16+8+1 MiB", 0.8, GoalDirection.AtLeast);
        var (b2, c2) = Measure.Paired(runs, RawRead, ConnRead, () => { });
        fr.Extra["client-transport-only ratio (VfioUserConnection + copy out → raw server)"] = Summary.Of(c2.Zip(b2, (x, y) => x / y).ToList()).Median;
        ctx.Report.Figures.Add(fr);
        ctx.Progress($"{scenario}: {label}: write only");
        (b, v) = Measure.Paired(runs, RawWrite, VmigWrite);
        ctx.Report.Figures.Add(Measure.Figure(scenario, $"MIG_DATA_WRITE only, {label}", "MiB/s", b, v,
            "raw UNIX-socket request 16+8+1 MiB / reply 24 B", 0.8, GoalDirection.AtLeast));

        // Prove the bytes arrived: one more full transfer, then both servers' checksums must match.
        VmigE2E();
        string a = srcPeer.Ask("crc"), d = dstPeer.Ask("crc");
        if (a != d)
        {
            throw new InvalidOperationException($"{scenario} {label}: target state CRC32C {d} differs from source {a}");
        }
        ctx.Report.Notes.Add($"{scenario} {label}: stream {streamBytes} bytes; source and target state CRC32C equal ({a}).");
    }
}
