using Vmig.InProcess;
using System.Diagnostics;
using Microsoft.Win32.SafeHandles;
using Vmig.Devices.Nvme;
using Vmig.Guest;
using Vmig.Guest.Nvme;
using Vmig.Native;
using Vmig.Spec.Nvme;
using Vmig.VfioUser.Server;
using Vmig.Vmm;

namespace Vmig.Bench;

/// <summary>
/// Scenario "nvme": 4 KiB random reads and writes through the guest NVMe driver (Vmig.Guest.Nvme) against the
/// emulated controller (Vmig.Devices.Nvme) — a VF served over vfio-user by a peer process, and the primary controller
/// in this process — at QD 1 and QD 32, shadow doorbells on and off, next to raw pread/pwrite of the same pattern
/// (4 KiB at random 4 KiB-aligned offsets, into the same guest-RAM buffers) on a file of the same size, measured in
/// the same run. Guest RAM is a memfd (the VMM's GuestRam) mapped as the device's DMA window. With shadow doorbells
/// each figure runs two ways: "MSI-X" (the I/O CQ has IEN = 1; the guest sleeps on the vector's eventfd) and "poll
/// queue" (the I/O CQ is created with IEN = 0 and the guest reaps by watching the phase tag: Linux nvme
/// <c>poll_queues</c> + io_uring IOPOLL, fio <c>hipri</c>). Goal ≥ 0.5× IOPS with shadow doorbells. In-process QD1
/// figures with shadow doorbells also report where a command's time goes (submit → SQE fetch → CQE → back in the
/// caller), from timestamps taken at the device's guest-memory accesses.
/// </summary>
internal static class NvmeScenario
{
    private const int Block = 4096;
    private const ulong DriverRegion = 0x100000;
    private const ulong DriverRegionSize = 16 << 20;
    private const ulong Buffers = 0x2000000;

    public static void Run(BenchContext ctx)
    {
        long fileBytes = ctx.Options.Quick ? 64L << 20 : 256L << 20;
        string path = Path.Combine(ctx.Directory, "ns.img");
        string rawPath = Path.Combine(ctx.Directory, "raw.img");
        FillFile(path, fileBytes);
        FillFile(rawPath, fileBytes);
        PeerProcess? peer = null;
        try
        {
            peer = ctx.StartPeer("nvme", "nvme-vf", fileBytes);
        }
        catch (InvalidOperationException e)
        {
            ctx.Report.Skipped["nvme over vfio-user"] = e.Message;
        }
        using (peer)
        {
            foreach (bool viaSocket in new[] { true, false })
            {
                if (viaSocket && peer is null)
                {
                    continue;
                }
                foreach (bool shadow in new[] { true, false })
                {
                    foreach (int qd in new[] { 1, 32 })
                    {
                        foreach (bool write in new[] { false, true })
                        {
                            // With shadow doorbells both completion modes run back to back, so they share the run's load.
                            foreach (var mode in shadow ? [CompletionMode.Msix, CompletionMode.PollQueue] : new[] { CompletionMode.Msix })
                            {
                                RunOne(ctx, viaSocket ? peer!.SocketPath : null, path, rawPath, fileBytes, shadow, qd, write, mode);
                            }
                        }
                    }
                }
            }
        }
    }

    private static void FillFile(string path, long bytes)
    {
        using var f = new FileStream(path, FileMode.Create, FileAccess.Write);
        var chunk = new byte[1 << 20];
        new Random(11).NextBytes(chunk);
        for (long o = 0; o < bytes; o += chunk.Length)
        {
            f.Write(chunk);
        }
    }

    /// <summary>
    /// How the guest learns of completions: MSI-X (sleep on the vector's eventfd) or a poll queue (IEN = 0, spin on the
    /// phase tag). A third way, MSI-X after a 20 µs spin on the phase tag at QD1 too, lost to both on this host
    /// (QD1 read p50 34 µs vs 13 µs; bench/results/s3-nvme/experiment-msix-spin20-quick.txt) and is not run.
    /// </summary>
    private enum CompletionMode
    {
        Msix,
        PollQueue,
    }

