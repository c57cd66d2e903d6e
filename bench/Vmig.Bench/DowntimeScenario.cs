using System.Diagnostics;
using System.Globalization;
using Vmig.Guest;
using Vmig.Guest.Workloads;
using Vmig.Vmm;
using Vmig.Vmm.Migration;

namespace Vmig.Bench;

/// <summary>
/// Scenario "downtime" (issue 10's two downtime goals), each a VM migrated back and forth between two device hosts
/// (one peer process per host) while its guest job runs:
/// <list type="bullet">
/// <item>NVMe-only VM, 256 MiB RAM, guest fio job rw=randwrite bs=4k iodepth=32 verify=crc32c on a namespace both hosts
/// serve from one file (shared storage); goal downtime ≤ 10 ms. After the last hop the verifier reads every
/// acknowledged block back: lost or corrupt blocks fail the scenario.</item>
/// <item>Accelerator VF with 1 GiB of device memory, dirtied at 100 MiB/s by a guest job (1 MiB Fill jobs sweeping
/// device memory); goal downtime ≤ 50 ms. A failed job fails the scenario.</item>
/// </list>
/// Downtime is the source's measure: vCPUs paused → the target's "running" result received. Each figure also reports
/// total time against bytes sent ÷ raw TCP loopback throughput measured right before each migration.
/// </summary>
internal static class DowntimeScenario
{
    private const long MiB = 1 << 20;

    public static void Run(BenchContext ctx)
    {
        Nvme(ctx);
        Accelerator(ctx);
    }

    private static void Nvme(BenchContext ctx)
    {
        bool quick = ctx.Options.Quick;
        long ram = 256 * MiB;
        long nsBytes = quick ? 64 * MiB : 256 * MiB;
        string name = $"NVMe-only VM, {ram / MiB} MiB RAM, fio 4k randwrite QD32 over a {nsBytes / MiB} MiB namespace";
        ctx.Progress("downtime: " + name);
        string img = Path.Combine(ctx.Directory, NvmeSharedImage);
        using (var f = new FileStream(img, FileMode.Create, FileAccess.Write))
        {
            f.SetLength(nsBytes);
        }
        using var a = PeerProcess.Start(ctx.Options, "nvme-shared", Path.Combine(ctx.Directory, "dt-nvme-a.sock"), nsBytes);
        using var b = PeerProcess.Start(ctx.Options, "nvme-shared", Path.Combine(ctx.Directory, "dt-nvme-b.sock"), nsBytes);
        const string profile = "q=2";
        string job = string.Create(CultureInfo.InvariantCulture,
            $"device=nvme0-q1,gpa=0x800000\n[w]\nrw=randwrite\nbs=4k\niodepth=32\nsize={nsBytes / MiB}M\nruntime=3600s\ntime_based\nverify=crc32c");
        VmConfig Config(bool boot) => new()
        {
            Name = "dt-nvme",
            MemorySize = (ulong)ram,
            Vcpus = boot ? [new VcpuConfig("fio", job)] : [],
            Programs = new GuestProgramRegistry().Add(FioWorkload.Factory),
            SetupGuest = GuestSetup.Nvme("nvme0", "nvme0", 0x200000, 0x400000, 1, ioQueues: 2),
        };
        var vm = Vm.Create(Config(true), [VfioUserVmDevice.Connect(a.SocketPath, "nvme0", "nvme", profile)]);
        try
        {
            vm.Start();
            WaitFor(() => FioWorkload.Counters(vm.Memory, FioWorkload.StateGpa(vm.Vcpus[0].Registers)).Writes > 1000, "fio did not get going");
            var result = PingPong(ctx, ref vm, [a.SocketPath, b.SocketPath], Config(false),
                d => VfioUserVmDevice.Connect(d, "nvme0", "nvme", profile), new MigrationOptions { DowntimeLimit = TimeSpan.FromMilliseconds(5) },
                v => FioWorkload.Counters(v.Memory, FioWorkload.StateGpa(v.Vcpus[0].Registers)).Writes);
            vm.Pause();
            if (vm.Vcpus[0].Fault is { } fault)
            {
                throw new InvalidOperationException($"fio faulted after migration: {fault.Message}");
            }
            ulong state = FioWorkload.StateGpa(vm.Vcpus[0].Registers);
            var counts = FioWorkload.Verify(vm.Memory, state, vm.Guest.GetService<IGuestBlockDevice>("nvme0-q1"));
            if (!counts.Clean)
            {
                throw new InvalidOperationException($"verifier after {result.Hops} migrations: {counts}");
            }
            AddFigures(ctx, name, 10, result, $"verifier: {counts.Writes} writes, {counts.Verified} blocks verified, {counts.Lost} lost, {counts.Corrupt} corrupt");
        }
        finally
        {
            vm.Dispose();
        }
    }

