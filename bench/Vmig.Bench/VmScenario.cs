using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Vmig.Guest;
using Vmig.Guest.Workloads;
using Vmig.Vmm;
using Vmig.Vmm.Migration;

namespace Vmig.Bench;

/// <summary>
/// Scenario "vm": whole-VM live migration with Vmig.Vmm's MigrationSource/MigrationTarget over TCP loopback, idle (no
/// vCPU work) and busy (a memory-dirtier vCPU writing 100 MiB/s over half of RAM), with one device (a
/// <see cref="BenchStateDevice"/> served in its own process on each side, driven through vfio-user). Total time is
/// compared with bytes sent ÷ raw TCP loopback throughput measured right before each migration (goal ≤ 1.3×);
/// downtime is reported. Each run also migrates, interleaved, with device data after RAM on one connection and with the
/// target's guest RAM preallocated before the migration (QEMU -mem-prealloc -incoming: its own figure row, the allocation
/// reported separately and NOT inside the measured time), and prints this process's CPU by thread (the busy VM's vCPU is
/// guest work, also shown subtracted). Then growth: RAM, device state size and device count, each a table and an SVG plot.
/// The NVMe-only downtime goal needs the NVMe VF served over vfio-user, which main does not do yet.
/// </summary>
internal static class VmScenario
{
    private const long MiB = 1 << 20;

