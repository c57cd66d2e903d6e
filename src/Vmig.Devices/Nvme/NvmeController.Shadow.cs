using System.Diagnostics;
using Vmig.Spec.Nvme;

namespace Vmig.Devices.Nvme;

/// <summary>
/// Shadow doorbells (Doorbell Buffer Config, NVMe Base 2.x §5.2.6 / §8.2.4): the host writes SQ tails and CQ heads of
/// I/O queues into a page of its memory and rings the MMIO doorbell only when the EventIdx page says the controller
/// asked for it. A poller thread per controller reads the shadow page while there is work, then "arms" the EventIdx
/// entries (asks for a ring) and sleeps until an MMIO doorbell or a timeout wakes it.
/// </summary>
/// <remarks>
/// The poller is adaptive, in the manner of SPDK's vfio-user target (which polls shadow doorbells in a busy loop) but
/// backing off when idle: for <see cref="PollerSpinMicroseconds"/> after the last command it spins on the shadow page
/// (a short pause loop, with a sched_yield every other poll so a guest thread that shares the core still runs); then, until
/// <see cref="PollerIdleMicroseconds"/> of idleness, it polls between sched_yields; then it arms EventIdx and blocks
/// on a semaphore the next MMIO doorbell releases. An idle controller therefore costs no CPU, and a host that takes
/// interrupts (IEN = 1, e.g. Linux's nvme driver) gets its next command noticed within a pause loop while it is busy.
/// The poller thread lives from attach to detach; it polls only while the function is RUNNING or PRE_COPY
/// (<see cref="SetPollingAllowed"/>), the controller is not suspended and Doorbell Buffer Config is in force, and is
/// parked (blocked) otherwise, with EventIdx left armed. A client that reattaches to a controller that kept its Doorbell
/// Buffer Config gets the poller polling again with its first doorbell.
/// </remarks>
public sealed partial class NvmeController
{
    /// <summary>After the last command, how long the poller busy-spins on the shadow page (µs).</summary>
    public const int PollerSpinMicroseconds = 50;

    /// <summary>After the last command, how long the poller keeps polling (spin, then yield) before it arms EventIdx and blocks (µs).</summary>
    public const int PollerIdleMicroseconds = 500;

    /// <summary>
    /// Polls per sched_yield in the spin phase. Small on purpose: when the guest's thread shares the poller's core (a
    /// 2-core host with other work), each hand-over waits for the spinner's turn to end; every 16 polls made that
    /// ~5 µs per stage, every 2 polls ~2 µs (bench/results/s3-nvme/experiment-yield-*). With a core to itself the
    /// poller's yield is a cheap syscall.
    /// </summary>
    private const int PollsPerYield = 2;

    private static int s_pollerSerial;

    /// <summary>
    /// The shadow-doorbell poller thread's name (unique in the process, at most 15 characters, so it is the thread's
    /// <c>comm</c> in /proc/self/task/*/), or null while no poller runs. For per-thread CPU accounting.
    /// </summary>
    public string? ShadowPollerThreadName => Volatile.Read(ref _poller)?.Name;

    private void ReadShadow(SubmissionQueueState sq)
    {
        ulong addr = State.ShadowDoorbellBase + (ulong)ShadowDoorbell.SqOffset(sq.Qid, Capabilities.Dstrd);
        if (!_dma!.TryReadUInt32(addr, out uint v))
        {
            State.Csts |= ControllerStatus.Cfs;
            return;
        }
        if (v == sq.Tail)
        {
            return;
        }
        if (v >= (uint)sq.Entries)
        {
            InvalidDoorbell(sq.Qid, AsyncEventErrorInfo.InvalidDoorbellWriteValue);
            return;
        }
        sq.Tail = (ushort)v;
    }

    private void ReadShadow(CompletionQueueState cq)
    {
        ulong addr = State.ShadowDoorbellBase + (ulong)ShadowDoorbell.CqOffset(cq.Qid, Capabilities.Dstrd);
        if (!_dma!.TryReadUInt32(addr, out uint v))
        {
            State.Csts |= ControllerStatus.Cfs;
            return;
        }
        if (v == cq.Head)
        {
            return;
        }
        if (!IsValidCqHead(cq, v))
        {
            InvalidDoorbell(cq.Qid, AsyncEventErrorInfo.InvalidDoorbellWriteValue);
            return;
        }
        cq.Head = (ushort)v;
    }

