using System.Buffers.Binary;

namespace Vmig.Spec.Accelerator;

/// <summary>PCI identity and BAR layout of the vmig accelerator (PF = controlling function, VF = what a VM gets).</summary>
public static class AcceleratorIds
{
    /// <summary>Red Hat, Inc. (the vendor QEMU's emulated devices use).</summary>
    public const ushort VendorId = 0x1B36;
    public const ushort PfDeviceId = 0x0110;
    public const ushort VfDeviceId = 0x0111;
    /// <summary>Class 12h (processing accelerator), subclass 00h, interface 00h.</summary>
    public const uint ClassCode = 0x120000;

    /// <summary>VF BAR0: registers. The first <see cref="VfRegisterVisibleSize"/> bytes are the guest's; the rest holds the hidden migration registers.</summary>
    public const int VfRegisterBar = 0;
    public const ulong VfRegisterBarSize = 0x2000;
    public const ulong VfRegisterVisibleSize = 0x1000;
    /// <summary>VF BAR2: MSI-X table at 0, PBA at <see cref="VfMsixPbaOffset"/>.</summary>
    public const int VfMsixBar = 2;
    public const ulong VfMsixBarSize = 0x1000;
    public const uint VfMsixTableOffset = 0;
    public const uint VfMsixPbaOffset = 0x800;
    /// <summary>MSI-X vectors of a VF: 0 = job completion (the default the driver uses), 1 = spare.</summary>
    public const int VfMsixVectors = 2;
}

/// <summary>VF BAR0 registers (little-endian u32 unless said otherwise).</summary>
public static class AcceleratorRegister
{
    /// <summary>RO: <see cref="IdValue"/> ("ACC1").</summary>
    public const int Id = 0x000;
    /// <summary>RO: register interface version, major &lt;&lt; 16 | minor.</summary>
    public const int Version = 0x004;
    /// <summary>RO u64 (two dwords): bytes of on-device memory of this VF (fixed by the PF at VF creation).</summary>
    public const int DeviceMemorySizeLow = 0x008;
    public const int DeviceMemorySizeHigh = 0x00C;
    /// <summary>RW: <see cref="ControlEnable"/>. Enabling validates the ring and resets head and tail to 0.</summary>
    public const int Control = 0x010;
    /// <summary>RO: Status bits (<see cref="StatusEnabled"/> …).</summary>
    public const int Status = 0x014;
    /// <summary>RW while disabled: guest address of the job ring (64-byte aligned), u64 in two dwords.</summary>
    public const int RingBaseLow = 0x018;
    public const int RingBaseHigh = 0x01C;
    /// <summary>RW while disabled: ring entries (power of two, 2..<see cref="MaxRingEntries"/>).</summary>
    public const int RingSize = 0x020;
    /// <summary>RO: index of the next descriptor the device completes (it has completed everything before it).</summary>
    public const int RingHead = 0x024;
    /// <summary>RW, the doorbell: writing the new tail (index after the last submitted descriptor) starts the device.</summary>
    public const int RingTail = 0x028;
    /// <summary>RW: bit 0 enable the completion interrupt, bits 15:8 MSI-X vector.</summary>
    public const int InterruptControl = 0x02C;
    /// <summary>RW1C: <see cref="InterruptJobsCompleted"/>, <see cref="InterruptJobError"/>.</summary>
    public const int InterruptStatus = 0x030;
    /// <summary>RO: jobs completed since the VF was created (wraps at 2^32); also the next completion sequence number.</summary>
    public const int CompletedJobs = 0x034;
    /// <summary>RO: jobs completed with an error status.</summary>
    public const int FailedJobs = 0x038;
    /// <summary>RO: the largest ring this VF accepts (its profile).</summary>
    public const int MaxRingEntries = 0x03C;

    public const uint IdValue = 0x3143_4341; // "ACC1" little-endian
    public const uint VersionValue = 0x0001_0000;

    public const uint ControlEnable = 1;

    public const uint StatusEnabled = 1 << 0;
    /// <summary>A descriptor fetch or completion write failed; the ring stopped. Cleared by disabling.</summary>
    public const uint StatusRingFault = 1 << 1;
    /// <summary>Enable was refused (bad ring base or size).</summary>
    public const uint StatusConfigError = 1 << 2;
    /// <summary>A doorbell named a tail outside the ring; it was ignored.</summary>
    public const uint StatusDoorbellError = 1 << 3;

    public const uint InterruptEnable = 1;
    public const uint InterruptJobsCompleted = 1 << 0;
    public const uint InterruptJobError = 1 << 1;

    /// <summary>Alignment of the ring base.</summary>
    public const ulong RingAlignment = 64;
}

