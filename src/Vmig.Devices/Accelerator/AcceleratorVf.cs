using Vmig.Spec;
using System.Buffers.Binary;
using System.Runtime.InteropServices;
using Vmig.Devices.Pci;
using Vmig.Migration;
using Vmig.Spec.Accelerator;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Accelerator;

/// <summary>How far a VF is suspended (the mlx5 SUSPEND/RESUME_VHCA op_mod split).</summary>
public enum AcceleratorSuspendScope
{
    /// <summary>Stop initiating: fetch no new descriptors, finish (and interrupt for) those already fetched. RUNNING_P2P.</summary>
    Initiator = 1,
    /// <summary>Stop completely (after <see cref="Initiator"/>). STOP.</summary>
    Responder = 2,
}

/// <summary>
/// Hidden migration registers in VF BAR0 beyond the guest-visible part (the HiSilicon shape): only the PF driver in
/// the device host reaches them, through <see cref="AcceleratorVf.WriteHiddenRegister"/>.
/// </summary>
public static class AcceleratorMigrationRegister
{
    /// <summary>WO: a <see cref="AcceleratorMigrationCommand"/>; returns when the command has taken effect (suspend drains).</summary>
    public const int Command = 0x1000;
    /// <summary>RO: <see cref="StatusQuiesced"/> | <see cref="StatusStopped"/> | <see cref="StatusTracking"/> | <see cref="StatusBusy"/>.</summary>
    public const int Status = 0x1004;
    /// <summary>RO: dirty device-memory pages (4 KiB) logged since tracking started.</summary>
    public const int DirtyPages = 0x1008;

    public const uint StatusQuiesced = 1 << 0;
    public const uint StatusStopped = 1 << 1;
    public const uint StatusTracking = 1 << 2;
    public const uint StatusBusy = 1 << 3;
}

/// <summary>Commands written to <see cref="AcceleratorMigrationRegister.Command"/>.</summary>
public enum AcceleratorMigrationCommand : uint
{
    SuspendInitiator = 1,
    SuspendResponder = 2,
    ResumeResponder = 3,
    ResumeInitiator = 4,
    StartTracking = 5,
    StopTracking = 6,
}

/// <summary>
/// An accelerator VF (controlled function): register BAR0 (guest part + hidden migration part), MSI-X in BAR2,
/// on-device memory (memfd, sized by the PF's profile), and a job engine thread that fetches descriptors from the
/// guest's ring by DMA and completes them in place. Created and owned by <see cref="AcceleratorPf"/>; its
/// <see cref="Migration"/> driver works only through the PF's commands.
/// </summary>
public sealed class AcceleratorVf : PciFunction, IDisposable
{
    /// <summary>Descriptors fetched at once; a quiesce waits for at most this many jobs.</summary>
    public const int FetchBatch = 8;

    /// <summary>Largest piece of device memory one DMA or CRC step handles.</summary>
    private const int ChunkSize = 1 << 20;

    private readonly object _gate = new();
    private readonly Thread _worker;
    private readonly AcceleratorVfMigration _migration;
    private AcceleratorVfRegisters _regs;
    private AcceleratorSuspendScope? _suspended;
    private bool _busy;
    private bool _shutdown;

    internal AcceleratorVf(AcceleratorPf pf, int index, AcceleratorProfile profile)
        : base(BuildDeclaration())
    {
        profile.Validate();
        Index = index;
        Profile = profile;
        Memory = new DeviceMemory($"accel-vf{index}", (long)profile.DeviceMemorySize);
        _migration = new AcceleratorVfMigration(pf, index);
        _worker = new Thread(WorkerLoop) { IsBackground = true, Name = $"accel-vf{index}" };
        _worker.Start();
    }

    /// <summary>VF index under the PF (0-based).</summary>
    public int Index { get; }

    /// <summary>The profile the PF created this VF with.</summary>
    public AcceleratorProfile Profile { get; }

    /// <summary>On-device memory (device host only).</summary>
    public DeviceMemory Memory { get; }

    public override IMigrationDevice Migration => _migration;