    public static void Run(BenchContext ctx)
    {
        bool quick = ctx.Options.Quick;
        long ram = quick ? 256 * MiB : 1024 * MiB;
        long dev = quick ? 64 * MiB : 256 * MiB;
        foreach (bool busy in new[] { false, true })
        {
            string name = $"{(busy ? "busy" : "idle")} VM, {ram / MiB} MiB RAM + 1 device with {dev / MiB} MiB state";
            ctx.Progress("vm: " + name);
            var times = new List<double>();
            var ideal = new List<double>();
            var downtimes = new List<double>();
            var rates = new List<double>();
            long bytes = 0;
            MigrationReport? last = null;
            var targetDown = new List<double>();
            var cpu = new List<double>();
            var cpuNoGuest = new List<double>();
            var serialCpuNoGuest = new List<double>();
            var preCpuNoGuest = new List<double>();
            var rawCpuPerMiB = new List<double>();
            var serialTimes = new List<double>();
            var serialCpu = new List<double>();
            var preTimes = new List<double>();
            var preIdeal = new List<double>();
            var preCpu = new List<double>();
            var preAllocMs = new List<double>();
            var preAllocCpu = new List<double>();
            MigrationRun? lastRun = null, lastPre = null;
            (double Src, double Dst) lastHosts = default;
            Migrate(ctx, ram, 1, dev, busy); // warm-up
            for (int i = 0; i < ctx.Options.RunCount; i++)
            {
                long rawBytes = quick ? 256 * MiB : 512 * MiB;
                double rawCpu0 = ThreadCpu.OfProcess(Environment.ProcessId);
                double rate = RawTcpMiBps(rawBytes);
                rawCpuPerMiB.Add((ThreadCpu.OfProcess(Environment.ProcessId) - rawCpu0) / (rawBytes / (double)MiB));
                // Interleaved A/B in the same run: device data after RAM on the main connection (the 2.1 way).
                var serial = Migrate(ctx, ram, 1, dev, busy, new MigrationOptions { DowntimeLimit = TimeSpan.FromMilliseconds(50), DeviceDataConnection = false });
                serialTimes.Add(serial.Report.TotalMilliseconds);
                serialCpu.Add(serial.CpuMs);
                serialCpuNoGuest.Add(serial.CpuMs - serial.GuestVcpuMs);
                // Interleaved A/B: the target's guest RAM preallocated before the migration (QEMU -mem-prealloc -incoming);
                // the allocation is outside the measured window and reported on its own rows.
                var pre = Migrate(ctx, ram, 1, dev, busy, preallocateTarget: true);
                preTimes.Add(pre.Report.TotalMilliseconds);
                preIdeal.Add(pre.Report.TotalBytes / MiB / rate * 1e3);
                preCpu.Add(pre.CpuMs);
                preCpuNoGuest.Add(pre.CpuMs - pre.GuestVcpuMs);
                preAllocMs.Add(pre.PreallocMs);
                preAllocCpu.Add(pre.PreallocCpuMs);
                lastPre = pre;
                var run = Migrate(ctx, ram, 1, dev, busy);
                lastRun = run;
                var r = run.Report;
                cpu.Add(run.CpuMs);
                cpuNoGuest.Add(run.CpuMs - run.GuestVcpuMs);
                lastHosts = (run.SrcHostCpuMs, run.DstHostCpuMs);
                times.Add(r.TotalMilliseconds);
                ideal.Add(r.TotalBytes / MiB / rate * 1e3);
                downtimes.Add(r.DowntimeMilliseconds);
                rates.Add(rate);
                bytes = r.TotalBytes;
                last = r;
                targetDown.Add(r.TargetDowntimeMilliseconds);
            }
            var f = Measure.Figure("vm", $"{name}: total time", "ms", ideal, times,
                "bytes sent ÷ raw TCP loopback throughput (one stream, 1 MiB writes) measured before each migration", 1.3, GoalDirection.AtMost);
            var d = Summary.Of(downtimes);
            f.Extra["downtime ms (median)"] = d.Median;
            f.Extra["downtime ms (min)"] = d.Min;
            f.Extra["downtime ms (max)"] = d.Max;
            f.Extra["bytes sent (last run), MiB"] = bytes / (double)MiB;
            f.Extra["raw TCP loopback MiB/s (median)"] = Summary.Of(rates).Median;
            f.Extra["target-measured downtime ms (median)"] = Summary.Of(targetDown).Median;
            // CPU budget (docs: bench figure notes): CPU time is what two cores can overlap at best, so total ≥ CPU ÷ 2.
            double cpuMed = Summary.Of(cpu).Median, rawPerMiB = Summary.Of(rawCpuPerMiB).Median;
            f.Extra["CPU ms per migration, VMMs + device hosts (median)"] = cpuMed;
            f.Extra["CPU ms per migration without the guest's own vCPU threads (median)"] = Summary.Of(cpuNoGuest).Median;
            f.Extra["CPU-bound floor on 2 cores: CPU ÷ 2, ms"] = cpuMed / 2;
            f.Extra["raw TCP CPU ms per MiB (send + receive, median)"] = rawPerMiB;
            f.Extra["raw TCP CPU ms for the bytes sent"] = rawPerMiB * bytes / MiB;
            f.Extra["A/B same run: device data after RAM on one connection, total ms (median)"] = Summary.Of(serialTimes).Median;
            f.Extra["A/B same run: device data after RAM on one connection, CPU ms (median)"] = Summary.Of(serialCpu).Median;
            f.Extra["A/B same run: device data after RAM on one connection, CPU ms without guest vCPUs (median)"] = Summary.Of(serialCpuNoGuest).Median;
            f.Extra["A/B same run: target RAM preallocated, total ms (median)"] = Summary.Of(preTimes).Median;
            f.Extra["A/B same run: target RAM preallocated, CPU ms inside the window (median)"] = Summary.Of(preCpu).Median;
            f.Extra["A/B same run: target RAM preallocated, CPU ms inside the window without guest vCPUs (median)"] = Summary.Of(preCpuNoGuest).Median;
            f.Extra["A/B same run: target RAM preallocation, OUTSIDE the measured window, ms (median)"] = Summary.Of(preAllocMs).Median;
            f.Extra["A/B same run: target RAM preallocation, OUTSIDE the measured window, CPU ms (median)"] = Summary.Of(preAllocCpu).Median;
            foreach (var (thread, ms) in lastRun!.Threads.OrderByDescending(kv => kv.Value))
            {
                f.Extra[$"last run: bench process thread '{thread}' CPU ms"] = ms;
            }
            foreach (var (thread, ms) in lastPre!.Threads.OrderByDescending(kv => kv.Value))
            {
                f.Extra[$"last run, target RAM preallocated: bench process thread '{thread}' CPU ms"] = ms;
            }
            foreach (var (phase, ms) in last!.PhaseMilliseconds)
            {
                f.Extra[$"last run: phase {phase} ms"] = ms;
            }
            foreach (var (step, ms) in last.StepMilliseconds)
            {
                f.Extra[$"last run: step {step} ms"] = ms;
            }
            foreach (var (step, ms) in last.TargetStepMilliseconds)
            {
                f.Extra[$"last run: target step {step} ms"] = ms;
            }
            f.Extra["last run: source device host process CPU ms"] = lastHosts.Src;
            f.Extra["last run: target device host process CPU ms"] = lastHosts.Dst;
            foreach (var (role, ms) in last.CpuMilliseconds)
            {
                f.Extra[$"last run: source CPU {role} ms"] = ms;
            }
            foreach (var (section, b) in last.BytesBySection)
            {
                f.Extra[$"last run: section {section} MiB"] = b / (double)MiB;
            }
            f.Extra["last run: pre-copy rounds"] = last.Rounds.Count;
            if (last.Rounds.Count > 0)
            {
                var fin = last.Rounds[^1];
                f.Extra["last run: final round pages"] = fin.Pages;
                f.Extra["last run: final round zero pages"] = fin.ZeroPages;
                f.Extra["last run: final round ms"] = fin.Milliseconds;
            }
            ctx.Report.Figures.Add(f);
            var fp = Measure.Figure("vm", $"{name}, target RAM preallocated (not in the window): total time", "ms", preIdeal, preTimes,
                "bytes sent ÷ raw TCP loopback throughput measured before each migration; the target's guest RAM was allocated before the migration began (MigrationTargetOptions.PreallocatedMemory, as QEMU -mem-prealloc -incoming) and that allocation is NOT in the measured time (its own rows follow)", 1.3, GoalDirection.AtMost);
            fp.Extra["RAM preallocation before the migration (outside the window), ms (median)"] = Summary.Of(preAllocMs).Median;
            fp.Extra["RAM preallocation before the migration (outside the window), CPU ms (median)"] = Summary.Of(preAllocCpu).Median;
            fp.Extra["CPU ms per migration inside the window, VMMs + device hosts (median)"] = Summary.Of(preCpu).Median;
            fp.Extra["total ms + preallocation ms (median of sums)"] = Summary.Of(preTimes.Zip(preAllocMs, (a, b) => a + b).ToList()).Median;
            ctx.Report.Figures.Add(fp);
            double idealMed = Summary.Of(ideal).Median;
            double tgt = last.TargetStepMilliseconds.GetValueOrDefault("cpu.main");
            double devPath = last.CpuMilliseconds.GetValueOrDefault("device-read") + last.CpuMilliseconds.GetValueOrDefault("device-send")
                + last.TargetStepMilliseconds.GetValueOrDefault("cpu.device-receive") + last.TargetStepMilliseconds.GetValueOrDefault("cpu.device-write");
            ctx.Report.Notes.Add(string.Create(System.Globalization.CultureInfo.InvariantCulture,
                $"vm CPU budget ({name}): a migration costs {cpuMed:F0} ms of CPU (median; last run: source main thread {last.CpuMilliseconds.GetValueOrDefault("main"):F0}, target main thread {tgt:F0}, VMM device-data threads {devPath:F0}, device hosts {lastHosts.Src + lastHosts.Dst:F0}), so on 2 cores it cannot take less than {cpuMed / 2:F0} ms = {cpuMed / 2 / idealMed:F2}× the raw baseline ({idealMed:F0} ms). Raw TCP spends {rawPerMiB:F2} ms CPU per MiB ({rawPerMiB * bytes / MiB:F0} ms for these bytes: about one core busy), so ≤ 1.3× ({1.3 * idealMed:F0} ms) would need ≤ {2.6 * idealMed:F0} ms of CPU in all."));
        }
        // VMIG_BENCH_VM_GROWTH=0 skips the growth tables (a quicker run while iterating on the two goal rows).
        if (Environment.GetEnvironmentVariable("VMIG_BENCH_VM_GROWTH") == "0")
        {
            ctx.Report.Notes.Add("vm: growth tables skipped (VMIG_BENCH_VM_GROWTH=0)");
            return;
        }
        Growth(ctx);
    }