/// <summary>Job opcodes.</summary>
public enum AcceleratorOpcode : byte
{
    /// <summary>Copy Length bytes from guest memory at GuestAddress to device memory at DeviceOffset.</summary>
    CopyToDevice = 1,
    /// <summary>Copy Length bytes from device memory at DeviceOffset to guest memory at GuestAddress.</summary>
    CopyFromDevice = 2,
    /// <summary>Fill Length bytes of device memory at DeviceOffset with the 8-byte Pattern (little-endian, repeated from DeviceOffset).</summary>
    Fill = 3,
    /// <summary>CRC-32C of device memory [DeviceOffset, +Length), written as a u32 to GuestAddress (4-aligned) and to Result.</summary>
    Crc32C = 4,
}

/// <summary>Completion status written into the descriptor (0 = not completed yet).</summary>
public enum AcceleratorJobStatus : uint
{
    Pending = 0,
    Success = 1,
    InvalidOpcode = 2,
    /// <summary>A guest address was outside the DMA windows (or not writable / misaligned for the result).</summary>
    GuestAddressFault = 3,
    /// <summary>[DeviceOffset, +Length) is not inside the VF's device memory.</summary>
    DeviceRangeError = 4,
    /// <summary>Length is 0.</summary>
    InvalidLength = 5,
}

/// <summary>Descriptor flags.</summary>
[Flags]
public enum AcceleratorJobFlags : byte
{
    None = 0,
    /// <summary>Raise the completion interrupt after this job (if enabled in InterruptControl).</summary>
    Interrupt = 1,
}

/// <summary>
/// A 64-byte job descriptor in the guest's ring. Layout: u8 opcode, u8 flags, u16 0, u32 job id, u64 guest address,
/// u64 device offset, u64 length, u64 pattern, 8 reserved, then the completion the device writes in place:
/// u32 status (0x30, written last), u32 sequence (0x34), u32 result (0x38), u32 0.
/// </summary>
public readonly record struct AcceleratorJob(
    AcceleratorOpcode Opcode,
    AcceleratorJobFlags Flags,
    uint JobId,
    ulong GuestAddress,
    ulong DeviceOffset,
    ulong Length,
    ulong Pattern = 0)
{
    public const int Size = 64;
    public const int StatusOffset = 0x30;
    public const int SequenceOffset = 0x34;
    public const int ResultOffset = 0x38;

    /// <summary>Parses the submitted fields of a descriptor; false if <paramref name="source"/> is shorter than <see cref="Size"/>.</summary>
    public static bool TryRead(ReadOnlySpan<byte> source, out AcceleratorJob job)
    {
        if (source.Length < Size)
        {
            job = default;
            return false;
        }
        job = new AcceleratorJob(
            (AcceleratorOpcode)source[0],
            (AcceleratorJobFlags)source[1],
            BinaryPrimitives.ReadUInt32LittleEndian(source[4..]),
            BinaryPrimitives.ReadUInt64LittleEndian(source[8..]),
            BinaryPrimitives.ReadUInt64LittleEndian(source[16..]),
            BinaryPrimitives.ReadUInt64LittleEndian(source[24..]),
            BinaryPrimitives.ReadUInt64LittleEndian(source[32..]));
        return true;
    }

    /// <summary>Writes the descriptor with a zeroed completion (status Pending). <paramref name="destination"/> must hold <see cref="Size"/> bytes.</summary>
    public void WriteTo(Span<byte> destination)
    {
        destination = destination[..Size];
        destination.Clear();
        destination[0] = (byte)Opcode;
        destination[1] = (byte)Flags;
        BinaryPrimitives.WriteUInt32LittleEndian(destination[4..], JobId);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[8..], GuestAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[16..], DeviceOffset);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[24..], Length);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[32..], Pattern);
    }
}

/// <summary>The completion part of a descriptor.</summary>
public readonly record struct AcceleratorCompletion(AcceleratorJobStatus Status, uint Sequence, uint Result)
{
    /// <summary>Parses the completion from a whole 64-byte descriptor; false if too short.</summary>
    public static bool TryRead(ReadOnlySpan<byte> descriptor, out AcceleratorCompletion completion)
    {
        if (descriptor.Length < AcceleratorJob.Size)
        {
            completion = default;
            return false;
        }
        completion = new AcceleratorCompletion(
            (AcceleratorJobStatus)BinaryPrimitives.ReadUInt32LittleEndian(descriptor[AcceleratorJob.StatusOffset..]),
            BinaryPrimitives.ReadUInt32LittleEndian(descriptor[AcceleratorJob.SequenceOffset..]),
            BinaryPrimitives.ReadUInt32LittleEndian(descriptor[AcceleratorJob.ResultOffset..]));
        return true;
    }
}
