using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;

namespace Vmig.Guest.Workloads;

/// <summary>
/// An fio job as a guest program over an <see cref="IGuestBlockDevice"/>, with every bit of state in guest RAM:
/// parameters, counters, the random generator, the in-flight slot table, data buffers and the verification ledger
/// (per block: CRC-32C and generation of the last ACKNOWLEDGED write). The register block holds only a magic and the
/// state's address, so a migrated copy resumes the job mid-flight; commands in flight at the pause complete on the
/// target and are applied to the ledger there.
/// </summary>
/// <remarks>
/// Block content written for (block b, generation g): bytes 0-3 "VBLK" (0x4B4C4256), 4-7 g, 8-15 b (absolute index
/// in bs units), then an xorshift64 stream seeded by (b, g). That lets <see cref="Verify"/> tell a lost write (an
/// intact older generation) from corruption. Arguments of kind "fio": a first line
/// <c>device=SERVICE,gpa=ADDR[,job=I][,clone=K]</c>, then the job file (<see cref="FioJobParser"/>).
/// The state region needs <see cref="StateSize"/> bytes at a page-aligned gpa.
/// </remarks>
public sealed class FioWorkload : IGuestProgram
{
    public const ulong Magic = 0x314F494647494D56; // "VMIGFIO1"
    public const uint RegisterMagic = 0x524F4946; // "FIOR"
    private const uint BlockMagic = 0x4B4C4256;

    // Header offsets.
    private const int HPattern = 12, HBs = 16, HDepth = 20, HFirst = 24, HBlocks = 32, HRuntime = 40, HIoSize = 48, HFlags = 56, HMix = 60;
    private const int HElapsedUs = 64, HIssued = 72, HWrites = 80, HReads = 88, HErrors = 96, HMismatch = 104, HRng = 112, HCursor = 120;
    private const int HNextTag = 128, HInFlight = 136, HDevice = 160, DeviceNameMax = 64;
    private const int SlotSize = 32;
    private const uint OpFree = 0, OpRead = 1, OpWrite = 2;

    private readonly IGuestMemory _m;
    private readonly IGuestBlockDevice _dev;
    private readonly ulong _s;
    private readonly FioPattern _pattern;
    private readonly int _bs, _depth, _mix;
    private readonly ulong _first, _blocks, _runtimeUs, _ioSize;
    private readonly bool _verify, _timeBased;
    private readonly ulong _slots, _ledger, _buffers;
    private readonly byte[] _buf;
    private readonly BlockCompletion[] _completions = new BlockCompletion[64];

    private FioWorkload(IGuestMemory memory, IGuestBlockDevice device, ulong stateGpa)
    {
        _m = memory;
        _dev = device;
        _s = stateGpa;
        _pattern = (FioPattern)_m.ReadUInt32(_s + HPattern);
        _bs = (int)_m.ReadUInt32(_s + HBs);
        _depth = (int)_m.ReadUInt32(_s + HDepth);
        _first = _m.ReadUInt64(_s + HFirst);
        _blocks = _m.ReadUInt64(_s + HBlocks);
        _runtimeUs = _m.ReadUInt64(_s + HRuntime) * 1000;
        _ioSize = _m.ReadUInt64(_s + HIoSize);
        uint flags = _m.ReadUInt32(_s + HFlags);
        _verify = (flags & 1) != 0;
        _timeBased = (flags & 2) != 0;
        _mix = (int)_m.ReadUInt32(_s + HMix);
        (_slots, _ledger, _buffers) = Layout(_s, _depth, _blocks);
        _buf = new byte[_bs];
    }

    /// <summary>The factory (kind "fio").</summary>
    public static IGuestProgramFactory Factory { get; } = new FioFactory();

    /// <summary>Bytes of guest RAM the job's state needs (header, slots, ledger, buffers), page multiple.</summary>
    public static ulong StateSize(FioJob job)
    {
        ArgumentNullException.ThrowIfNull(job);
        var (_, _, buffers) = Layout(0, job.IoDepth, job.Blocks);
        return RoundPage(buffers + ((ulong)job.IoDepth * (ulong)job.BlockSize));
    }

    /// <summary>The state gpa from a register block.</summary>
    public static ulong StateGpa(ReadOnlySpan<byte> registers) =>
        BinaryPrimitives.ReadUInt32LittleEndian(registers) == RegisterMagic ? BinaryPrimitives.ReadUInt64LittleEndian(registers[8..])
        : throw new InvalidDataException("registers are not an fio job's");

