using Vmig.Devices.Pci;
using Vmig.Migration;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Nvme;

/// <summary>
/// An NVMe controller as a PCIe function served over vfio-user: the PF (primary controller, with the SR-IOV
/// capability) or a VF (secondary controller). BAR0 is 64-bit, 16 KiB: controller registers at 0, doorbells from
/// 0x1000, the MSI-X table at <see cref="MsixTableOffset"/> and the PBA at <see cref="MsixPbaOffset"/>. DMA goes
/// through <see cref="PciFunction.BusMasterDma"/> (nothing while Bus Master Enable is clear) and completion
/// interrupts through <see cref="PciFunction.SignalMsix"/>. A VF's migration driver works only through the primary.
/// </summary>
public sealed class NvmeFunction : PciFunction
{
    /// <summary>PCI class code of an NVM Express I/O controller (mass storage, NVM, NVMe).</summary>
    public const uint NvmeClassCode = 0x010802;

    public const uint MsixTableOffset = 0x2000;
    public const uint MsixPbaOffset = 0x3000;

    private readonly NvmeSubsystem _subsystem;
    private readonly NvmeVfMigration? _migration;

    internal NvmeFunction(NvmeSubsystem subsystem, NvmeController controller, PciFunctionDeclaration declaration)
        : base(declaration)
    {
        _subsystem = subsystem;
        Controller = controller;
        if (!controller.IsPrimary)
        {
            _migration = new NvmeVfMigration(subsystem.Migration, this, controller.Cntlid);
        }
    }

    /// <summary>The controller behind this function.</summary>
    public NvmeController Controller { get; }

    /// <summary>The VF's migration driver (TP4159 commands on the primary); null on the PF, which is never migrated.</summary>
    public override IMigrationDevice? Migration => _migration;

    internal static PciBar[] Bar0 => [new PciBar(NvmeController.Bar0Size, Is64Bit: true)];

    internal static PciFunctionDeclaration Declare(NvmeSubsystemOptions o, bool pf, int vectors) => new()
    {
        VendorId = o.VendorId,
        DeviceId = pf ? o.DeviceId : o.VfDeviceId,
        SubsystemVendorId = o.VendorId,
        SubsystemId = pf ? o.DeviceId : o.VfDeviceId,
        ClassCode = NvmeClassCode,
        Bars = Bar0,
        Msix = new PciMsixLayout(vectors, 0, MsixTableOffset, 0, MsixPbaOffset),
        Sriov = pf && o.MaxSecondaryControllers > 0
            ? new PciSriovLayout((ushort)o.MaxSecondaryControllers, (ushort)o.MaxSecondaryControllers, FirstVfOffset: 1, VfStride: 1, o.VfDeviceId, Bar0)
            : null,
    };

    protected override int ReadBar(int bar, ulong offset, Span<byte> data) =>
        bar == 0 ? Controller.ReadBar0((long)offset, data) : Vmig.VfioUser.Protocol.Errno.EINVAL;

    protected override int WriteBar(int bar, ulong offset, ReadOnlySpan<byte> data) =>
        bar == 0 ? Controller.WriteBar0((long)offset, data) : Vmig.VfioUser.Protocol.Errno.EINVAL;

    protected override void OnFunctionReset() => Controller.Reset();

    public override void OnAttached(DeviceContext context)
    {
        base.OnAttached(context);
        if (_migration is not null && context?.Dma is DmaSpace dma)
        {
            // VFIO variant-driver shape: the VF's DMA_LOGGING_* go to its migration driver, which asks the primary.
            dma.LoggingDriver = _migration;
        }
        int vectors = Declaration.Msix!.VectorCount;
        Controller.Attach(BusMasterDma, v =>
        {
            if (v < vectors)
            {
                SignalMsix(v);
            }
        });
    }

    public override void OnDetached()
    {
        if (Context?.Dma is DmaSpace dma && ReferenceEquals(dma.LoggingDriver, _migration))
        {
            dma.LoggingDriver = null;
        }
        _migration?.OnDetached();
        Controller.Detach();
        base.OnDetached();
    }

    protected override void OnSriovChanged(SriovChangedEventArgs e)
    {
        ArgumentNullException.ThrowIfNull(e);
        if (Controller.IsPrimary)
        {
            _subsystem.SetEnabledVfs(e.Current.VfEnable ? e.Current.NumVfs : 0);
        }
        base.OnSriovChanged(e);
    }
}
