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
/// The poller runs only while the function is RUNNING or PRE_COPY (<see cref="SetPollingAllowed"/>) and a host is
/// attached; whenever it is stopped EventIdx is left armed, and a client that reattaches to a controller that kept its
/// Doorbell Buffer Config gets the poller back with its first doorbell.
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
    private void UpdateEventIdx() => WriteEventIdx(armed: _poller is null);

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

    /// <summary>One poll of the shadow doorbells: processes work, fires interrupts. True if any command ran.</summary>
    internal bool PollShadow()
    {
        bool any;
        lock (_gate)
        {
            if (State.ShadowDoorbellBase == 0)
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
            WriteEventIdx(armed: true);
        }
        // EventIdx store before the shadow loads (the host does the mirror image: shadow store, fence, EventIdx load),
        // so one side always sees the other's update.
        Interlocked.MemoryBarrier();
        return PollShadow();
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
    /// Starts the poller if none runs: <paramref name="armed"/> = begin in the blocked phase (arm EventIdx, poll once,
    /// wait for a ring) instead of the spin phase, for a start with no recent host activity. Lock held.
    /// </summary>
    private void StartPollerLocked(bool armed)
    {
        if (_poller is null)
        {
            // Linux keeps 15 characters of a thread name; a process-wide serial keeps it unique.
            _poller = new ShadowDoorbellPoller(this, $"nvme-shdw-{Interlocked.Increment(ref s_pollerSerial) % 100000}", armed);
        }
    }

    private void StopPollerLocked()
    {
        var p = _poller;
        _poller = null;
        p?.RequestStop();
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
        private readonly bool _startArmed;
        private volatile bool _stop;

        public ShadowDoorbellPoller(NvmeController owner, string name, bool startArmed)
        {
            _owner = owner;
            _startArmed = startArmed;
            _thread = new Thread(Run) { IsBackground = true, Name = name };
            _thread.Start();
        }

        public string Name => _thread.Name!;

        public void Wake()
        {
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
            long lastWork = Stopwatch.GetTimestamp() - (_startArmed ? idleTicks : 0);
            int polls = 0;
            while (!_stop)
            {
                if (_owner.PollShadow())
                {
                    lastWork = Stopwatch.GetTimestamp();
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
            }
        }
    }
}
