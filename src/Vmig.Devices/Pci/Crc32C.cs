using System.Buffers.Binary;
using System.Numerics;

namespace Vmig.Devices.Pci;

/// <summary>CRC-32C (Castagnoli), as the stream formats and the accelerator's compute job use it (init ~0, final ~).</summary>
public static class Crc32C
{
    /// <summary>CRC-32C of <paramref name="data"/> (check value of "123456789" is 0xE3069283).</summary>
    public static uint Compute(ReadOnlySpan<byte> data) => ~Append(~0u, data);

    /// <summary>Continues a raw (non-inverted) CRC-32C register over <paramref name="data"/>; start with ~0u, finish with ~.</summary>
    public static uint Append(uint crc, ReadOnlySpan<byte> data)
    {
        while (data.Length >= 8)
        {
            crc = BitOperations.Crc32C(crc, BinaryPrimitives.ReadUInt64LittleEndian(data));
            data = data[8..];
        }
        foreach (byte b in data)
        {
            crc = BitOperations.Crc32C(crc, b);
        }
        return crc;
    }
}