    private static void Growth(BenchContext ctx)
    {
        bool quick = ctx.Options.Quick;
        int reps = quick ? 1 : 2;
        long[] rams = quick ? [256 * MiB, 512 * MiB, 1024 * MiB] : [256 * MiB, 512 * MiB, 1024 * MiB, 2048 * MiB, 4096 * MiB];
        long[] devs = quick ? [0, 64 * MiB, 256 * MiB] : [0, 256 * MiB, 1024 * MiB, 4096 * MiB];
        int[] counts = [1, 2, 4, 8];
        long perDevice = quick ? 16 * MiB : 64 * MiB;

        (double Total, double Down) Point(long ramBytes, int n, long devBytes)
        {
            var t = new List<double>();
            var dn = new List<double>();
            for (int i = 0; i < reps; i++)
            {
                var r = Migrate(ctx, ramBytes, n, devBytes, busy: false).Report;
                t.Add(r.TotalMilliseconds);
                dn.Add(r.DowntimeMilliseconds);
                ctx.Report.Notes.Add(string.Create(System.Globalization.CultureInfo.InvariantCulture,
                    $"vm growth point RAM {ramBytes / MiB} MiB, {n} device(s) × {devBytes / MiB} MiB: total {r.TotalMilliseconds:F0} ms, downtime {r.DowntimeMilliseconds:F1} ms (target {r.TargetDowntimeMilliseconds:F1}), {r.TotalBytes / (double)MiB:F1} MiB sent, phases ms: {string.Join(", ", r.PhaseMilliseconds.Select(kv => $"{kv.Key} {kv.Value:F1}"))}; rounds: {string.Join(" | ", r.Rounds.Select(x => $"{x.Pages}p {x.DeviceBytes / (double)MiB:F1}MiB-dev {x.Milliseconds:F0}ms"))}"));
            }
            return (Summary.Of(t).Median, Summary.Of(dn).Median);
        }

        void Series(string what, string xUnit, IEnumerable<(double X, (double Total, double Down) P)> pts)
        {
            var list = pts.ToList();
            ctx.Report.Growth.Add(new GrowthSeries($"migration time vs {what}", xUnit, "total ms", list.Select(p => (p.X, p.P.Total)).ToList()));
            ctx.Report.Growth.Add(new GrowthSeries($"downtime vs {what}", xUnit, "downtime ms", list.Select(p => (p.X, p.P.Down)).ToList()));
        }

        ctx.Progress($"vm: growth with RAM ({reps} run(s) per point, idle, no device)");
        Series("RAM", "RAM MiB", rams.Select(r => ((double)(r / MiB), Point(r, 0, 0))));
        ctx.Progress("vm: growth with device state (256 MiB RAM, one device)");
        Series("device state", "device state MiB", devs.Select(d => ((double)(d / MiB), d == 0 ? Point(256 * MiB, 0, 0) : Point(256 * MiB, 1, d))));
        ctx.Progress($"vm: growth with device count (256 MiB RAM, {perDevice / MiB} MiB state each)");
        Series("device count", "devices", counts.Select(n => ((double)n, Point(256 * MiB, n, perDevice))));
        ctx.Report.Notes.Add($"vm growth: {reps} migration(s) per point (median), idle guest with all RAM populated (non-zero); device-count points use {perDevice / MiB} MiB of state per device.");
    }