    /// <summary>
    /// While the poller is active, keeps each EventIdx one behind the value just seen, so the host's next updates do not
    /// cross it and need no MMIO doorbell (ShadowDoorbell.NeedEvent is false).
    /// </summary>
    private void UpdateEventIdx() => WriteEventIdx(armed: !PollerActiveLocked);

    /// <summary>
    /// True if a poller thread exists and may poll (the function is RUNNING/PRE_COPY). When false, EventIdx must stay
    /// armed: nothing would notice a shadow update that rang no doorbell. Lock held.
    /// </summary>
    private bool PollerActiveLocked => _poller is not null && _pollingAllowed;

    /// <summary>
    /// True while the shadow-doorbell poller serves this controller: Doorbell Buffer Config in force, a host attached,
    /// the controller ready and not suspended, and its function RUNNING or PRE_COPY. The poller thread itself lives
    /// from attach to detach and is parked (blocked, no polls) whenever this is false.
    /// </summary>
    public bool ShadowPollingActive
    {
        get
        {
            lock (_gate)
            {
                return PollerActiveLocked && ShouldPollLocked;
            }
        }
    }

    /// <summary>Writes EventIdx for every I/O queue: armed = the host rings on its next update. Lock held.</summary>
    private void WriteEventIdx(bool armed)
    {
        var s = State;
        if (s.EventIdxBase == 0 || _dma is null)
        {
            return;
        }
        for (int qid = 1; qid <= NvmeControllerState.MaxQueueId; qid++)
        {
            if (s.Sqs[qid] is { } sq)
            {
                _dma.TryWriteUInt32(s.EventIdxBase + (ulong)ShadowDoorbell.SqOffset(qid, Capabilities.Dstrd), (ushort)(armed ? sq.Tail : sq.Tail - 1));
            }
            if (s.Cqs[qid] is { } cq)
            {
                _dma.TryWriteUInt32(s.EventIdxBase + (ulong)ShadowDoorbell.CqOffset(qid, Capabilities.Dstrd), (ushort)(armed ? cq.Head : cq.Head - 1));
            }
        }
    }

    /// <summary>
    /// One poll of the shadow doorbells: processes work, fires interrupts. True if any command ran.
    /// <paramref name="wanted"/>: false if the poller should park instead (see <see cref="ShouldPollLocked"/>), read
    /// under the same lock acquisition as the poll, so the busy loop takes the lock once per poll.
    /// </summary>
    internal bool PollShadow(out bool wanted)
    {
        bool any;
        lock (_gate)
        {
            wanted = ShouldPollLocked;
            if (!wanted)
            {
                return false;
            }
            any = ProcessLocked();
        }
        if (any)
        {
            FireInterrupts();
        }
        return any;
    }

    /// <summary>Arms EventIdx before the poller sleeps, then polls once more to close the race with a host update.</summary>
    internal bool ArmAndRecheck()
    {
        lock (_gate)
        {
            if (!ShouldPollLocked)
            {
                // Parked or suspended: whoever stopped polling armed EventIdx if host memory may be written.
                return false;
            }
            WriteEventIdx(armed: true);
        }
        // EventIdx store before the shadow loads (the host does the mirror image: shadow store, fence, EventIdx load),
        // so one side always sees the other's update.
        Interlocked.MemoryBarrier();
        return PollShadow(out _);
    }

    /// <summary>An unexpected failure on the poller thread: the controller reports CSTS.CFS and the host resets it.</summary>
    private void FailFromPoller(ShadowDoorbellPoller failed)
    {
        lock (_gate)
        {
            State.Csts |= ControllerStatus.Cfs;
            if (_poller == failed)
            {
                _poller = null;
            }
        }
    }