    private static void Accelerator(BenchContext ctx)
    {
        bool quick = ctx.Options.Quick;
        long ram = 256 * MiB;
        long devMem = quick ? 256 * MiB : 1024 * MiB;
        string name = $"accelerator VF, {devMem / MiB} MiB device memory dirtied at 100 MiB/s, {ram / MiB} MiB RAM";
        ctx.Progress("downtime: " + name);
        using var a = PeerProcess.Start(ctx.Options, "accel", Path.Combine(ctx.Directory, "dt-accel-a.sock"), devMem);
        using var b = PeerProcess.Start(ctx.Options, "accel", Path.Combine(ctx.Directory, "dt-accel-b.sock"), devMem);
        string profile = $"mem={devMem}";
        VmConfig Config(bool boot) => new()
        {
            Name = "dt-accel",
            MemorySize = (ulong)ram,
            Vcpus = boot ? [new VcpuConfig(AcceleratorDirtier.Kind, $"device=accel0,size={devMem},rate=100,chunk=1M")] : [],
            Programs = new GuestProgramRegistry().Add(AcceleratorDirtier.Factory),
            SetupGuest = GuestSetup.Accelerator("accel0", "accel0", 0x100000),
        };
        var vm = Vm.Create(Config(true), [VfioUserVmDevice.Connect(a.SocketPath, "accel0", "accel", profile)]);
        try
        {
            vm.Start();
            // One full sweep first, so every device page has been written (device pre-copy carries all of it).
            var (sweep, _, _) = AcceleratorDirtier.Counters(vm.Vcpus[0].Registers);
            WaitFor(() => AcceleratorDirtier.Counters(vm.Vcpus[0].Registers).Bytes >= (ulong)Math.Min(devMem, 64 * MiB) + sweep, "the device dirtier did not get going", 60_000);
            var result = PingPong(ctx, ref vm, [a.SocketPath, b.SocketPath], Config(false),
                d => VfioUserVmDevice.Connect(d, "accel0", "accel", profile), new MigrationOptions { DowntimeLimit = TimeSpan.FromMilliseconds(25) },
                v => (long)AcceleratorDirtier.Counters(v.Vcpus[0].Registers).Bytes);
            vm.Pause();
            var (bytes, ok, bad) = AcceleratorDirtier.Counters(vm.Vcpus[0].Registers);
            if (vm.Vcpus[0].Fault is { } fault || bad != 0)
            {
                throw new InvalidOperationException($"device dirtier after migration: {bad} failed jobs, fault {vm.Vcpus[0].Fault?.Message}");
            }
            AddFigures(ctx, name, 50, result, $"device dirtier: {bytes / (double)MiB:F0} MiB written by {ok} jobs, 0 failed");
        }
        finally
        {
            vm.Dispose();
        }
    }

    private sealed record HopResults(List<double> Totals, List<double> Ideals, List<double> Downtimes, List<double> TargetDowntimes, List<double> Rates, MigrationReport Last, int Hops,
        Dictionary<string, List<double>> Steps);

