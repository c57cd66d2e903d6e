using System.Buffers.Binary;
using System.Diagnostics;
using Vmig.Spec.Accelerator;
using Vmig.Spec.Pci;

namespace Vmig.Guest.Accelerator;

/// <summary>
/// The guest's driver for an accelerator VF. Everything it needs to go on lives in guest memory — a control block
/// (magic, ring address and size, producer index, interrupt vector) followed by the job ring — so after a migration
/// the driver on the target is rebuilt from RAM with <see cref="Attach"/> and finds its jobs where it left them.
/// </summary>
/// <remarks>
/// Guest memory layout at the control block address (4 KiB aligned): u32 magic "ADRV", u32 ring entries,
/// u64 ring address, u32 producer index (next free slot), u32 next job id, u32 MSI-X vector, u32 0; the ring
/// (entries × 64 bytes) starts at control block + 4 KiB. Not thread-safe: one submitting thread.
/// </remarks>
public sealed class AcceleratorDriver
{
    /// <summary>Bytes of guest memory the driver uses for a ring of <paramref name="entries"/>.</summary>
    public static ulong FootprintBytes(uint entries) => ControlBlockSize + (ulong)entries * AcceleratorJob.Size;

    private const uint Magic = 0x5652_4441; // "ADRV"
    private const ulong ControlBlockSize = 4096;
    private const int OffRingEntries = 4;
    private const int OffRingBase = 8;
    private const int OffProducer = 16;
    private const int OffNextJobId = 20;
    private const int OffVector = 24;

    private readonly IGuestMemory _memory;
    private readonly IGuestPciFunction _function;
    private readonly ulong _block;

    private AcceleratorDriver(IGuestMemory memory, IGuestPciFunction function, ulong block)
    {
        _memory = memory;
        _function = function;
        _block = block;
        RingEntries = memory.ReadUInt32(block + OffRingEntries);
        RingBase = memory.ReadUInt64(block + OffRingBase);
        Vector = (int)memory.ReadUInt32(block + OffVector);
        DeviceMemorySize = ReadRegister(AcceleratorRegister.DeviceMemorySizeLow) | ((ulong)ReadRegister(AcceleratorRegister.DeviceMemorySizeHigh) << 32);
    }

    /// <summary>Ring entries.</summary>
    public uint RingEntries { get; }

    /// <summary>Guest address of the ring.</summary>
    public ulong RingBase { get; }

    /// <summary>The MSI-X vector completions interrupt on.</summary>
    public int Vector { get; }

    /// <summary>Bytes of on-device memory the VF has.</summary>
    public ulong DeviceMemorySize { get; }

    /// <summary>
    /// Brings the VF up: enables memory space, bus mastering and MSI-X (vector 0 unmasked), lays out the control block
    /// and a ring of <paramref name="ringEntries"/> at <paramref name="controlBlockGpa"/>, programs and enables the ring.
    /// Throws <see cref="InvalidOperationException"/> if the function is not an accelerator VF or refuses the ring.
    /// </summary>
    public static AcceleratorDriver Initialize(IGuestMemory memory, IGuestPciFunction function, ulong controlBlockGpa, uint ringEntries)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(function);
        if ((controlBlockGpa & (ControlBlockSize - 1)) != 0 || controlBlockGpa > memory.Size || FootprintBytes(ringEntries) > memory.Size - controlBlockGpa)
        {
            throw new ArgumentOutOfRangeException(nameof(controlBlockGpa), "the control block must be 4 KiB aligned and the ring must fit in guest memory");
        }
        Span<byte> b4 = stackalloc byte[4];
        function.ReadConfig(PciConfig.VendorId, b4);
        if (BinaryPrimitives.ReadUInt16LittleEndian(b4) != AcceleratorIds.VendorId || BinaryPrimitives.ReadUInt16LittleEndian(b4[2..]) != AcceleratorIds.VfDeviceId)
        {
            throw new InvalidOperationException($"function 0x{BinaryPrimitives.ReadUInt32LittleEndian(b4):X8} is not an accelerator VF");
        }
        EnableFunction(function);
        const int vector = 0;

        ulong ring = controlBlockGpa + ControlBlockSize;
        memory.Write(controlBlockGpa, new byte[ControlBlockSize]);
        var zero = new byte[AcceleratorJob.Size];
        for (uint i = 0; i < ringEntries; i++)
        {
            memory.Write(ring + (ulong)i * AcceleratorJob.Size, zero);
        }
        memory.WriteUInt32(controlBlockGpa + OffRingEntries, ringEntries);
        memory.WriteUInt64(controlBlockGpa + OffRingBase, ring);
        memory.WriteUInt32(controlBlockGpa + OffVector, vector);
        memory.WriteUInt32(controlBlockGpa, Magic);

