using System.Buffers.Binary;
using Vmig.Devices.Pci;
using Vmig.Spec.Pci;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Tests.Pci;

public sealed class PciFunctionTests : IDisposable
{
    private const int Vectors = 70; // more than 64, so the PBA has two words

    private readonly GuestRam _ram = new(1 << 20, Vectors);

    public void Dispose() => _ram.Dispose();

    /// <summary>A function with registers in BAR0 (a scratch array), MSI-X in BAR2 (64-bit), SR-IOV optional.</summary>
    private sealed class TestFunction(PciFunctionDeclaration d) : PciFunction(d)
    {
        public readonly byte[] Registers = new byte[0x1000];
        public int Resets;
        public int BarWrites;
        public readonly List<SriovChangedEventArgs> SriovEvents = [];

        protected override int ReadBar(int bar, ulong offset, Span<byte> data)
        {
            if (bar != 0)
            {
                return Errno.EINVAL;
            }
            Registers.AsSpan((int)offset, data.Length).CopyTo(data);
            return 0;
        }

        protected override int WriteBar(int bar, ulong offset, ReadOnlySpan<byte> data)
        {
            BarWrites++;
            data.CopyTo(Registers.AsSpan((int)offset));
            return 0;
        }

        protected override void OnFunctionReset() => Resets++;

        protected override void OnSriovChanged(SriovChangedEventArgs e)
        {
            SriovEvents.Add(e);
            base.OnSriovChanged(e);
        }
    }

    private static PciFunctionDeclaration Declaration(bool sriov = true, ushort deviceId = 0x1234) => new()
    {
        VendorId = 0x1AF4,
        DeviceId = deviceId,
        SubsystemVendorId = 0x1AF4,
        SubsystemId = 0x0042,
        RevisionId = 3,
        ClassCode = 0x120000,
        Bars = [new PciBar(0x1000), null, new PciBar(0x4000, Is64Bit: true, Prefetchable: true), null, new PciBar(0x100)],
        Msix = new PciMsixLayout(Vectors, TableBar: 2, TableOffset: 0, PbaBar: 2, PbaOffset: 0x2000),
        Sriov = sriov
            ? new PciSriovLayout(TotalVfs: 8, InitialVfs: 8, FirstVfOffset: 1, VfStride: 1, VfDeviceId: 0x1235,
                VfBars: [new PciBar(0x2000), null, new PciBar(0x10_0000, Is64Bit: true)])
            : null,
    };

    private TestFunction Attached(bool sriov = true)
    {
        var f = new TestFunction(Declaration(sriov));
        f.OnAttached(_ram.Context);
        return f;
    }

