using System.Buffers.Binary;
using System.Numerics;
using System.Runtime.InteropServices;

namespace Vmig.Spec;

/// <summary>
/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init 0xFFFFFFFF, final XOR 0xFFFFFFFF — the iSCSI / RFC 3720
/// variant; "123456789" → 0xE3069283) with the CPU's crc32 instruction. The one implementation every stream format,
/// device state and guest verifier uses.
/// </summary>
public static class Crc32C
{
    /// <summary>The running value to start with.</summary>
    public const uint Start = 0xFFFFFFFF;

    /// <summary>CRC-32C of <paramref name="data"/>.</summary>
    public static uint Compute(ReadOnlySpan<byte> data) => Finish(Append(Start, data));

    /// <summary>Feeds <paramref name="data"/> into a running (non-inverted) value; start with <see cref="Start"/>, end with <see cref="Finish"/>.</summary>
    public static uint Append(uint crc, ReadOnlySpan<byte> data)
    {
        // Whole u64 words through a cast (no per-word slicing); the CRC consumes them least significant byte first.
        var words = MemoryMarshal.Cast<byte, ulong>(data);
        foreach (ulong w in words)
        {
            crc = BitOperations.Crc32C(crc, BitConverter.IsLittleEndian ? w : BinaryPrimitives.ReverseEndianness(w));
        }
        foreach (byte b in data[(words.Length * 8)..])
        {
            crc = BitOperations.Crc32C(crc, b);
        }
        return crc;
    }

    /// <summary>Final XOR of a running value.</summary>
    public static uint Finish(uint crc) => ~crc;
}