    /// <summary>Guest address of block <paramref name="block"/>'s ledger entry (u64: generation &lt;&lt; 32 | CRC-32C).</summary>
    public static ulong LedgerEntryGpa(IGuestMemory memory, ulong stateGpa, ulong block)
    {
        var w = Attach(memory, NoDevice.Instance, stateGpa);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(block, w._blocks);
        return w._ledger + (block * 8);
    }

    /// <summary>Acknowledged writes and reads so far (from RAM).</summary>
    public static (long Writes, long Reads, long Errors, long ReadMismatches) Counters(IGuestMemory memory, ulong stateGpa)
    {
        ArgumentNullException.ThrowIfNull(memory);
        return ((long)memory.ReadUInt64(stateGpa + HWrites), (long)memory.ReadUInt64(stateGpa + HReads),
            (long)memory.ReadUInt64(stateGpa + HErrors), (long)memory.ReadUInt64(stateGpa + HMismatch));
    }

    /// <summary>The block-device service name a fio state block at <paramref name="stateGpa"/> drives (what the verifier reads back through).</summary>
    public static string DeviceName(IGuestMemory memory, ulong stateGpa)
    {
        ArgumentNullException.ThrowIfNull(memory);
        var name = new byte[DeviceNameMax];
        memory.Read(stateGpa + HDevice, name);
        return Encoding.UTF8.GetString(name).TrimEnd('\0');
    }

    /// <summary>
    /// The verify pass: drains commands in flight (applying acknowledged writes to the ledger), then reads back every
    /// block the ledger has a write for and classifies it. The job must not be running (vCPU paused or finished).
    /// </summary>
    /// <exception cref="TimeoutException">A command did not complete within <paramref name="timeoutMs"/>.</exception>
    public static VerifierCounts Verify(IGuestMemory memory, ulong stateGpa, IGuestBlockDevice device, int timeoutMs = 10_000)
    {
        var w = Attach(memory, device, stateGpa);
        var sw = Stopwatch.StartNew();
        while (w.InFlight > 0)
        {
            if (w.Reap() == 0)
            {
                if (sw.ElapsedMilliseconds > timeoutMs)
                {
                    throw new TimeoutException($"{w.InFlight} commands still in flight after {timeoutMs} ms");
                }
                Thread.Sleep(1);
            }
        }
        long verified = 0, lost = 0, corrupt = 0;
        for (ulong b = 0; b < w._blocks; b++)
        {
            ulong e = memory.ReadUInt64(w._ledger + (b * 8));
            uint gen = (uint)(e >> 32);
            if (gen == 0)
            {
                continue;
            }
            w.ReadSync(b, sw, timeoutMs);
            memory.Read(w._buffers, w._buf);
            if (Spec.Crc32C.Compute(w._buf) == (uint)e)
            {
                verified++;
            }
            else if (w.IsIntactOlder(b, gen))
            {
                lost++;
            }
            else
            {
                corrupt++;
            }
        }
        var c = Counters(memory, stateGpa);
        return new VerifierCounts(c.Writes, c.Reads, verified, lost, corrupt);
    }

    // A VMM pause waits for the running slice to end (vCPUs stop between slices), so the slice bounds the time a
    // switchover spends pausing this vCPU: 2 ms slices cost 2–8 ms of the NVMe-only downtime on this 2-core machine.
    private const double SliceMilliseconds = 0.5;

    /// <inheritdoc/>
    public bool RunSlice(Span<byte> registers)
    {
        long t0 = Stopwatch.GetTimestamp();
        bool progressed = false;
        bool issuing = true;
        while (Stopwatch.GetElapsedTime(t0).TotalMilliseconds < SliceMilliseconds)
        {
            progressed |= Reap() > 0;
            issuing = MayIssue(Stopwatch.GetElapsedTime(t0));
            if (issuing)
            {
                progressed |= Issue();
            }
            if (!issuing && InFlight == 0)
            {
                break;
            }
            if (!progressed)
            {
                Thread.Yield();
            }
        }
        ulong us = (ulong)(Stopwatch.GetElapsedTime(t0).TotalMilliseconds * 1000);
        _m.WriteUInt64(_s + HElapsedUs, _m.ReadUInt64(_s + HElapsedUs) + us);
        return issuing || InFlight > 0;
    }

