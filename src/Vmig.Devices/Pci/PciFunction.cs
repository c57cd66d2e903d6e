using Vmig.Spec;
using System.Buffers;
using System.Buffers.Binary;
using System.Numerics;
using Vmig.Spec.Pci;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Pci;

/// <summary>
/// A PCIe endpoint function served over vfio-user: a type-0 config space (4 KiB, with extended space) built from a
/// <see cref="PciFunctionDeclaration"/>, with capabilities PM (0x40), MSI-X (0x48, if declared), PCI Express v2
/// endpoint with FLR (0x60) and SR-IOV at 0x100 (if declared). The model enforces write masks (read-only fields stay,
/// RW1C status bits clear on 1), BAR sizing, the command register (Memory Space Enable gates BAR access, Bus Master
/// Enable gates <see cref="BusMasterDma"/>), the MSI-X table and PBA inside their BAR, and function-level reset.
/// </summary>
/// <remarks>
/// Regions use the VFIO PCI indices: BAR0-5 = 0-5 (size = BAR size, or what <see cref="DescribeBarRegion"/> says),
/// ROM (6) and VGA (8) absent, config (7) = 4096 bytes. IRQ index 2 (MSI-X) has the declared vector count.
/// Derived devices implement <see cref="ReadBar"/> / <see cref="WriteBar"/> for their registers and
/// <see cref="OnFunctionReset"/> for their own reset; they raise interrupts with <see cref="SignalMsix"/>.
/// Thread safety: config space and MSI-X state are guarded by one lock, so <see cref="SignalMsix"/> and
/// <see cref="BusMasterDma"/> may be used from device threads while the receive thread serves region accesses.
/// BAR callbacks are called without that lock.
/// </remarks>
public abstract class PciFunction : VfioUserDevice
{
    /// <summary>Offset of the Power Management capability.</summary>
    public const int PmCapabilityOffset = 0x40;
    /// <summary>Offset of the MSI-X capability (when MSI-X is declared).</summary>
    public const int MsixCapabilityOffset = 0x48;
    /// <summary>Offset of the PCI Express capability.</summary>
    public const int PcieCapabilityOffset = 0x60;
    /// <summary>Offset of the SR-IOV extended capability (when declared).</summary>
    public const int SriovCapabilityOffset = PciConfig.ExtendedStart;

    private const uint StateMagic = 0x4643_5056; // "VPCF" little-endian
    private const ushort StateVersion = 1;
    private const int StateHeaderSize = 16;

    private readonly Lock _lock = new();
    private readonly byte[] _config = new byte[PciConfig.Size];
    private readonly byte[] _resetImage = new byte[PciConfig.Size];
    private readonly byte[] _writeMask = new byte[PciConfig.Size];
    private readonly byte[] _w1cMask = new byte[PciConfig.Size];
    private readonly byte[] _msixTable;
    private readonly ulong[] _pba;
    private readonly IReadOnlyList<IrqDescriptor> _irqs;
    private IReadOnlyList<RegionDescriptor>? _regions;

    /// <summary>Builds the function's config space from <paramref name="declaration"/> (validated; <see cref="ArgumentException"/> if invalid).</summary>
    protected PciFunction(PciFunctionDeclaration declaration)
    {
        ArgumentNullException.ThrowIfNull(declaration);
        declaration.Validate();
        Declaration = declaration;
        int vectors = declaration.Msix?.VectorCount ?? 0;
        _msixTable = new byte[vectors * PciMsix.EntrySize];
        _pba = new ulong[(vectors + 63) / 64];
        BuildResetImage();
        ResetStateLocked();
        BusMasterDma = new BusMasterGatedDma(this);
        var irqs = new IrqDescriptor[VfioPci.NumIrqs];
        Array.Fill(irqs, IrqDescriptor.Absent);
        if (vectors > 0)
        {
            irqs[VfioPci.MsixIrqIndex] = new IrqDescriptor((uint)vectors, IrqInfoFlags.Eventfd | IrqInfoFlags.NoResize);
        }
        _irqs = irqs;
    }

    /// <summary>The declaration this function was built from.</summary>
    public PciFunctionDeclaration Declaration { get; }

    /// <summary>
    /// Guest memory for this function's DMA: the attached client's <see cref="DeviceContext.Dma"/>, refused (false)
    /// while Bus Master Enable is clear or no client is attached. A refused access by the guest's DMA windows while
    /// BME is set records Received Master Abort in the Status register, as a requester that got an Unsupported
    /// Request completion does (PCIe §7.5.1.1.4).
    /// </summary>
    public IDmaSpace BusMasterDma { get; }

    /// <summary>Command register Bus Master Enable (bit 2).</summary>
    public bool IsBusMasterEnabled => (ReadConfigByteVolatile(PciConfig.Command) & PciConfig.CommandBusMaster) != 0;

    /// <summary>Command register Memory Space Enable (bit 1).</summary>
    public bool IsMemorySpaceEnabled => (ReadConfigByteVolatile(PciConfig.Command) & PciConfig.CommandMemorySpace) != 0;