    /// <summary>Register snapshot (for tests and the PF).</summary>
    public AcceleratorVfRegisters Registers
    {
        get
        {
            lock (_gate)
            {
                return _regs;
            }
        }
    }

    /// <summary>The guest sees only the first 4 KiB of BAR0; the migration registers above it are the PF's.</summary>
    protected override RegionDescriptor DescribeBarRegion(int bar, PciBar declared)
    {
        ArgumentNullException.ThrowIfNull(declared);
        return bar == AcceleratorIds.VfRegisterBar
            ? new RegionDescriptor(AcceleratorIds.VfRegisterVisibleSize, RegionFlags.Read | RegionFlags.Write)
            : base.DescribeBarRegion(bar, declared);
    }

    protected override int ReadBar(int bar, ulong offset, Span<byte> data)
    {
        if (bar != AcceleratorIds.VfRegisterBar || offset >= AcceleratorIds.VfRegisterVisibleSize || !IsDwordAccess(offset, data.Length))
        {
            return Errno.EINVAL;
        }
        for (int i = 0; i < data.Length; i += 4)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(data[i..], ReadRegister((int)offset + i));
        }
        return 0;
    }

    protected override int WriteBar(int bar, ulong offset, ReadOnlySpan<byte> data)
    {
        if (bar != AcceleratorIds.VfRegisterBar || offset >= AcceleratorIds.VfRegisterVisibleSize || !IsDwordAccess(offset, data.Length))
        {
            return Errno.EINVAL;
        }
        for (int i = 0; i < data.Length; i += 4)
        {
            WriteRegister((int)offset + i, BinaryPrimitives.ReadUInt32LittleEndian(data[i..]));
        }
        return 0;
    }

    /// <summary>Reads a hidden migration register (device-host path; the guest's region ends before these).</summary>
    public uint ReadHiddenRegister(int offset)
    {
        lock (_gate)
        {
            return offset switch
            {
                AcceleratorMigrationRegister.Status =>
                    (_suspended is not null ? AcceleratorMigrationRegister.StatusQuiesced : 0)
                    | (_suspended == AcceleratorSuspendScope.Responder ? AcceleratorMigrationRegister.StatusStopped : 0)
                    | (Memory.IsTracking ? AcceleratorMigrationRegister.StatusTracking : 0)
                    | (_busy ? AcceleratorMigrationRegister.StatusBusy : 0),
                AcceleratorMigrationRegister.DirtyPages => (uint)Math.Min(Memory.DirtyPageCount(), uint.MaxValue),
                _ => 0,
            };
        }
    }

    /// <summary>
    /// Writes a hidden migration register. A suspend command returns once fetched descriptors are finished (their
    /// completions and interrupts delivered), so after it the VF issues no DMA and no interrupts.
    /// Throws <see cref="ArgumentException"/> for an unknown register or command.
    /// </summary>
    public void WriteHiddenRegister(int offset, uint value)
    {
        if (offset != AcceleratorMigrationRegister.Command)
        {
            throw new ArgumentException($"hidden register 0x{offset:X} is not writable", nameof(offset));
        }
        lock (_gate)
        {
            switch ((AcceleratorMigrationCommand)value)
            {
                case AcceleratorMigrationCommand.SuspendInitiator:
                    _suspended ??= AcceleratorSuspendScope.Initiator;
                    break;
                case AcceleratorMigrationCommand.SuspendResponder:
                    _suspended = AcceleratorSuspendScope.Responder;
                    break;
                case AcceleratorMigrationCommand.ResumeResponder:
                    if (_suspended == AcceleratorSuspendScope.Responder)
                    {
                        _suspended = AcceleratorSuspendScope.Initiator;
                    }
                    break;
                case AcceleratorMigrationCommand.ResumeInitiator:
                    _suspended = null;
                    break;
                case AcceleratorMigrationCommand.StartTracking:
                    Memory.StartTracking();
                    break;
                case AcceleratorMigrationCommand.StopTracking:
                    Memory.StopTracking();
                    break;
                default:
                    throw new ArgumentException($"unknown migration command {value}", nameof(value));
            }
            while (_suspended is not null && _busy)
            {
                Monitor.Wait(_gate);
            }
            Monitor.PulseAll(_gate);
        }
    }

    /// <summary>Captures the registers; the VF must be suspended (no batch in flight).</summary>
    internal AcceleratorVfRegisters CaptureRegisters()
    {
        lock (_gate)
        {
            if (_suspended is null || _busy)
            {
                throw new InvalidOperationException("registers are captured only from a suspended VF");
            }
            return _regs;
        }
    }

    /// <summary>Installs migrated registers (RESUMING → STOP). Throws <see cref="InvalidDataException"/> if inconsistent with this VF's profile.</summary>
    internal void RestoreRegisters(AcceleratorVfRegisters regs)
    {
        if ((regs.Control & AcceleratorRegister.ControlEnable) != 0 && !RingConfigValid(regs.RingBase, regs.RingSize))
        {
            throw new InvalidDataException($"migrated ring (base 0x{regs.RingBase:X}, {regs.RingSize} entries) is invalid for this VF");
        }
        if (regs.RingSize != 0 && (regs.Head >= regs.RingSize || regs.Tail >= regs.RingSize))
        {
            throw new InvalidDataException($"migrated head {regs.Head} / tail {regs.Tail} lie outside a ring of {regs.RingSize}");
        }
        lock (_gate)
        {
            _regs = regs;
            Monitor.PulseAll(_gate);
        }
    }

    /// <summary>Puts the registers back to power-on (RESUMING entry, FLR).</summary>
    internal void ClearRegisters()
    {
        lock (_gate)
        {
            while (_busy)
            {
                Monitor.Wait(_gate);
            }
            _regs = default;
        }
    }

    protected override void OnFunctionReset()
    {
        ClearRegisters();
    }

    public override void OnAttached(DeviceContext context)
    {
        base.OnAttached(context);
        lock (_gate)
        {
            Monitor.PulseAll(_gate);
        }
    }

    public override void OnDetached()
    {
        lock (_gate)
        {
            // The client's DMA windows are gone: let an in-flight batch fail its DMA and finish before we return.
            while (_busy)
            {
                Monitor.Wait(_gate);
            }
            base.OnDetached();
        }
    }

    public void Dispose()
    {
        lock (_gate)
        {
            _shutdown = true;
            Monitor.PulseAll(_gate);
        }
        _worker.Join();
        Memory.Dispose();
    }

    private static PciFunctionDeclaration BuildDeclaration() => new()
    {
        VendorId = AcceleratorIds.VendorId,
        DeviceId = AcceleratorIds.VfDeviceId,
        SubsystemVendorId = AcceleratorIds.VendorId,
        SubsystemId = AcceleratorIds.VfDeviceId,
        ClassCode = AcceleratorIds.ClassCode,
        Bars = VfBars,
        Msix = new PciMsixLayout(AcceleratorIds.VfMsixVectors, AcceleratorIds.VfMsixBar, AcceleratorIds.VfMsixTableOffset,
            AcceleratorIds.VfMsixBar, AcceleratorIds.VfMsixPbaOffset),
    };

    /// <summary>The VF BARs, also declared in the PF's SR-IOV capability.</summary>
    internal static IReadOnlyList<PciBar?> VfBars { get; } =
        [new PciBar(AcceleratorIds.VfRegisterBarSize), null, new PciBar(AcceleratorIds.VfMsixBarSize)];

    private static bool IsDwordAccess(ulong offset, int length) => (offset & 3) == 0 && length is 4 or 8;

    private bool RingConfigValid(ulong ringBase, uint ringSize) =>
        ringSize >= 2 && ringSize <= Profile.MaxRingEntries && (ringSize & (ringSize - 1)) == 0
        && ringBase % AcceleratorRegister.RingAlignment == 0 && ringBase <= ulong.MaxValue - (ulong)ringSize * AcceleratorJob.Size;

    private uint ReadRegister(int offset)
    {
        lock (_gate)
        {
            var r = _regs;
            return offset switch
            {
                AcceleratorRegister.Id => AcceleratorRegister.IdValue,
                AcceleratorRegister.Version => AcceleratorRegister.VersionValue,
                AcceleratorRegister.DeviceMemorySizeLow => (uint)Profile.DeviceMemorySize,
                AcceleratorRegister.DeviceMemorySizeHigh => (uint)(Profile.DeviceMemorySize >> 32),
                AcceleratorRegister.Control => r.Control,
                AcceleratorRegister.Status => r.Status,
                AcceleratorRegister.RingBaseLow => (uint)r.RingBase,
                AcceleratorRegister.RingBaseHigh => (uint)(r.RingBase >> 32),
                AcceleratorRegister.RingSize => r.RingSize,
                AcceleratorRegister.RingHead => r.Head,
                AcceleratorRegister.RingTail => r.Tail,
                AcceleratorRegister.InterruptControl => r.InterruptControl,
                AcceleratorRegister.InterruptStatus => r.InterruptStatus,
                AcceleratorRegister.CompletedJobs => r.CompletedJobs,
                AcceleratorRegister.FailedJobs => r.FailedJobs,
                AcceleratorRegister.MaxRingEntries => Profile.MaxRingEntries,
                _ => 0,
            };
        }
    }

    private void WriteRegister(int offset, uint value)
    {
        lock (_gate)
        {
            ref var r = ref _regs;
            bool enabled = (r.Control & AcceleratorRegister.ControlEnable) != 0;
            switch (offset)
            {
                case AcceleratorRegister.Control:
                    bool enable = (value & AcceleratorRegister.ControlEnable) != 0;
                    if (enable && !enabled)
                    {
                        r.Status &= ~(AcceleratorRegister.StatusRingFault | AcceleratorRegister.StatusConfigError | AcceleratorRegister.StatusDoorbellError);
                        if (!RingConfigValid(r.RingBase, r.RingSize))
                        {
                            r.Status |= AcceleratorRegister.StatusConfigError;
                            break;
                        }
                        r.Head = 0;
                        r.Tail = 0;
                        r.Control = AcceleratorRegister.ControlEnable;
                        r.Status |= AcceleratorRegister.StatusEnabled;
                    }
                    else if (!enable && enabled)
                    {
                        r.Control = 0;
                        r.Status &= ~(AcceleratorRegister.StatusEnabled | AcceleratorRegister.StatusRingFault);
                    }
                    break;
                case AcceleratorRegister.RingBaseLow when !enabled:
                    r.RingBase = (r.RingBase & 0xFFFF_FFFF_0000_0000) | value;
                    break;
                case AcceleratorRegister.RingBaseHigh when !enabled:
                    r.RingBase = (r.RingBase & 0xFFFF_FFFF) | ((ulong)value << 32);
                    break;
                case AcceleratorRegister.RingSize when !enabled:
                    r.RingSize = value;
                    break;
                case AcceleratorRegister.RingTail:
                    if (!enabled || value >= r.RingSize)
                    {
                        r.Status |= AcceleratorRegister.StatusDoorbellError;
                        break;
                    }
                    r.Tail = value;
                    Monitor.PulseAll(_gate);
                    break;
                case AcceleratorRegister.InterruptControl:
                    r.InterruptControl = value & 0xFF01;
                    break;
                case AcceleratorRegister.InterruptStatus:
                    r.InterruptStatus &= ~value;
                    break;
                default:
                    break; // read-only or reserved: ignored
            }
        }
    }

    private bool HasRingWorkLocked() =>
        _suspended is null && (_regs.Control & AcceleratorRegister.ControlEnable) != 0
        && (_regs.Status & AcceleratorRegister.StatusRingFault) == 0 && _regs.Head != _regs.Tail;

    private bool CanFetchLocked() => HasRingWorkLocked() && IsBusMasterEnabled && Context is not null;

    private void WorkerLoop()
    {
        var fetched = new byte[FetchBatch * AcceleratorJob.Size];
        while (true)
        {
            ulong ringBase;
            uint size, start, count;
            lock (_gate)
            {
                while (!_shutdown && !CanFetchLocked())
                {
                    // Every register, migration command and attach change pulses the gate. Bus Master Enable lives in
                    // config space, which does not, so only work held back by it is polled for.
                    if (HasRingWorkLocked())
                    {
                        Monitor.Wait(_gate, 20);
                    }
                    else
                    {
                        Monitor.Wait(_gate);
                    }
                }
                if (_shutdown)
                {
                    return;
                }
                ringBase = _regs.RingBase;
                size = _regs.RingSize;
                start = _regs.Head;
                uint pending = (_regs.Tail - start) & (size - 1);
                count = Math.Min(Math.Min(pending, FetchBatch), size - start);
                _busy = true;
            }
            try
            {
                RunBatch(ringBase, size, start, count, fetched);
            }
            finally
            {
                lock (_gate)
                {
                    _busy = false;
                    Monitor.PulseAll(_gate);
                }
            }
        }
    }

    private void RunBatch(ulong ringBase, uint size, uint start, uint count, byte[] fetched)
    {
        var dma = BusMasterDma;
        var batch = fetched.AsSpan(0, (int)count * AcceleratorJob.Size);
        if (!dma.TryRead(ringBase + (ulong)start * AcceleratorJob.Size, batch))
        {
            RingFault();
            return;
        }
        bool interrupt = false, error = false;
        Span<byte> completion = stackalloc byte[8];
        for (uint i = 0; i < count; i++)
        {
            AcceleratorJob.TryRead(batch[(int)(i * AcceleratorJob.Size)..], out var job);
            var (status, result) = Execute(job);
            uint sequence;
            lock (_gate)
            {
                sequence = _regs.CompletedJobs++;
                if (status != AcceleratorJobStatus.Success)
                {
                    _regs.FailedJobs++;
                }
            }
            ulong entry = ringBase + (ulong)(start + i) * AcceleratorJob.Size;
            BinaryPrimitives.WriteUInt32LittleEndian(completion, sequence);
            BinaryPrimitives.WriteUInt32LittleEndian(completion[4..], result);
            // Status is written last with release semantics: a driver that sees it non-zero sees the rest.
            if (!dma.TryWrite(entry + AcceleratorJob.SequenceOffset, completion)
                || !dma.TryWriteUInt32(entry + AcceleratorJob.StatusOffset, (uint)status))
            {
                RingFault();
                return;
            }
            lock (_gate)
            {
                _regs.Head = (_regs.Head + 1) & (size - 1);
            }
            interrupt |= (job.Flags & AcceleratorJobFlags.Interrupt) != 0;
            error |= status != AcceleratorJobStatus.Success;
        }
        if (interrupt || error)
        {
            RaiseInterrupt((interrupt ? AcceleratorRegister.InterruptJobsCompleted : 0) | (error ? AcceleratorRegister.InterruptJobError : 0));
        }
    }

    private void RingFault()
    {
        lock (_gate)
        {
            _regs.Status |= AcceleratorRegister.StatusRingFault;
        }
        RaiseInterrupt(AcceleratorRegister.InterruptJobError);
    }

    private void RaiseInterrupt(uint cause)
    {
        uint control;
        lock (_gate)
        {
            _regs.InterruptStatus |= cause;
            control = _regs.InterruptControl;
        }
        int vector = (int)((control >> 8) & 0xFF);
        if ((control & AcceleratorRegister.InterruptEnable) != 0 && vector < AcceleratorIds.VfMsixVectors)
        {
            SignalMsix(vector);
        }
    }

    /// <summary>Runs one job against device memory and guest memory. Never throws on guest-controlled values.</summary>
    private (AcceleratorJobStatus Status, uint Result) Execute(in AcceleratorJob job)
    {
        var dma = BusMasterDma;
        if (job.Opcode is < AcceleratorOpcode.CopyToDevice or > AcceleratorOpcode.Crc32C)
        {
            return (AcceleratorJobStatus.InvalidOpcode, 0);
        }
        if (job.Length == 0)
        {
            return (AcceleratorJobStatus.InvalidLength, 0);
        }
        if (!Memory.Contains(job.DeviceOffset, job.Length))
        {
            return (AcceleratorJobStatus.DeviceRangeError, 0);
        }
        if (job.Opcode is AcceleratorOpcode.CopyToDevice or AcceleratorOpcode.CopyFromDevice && job.GuestAddress > ulong.MaxValue - job.Length)
        {
            return (AcceleratorJobStatus.GuestAddressFault, 0);
        }
        long dev = (long)job.DeviceOffset;
        long length = (long)job.Length;
        uint crc = ~0u;
        for (long pos = 0; pos < length; pos += ChunkSize)
        {
            int n = (int)Math.Min(ChunkSize, length - pos);
            var span = Memory.GetSpan(dev + pos, n);
            switch (job.Opcode)
            {
                case AcceleratorOpcode.CopyToDevice:
                    if (!dma.TryRead(job.GuestAddress + (ulong)pos, span))
                    {
                        return (AcceleratorJobStatus.GuestAddressFault, 0);
                    }
                    Memory.MarkDirty(dev + pos, n);
                    break;
                case AcceleratorOpcode.CopyFromDevice:
                    if (!dma.TryWrite(job.GuestAddress + (ulong)pos, span))
                    {
                        return (AcceleratorJobStatus.GuestAddressFault, 0);
                    }
                    break;
                case AcceleratorOpcode.Fill:
                    // Chunks start at multiples of 8 from the job start, so the pattern phase is the same in each.
                    int words = n & ~7;
                    MemoryMarshal.Cast<byte, ulong>(span[..words]).Fill(BitConverter.IsLittleEndian ? job.Pattern : BinaryPrimitives.ReverseEndianness(job.Pattern));
                    for (int i = words; i < n; i++)
                    {
                        span[i] = (byte)(job.Pattern >> (8 * (i & 7)));
                    }
                    Memory.MarkDirty(dev + pos, n);
                    break;
                default:
                    crc = Crc32C.Append(crc, span);
                    break;
            }
        }
        if (job.Opcode == AcceleratorOpcode.Crc32C)
        {
            uint result = ~crc;
            return dma.TryWriteUInt32(job.GuestAddress, result) ? (AcceleratorJobStatus.Success, result) : (AcceleratorJobStatus.GuestAddressFault, result);
        }
        return (AcceleratorJobStatus.Success, 0);
    }
}