    /// <summary>
    /// Migrates <paramref name="vm"/> back and forth between the hosts (warm-up hop, then RunCount measured hops), each
    /// hop after a raw TCP throughput measurement. After each hop the job must make progress on the new host.
    /// </summary>
    private static HopResults PingPong(BenchContext ctx, ref Vm vm, string[] sockets, VmConfig incoming, Func<string, IVmDevice> open,
        MigrationOptions options, Func<Vm, long> progress)
    {
        var totals = new List<double>();
        var ideals = new List<double>();
        var downs = new List<double>();
        var targetDowns = new List<double>();
        var rates = new List<double>();
        // Every measured hop's downtime phases (source steps, and the target's as "target <step>"): one hop's
        // breakdown says little when the downtime spreads 0.2–2.5× within a run.
        var steps = new Dictionary<string, List<double>>();
        MigrationReport? last = null;
        int hops = ctx.Options.RunCount + 1;
        for (int hop = 0; hop < hops; hop++)
        {
            string dst = sockets[(hop + 1) % 2];
            double rate = VmScenario.RawTcpMiBps(256 * MiB);
            var (report, next) = VmScenario.MigrateOverLoopback(vm, incoming, _ => open(dst), options);
            long before = progress(vm);
            vm.Dispose(); // the source host's server takes the next client (the hop back)
            vm = next;
            WaitFor(() => progress(next) > before, $"hop {hop}: the guest job made no progress on the target");
            if (hop > 0)
            {
                totals.Add(report.TotalMilliseconds);
                ideals.Add(report.TotalBytes / (double)MiB / rate * 1e3);
                downs.Add(report.DowntimeMilliseconds);
                targetDowns.Add(report.TargetDowntimeMilliseconds);
                rates.Add(rate);
                foreach (var (step, ms) in report.StepMilliseconds.Where(kv => IsDowntimeStep(kv.Key))
                    .Concat(report.TargetStepMilliseconds.Select(kv => KeyValuePair.Create("target " + kv.Key, kv.Value))))
                {
                    if (!steps.TryGetValue(step, out var list))
                    {
                        steps[step] = list = [];
                    }
                    list.Add(ms);
                }
            }
            last = report;
        }
        return new HopResults(totals, ideals, downs, targetDowns, rates, last!, hops, steps);
    }

    private static bool IsDowntimeStep(string step) =>
        step.StartsWith("downtime.", StringComparison.Ordinal) || step.StartsWith("switchover.", StringComparison.Ordinal);

    private static void AddFigures(BenchContext ctx, string name, double goalMs, HopResults r, string check)
    {
        var d = Summary.Of(r.Downtimes);
        var down = new BenchFigure
        {
            Scenario = "downtime",
            Name = $"{name}: downtime",
            Unit = "ms",
            Value = d,
            BaselineName = $"the goal, {goalMs} ms (ratio = downtime ÷ goal)",
            Ratio = Summary.Of(r.Downtimes.Select(x => x / goalMs).ToList()),
            Goal = 1,
            Direction = GoalDirection.AtMost,
            Note = "source vCPUs paused → target's 'running' result received by the source; " + check,
        };
        down.Extra["target-measured downtime ms (median)"] = Summary.Of(r.TargetDowntimes).Median;
        foreach (var (step, ms) in r.Steps)
        {
            var m = Summary.Of(ms);
            down.Extra[$"step {step} ms (median of {m.Runs} hops)"] = m.Median;
            down.Extra[$"step {step} ms (max)"] = m.Max;
        }
        ctx.Report.Figures.Add(down);
        var total = Measure.Figure("downtime", $"{name}: total time", "ms", r.Ideals, r.Totals,
            "bytes sent ÷ raw TCP loopback throughput (one stream, 1 MiB writes) measured before each migration", 1.3, GoalDirection.AtMost, check);
        total.Extra["raw TCP loopback MiB/s (median)"] = Summary.Of(r.Rates).Median;
        total.Extra["bytes sent (last run), MiB"] = r.Last.TotalBytes / (double)MiB;
        total.Extra["last run: pre-copy rounds"] = r.Last.Rounds.Count;
        foreach (var (step, ms) in r.Last.StepMilliseconds.Where(kv => !IsDowntimeStep(kv.Key)))
        {
            total.Extra[$"last run: step {step} ms"] = ms;
        }
        foreach (var (section, bytes) in r.Last.BytesBySection)
        {
            total.Extra[$"last run: section {section} MiB"] = bytes / (double)MiB;
        }
        ctx.Report.Figures.Add(total);
    }

    private static void WaitFor(Func<bool> condition, string what, int timeoutMs = 30_000)
    {
        var sw = Stopwatch.StartNew();
        while (!condition())
        {
            if (sw.ElapsedMilliseconds > timeoutMs)
            {
                throw new TimeoutException(what);
            }
            Thread.Sleep(5);
        }
    }

    /// <summary>The namespace file both "nvme-shared" peers serve (created by the scenario next to their sockets).</summary>
    public const string NvmeSharedImage = "dt-shared-ns.img";
}
