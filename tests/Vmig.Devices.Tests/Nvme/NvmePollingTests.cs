using System.Globalization;
using Vmig.Devices.Nvme;
using Vmig.Guest.Nvme;
using Vmig.Spec.Nvme;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Server;
using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>
/// Poll queues (I/O CQs created with IEN = 0, reaped by the phase tag) and the adaptive shadow-doorbell poller:
/// completions without interrupts, correct data at QD1 and QD32, the poller's back-off when idle, and the same over a
/// real vfio-user socket. No assertion here is about speed (that lives in the bench).
/// </summary>
public sealed class NvmePollingTests
{
    private const int Lba = 512;

    private static NvmeDriver PolledDriver(TestGuestRam ram, Guest.IGuestPciFunction fn, bool shadow, int ioQueues = 2) =>
        NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = ioQueues, PollQueues = 1, ShadowDoorbells = shadow });

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void An_io_cq_created_with_ien_0_gets_its_completions_and_never_an_msix_signal(bool shadow)
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var drv = PolledDriver(ram, fn, shadow);
        Assert.False(drv.IsPolled(1));
        Assert.True(drv.IsPolled(2));
        var cq2 = rig.Subsystem.Primary.WithLock(s => (s.Cqs[2]!.InterruptsEnabled, s.Cqs[1]!.InterruptsEnabled));
        Assert.Equal((false, true), cq2);
        // Coalescing off for the I/O vectors would not matter for an IEN = 0 CQ; make sure a threshold does not either.
        drv.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.SetFeatures, Cdw10 = (uint)FeatureId.InterruptCoalescing, Cdw11 = 0x0103 });

        fn.ResetCounters();
        for (int i = 0; i < 40; i++)
        {
            ram.Write(Buf, Pattern(4096, i));
            Assert.True(drv.Write(2, rig.Nsid, (ulong)(i * 8), 8, Lba, Buf).IsSuccess);
            Assert.True(drv.Read(2, rig.Nsid, (ulong)(i * 8), 8, Lba, Buf + 0x10000).IsSuccess);
        }
        Assert.Equal(0, fn.Interrupts);
        Assert.Equal(Pattern(4096, 39), rig.ReadFile(39 * 8 * Lba, 4096));

        // The counter does count: the same I/O on the IEN = 1 queue signals its vector (coalescing off again, so the
        // signal is not held back for the aggregation time).
        drv.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.SetFeatures, Cdw10 = (uint)FeatureId.InterruptCoalescing, Cdw11 = 0 });
        Assert.True(drv.Write(1, rig.Nsid, 1000, 8, Lba, Buf).IsSuccess);
        Assert.True(fn.Interrupts > 0);
    }

    [Fact]
    public void Create_io_cq_with_ien_0_is_accepted_whatever_the_interrupt_vector_field_holds()
    {
        // CDW11.IV only names a vector when IEN = 1 (NVMe Base 2.x, Create I/O Completion Queue): with IEN = 0 a value
        // past the controller's vectors is not an Invalid Interrupt Vector.
        using var rig = new NvmeRig();
        var (ram, fn) = rig.Connect(0);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 3 });
        // Free qids 2 and 3 (SQs before their CQs) to create them again by hand.
        foreach (var (op, qid) in new[] { (NvmeAdminOpcode.DeleteIoSubmissionQueue, 3u), (NvmeAdminOpcode.DeleteIoCompletionQueue, 3u),
            (NvmeAdminOpcode.DeleteIoSubmissionQueue, 2u), (NvmeAdminOpcode.DeleteIoCompletionQueue, 2u) })
        {
            drv.Execute(0, new SubmissionQueueEntry { Opcode = (byte)op, Cdw10 = qid });
        }
        ulong cq = drv.Allocate(4096);
        var ok = drv.ExecuteRaw(0, new SubmissionQueueEntry
        {
            Opcode = (byte)NvmeAdminOpcode.CreateIoCompletionQueue,
            Prp1 = cq,
            Cdw10 = 2u | (15u << 16),
            Cdw11 = 1u | (0x7FFu << 16),
        });
        Assert.Equal(NvmeStatus.Success, ok.Status);
        ulong cq3 = drv.Allocate(4096);
        var bad = drv.ExecuteRaw(0, new SubmissionQueueEntry
        {
            Opcode = (byte)NvmeAdminOpcode.CreateIoCompletionQueue,
            Prp1 = cq3,
            Cdw10 = 3u | (15u << 16),
            Cdw11 = 1u | 2u | (0x7FFu << 16),
        });
        Assert.Equal(NvmeStatus.InvalidInterruptVector, bad.Status);
    }

    [Theory]
    [InlineData(true, 1)]
    [InlineData(true, 32)]
    [InlineData(false, 1)]
    [InlineData(false, 32)]
    public void Polled_driver_mode_writes_and_reads_back_correct_data(bool shadow, int qd)
    {
        using var rig = new NvmeRig(lbaSize: 4096);
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0, ramBytes: 32 << 20);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, PollQueues = 1, ShadowDoorbells = shadow, IoQueueEntries = 64 });
        Assert.True(drv.IsPolled(1));
        Assert.Equal(shadow, drv.UsesShadowDoorbells);
        fn.ResetCounters();
        const int Ios = 96;
        RunAtDepth(drv, rig.Nsid, NvmeIoOpcode.Write, qd, Ios, (i, buf) => ram.Write(buf, Pattern(4096, 1000 + i)), null);
        for (int i = 0; i < Ios; i++)
        {
            Assert.Equal(Pattern(4096, 1000 + i), rig.ReadFile(Lbas(i) * 4096L, 4096));
        }
        var seen = new byte[4096];
        RunAtDepth(drv, rig.Nsid, NvmeIoOpcode.Read, qd, Ios, (i, buf) => ram.Write(buf, new byte[4096]), (i, buf) =>
        {
            ram.Read(buf, seen);
            Assert.Equal(Pattern(4096, 1000 + i), seen);
        });
        Assert.Equal(0, fn.Interrupts);
    }

    [Fact]
    public void A_poll_queue_waiter_whose_completion_another_thread_reaped_returns_without_waiting_for_a_new_entry()
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, direct) = rig.Connect(0);
        var fn = new HeldSqDoorbell(direct);
        // No spin budget: the waiter checks once per 1 ms sleep, so the other thread reaps its entry first.
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize,
            new NvmeDriverOptions { IoQueues = 1, PollQueues = 1, ShadowDoorbells = false, PollSpinMicroseconds = 0 });
        Assert.True(drv.IsPolled(1));

        fn.Hold = true;
        long waitedMs = -1;
        NvmeCompletion? done = null;
        Exception? failure = null;
        var waiter = new Thread(() =>
        {
            try
            {
                ushort cid = drv.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Read, rig.Nsid, 0, 1), Buf, Lba);
                var sw = System.Diagnostics.Stopwatch.StartNew();
                done = drv.Wait(1, cid, timeoutMs: 3000);
                waitedMs = sw.ElapsedMilliseconds;
            }