/// <summary>
/// The VF's register state as migrated. Wire layout (48 bytes, little-endian): u32 control, u32 status, u64 ring base,
/// u32 ring size, u32 head, u32 tail, u32 interrupt control, u32 interrupt status, u32 completed jobs, u32 failed jobs, u32 0.
/// </summary>
public record struct AcceleratorVfRegisters(
    uint Control,
    uint Status,
    ulong RingBase,
    uint RingSize,
    uint Head,
    uint Tail,
    uint InterruptControl,
    uint InterruptStatus,
    uint CompletedJobs,
    uint FailedJobs)
{
    public const int Size = 48;

    public static bool TryRead(ReadOnlySpan<byte> s, out AcceleratorVfRegisters r)
    {
        if (s.Length < Size)
        {
            r = default;
            return false;
        }
        r = new AcceleratorVfRegisters(
            BinaryPrimitives.ReadUInt32LittleEndian(s),
            BinaryPrimitives.ReadUInt32LittleEndian(s[4..]),
            BinaryPrimitives.ReadUInt64LittleEndian(s[8..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[16..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[20..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[24..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[28..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[32..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[36..]),
            BinaryPrimitives.ReadUInt32LittleEndian(s[40..]));
        return true;
    }

    public readonly void WriteTo(Span<byte> d)
    {
        d = d[..Size];
        d.Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(d, Control);
        BinaryPrimitives.WriteUInt32LittleEndian(d[4..], Status);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], RingBase);
        BinaryPrimitives.WriteUInt32LittleEndian(d[16..], RingSize);
        BinaryPrimitives.WriteUInt32LittleEndian(d[20..], Head);
        BinaryPrimitives.WriteUInt32LittleEndian(d[24..], Tail);
        BinaryPrimitives.WriteUInt32LittleEndian(d[28..], InterruptControl);
        BinaryPrimitives.WriteUInt32LittleEndian(d[32..], InterruptStatus);
        BinaryPrimitives.WriteUInt32LittleEndian(d[36..], CompletedJobs);
        BinaryPrimitives.WriteUInt32LittleEndian(d[40..], FailedJobs);
    }
}