    /// <summary>MSI-X Enable in Message Control (false without MSI-X).</summary>
    public bool IsMsixEnabled
    {
        get
        {
            lock (_lock)
            {
                return Declaration.Msix is not null && (MsixControlLocked() & PciMsix.ControlEnable) != 0;
            }
        }
    }

    /// <summary>The current SR-IOV settings (all default without SR-IOV).</summary>
    public SriovState SriovSettings
    {
        get
        {
            lock (_lock)
            {
                return SriovStateLocked();
            }
        }
    }

    /// <summary>Raised after VF Enable, NumVFs or VF MSE change (config write, FLR, reset, state load), outside the model's lock.</summary>
    public event EventHandler<SriovChangedEventArgs>? SriovChanged;

    public override IReadOnlyList<RegionDescriptor> Regions => _regions ??= BuildRegions();

    public override IReadOnlyList<IrqDescriptor> Irqs => _irqs;

    /// <summary>The address programmed into BAR <paramref name="bar"/> (64-bit BARs combine both halves); 0 if absent.</summary>
    public ulong GetBarAddress(int bar)
    {
        lock (_lock)
        {
            return BarAddressLocked(Declaration.GetBar(bar), PciConfig.Bar0 + 4 * bar);
        }
    }

    /// <summary>The VF BAR <paramref name="bar"/> base programmed in the SR-IOV capability (VF n's BAR is base + n × size); 0 if absent.</summary>
    public ulong GetVfBarAddress(int bar)
    {
        lock (_lock)
        {
            var s = Declaration.Sriov;
            var b = s is null || bar < 0 || bar >= s.VfBars.Count ? null : s.VfBars[bar];
            return BarAddressLocked(b, SriovCapabilityOffset + PciSriov.VfBar0 + 4 * bar);
        }
    }

    /// <summary>Reads config space bytes at <paramref name="offset"/> (any width). Throws <see cref="ArgumentOutOfRangeException"/> outside 0..4095.</summary>
    public void ReadConfig(int offset, Span<byte> data)
    {
        CheckConfigRange(offset, data.Length);
        lock (_lock)
        {
            _config.AsSpan(offset, data.Length).CopyTo(data);
        }
    }

    /// <summary>
    /// Writes config space bytes at <paramref name="offset"/> with the hardware's rules: only writable bits change,
    /// RW1C bits clear where 1 is written, BARs take only address bits (all-ones reads back the size mask), DevCtl
    /// Initiate FLR resets the function, SR-IOV VF Enable / NumVFs changes are reported through <see cref="SriovChanged"/>.
    /// </summary>
    public void WriteConfig(int offset, ReadOnlySpan<byte> data)
    {
        CheckConfigRange(offset, data.Length);
        bool flr;
        SriovState before, after;
        lock (_lock)
        {
            before = SriovStateLocked();
            ushort oldPmcsr = ReadU16Locked(PmCapabilityOffset + PciPm.Pmcsr);
            ushort oldNumVfs = Declaration.Sriov is null ? (ushort)0 : ReadU16Locked(SriovCapabilityOffset + PciSriov.NumVfs);
            for (int i = 0; i < data.Length; i++)
            {
                int at = offset + i;
                byte wm = _writeMask[at];
                byte v = (byte)((_config[at] & ~wm) | (data[i] & wm));
                _config[at] = (byte)(v & ~(data[i] & _w1cMask[at]));
            }
            // PMCSR: D1 and D2 are not supported (PMC says so), so writes of those states are ignored (PCI PM 1.2 §5.4.1).
            ushort pmcsr = ReadU16Locked(PmCapabilityOffset + PciPm.Pmcsr);
            if ((pmcsr & PciPm.PmcsrPowerStateMask) is 1 or 2)
            {
                WriteU16Locked(PmCapabilityOffset + PciPm.Pmcsr, (ushort)((pmcsr & ~PciPm.PmcsrPowerStateMask) | (oldPmcsr & PciPm.PmcsrPowerStateMask)));
            }
            if (Declaration.Sriov is { } sriov)
            {
                // NumVFs may change only while VF Enable is clear, and never beyond TotalVFs (PCIe §9.3.3.7: undefined
                // results; we keep the old value).
                ushort numVfs = ReadU16Locked(SriovCapabilityOffset + PciSriov.NumVfs);
                if (numVfs != oldNumVfs && (before.VfEnable || numVfs > sriov.TotalVfs))
                {
                    WriteU16Locked(SriovCapabilityOffset + PciSriov.NumVfs, oldNumVfs);
                }
            }
            int flrByte = PcieCapabilityOffset + PciExpress.DeviceControl + 1;
            flr = flrByte >= offset && flrByte < offset + data.Length && (data[flrByte - offset] & (PciExpress.DevCtlInitiateFlr >> 8)) != 0;
            if (!flr)
            {
                DeliverPendingLocked();
            }
            after = SriovStateLocked();
        }
        if (flr)
        {
            FunctionLevelReset();
            return;
        }
        if (before != after)
        {
            OnSriovChanged(new SriovChangedEventArgs(before, after));
        }
    }

