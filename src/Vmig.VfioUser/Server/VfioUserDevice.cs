using System.Buffers;
using Microsoft.Extensions.Logging;
using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser.Server;

/// <summary>
/// The server SDK contract: one emulated device function served on one vfio-user socket.
/// A device declares its regions and IRQs, answers region accesses, and may be migratable.
/// The SDK owns the socket, DMA windows, interrupt eventfds, migration state machine and dirty logging.
/// </summary>
/// <remarks>
/// Threading: region callbacks and <see cref="Reset"/> are called on the connection's receive thread,
/// one at a time. A device may run its own threads (e.g. to poll shadow doorbells); it reaches guest
/// memory only through <see cref="DeviceContext.Dma"/> and raises interrupts through <see cref="DeviceContext.Irqs"/>.
/// </remarks>
public abstract class VfioUserDevice
{
    private DeviceContext? _context;

    /// <summary>vfio_device_info.flags (PCI, RESET).</summary>
    public virtual DeviceInfoFlags InfoFlags => DeviceInfoFlags.Pci | DeviceInfoFlags.Reset;

    /// <summary>Regions by index (0..N-1; VFIO PCI indices: BAR0-5 = 0-5, ROM = 6, CONFIG = 7, VGA = 8).</summary>
    public abstract IReadOnlyList<RegionDescriptor> Regions { get; }

    /// <summary>IRQ kinds by index (INTx = 0, MSI = 1, MSI-X = 2, ERR = 3, REQ = 4).</summary>
    public abstract IReadOnlyList<IrqDescriptor> Irqs { get; }

    /// <summary>Migration driver, or null if the device does not migrate (DEVICE_FEATURE MIGRATION then gets ENOTTY).</summary>
    public virtual IMigrationDevice? Migration => null;

    /// <summary>
    /// Reads <c>data.Length</c> bytes at <paramref name="offset"/> of region <paramref name="index"/>.
    /// The SDK has already checked index, bounds and the region's Read flag.
    /// Returns 0 or an errno (<see cref="Errno"/>) for the error reply.
    /// </summary>
    public abstract int ReadRegion(int index, ulong offset, Span<byte> data);

    /// <summary>Writes region bytes; same contract as <see cref="ReadRegion"/>.</summary>
    public abstract int WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data);

    /// <summary>
    /// Asked before a DEVICE_RESET runs: 0 to go ahead, or an errno to refuse it (nothing is reset, the client gets
    /// the error). E.g. EBUSY from an SR-IOV PF whose VFs are in use.
    /// </summary>
    public virtual int PrepareReset() => 0;

    /// <summary>DEVICE_RESET: return to power-on state. The SDK has already reset migration state to RUNNING.</summary>
    public virtual void Reset()
    {
    }

    /// <summary>The attachment context; null while no client is attached.</summary>
    public DeviceContext? Context => _context;

    /// <summary>Called when a client attaches (after VERSION) with the DMA space and IRQ signaler for this client.</summary>
    public virtual void OnAttached(DeviceContext context) => _context = context;

    /// <summary>Called when the client disconnects; DMA windows are already gone. The device should stop all DMA.</summary>
    public virtual void OnDetached() => _context = null;
}

/// <summary>What the SDK gives a device while a client is attached.</summary>
public sealed class DeviceContext
{
    public DeviceContext(IDmaSpace dma, IIrqSignaler irqs, ILogger logger)
    {
        Dma = dma;
        Irqs = irqs;
        Logger = logger;
    }

    /// <summary>Guest memory as the client mapped it (DMA_MAP windows).</summary>
    public IDmaSpace Dma { get; }

    /// <summary>Interrupt eventfds the client registered (DEVICE_SET_IRQS).</summary>
    public IIrqSignaler Irqs { get; }

    public ILogger Logger { get; }
}

