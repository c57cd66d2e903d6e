using Vmig.Guest.Accelerator;
using Vmig.Migration;
using Vmig.Spec.Accelerator;
using Vmig.VfioUser.Client;
using Vmig.Vmm;

namespace Vmig.Bench;

/// <summary>
/// Scenario "accel": an accelerator VF's device memory (1 GiB; quick 64 MiB) migrated between two device processes
/// through this client with MIG_DATA_READ/WRITE in 1 MiB chunks — pre-copy (RUNNING→PRE_COPY, read until "no more
/// for now", written into the target in RESUMING) and stop-copy (→STOP_COPY, read to the end) timed separately —
/// next to the raw UNIX-socket read-then-write of the same bytes and shapes, in the same runs. The target commits
/// (RESUMING→STOP validates the self-checking stream) and the memories' CRC32C must match. Then the dirty-tracking
/// overhead: guest-driver CopyToDevice job throughput with tracking on (device in PRE_COPY) vs off (RUNNING).
/// </summary>
internal static class AccelScenario
{
    private const int Chunk = MigDataScenario.Chunk;

    public static void Run(BenchContext ctx)
    {
        long bytes = ctx.Options.Quick ? 64L << 20 : 1L << 30;
        string label = $"{bytes >> 20} MiB";
        ctx.Progress($"accel: {label}: starting peers");
        using var srcPeer = ctx.StartPeer("accel", "accel-src", bytes);
        using var dstPeer = ctx.StartPeer("accel", "accel-dst", bytes);
        using var rawA = ctx.StartPeer("raw", "accel-rawa", bytes);
        using var rawB = ctx.StartPeer("raw", "accel-rawb", bytes);
        using var src = VfioUserVmDevice.Connect(srcPeer.SocketPath, "accel0", "accel", "bench");
        using var dst = VfioUserClient.Connect(dstPeer.SocketPath);
        using var ra = new RawClient(rawA.SocketPath);
        using var rb = new RawClient(rawB.SocketPath);
        byte[] buf = GC.AllocateUninitializedArray<byte>(Chunk, pinned: true);

        // Give device memory real content: a guest driver fills it with jobs over vfio-user (DMA to guest RAM memfd).
        using var ram = GuestRam.Create(16UL << 20, "bench-accel-ram");
        src.DmaMap(0, ram.Size, ram.Fd, 0);
        using var fn = new VmPciFunction(src);
        var drv = AcceleratorDriver.Initialize(ram, fn, 0x10_0000, 64);
        for (long off = 0; off < bytes; off += 16 << 20)
        {
            Check(drv.Run(new AcceleratorJob(AcceleratorOpcode.Fill, AcceleratorJobFlags.None, 0, 0, (ulong)off, 16UL << 20, (ulong)off * 0x9E3779B97F4A7C15UL)));
        }

        var pre = new List<double>();
        var tail = new List<double>();
        var stop = new List<double>();
        long preBytes = 0, tailBytes = 0, stopBytes = 0;

        // Pre-copy mode: RUNNING→PRE_COPY, read everything pre-copy offers, then STOP_COPY for the rest (the tail).
        void MigratePrecopy()
        {
            long p = 0, s = 0;
            dst.SetState(DeviceState.Resuming);
            double tp = Measure.Seconds(() =>
            {
                src.SetState(DeviceState.PreCopy);
                p = Pump(src.Client, dst, buf);
            });
            double ts = Measure.Seconds(() =>
            {
                src.SetState(DeviceState.StopCopy);
                s = Pump(src.Client, dst, buf);
                dst.SetState(DeviceState.Stop);
            });
            src.SetState(DeviceState.Running);
            dst.SetState(DeviceState.Running);
            (preBytes, tailBytes) = (p, s);
            pre.Add(p / Measure.MiB / tp);
            tail.Add(ts * 1e3);
        }

        // Stop-copy mode: RUNNING→STOP→STOP_COPY, the whole device memory in stop-copy.
        void MigrateStopCopy()
        {
            long s = 0;
            dst.SetState(DeviceState.Resuming);
            double ts = Measure.Seconds(() =>
            {
                src.SetState(DeviceState.StopCopy);
                s = Pump(src.Client, dst, buf);
                dst.SetState(DeviceState.Stop);
            });
            src.SetState(DeviceState.Running);
            dst.SetState(DeviceState.Running);
            stopBytes = s;
            stop.Add(s / Measure.MiB / ts);
        }

        double Raw()
        {
            long chunks = Math.Max(1, bytes / Chunk);
            return chunks * Chunk / Measure.MiB / Measure.Seconds(() =>
            {
                for (long i = 0; i < chunks; i++)
                {
                    int n = ra.Read(buf);
                    rb.Write(buf.AsSpan(0, n));
                }
            });
        }

        ctx.Progress($"accel: {label}: {ctx.Options.RunCount} runs of (pre-copy migration, stop-copy migration, raw transfer)");
        MigratePrecopy();
        MigrateStopCopy();
        Raw();
        pre.Clear();
        tail.Clear();
        stop.Clear();
        var raws = new List<double>();
        for (int i = 0; i < ctx.Options.RunCount; i++)
        {
            if (i % 2 == 0)
            {
                raws.Add(Raw());
                MigratePrecopy();
                MigrateStopCopy();
            }
            else
            {
                MigrateStopCopy();
                MigratePrecopy();
                raws.Add(Raw());
            }
        }
        string a = srcPeer.Ask("crc"), d = dstPeer.Ask("crc");
        if (a != d)
        {
            throw new InvalidOperationException($"accel: target device memory CRC32C {d} differs from source {a}");
        }
        ctx.Report.Notes.Add($"accel {label}: pre-copy mode moves {preBytes} bytes in pre-copy + {tailBytes} bytes in stop-copy; stop-copy mode moves {stopBytes} bytes; device memory CRC32C equal ({a}).");
        const string rawName = "raw UNIX-socket read then write of the same bytes, 1 MiB request/reply shapes, two raw server processes";
        var pf = Measure.Figure("accel", $"device memory pre-copy throughput, {label}", "MiB/s", raws, pre, rawName, 0.8, GoalDirection.AtLeast);
        var ts = Summary.Of(tail);
        pf.Extra["stop-copy tail after pre-copy, ms (median)"] = ts.Median;
        pf.Extra["stop-copy tail after pre-copy, ms (max)"] = ts.Max;
        ctx.Report.Figures.Add(pf);
        ctx.Report.Figures.Add(Measure.Figure("accel", $"device memory stop-copy throughput (no pre-copy), {label}", "MiB/s", raws, stop, rawName, 0.8, GoalDirection.AtLeast));

        TrackingOverhead(ctx, src, drv, ram);
        src.DmaUnmap(0, ram.Size);
    }