    /// <summary>
    /// Creates the poller thread, parked, if there is none (at attach, and after a poller failure at the next Doorbell
    /// Buffer Config). Creating a thread waits for it to start, a scheduler round trip that on a loaded 2-core host
    /// took 1.8–3.1 ms: so never on the migration path (RUNNING or Resume only wake a parked poller). True if a poller
    /// exists. Lock held.
    /// </summary>
    private bool CreatePollerLocked()
    {
        if (_poller is null && _dma is not null)
        {
            // Linux keeps 15 characters of a thread name; a process-wide serial keeps it unique.
            _poller = new ShadowDoorbellPoller(this, $"nvme-shdw-{Interlocked.Increment(ref s_pollerSerial) % 100000}");
        }
        return _poller is not null;
    }

    private void StopPoller()
    {
        ShadowDoorbellPoller? p;
        lock (_gate)
        {
            p = _poller;
            _poller = null;
        }
        p?.RequestStop();
        p?.Join();
    }

    /// <summary>The poller thread of one controller.</summary>
    private sealed class ShadowDoorbellPoller
    {
        private readonly NvmeController _owner;
        private readonly Thread _thread;
        private readonly SemaphoreSlim _wake = new(0, int.MaxValue);
        private volatile bool _stop;
        private volatile bool _busyHint;

        public ShadowDoorbellPoller(NvmeController owner, string name)
        {
            _owner = owner;
            _thread = new Thread(Run) { IsBackground = true, Name = name };
            _thread.Start();
        }

        public string Name => _thread.Name!;

        /// <summary>
        /// Wakes the poller if it blocks (armed or parked). <paramref name="busy"/>: the host is active right now (a
        /// doorbell, Doorbell Buffer Config), so a parked poller resumes in the spin phase rather than armed.
        /// </summary>
        public void Wake(bool busy)
        {
            if (busy && !_busyHint)
            {
                // Written only when it changes: every MMIO doorbell comes here, and the poller reads this line.
                _busyHint = true;
            }
            if (_wake.CurrentCount == 0)
            {
                _wake.Release();
            }
        }

        public void RequestStop()
        {
            _stop = true;
            _wake.Release();
        }

        public void Join()
        {
            if (Thread.CurrentThread != _thread)
            {
                _thread.Join();
            }
        }

        private void Run()
        {
            try
            {
                Loop();
            }
#pragma warning disable CA1031 // a device thread must not take the device host down; the controller fails instead
            catch (Exception)
#pragma warning restore CA1031
            {
                _owner.FailFromPoller(this);
            }
        }

        private void Loop()
        {
            long spinTicks = PollerSpinMicroseconds * Stopwatch.Frequency / 1_000_000;
            long idleTicks = PollerIdleMicroseconds * Stopwatch.Frequency / 1_000_000;
            long lastWork = Stopwatch.GetTimestamp() - idleTicks;
            int polls = 0;
            while (!_stop)
            {
                if (_owner.PollShadow(out bool wanted))
                {
                    lastWork = Stopwatch.GetTimestamp();
                    continue;
                }
                if (!wanted)
                {
                    // Parked: no shadow doorbells, no host memory, suspended, or the function is not RUNNING. Whoever
                    // parked it armed EventIdx; a wake brings it back armed (nothing ran lately: the vCPUs were paused)
                    // unless the waker saw the host busy.
                    _wake.Wait();
                    lastWork = Stopwatch.GetTimestamp() - (_busyHint ? 0 : idleTicks);
                    _busyHint = false;
                    continue;
                }
                long idle = Stopwatch.GetTimestamp() - lastWork;
                if (idle < spinTicks)
                {
                    // Busy phase: a new tail is noticed within one pause loop, not one scheduler round trip.
                    if (++polls % PollsPerYield == 0)
                    {
                        Thread.Yield();
                    }
                    else
                    {
                        Thread.SpinWait(8);
                    }
                    continue;
                }
                if (idle < idleTicks)
                {
                    Thread.Yield();
                    continue;
                }
                // Armed: the host rings an MMIO doorbell on its next update, which wakes us. The timeout is a safety
                // net; it costs one poll, and the poller goes back to sleep without spinning again.
                while (!_stop && !_owner.ArmAndRecheck() && !_wake.Wait(50))
                {
                }
                lastWork = Stopwatch.GetTimestamp();
                _busyHint = false;
            }
        }
    }
}
