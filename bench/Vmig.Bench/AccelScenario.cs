using System.Diagnostics;
using Vmig.Devices.Accelerator;
using Vmig.Guest.Accelerator;
using Vmig.Migration;
using Vmig.Spec;
using Vmig.Spec.Accelerator;
using Vmig.VfioUser;
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
        // The same migration through the same vfio-user path with a device that only moves bytes (no stream framing, no
        // CRC32C): separates what the transport costs from what the accelerator's stream costs.
        using var bareSrcPeer = ctx.StartPeer("state", "accel-bare-src", bytes);
        using var bareDstPeer = ctx.StartPeer("state", "accel-bare-dst", bytes);
        using var src = VfioUserVmDevice.Connect(srcPeer.SocketPath, "accel0", "accel", "bench");
        using var dst = VfioUserClient.Connect(dstPeer.SocketPath);
        using var ra = new RawClient(rawA.SocketPath);
        using var rb = new RawClient(rawB.SocketPath);
        using var bareSrc = VfioUserClient.Connect(bareSrcPeer.SocketPath);
        using var bareDst = VfioUserClient.Connect(bareDstPeer.SocketPath);
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
        // CPU ms per GiB moved, per process: [source device host, target device host, this client] for the migrations
        // (pre-copy and stop-copy modes) and [raw server A, raw server B, this client] for the raw transfers.
        int[] migPids = [srcPeer.Pid, dstPeer.Pid, Environment.ProcessId];
        int[] rawPids = [rawA.Pid, rawB.Pid, Environment.ProcessId];
        var preCpu = new CpuPerGiB();
        var stopCpu = new CpuPerGiB();
        var rawCpu = new CpuPerGiB();

        // →STOP_COPY, read to the end into the target, target RESUMING→STOP (commit): (bytes, seconds).
        (long Bytes, double Seconds) StopCopyToEnd()
        {
            long s = 0;
            double ts = Measure.Seconds(() =>
            {
                src.SetState(DeviceState.StopCopy);
                s = Pump(src.Client, dst, buf);
                dst.SetState(DeviceState.Stop);
            });
            src.SetState(DeviceState.Running);
            dst.SetState(DeviceState.Running);
            return (s, ts);
        }

        // Pre-copy mode: RUNNING→PRE_COPY, read everything pre-copy offers, then STOP_COPY for the rest (the tail).
        void MigratePrecopy()
        {
            long p = 0;
            dst.SetState(DeviceState.Resuming);
            var c0 = CpuPerGiB.Sample(migPids);
            double tp = Measure.Seconds(() =>
            {
                src.SetState(DeviceState.PreCopy);
                p = Pump(src.Client, dst, buf);
            });
            var (s, ts) = StopCopyToEnd();
            preCpu.Add(c0, CpuPerGiB.Sample(migPids), p + s);
            (preBytes, tailBytes) = (p, s);
            pre.Add(p / Measure.MiB / tp);
            tail.Add(ts * 1e3);
        }

        // Stop-copy mode: RUNNING→STOP→STOP_COPY, the whole device memory in stop-copy.
        void MigrateStopCopy()
        {
            dst.SetState(DeviceState.Resuming);
            var c0 = CpuPerGiB.Sample(migPids);
            var (s, ts) = StopCopyToEnd();
            stopCpu.Add(c0, CpuPerGiB.Sample(migPids), s);
            stopBytes = s;
            stop.Add(s / Measure.MiB / ts);
        }

        double Raw()
        {
            long chunks = Math.Max(1, bytes / Chunk);
            var c0 = CpuPerGiB.Sample(rawPids);
            double mibs = chunks * Chunk / Measure.MiB / Measure.Seconds(() =>
            {
                for (long i = 0; i < chunks; i++)
                {
                    int n = ra.Read(buf);
                    rb.Write(buf.AsSpan(0, n));
                }
            });
            rawCpu.Add(c0, CpuPerGiB.Sample(rawPids), chunks * Chunk);
            return mibs;
        }

        ctx.Progress($"accel: {label}: {ctx.Options.RunCount} runs of (pre-copy migration, stop-copy migration, raw transfer)");
        MigratePrecopy();
        // The warm-up migration lands in a target VF whose device memory was never written: every page is a first-touch
        // shmem fault (allocate + zero) during the receive, as in a real migration into a freshly created VF. The timed
        // runs below reuse those pages (as the raw server reuses its pre-touched array), so they leave this cost out on
        // both sides; it is reported here rather than hidden.
        double freshPre = pre[0];
        double freshTargetCpu = preCpu.TargetMedian;
        MigrateStopCopy();
        Raw();
        pre.Clear();
        tail.Clear();
        stop.Clear();
        preCpu.Clear();
        stopCpu.Clear();
        rawCpu.Clear();
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
        pf.Extra["warm-up pre-copy migration into a never-written target VF (first-touch faults), MiB/s"] = freshPre;
        pf.Extra["warm-up: target device host CPU ms/GiB"] = freshTargetCpu;
        var ts = Summary.Of(tail);
        pf.Extra["stop-copy tail after pre-copy, ms (median)"] = ts.Median;
        pf.Extra["stop-copy tail after pre-copy, ms (max)"] = ts.Max;
        ctx.Report.Figures.Add(pf);
        ctx.Report.Figures.Add(Measure.Figure("accel", $"device memory stop-copy throughput (no pre-copy), {label}", "MiB/s", raws, stop, rawName, 0.8, GoalDirection.AtLeast));
        ctx.Report.Figures.Add(CpuPerGiB.Figure($"CPU ms per GiB, all three processes, stop-copy migration vs raw, {label}", stopCpu, rawCpu));
        ctx.Report.Figures.Add(CpuPerGiB.Figure($"CPU ms per GiB, all three processes, pre-copy migration (with its stop-copy tail) vs raw, {label}", preCpu, rawCpu));
        Breakdown(ctx, label, bytes, ra, rb, new StopCopySession(src.Client, dst, buf), new StopCopySession(bareSrc, bareDst, buf), buf,
            [srcPeer.Pid, dstPeer.Pid], [bareSrcPeer.Pid, bareDstPeer.Pid], [rawA.Pid, rawB.Pid]);

        TrackingOverhead(ctx, src, drv, ram);
        src.DmaUnmap(0, ram.Size);
        DeviceSide(ctx, bytes);
    }

    /// <summary>
    /// Stop-copy throughput measured the way the "migdata" scenario measures (interleaved 64 MiB slices, so load from
    /// other processes falls on both sides of each ratio alike): the accelerator vs raw, the bare-copy device vs raw
    /// (the vfio-user transport's share), and the accelerator vs the bare-copy device (the accelerator stream's share:
    /// CRC32C on both sides, framing).
    /// </summary>
    private static void Breakdown(BenchContext ctx, string label, long bytes, RawClient ra, RawClient rb, StopCopySession accel, StopCopySession bare, byte[] buf,
        int[] accelPids, int[] barePids, int[] rawPids)
    {
        const int SliceChunks = MigDataScenario.SliceChunks;
        (double, double) Raw() => (SliceChunks * (double)Chunk, Measure.Seconds(() =>
        {
            for (int i = 0; i < SliceChunks; i++)
            {
                int n = ra.Read(buf);
                rb.Write(buf.AsSpan(0, n));
            }
        }));
        int runs = ctx.Options.RunCount;
        int slices = (int)Math.Max(4, bytes / Chunk / SliceChunks / 2);
        const string rawName = "raw UNIX-socket read then write, 1 MiB request/reply shapes, two raw server processes";
        ctx.Progress($"accel: {label}: stop-copy breakdown, {runs} runs × {slices} slices × {SliceChunks} MiB, three pairings");
        var (b, v) = Measure.Paired(runs, slices, Raw, accel.Slice, perOp: false, Measure.MiB);
        ctx.Report.Figures.Add(Measure.Figure("accel", $"device memory stop-copy throughput, interleaved 64 MiB slices, {label}", "MiB/s", b, v, rawName, 0.8, GoalDirection.AtLeast,
            "one STOP_COPY stream read in 64 MiB slices alternating with raw slices (restarted when it ends, commit included)"));
        (b, v) = Measure.Paired(runs, slices, Raw, bare.Slice, perOp: false, Measure.MiB);
        ctx.Report.Figures.Add(Measure.Figure("accel", $"breakdown: bare-copy device stop-copy vs raw (the transport's share), {label}", "MiB/s", b, v, rawName, null, GoalDirection.None,
            "BenchStateDevice over the same vfio-user path, zero-copy both ways (state gathered into the reply, requests received into the state), nothing else"));
        (b, v) = Measure.Paired(runs, slices, bare.Slice, accel.Slice, perOp: false, Measure.MiB);
        ctx.Report.Figures.Add(Measure.Figure("accel", $"breakdown: accelerator vs bare-copy device stop-copy (the stream's share), {label}", "MiB/s", b, v,
            "bare-copy device (BenchStateDevice), same path and chunking", null, GoalDirection.None,
            "what CRC32C on both sides (the source copies and checksums in PRE_COPY, checksums in place in STOP_COPY; the target checksums in place) and record framing cost over a device that only moves bytes"));
        ctx.Report.Figures.Add(MigDataScenario.ServerCpuFigure("accel", $"source+target server CPU per MiB, stop-copy, accelerator vs raw, {label}", runs,
            accel.Slice, accelPids, Raw, rawPids, "the two raw server processes, same bytes"));
        ctx.Report.Figures.Add(MigDataScenario.ServerCpuFigure("accel", $"source+target server CPU per MiB, stop-copy, bare zero-copy device vs raw, {label}", runs,
            bare.Slice, barePids, Raw, rawPids, "the two raw server processes, same bytes"));
        accel.Finish();
        bare.Finish();
    }

    /// <summary>A STOP_COPY stream from source to target read in slices; starts over (RESUMING→STOP commit, both back to RUNNING) when it ends.</summary>
    private sealed class StopCopySession(VfioUserClient src, VfioUserClient dst, byte[] buf)
    {
        private bool _open;

        public (double, double) Slice()
        {
            long moved = 0;
            double seconds = Measure.Seconds(() => moved = Pump());
            return (moved, seconds);
        }

        private long Pump()
        {
            long moved = 0;
            for (int i = 0; i < MigDataScenario.SliceChunks; i++)
            {
                if (!_open)
                {
                    dst.SetState(DeviceState.Resuming);
                    src.SetState(DeviceState.StopCopy);
                    _open = true;
                }
                int n = src.ReadMigrationData(buf);
                if (n > 0)
                {
                    dst.WriteMigrationData(buf.AsSpan(0, n));
                }
                moved += n;
                if (n < buf.Length)
                {
                    Finish();
                }
            }
            return moved;
        }

        public void Finish()
        {
            if (!_open)
            {
                return;
            }
            // A session cut mid-stream leaves the target incomplete: reset it rather than commit.
            src.SetState(DeviceState.Running);
            _open = false;
            try
            {
                dst.SetState(DeviceState.Stop);
            }
            catch (VfioUserException)
            {
                dst.Reset();
            }
            dst.SetState(DeviceState.Running);
        }
    }

    /// <summary>
    /// Where the time goes: the device's own share of a stop-copy migration, measured in-process (no socket) — the save
    /// stream's MIG_DATA_READ work (copy from device memory + CRC32C) and the load stream's MIG_DATA_WRITE work (CRC32C
    /// check + copy into device memory), in 1 MiB chunks — next to the bare copies a stream without checksums needs
    /// (device memory → buffer → device memory, what the "migdata" scenario's device does), in µs per MiB. (The socket
    /// path's share is the bare-copy device vs raw pairing in <see cref="Breakdown"/>: per-MiB times do not add up across
    /// processes on two shared cores, so no residual is derived here.)
    /// </summary>
    private static void DeviceSide(BenchContext ctx, long bytes)
    {
        long size = Math.Min(bytes, 256L << 20);
        ctx.Progress($"accel: device-side cost in-process, {size >> 20} MiB");
        using var srcPf = new AcceleratorPf(1, AcceleratorProfile.Create((ulong)size));
        using var dstPf = new AcceleratorPf(1, AcceleratorProfile.Create((ulong)size));
        srcPf.EnableVfs(1);
        dstPf.EnableVfs(1);
        var src = srcPf.GetVf(0);
        var dst = dstPf.GetVf(0);
        for (long off = 0; off < size; off += Chunk)
        {
            var words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(src.Memory.GetSpan(off, Chunk));
            for (int i = 0; i < words.Length; i++)
            {
                words[i] = (ulong)(off + (i * 8)) * 0x9E3779B97F4A7C15UL;
            }
        }
        byte[] buf = GC.AllocateUninitializedArray<byte>(Chunk, pinned: true);
        var saves = new List<double>();
        var loads = new List<double>();

        (double, double) Stream()
        {
            OpenStreams(src, dst);
            long moved = 0;
            double s = 0, l = 0;
            int n;
            do
            {
                long t0 = Stopwatch.GetTimestamp();
                n = src.Migration.ReadData(buf);
                long t1 = Stopwatch.GetTimestamp();
                dst.Migration.WriteData(buf.AsSpan(0, n));
                s += Stopwatch.GetElapsedTime(t0, t1).TotalSeconds;
                l += Stopwatch.GetElapsedTime(t1).TotalSeconds;
                moved += n;
            }
            while (n == buf.Length);
            CloseStreams(src, dst);
            saves.Add(s / (moved / Measure.MiB) * 1e6);
            loads.Add(l / (moved / Measure.MiB) * 1e6);
            return (moved / Measure.MiB, s + l);
        }

        (double, double) Copies() => (size / Measure.MiB, Measure.Seconds(() =>
        {
            for (long off = 0; off < size; off += Chunk)
            {
                src.Memory.GetSpan(off, Chunk).CopyTo(buf);
                buf.CopyTo(dst.Memory.GetSpan(off, Chunk));
            }
        }));

        var (b, v) = Measure.Paired(ctx.Options.RunCount, 2, Copies, Stream, perOp: true);
        var f = Measure.Figure("accel", "device side of stop-copy, in-process: save + load per MiB", "µs/MiB", b, v,
            "the bare copies (device memory → 1 MiB buffer → device memory)", null, GoalDirection.None,
            "no socket: the save stream's reads and the load stream's writes only; ratio − 1 is what CRC32C, framing and the "
            + "load's check-before-apply add to the copies. On a loaded machine wall-clock µs inflate with the load: the "
            + "'best' entries (least disturbed) are the ones to compare");
        // Skip the warm-up migration (its target pages are first-touch faults).
        f.Extra["save (copy from device memory + CRC32C in one pass), µs/MiB, best migration"] = saves.Skip(1).Min();
        f.Extra["load (CRC32C check, then copy into device memory), µs/MiB, best migration"] = loads.Skip(1).Min();
        f.Extra["bare copies, µs/MiB, best run"] = b.Min();
        var (zs, zl, zsMsg, zlMsg) = ZeroCopyDeviceSide(src, dst, buf, ctx.Options.RunCount);
        f.Extra["zero-copy save (STOP_COPY gather: CRC32C over device memory in place, no copy), µs/MiB, best migration"] = zs;
        f.Extra["zero-copy load (a copy into the device's span standing for the socket receive, then CRC32C in place), µs/MiB, best migration"] = zl;
        // Whole-migration sums absorb every time slice another process takes; per-message percentiles on a loaded
        // machine keep the undisturbed messages' cost visible.
        f.Extra["zero-copy save, µs per 1 MiB message, p10"] = zsMsg.P10;
        f.Extra["zero-copy save, µs per 1 MiB message, p50"] = zsMsg.P50;
        f.Extra["zero-copy load, µs per 1 MiB message, p10"] = zlMsg.P10;
        f.Extra["zero-copy load, µs per 1 MiB message, p50"] = zlMsg.P50;
        double crc = double.MaxValue;
        for (int pass = 0; pass < 5; pass++)
        {
            crc = Math.Min(crc, Measure.Seconds(() =>
            {
                for (long off = 0; off < size; off += Chunk)
                {
                    _ = Crc32C.Compute(src.Memory.GetSpan(off, Chunk));
                }
            }) / (size / Measure.MiB) * 1e6);
        }
        f.Extra["CRC32C alone over device memory, µs/MiB, best of 5 passes"] = crc;
        ctx.Report.Figures.Add(f);
    }

    /// <summary>The device side of the zero-copy paths the server uses (<see cref="IMigrationDataSource"/>,
    /// <see cref="IMigrationDataSink"/>), in 1 MiB messages: best µs/MiB of save and of load over the migrations.</summary>
    private static (double Save, double Load, (double P10, double P50) SaveMessage, (double P10, double P50) LoadMessage) ZeroCopyDeviceSide(
        AcceleratorVf src, AcceleratorVf dst, byte[] buf, int runs)
    {
        var saveMessages = new List<double>();
        var loadMessages = new List<double>();
        var source = (IMigrationDataSource)src.Migration;
        var sink = (IMigrationDataSink)dst.Migration;
        var list = new MigrationGatherList();
        double bestSave = double.MaxValue, bestLoad = double.MaxValue;
        for (int r = 0; r <= runs; r++)
        {
            OpenStreams(src, dst);
            long moved = 0;
            double s = 0, l = 0;
            int n;
            do
            {
                long t0 = Stopwatch.GetTimestamp();
                n = source.ReadDataGather(buf.Length, list);
                long t1 = Stopwatch.GetTimestamp();
                // The socket's copy (the kernel's, on the real path) stands in for the send + receive.
                list.CopyTo(buf);
                list.Clear();
                long t2 = Stopwatch.GetTimestamp();
                for (int at = 0; at < n;)
                {
                    var span = sink.GetWriteSpan(n - at);
                    buf.AsSpan(at, span.Length).CopyTo(span);
                    sink.AdvanceWrite(span.Length);
                    at += span.Length;
                }
                double ms = Stopwatch.GetElapsedTime(t0, t1).TotalSeconds, ml = Stopwatch.GetElapsedTime(t2).TotalSeconds;
                s += ms;
                l += ml;
                moved += n;
                if (r > 0 && n == buf.Length)
                {
                    saveMessages.Add(ms * 1e6);
                    loadMessages.Add(ml * 1e6);
                }
            }
            while (n == buf.Length);
            CloseStreams(src, dst);
            if (r > 0)
            {
                bestSave = Math.Min(bestSave, s / (moved / Measure.MiB) * 1e6);
                bestLoad = Math.Min(bestLoad, l / (moved / Measure.MiB) * 1e6);
            }
        }
        return (bestSave, bestLoad, Percentiles(saveMessages), Percentiles(loadMessages));
    }

    private static (double P10, double P50) Percentiles(List<double> values)
    {
        values.Sort();
        return values.Count == 0 ? (double.NaN, double.NaN) : (values[values.Count / 10], values[values.Count / 2]);
    }

    /// <summary>In-process: source RUNNING→STOP_COPY, target RUNNING→RESUMING (arc by arc).</summary>
    private static void OpenStreams(AcceleratorVf src, AcceleratorVf dst)
    {
        Step(src.Migration, DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.StopCopy);
        Step(dst.Migration, DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.Resuming);
    }

    /// <summary>In-process: target RESUMING→RUNNING (commits), source STOP_COPY→RUNNING.</summary>
    private static void CloseStreams(AcceleratorVf src, AcceleratorVf dst)
    {
        Step(dst.Migration, DeviceState.Resuming, DeviceState.Stop, DeviceState.RunningP2P, DeviceState.Running);
        Step(src.Migration, DeviceState.StopCopy, DeviceState.Stop, DeviceState.RunningP2P, DeviceState.Running);
    }

    private static void Step(IMigrationDevice d, params DeviceState[] path)
    {
        for (int i = 1; i < path.Length; i++)
        {
            d.Step(path[i - 1], path[i]);
        }
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

    /// <summary>
    /// CPU (user + system, /proc/PID/stat, 10 ms ticks) each of three processes spent per GiB over whole transfers:
    /// a 1 GiB transfer takes 0.5–1 s, so a tick is 1–2% of a process's figure. Less sensitive to other processes'
    /// load on the shared cores than wall-clock throughput (they take time slices, not work per byte).
    /// </summary>
    private sealed class CpuPerGiB
    {
        private readonly List<double>[] _perProcess = [[], [], []];

        public List<double> Total { get; } = [];

        public double TargetMedian => Summary.Of(_perProcess[1]).Median;

        public static double[] Sample(int[] pids) => pids.Select(ThreadCpu.OfProcess).ToArray();

        public void Add(double[] before, double[] after, long bytes)
        {
            double gib = bytes / (double)(1L << 30);
            for (int i = 0; i < _perProcess.Length; i++)
            {
                _perProcess[i].Add((after[i] - before[i]) / gib);
            }
            Total.Add((after.Sum() - before.Sum()) / gib);
        }

        public void Clear()
        {
            foreach (var l in _perProcess)
            {
                l.Clear();
            }
            Total.Clear();
        }

        public static BenchFigure Figure(string name, CpuPerGiB vmig, CpuPerGiB raw)
        {
            var f = Measure.Figure("accel", name, "CPU ms/GiB", raw.Total, vmig.Total,
                "raw transfer: two raw server processes + this client, same bytes", null, GoalDirection.None,
                "sum over the source device host, the target device host and the bench client (/proc/PID/stat, 10 ms ticks), whole transfers");
            string[] who = ["source device host", "target device host", "client (bench)"];
            string[] rawWho = ["raw server A (reads)", "raw server B (writes)", "client (bench)"];
            for (int i = 0; i < who.Length; i++)
            {
                f.Extra[$"vmig {who[i]}, CPU ms/GiB (median)"] = Summary.Of(vmig._perProcess[i]).Median;
                f.Extra[$"raw {rawWho[i]}, CPU ms/GiB (median)"] = Summary.Of(raw._perProcess[i]).Median;
            }
            return f;
        }
    }

    private static void Check(AcceleratorCompletion c)
    {
        if (c.Status != AcceleratorJobStatus.Success)
        {
            throw new InvalidOperationException($"accelerator job failed: {c.Status}");
        }
    }
}
