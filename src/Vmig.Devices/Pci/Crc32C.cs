using System.Buffers.Binary;
using System.Numerics;
using System.Runtime.InteropServices;

namespace Vmig.Devices.Pci;

/// <summary>CRC-32C (Castagnoli), as the stream formats and the accelerator's compute job use it (init ~0, final ~).</summary>
public static class Crc32C
{
    /// <summary>CRC-32C of <paramref name="data"/> (check value of "123456789" is 0xE3069283).</summary>
    public static uint Compute(ReadOnlySpan<byte> data) => ~Append(~0u, data);

    /// <summary>Continues a raw (non-inverted) CRC-32C register over <paramref name="data"/>; start with ~0u, finish with ~.</summary>
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
}