    /// <summary>
    /// Fills guest RAM [from, to) (bytes) with non-zero bytes before the VM starts. A guest that has run has touched its memory; an
    /// untouched memfd is all holes, which round 1 skips (SEEK_DATA) and would make RAM look free to migrate.
    /// </summary>
    private static void Populate(GuestRam ram, long from, long to)
    {
        for (long off = from; off < to; off += MiB)
        {
            ram.GetHostSpan((ulong)off, (int)Math.Min(MiB, to - off)).Fill((byte)(1 + (off / MiB) % 255));
        }
    }

    /// <summary>
    /// One live migration of a fresh VM; device peers (one process per side) live for this migration only. Returns the
    /// report and the CPU time (user + system, ms) this process and both device hosts spent during the migration.
    /// </summary>
    /// <summary>
    /// One migration's figures: the report; CPU ms (user + system) of this process and both device hosts during it; the
    /// device hosts' share; this process's CPU by thread name (threads that ended during the migration, e.g. the device
    /// data helpers, under "(exited threads)"); and, with a preallocated target, the allocation's wall and CPU ms (before
    /// the migration, not in its figures).
    /// </summary>
    internal sealed record MigrationRun(MigrationReport Report, double CpuMs, double SrcHostCpuMs, double DstHostCpuMs,
        Dictionary<string, double> Threads, double PreallocMs, double PreallocCpuMs)
    {
        /// <summary>CPU ms of the guest's vCPU threads (named vcpuN: the busy VM's dirtier is guest work, not migration cost).</summary>
        public double GuestVcpuMs => Threads.Where(kv => kv.Key.StartsWith("vcpu", StringComparison.Ordinal)).Sum(kv => kv.Value);
    }