    private static uint Cfg32(PciFunction f, int at)
    {
        Span<byte> b = stackalloc byte[4];
        Assert.Equal(0, f.ReadRegion(VfioPci.ConfigRegionIndex, (ulong)at, b));
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private static ushort Cfg16(PciFunction f, int at)
    {
        Span<byte> b = stackalloc byte[2];
        Assert.Equal(0, f.ReadRegion(VfioPci.ConfigRegionIndex, (ulong)at, b));
        return BinaryPrimitives.ReadUInt16LittleEndian(b);
    }

    private static void SetCfg32(PciFunction f, int at, uint v)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, v);
        Assert.Equal(0, f.WriteRegion(VfioPci.ConfigRegionIndex, (ulong)at, b));
    }

    private static void SetCfg16(PciFunction f, int at, ushort v)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, v);
        Assert.Equal(0, f.WriteRegion(VfioPci.ConfigRegionIndex, (ulong)at, b));
    }

    private static uint Bar32(PciFunction f, int bar, ulong offset)
    {
        Span<byte> b = stackalloc byte[4];
        Assert.Equal(0, f.ReadRegion(bar, offset, b));
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private static void SetBar32(PciFunction f, int bar, ulong offset, uint v)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, v);
        Assert.Equal(0, f.WriteRegion(bar, offset, b));
    }

    private static void EnableMemoryAndBusMaster(PciFunction f) =>
        SetCfg16(f, PciConfig.Command, PciConfig.CommandMemorySpace | PciConfig.CommandBusMaster);

    private static void EnableMsix(PciFunction f, bool functionMask = false) =>
        SetCfg16(f, PciFunction.MsixCapabilityOffset + PciMsix.MessageControl,
            (ushort)(PciMsix.ControlEnable | (functionMask ? PciMsix.ControlFunctionMask : 0)));

    private static void SetVectorMask(PciFunction f, int vector, bool masked) =>
        SetBar32(f, 2, (ulong)(vector * PciMsix.EntrySize + PciMsix.EntryVectorControl), masked ? 1u : 0u);

    [Fact]
    public void CapabilityListWalk_FindsPmMsixPcieThenSriovAt0x100()
    {
        var f = Attached();
        Assert.NotEqual(0, Cfg16(f, PciConfig.Status) & PciConfig.StatusCapabilitiesList);
        var ids = new List<(int At, byte Id)>();
        int at = (int)(Cfg32(f, PciConfig.CapabilitiesPointer) & 0xFF);
        while (at != 0)
        {
            Assert.True(at >= 0x40 && at < 0x100 && (at & 3) == 0, $"capability pointer 0x{at:X} must be dword-aligned in 0x40..0xFF");
            uint hdr = Cfg32(f, at);
            ids.Add((at, (byte)hdr));
            Assert.True(ids.Count < 48, "capability list loops");
            at = (int)(hdr >> 8) & 0xFC;
        }
        Assert.Equal([(0x40, PciCapabilityId.PowerManagement), (0x48, PciCapabilityId.MsiX), (0x60, PciCapabilityId.PciExpress)], ids);

        uint ext = Cfg32(f, PciConfig.ExtendedStart);
        Assert.Equal(PciCapabilityId.ExtendedSriov, (ushort)ext);
        Assert.Equal(1u, (ext >> 16) & 0xF);
        Assert.Equal(0u, ext >> 20); // last extended capability

        Assert.Equal(0x1AF4u | (0x1234u << 16), Cfg32(f, PciConfig.VendorId));
        Assert.Equal(0x12000003u, Cfg32(f, PciConfig.RevisionId));
        Assert.Equal(0x00421AF4u, Cfg32(f, PciConfig.SubsystemVendorId));
        Assert.Equal(0, Cfg16(f, PciFunction.PcieCapabilityOffset + PciExpress.Capabilities) & 0xF0); // endpoint
        Assert.NotEqual(0u, Cfg32(f, PciFunction.PcieCapabilityOffset + PciExpress.DeviceCapabilities) & PciExpress.DevCapFlr);
        // MSI-X: Table Size = N-1, table in BAR2 at 0, PBA in BAR2 at 0x2000.
        Assert.Equal(Vectors - 1, Cfg16(f, PciFunction.MsixCapabilityOffset + PciMsix.MessageControl) & PciMsix.ControlTableSizeMask);
        Assert.Equal(2u, Cfg32(f, PciFunction.MsixCapabilityOffset + PciMsix.TableOffsetBir));
        Assert.Equal(0x2002u, Cfg32(f, PciFunction.MsixCapabilityOffset + PciMsix.PbaOffsetBir));
    }

    [Fact]
    public void NoSriov_ExtendedSpaceIsEmptyAndPmLinksStraightToMsix()
    {
        var f = Attached(sriov: false);
        Assert.Equal(0u, Cfg32(f, PciConfig.ExtendedStart));
        SetCfg32(f, PciConfig.ExtendedStart + PciSriov.NumVfs, 0xFFFF_FFFF);
        Assert.Equal(0u, Cfg32(f, PciConfig.ExtendedStart + PciSriov.NumVfs));
    }

    [Fact]
    public void ReadOnlyFields_IgnoreWrites()
    {
        var f = Attached();
        var before = new byte[PciConfig.Size];
        f.ReadConfig(0, before);
        foreach (int at in new[] { PciConfig.VendorId, PciConfig.RevisionId, PciConfig.SubsystemVendorId, PciConfig.CapabilitiesPointer,
                     PciFunction.MsixCapabilityOffset + PciMsix.TableOffsetBir, PciFunction.PcieCapabilityOffset + PciExpress.DeviceCapabilities,
                     PciConfig.ExtendedStart, PciConfig.ExtendedStart + PciSriov.InitialVfs, PciConfig.ExtendedStart + PciSriov.FirstVfOffset,
                     PciConfig.Bar0 + 4 /* BAR1: upper half of nothing, unimplemented */, PciConfig.ExpansionRom })
        {
            SetCfg32(f, at, 0xA5A5_5A5A);
            Assert.Equal(BinaryPrimitives.ReadUInt32LittleEndian(before.AsSpan(at)), Cfg32(f, at));
        }
        // Command: only the implemented bits stick (I/O space and reserved bits stay 0).
        SetCfg16(f, PciConfig.Command, 0xFFFF);
        Assert.Equal(0x0546, Cfg16(f, PciConfig.Command));
        // Cache line size is RW, header type RO.
        SetCfg32(f, PciConfig.CacheLineSize, 0xFFFF_FFFF);
        Assert.Equal(0x0000_00FFu, Cfg32(f, PciConfig.CacheLineSize));
        // DevCtl: Extended Tag, Phantom Functions stay 0; Initiate FLR reads 0 (FLR tested separately).
        SetCfg16(f, PciFunction.PcieCapabilityOffset + PciExpress.DeviceControl, 0x0300);
        Assert.Equal(0, Cfg16(f, PciFunction.PcieCapabilityOffset + PciExpress.DeviceControl) & 0x8300);
        // PMCSR: D1/D2 (unsupported) are refused, D3hot sticks.
        SetCfg16(f, PciFunction.PmCapabilityOffset + PciPm.Pmcsr, 1);
        Assert.Equal(0, Cfg16(f, PciFunction.PmCapabilityOffset + PciPm.Pmcsr) & 3);
        SetCfg16(f, PciFunction.PmCapabilityOffset + PciPm.Pmcsr, 3);
        Assert.Equal(3, Cfg16(f, PciFunction.PmCapabilityOffset + PciPm.Pmcsr) & 3);
    }

    [Fact]
    public void StatusReceivedMasterAbort_SetByFailedDma_IsRw1c()
    {
        var f = Attached();
        EnableMemoryAndBusMaster(f);
        Assert.False(f.BusMasterDma.TryRead(0x10, new byte[8])); // outside every DMA window
        ushort status = Cfg16(f, PciConfig.Status);
        Assert.NotEqual(0, status & PciConfig.StatusReceivedMasterAbort);
        SetCfg16(f, PciConfig.Status, 0); // writing 0 leaves RW1C bits alone
        Assert.NotEqual(0, Cfg16(f, PciConfig.Status) & PciConfig.StatusReceivedMasterAbort);
        SetCfg16(f, PciConfig.Status, PciConfig.StatusReceivedMasterAbort | PciConfig.StatusCapabilitiesList);
        Assert.Equal(PciConfig.StatusCapabilitiesList, Cfg16(f, PciConfig.Status)); // cleared; Capabilities List is RO
    }

    [Fact]
    public void BarSizing_32Bit_AllOnesReadsSizeMask_ThenAddressSticks()
    {
        var f = Attached();
        SetCfg32(f, PciConfig.Bar0, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_F000u, Cfg32(f, PciConfig.Bar0)); // 4 KiB, 32-bit, non-prefetchable memory
        SetCfg32(f, PciConfig.Bar0 + 16, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_FF00u, Cfg32(f, PciConfig.Bar0 + 16)); // BAR4: 256 B
        SetCfg32(f, PciConfig.Bar0, 0xFEB0_1234);
        Assert.Equal(0xFEB0_1000u, Cfg32(f, PciConfig.Bar0));
        Assert.Equal(0xFEB0_1000ul, f.GetBarAddress(0));
    }

    [Fact]
    public void BarSizing_64BitPrefetchable_SpansTwoRegisters()
    {
        var f = Attached();
        SetCfg32(f, PciConfig.Bar0 + 8, 0xFFFF_FFFF);
        SetCfg32(f, PciConfig.Bar0 + 12, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_C00Cu, Cfg32(f, PciConfig.Bar0 + 8)); // 16 KiB, type 10b (64-bit), prefetchable
        Assert.Equal(0xFFFF_FFFFu, Cfg32(f, PciConfig.Bar0 + 12));
        SetCfg32(f, PciConfig.Bar0 + 8, 0x8000_4000);
        SetCfg32(f, PciConfig.Bar0 + 12, 0x0000_0012);
        Assert.Equal(0x12_8000_4000ul, f.GetBarAddress(2));
        Assert.Equal(RegionDescriptor.Absent, f.Regions[3]); // the upper half is not a region
        Assert.Equal(0x4000ul, f.Regions[2].Size);
    }

    [Fact]
    public void BusMasterEnable_GatesDma()
    {
        var f = Attached();
        _ram.At(GuestRam.Iova + 0x100, 4).Fill(0x5A);
        var buf = new byte[4];
        SetCfg16(f, PciConfig.Command, PciConfig.CommandMemorySpace);
        Assert.False(f.IsBusMasterEnabled);
        Assert.False(f.BusMasterDma.TryRead(GuestRam.Iova + 0x100, buf));
        Assert.False(f.BusMasterDma.TryWrite(GuestRam.Iova + 0x200, buf));
        Assert.False(f.BusMasterDma.TryReadUInt32(GuestRam.Iova + 0x100, out _));
        Assert.Equal(0, Cfg16(f, PciConfig.Status) & PciConfig.StatusReceivedMasterAbort); // not issued, so no abort
        EnableMemoryAndBusMaster(f);
        Assert.True(f.BusMasterDma.TryRead(GuestRam.Iova + 0x100, buf));
        Assert.Equal(new byte[] { 0x5A, 0x5A, 0x5A, 0x5A }, buf);
        Assert.True(f.BusMasterDma.TryWriteUInt32(GuestRam.Iova + 0x200, 0xCAFEF00D));
        Assert.Equal(0xCAFEF00Du, BinaryPrimitives.ReadUInt32LittleEndian(_ram.At(GuestRam.Iova + 0x200, 4)));
        f.OnDetached();
        Assert.False(f.BusMasterDma.TryRead(GuestRam.Iova + 0x100, buf)); // no client, no DMA
    }

    [Fact]
    public void BusMasterEnable_GatesLentDma()
    {
        var f = Attached();
        bool called = false;
        SetCfg16(f, PciConfig.Command, PciConfig.CommandMemorySpace);
        Assert.False(f.BusMasterDma.TryLendWritable(GuestRam.Iova + 0x100, 4, 0, (_, _) => called = true));
        Assert.False(f.BusMasterDma.TryLendReadable(GuestRam.Iova + 0x100, 4, 0, (_, _) => called = true));
        Assert.False(called);
        Assert.Equal(0, Cfg16(f, PciConfig.Status) & PciConfig.StatusReceivedMasterAbort);
        EnableMemoryAndBusMaster(f);
        Assert.True(f.BusMasterDma.TryLendWritable(GuestRam.Iova + 0x100, 4, (byte)0x6D, static (span, b) => span.Fill(b)));
        Assert.Equal(new byte[] { 0x6D, 0x6D, 0x6D, 0x6D }, _ram.At(GuestRam.Iova + 0x100, 4).ToArray());
        byte[] seen = [];
        Assert.True(f.BusMasterDma.TryLendReadable(GuestRam.Iova + 0x100, 4, 0, (span, _) => seen = span.ToArray()));
        Assert.Equal(new byte[] { 0x6D, 0x6D, 0x6D, 0x6D }, seen);
        f.OnDetached();
        Assert.False(f.BusMasterDma.TryLendWritable(GuestRam.Iova + 0x100, 4, 0, (_, _) => called = true));
        Assert.False(called);
    }

    [Fact]
    public void MemorySpaceEnable_GatesBarAccess()
    {
        var f = Attached();
        f.Registers[8] = 0x11;
        SetBar32(f, 0, 0, 0xDEAD_BEEF); // MSE off: dropped
        Assert.Equal(0, f.BarWrites);
        Assert.Equal(0xFFFF_FFFFu, Bar32(f, 0, 8)); // MSE off: all-ones
        Assert.Equal(0xFFFF_FFFFu, Bar32(f, 2, 0)); // MSI-X table too
        SetCfg16(f, PciConfig.Command, PciConfig.CommandMemorySpace);
        Assert.Equal(0x11u, Bar32(f, 0, 8));
        SetBar32(f, 0, 0, 0xDEAD_BEEF);
        Assert.Equal(1, f.BarWrites);
        Assert.Equal(0xDEAD_BEEFu, Bar32(f, 0, 0));
    }

    [Fact]
    public void RegionAccess_OutOfBoundsOrAbsentRegion_IsEinval()
    {
        var f = Attached();
        var b = new byte[4];
        Assert.Equal(Errno.EINVAL, f.ReadRegion(0, 0xFFE, b));
        Assert.Equal(Errno.EINVAL, f.ReadRegion(1, 0, b));
        Assert.Equal(Errno.EINVAL, f.ReadRegion(VfioPci.RomRegionIndex, 0, b));
        Assert.Equal(Errno.EINVAL, f.WriteRegion(VfioPci.ConfigRegionIndex, 4094, b));
        Assert.Equal(Errno.EINVAL, f.ReadRegion(9, 0, b));
        Assert.Equal(Errno.EINVAL, f.ReadRegion(0, ulong.MaxValue - 1, b));
        SetCfg16(f, PciConfig.Command, PciConfig.CommandMemorySpace);
        Assert.Equal(Errno.EINVAL, f.ReadRegion(2, (ulong)(Vectors * 16) - 2, b)); // straddles the MSI-X table end
    }

    [Fact]
    public void Msix_TableMaskBitsDoNotGate_VectorsTheClientArmedAreDelivered()
    {
        // VFIO model: the VMM virtualizes the MSI-X table (QEMU never writes ours), so our table's mask bits, which
        // reset to masked, must not hold interrupts back; enable + function mask + the client's eventfd decide.
        var f = Attached();
        EnableMemoryAndBusMaster(f);
        EnableMsix(f);
        Assert.Equal(1u, Bar32(f, 2, 5 * 16 + 12));
        Assert.True(f.SignalMsix(5));
        Assert.Equal(1ul, _ram.Irqs.Take(VfioPci.MsixIrqIndex, 5, 1000));
        Assert.False(f.IsMsixPending(5));

        // Vector 66 lives in the second PBA word: pending while the function is masked, delivered when cleared.
        EnableMsix(f, functionMask: true);
        Assert.False(f.SignalMsix(66));
        Assert.Equal(1u << 2, Bar32(f, 2, 0x2008));
        SetBar32(f, 2, 0x2008, 0); // PBA is read-only
        Assert.Equal(1u << 2, Bar32(f, 2, 0x2008));
        EnableMsix(f);
        Assert.Equal(1ul, _ram.Irqs.Take(VfioPci.MsixIrqIndex, 66, 1000));
        Assert.Equal(0u, Bar32(f, 2, 0x2008));
        Assert.Equal(0ul, _ram.Irqs.Take(VfioPci.MsixIrqIndex, 5)); // no stray interrupt on another vector
    }

    [Fact]
    public void Msix_VectorTheClientDidNotArm_StaysPendingInThePba()
    {
        // Only vectors 0..3 have an eventfd (SET_IRQS armed four): signalling vector 5 must not be lost.
        using var few = new GuestRam(1 << 20, msixVectors: 4);
        var f = new TestFunction(Declaration());
        f.OnAttached(few.Context);
        EnableMemoryAndBusMaster(f);
        EnableMsix(f);
        Assert.True(f.SignalMsix(3));
        Assert.Equal(1ul, few.Irqs.Take(VfioPci.MsixIrqIndex, 3, 1000));
        Assert.False(f.SignalMsix(5));
        Assert.True(f.IsMsixPending(5));
        Assert.Equal(1u << 5, Bar32(f, 2, 0x2000));
    }

    [Fact]
    public void Msix_PendingVectorTheClientDidNotArm_StaysPendingWhenTheFunctionIsUnmasked()
    {
        // Vector 1 is armed, vector 5 is not: unmasking the function delivers 1 and must keep 5 in the PBA.
        using var few = new GuestRam(1 << 20, msixVectors: 4);
        var f = new TestFunction(Declaration());
        f.OnAttached(few.Context);
        EnableMemoryAndBusMaster(f);
        EnableMsix(f, functionMask: true);
        Assert.False(f.SignalMsix(1));
        Assert.False(f.SignalMsix(5));
        EnableMsix(f, functionMask: false);
        Assert.Equal(1ul, few.Irqs.Take(VfioPci.MsixIrqIndex, 1, 1000));
        Assert.False(f.IsMsixPending(1));
        Assert.True(f.IsMsixPending(5));
        Assert.Equal(1u << 5, Bar32(f, 2, 0x2000));
    }

    [Fact]
    public void Msix_FunctionMaskAndDisable_HoldInterruptsUntilCleared()
    {
        var f = Attached();
        EnableMemoryAndBusMaster(f);
        SetVectorMask(f, 1, masked: false);
        Assert.False(f.SignalMsix(1)); // MSI-X not enabled yet
        EnableMsix(f, functionMask: true);
        Assert.True(f.IsMsixPending(1));
        Assert.Equal(0ul, _ram.Irqs.Take(VfioPci.MsixIrqIndex, 1));
        Assert.False(f.SignalMsix(1)); // still function-masked; stays one pending bit
        EnableMsix(f, functionMask: false);
        Assert.Equal(1ul, _ram.Irqs.Take(VfioPci.MsixIrqIndex, 1, 1000));
        Assert.False(f.IsMsixPending(1));
        // Vector Control reserved bits and message address/data.
        SetBar32(f, 2, 16 + 12, 0xFFFF_FFFE);
        Assert.Equal(0u, Bar32(f, 2, 16 + 12));
        SetBar32(f, 2, 16 + 8, 0x4321);
        Assert.Equal(0x4321u, Bar32(f, 2, 16 + 8));
    }

    [Fact]
    public void Flr_ThroughDevCtl_ResetsConfigAndMsixAndCallsDevice()
    {
        var f = Attached();
        EnableMemoryAndBusMaster(f);
        SetCfg32(f, PciConfig.Bar0, 0xFEB0_0000);
        EnableMsix(f);
        SetVectorMask(f, 3, masked: false);
        SetCfg16(f, PciConfig.ExtendedStart + PciSriov.NumVfs, 2);
        SetCfg16(f, PciConfig.ExtendedStart + PciSriov.Control, PciSriov.ControlVfEnable);
        f.SriovEvents.Clear();

        SetCfg16(f, PciFunction.PcieCapabilityOffset + PciExpress.DeviceControl, 0x2810 | PciExpress.DevCtlInitiateFlr);

        Assert.Equal(1, f.Resets);
        Assert.Equal(0, Cfg16(f, PciConfig.Command));
        Assert.Equal(0u, Cfg32(f, PciConfig.Bar0));
        Assert.False(f.IsMsixEnabled);
        Assert.Equal(0x2810, Cfg16(f, PciFunction.PcieCapabilityOffset + PciExpress.DeviceControl)); // FLR bit reads 0
        SetCfg16(f, PciConfig.Command, PciConfig.CommandMemorySpace);
        Assert.Equal(1u, Bar32(f, 2, 3 * 16 + 12)); // masked again
        var e = Assert.Single(f.SriovEvents); // the PF's VFs went away
        Assert.Equal(new SriovState(true, 2, false), e.Previous);
        Assert.Equal(default, e.Current);
    }

    [Fact]
    public void DeviceReset_ResetsLikeFlr()
    {
        var f = Attached();
        EnableMemoryAndBusMaster(f);
        Assert.False(f.SignalMsix(0));
        f.Reset();
        Assert.Equal(1, f.Resets);
        Assert.False(f.IsBusMasterEnabled);
        Assert.False(f.IsMsixPending(0));
    }

    [Fact]
    public void Sriov_NumVfsAndVfEnable_RaiseCallbacksWithinLimits()
    {
        var f = Attached();
        var seen = new List<SriovState>();
        f.SriovChanged += (_, e) => seen.Add(e.Current);
        int sr = PciConfig.ExtendedStart;
        Assert.Equal(8, Cfg16(f, sr + PciSriov.TotalVfs));
        Assert.Equal(0x1235, Cfg16(f, sr + PciSriov.VfDeviceId));
        Assert.Equal(1, Cfg16(f, sr + PciSriov.FirstVfOffset));

        SetCfg16(f, sr + PciSriov.NumVfs, 9); // > TotalVFs: ignored
        Assert.Equal(0, Cfg16(f, sr + PciSriov.NumVfs));
        Assert.Empty(seen);
        SetCfg16(f, sr + PciSriov.NumVfs, 4);
        SetCfg16(f, sr + PciSriov.Control, PciSriov.ControlVfEnable | PciSriov.ControlVfMemorySpaceEnable);
        SetCfg16(f, sr + PciSriov.NumVfs, 2); // while VF Enable is set: ignored
        Assert.Equal(4, Cfg16(f, sr + PciSriov.NumVfs));
        SetCfg16(f, sr + PciSriov.Control, 0);
        Assert.Equal([new SriovState(false, 4, false), new SriovState(true, 4, true), new SriovState(false, 4, false)], seen);
        Assert.Equal(new SriovState(false, 4, false), f.SriovSettings);
        SetCfg16(f, sr + PciSriov.Control, 0xFFFF);
        Assert.Equal(PciSriov.ControlVfEnable | PciSriov.ControlVfMemorySpaceEnable | PciSriov.ControlAriCapableHierarchy,
            Cfg16(f, sr + PciSriov.Control)); // VF Migration bits RO 0: not VF-migration capable
    }

    [Fact]
    public void Sriov_VfBarsSizeLikeBars()
    {
        var f = Attached();
        int vfBar = PciConfig.ExtendedStart + PciSriov.VfBar0;
        SetCfg32(f, vfBar, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_E000u, Cfg32(f, vfBar)); // 8 KiB per VF
        SetCfg32(f, vfBar + 8, 0xFFFF_FFFF);
        SetCfg32(f, vfBar + 12, 0xFFFF_FFFF);
        Assert.Equal(0xFFF0_0004u, Cfg32(f, vfBar + 8)); // 1 MiB per VF, 64-bit
        Assert.Equal(0xFFFF_FFFFu, Cfg32(f, vfBar + 12));
        SetCfg32(f, vfBar + 8, 0x2000_0000);
        SetCfg32(f, vfBar + 12, 0x1);
        Assert.Equal(0x1_2000_0000ul, f.GetVfBarAddress(2));
        // System Page Size takes only supported sizes.
        SetCfg32(f, PciConfig.ExtendedStart + PciSriov.SystemPageSize, 0xFFFF_FFFF);
        Assert.Equal(0x553u, Cfg32(f, PciConfig.ExtendedStart + PciSriov.SystemPageSize));
    }

    [Fact]
    public void ConfigState_SaveLoadRoundTrip_RestoresConfigTableAndPba()
    {
        var src = Attached();
        EnableMemoryAndBusMaster(src);
        SetCfg32(src, PciConfig.Bar0, 0xFEB0_0000);
        SetCfg32(src, PciConfig.Bar0 + 8, 0xC000_0000);
        SetCfg32(src, PciConfig.Bar0 + 12, 0x7);
        EnableMsix(src, functionMask: true);
        SetBar32(src, 2, 7 * 16, 0xFEE0_0000);
        SetBar32(src, 2, 7 * 16 + 8, 0x41);
        SetVectorMask(src, 7, masked: false);
        Assert.False(src.SignalMsix(69)); // function masked → pending
        var state = src.SaveConfigState();

        var dst = new TestFunction(Declaration());
        dst.LoadConfigState(state);
        var a = new byte[PciConfig.Size];
        var b = new byte[PciConfig.Size];
        src.ReadConfig(0, a);
        dst.ReadConfig(0, b);
        Assert.Equal(a, b);
        Assert.Equal(src.SaveConfigState(), dst.SaveConfigState());
        Assert.True(dst.IsMsixPending(69));
        Assert.Equal(0x7_C000_0000ul, dst.GetBarAddress(2));
        Assert.Equal(0x41u, Bar32(dst, 2, 7 * 16 + 8));
        // The pending vector is delivered on the target once the function mask is cleared there.
        dst.OnAttached(_ram.Context);
        EnableMsix(dst);
        Assert.Equal(1ul, _ram.Irqs.Take(VfioPci.MsixIrqIndex, 69, 1000));
    }

    [Fact]
    public void ConfigState_Corrupt_IsRejectedAndStateUnchanged()
    {
        var src = Attached();
        EnableMemoryAndBusMaster(src);
        var good = src.SaveConfigState();
        var dst = new TestFunction(Declaration());
        var fresh = dst.SaveConfigState();

        var flipped = (byte[])good.Clone();
        flipped[PciConfig.Bar0 + 20] ^= 0x10;
        Assert.Contains("CRC32C", Assert.Throws<InvalidDataException>(() => dst.LoadConfigState(flipped)).Message);
        Assert.Throws<InvalidDataException>(() => dst.LoadConfigState(good.AsSpan(0, good.Length - 1)));
        Assert.Throws<InvalidDataException>(() => dst.LoadConfigState(good.AsSpan(0, 10)));
        var badMagic = (byte[])good.Clone();
        badMagic[0] ^= 1;
        Assert.Contains("magic", Assert.Throws<InvalidDataException>(() => dst.LoadConfigState(badMagic)).Message);

        // Another device id with a valid CRC: read-only bits differ.
        var other = new TestFunction(Declaration(deviceId: 0x9999)).SaveConfigState();
        Assert.Contains("read-only", Assert.Throws<InvalidDataException>(() => dst.LoadConfigState(other)).Message);
        // No SR-IOV on the saving side: different extended space.
        var noSriov = new TestFunction(Declaration(sriov: false)).SaveConfigState();
        Assert.Throws<InvalidDataException>(() => dst.LoadConfigState(noSriov));

        Assert.Equal(fresh, dst.SaveConfigState());
    }

    [Fact]
    public void Declaration_Invalid_IsRefused()
    {
        Assert.Throws<ArgumentException>(() => new TestFunction(Declaration() with { Bars = [new PciBar(0x1800)] }));
        Assert.Throws<ArgumentException>(() => new TestFunction(Declaration() with { Bars = [new PciBar(0x1000, Is64Bit: true), new PciBar(0x1000)] }));
        Assert.Throws<ArgumentException>(() => new TestFunction(Declaration() with { Msix = new PciMsixLayout(4, 1, 0, 0, 0x800) }));
        Assert.Throws<ArgumentException>(() => new TestFunction(Declaration() with { Msix = new PciMsixLayout(4, 0, 0, 0, 0x20) }));
        Assert.Throws<ArgumentException>(() => new TestFunction(Declaration() with { Msix = new PciMsixLayout(300, 0, 0, 0, 0xF00) }));
    }
}
