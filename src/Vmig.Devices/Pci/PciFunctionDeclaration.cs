using System.Numerics;
using Vmig.Spec.Pci;

namespace Vmig.Devices.Pci;

/// <summary>One memory BAR: size in bytes (power of two, ≥ 16), 32- or 64-bit decoding, prefetchable.</summary>
/// <remarks>A 64-bit BAR takes two BAR slots (n and n+1); slot n+1 must then be left null.</remarks>
public sealed record PciBar(ulong Size, bool Is64Bit = false, bool Prefetchable = false)
{
    /// <summary>The read-only low bits of the BAR register (memory space, type, prefetchable).</summary>
    public uint FlagBits => (Is64Bit ? PciConfig.BarType64 : 0) | (Prefetchable ? PciConfig.BarPrefetchable : 0);
}

/// <summary>MSI-X: vector count and where the table and PBA sit (BAR index and byte offset, 8-aligned).</summary>
public sealed record PciMsixLayout(int VectorCount, int TableBar, uint TableOffset, int PbaBar, uint PbaOffset)
{
    /// <summary>Bytes of the MSI-X table (16 per vector).</summary>
    public uint TableSize => (uint)(VectorCount * PciMsix.EntrySize);

    /// <summary>Bytes of the PBA (one bit per vector, in whole u64 words).</summary>
    public uint PbaSize => (uint)((VectorCount + 63) / 64 * 8);
}

/// <summary>
/// SR-IOV capability of a PF (PCIe §9.3.3). <paramref name="VfBars"/> gives the per-VF BAR sizes (6 slots, null =
/// unimplemented). First VF Offset and VF Stride are routing-ID distances (PCIe §9.3.3.9, §9.3.3.10).
/// </summary>
public sealed record PciSriovLayout(
    ushort TotalVfs,
    ushort InitialVfs,
    ushort FirstVfOffset,
    ushort VfStride,
    ushort VfDeviceId,
    IReadOnlyList<PciBar?> VfBars,
    uint SupportedPageSizes = 0x553);

/// <summary>
/// What a PCI function is: identity, BARs, MSI-X and (for a PF) SR-IOV. <see cref="PciFunction"/> builds its type-0
/// config space from this and validates it there (<see cref="Validate"/>).
/// </summary>
public sealed record PciFunctionDeclaration
{
    public required ushort VendorId { get; init; }
    public required ushort DeviceId { get; init; }
    public ushort SubsystemVendorId { get; init; }
    public ushort SubsystemId { get; init; }
    public byte RevisionId { get; init; }

    /// <summary>24-bit class code: base class &lt;&lt; 16 | subclass &lt;&lt; 8 | programming interface (e.g. NVMe 0x010802).</summary>
    public required uint ClassCode { get; init; }

    /// <summary>Up to 6 BAR slots; null = unimplemented.</summary>
    public IReadOnlyList<PciBar?> Bars { get; init; } = [];

    /// <summary>MSI-X layout, or null for a function without MSI-X.</summary>
    public PciMsixLayout? Msix { get; init; }

    /// <summary>SR-IOV capability (PFs only), or null.</summary>
    public PciSriovLayout? Sriov { get; init; }

    /// <summary>The BAR in slot <paramref name="index"/>, or null.</summary>
    public PciBar? GetBar(int index) => index >= 0 && index < Bars.Count ? Bars[index] : null;

    /// <summary>Checks the declaration; throws <see cref="ArgumentException"/> naming the first problem.</summary>
    public void Validate()
    {
        ValidateBars(Bars, "BAR");
        if (ClassCode > 0xFFFFFF)
        {
            throw new ArgumentException($"class code 0x{ClassCode:X} does not fit 24 bits");
        }
        if (Msix is { } m)
        {
            if (m.VectorCount < 1 || m.VectorCount > PciMsix.MaxVectors)
            {
                throw new ArgumentException($"MSI-X vector count {m.VectorCount} is outside 1..{PciMsix.MaxVectors}");
            }
            CheckInBar(m.TableBar, m.TableOffset, m.TableSize, "MSI-X table");
            CheckInBar(m.PbaBar, m.PbaOffset, m.PbaSize, "MSI-X PBA");
            if (m.TableBar == m.PbaBar && m.TableOffset < m.PbaOffset + m.PbaSize && m.PbaOffset < m.TableOffset + m.TableSize)
            {
                throw new ArgumentException("MSI-X table and PBA overlap");
            }
        }
        if (Sriov is { } s)
        {
            if (s.InitialVfs > s.TotalVfs)
            {
                throw new ArgumentException($"InitialVFs {s.InitialVfs} > TotalVFs {s.TotalVfs}");
            }
            if (s.TotalVfs > 0 && s.FirstVfOffset == 0)
            {
                throw new ArgumentException("First VF Offset must be non-zero (a VF cannot share the PF's routing ID)");
            }
            if (s.TotalVfs > 1 && s.VfStride == 0)
            {
                throw new ArgumentException("VF Stride must be non-zero with more than one VF");
            }
            if ((s.SupportedPageSizes & 1) == 0)
            {
                throw new ArgumentException("Supported Page Sizes must include 4 KiB (bit 0)");
            }
            ValidateBars(s.VfBars, "VF BAR");
        }
    }

    private void CheckInBar(int bar, uint offset, uint size, string what)
    {
        var b = GetBar(bar) ?? throw new ArgumentException($"{what} is in BAR{bar}, which is not declared");
        if ((offset & 7) != 0)
        {
            throw new ArgumentException($"{what} offset 0x{offset:X} is not 8-aligned");
        }
        if ((ulong)offset + size > b.Size)
        {
            throw new ArgumentException($"{what} [0x{offset:X}, +0x{size:X}) does not fit BAR{bar} of 0x{b.Size:X} bytes");
        }
    }

    private static void ValidateBars(IReadOnlyList<PciBar?> bars, string what)
    {
        if (bars.Count > 6)
        {
            throw new ArgumentException($"{bars.Count} {what} slots declared; a type-0 header has 6");
        }
        for (int i = 0; i < bars.Count; i++)
        {
            var b = bars[i];
            if (b is null)
            {
                continue;
            }
            if (b.Size < 16 || !BitOperations.IsPow2(b.Size))
            {
                throw new ArgumentException($"{what}{i} size 0x{b.Size:X} is not a power of two ≥ 16");
            }
            if (!b.Is64Bit && b.Size > 0x8000_0000)
            {
                throw new ArgumentException($"{what}{i} of 0x{b.Size:X} bytes needs 64-bit decoding");
            }
            if (b.Is64Bit)
            {
                if (i == 5)
                {
                    throw new ArgumentException($"{what}5 cannot be 64-bit (it needs the next slot)");
                }
                if (i + 1 < bars.Count && bars[i + 1] is not null)
                {
                    throw new ArgumentException($"{what}{i + 1} must be empty: it holds the upper half of 64-bit {what}{i}");
                }
                i++;
            }
        }
    }
}