    /// <summary>One figure. <paramref name="vfSocket"/> non-null: the driver reaches an NVMe VF in the peer process over
    /// vfio-user (REGION_WRITE doorbells, memfd DMA, eventfd MSI-X); null: the primary controller in this process.</summary>
    private static void RunOne(BenchContext ctx, string? vfSocket, string path, string rawPath, long fileBytes, bool shadow, int qd, bool write, CompletionMode mode)
    {
        string name = $"{(vfSocket is null ? "in-process" : "VF over vfio-user")}: 4 KiB rand {(write ? "write" : "read")} QD{qd}, shadow {(shadow ? "on" : "off")}, "
            + (mode == CompletionMode.PollQueue ? "poll queue (IEN=0)" : "MSI-X");
        ctx.Progress("nvme: " + name);
        using var ram = GuestRam.Create(64UL << 20, "bench-nvme-ram");
        var owned = new Stack<IDisposable>();
        IGuestPciFunction gfn;
        NvmeDirectFunction? direct = null;
        StageClock? clock = null;
        CountingFunction? counting = null;
        uint nsid = 1;
        if (vfSocket is not null)
        {
            var dev = Connect(vfSocket);
            owned.Push(dev);
            dev.Reset();
            dev.DmaMap(0, ram.Size, ram.Fd, 0);
            var vfn = new VmPciFunction(dev);
            owned.Push(vfn);
            counting = new CountingFunction(vfn);
            gfn = counting;
        }
        else
        {
            var subsystem = new NvmeSubsystem(new NvmeSubsystemOptions { MaxSecondaryControllers = 1 });
            owned.Push(subsystem);
            nsid = subsystem.AddNamespace(path, Block);
            if (!subsystem.AttachNamespace(nsid, [0]).IsSuccess)
            {
                throw new InvalidOperationException("namespace attach failed");
            }
            var dma = new DmaSpace();
            owned.Push(dma);
            int rc = dma.Map(0, ram.Size, DmaProt.Read | DmaProt.Write, Mapping.Map(ram.Fd, 0, (long)ram.Size));
            if (rc != 0)
            {
                throw new InvalidOperationException($"DMA map: errno {rc}");
            }
            clock = qd == 1 && shadow ? new StageClock(dma) : null;
            direct = new NvmeDirectFunction(subsystem.Primary, clock ?? (IDmaSpace)dma, 2);
            owned.Push(direct);
            gfn = direct;
        }
        try
        {
            RunWorkload(ctx, name, ram, gfn, direct, counting, clock, nsid, rawPath, fileBytes, shadow, qd, write, mode);
        }
        finally
        {
            while (owned.Count > 0)
            {
                owned.Pop().Dispose();
            }
        }
    }

