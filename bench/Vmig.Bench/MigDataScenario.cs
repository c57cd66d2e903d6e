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
/// Streams stay open across measurement slices (64 chunks each) and restart (STOP_COPY / RESUMING again) when they
/// end, so every slice is the same amount of work whatever N is. Goal ≥ 0.8× (throughput ratio).
/// </summary>
internal static class MigDataScenario
{
    public const int Chunk = 1 << 20;
    public const int SliceChunks = 64;

    public static void Run(BenchContext ctx, long[] sizes)
    {
        foreach (long size in sizes)
        {
            RunSize(ctx, size);
        }
    }

    private static void RunSize(BenchContext ctx, long bytes)
    {
        const string scenario = "migdata";
        string label = $"{bytes >> 20} MiB";
        ctx.Progress($"{scenario}: {label}: starting 4 peer processes");
        using var srcPeer = ctx.StartPeer("state", scenario + "-src", bytes);
        using var dstPeer = ctx.StartPeer("state", scenario + "-dst", bytes);
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

        var e2e = new StreamPair(src, dst, bytes, buf);
        var readOnly = new StreamPair(src, null, bytes, buf);
        var writeOnly = new StreamPair(null, dst, bytes, buf);

        (double, double) RawE2E() => (SliceChunks * (double)Chunk, Measure.Seconds(() =>
        {
            for (int i = 0; i < SliceChunks; i++)
            {
                int n = ra.Read(buf);
                rb.Write(buf.AsSpan(0, n));
            }
        }));
        (double, double) RawRead() => (SliceChunks * (double)Chunk, Measure.Seconds(() =>
        {
            for (int i = 0; i < SliceChunks; i++)
            {
                ra.Read(buf);
            }
        }));
        (double, double) RawWrite() => (SliceChunks * (double)Chunk, Measure.Seconds(() =>
        {
            for (int i = 0; i < SliceChunks; i++)
            {
                rb.Write(buf);
            }
        }));
        // The client's own transport against the raw server: separates client-side cost from server-side cost.
        // The reply is received straight into the caller's buffer, as VfioUserClient.ReadMigrationData does.
        byte[] r8 = new byte[MigDataHead.WireSize];
        byte[] h8 = new byte[MigDataHead.WireSize];
        new MigDataHead(MigDataHead.WireSize + Chunk, Chunk).WriteTo(r8);
        (double, double) ConnRead() => (SliceChunks * (double)Chunk, Measure.Seconds(() =>
        {
            for (int i = 0; i < SliceChunks; i++)
            {
                connA.SendRequestInto(VfioUserCommand.MigDataRead, r8, default, h8, buf);
            }
        }));

        // The same for writes: the client's MIG_DATA_WRITE request (gathered head + data, one sendmsg) to the raw server.
        byte[] w8 = new byte[MigDataHead.WireSize];
        new MigDataHead(MigDataHead.WireSize + Chunk, Chunk).WriteTo(w8);
        (double, double) ConnWrite() => (SliceChunks * (double)Chunk, Measure.Seconds(() =>
        {
            for (int i = 0; i < SliceChunks; i++)
            {
                using var r = connA.SendRequest(VfioUserCommand.MigDataWrite, w8, buf);
            }
        }));

        // What one extra 1 MiB copy costs here (source walks a state-sized buffer, like a device's copy out of its state).
        byte[] big = GC.AllocateUninitializedArray<byte>((int)Math.Min(bytes, 256L << 20));
        big.AsSpan().Fill(1);
        long bigPos = 0;
        (double, double) Copy() => (SliceChunks * (double)Chunk, Measure.Seconds(() =>
        {
            for (int i = 0; i < SliceChunks; i++)
            {
                big.AsSpan((int)bigPos, Chunk).CopyTo(buf);
                bigPos = (bigPos + Chunk) % (big.Length - Chunk + 1);
            }
        }));

        int runs = ctx.Options.RunCount;
        // Each run moves at least 256 MiB each way (and a whole stream at 1 GiB).
        int slices = (int)Math.Max(4, bytes / Chunk / SliceChunks);
        ctx.Progress($"{scenario}: {label}: end to end, {runs} runs × {slices} slices × {SliceChunks} MiB");
        var (b, v) = Measure.Paired(runs, slices, RawE2E, e2e.Slice, perOp: false, Measure.MiB);
        var fe = Measure.Figure(scenario, $"MIG_DATA_READ→WRITE source→client→target, {label}", "MiB/s", b, v,
            "raw UNIX-socket read request/reply then write request/reply, same shapes, two raw server processes", 0.8, GoalDirection.AtLeast);
        var (_, cp) = Measure.Paired(runs, slices, RawE2E, Copy, perOp: false, Measure.MiB);
        double copyMs = Chunk / Measure.MiB / Summary.Of(cp).Median * 1e3;
        double rawMs = Chunk / Measure.MiB / fe.Baseline!.Median * 1e3;
        double vmigMs = Chunk / Measure.MiB / fe.Value.Median * 1e3;
        fe.Extra["memcpy of one 1 MiB chunk, ms (same run)"] = copyMs;
        fe.Extra["raw ms per chunk (read+write)"] = rawMs;
        fe.Extra["vmig ms per chunk (read+write)"] = vmigMs;
        fe.Extra["vmig − raw per chunk, in 1 MiB memcpy units (zero-copy servers: 0 would be parity)"] = (vmigMs - rawMs) / copyMs;
        ctx.Report.Figures.Add(fe);
        e2e.Finish();
        ctx.Progress($"{scenario}: {label}: read only");
        (b, v) = Measure.Paired(runs, slices, RawRead, readOnly.Slice, perOp: false, Measure.MiB);
        var fr = Measure.Figure(scenario, $"MIG_DATA_READ only, {label}", "MiB/s", b, v,
            "raw UNIX-socket request 24 B / reply 16+8+1 MiB", 0.8, GoalDirection.AtLeast);
        var (b2, c2) = Measure.Paired(runs, slices, RawRead, ConnRead, perOp: false, Measure.MiB);
        fr.Extra["client-transport-only ratio (VfioUserConnection, reply received into the caller buffer → raw server), median"] = Summary.Of(c2.Zip(b2, (x, y) => x / y).ToList()).Median;
        ctx.Report.Figures.Add(fr);
        ctx.Report.Figures.Add(ServerCpuFigure(scenario, $"source server CPU per MiB read (MIG_DATA_READ only), {label}", runs,
            readOnly.Slice, [srcPeer.Pid], RawRead, [rawA.Pid], "raw server process, same reads"));
        readOnly.Finish();
        ctx.Progress($"{scenario}: {label}: write only");
        (b, v) = Measure.Paired(runs, slices, RawWrite, writeOnly.Slice, perOp: false, Measure.MiB);
        var fw = Measure.Figure(scenario, $"MIG_DATA_WRITE only, {label}", "MiB/s", b, v,
            "raw UNIX-socket request 16+8+1 MiB / reply 24 B", 0.8, GoalDirection.AtLeast);
        var (b3, c3) = Measure.Paired(runs, slices, RawWrite, ConnWrite, perOp: false, Measure.MiB);
        fw.Extra["client-transport-only ratio (VfioUserConnection MIG_DATA_WRITE → raw server), median"] = Summary.Of(c3.Zip(b3, (x, y) => x / y).ToList()).Median;
        ctx.Report.Figures.Add(fw);
        ctx.Report.Figures.Add(ServerCpuFigure(scenario, $"target server CPU per MiB written (MIG_DATA_WRITE only), {label}", runs,
            writeOnly.Slice, [dstPeer.Pid], RawWrite, [rawB.Pid], "raw server process, same writes"));

        // Prove the bytes arrived: finish open streams, one whole transfer, then both servers' checksums must match.
        writeOnly.Finish();
        long moved = e2e.WholeStream();
        string a = srcPeer.Ask("crc"), d = dstPeer.Ask("crc");
        if (a != d || moved != bytes)
        {
            throw new InvalidOperationException($"{scenario} {label}: moved {moved} bytes; target state CRC32C {d} vs source {a}");
        }
        ctx.Report.Notes.Add($"{scenario} {label}: stream {moved} bytes; source and target state CRC32C equal ({a}) after the runs.");
    }

