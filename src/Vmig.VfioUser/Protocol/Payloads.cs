using System.Buffers.Binary;

namespace Vmig.VfioUser.Protocol;

// Fixed-layout payloads of vfio-user messages (qemu docs/interop/vfio-user.rst; libvfio-user include/vfio-user.h).
// Offsets are from the end of the 16-byte header. TryRead never throws: it returns false when the span is short.

/// <summary>VERSION payload head: major u16 @0, minor u16 @2, then optional NUL-terminated UTF-8 JSON.</summary>
public readonly record struct VersionHead(ushort Major, ushort Minor)
{
    public const int Size = 4;

    public static bool TryRead(ReadOnlySpan<byte> s, out VersionHead v)
    {
        v = default;
        if (s.Length < Size)
        {
            return false;
        }
        v = new(BinaryPrimitives.ReadUInt16LittleEndian(s), BinaryPrimitives.ReadUInt16LittleEndian(s[2..]));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(d, Major);
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], Minor);
    }
}

/// <summary>DMA_MAP request (32 bytes): argsz u32 @0, flags u32 @4 (bit0 READ, bit1 WRITE), offset u64 @8 (file offset), address u64 @16, size u64 @24.</summary>
public readonly record struct DmaMapRequest(uint Argsz, uint Flags, ulong Offset, ulong Address, ulong Size)
{
    public const int WireSize = 32;
    public const uint FlagRead = 1;
    public const uint FlagWrite = 2;

    public static bool TryRead(ReadOnlySpan<byte> s, out DmaMapRequest v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), Wire.U32(s, 4), Wire.U64(s, 8), Wire.U64(s, 16), Wire.U64(s, 24));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, Flags);
        Wire.W64(d, 8, Offset);
        Wire.W64(d, 16, Address);
        Wire.W64(d, 24, Size);
    }
}

/// <summary>DMA_UNMAP request and reply (24 bytes): argsz u32 @0, flags u32 @4 (bit1 UNMAP_ALL), address u64 @8, size u64 @16.</summary>
public readonly record struct DmaUnmapRequest(uint Argsz, uint Flags, ulong Address, ulong Size)
{
    public const int WireSize = 24;
    /// <summary>VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: v1-migration only; refused (EINVAL).</summary>
    public const uint FlagGetDirtyBitmap = 1;
    /// <summary>VFIO_DMA_UNMAP_FLAG_ALL: unmap every window (address and size must be 0).</summary>
    public const uint FlagAll = 2;

    public static bool TryRead(ReadOnlySpan<byte> s, out DmaUnmapRequest v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), Wire.U32(s, 4), Wire.U64(s, 8), Wire.U64(s, 16));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, Flags);
        Wire.W64(d, 8, Address);
        Wire.W64(d, 16, Size);
    }
}

/// <summary>DEVICE_GET_INFO request/reply (16 bytes): argsz, flags (RESET=1, PCI=2), num_regions, num_irqs (u32 each).</summary>
public readonly record struct DeviceInfoPayload(uint Argsz, uint Flags, uint NumRegions, uint NumIrqs)
{
    public const int WireSize = 16;

    public static bool TryRead(ReadOnlySpan<byte> s, out DeviceInfoPayload v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), Wire.U32(s, 4), Wire.U32(s, 8), Wire.U32(s, 12));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, Flags);
        Wire.W32(d, 8, NumRegions);
        Wire.W32(d, 12, NumIrqs);
    }
}

/// <summary>
/// DEVICE_GET_REGION_INFO request/reply head (32 bytes, struct vfio_region_info): argsz u32 @0, flags u32 @4,
/// index u32 @8, cap_offset u32 @12 (from the start of this struct), size u64 @16, offset u64 @24 (mmap offset).
/// </summary>
public readonly record struct RegionInfoPayload(uint Argsz, uint Flags, uint Index, uint CapOffset, ulong Size, ulong Offset)
{
    public const int WireSize = 32;

    public static bool TryRead(ReadOnlySpan<byte> s, out RegionInfoPayload v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), Wire.U32(s, 4), Wire.U32(s, 8), Wire.U32(s, 12), Wire.U64(s, 16), Wire.U64(s, 24));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, Flags);
        Wire.W32(d, 8, Index);
        Wire.W32(d, 12, CapOffset);
        Wire.W64(d, 16, Size);
        Wire.W64(d, 24, Offset);
    }
}

