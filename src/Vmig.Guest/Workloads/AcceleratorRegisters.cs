using System.Buffers.Binary;
using Vmig.Guest.Accelerator;

namespace Vmig.Guest.Workloads;

/// <summary>
/// What the accelerator guest jobs (accel-mix, accel-dirtier) share in their register blocks: a u32 magic at 0 and
/// the driver's service name (UTF-8, zero padded, <see cref="NameMax"/> bytes) at a job-specific offset.
/// </summary>
internal static class AcceleratorRegisters
{
    public const int NameMax = 64;

    /// <summary>
    /// The driver named in <paramref name="registers"/> of a job of <paramref name="kind"/> being resumed.
    /// </summary>
    /// <exception cref="InvalidDataException">Too short, or the magic is not <paramref name="magic"/>.</exception>
    /// <exception cref="KeyNotFoundException">The guest has no driver of that name.</exception>
    public static AcceleratorDriver ResumeDriver(GuestEnvironment environment, ReadOnlySpan<byte> registers, uint magic, int nameOffset, string kind)
    {
        ArgumentNullException.ThrowIfNull(environment);
        if (registers.Length < nameOffset + NameMax || BinaryPrimitives.ReadUInt32LittleEndian(registers) != magic)
        {
            throw new InvalidDataException($"registers are not an {kind} job's");
        }
        string name = System.Text.Encoding.UTF8.GetString(registers.Slice(nameOffset, NameMax)).TrimEnd('\0');
        return environment.GetService<AcceleratorDriver>(name);
    }
}