    /// <summary>
    /// CPU time server processes spend per MiB moved (all their threads, from /proc/PID/task/*/schedstat, ns), vmig's
    /// servers vs the raw servers, slices alternating: on a shared 2-core machine wall-clock ratios swing with other
    /// processes' load, the CPU a server burns per MiB much less. Ratio &lt; 1 means vmig's servers work less.
    /// </summary>
    internal static BenchFigure ServerCpuFigure(string scenario, string name, int runs, Func<(double, double)> vmigSlice, int[] vmigPids,
        Func<(double, double)> rawSlice, int[] rawPids, string baselineName)
    {
        var v = new List<double>();
        var b = new List<double>();
        for (int i = 0; i < runs * 2; i++)
        {
            bool vmigFirst = i % 2 == 0;
            for (int k = 0; k < 2; k++)
            {
                bool isVmig = vmigFirst == (k == 0);
                int[] pids = isVmig ? vmigPids : rawPids;
                long c0 = pids.Sum(CpuNs);
                var (bytes, _) = (isVmig ? vmigSlice : rawSlice)();
                double perMiB = (pids.Sum(CpuNs) - c0) / 1e3 / (bytes / Measure.MiB);
                (isVmig ? v : b).Add(perMiB);
            }
        }
        return Measure.Figure(scenario, name, "µs/MiB", b, v, baselineName, null, GoalDirection.None,
            "server process CPU (all threads, schedstat) per MiB, 64 MiB slices alternating; ratio < 1 = vmig's server spends less");
    }