/// <summary>One region as DEVICE_GET_REGION_INFO reports it.</summary>
/// <param name="Size">Size in bytes (0 = region absent).</param>
/// <param name="Flags">READ / WRITE / MMAP.</param>
/// <param name="MmapFd">For MMAP regions, the fd the client maps (offset 0 of the region = file offset <see cref="MmapOffset"/>).</param>
/// <param name="MmapOffset">File offset of region offset 0 in <see cref="MmapFd"/>.</param>
/// <param name="SparseAreas">VFIO_REGION_INFO_CAP_SPARSE_MMAP areas (offset, size) that may be mmap'd; null = the whole region.</param>
public sealed record RegionDescriptor(
    ulong Size,
    RegionFlags Flags,
    UnixFd? MmapFd = null,
    ulong MmapOffset = 0,
    IReadOnlyList<(ulong Offset, ulong Size)>? SparseAreas = null)
{
    /// <summary>An absent region (size 0, no flags).</summary>
    public static RegionDescriptor Absent { get; } = new(0, RegionFlags.None);
}

/// <summary>One IRQ index as DEVICE_GET_IRQ_INFO reports it.</summary>
public sealed record IrqDescriptor(uint Count, IrqInfoFlags Flags)
{
    public static IrqDescriptor Absent { get; } = new(0, IrqInfoFlags.None);
}

/// <summary>
/// Guest memory as seen by a device: the client's DMA windows, by IOVA. Every access is bounds checked
/// against one window and its protection; a miss returns false (the device reports a DMA error the way its
/// spec says). Writes are recorded for dirty logging while DMA_LOGGING is on.
/// </summary>
public interface IDmaSpace
{
    /// <summary>Copies guest memory at <paramref name="iova"/> into <paramref name="destination"/>. False if not fully inside readable windows.</summary>
    bool TryRead(ulong iova, Span<byte> destination);

    /// <summary>Copies <paramref name="source"/> into guest memory at <paramref name="iova"/>. False if not fully inside writable windows.</summary>
    bool TryWrite(ulong iova, ReadOnlySpan<byte> source);

    /// <summary>Reads a u32 with acquire semantics (shadow doorbells, ring indices). False if unmapped or not 4-aligned.</summary>
    bool TryReadUInt32(ulong iova, out uint value);

    /// <summary>Writes a u32 with release semantics (event index). False if unmapped, read-only or not 4-aligned.</summary>
    bool TryWriteUInt32(ulong iova, uint value);

    /// <summary>
    /// Lends guest memory [<paramref name="iova"/>, +<paramref name="length"/>) to <paramref name="action"/> as a writable
    /// span for the duration of the call, so a device can fill it in place (a pread straight into guest RAM) instead of
    /// copying through a buffer. Returns false without calling <paramref name="action"/> when the range is not one
    /// contiguous, fd-backed, writable window (message windows, ranges across windows, a function whose DMA is
    /// gated off); the caller then falls back to <see cref="TryWrite"/>. While dirty logging is on the range is logged
    /// after the call, also when <paramref name="action"/> throws. The span must not escape the call. Default: refuses.
    /// </summary>
    bool TryLendWritable<TState>(ulong iova, int length, TState state, SpanAction<byte, TState> action) => false;

    /// <summary>
    /// As <see cref="TryLendWritable{TState}"/> for a readable window: <paramref name="action"/> reads guest memory in place
    /// (a pwrite straight from guest RAM). False (fall back to <see cref="TryRead"/>) under the same conditions.
    /// </summary>
    bool TryLendReadable<TState>(ulong iova, int length, TState state, ReadOnlySpanAction<byte, TState> action) => false;
}

/// <summary>Raises interrupts on the eventfds the client registered.</summary>
public interface IIrqSignaler
{
    /// <summary>Signals vector <paramref name="subindex"/> of IRQ kind <paramref name="index"/>. False if no eventfd is set or it is masked.</summary>
    bool Trigger(int index, int subindex);

    /// <summary>True if an eventfd is registered for the vector.</summary>
    bool IsConfigured(int index, int subindex);
}