    private static MigrationRun Migrate(BenchContext ctx, long ramBytes, int devices, long deviceBytes, bool busy,
        MigrationOptions? options = null, bool preallocateTarget = false)
    {
        PeerProcess? srcPeer = null, dstPeer = null;
        string[] srcSocks = [], dstSocks = [];
        var srcDevices = new List<IVmDevice>();
        Vm? vm = null;
        Vm? target = null;
        try
        {
            if (devices > 0)
            {
                (srcPeer, srcSocks) = ctx.StartStatePeers("vm-src", devices, deviceBytes);
                (dstPeer, dstSocks) = ctx.StartStatePeers("vm-dst", devices, deviceBytes);
                for (int i = 0; i < devices; i++)
                {
                    srcDevices.Add(VfioUserVmDevice.Connect(srcSocks[i], $"state{i}", "bench-state", $"bytes={deviceBytes}"));
                    // A device host is a long-running service: open and release the target's VF once so the handshake
                    // measures the VMM, not the JIT warm-up of a peer process started a moment ago.
                    VfioUserVmDevice.Connect(dstSocks[i], $"state{i}", "bench-state", $"bytes={deviceBytes}").Dispose();
                }
            }
            var programs = new GuestProgramRegistry().Add(MemoryDirtier.Factory);
            var vcpus = busy ? new[] { new VcpuConfig("memory-dirtier", $"gpa=0,size={ramBytes / 2},rate=100") } : [];
            vm = Vm.Create(new VmConfig { Name = "bench", MemorySize = (ulong)ramBytes, Vcpus = vcpus, Programs = programs }, srcDevices.ToArray());
            srcDevices.Clear();
            // The busy VM's dirtier owns the lower half and its verify pass expects pages it has not reached to read 0.
            Populate(vm.Memory, busy ? ramBytes / 2 : 0, ramBytes);
            vm.Start();
            var dst = dstSocks;
            double SrcHost() => srcPeer is null ? 0 : ThreadCpu.OfProcess(srcPeer.Pid);
            double DstHost() => dstPeer is null ? 0 : ThreadCpu.OfProcess(dstPeer.Pid);
            double Cpu() => ThreadCpu.OfProcess(Environment.ProcessId) + SrcHost() + DstHost();
            double preMs = 0, preCpu = 0;
            GuestRam? preallocated = null;
            if (preallocateTarget)
            {
                double c0 = ThreadCpu.OfProcess(Environment.ProcessId);
                var sw = Stopwatch.StartNew();
                preallocated = GuestRam.Create((ulong)ramBytes, "bench-target-prealloc", prefault: true);
                preMs = sw.Elapsed.TotalMilliseconds;
                preCpu = ThreadCpu.OfProcess(Environment.ProcessId) - c0;
            }
            var threads0 = ThreadCpu.ByThreadName(Environment.ProcessId);
            double self0 = ThreadCpu.OfProcess(Environment.ProcessId);
            double cpu0 = Cpu(), src0 = SrcHost(), dst0 = DstHost();
            (var report, target) = MigrateOverLoopback(vm, new VmConfig { Name = "bench", Programs = programs },
                d => ConnectRetrying(dst[int.Parse(d.Name.AsSpan(5), System.Globalization.CultureInfo.InvariantCulture)], d.Name, d.Kind, d.Profile),
                options ?? new MigrationOptions { DowntimeLimit = TimeSpan.FromMilliseconds(50) },
                new MigrationTargetOptions { PreallocatedMemory = preallocated });
            double cpuMs = Cpu() - cpu0, srcHostMs = SrcHost() - src0, dstHostMs = DstHost() - dst0;
            double selfMs = ThreadCpu.OfProcess(Environment.ProcessId) - self0;
            var threads = new Dictionary<string, double>();
            foreach (var (n, ms) in ThreadCpu.ByThreadName(Environment.ProcessId))
            {
                double d = ms - threads0.GetValueOrDefault(n);
                if (d > 0)
                {
                    threads[n] = d;
                }
            }
            threads["(exited threads)"] = Math.Max(0, selfMs - threads.Values.Sum());
            if (busy)
            {
                target.Pause();
                if (MemoryDirtier.Verify(target.Memory, target.Vcpus[0].Registers) != 0)
                {
                    throw new InvalidOperationException("busy VM: target RAM disagrees with the dirtier's registers after migration");
                }
            }
            if (srcPeer is not null && srcPeer.Ask("crc") != dstPeer!.Ask("crc"))
            {
                throw new InvalidOperationException("device state differs after migration");
            }
            return new MigrationRun(report, cpuMs, srcHostMs, dstHostMs, threads, preMs, preCpu);
        }
        finally
        {
            target?.Dispose();
            vm?.Dispose();
            foreach (var d in srcDevices)
            {
                d.Dispose();
            }
            srcPeer?.Dispose();
            dstPeer?.Dispose();
        }
    }