    private static long CpuNs(int pid)
    {
        long total = 0;
        foreach (string task in Directory.GetDirectories($"/proc/{pid}/task"))
        {
            try
            {
                total += long.Parse(File.ReadAllText(Path.Combine(task, "schedstat")).Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
            }
            catch (IOException)
            {
                // The thread ended between the listing and the read.
            }
        }
        return total;
    }

    /// <summary>A save stream from <c>src</c> and/or a resume stream into <c>dst</c>, kept open across slices.</summary>
    private sealed class StreamPair(VfioUserClient? src, VfioUserClient? dst, long stateBytes, byte[] buf)
    {
        private bool _open;
        private long _written;

        public (double, double) Slice()
        {
            long moved = 0;
            double s = Measure.Seconds(() =>
            {
                for (int i = 0; i < SliceChunks; i++)
                {
                    moved += Step();
                }
            });
            return (moved, s);
        }

        /// <summary>One chunk (opening the stream first, closing it at its end). Returns bytes moved.</summary>
        private int Step()
        {
            if (!_open)
            {
                src?.SetState(DeviceState.StopCopy);
                dst?.SetState(DeviceState.Resuming);
                _open = true;
                _written = 0;
            }
            int n = src is null ? (int)Math.Min(Chunk, stateBytes - _written) : src.ReadMigrationData(buf);
            if (n > 0 && dst is not null)
            {
                dst.WriteMigrationData(buf.AsSpan(0, n));
            }
            _written += n;
            if (n < Chunk || (src is null && _written == stateBytes))
            {
                src?.SetState(DeviceState.Running);
                dst?.SetState(DeviceState.Running);
                _open = false;
            }
            return n;
        }

        public void Finish()
        {
            while (_open)
            {
                Step();
            }
        }

        public long WholeStream()
        {
            long total = 0;
            do
            {
                total += Step();
            }
            while (_open);
            return total;
        }
    }
}
