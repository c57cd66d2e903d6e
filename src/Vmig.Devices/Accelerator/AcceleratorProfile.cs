using System.Buffers.Binary;

namespace Vmig.Devices.Accelerator;

/// <summary>
/// What the PF fixed when it created a VF, and what a migration target must match exactly: the device model
/// version, device memory size, largest ring, MSI-X vector count and tracking page size.
/// Wire layout (24 bytes, little-endian): u32 model version, u32 max ring entries, u64 device memory bytes,
/// u32 MSI-X vectors, u32 page size.
/// </summary>
public readonly record struct AcceleratorProfile(uint ModelVersion, uint MaxRingEntries, ulong DeviceMemorySize, uint MsixVectors, uint PageSize)
{
    public const int Size = 24;

    /// <summary>The model version this code implements.</summary>
    public const uint CurrentModelVersion = 1;

    /// <summary>A profile of this model with <paramref name="deviceMemorySize"/> bytes and rings up to <paramref name="maxRingEntries"/>.</summary>
    public static AcceleratorProfile Create(ulong deviceMemorySize, uint maxRingEntries = 1024) =>
        new(CurrentModelVersion, maxRingEntries, deviceMemorySize, (uint)Spec.Accelerator.AcceleratorIds.VfMsixVectors, DeviceMemory.PageSize);

    public static bool TryRead(ReadOnlySpan<byte> source, out AcceleratorProfile profile)
    {
        if (source.Length < Size)
        {
            profile = default;
            return false;
        }
        profile = new AcceleratorProfile(
            BinaryPrimitives.ReadUInt32LittleEndian(source),
            BinaryPrimitives.ReadUInt32LittleEndian(source[4..]),
            BinaryPrimitives.ReadUInt64LittleEndian(source[8..]),
            BinaryPrimitives.ReadUInt32LittleEndian(source[16..]),
            BinaryPrimitives.ReadUInt32LittleEndian(source[20..]));
        return true;
    }

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(destination, ModelVersion);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[4..], MaxRingEntries);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[8..], DeviceMemorySize);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[16..], MsixVectors);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[20..], PageSize);
    }

    /// <summary>Checks the profile is one this model can build; throws <see cref="ArgumentException"/>.</summary>
    public void Validate()
    {
        if (ModelVersion != CurrentModelVersion)
        {
            throw new ArgumentException($"accelerator model version {ModelVersion} is not {CurrentModelVersion}");
        }
        if (DeviceMemorySize == 0 || DeviceMemorySize % DeviceMemory.PageSize != 0 || DeviceMemorySize > long.MaxValue)
        {
            throw new ArgumentException($"device memory size {DeviceMemorySize} is not a positive multiple of 4 KiB");
        }
        if (MaxRingEntries < 2 || MaxRingEntries > 65536 || (MaxRingEntries & (MaxRingEntries - 1)) != 0)
        {
            throw new ArgumentException($"max ring entries {MaxRingEntries} is not a power of two in 2..65536");
        }
        if (MsixVectors != Spec.Accelerator.AcceleratorIds.VfMsixVectors || PageSize != DeviceMemory.PageSize)
        {
            throw new ArgumentException("MSI-X vector count and page size are fixed by the model");
        }
    }
}