        var d = new AcceleratorDriver(memory, function, controlBlockGpa);
        if (d.ReadRegister(AcceleratorRegister.Id) != AcceleratorRegister.IdValue)
        {
            throw new InvalidOperationException("accelerator Id register mismatch");
        }
        d.WriteRegister(AcceleratorRegister.Control, 0);
        d.WriteRegister(AcceleratorRegister.RingBaseLow, (uint)ring);
        d.WriteRegister(AcceleratorRegister.RingBaseHigh, (uint)(ring >> 32));
        d.WriteRegister(AcceleratorRegister.RingSize, ringEntries);
        d.WriteRegister(AcceleratorRegister.InterruptControl, AcceleratorRegister.InterruptEnable | (vector << 8));
        d.WriteRegister(AcceleratorRegister.Control, AcceleratorRegister.ControlEnable);
        uint status = d.ReadRegister(AcceleratorRegister.Status);
        if ((status & AcceleratorRegister.StatusEnabled) == 0)
        {
            throw new InvalidOperationException($"the accelerator refused the ring (status 0x{status:X})");
        }
        return d;
    }

    /// <summary>
    /// Re-attaches to a running VF from the driver state in guest memory (after a migration or a driver reload).
    /// Throws <see cref="InvalidOperationException"/> if there is no driver state there or the device's ring differs.
    /// </summary>
    public static AcceleratorDriver Attach(IGuestMemory memory, IGuestPciFunction function, ulong controlBlockGpa)
    {
        ArgumentNullException.ThrowIfNull(memory);
        ArgumentNullException.ThrowIfNull(function);
        if (controlBlockGpa > memory.Size - ControlBlockSize || memory.ReadUInt32(controlBlockGpa) != Magic)
        {
            throw new InvalidOperationException($"no accelerator driver state at 0x{controlBlockGpa:X}");
        }
        var d = new AcceleratorDriver(memory, function, controlBlockGpa);
        ulong deviceRing = d.ReadRegister(AcceleratorRegister.RingBaseLow) | ((ulong)d.ReadRegister(AcceleratorRegister.RingBaseHigh) << 32);
        if (deviceRing != d.RingBase || d.ReadRegister(AcceleratorRegister.RingSize) != d.RingEntries
            || (d.ReadRegister(AcceleratorRegister.Status) & AcceleratorRegister.StatusEnabled) == 0)
        {
            throw new InvalidOperationException("the device's ring does not match the driver state in guest memory");
        }
        return d;
    }

    /// <summary>
    /// Queues <paramref name="job"/> (its JobId is replaced by the driver's next id; completion interrupts on) and rings
    /// the doorbell. Returns the ring slot. Throws <see cref="InvalidOperationException"/> when the ring is full.
    /// </summary>
    public uint Submit(AcceleratorJob job)
    {
        uint producer = _memory.ReadUInt32(_block + OffProducer);
        uint next = (producer + 1) % RingEntries;
        if (next == ReadRegister(AcceleratorRegister.RingHead))
        {
            throw new InvalidOperationException("accelerator ring is full");
        }
        uint id = _memory.ReadUInt32(_block + OffNextJobId);
        var bytes = new byte[AcceleratorJob.Size];
        (job with { JobId = id, Flags = job.Flags | AcceleratorJobFlags.Interrupt }).WriteTo(bytes);
        _memory.Write(SlotAddress(producer), bytes);
        _memory.WriteUInt32(_block + OffNextJobId, id + 1);
        _memory.WriteUInt32(_block + OffProducer, next);
        WriteRegister(AcceleratorRegister.RingTail, next);
        return producer;
    }

    /// <summary>The completion in <paramref name="slot"/>, if the device has written it.</summary>
    public bool TryGetCompletion(uint slot, out AcceleratorCompletion completion)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(slot, RingEntries);
        ulong entry = SlotAddress(slot);
        if (_memory.ReadUInt32(entry + AcceleratorJob.StatusOffset) == 0)
        {
            completion = default;
            return false;
        }
        var bytes = new byte[AcceleratorJob.Size];
        _memory.Read(entry, bytes);
        return AcceleratorCompletion.TryRead(bytes, out completion);
    }

    /// <summary>The job id written in <paramref name="slot"/>.</summary>
    public uint JobIdAt(uint slot) => _memory.ReadUInt32(SlotAddress(slot) + 4);

    /// <summary>Waits (interrupt, then a re-check) for <paramref name="slot"/>'s completion. Throws <see cref="TimeoutException"/>.</summary>
    public AcceleratorCompletion Wait(uint slot, int timeoutMs = 10_000)
    {
        var sw = Stopwatch.StartNew();
        while (true)
        {
            if (TryGetCompletion(slot, out var c))
            {
                return c;
            }
            long left = timeoutMs - sw.ElapsedMilliseconds;
            if (left <= 0)
            {
                throw new TimeoutException($"accelerator job in slot {slot} did not complete within {timeoutMs} ms");
            }
            if (_function.WaitInterrupt(Vector, (int)Math.Min(left, 20)))
            {
                WriteRegister(AcceleratorRegister.InterruptStatus, AcceleratorRegister.InterruptJobsCompleted | AcceleratorRegister.InterruptJobError);
            }
        }
    }

    /// <summary>Submits and waits.</summary>
    public AcceleratorCompletion Run(AcceleratorJob job, int timeoutMs = 10_000) => Wait(Submit(job), timeoutMs);

    /// <summary>
    /// Reads InterruptStatus and clears the causes it saw (write-1-to-clear), as an interrupt handler does. Returns the
    /// cleared cause bits (<see cref="AcceleratorRegister.InterruptJobsCompleted"/>, <see cref="AcceleratorRegister.InterruptJobError"/>).
    /// </summary>
    public uint AcknowledgeInterrupts()
    {
        uint causes = ReadRegister(AcceleratorRegister.InterruptStatus);
        if (causes != 0)
        {
            WriteRegister(AcceleratorRegister.InterruptStatus, causes);
        }
        return causes;
    }

    /// <summary>Reads a VF register.</summary>
    public uint ReadRegister(int offset)
    {
        Span<byte> b = stackalloc byte[4];
        _function.MmioRead(AcceleratorIds.VfRegisterBar, (ulong)offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void WriteRegister(int offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _function.MmioWrite(AcceleratorIds.VfRegisterBar, (ulong)offset, b);
    }

    private ulong SlotAddress(uint slot) => RingBase + (ulong)slot * AcceleratorJob.Size;

    /// <summary>Command MSE|BME, MSI-X enabled and unmasked (function and every vector), as a PCI core does.</summary>
    private static void EnableFunction(IGuestPciFunction function)
    {
        Span<byte> b = stackalloc byte[4];
        function.ReadConfig(PciConfig.Command, b[..2]);
        ushort cmd = (ushort)(BinaryPrimitives.ReadUInt16LittleEndian(b) | PciConfig.CommandMemorySpace | PciConfig.CommandBusMaster);
        BinaryPrimitives.WriteUInt16LittleEndian(b, cmd);
        function.WriteConfig(PciConfig.Command, b[..2]);

        int msix = FindCapability(function, PciCapabilityId.MsiX);
        if (msix == 0)
        {
            throw new InvalidOperationException("accelerator VF has no MSI-X capability");
        }
        function.ReadConfig(msix + PciMsix.MessageControl, b[..2]);
        int vectors = (BinaryPrimitives.ReadUInt16LittleEndian(b) & PciMsix.ControlTableSizeMask) + 1;
        function.ReadConfig(msix + PciMsix.TableOffsetBir, b);
        uint tableOffsetBir = BinaryPrimitives.ReadUInt32LittleEndian(b);
        int tableBar = (int)(tableOffsetBir & 7);
        ulong tableOffset = tableOffsetBir & ~7u;
        BinaryPrimitives.WriteUInt16LittleEndian(b, PciMsix.ControlEnable);
        function.WriteConfig(msix + PciMsix.MessageControl, b[..2]);
        BinaryPrimitives.WriteUInt32LittleEndian(b, 0);
        for (int v = 0; v < vectors; v++)
        {
            function.MmioWrite(tableBar, tableOffset + (ulong)(v * PciMsix.EntrySize + PciMsix.EntryVectorControl), b);
        }
    }

    /// <summary>Walks the capability list; returns the offset of <paramref name="id"/> or 0.</summary>
    private static int FindCapability(IGuestPciFunction function, byte id)
    {
        Span<byte> b = stackalloc byte[2];
        function.ReadConfig(PciConfig.CapabilitiesPointer, b[..1]);
        int at = b[0] & 0xFC;
        for (int guard = 0; at != 0 && guard < 48; guard++)
        {
            function.ReadConfig(at, b);
            if (b[0] == id)
            {
                return at;
            }
            at = b[1] & 0xFC;
        }
        return 0;
    }
}