    /// <summary>Reads until a short reply, writing every chunk to the target. Returns bytes moved.</summary>
    private static long Pump(VfioUserClient src, VfioUserClient dst, byte[] buf)
    {
        long total = 0;
        int n;
        do
        {
            n = src.ReadMigrationData(buf);
            if (n > 0)
            {
                dst.WriteMigrationData(buf.AsSpan(0, n));
            }
            total += n;
        }
        while (n == buf.Length);
        return total;
    }

    private static void TrackingOverhead(BenchContext ctx, VfioUserVmDevice dev, AcceleratorDriver drv, GuestRam ram)
    {
        const ulong JobBytes = 256 << 10;
        const ulong Guest = 0x40_0000;
        ram.GetHostSpan(Guest, (int)JobBytes).Fill(0x5A);
        ulong devSpan = Math.Min(drv.DeviceMemorySize, 64UL << 20);
        ulong next = 0;
        int jobs = ctx.Options.Quick ? 50 : 100;
        (double, double) Jobs() => (jobs * (double)JobBytes, Measure.Seconds(() =>
        {
            for (int i = 0; i < jobs; i++)
            {
                Check(drv.Run(new AcceleratorJob(AcceleratorOpcode.CopyToDevice, AcceleratorJobFlags.None, 0, Guest, next, JobBytes, 0)));
                next = (next + JobBytes) % devSpan;
            }
        }));
        (double, double) Off()
        {
            return Jobs();
        }
        (double, double) On()
        {
            // PRE_COPY starts the device's dirty tracking; the save stream is left unread.
            dev.SetState(DeviceState.PreCopy);
            var r = Jobs();
            dev.SetState(DeviceState.Running);
            return r;
        }
        ctx.Progress("accel: dirty-tracking overhead on CopyToDevice jobs (256 KiB)");
        var (b, v) = Measure.Paired(ctx.Options.RunCount, 6, Off, On, perOp: false, Measure.MiB);
        ctx.Report.Figures.Add(Measure.Figure("accel", "job throughput with device-memory dirty tracking on (PRE_COPY) vs off", "MiB/s", b, v,
            "same jobs, tracking off (RUNNING)", null, GoalDirection.None,
            "ratio < 1 is the tracking overhead; each 'on' slice includes the RUNNING→PRE_COPY→RUNNING arcs"));
    }

    private static void Check(AcceleratorCompletion c)
    {
        if (c.Status != AcceleratorJobStatus.Success)
        {
            throw new InvalidOperationException($"accelerator job failed: {c.Status}");
        }
    }
}