    private int InFlight => (int)_m.ReadUInt32(_s + HInFlight);

    private static FioWorkload Attach(IGuestMemory memory, IGuestBlockDevice device, ulong stateGpa)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(device);
        if (memory.ReadUInt64(stateGpa) != Magic || memory.ReadUInt32(stateGpa + 8) != 1)
        {
            throw new InvalidDataException($"no fio job state at {stateGpa:#x}");
        }
        return new FioWorkload(memory, device, stateGpa);
    }

    private static (ulong Slots, ulong Ledger, ulong Buffers) Layout(ulong s, int depth, ulong blocks)
    {
        ulong slots = s + 4096;
        ulong ledger = slots + RoundPage((ulong)depth * SlotSize);
        ulong buffers = ledger + RoundPage(blocks * 8);
        return (slots, ledger, buffers);
    }

    private static ulong RoundPage(ulong n) => (n + 4095) & ~4095UL;

    private bool MayIssue(TimeSpan slice)
    {
        ulong elapsed = _m.ReadUInt64(_s + HElapsedUs) + (ulong)(slice.TotalMilliseconds * 1000);
        if (_runtimeUs != 0 && elapsed >= _runtimeUs)
        {
            return false;
        }
        return _timeBased && _runtimeUs != 0 || _m.ReadUInt64(_s + HIssued) < _ioSize;
    }

    private int Reap()
    {
        int n = _dev.Poll(_completions);
        for (int i = 0; i < n; i++)
        {
            var c = _completions[i];
            int slot = (int)(c.Tag & 0xFF);
            ulong sa = _slots + (ulong)(slot * SlotSize);
            if (slot >= _depth || _m.ReadUInt64(sa + 16) != c.Tag)
            {
                continue; // not one of ours (or already reaped before a migration)
            }
            uint op = _m.ReadUInt32(sa);
            uint gen = _m.ReadUInt32(sa + 4);
            ulong block = _m.ReadUInt64(sa + 8);
            ulong buf = _buffers + (ulong)slot * (ulong)_bs;
            if (!c.Success)
            {
                Add(HErrors, 1);
            }
            else if (op == OpWrite)
            {
                _m.Read(buf, _buf);
                // The write is acknowledged: only now does the ledger promise this content.
                _m.WriteUInt64(_ledger + (block * 8), ((ulong)gen << 32) | Spec.Crc32C.Compute(_buf));
                Add(HWrites, 1);
            }
            else if (op == OpRead)
            {
                Add(HReads, 1);
                ulong e = _m.ReadUInt64(_ledger + (block * 8));
                if (_verify && (e >> 32) != 0)
                {
                    _m.Read(buf, _buf);
                    if (Spec.Crc32C.Compute(_buf) != (uint)e)
                    {
                        Add(HMismatch, 1);
                    }
                }
            }
            _m.WriteUInt32(sa, OpFree);
            _m.WriteUInt32(_s + HInFlight, (uint)(InFlight - 1));
        }
        return n;
    }

    private bool Issue()
    {
        bool any = false;
        while (InFlight < _depth && MayIssue(TimeSpan.Zero))
        {
            int slot = FreeSlot();
            if (slot < 0 || !PickBlock(out ulong block, out bool write))
            {
                return any;
            }
            ulong sa = _slots + (ulong)(slot * SlotSize);
            ulong buf = _buffers + (ulong)slot * (ulong)_bs;
            uint gen = (uint)(_m.ReadUInt64(_ledger + (block * 8)) >> 32) + 1;
            if (write)
            {
                Fill(_buf, _first + block, gen);
                _m.Write(buf, _buf);
            }
            ulong tagSeq = _m.ReadUInt64(_s + HNextTag);
            ulong tag = (tagSeq << 8) | (uint)slot;
            // Slot first, then submit: a completion can only ever find a fully described slot.
            _m.WriteUInt32(sa + 4, gen);
            _m.WriteUInt64(sa + 8, block);
            _m.WriteUInt64(sa + 16, tag);
            _m.WriteUInt32(sa, write ? OpWrite : OpRead);
            int devPerBs = _bs / _dev.BlockSize;
            if (!_dev.TrySubmit(tag, write, (_first + block) * (ulong)devPerBs, devPerBs, buf))
            {
                _m.WriteUInt32(sa, OpFree);
                return any;
            }
            _m.WriteUInt64(_s + HNextTag, tagSeq + 1);
            _m.WriteUInt32(_s + HInFlight, (uint)(InFlight + 1));
            Add(HIssued, (ulong)_bs);
            any = true;
        }
        return any;
    }

    private int FreeSlot()
    {
        for (int i = 0; i < _depth; i++)
        {
            if (_m.ReadUInt32(_slots + (ulong)(i * SlotSize)) == OpFree)
            {
                return i;
            }
        }
        return -1;
    }

    private bool Busy(ulong block)
    {
        for (int i = 0; i < _depth; i++)
        {
            ulong sa = _slots + (ulong)(i * SlotSize);
            if (_m.ReadUInt32(sa) != OpFree && _m.ReadUInt64(sa + 8) == block)
            {
                return true;
            }
        }
        return false;
    }

    private bool PickBlock(out ulong block, out bool write)
    {
        write = _pattern switch
        {
            FioPattern.Write or FioPattern.RandWrite => true,
            FioPattern.RandRw => (int)(NextRandom() % 100) >= _mix,
            _ => false,
        };
        bool random = _pattern is FioPattern.RandRead or FioPattern.RandWrite or FioPattern.RandRw;
        // Never two commands on one block at once: the ledger's order of acknowledgement must be the device's.
        for (int attempt = 0; attempt < 16; attempt++)
        {
            if (random)
            {
                block = NextRandom() % _blocks;
            }
            else
            {
                block = _m.ReadUInt64(_s + HCursor);
                _m.WriteUInt64(_s + HCursor, (block + 1) % _blocks);
            }
            if (!Busy(block))
            {
                return true;
            }
        }
        block = 0;
        return false;
    }

    private ulong NextRandom()
    {
        ulong x = _m.ReadUInt64(_s + HRng);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        _m.WriteUInt64(_s + HRng, x);
        return x;
    }

    private void Add(int offset, ulong v) => _m.WriteUInt64(_s + (ulong)offset, _m.ReadUInt64(_s + (ulong)offset) + v);

    private void ReadSync(ulong block, Stopwatch sw, int timeoutMs)
    {
        ulong tag = ulong.MaxValue - block;
        int devPerBs = _bs / _dev.BlockSize;
        while (!_dev.TrySubmit(tag, false, (_first + block) * (ulong)devPerBs, devPerBs, _buffers))
        {
            Thread.Sleep(1);
        }
        while (true)
        {
            int n = _dev.Poll(_completions);
            for (int i = 0; i < n; i++)
            {
                if (_completions[i].Tag == tag)
                {
                    return;
                }
            }
            if (sw.ElapsedMilliseconds > timeoutMs)
            {
                throw new TimeoutException($"verify read of block {block} did not complete");
            }
            if (n == 0)
            {
                Thread.Yield();
            }
        }
    }

    private bool IsIntactOlder(ulong block, uint ledgerGen)
    {
        if (BinaryPrimitives.ReadUInt32LittleEndian(_buf) != BlockMagic || BinaryPrimitives.ReadUInt64LittleEndian(_buf.AsSpan(8)) != _first + block)
        {
            return false;
        }
        uint gen = BinaryPrimitives.ReadUInt32LittleEndian(_buf.AsSpan(4));
        if (gen == 0 || gen >= ledgerGen)
        {
            return false;
        }
        var expect = new byte[_bs];
        Fill(expect, _first + block, gen);
        return expect.AsSpan().SequenceEqual(_buf);
    }

    private static void Fill(Span<byte> b, ulong absBlock, uint gen)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(b, BlockMagic);
        BinaryPrimitives.WriteUInt32LittleEndian(b[4..], gen);
        BinaryPrimitives.WriteUInt64LittleEndian(b[8..], absBlock);
        ulong x = (absBlock * 0x9E3779B97F4A7C15) ^ (gen * 0xD1B54A32D192ED03UL) ^ 0x5DEECE66D;
        for (int i = 16; i + 8 <= b.Length; i += 8)
        {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            BinaryPrimitives.WriteUInt64LittleEndian(b[i..], x);
        }
    }

    private sealed class NoDevice : IGuestBlockDevice
    {
        public static readonly NoDevice Instance = new();
        public int BlockSize => 512;
        public ulong BlockCount => 0;
        public bool TrySubmit(ulong tag, bool write, ulong lba, int blocks, ulong bufferGpa) => false;
        public int Poll(Span<BlockCompletion> completions) => 0;
    }

    private sealed class FioFactory : IGuestProgramFactory
    {
        public string Kind => "fio";

        public IGuestProgram Start(GuestEnvironment environment, string arguments, Span<byte> registers)
        {
            ArgumentNullException.ThrowIfNull(environment);
            ArgumentNullException.ThrowIfNull(arguments);
            int nl = arguments.IndexOf('\n', StringComparison.Ordinal);
            if (nl < 0)
            {
                throw new FormatException("fio arguments: first line 'device=NAME,gpa=ADDR[,job=I][,clone=K]', then the job file");
            }
            var kv = SizeParser.ParseKeyValues(arguments[..nl]);
            var jobs = FioJobParser.Parse(arguments[(nl + 1)..]);
            string device = kv.GetValueOrDefault("device") ?? throw new FormatException("fio arguments: device= is required");
            ulong gpa = SizeParser.Parse(kv.GetValueOrDefault("gpa"), "gpa");
            int jobIndex = kv.TryGetValue("job", out string? j) ? (int)SizeParser.Parse(j, "job") : 0;
            if (jobIndex >= jobs.Count)
            {
                throw new FormatException($"fio arguments: job {jobIndex} but the file has {jobs.Count}");
            }
            var job = jobs[jobIndex];
            ulong clone = kv.TryGetValue("clone", out string? c) ? SizeParser.Parse(c, "clone") : 0;
            if (clone >= (ulong)job.NumJobs)
            {
                throw new FormatException($"fio arguments: clone {clone} but numjobs={job.NumJobs}");
            }
            byte[] name = Encoding.UTF8.GetBytes(device);
            if (name.Length > DeviceNameMax)
            {
                throw new FormatException("fio arguments: device name too long");
            }
            var dev = environment.GetService<IGuestBlockDevice>(device);
            if (job.BlockSize % dev.BlockSize != 0 || (clone + 1) * job.Blocks * (ulong)(job.BlockSize / dev.BlockSize) > dev.BlockCount)
            {
                throw new FormatException($"job {job.Name}: bs {job.BlockSize} / size {job.Size} × clone {clone + 1} do not fit device {device} ({dev.BlockCount} × {dev.BlockSize} B)");
            }
            var mem = environment.Memory;
            ulong size = StateSize(job);
            if (gpa % 4096 != 0 || gpa > mem.Size || size > mem.Size - gpa)
            {
                throw new FormatException($"fio state [{gpa:#x}, +{size}) must be page aligned and inside RAM");
            }
            mem.Write(gpa, new byte[size]);
            mem.WriteUInt64(gpa, Magic);
            mem.WriteUInt32(gpa + 8, 1);
            mem.WriteUInt32(gpa + HPattern, (uint)job.Rw);
            mem.WriteUInt32(gpa + HBs, (uint)job.BlockSize);
            mem.WriteUInt32(gpa + HDepth, (uint)job.IoDepth);
            mem.WriteUInt64(gpa + HFirst, clone * job.Blocks);
            mem.WriteUInt64(gpa + HBlocks, job.Blocks);
            mem.WriteUInt64(gpa + HRuntime, (ulong)job.RuntimeMs);
            mem.WriteUInt64(gpa + HIoSize, job.IoSize != 0 ? job.IoSize : job.Size);
            mem.WriteUInt32(gpa + HFlags, (job.Verify ? 1u : 0) | (job.TimeBased ? 2u : 0));
            mem.WriteUInt32(gpa + HMix, (uint)job.RwMixRead);
            mem.WriteUInt64(gpa + HRng, 0x2545F4914F6CDD1DUL ^ (clone + 1) * 0x9E3779B97F4A7C15UL);
            mem.Write(gpa + HDevice, name);
            BinaryPrimitives.WriteUInt32LittleEndian(registers, RegisterMagic);
            BinaryPrimitives.WriteUInt32LittleEndian(registers[4..], 1);
            BinaryPrimitives.WriteUInt64LittleEndian(registers[8..], gpa);
            return new FioWorkload(mem, dev, gpa);
        }

        public IGuestProgram Resume(GuestEnvironment environment, ReadOnlySpan<byte> registers)
        {
            ArgumentNullException.ThrowIfNull(environment);
            ulong gpa = StateGpa(registers);
            return Attach(environment.Memory, environment.GetService<IGuestBlockDevice>(DeviceName(environment.Memory, gpa)), gpa);
        }
    }
}