    /// <summary>
    /// One live migration of <paramref name="vm"/> over TCP loopback into a new VM built from <paramref name="incoming"/>
    /// (its devices opened by <paramref name="open"/>). Throws unless the outcome is "completed" (the target, if one was
    /// built, is disposed); otherwise the caller owns both VMs.
    /// </summary>
    internal static (MigrationReport Report, Vm Target) MigrateOverLoopback(Vm vm, VmConfig incoming, Func<DeviceDescription, IVmDevice> open,
        MigrationOptions options, MigrationTargetOptions? targetOptions = null)
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        try
        {
            var accept = MigrationTarget.AcceptAsync(listener, incoming, open, targetOptions);
            var report = MigrationSource.RunAsync(vm, listener.LocalEndpoint, options).GetAwaiter().GetResult();
            var target = accept.GetAwaiter().GetResult();
            if (report.Outcome != "completed")
            {
                target.Dispose();
                throw new InvalidOperationException($"migration outcome {report.Outcome}: {report.Error}");
            }
            return (report, target);
        }
        finally
        {
            listener.Stop();
        }
    }

    /// <summary>
    /// Connects to a VF whose host may still be closing the warm-up session (it refuses a second client until it has
    /// seen the first one go): up to 20 tries, 10 ms apart.
    /// </summary>
    private static VfioUserVmDevice ConnectRetrying(string socket, string name, string kind, string profile)
    {
        for (int i = 0; ; i++)
        {
            try
            {
                return VfioUserVmDevice.Connect(socket, name, kind, profile);
            }
            catch (IOException) when (i < 20)
            {
                Thread.Sleep(10);
            }
        }
    }

    /// <summary>Raw TCP loopback throughput: one connection, blocking 1 MiB sends, a receiving thread; MiB/s.</summary>
    public static double RawTcpMiBps(long bytes)
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        try
        {
            using var c = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            c.Connect((IPEndPoint)l.LocalEndpoint);
            using var s = l.AcceptSocket();
            var rx = new Thread(() =>
            {
                byte[] b = new byte[1 << 20];
                long got = 0;
                while (got < bytes)
                {
                    int n = s.Receive(b);
                    if (n == 0)
                    {
                        return;
                    }
                    got += n;
                }
            });
            byte[] buf = new byte[1 << 20];
            new Random(4).NextBytes(buf);
            var sw = Stopwatch.StartNew();
            rx.Start();
            for (long sent = 0; sent < bytes; sent += buf.Length)
            {
                c.Send(buf);
            }
            rx.Join();
            return bytes / (double)MiB / sw.Elapsed.TotalSeconds;
        }
        finally
        {
            l.Stop();
        }
    }
}