    /// <summary>Connects to the VF; the server takes one client at a time and refuses a new one until it has seen the
    /// previous client's disconnect, so a reconnect right after a figure is retried briefly.</summary>
    private static VfioUserVmDevice Connect(string socket)
    {
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                return VfioUserVmDevice.Connect(socket, "nvme0", "nvme", "bench");
            }
            catch (Vmig.VfioUser.VfioUserException) when (attempt < 100)
            {
                Thread.Sleep(20);
            }
        }
    }

    private static void RunWorkload(BenchContext ctx, string name, GuestRam ram, IGuestPciFunction fn, NvmeDirectFunction? direct, CountingFunction? counting,
        StageClock? clock, uint nsid, string rawPath, long fileBytes, bool shadow, int qd, bool write, CompletionMode mode)
    {
        bool polled = mode == CompletionMode.PollQueue;
        var drv = NvmeDriver.Initialize(ram, fn, DriverRegion, DriverRegionSize,
            new NvmeDriverOptions { IoQueues = 1, IoQueueEntries = 64, ShadowDoorbells = shadow, Interrupts = true, PollQueues = polled ? 1 : 0 });
        if (drv.IsPolled(1) != polled)
        {
            throw new InvalidOperationException($"queue 1 polled = {drv.IsPolled(1)}, wanted {polled}");
        }
        clock?.Watch(ram.ReadUInt64(DriverRegion + NvmeDriverState.OffQueues + NvmeDriverState.QueueDescSize + NvmeDriverState.QSqBase),
            ram.ReadUInt64(DriverRegion + NvmeDriverState.OffQueues + NvmeDriverState.QueueDescSize + NvmeDriverState.QCqBase), drv.IoQueueEntries);
        using var raw = File.OpenHandle(rawPath, FileMode.Open, FileAccess.ReadWrite);
        long blocks = fileBytes / Block;
        var rngV = new Random(1);
        var rngB = new Random(1);
        var op = write ? NvmeIoOpcode.Write : NvmeIoOpcode.Read;
        // Over the socket an I/O costs far more: smaller slices keep each figure to seconds.
        int opsPerSlice = direct is null ? (qd == 1 ? 100 : 400) : (qd == 1 ? 500 : 2000);
        var lat = new List<double>();
        var toFetch = new List<double>();
        var toCqe = new List<double>();
        var toCaller = new List<double>();
        long ios = 0;
        direct?.ResetCounters();
        counting?.ResetCounters();

        (double, double) Vmig()
        {
            ios += opsPerSlice;
            if (qd == 1)
            {
                return (opsPerSlice, Measure.Seconds(() =>
                {
                    for (int i = 0; i < opsPerSlice; i++)
                    {
                        long t0 = Stopwatch.GetTimestamp();
                        drv.Execute(1, NvmeDriver.ReadWrite(op, nsid, (ulong)rngV.NextInt64(blocks), 1), Buffers, Block);
                        long t3 = Stopwatch.GetTimestamp();
                        lat.Add(Stopwatch.GetElapsedTime(t0, t3).TotalMicroseconds);
                        if (clock is not null && clock.Take(out long fetched, out long posted) && fetched >= t0 && posted >= fetched && t3 >= posted)
                        {
                            toFetch.Add(Stopwatch.GetElapsedTime(t0, fetched).TotalMicroseconds);
                            toCqe.Add(Stopwatch.GetElapsedTime(fetched, posted).TotalMicroseconds);
                            toCaller.Add(Stopwatch.GetElapsedTime(posted, t3).TotalMicroseconds);
                        }
                    }
                }));
            }
            return (opsPerSlice, Measure.Seconds(() => RunQueueDepth(drv, nsid, op, blocks, qd, opsPerSlice, rngV)));
        }

        (double, double) Raw() => (opsPerSlice, Measure.Seconds(() =>
        {
            for (int i = 0; i < opsPerSlice; i++)
            {
                var buf = ram.GetHostSpan(Buffers + (ulong)(i % qd * Block), Block);
                long off = rngB.NextInt64(blocks) * Block;
                if (write)
                {
                    RandomAccess.Write(raw, buf, off);
                }
                else
                {
                    RandomAccess.Read(raw, buf, off);
                }
            }
        }));

        int slices = ctx.Options.Quick ? 6 : 8;
        var (b, v) = Measure.Paired(ctx.Options.RunCount, slices, Raw, Vmig, perOp: false);
        var f = Measure.Figure("nvme", name, "IOPS", b, v,
            "raw pread/pwrite 4 KiB at random offsets of a same-size file into guest RAM, one thread" + (qd > 1 ? " (QD has no meaning for sync pread)" : ""),
            shadow ? 0.5 : null, shadow ? GoalDirection.AtLeast : GoalDirection.None);
        if (lat.Count > 0)
        {
            lat.Sort();
            f.Extra["vmig latency p50 µs"] = lat[lat.Count / 2];
            f.Extra["vmig latency p99 µs"] = lat[(int)(lat.Count * 0.99)];
        }
        else
        {
            f.Extra["vmig mean latency µs (QD ÷ IOPS)"] = qd / f.Value.Median * 1e6;
        }
        if (toFetch.Count > 0)
        {
            // Medians of each stage (they need not add up to the p50 of the whole).
            f.Extra["p50 µs: Execute call → device fetched the SQE (driver submit + doorbell noticed)"] = Median(toFetch);
            f.Extra["p50 µs: SQE fetch → CQE written (the command: file I/O, DMA copy)"] = Median(toCqe);
            f.Extra["p50 µs: CQE written → Execute returned (interrupt or poll, reap)"] = Median(toCaller);
        }
        if (counting is not null)
        {
            f.Extra["MMIO doorbell REGION_WRITEs per I/O"] = Interlocked.Read(ref counting.DoorbellWrites) / (double)Math.Max(1, ios);
            f.Extra["interrupt waits that got an interrupt, per I/O"] = Interlocked.Read(ref counting.InterruptsSeen) / (double)Math.Max(1, ios);
            f.Extra["interrupt waits that timed out, per I/O"] = Interlocked.Read(ref counting.WaitTimeouts) / (double)Math.Max(1, ios);
        }
        if (direct is not null)
        {
            f.Extra["MMIO doorbell writes per I/O"] = direct.DoorbellWrites / (double)Math.Max(1, ios);
            f.Extra["interrupts per I/O"] = direct.Interrupts / (double)Math.Max(1, ios);
        }
        ctx.Report.Figures.Add(f);
        drv.Shutdown();
    }

    private static void RunQueueDepth(NvmeDriver drv, uint nsid, NvmeIoOpcode op, long blocks, int qd, int ops, Random rng)
    {
        int submitted = 0, done = 0;
        for (int i = 0; i < qd && submitted < ops; i++, submitted++)
        {
            drv.Submit(1, NvmeDriver.ReadWrite(op, nsid, (ulong)rng.NextInt64(blocks), 1), Buffers + (ulong)(i * Block), Block, (ulong)i);
        }
        var sw = Stopwatch.StartNew();
        while (done < ops)
        {
            if (drv.TryTakeAnyCompletion(1, out var c))
            {
                if (!c.Status.IsSuccess)
                {
                    throw new InvalidOperationException($"I/O failed: {c.Status}");
                }
                done++;
                if (submitted < ops)
                {
                    drv.Submit(1, NvmeDriver.ReadWrite(op, nsid, (ulong)rng.NextInt64(blocks), 1), Buffers + (c.Tag * Block), Block, c.Tag);
                    submitted++;
                }
                continue;
            }
            if (sw.ElapsedMilliseconds > 30_000)
            {
                throw new TimeoutException($"QD{qd}: {done} of {ops} completed in 30 s");
            }
            drv.WaitForCompletions(1, 5);
        }
    }

    /// <summary>Counts what the driver does through a function: doorbell writes (BAR0 ≥ 0x1000) and interrupt waits.</summary>
    private sealed class CountingFunction(IGuestPciFunction inner) : IGuestPciFunction
    {
        public long DoorbellWrites;
        public long InterruptsSeen;
        public long WaitTimeouts;

        public void ResetCounters()
        {
            Interlocked.Exchange(ref DoorbellWrites, 0);
            Interlocked.Exchange(ref InterruptsSeen, 0);
            Interlocked.Exchange(ref WaitTimeouts, 0);
        }

        public int MsixVectorCount => inner.MsixVectorCount;

        public void ReadConfig(int offset, Span<byte> data) => inner.ReadConfig(offset, data);

        public void WriteConfig(int offset, ReadOnlySpan<byte> data) => inner.WriteConfig(offset, data);

        public void MmioRead(int bar, ulong offset, Span<byte> data) => inner.MmioRead(bar, offset, data);

        public void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data)
        {
            if (offset >= 0x1000 && offset < 0x2000)
            {
                Interlocked.Increment(ref DoorbellWrites);
            }
            inner.MmioWrite(bar, offset, data);
        }

        public bool WaitInterrupt(int vector, int timeoutMs)
        {
            bool got = inner.WaitInterrupt(vector, timeoutMs);
            Interlocked.Increment(ref got ? ref InterruptsSeen : ref WaitTimeouts);
            return got;
        }
    }

    private static double Median(List<double> xs)
    {
        xs.Sort();
        return xs[xs.Count / 2];
    }

    /// <summary>
    /// Guest memory as the in-process controller sees it, timestamping the device's fetch of an SQE of one I/O queue and
    /// its store of a CQE's last dword (the phase tag) on that queue's CQ. At QD1 one command is in flight, so the last
    /// stamps belong to it. Stopwatch timestamps, comparable with the caller's.
    /// </summary>
    private sealed class StageClock(IDmaSpace inner) : IDmaSpace
    {
        private ulong _sq, _sqEnd, _cq, _cqEnd;
        private long _fetched, _posted;

        public void Watch(ulong sq, ulong cq, int entries)
        {
            (_sq, _sqEnd) = (sq, sq + (ulong)entries * SubmissionQueueEntry.Size);
            (_cq, _cqEnd) = (cq, cq + (ulong)entries * CompletionQueueEntry.Size);
        }

        /// <summary>The stamps of the last command, once (cleared after reading).</summary>
        public bool Take(out long fetched, out long posted)
        {
            fetched = Interlocked.Exchange(ref _fetched, 0);
            posted = Interlocked.Exchange(ref _posted, 0);
            return fetched != 0 && posted != 0;
        }

        public bool TryRead(ulong iova, Span<byte> destination)
        {
            if (iova >= _sq && iova < _sqEnd && destination.Length == SubmissionQueueEntry.Size)
            {
                Volatile.Write(ref _fetched, Stopwatch.GetTimestamp());
            }
            return inner.TryRead(iova, destination);
        }

        public bool TryWrite(ulong iova, ReadOnlySpan<byte> source) => inner.TryWrite(iova, source);

        public bool TryReadUInt32(ulong iova, out uint value) => inner.TryReadUInt32(iova, out value);

        public bool TryLendWritable<TState>(ulong iova, int length, TState state, System.Buffers.SpanAction<byte, TState> action) =>
            inner.TryLendWritable(iova, length, state, action);

        public bool TryLendReadable<TState>(ulong iova, int length, TState state, System.Buffers.ReadOnlySpanAction<byte, TState> action) =>
            inner.TryLendReadable(iova, length, state, action);

        public bool TryWriteUInt32(ulong iova, uint value)
        {
            if (iova >= _cq && iova < _cqEnd)
            {
                // Stamped just before the store, so the stamp is never later than the guest's sight of the entry.
                Volatile.Write(ref _posted, Stopwatch.GetTimestamp());
            }
            return inner.TryWriteUInt32(iova, value);
        }
    }
}