/// <summary>
/// VFIO_REGION_INFO_CAP_SPARSE_MMAP (id 1, version 1): cap header {id u16, version u16, next u32} then
/// nr_areas u32, reserved u32, then nr_areas × {offset u64, size u64}. 16 + 16·n bytes.
/// </summary>
public static class SparseMmapCap
{
    public const ushort Id = 1;
    public const ushort Version = 1;
    public const int HeadSize = 16;
    public const int AreaSize = 16;

    public static int SizeFor(int areas) => HeadSize + (AreaSize * areas);

    public static void WriteTo(Span<byte> d, uint next, IReadOnlyList<(ulong Offset, ulong Size)> areas)
    {
        ArgumentNullException.ThrowIfNull(areas);
        BinaryPrimitives.WriteUInt16LittleEndian(d, Id);
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], Version);
        Wire.W32(d, 4, next);
        Wire.W32(d, 8, (uint)areas.Count);
        Wire.W32(d, 12, 0);
        for (int i = 0; i < areas.Count; i++)
        {
            Wire.W64(d, HeadSize + (i * AreaSize), areas[i].Offset);
            Wire.W64(d, HeadSize + (i * AreaSize) + 8, areas[i].Size);
        }
    }

    /// <summary>Parses the sparse areas out of a region-info reply (payload from the vfio_region_info start). Bounded by the span.</summary>
    public static bool TryRead(ReadOnlySpan<byte> regionInfo, uint capOffset, out List<(ulong Offset, ulong Size)> areas)
    {
        areas = [];
        int hops = 0;
        while (capOffset != 0 && hops++ < 16)
        {
            if (capOffset < RegionInfoPayload.WireSize || capOffset > regionInfo.Length - 8)
            {
                return false;
            }
            var c = regionInfo[(int)capOffset..];
            ushort id = BinaryPrimitives.ReadUInt16LittleEndian(c);
            uint next = Wire.U32(c, 4);
            if (id == Id)
            {
                if (c.Length < HeadSize)
                {
                    return false;
                }
                uint n = Wire.U32(c, 8);
                if (n > (uint)((c.Length - HeadSize) / AreaSize))
                {
                    return false;
                }
                for (int i = 0; i < n; i++)
                {
                    areas.Add((Wire.U64(c, HeadSize + (i * AreaSize)), Wire.U64(c, HeadSize + (i * AreaSize) + 8)));
                }
                return true;
            }
            capOffset = next;
        }
        return true;
    }
}

/// <summary>DEVICE_GET_REGION_IO_FDS request/reply head (16 bytes): argsz, flags, index, count (u32 each); sub-regions follow in a reply.</summary>
public readonly record struct RegionIoFdsPayload(uint Argsz, uint Flags, uint Index, uint Count)
{
    public const int WireSize = 16;

    public static bool TryRead(ReadOnlySpan<byte> s, out RegionIoFdsPayload v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), Wire.U32(s, 4), Wire.U32(s, 8), Wire.U32(s, 12));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, Flags);
        Wire.W32(d, 8, Index);
        Wire.W32(d, 12, Count);
    }
}

/// <summary>DEVICE_GET_IRQ_INFO request/reply (16 bytes, struct vfio_irq_info): argsz, flags, index, count.</summary>
public readonly record struct IrqInfoPayload(uint Argsz, uint Flags, uint Index, uint Count)
{
    public const int WireSize = 16;

    public static bool TryRead(ReadOnlySpan<byte> s, out IrqInfoPayload v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), Wire.U32(s, 4), Wire.U32(s, 8), Wire.U32(s, 12));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, Flags);
        Wire.W32(d, 8, Index);
        Wire.W32(d, 12, Count);
    }
}

/// <summary>VFIO_IRQ_SET_* flag bits (struct vfio_irq_set.flags).</summary>
[Flags]
public enum IrqSetFlags : uint
{
    DataNone = 1,
    DataBool = 2,
    DataEventfd = 4,
    ActionMask = 8,
    ActionUnmask = 16,
    ActionTrigger = 32,
    DataTypeMask = DataNone | DataBool | DataEventfd,
    ActionTypeMask = ActionMask | ActionUnmask | ActionTrigger,
}

