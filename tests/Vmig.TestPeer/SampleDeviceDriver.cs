using System.Buffers.Binary;
using Vmig.VfioUser.Client;

namespace Vmig.TestPeer;

/// <summary>A tiny guest-side driver for <see cref="SampleDevice"/>'s DMA engine, over any vfio-user client.</summary>
public static class SampleDeviceDriver
{
    /// <summary>Copy guest memory → BAR (DMA read by the device).</summary>
    public const byte GuestToBar = 1;

    /// <summary>Copy BAR → guest memory (DMA write by the device).</summary>
    public const byte BarToGuest = 2;

    /// <summary>Programs SRC (guest IOVA), DST (BAR offset ≥ 4096) and LEN, rings the doorbell with <paramref name="command"/>
    /// and returns the STATUS register (0 ok, 2 DMA error, 1 bad arguments).</summary>
    public static uint RunDma(VfioUserClient client, byte command, ulong guestIova, ulong barOffset, ulong length)
    {
        ArgumentNullException.ThrowIfNull(client);
        Span<byte> v = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(v, guestIova);
        client.WriteRegion(0, SampleDevice.RegSrc, v);
        BinaryPrimitives.WriteUInt64LittleEndian(v, barOffset);
        client.WriteRegion(0, SampleDevice.RegDst, v);
        BinaryPrimitives.WriteUInt64LittleEndian(v, length);
        client.WriteRegion(0, SampleDevice.RegLen, v);
        client.WriteRegion(0, SampleDevice.RegDoorbell, [command]);
        client.ReadRegion(0, SampleDevice.RegStatus, v[..4]);
        return BinaryPrimitives.ReadUInt32LittleEndian(v);
    }
}
