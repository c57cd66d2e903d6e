using System.Buffers.Binary;
using Vmig.Spec.Nvme;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Nvme;

/// <summary>
/// Turns a command's PRP1/PRP2 into the guest memory segments of a transfer (NVMe Base 2.x §4.3.1, "Physical
/// Region Page Entry and List"), validating every rule a hostile host could break: PRP1 dword aligned; PRP2 a
/// page pointer with offset 0 when the transfer spans exactly two pages; otherwise a dword-aligned pointer to a PRP
/// list whose entries have offset 0 and whose last slot on a page chains to the next list page. The walk is bounded
/// by the transfer length, which the caller has already bounded by MDTS.
/// </summary>
public static class PrpList
{
    /// <summary>Memory page size (CC.MPS = 0 only: CAP.MPSMIN = MPSMAX = 0).</summary>
    public const int PageSize = 4096;

    /// <summary>
    /// Fills <paramref name="segments"/> with (address, length) runs covering <paramref name="length"/> bytes.
    /// Returns Success, PRP Offset Invalid (misaligned PRP), or Data Transfer Error (a PRP list not readable).
    /// </summary>
    public static NvmeStatus Build(IDmaSpace dma, ulong prp1, ulong prp2, int length, List<(ulong Address, int Length)> segments)
    {
        segments.Clear();
        if (length <= 0)
        {
            return NvmeStatus.Success;
        }
        if ((prp1 & 3) != 0)
        {
            return NvmeStatus.PrpOffsetInvalid;
        }
        int first = (int)Math.Min((ulong)length, PageSize - (prp1 & (PageSize - 1)));
        Add(segments, prp1, first);
        int remaining = length - first;
        if (remaining == 0)
        {
            return NvmeStatus.Success;
        }
        if (remaining <= PageSize)
        {
            if ((prp2 & (PageSize - 1)) != 0)
            {
                return NvmeStatus.PrpOffsetInvalid;
            }
            Add(segments, prp2, remaining);
            return NvmeStatus.Success;
        }
        if ((prp2 & 7) != 0)
        {
            return NvmeStatus.PrpOffsetInvalid;
        }
        ulong listAddr = prp2;
        Span<byte> entry = stackalloc byte[8];
        while (remaining > 0)
        {
            // Entries left on this list page; the last one chains when more than one page of data remains.
            int slots = (int)((PageSize - (listAddr & (PageSize - 1))) / 8);
            for (int i = 0; i < slots && remaining > 0; i++)
            {
                if (!dma.TryRead(listAddr + (ulong)(i * 8), entry))
                {
                    return NvmeStatus.DataTransferError;
                }
                ulong p = BinaryPrimitives.ReadUInt64LittleEndian(entry);
                if (i == slots - 1 && remaining > PageSize)
                {
                    if ((p & 7) != 0 || p == listAddr)
                    {
                        return NvmeStatus.PrpOffsetInvalid;
                    }
                    listAddr = p;
                    goto nextPage;
                }
                if ((p & (PageSize - 1)) != 0)
                {
                    return NvmeStatus.PrpOffsetInvalid;
                }
                int n = Math.Min(remaining, PageSize);
                Add(segments, p, n);
                remaining -= n;
            }
            break;
        nextPage:;
        }
        return NvmeStatus.Success;
    }

    private static void Add(List<(ulong Address, int Length)> segments, ulong address, int length)
    {
        if (segments.Count > 0)
        {
            var (a, l) = segments[^1];
            if (a + (ulong)l == address)
            {
                segments[^1] = (a, l + length);
                return;
            }
        }
        segments.Add((address, length));
    }

    /// <summary>Copies <paramref name="source"/> to the host along <paramref name="segments"/>. False on a DMA miss.</summary>
    public static bool CopyToHost(IDmaSpace dma, List<(ulong Address, int Length)> segments, ReadOnlySpan<byte> source)
    {
        int o = 0;
        foreach (var (a, l) in segments)
        {
            if (!dma.TryWrite(a, source.Slice(o, l)))
            {
                return false;
            }
            o += l;
        }
        return true;
    }

    /// <summary>Copies host memory along <paramref name="segments"/> into <paramref name="destination"/>. False on a DMA miss.</summary>
    public static bool CopyFromHost(IDmaSpace dma, List<(ulong Address, int Length)> segments, Span<byte> destination)
    {
        int o = 0;
        foreach (var (a, l) in segments)
        {
            if (!dma.TryRead(a, destination.Slice(o, l)))
            {
                return false;
            }
            o += l;
        }
        return true;
    }
}
