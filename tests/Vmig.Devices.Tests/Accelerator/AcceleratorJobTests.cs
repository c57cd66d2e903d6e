using Vmig.Spec;
using System.Buffers.Binary;
using Vmig.Devices.Accelerator;
using Vmig.Devices.Tests.Pci;
using Vmig.Spec.Accelerator;
using Vmig.Spec.Pci;
using Vmig.VfioUser.Protocol;

namespace Vmig.Devices.Tests.Accelerator;

public sealed class AcceleratorJobTests : IDisposable
{
    private readonly AcceleratorRig _rig = new();

    public void Dispose() => _rig.Dispose();

    /// <summary>Bitwise CRC-32C (reflected polynomial 0x82F63B78), independent of the device's implementation.</summary>
    private static uint ReferenceCrc32C(ReadOnlySpan<byte> data)
    {
        uint crc = ~0u;
        foreach (byte b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++)
            {
                crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
            }
        }
        return ~crc;
    }

    [Fact]
    public void CopyToDeviceThenBack_RoundTripsBytes()
    {
        var data = new byte[3 * 4096 + 123];
        new Random(1).NextBytes(data);
        _rig.Ram.Write(AcceleratorRig.BufferArea, data);
        var c = _rig.Run(AcceleratorOpcode.CopyToDevice, AcceleratorRig.BufferArea, 0x1_0010, (ulong)data.Length);
        Assert.Equal(AcceleratorJobStatus.Success, c.Status);
        Assert.Equal(data, _rig.Vf.Memory.GetSpan(0x1_0010, data.Length).ToArray());

        c = _rig.Run(AcceleratorOpcode.CopyFromDevice, AcceleratorRig.BufferArea + 0x10_0000, 0x1_0010, (ulong)data.Length);
        Assert.Equal(AcceleratorJobStatus.Success, c.Status);
        var back = new byte[data.Length];
        _rig.Ram.Read(AcceleratorRig.BufferArea + 0x10_0000, back);
        Assert.Equal(data, back);
        Assert.Equal(2u, _rig.D.ReadRegister(AcceleratorRegister.CompletedJobs));
        Assert.Equal(1u, c.Sequence);
    }

    [Fact]
    public void Fill_RepeatsPatternFromOffset_IncludingOddTail()
    {
        var c = _rig.Run(AcceleratorOpcode.Fill, 0, 0x2003, 21, 0x8877_6655_4433_2211);
        Assert.Equal(AcceleratorJobStatus.Success, c.Status);
        Assert.Equal(new byte[] { 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x11, 0x22, 0x33, 0x44, 0x55, 0 },
            _rig.Vf.Memory.GetSpan(0x2002, 23).ToArray());
    }

    [Fact]
    public void Fill_LargerThanOneChunk_FillsEverything()
    {
        ulong len = (1 << 20) + 4096 + 8;
        Assert.Equal(AcceleratorJobStatus.Success, _rig.Run(AcceleratorOpcode.Fill, 0, 0, len, 0xABABABABABABABAB).Status);
        Assert.True(_rig.Vf.Memory.GetSpan(0, (int)len).IndexOfAnyExcept((byte)0xAB) < 0);
        Assert.Equal(0, _rig.Vf.Memory.GetSpan((long)len, 1)[0]);
    }

    [Fact]
    public void Crc32C_OfDeviceRange_WrittenToGuestAndResult()
    {
        var data = new byte[10_000];
        new Random(2).NextBytes(data);
        data.CopyTo(_rig.Vf.Memory.GetSpan(0x30_0000, data.Length));
        var c = _rig.Run(AcceleratorOpcode.Crc32C, AcceleratorRig.BufferArea + 0x40, 0x30_0000, (ulong)data.Length);
        Assert.Equal(AcceleratorJobStatus.Success, c.Status);
        uint expected = ReferenceCrc32C(data);
        Assert.Equal(expected, c.Result);
        Assert.Equal(expected, _rig.Ram.ReadUInt32(AcceleratorRig.BufferArea + 0x40));
    }

    [Fact]
    public void BadJobs_GetTheirStatus_AndTheRingGoesOn()
    {
        ulong mem = _rig.D.DeviceMemorySize;
        Assert.Equal(4ul << 20, mem);
        var d = _rig.D;
        Assert.Equal(AcceleratorJobStatus.InvalidOpcode, d.Run(new AcceleratorJob((AcceleratorOpcode)9, 0, 0, 0, 0, 16)).Status);
        Assert.Equal(AcceleratorJobStatus.InvalidLength, _rig.Run(AcceleratorOpcode.Fill, 0, 0, 0).Status);
        Assert.Equal(AcceleratorJobStatus.DeviceRangeError, _rig.Run(AcceleratorOpcode.Fill, 0, mem - 8, 16).Status);
        Assert.Equal(AcceleratorJobStatus.DeviceRangeError, _rig.Run(AcceleratorOpcode.CopyToDevice, AcceleratorRig.BufferArea, ulong.MaxValue - 2, 16).Status);
        Assert.Equal(AcceleratorJobStatus.DeviceRangeError, _rig.Run(AcceleratorOpcode.Crc32C, AcceleratorRig.BufferArea, 0, mem + 1).Status);
        // Guest addresses outside guest RAM, wrapping, or misaligned for the CRC result.
        Assert.Equal(AcceleratorJobStatus.GuestAddressFault, _rig.Run(AcceleratorOpcode.CopyToDevice, (ulong)AcceleratorRig.RamSize - 8, 0, 16).Status);
        Assert.Equal(AcceleratorJobStatus.GuestAddressFault, _rig.Run(AcceleratorOpcode.CopyFromDevice, ulong.MaxValue - 4, 0, 16).Status);
        Assert.Equal(AcceleratorJobStatus.GuestAddressFault, _rig.Run(AcceleratorOpcode.Crc32C, AcceleratorRig.BufferArea + 2, 0, 16).Status);
        Assert.Equal(8u, d.ReadRegister(AcceleratorRegister.FailedJobs));
        // The ring still works after all that.
        Assert.Equal(AcceleratorJobStatus.Success, _rig.Run(AcceleratorOpcode.Fill, 0, 0, 8, 1).Status);
        Assert.Equal(0u, d.ReadRegister(AcceleratorRegister.Status) & AcceleratorRegister.StatusRingFault);
    }

    [Fact]
    public void RingOutsideGuestMemory_SetsRingFault_NotACrash()
    {
        using var rig = new AcceleratorRig(initDriver: false);
        var f = rig.Function;
        var b = new byte[4];
        BinaryPrimitives.WriteUInt16LittleEndian(b, PciConfig.CommandMemorySpace | PciConfig.CommandBusMaster);
        f.WriteConfig(PciConfig.Command, b.AsSpan(0, 2));
        void W(int reg, uint v)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(b, v);
            f.MmioWrite(0, (ulong)reg, b);
        }
        uint R(int reg)
        {
            f.MmioRead(0, (ulong)reg, b);
            return BinaryPrimitives.ReadUInt32LittleEndian(b);
        }
        W(AcceleratorRegister.RingSize, 3); // not a power of two
        W(AcceleratorRegister.Control, 1);
        Assert.Equal(AcceleratorRegister.StatusConfigError, R(AcceleratorRegister.Status));
        W(AcceleratorRegister.RingSize, 128); // above this VF's profile (64)
        W(AcceleratorRegister.Control, 1);
        Assert.Equal(AcceleratorRegister.StatusConfigError, R(AcceleratorRegister.Status));
        W(AcceleratorRegister.RingSize, 8);
        W(AcceleratorRegister.RingBaseLow, 0);
        W(AcceleratorRegister.RingBaseHigh, 0x10); // 64 GiB: outside guest RAM
        W(AcceleratorRegister.Control, 1);
        Assert.Equal(AcceleratorRegister.StatusEnabled, R(AcceleratorRegister.Status));
        W(AcceleratorRegister.RingTail, 9); // beyond the ring
        Assert.NotEqual(0u, R(AcceleratorRegister.Status) & AcceleratorRegister.StatusDoorbellError);
        W(AcceleratorRegister.RingTail, 1);
        var deadline = DateTime.UtcNow.AddSeconds(5);
        while ((R(AcceleratorRegister.Status) & AcceleratorRegister.StatusRingFault) == 0 && DateTime.UtcNow < deadline)
        {
            Thread.Sleep(5);
        }
        Assert.NotEqual(0u, R(AcceleratorRegister.Status) & AcceleratorRegister.StatusRingFault);
        Assert.Equal(0u, R(AcceleratorRegister.RingHead));
        Assert.NotEqual(0, BinaryPrimitives.ReadUInt16LittleEndian(ReadCfg(f, PciConfig.Status)) & PciConfig.StatusReceivedMasterAbort);
    }

    private static byte[] ReadCfg(InProcessPciFunction f, int at)
    {
        var b = new byte[2];
        f.ReadConfig(at, b);
        return b;
    }

    [Fact]
    public void CompletionInterrupt_ArrivesOnTheEventFd()
    {
        uint slot = _rig.D.Submit(new AcceleratorJob(AcceleratorOpcode.Fill, 0, 0, 0, 0, 64, 7));
        Assert.Equal(1ul, _rig.Ram.Irqs.Take(VfioPci.MsixIrqIndex, 0, 5000));
        Assert.True(_rig.D.TryGetCompletion(slot, out var c));
        Assert.Equal(AcceleratorJobStatus.Success, c.Status);
    }

    [Fact]
    public void BusMasterOff_HoldsJobsUntilEnabled()
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, PciConfig.CommandMemorySpace);
        _rig.Function.WriteConfig(PciConfig.Command, b);
        uint slot = _rig.D.Submit(new AcceleratorJob(AcceleratorOpcode.Fill, 0, 0, 0, 0, 64, 7));
        Thread.Sleep(150);
        Assert.False(_rig.D.TryGetCompletion(slot, out _));
        BinaryPrimitives.WriteUInt16LittleEndian(b, PciConfig.CommandMemorySpace | PciConfig.CommandBusMaster);
        _rig.Function.WriteConfig(PciConfig.Command, b);
        Assert.Equal(AcceleratorJobStatus.Success, _rig.D.Wait(slot).Status);
    }

    [Fact]
    public void HiddenMigrationRegisters_AreUnreachableThroughTheGuestView()
    {
        var vf = _rig.Vf;
        Assert.Equal(AcceleratorIds.VfRegisterVisibleSize, vf.Regions[0].Size);
        // The BAR itself decodes 8 KiB (sizing), the region shows 4 KiB.
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, 0xFFFF_FFFF);
        _rig.Function.WriteConfig(PciConfig.Bar0, b);
        _rig.Function.ReadConfig(PciConfig.Bar0, b);
        Assert.Equal(0xFFFF_E000u, BinaryPrimitives.ReadUInt32LittleEndian(b));

        BinaryPrimitives.WriteUInt32LittleEndian(b, (uint)AcceleratorMigrationCommand.SuspendResponder);
        Assert.Equal(Errno.EINVAL, vf.WriteRegion(0, AcceleratorMigrationRegister.Command, b));
        Assert.Equal(Errno.EINVAL, vf.ReadRegion(0, AcceleratorMigrationRegister.Status, b));
        Assert.Equal(Errno.EINVAL, vf.ReadRegion(0, 0xFFC, new byte[8])); // straddles into the hidden part
        Assert.Equal(0u, vf.ReadHiddenRegister(AcceleratorMigrationRegister.Status));
        Assert.Equal(AcceleratorJobStatus.Success, _rig.Run(AcceleratorOpcode.Fill, 0, 0, 8, 1).Status); // still running

        _rig.Pf.Suspend(0, AcceleratorSuspendScope.Responder); // the PF's path reaches them
        Assert.Equal(AcceleratorMigrationRegister.StatusQuiesced | AcceleratorMigrationRegister.StatusStopped,
            vf.ReadHiddenRegister(AcceleratorMigrationRegister.Status));
    }

    [Fact]
    public void SuspendInitiator_FinishesFetchedJobsThenFetchesNothingUntilResume()
    {
        var d = _rig.D;
        var slots = new List<uint>();
        for (int i = 0; i < 20; i++)
        {
            slots.Add(d.Submit(new AcceleratorJob(AcceleratorOpcode.Fill, 0, 0, 0, (ulong)i * 4096, 4096, (ulong)i)));
        }
        _rig.Pf.Suspend(0, AcceleratorSuspendScope.Initiator);
        uint head = d.ReadRegister(AcceleratorRegister.RingHead);
        Assert.Equal(0u, _rig.Vf.ReadHiddenRegister(AcceleratorMigrationRegister.Status) & AcceleratorMigrationRegister.StatusBusy);
        int done = slots.Count(s => d.TryGetCompletion(s, out _));
        Assert.Equal((int)head, done); // every job before head is complete, none after
        Thread.Sleep(100);
        Assert.Equal(head, d.ReadRegister(AcceleratorRegister.RingHead));
        Assert.Equal(done, slots.Count(s => d.TryGetCompletion(s, out _)));
        _rig.Pf.Resume(0, AcceleratorSuspendScope.Initiator);
        foreach (var s in slots)
        {
            Assert.Equal(AcceleratorJobStatus.Success, d.Wait(s).Status);
        }
    }

    [Fact]
    public void Flr_StopsTheRingAndClearsRegisters_DriverCanReinitialize()
    {
        Assert.Equal(AcceleratorJobStatus.Success, _rig.Run(AcceleratorOpcode.Fill, 0, 0, 4096, 0x5555_5555_5555_5555).Status);
        var b = new byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, PciExpress.DevCtlInitiateFlr);
        _rig.Function.WriteConfig(Vmig.Devices.Pci.PciFunction.PcieCapabilityOffset + PciExpress.DeviceControl, b);
        Assert.Equal(default, _rig.Vf.Registers);
        Assert.False(_rig.Vf.IsBusMasterEnabled);
        var d = Vmig.Guest.Accelerator.AcceleratorDriver.Initialize(_rig.Ram, _rig.Function, AcceleratorRig.DriverBlock, 16);
        var c = d.Run(new AcceleratorJob(AcceleratorOpcode.Crc32C, 0, 0, AcceleratorRig.BufferArea, 0, 4096));
        Assert.Equal(AcceleratorJobStatus.Success, c.Status);
        Assert.Equal(0u, c.Sequence); // counters restarted
        Assert.Equal(Vmig.Spec.Crc32C.Compute(Enumerable.Repeat((byte)0x55, 4096).ToArray()), c.Result); // device memory kept
    }

    [Fact]
    public void SriovEnable_CreatesVfsWithTheirProfiles_DisableRemovesThem()
    {
        using var pf = new AcceleratorPf(3, AcceleratorProfile.Create(1 << 20));
        pf.SetVfProfile(1, AcceleratorProfile.Create(2 << 20, 16));
        int changes = 0;
        pf.VfsChanged += (_, _) => changes++;
        pf.EnableVfs(2);
        Assert.Equal(2, pf.Vfs.Count);
        Assert.Equal(1L << 20, pf.GetVf(0).Memory.Size);
        Assert.Equal(2L << 20, pf.GetVf(1).Memory.Size);
        Assert.Throws<InvalidOperationException>(() => pf.SetVfProfile(0, AcceleratorProfile.Create(8192)));
        Assert.Equal(Vmig.VfioUser.Protocol.Errno.ENODEV, Assert.Throws<Vmig.Migration.MigrationException>(() => pf.GetVf(2)).Errno);
        pf.DisableVfs();
        Assert.Empty(pf.Vfs);
        Assert.Equal(2, changes);
    }
}
