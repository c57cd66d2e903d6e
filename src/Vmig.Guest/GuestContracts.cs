namespace Vmig.Guest;

/// <summary>
/// Guest physical memory as a guest driver sees it. Implemented by the VMM over its RAM memfd; every write
/// through it is recorded for RAM dirty logging (the VMM's own dirty tracking of vCPU writes).
/// Guest drivers keep all durable state here (queues, PRP lists, buffers, their own bookkeeping) so that
/// migrating RAM migrates them.
/// </summary>
public interface IGuestMemory
{
    /// <summary>Size of guest RAM in bytes; valid guest physical addresses are [0, Size).</summary>
    ulong Size { get; }

    /// <summary>Copies guest memory at <paramref name="gpa"/>. Throws <see cref="ArgumentOutOfRangeException"/> outside RAM.</summary>
    void Read(ulong gpa, Span<byte> destination);

    /// <summary>Copies into guest memory at <paramref name="gpa"/> and marks the pages dirty.</summary>
    void Write(ulong gpa, ReadOnlySpan<byte> source);

    /// <summary>Reads a u32 with acquire semantics (4-aligned): completion entries, shadow doorbells.</summary>
    uint ReadUInt32(ulong gpa);

    /// <summary>Writes a u32 with release semantics (4-aligned) and marks the page dirty.</summary>
    void WriteUInt32(ulong gpa, uint value);

    /// <summary>Reads a u64 (8-aligned, atomic).</summary>
    ulong ReadUInt64(ulong gpa);

    /// <summary>Writes a u64 (8-aligned, atomic) and marks the page dirty.</summary>
    void WriteUInt64(ulong gpa, ulong value);
}

/// <summary>
/// A PCI function as a guest driver sees it: config space, BAR MMIO, and MSI-X vectors delivered by the VMM.
/// Implemented by the VMM over a vfio-user client connection.
/// </summary>
public interface IGuestPciFunction
{
    /// <summary>Reads config space (offset + length ≤ 4096).</summary>
    void ReadConfig(int offset, Span<byte> data);

    /// <summary>Writes config space.</summary>
    void WriteConfig(int offset, ReadOnlySpan<byte> data);

    /// <summary>MMIO read of <paramref name="data"/>.Length bytes (1, 2, 4 or 8) at <paramref name="offset"/> in BAR <paramref name="bar"/>.</summary>
    void MmioRead(int bar, ulong offset, Span<byte> data);

    /// <summary>MMIO write.</summary>
    void MmioWrite(int bar, ulong offset, ReadOnlySpan<byte> data);

    /// <summary>Number of MSI-X vectors wired to eventfds by the VMM.</summary>
    int MsixVectorCount { get; }

    /// <summary>Blocks until MSI-X <paramref name="vector"/> fires or the timeout passes (-1 forever). True if it fired (and consumes it).</summary>
    bool WaitInterrupt(int vector, int timeoutMs);
}