/// <summary>DEVICE_SET_IRQS request head (20 bytes): argsz, flags, index, start, count (u32 each); DATA_BOOL bytes follow; eventfds ride as SCM_RIGHTS.</summary>
public readonly record struct IrqSetPayload(uint Argsz, IrqSetFlags Flags, uint Index, uint Start, uint Count)
{
    public const int WireSize = 20;

    public static bool TryRead(ReadOnlySpan<byte> s, out IrqSetPayload v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), (IrqSetFlags)Wire.U32(s, 4), Wire.U32(s, 8), Wire.U32(s, 12), Wire.U32(s, 16));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, (uint)Flags);
        Wire.W32(d, 8, Index);
        Wire.W32(d, 12, Start);
        Wire.W32(d, 16, Count);
    }
}

/// <summary>REGION_READ/REGION_WRITE head (16 bytes): offset u64 @0, region u32 @8, count u32 @12; data follows (read reply, write request).</summary>
public readonly record struct RegionAccessHead(ulong Offset, uint Region, uint Count)
{
    public const int WireSize = 16;

    public static bool TryRead(ReadOnlySpan<byte> s, out RegionAccessHead v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U64(s, 0), Wire.U32(s, 8), Wire.U32(s, 12));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W64(d, 0, Offset);
        Wire.W32(d, 8, Region);
        Wire.W32(d, 12, Count);
    }
}

/// <summary>DMA_READ/DMA_WRITE head (16 bytes): address u64 @0, count u64 @8; data follows (read reply, write request).</summary>
public readonly record struct DmaAccessHead(ulong Address, ulong Count)
{
    public const int WireSize = 16;

    public static bool TryRead(ReadOnlySpan<byte> s, out DmaAccessHead v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U64(s, 0), Wire.U64(s, 8));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W64(d, 0, Address);
        Wire.W64(d, 8, Count);
    }
}

/// <summary>One REGION_WRITE_MULTI entry (24 bytes): offset u64 @0, region u32 @8, count u32 @12 (≤ 8), data[8] @16.</summary>
public readonly record struct WriteMultiEntry(ulong Offset, uint Region, uint Count, ulong Data)
{
    public const int WireSize = 24;
    /// <summary>VFIO_USER_MULTI_DATA: bytes of data per entry.</summary>
    public const int MaxData = 8;
    /// <summary>VFIO_USER_MULTI_MAX: entries per message (QEMU hw/vfio-user/protocol.h).</summary>
    public const int MaxEntries = 200;

    public static bool TryRead(ReadOnlySpan<byte> s, out WriteMultiEntry v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U64(s, 0), Wire.U32(s, 8), Wire.U32(s, 12), Wire.U64(s, 16));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W64(d, 0, Offset);
        Wire.W32(d, 8, Region);
        Wire.W32(d, 12, Count);
        Wire.W64(d, 16, Data);
    }
}

/// <summary>DEVICE_FEATURE head (8 bytes, struct vfio_device_feature): argsz u32 @0, flags u32 @4 (index bits 0-15, GET 1&lt;&lt;16, SET 1&lt;&lt;17, PROBE 1&lt;&lt;18); data @8.</summary>
public readonly record struct DeviceFeatureHead(uint Argsz, uint Flags)
{
    public const int WireSize = 8;
    public const uint IndexMask = 0xFFFF;
    public const uint Get = 1u << 16;
    public const uint Set = 1u << 17;
    public const uint Probe = 1u << 18;

    public ushort Feature => (ushort)(Flags & IndexMask);

    public static bool TryRead(ReadOnlySpan<byte> s, out DeviceFeatureHead v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), Wire.U32(s, 4));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, Flags);
    }
}

/// <summary>MIG_DATA_READ/MIG_DATA_WRITE head (8 bytes): argsz u32 @0, size u32 @4; data @8 (read reply, write request).</summary>
public readonly record struct MigDataHead(uint Argsz, uint Size)
{
    public const int WireSize = 8;

    public static bool TryRead(ReadOnlySpan<byte> s, out MigDataHead v)
    {
        v = default;
        if (s.Length < WireSize)
        {
            return false;
        }
        v = new(Wire.U32(s, 0), Wire.U32(s, 4));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        Wire.W32(d, 0, Argsz);
        Wire.W32(d, 4, Size);
    }
}

/// <summary>Little-endian field helpers shared by the payload codecs.</summary>
internal static class Wire
{
    public static uint U32(ReadOnlySpan<byte> s, int o) => BinaryPrimitives.ReadUInt32LittleEndian(s[o..]);
    public static ulong U64(ReadOnlySpan<byte> s, int o) => BinaryPrimitives.ReadUInt64LittleEndian(s[o..]);
    public static void W32(Span<byte> d, int o, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(d[o..], v);
    public static void W64(Span<byte> d, int o, ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(d[o..], v);
}