    public sealed override int ReadRegion(int index, ulong offset, Span<byte> data)
    {
        if (!InRegion(index, offset, data.Length))
        {
            return Errno.EINVAL;
        }
        if (index == VfioPci.ConfigRegionIndex)
        {
            ReadConfig((int)offset, data);
            return 0;
        }
        if (!IsMemorySpaceEnabled)
        {
            // A memory read the function does not claim ends in a master abort; the CPU sees all-ones.
            data.Fill(0xFF);
            return 0;
        }
        return TryMsixAccess(index, offset, data, null) ?? ReadBar(index, offset, data);
    }

    public sealed override int WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        if (!InRegion(index, offset, data.Length))
        {
            return Errno.EINVAL;
        }
        if (index == VfioPci.ConfigRegionIndex)
        {
            WriteConfig((int)offset, data);
            return 0;
        }
        if (!IsMemorySpaceEnabled)
        {
            return 0; // dropped, as posted writes to an unclaimed address are
        }
        return TryMsixAccess(index, offset, default, data) ?? WriteBar(index, offset, data);
    }

    /// <summary>DEVICE_RESET: the same reset as an FLR.</summary>
    public sealed override void Reset() => FunctionLevelReset();

    /// <summary>Refuses a client's DEVICE_RESET of a PF with VFs (EBUSY).</summary>
    /// <remarks>
    /// A client's DEVICE_RESET of a PF whose VFs are enabled is refused with EBUSY: an FLR clears VF Enable (SR-IOV
    /// 1.1 §3.3.3.1) and would tear down every VF other VMs are using (QEMU resets every vfio-user device it
    /// attaches, so merely attaching the host-only PF socket did that). Disable SR-IOV first, or FLR through the
    /// PCIe Device Control register, which stays exactly as the spec says.
    /// </remarks>
    public override int PrepareReset() => Declaration.Sriov is not null && SriovSettings.VfEnable ? Errno.EBUSY : 0;

    /// <summary>
    /// Resets the function: config space to its power-on image (BARs, command, MSI-X enable, VF Enable cleared), all
    /// MSI-X vectors masked, PBA cleared; then <see cref="OnFunctionReset"/>, then <see cref="SriovChanged"/> if VFs went away.
    /// </summary>
    public void FunctionLevelReset()
    {
        SriovState before, after;
        lock (_lock)
        {
            before = SriovStateLocked();
            ResetStateLocked();
            after = SriovStateLocked();
        }
        OnFunctionReset();
        if (before != after)
        {
            OnSriovChanged(new SriovChangedEventArgs(before, after));
        }
    }

    /// <summary>
    /// Raises MSI-X <paramref name="vector"/>: delivered now (IRQ index 2, subindex = vector) if MSI-X is enabled, the
    /// function is not masked and the vector is not masked; otherwise its PBA bit is set and it is delivered when that
    /// changes. Returns true if delivered now. Throws <see cref="ArgumentOutOfRangeException"/> for a vector outside the table.
    /// </summary>
    public bool SignalMsix(int vector)
    {
        var m = Declaration.Msix;
        ArgumentOutOfRangeException.ThrowIfNegative(vector);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(vector, m?.VectorCount ?? 0);
        lock (_lock)
        {
            if (CanDeliverLocked() && Context is { } ctx && ctx.Irqs.Trigger(VfioPci.MsixIrqIndex, vector))
            {
                return true;
            }
            _pba[vector >> 6] |= 1UL << (vector & 63);
            return false;
        }
    }

    /// <summary>Whether <paramref name="vector"/>'s PBA bit is set.</summary>
    public bool IsMsixPending(int vector)
    {
        lock (_lock)
        {
            return vector >= 0 && vector < (Declaration.Msix?.VectorCount ?? 0) && (_pba[vector >> 6] & (1UL << (vector & 63))) != 0;
        }
    }

    /// <summary>
    /// Config-space state for migration: config space, MSI-X table and PBA in a self-checking record
    /// (magic "VPCF", version, lengths, CRC32C). Layout: u32 magic, u16 version, u16 0, u32 config length (4096),
    /// u32 vector count, config bytes, table (16 B per vector), PBA (u64 words), u32 CRC32C of everything before it.
    /// </summary>
    public byte[] SaveConfigState()
    {
        int vectors = Declaration.Msix?.VectorCount ?? 0;
        var buf = new byte[StateLength(vectors)];
        BinaryPrimitives.WriteUInt32LittleEndian(buf, StateMagic);
        BinaryPrimitives.WriteUInt16LittleEndian(buf.AsSpan(4), StateVersion);
        BinaryPrimitives.WriteUInt32LittleEndian(buf.AsSpan(8), PciConfig.Size);
        BinaryPrimitives.WriteUInt32LittleEndian(buf.AsSpan(12), (uint)vectors);
        int at = StateHeaderSize;
        lock (_lock)
        {
            _config.CopyTo(buf, at);
            at += PciConfig.Size;
            _msixTable.CopyTo(buf, at);
            at += _msixTable.Length;
            foreach (ulong w in _pba)
            {
                BinaryPrimitives.WriteUInt64LittleEndian(buf.AsSpan(at), w);
                at += 8;
            }
        }
        BinaryPrimitives.WriteUInt32LittleEndian(buf.AsSpan(at), Crc32C.Compute(buf.AsSpan(0, at)));
        return buf;
    }

    /// <summary>
    /// Loads a <see cref="SaveConfigState"/> record. Throws <see cref="InvalidDataException"/> (state unchanged) if the
    /// record is truncated, has a bad magic/version/length/CRC, was saved by a function with a different vector count,
    /// or its read-only bits differ from this function's declaration (another device kind or profile).
    /// </summary>
    public void LoadConfigState(ReadOnlySpan<byte> state)
    {
        int vectors = Declaration.Msix?.VectorCount ?? 0;
        if (state.Length < StateHeaderSize + 4)
        {
            throw new InvalidDataException($"PCI config state of {state.Length} bytes is truncated");
        }
        if (BinaryPrimitives.ReadUInt32LittleEndian(state) != StateMagic)
        {
            throw new InvalidDataException("PCI config state has a bad magic");
        }
        ushort version = BinaryPrimitives.ReadUInt16LittleEndian(state[4..]);
        if (version != StateVersion)
        {
            throw new InvalidDataException($"PCI config state version {version} is not supported (expected {StateVersion})");
        }
        uint configLength = BinaryPrimitives.ReadUInt32LittleEndian(state[8..]);
        uint savedVectors = BinaryPrimitives.ReadUInt32LittleEndian(state[12..]);
        if (configLength != PciConfig.Size || savedVectors != (uint)vectors)
        {
            throw new InvalidDataException($"PCI config state holds {configLength} config bytes and {savedVectors} MSI-X vectors; this function has {PciConfig.Size} and {vectors}");
        }
        if (state.Length != StateLength(vectors))
        {
            throw new InvalidDataException($"PCI config state is {state.Length} bytes; expected {StateLength(vectors)}");
        }
        int crcAt = state.Length - 4;
        if (Crc32C.Compute(state[..crcAt]) != BinaryPrimitives.ReadUInt32LittleEndian(state[crcAt..]))
        {
            throw new InvalidDataException("PCI config state CRC32C mismatch");
        }
        var config = state.Slice(StateHeaderSize, PciConfig.Size);
        for (int i = 0; i < PciConfig.Size; i++)
        {
            byte ro = (byte)~(_writeMask[i] | _w1cMask[i]);
            if ((config[i] & ro) != (_resetImage[i] & ro))
            {
                throw new InvalidDataException($"PCI config state differs from this function in read-only bits at 0x{i:X3} (saved 0x{config[i]:X2}, here 0x{_resetImage[i]:X2})");
            }
        }
        var table = state.Slice(StateHeaderSize + PciConfig.Size, _msixTable.Length);
        for (int v = 0; v < vectors; v++)
        {
            if ((BinaryPrimitives.ReadUInt32LittleEndian(table[(v * PciMsix.EntrySize + PciMsix.EntryVectorControl)..]) & ~PciMsix.VectorControlMask) != 0)
            {
                throw new InvalidDataException($"PCI config state: MSI-X vector {v} has reserved Vector Control bits set");
            }
        }
        var pba = new ulong[_pba.Length];
        var pbaBytes = state.Slice(StateHeaderSize + PciConfig.Size + _msixTable.Length, pba.Length * 8);
        for (int w = 0; w < pba.Length; w++)
        {
            pba[w] = BinaryPrimitives.ReadUInt64LittleEndian(pbaBytes[(w * 8)..]);
        }
        if (pba.Length > 0 && (vectors & 63) != 0 && (pba[^1] >> (vectors & 63)) != 0)
        {
            throw new InvalidDataException("PCI config state: PBA has bits set beyond the last vector");
        }
        SriovState before, after;
        lock (_lock)
        {
            before = SriovStateLocked();
            config.CopyTo(_config);
            table.CopyTo(_msixTable);
            pba.CopyTo(_pba, 0);
            after = SriovStateLocked();
        }
        if (before != after)
        {
            OnSriovChanged(new SriovChangedEventArgs(before, after));
        }
    }

    /// <summary>Reads BAR registers (MSE is on; MSI-X ranges are served by the model). Return 0 or an errno.</summary>
    protected virtual int ReadBar(int bar, ulong offset, Span<byte> data)
    {
        data.Clear();
        return 0;
    }

    /// <summary>Writes BAR registers (MSE is on; MSI-X ranges are served by the model). Return 0 or an errno.</summary>
    protected virtual int WriteBar(int bar, ulong offset, ReadOnlySpan<byte> data) => 0;

    /// <summary>Device-specific reset after an FLR or DEVICE_RESET (config space is already reset). Called without the model's lock.</summary>
    protected virtual void OnFunctionReset()
    {
    }

    /// <summary>
    /// The region info of BAR <paramref name="bar"/>: by default the whole BAR, readable and writable. A device may
    /// report less (registers hidden from the client stay reachable only from inside the device host) or add mmap.
    /// </summary>
    protected virtual RegionDescriptor DescribeBarRegion(int bar, PciBar declared)
    {
        ArgumentNullException.ThrowIfNull(declared);
        return new RegionDescriptor(declared.Size, RegionFlags.Read | RegionFlags.Write);
    }

    /// <summary>Raises <see cref="SriovChanged"/>; a PF override may create or remove VFs before or after.</summary>
    protected virtual void OnSriovChanged(SriovChangedEventArgs e) => SriovChanged?.Invoke(this, e);

    private void BuildResetImage()
    {
        var d = Declaration;
        var c = _resetImage.AsSpan();
        BinaryPrimitives.WriteUInt16LittleEndian(c[PciConfig.VendorId..], d.VendorId);
        BinaryPrimitives.WriteUInt16LittleEndian(c[PciConfig.DeviceId..], d.DeviceId);
        SetMask16(PciConfig.Command, PciConfig.CommandMemorySpace | PciConfig.CommandBusMaster | PciConfig.CommandParityErrorResponse
            | PciConfig.CommandSerrEnable | PciConfig.CommandInterruptDisable);
        BinaryPrimitives.WriteUInt16LittleEndian(c[PciConfig.Status..], PciConfig.StatusCapabilitiesList);
        SetW1c16(PciConfig.Status, PciConfig.StatusMasterDataParityError | PciConfig.StatusSignaledTargetAbort | PciConfig.StatusReceivedTargetAbort
            | PciConfig.StatusReceivedMasterAbort | PciConfig.StatusSignaledSystemError | PciConfig.StatusDetectedParityError);
        c[PciConfig.RevisionId] = d.RevisionId;
        c[PciConfig.ClassCode] = (byte)d.ClassCode;
        c[PciConfig.ClassCode + 1] = (byte)(d.ClassCode >> 8);
        c[PciConfig.ClassCode + 2] = (byte)(d.ClassCode >> 16);
        _writeMask[PciConfig.CacheLineSize] = 0xFF;
        BuildBars(d.Bars, PciConfig.Bar0);
        BinaryPrimitives.WriteUInt16LittleEndian(c[PciConfig.SubsystemVendorId..], d.SubsystemVendorId);
        BinaryPrimitives.WriteUInt16LittleEndian(c[PciConfig.SubsystemId..], d.SubsystemId);
        _writeMask[PciConfig.InterruptLine] = 0xFF;
        c[PciConfig.CapabilitiesPointer] = PmCapabilityOffset;

        // Power Management: version 3 (PMC bits 2:0 = 011), D0 and D3hot only, No_Soft_Reset so D3hot → D0 keeps state.
        int pm = PmCapabilityOffset;
        c[pm] = PciCapabilityId.PowerManagement;
        c[pm + 1] = d.Msix is null ? (byte)PcieCapabilityOffset : (byte)MsixCapabilityOffset;
        BinaryPrimitives.WriteUInt16LittleEndian(c[(pm + PciPm.Pmc)..], 0x0003);
        BinaryPrimitives.WriteUInt16LittleEndian(c[(pm + PciPm.Pmcsr)..], PciPm.PmcsrNoSoftReset);
        SetMask16(pm + PciPm.Pmcsr, PciPm.PmcsrPowerStateMask);
        SetW1c16(pm + PciPm.Pmcsr, PciPm.PmcsrPmeStatus);

        if (d.Msix is { } m)
        {
            int mx = MsixCapabilityOffset;
            c[mx] = PciCapabilityId.MsiX;
            c[mx + 1] = PcieCapabilityOffset;
            BinaryPrimitives.WriteUInt16LittleEndian(c[(mx + PciMsix.MessageControl)..], (ushort)(m.VectorCount - 1));
            SetMask16(mx + PciMsix.MessageControl, PciMsix.ControlEnable | PciMsix.ControlFunctionMask);
            BinaryPrimitives.WriteUInt32LittleEndian(c[(mx + PciMsix.TableOffsetBir)..], m.TableOffset | (uint)m.TableBar);
            BinaryPrimitives.WriteUInt32LittleEndian(c[(mx + PciMsix.PbaOffsetBir)..], m.PbaOffset | (uint)m.PbaBar);
        }

        // PCI Express capability v2, Device/Port Type 0000b (PCI Express Endpoint), next = 0 (end of list).
        int pe = PcieCapabilityOffset;
        c[pe] = PciCapabilityId.PciExpress;
        BinaryPrimitives.WriteUInt16LittleEndian(c[(pe + PciExpress.Capabilities)..], 0x0002);
        // DevCap: Max_Payload_Size Supported 128 B (000b), FLR capable, role-based error reporting.
        BinaryPrimitives.WriteUInt32LittleEndian(c[(pe + PciExpress.DeviceCapabilities)..], PciExpress.DevCapFlr | PciExpress.DevCapRoleBasedErrorReporting);
        // DevCtl defaults (PCIe §7.5.3.4): Enable Relaxed Ordering, Enable No Snoop, Max_Read_Request_Size 512 B (010b).
        BinaryPrimitives.WriteUInt16LittleEndian(c[(pe + PciExpress.DeviceControl)..], 0x2810);
        // Writable: error reporting enables (3:0), relaxed ordering (4), MPS (7:5), aux power PM (10), no snoop (11),
        // MRRS (14:12). Extended Tag and Phantom Functions are not supported (RO 0); Initiate FLR always reads 0.
        SetMask16(pe + PciExpress.DeviceControl, 0x7CFF);
        SetW1c16(pe + PciExpress.DeviceStatus, PciExpress.DevStaErrorBits);
        // Link: 2.5 GT/s x1 (the link is virtual; these only need to be self-consistent).
        BinaryPrimitives.WriteUInt32LittleEndian(c[(pe + PciExpress.LinkCapabilities)..], 0x11);
        SetMask16(pe + PciExpress.LinkControl, 0x00C3);
        BinaryPrimitives.WriteUInt16LittleEndian(c[(pe + PciExpress.LinkStatus)..], 0x11);

        if (d.Sriov is { } s)
        {
            int sr = SriovCapabilityOffset;
            // Extended capability header: ID 0x0010, version 1, next offset 0 (bits 31:20).
            BinaryPrimitives.WriteUInt32LittleEndian(c[sr..], PciCapabilityId.ExtendedSriov | (1u << 16));
            SetMask16(sr + PciSriov.Control, PciSriov.ControlVfEnable | PciSriov.ControlVfMemorySpaceEnable | PciSriov.ControlAriCapableHierarchy);
            BinaryPrimitives.WriteUInt16LittleEndian(c[(sr + PciSriov.InitialVfs)..], s.InitialVfs);
            BinaryPrimitives.WriteUInt16LittleEndian(c[(sr + PciSriov.TotalVfs)..], s.TotalVfs);
            SetMask16(sr + PciSriov.NumVfs, 0xFFFF);
            BinaryPrimitives.WriteUInt16LittleEndian(c[(sr + PciSriov.FirstVfOffset)..], s.FirstVfOffset);
            BinaryPrimitives.WriteUInt16LittleEndian(c[(sr + PciSriov.VfStride)..], s.VfStride);
            BinaryPrimitives.WriteUInt16LittleEndian(c[(sr + PciSriov.VfDeviceId)..], s.VfDeviceId);
            BinaryPrimitives.WriteUInt32LittleEndian(c[(sr + PciSriov.SupportedPageSizes)..], s.SupportedPageSizes);
            // System Page Size defaults to 4 KiB (bit 0); only supported sizes should be written (PCIe §9.3.3.13).
            BinaryPrimitives.WriteUInt32LittleEndian(c[(sr + PciSriov.SystemPageSize)..], 1);
            SetMask32(sr + PciSriov.SystemPageSize, s.SupportedPageSizes);
            BuildBars(s.VfBars, sr + PciSriov.VfBar0);
        }
    }

    private void BuildBars(IReadOnlyList<PciBar?> bars, int baseOffset)
    {
        for (int i = 0; i < bars.Count; i++)
        {
            if (bars[i] is not { } b)
            {
                continue;
            }
            int at = baseOffset + 4 * i;
            // Address bits below the size are hardwired to 0, so writing all-ones reads back the size mask (PCI 3.0 §6.2.5.1).
            ulong addrMask = ~(b.Size - 1);
            BinaryPrimitives.WriteUInt32LittleEndian(_resetImage.AsSpan(at), b.FlagBits);
            SetMask32(at, (uint)addrMask & ~PciConfig.BarFlagsMask);
            if (b.Is64Bit)
            {
                SetMask32(at + 4, (uint)(addrMask >> 32));
                i++;
            }
        }
    }

    private void SetMask16(int at, int mask) => BinaryPrimitives.WriteUInt16LittleEndian(_writeMask.AsSpan(at), (ushort)mask);

    private void SetMask32(int at, uint mask) => BinaryPrimitives.WriteUInt32LittleEndian(_writeMask.AsSpan(at), mask);

    private void SetW1c16(int at, int mask) => BinaryPrimitives.WriteUInt16LittleEndian(_w1cMask.AsSpan(at), (ushort)mask);

    private void ResetStateLocked()
    {
        _resetImage.CopyTo(_config, 0);
        Array.Clear(_msixTable);
        for (int v = 0; v < _msixTable.Length / PciMsix.EntrySize; v++)
        {
            // Vector Control Mask Bit resets to 1 (PCIe §7.7.2.6: every vector starts masked).
            _msixTable[v * PciMsix.EntrySize + PciMsix.EntryVectorControl] = 1;
        }
        Array.Clear(_pba);
    }

    private IReadOnlyList<RegionDescriptor> BuildRegions()
    {
        var r = new RegionDescriptor[VfioPci.NumRegions];
        Array.Fill(r, RegionDescriptor.Absent);
        for (int i = 0; i < 6; i++)
        {
            if (Declaration.GetBar(i) is { } b)
            {
                r[i] = DescribeBarRegion(i, b);
            }
        }
        r[VfioPci.ConfigRegionIndex] = new RegionDescriptor(PciConfig.Size, RegionFlags.Read | RegionFlags.Write);
        return r;
    }

    private bool InRegion(int index, ulong offset, int length)
    {
        var regions = Regions;
        if (index < 0 || index >= regions.Count || index == VfioPci.RomRegionIndex || index == VfioPci.VgaRegionIndex)
        {
            return false;
        }
        ulong size = regions[index].Size;
        return size != 0 && offset <= size && (ulong)length <= size - offset;
    }

    /// <summary>Serves an access inside the MSI-X table or PBA; null if the access touches neither.</summary>
    private int? TryMsixAccess(int bar, ulong offset, Span<byte> read, ReadOnlySpan<byte> write)
    {
        if (Declaration.Msix is not { } m)
        {
            return null;
        }
        bool isWrite = read.IsEmpty;
        ulong len = (ulong)(isWrite ? write.Length : read.Length);
        if (bar == m.TableBar && Overlaps(offset, len, m.TableOffset, m.TableSize))
        {
            if (!Within(offset, len, m.TableOffset, m.TableSize))
            {
                return Errno.EINVAL; // straddles the table edge: not a legal MSI-X access (PCIe §6.1.4.2: DWORD/QWORD only)
            }
            int at = (int)(offset - m.TableOffset);
            lock (_lock)
            {
                if (isWrite)
                {
                    WriteMsixTableLocked(at, write);
                }
                else
                {
                    _msixTable.AsSpan(at, read.Length).CopyTo(read);
                }
            }
            return 0;
        }
        if (bar == m.PbaBar && Overlaps(offset, len, m.PbaOffset, m.PbaSize))
        {
            if (!Within(offset, len, m.PbaOffset, m.PbaSize))
            {
                return Errno.EINVAL;
            }
            if (!isWrite)
            {
                Span<byte> pba = stackalloc byte[(int)m.PbaSize];
                lock (_lock)
                {
                    for (int w = 0; w < _pba.Length; w++)
                    {
                        BinaryPrimitives.WriteUInt64LittleEndian(pba[(w * 8)..], _pba[w]);
                    }
                }
                pba.Slice((int)(offset - m.PbaOffset), read.Length).CopyTo(read);
            }
            return 0; // PBA is read-only; writes are ignored (PCIe §7.7.2.7)
        }
        return null;
    }

    private void WriteMsixTableLocked(int at, ReadOnlySpan<byte> data)
    {
        for (int i = 0; i < data.Length; i++)
        {
            int b = at + i;
            int inEntry = b % PciMsix.EntrySize;
            if (inEntry >= PciMsix.EntryVectorControl)
            {
                // Vector Control: only the Mask Bit (bit 0) is writable; the rest is reserved (RO 0).
                if (inEntry == PciMsix.EntryVectorControl)
                {
                    _msixTable[b] = (byte)((_msixTable[b] & ~1) | (data[i] & 1));
                }
                continue;
            }
            _msixTable[b] = data[i];
        }
        DeliverPendingLocked();
    }

    /// <remarks>
    /// The per-vector mask bits of our own MSI-X table do not gate delivery. Under VFIO the VMM virtualizes the
    /// MSI-X table (QEMU's vfio-user-pci arms vectors with DEVICE_SET_IRQS and never writes the device's table, whose
    /// mask bits therefore stay at their reset value, masked: PCI 3.0 §6.8.2.9); the host side keeps assigned vectors
    /// unmasked, as vfio-pci does with the real table. So a vector is delivered when MSI-X is enabled, the function
    /// is not masked, and the client armed it (an eventfd in the IRQ table); otherwise it is left pending in the PBA.
    /// Found by Linux's nvme driver through QEMU (docs/realguest.md).
    /// </remarks>
    private bool CanDeliverLocked()
    {
        ushort ctl = MsixControlLocked();
        return (ctl & PciMsix.ControlEnable) != 0 && (ctl & PciMsix.ControlFunctionMask) == 0;
    }

    /// <summary>Sends every pending vector that may now be delivered and clears the PBA bit of each one sent (PCIe §6.1.4.5).</summary>
    private void DeliverPendingLocked()
    {
        // Delivery depends on Message Control only (see CanDeliverLocked), so it is decided once for every vector.
        if (Context is not { } ctx || !CanDeliverLocked())
        {
            return;
        }
        for (int w = 0; w < _pba.Length; w++)
        {
            ulong bits = _pba[w];
            while (bits != 0)
            {
                int bit = BitOperations.TrailingZeroCount(bits);
                bits &= bits - 1;
                // A vector the client has not armed stays pending, as SignalMsix leaves it.
                if (ctx.Irqs.Trigger(VfioPci.MsixIrqIndex, w * 64 + bit))
                {
                    _pba[w] &= ~(1UL << bit);
                }
            }
        }
    }

    private ushort MsixControlLocked() => ReadU16Locked(MsixCapabilityOffset + PciMsix.MessageControl);

    private SriovState SriovStateLocked()
    {
        if (Declaration.Sriov is null)
        {
            return default;
        }
        ushort ctl = ReadU16Locked(SriovCapabilityOffset + PciSriov.Control);
        return new SriovState(
            (ctl & PciSriov.ControlVfEnable) != 0,
            ReadU16Locked(SriovCapabilityOffset + PciSriov.NumVfs),
            (ctl & PciSriov.ControlVfMemorySpaceEnable) != 0);
    }

    private ulong BarAddressLocked(PciBar? b, int at)
    {
        if (b is null)
        {
            return 0;
        }
        ulong lo = BinaryPrimitives.ReadUInt32LittleEndian(_config.AsSpan(at)) & ~PciConfig.BarFlagsMask;
        return b.Is64Bit ? lo | ((ulong)BinaryPrimitives.ReadUInt32LittleEndian(_config.AsSpan(at + 4)) << 32) : lo;
    }

    private ushort ReadU16Locked(int at) => BinaryPrimitives.ReadUInt16LittleEndian(_config.AsSpan(at));

    private void WriteU16Locked(int at, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(_config.AsSpan(at), v);

    private byte ReadConfigByteVolatile(int at) => Volatile.Read(ref _config[at]);

    /// <summary>Sets RW1C Status bits the hardware reports (e.g. Received Master Abort after a failed DMA).</summary>
    private void SetStatusBits(ushort bits)
    {
        lock (_lock)
        {
            WriteU16Locked(PciConfig.Status, (ushort)(ReadU16Locked(PciConfig.Status) | bits));
        }
    }

    private static void CheckConfigRange(int offset, int length)
    {
        if (offset < 0 || length < 0 || offset > PciConfig.Size - length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"config access [{offset}, +{length}) is outside 0..{PciConfig.Size - 1}");
        }
    }

    private static bool Overlaps(ulong offset, ulong len, ulong start, ulong size) => offset < start + size && start < offset + len;

    private static bool Within(ulong offset, ulong len, ulong start, ulong size) => offset >= start && offset + len <= start + size;

    private static int StateLength(int vectors) => StateHeaderSize + PciConfig.Size + vectors * PciMsix.EntrySize + (vectors + 63) / 64 * 8 + 4;

    /// <summary>The DMA view handed to derived devices: refuses everything while Bus Master Enable is clear.</summary>
    private sealed class BusMasterGatedDma(PciFunction owner) : IDmaSpace
    {
        public bool TryRead(ulong iova, Span<byte> destination) => Check(Dma()?.TryRead(iova, destination));

        public bool TryWrite(ulong iova, ReadOnlySpan<byte> source) => Check(Dma()?.TryWrite(iova, source));

        public bool TryReadUInt32(ulong iova, out uint value)
        {
            value = 0;
            var d = Dma();
            return Check(d is null ? null : d.TryReadUInt32(iova, out value));
        }

        public bool TryWriteUInt32(ulong iova, uint value) => Check(Dma()?.TryWriteUInt32(iova, value));

        // A refusal is not an error (the caller falls back to TryRead/TryWrite, which reports the abort): no Check.
        public bool TryLendWritable<TState>(ulong iova, int length, TState state, SpanAction<byte, TState> action) =>
            Dma()?.TryLendWritable(iova, length, state, action) == true;

        public bool TryLendReadable<TState>(ulong iova, int length, TState state, ReadOnlySpanAction<byte, TState> action) =>
            Dma()?.TryLendReadable(iova, length, state, action) == true;

        private IDmaSpace? Dma() => owner.IsBusMasterEnabled ? owner.Context?.Dma : null;

        private bool Check(bool? result)
        {
            if (result == false)
            {
                owner.SetStatusBits(PciConfig.StatusReceivedMasterAbort);
            }
            return result == true;
        }
    }
}

/// <summary>The SR-IOV settings software has written: VF Enable, NumVFs, VF Memory Space Enable.</summary>
public readonly record struct SriovState(bool VfEnable, ushort NumVfs, bool VfMemorySpaceEnable);

/// <summary>SR-IOV settings before and after a change.</summary>
public sealed class SriovChangedEventArgs(SriovState previous, SriovState current) : EventArgs
{
    public SriovState Previous { get; } = previous;
    public SriovState Current { get; } = current;
}