#pragma warning disable CA1031 // reported by the test thread below
            catch (Exception e)
#pragma warning restore CA1031
            {
                failure = e;
            }
        });
        waiter.Start();
        Assert.True(SpinWait.SpinUntil(() => fn.Held, 5000), "the waiter never rang its SQ doorbell");
        Thread.Sleep(20); // the waiter is now polling the phase tag
        // The doorbell runs the read (the controller completes it on this thread), and this thread reaps the entry at
        // once, as a second waiter on the same queue would: the waiter's phase-tag check never sees it.
        fn.Release();
        drv.ProcessCompletions(1);
        waiter.Join();
        Assert.Null(failure);
        Assert.True(done!.Value.Status.IsSuccess);
        // Without watching its slot the waiter polls the phase tag until its 3 s timeout.
        Assert.InRange(waitedMs, 0, 1000);
    }

    /// <summary>Holds back the I/O SQ 1 tail doorbell write until <see cref="Release"/>; every other access passes through.</summary>
    private sealed class HeldSqDoorbell(Guest.IGuestPciFunction inner) : Guest.IGuestPciFunction
    {
        private const ulong Sq1Tail = 0x1000 + (2 * 4); // CAP.DSTRD = 0
        private byte[]? _held;

        public bool Hold { get; set; }

        public bool Held => Volatile.Read(ref _held) is not null;

        public int MsixVectorCount => inner.MsixVectorCount;

        public void Release()
        {
            Hold = false;
            inner.MmioWrite(0, Sq1Tail, Interlocked.Exchange(ref _held, null)!);
        }

        public void ReadConfig(int offset, Span<byte> data) => inner.ReadConfig(offset, data);

        public void WriteConfig(int offset, ReadOnlySpan<byte> data) => inner.WriteConfig(offset, data);

        public void MmioRead(int bar, ulong offset, Span<byte> data) => inner.MmioRead(bar, offset, data);

        public void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data)
        {
            if (Hold && bar == 0 && offset == Sq1Tail)
            {
                Volatile.Write(ref _held, data.ToArray());
                return;
            }
            inner.MmioWrite(bar, offset, data);
        }

        public bool WaitInterrupt(int vector, int timeoutMs) => inner.WaitInterrupt(vector, timeoutMs);
    }

    /// <summary>LBA of the i-th I/O: scattered, distinct.</summary>
    private static int Lbas(int i) => (i * 37) % 1024;

    /// <summary>
    /// Runs <paramref name="ios"/> one-block commands on queue 1 keeping <paramref name="qd"/> in flight. Each I/O owns
    /// a 4 KiB buffer until its completion is taken; the next I/O reuses the buffer the taken one freed.
    /// </summary>
    private static void RunAtDepth(NvmeDriver drv, uint nsid, NvmeIoOpcode op, int qd, int ios, Action<int, ulong> before, Action<int, ulong>? after)
    {
        var bufferOf = new ulong[ios];
        int submitted = 0, done = 0;
        void SubmitNext(ulong buf)
        {
            int i = submitted++;
            bufferOf[i] = buf;
            before(i, buf);
            drv.Submit(1, NvmeDriver.ReadWrite(op, nsid, (ulong)Lbas(i), 1), buf, 4096, (ulong)i);
        }
        while (submitted < Math.Min(qd, ios))
        {
            SubmitNext(Buf + (ulong)(submitted * 4096));
        }
        var deadline = DateTime.UtcNow.AddSeconds(20);
        int maxInFlight = 0;
        while (done < ios)
        {
            maxInFlight = Math.Max(maxInFlight, submitted - done);
            if (drv.TryTakeAnyCompletion(1, out var c))
            {
                Assert.True(c.Status.IsSuccess, c.Status.ToString());
                ulong buf = bufferOf[(int)c.Tag];
                after?.Invoke((int)c.Tag, buf);
                done++;
                if (submitted < ios)
                {
                    SubmitNext(buf);
                }
                continue;
            }
            Assert.True(DateTime.UtcNow < deadline, $"{done} of {ios} completed");
            drv.WaitForCompletions(1, 5);
        }
        Assert.Equal(qd, maxInFlight);
    }

    [Fact]
    public void Idle_shadow_poller_backs_off_to_a_blocking_wait_and_the_next_doorbell_wakes_it()
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var drv = PolledDriver(ram, fn, shadow: true, ioQueues: 1);
        var ctrl = rig.Subsystem.Primary;
        string name = ctrl.ShadowPollerThreadName ?? throw new InvalidOperationException("no poller after Doorbell Buffer Config");
        for (int i = 0; i < 50; i++)
        {
            Assert.True(drv.Read(1, rig.Nsid, (ulong)i, 1, Lba, Buf).IsSuccess);
        }

        // Past the poller's idle window it must block; its CPU time over a further idle second stays small. A poller
        // that kept spinning or yielding would use most of that second (judged generously: under a quarter of it).
        Thread.Sleep(NvmeController.PollerIdleMicroseconds / 1000 + 200);
        double cpu0 = ThreadCpuSeconds(name);
        Thread.Sleep(1000);
        double used = ThreadCpuSeconds(name) - cpu0;
        Assert.True(used < 0.25, $"idle poller used {used:F3} s of CPU in 1 s");

        // Blocked means armed: the next submission rings the MMIO doorbell, which runs the command and wakes the poller.
        long rings = fn.DoorbellWrites;
        ram.Write(Buf, Pattern(Lba, 77));
        Assert.True(drv.Write(1, rig.Nsid, 500, 1, Lba, Buf).IsSuccess);
        Assert.True(fn.DoorbellWrites > rings);
        Assert.Equal(Pattern(Lba, 77), rig.ReadFile(500L * Lba, Lba));
        // Woken, it polls again: in a burst right after, some reads go through the shadow doorbell alone. An armed,
        // blocked poller needs an MMIO doorbell for every one; how many it saves depends on scheduling (on a loaded
        // 2-core machine the 0.5 ms idle window can lapse between reads: 44 of 50 rang in one CI run), so the bound is
        // "not all of them", which a poller that stayed blocked after the wake-up cannot meet.
        rings = fn.DoorbellWrites;
        for (int i = 0; i < 50; i++)
        {
            Assert.True(drv.Read(1, rig.Nsid, (ulong)i, 1, Lba, Buf).IsSuccess);
        }
        Assert.True(fn.DoorbellWrites - rings < 50, $"{fn.DoorbellWrites - rings} MMIO doorbells for 50 reads right after a wake-up");
        Assert.Equal(name, ctrl.ShadowPollerThreadName);
    }

    /// <summary>utime + stime of the thread whose comm is <paramref name="name"/>, from /proc/self/task/*/stat (CLK_TCK = 100).</summary>
    internal static double ThreadCpuSeconds(string name)
    {
        foreach (string task in Directory.GetDirectories("/proc/self/task"))
        {
            string comm;
            try
            {
                comm = File.ReadAllText(Path.Combine(task, "comm")).TrimEnd('\n');
            }
            catch (IOException)
            {
                continue; // the thread exited
            }
            if (comm != name)
            {
                continue;
            }
            string stat = File.ReadAllText(Path.Combine(task, "stat"));
            // Fields after "(comm)": state is field 3, utime 14, stime 15.
            string[] f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            return (long.Parse(f[11], CultureInfo.InvariantCulture) + long.Parse(f[12], CultureInfo.InvariantCulture)) / 100.0;
        }
        throw new InvalidOperationException($"no thread named {name}");
    }

    [Fact]
    public void Shadow_doorbells_and_a_poll_queue_over_a_real_vfio_user_socket_complete_io_without_any_eventfd_signal()
    {
        using var rig = new NvmeRig(lbaSize: 4096);
        rig.ProvisionVf(1);
        string sock = Path.Combine(Path.GetTempPath(), $"vmig-nvpoll-{Guid.NewGuid():N}"[..24] + ".sock");
        using var server = new VfioUserServer(rig.Subsystem.GetVfFunction(0)!, sock);
        server.Start();
        using var client = VfioUserClient.Connect(sock);
        using var ram = new TestGuestRam(32 << 20);
        using var fn = new ClientPciFunction(client, ram);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2, PollQueues = 1, ShadowDoorbells = true });
        Assert.True(drv.UsesShadowDoorbells);
        Assert.True(drv.UsesInterrupts);
        Assert.True(drv.IsPolled(2));
        Assert.False(drv.IsPolled(1));
        // Drain what bring-up left on the eventfds; from here on only the IEN = 1 queue may signal one.
        for (int v = 0; v < fn.MsixVectorCount; v++)
        {
            while (fn.WaitInterrupt(v, 0))
            {
            }
        }

        for (int i = 0; i < 16; i++)
        {
            ram.Write(Buf, Pattern(4096, 300 + i));
            Assert.True(drv.Write(2, rig.Nsid, (ulong)(i * 3), 1, 4096, Buf).IsSuccess);
        }
        var ids = new List<ushort>();
        for (int i = 0; i < 16; i++)
        {
            ids.Add(drv.Submit(2, NvmeDriver.ReadWrite(NvmeIoOpcode.Read, rig.Nsid, (ulong)(i * 3), 1), Buf + (ulong)(i * 4096), 4096));
        }
        foreach (ushort cid in ids)
        {
            Assert.True(drv.Wait(2, cid).Status.IsSuccess);
        }
        var back = new byte[4096];
        for (int i = 0; i < 16; i++)
        {
            ram.Read(Buf + (ulong)(i * 4096), back);
            Assert.Equal(Pattern(4096, 300 + i), back);
            Assert.Equal(Pattern(4096, 300 + i), rig.ReadFile(i * 3 * 4096L, 4096));
        }
        for (int v = 0; v < fn.MsixVectorCount; v++)
        {
            Assert.False(fn.WaitInterrupt(v, 0), $"vector {v} was signalled for a poll queue");
        }
        // The IEN = 1 queue of the same controller still signals its vector.
        ushort w = drv.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, rig.Nsid, 900, 1), Buf, 4096);
        Assert.True(fn.WaitInterrupt(1, 5000));
        Assert.True(drv.Wait(1, w).Status.IsSuccess);
    }

    [Fact]
    public void A_poll_queue_stays_interrupt_free_across_a_secondary_migration_and_its_in_flight_write_completes_there()
    {
        using var src = new NvmeRig();
        src.ProvisionVf(1);
        var (ramA, fnA) = src.Connect(1, vectors: 5);
        var drvA = PolledDriver(ramA, fnA, shadow: true);
        var mig = src.Subsystem.Migration;
        Assert.True(mig.Suspend(1, SuspendType.Suspend).IsSuccess);
        // Submitted while suspended: on the target it is fetched and completed on the IEN = 0 CQ.
        ramA.Write(Buf, Pattern(4096, 60));
        ushort cid = drvA.Submit(2, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, src.Nsid, 40, 8), Buf, 4096, tag: 60);
        Assert.True(mig.GetControllerState(1, out byte[] state).IsSuccess);

        using var dst = new NvmeRig(sharedNamespacePath: src.NamespacePath);
        dst.ProvisionVf(1);
        var (ramB, fnB) = dst.Connect(1, vectors: 5);
        ramB.CopyFrom(ramA);
        var tmig = dst.Subsystem.Migration;
        Assert.True(tmig.Suspend(1, SuspendType.Suspend).IsSuccess);
        Assert.True(tmig.SetControllerState(1, state, out string err).IsSuccess, err);
        var target = dst.Subsystem.GetController(1)!;
        Assert.Equal((false, true), target.WithLock(s => (s.Cqs[2]!.InterruptsEnabled, s.Cqs[1]!.InterruptsEnabled)));
        fnB.ResetCounters();
        Assert.True(tmig.Resume(1).IsSuccess);

        var drvB = NvmeDriver.Attach(ramB, fnB, Region);
        Assert.True(drvB.IsPolled(2));
        Assert.Equal(60UL, drvB.Wait(2, cid, 2000).Tag);
        Assert.Equal(Pattern(4096, 60), dst.ReadFile(40 * 512, 4096));
        Assert.True(drvB.Read(2, dst.Nsid, 40, 8, Lba, Buf + 0x10000).IsSuccess);
        Assert.Equal(0, fnB.Interrupts);
    }
}
