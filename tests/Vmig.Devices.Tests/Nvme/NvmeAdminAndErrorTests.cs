using Vmig.InProcess;
using System.Buffers.Binary;
using Vmig.Devices.Nvme;
using Vmig.Guest.Nvme;
using Vmig.Spec.Nvme;

using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>Admin and I/O commands one by one, and the status each kind of bad guest input gets.</summary>
public sealed class NvmeAdminAndErrorTests : IDisposable
{
    private const ulong Outside = 0x4000_0000; // beyond the 16 MiB DMA window

    private readonly NvmeRig _rig = new();
    private readonly TestGuestRam _ram;
    private readonly NvmeDirectFunction _fn;
    private readonly NvmeDriver _drv;

    public NvmeAdminAndErrorTests()
    {
        Assert.True(_rig.Subsystem.AttachNamespace(_rig.Nsid, [0]).IsSuccess);
        (_ram, _fn) = _rig.Connect(0);
        _drv = NvmeDriver.Initialize(_ram, _fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2, Interrupts = false });
    }

    public void Dispose() => _rig.Dispose();

    private NvmeStatus Admin(SubmissionQueueEntry c, ulong gpa = 0, int len = 0) => _drv.ExecuteRaw(0, c, gpa, len).Status;

    private NvmeCompletion AdminC(SubmissionQueueEntry c, ulong gpa = 0, int len = 0) => _drv.ExecuteRaw(0, c, gpa, len);

    private static SubmissionQueueEntry Op(NvmeAdminOpcode op, uint cdw10 = 0, uint cdw11 = 0, uint nsid = 0) =>
        new() { Opcode = (byte)op, Cdw10 = cdw10, Cdw11 = cdw11, Nsid = nsid };

    private uint Reg(int off)
    {
        Span<byte> b = stackalloc byte[4];
        _fn.MmioRead(0, (ulong)off, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void Doorbell(int off, uint v)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, v);
        _fn.MmioWrite(0, (ulong)off, b);
    }

    [Fact]
    public void Registers_report_cap_vs_and_ready_state()
    {
        Assert.Equal(0x00020000u, Reg(NvmeRegisters.Vs));
        var cap = new ControllerCapabilities(Reg(0) | ((ulong)Reg(4) << 32));
        Assert.Equal(0, cap.Dstrd);
        Assert.True(cap.Cqr);
        Assert.Equal(1023, cap.Mqes);
        Assert.Equal((uint)ControllerStatus.Rdy, Reg(NvmeRegisters.Csts));
        Doorbell(NvmeRegisters.Intms, 0x3);
        Assert.Equal(3u, Reg(NvmeRegisters.Intms));
        Doorbell(NvmeRegisters.Intmc, 0x1);
        Assert.Equal(2u, Reg(NvmeRegisters.Intmc));
        Assert.Equal(Errno(0x22), _rig.Subsystem.Primary.WriteBar0(0x1001, new byte[4]));
        Assert.Equal(Errno(0x22), _rig.Subsystem.Primary.ReadBar0(0x3FFE, new byte[4]));
    }

    private static int Errno(int e) => e == 0x22 ? Vmig.VfioUser.Protocol.Errno.EINVAL : e;

    [Fact]
    public void Create_and_delete_queue_errors_follow_the_spec()
    {
        ulong mem = _drv.Allocate(64 * 64);
        // qid 0, beyond the allocated count, or existing
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 0 | (63u << 16), 1) with { Prp1 = mem }));
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 40 | (63u << 16), 1) with { Prp1 = mem }));
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 1 | (63u << 16), 1) with { Prp1 = mem }));
        // Number of Queues asked 2 pairs; qid 3 is over it.
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 3 | (63u << 16), 1) with { Prp1 = mem }));
        // size
        Assert.True(Admin(Op(NvmeAdminOpcode.DeleteIoSubmissionQueue, 2)).IsSuccess);
        Assert.Equal(NvmeStatus.InvalidQueueDeletion, Admin(Op(NvmeAdminOpcode.DeleteIoCompletionQueue, 1)));
        Assert.True(Admin(Op(NvmeAdminOpcode.DeleteIoCompletionQueue, 2)).IsSuccess);
        Assert.Equal(NvmeStatus.InvalidQueueSize, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 2 | (0u << 16), 1) with { Prp1 = mem }));
        Assert.Equal(NvmeStatus.InvalidQueueSize, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 2 | (4096u << 16), 1) with { Prp1 = mem }));
        // not physically contiguous, misaligned base, base outside guest memory, bad vector
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 2 | (63u << 16), 0) with { Prp1 = mem }));
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 2 | (63u << 16), 1) with { Prp1 = mem + 8 }));
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 2 | (63u << 16), 1) with { Prp1 = Outside }));
        Assert.Equal(NvmeStatus.InvalidInterruptVector, Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 2 | (63u << 16), 3 | (40u << 16)) with { Prp1 = mem }));
        // SQ naming a missing CQ
        Assert.Equal(NvmeStatus.CompletionQueueInvalid, Admin(Op(NvmeAdminOpcode.CreateIoSubmissionQueue, 2 | (63u << 16), 1 | (2u << 16)) with { Prp1 = mem }));
        Assert.Equal(NvmeStatus.CompletionQueueInvalid, Admin(Op(NvmeAdminOpcode.CreateIoSubmissionQueue, 2 | (63u << 16), 1 | (0u << 16)) with { Prp1 = mem }));
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, Admin(Op(NvmeAdminOpcode.DeleteIoSubmissionQueue, 0)));
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, Admin(Op(NvmeAdminOpcode.DeleteIoSubmissionQueue, 9)));
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, Admin(Op(NvmeAdminOpcode.DeleteIoCompletionQueue, 0)));
        // Number of Queues after I/O queues exist
        Assert.Equal(NvmeStatus.CommandSequenceError, Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.NumberOfQueues, 0x00010001)));
        // queue 1 still works
        Assert.True(_drv.Read(1, _rig.Nsid, 0, 1, 512, Buf).IsSuccess);
    }

    [Fact]
    public void Get_and_set_features()
    {
        var c = AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.NumberOfQueues));
        Assert.True(c.Status.IsSuccess);
        Assert.Equal(0x00010001u, c.Dw0);
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.Arbitration, 0x0302_0103)).IsSuccess);
        Assert.Equal(0x0302_0103u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.Arbitration)).Dw0);
        Assert.Equal(0u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.Arbitration | (1 << 8))).Dw0); // default
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.InterruptCoalescing, 0x0A05)).IsSuccess);
        Assert.Equal(0x0A05u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.InterruptCoalescing)).Dw0);
        Assert.Equal(1u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.VolatileWriteCache)).Dw0);
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.VolatileWriteCache, 0)).IsSuccess);
        Assert.Equal(0u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.VolatileWriteCache)).Dw0);
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.AsynchronousEventConfiguration, 0x100)).IsSuccess);
        Assert.Equal(0x100u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.AsynchronousEventConfiguration)).Dw0);
        Assert.Equal(4u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.Arbitration | (3 << 8))).Dw0);
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.KeepAliveTimer, 15000)).IsSuccess);
        Assert.Equal(15000u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.KeepAliveTimer)).Dw0);
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.SetFeatures, 0x7F)));
        Assert.Equal(NvmeStatus.FeatureNotSaveable, Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.Arbitration | (1u << 31))));
        Assert.Equal(NvmeStatus.InvalidOpcode, Admin(Op((NvmeAdminOpcode)0xEE)));
        Assert.True(Admin(Op(NvmeAdminOpcode.KeepAlive)).IsSuccess);
        var abort = AdminC(Op(NvmeAdminOpcode.Abort, 1 | (5u << 16)));
        Assert.True(abort.Status.IsSuccess);
        Assert.Equal(1u, abort.Dw0 & 1); // not aborted: it had completed
    }

    [Fact]
    public void Mandatory_features_power_temperature_error_recovery_vector_config_and_write_atomicity()
    {
        // Linux's nvme-cli reads these; they are mandatory for a PCIe I/O controller (docs/realguest.md finding 3).
        Assert.Equal(0u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.PowerManagement)).Dw0);
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.PowerManagement, 1))); // NPSS = 0
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.PowerManagement, 0x20)).IsSuccess); // WH = 1
        Assert.Equal(0x20u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.PowerManagement)).Dw0);

        Assert.Equal(358u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.TemperatureThreshold)).Dw0);
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.TemperatureThreshold, 350)).IsSuccess);
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.TemperatureThreshold, (1u << 20) | 270)).IsSuccess);
        Assert.Equal(350u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.TemperatureThreshold)).Dw0);
        Assert.Equal(270u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.TemperatureThreshold, 1u << 20)).Dw0);
        Assert.Equal(358u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.TemperatureThreshold | (1 << 8))).Dw0); // default
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.TemperatureThreshold, 1u << 16))); // no sensor 1

        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.ErrorRecovery, 100)).IsSuccess);
        Assert.Equal(100u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.ErrorRecovery)).Dw0);
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.ErrorRecovery, 1u << 16))); // DULBE

        Assert.Equal(0u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.InterruptVectorConfiguration, 0)).Dw0);
        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.InterruptVectorConfiguration, (1u << 16) | 1)).IsSuccess);
        Assert.Equal((1u << 16) | 1, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.InterruptVectorConfiguration, 1)).Dw0);
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.InterruptVectorConfiguration, 0xFFFF)));

        Assert.True(Admin(Op(NvmeAdminOpcode.SetFeatures, (uint)FeatureId.WriteAtomicityNormal, 1)).IsSuccess);
        Assert.Equal(1u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.WriteAtomicityNormal)).Dw0);
        Assert.Equal(4u, AdminC(Op(NvmeAdminOpcode.GetFeatures, (uint)FeatureId.WriteAtomicityNormal | (3 << 8))).Dw0); // changeable
    }

    [Fact]
    public void Log_pages_error_smart_and_firmware_slot()
    {
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, _drv.Read(1, 99, 0, 1, 512, Buf));
        ulong page = _drv.Allocate(4096);
        uint numd(int bytes) => (uint)(bytes / 4 - 1) << 16;
        Assert.True(Admin(Op(NvmeAdminOpcode.GetLogPage, (uint)LogPageId.ErrorInformation | numd(1024)), page, 1024).IsSuccess);
        byte[] b = new byte[64];
        _ram.Read(page, b);
        Assert.True(ErrorInformationEntry.TryRead(b, out var e));
        Assert.Equal((ushort)1, e.Sqid);
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, e.Status);
        Assert.Equal(99u, e.Nsid);
        Assert.True(e.ErrorCount >= 1);

        _ram.Write(Buf, new byte[4096]);
        Assert.True(_drv.Write(1, _rig.Nsid, 0, 8, 512, Buf).IsSuccess);
        Assert.True(Admin(Op(NvmeAdminOpcode.GetLogPage, (uint)LogPageId.SmartHealth | numd(512)), page, 512).IsSuccess);
        byte[] s = new byte[512];
        _ram.Read(page, s);
        Assert.True(SmartHealthLog.TryRead(s, out var smart));
        Assert.Equal((UInt128)1, smart.HostWriteCommands);
        Assert.Equal((UInt128)1, smart.DataUnitsWritten);
        Assert.Equal(100, smart.AvailableSpare);

        Assert.True(Admin(Op(NvmeAdminOpcode.GetLogPage, (uint)LogPageId.FirmwareSlot | numd(512)), page, 512).IsSuccess);
        _ram.Read(page, s);
        Assert.True(FirmwareSlotLog.TryRead(s, out var fw));
        Assert.Equal("vmig0.1", fw.Frs1);
        Assert.Equal(NvmeStatus.InvalidLogPage, Admin(Op(NvmeAdminOpcode.GetLogPage, 0x77 | numd(512)), page, 512));
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.GetLogPage, (uint)LogPageId.SmartHealth | numd(512)) with { Cdw12 = 4096 }, page, 512));
    }

    [Fact]
    public void Io_commands_flush_write_zeroes_deallocate_compare()
    {
        byte[] data = new byte[4096];
        new Random(5).NextBytes(data);
        _ram.Write(Buf, data);
        Assert.True(_drv.Write(1, _rig.Nsid, 40, 8, 512, Buf).IsSuccess);
        Assert.True(_drv.ExecuteRaw(1, new SubmissionQueueEntry { Opcode = (byte)NvmeIoOpcode.Flush, Nsid = _rig.Nsid }).Status.IsSuccess);
        Assert.True(_drv.ExecuteRaw(1, new SubmissionQueueEntry { Opcode = (byte)NvmeIoOpcode.Flush, Nsid = 0xFFFFFFFF }).Status.IsSuccess);
        // Compare equal, then different
        Assert.True(_drv.ExecuteRaw(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Compare, _rig.Nsid, 40, 8), Buf, 4096).Status.IsSuccess);
        _ram.Write(Buf + 100, new byte[] { (byte)(data[100] ^ 0xFF) });
        Assert.Equal(NvmeStatus.CompareFailure, _drv.ExecuteRaw(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Compare, _rig.Nsid, 40, 8), Buf, 4096).Status);
        // Write Zeroes on blocks 40..41
        Assert.True(_drv.ExecuteRaw(1, NvmeDriver.ReadWrite(NvmeIoOpcode.WriteZeroes, _rig.Nsid, 40, 2)).Status.IsSuccess);
        Assert.Equal(new byte[1024], _rig.ReadFile(40 * 512, 1024));
        Assert.Equal(data.AsSpan(1024, 3072).ToArray(), _rig.ReadFile(42 * 512, 3072));
        // Deallocate blocks 44..47 through Dataset Management
        byte[] range = new byte[16];
        new DatasetManagementRange(0, 4, 44).WriteTo(range);
        _ram.Write(Buf + 8192, range);
        var dsm = new SubmissionQueueEntry { Opcode = (byte)NvmeIoOpcode.DatasetManagement, Nsid = _rig.Nsid, Cdw10 = 0, Cdw11 = 4 };
        Assert.True(_drv.ExecuteRaw(1, dsm, Buf + 8192, 16).Status.IsSuccess);
        Assert.Equal(new byte[2048], _rig.ReadFile(44 * 512, 2048));
        Assert.Equal(data.AsSpan(1024, 1024).ToArray(), _rig.ReadFile(42 * 512, 1024));
        // A range past the end changes nothing
        new DatasetManagementRange(0, 4, (ulong)(NvmeRig.NamespaceBytes / 512)).WriteTo(range);
        _ram.Write(Buf + 8192, range);
        Assert.Equal(NvmeStatus.LbaOutOfRange, _drv.ExecuteRaw(1, dsm, Buf + 8192, 16).Status);
    }

    [Fact]
    public void Deallocate_punches_a_hole_in_the_namespace_file_and_the_blocks_read_as_zeroes_as_dlfeat_says()
    {
        Assert.Equal(1, _drv.IdentifyNamespace(_rig.Nsid).Dlfeat & 7); // read behaviour 001b: zeroes
        byte[] data = Pattern(256 * 1024, 8);
        for (int i = 0; i < 4; i++)
        {
            _ram.Write(Buf, data.AsSpan(i * 65536, 65536));
            Assert.True(_drv.Write(1, _rig.Nsid, 2048 + (ulong)(i * 128), 128, 512, Buf).IsSuccess); // 1 MiB into the file
        }
        Assert.True(_drv.ExecuteRaw(1, new SubmissionQueueEntry { Opcode = (byte)NvmeIoOpcode.Flush, Nsid = _rig.Nsid }).Status.IsSuccess);
        long before = Allocated();
        Assert.True(before >= 256 * 1024);

        // Deallocate 3 of the 4 x 64 KiB, the last range through Write Zeroes with DEAC (CDW12 bit 25).
        byte[] ranges = new byte[32];
        new DatasetManagementRange(0, 128, 2048).WriteTo(ranges);
        new DatasetManagementRange(0, 128, 2048 + 256).WriteTo(ranges.AsSpan(16));
        _ram.Write(Buf + 0x40000, ranges);
        var dsm = new SubmissionQueueEntry { Opcode = (byte)NvmeIoOpcode.DatasetManagement, Nsid = _rig.Nsid, Cdw10 = 1, Cdw11 = 4 };
        Assert.True(_drv.ExecuteRaw(1, dsm, Buf + 0x40000, 32).Status.IsSuccess);
        var wz = NvmeDriver.ReadWrite(NvmeIoOpcode.WriteZeroes, _rig.Nsid, 2048 + 384, 128);
        Assert.True(_drv.ExecuteRaw(1, wz with { Cdw12 = wz.Cdw12 | (1u << 25) }).Status.IsSuccess);

        Assert.True(before - Allocated() >= 3 * 65536, $"allocated {before} -> {Allocated()} bytes: no hole punched");
        Assert.Equal(new byte[65536], _rig.ReadFile(2048 * 512, 65536));
        Assert.Equal(data.AsSpan(65536, 65536).ToArray(), _rig.ReadFile((2048 + 128) * 512, 65536));
        Assert.Equal(new byte[131072], _rig.ReadFile((2048 + 256) * 512, 131072));
        Assert.Equal(new byte[65536], ReadThroughDevice(2048, 128)); // and through the controller
        Assert.Equal(NvmeRig.NamespaceBytes, new FileInfo(_rig.NamespacePath).Length); // KEEP_SIZE

        long Allocated()
        {
            using var h = File.OpenHandle(_rig.NamespacePath);
            return Vmig.Native.FileSpace.AllocatedBytes(h);
        }
    }

    private byte[] ReadThroughDevice(ulong slba, int blocks)
    {
        _ram.Write(Buf, new byte[blocks * 512].Select(_ => (byte)0xEE).ToArray());
        Assert.True(_drv.Read(1, _rig.Nsid, slba, blocks, 512, Buf).IsSuccess);
        byte[] b = new byte[blocks * 512];
        _ram.Read(Buf, b);
        return b;
    }

    [Fact]
    public void Bad_io_input_gets_spec_statuses()
    {
        ulong blocks = (ulong)(NvmeRig.NamespaceBytes / 512);
        Assert.Equal(NvmeStatus.LbaOutOfRange, _drv.Read(1, _rig.Nsid, blocks - 1, 2, 512, Buf));
        Assert.Equal(NvmeStatus.LbaOutOfRange, _drv.Read(1, _rig.Nsid, ulong.MaxValue, 1, 512, Buf));
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, _drv.Read(1, 2, 0, 1, 512, Buf));
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, _drv.Read(1, 0, 0, 1, 512, Buf));
        Assert.Equal(NvmeStatus.InvalidOpcode, _drv.ExecuteRaw(1, new SubmissionQueueEntry { Opcode = 0x7E, Nsid = _rig.Nsid }).Status);
        // Transfer over MDTS (2 MiB): 8192 blocks of 512 B = 4 MiB
        Assert.Equal(NvmeStatus.InvalidField, _drv.ExecuteRaw(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Read, _rig.Nsid, 0, 8192) with { Cdw12 = 8191 }).Status);
        // SGL requested (PSDT != 0)
        Assert.Equal(NvmeStatus.InvalidField, _drv.ExecuteRaw(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Read, _rig.Nsid, 0, 1) with { Flags = 0x40 }, Buf, 512).Status);
        // Data outside the DMA windows: one page, two pages, and a PRP list
        Assert.Equal(NvmeStatus.DataTransferError, _drv.Read(1, _rig.Nsid, 0, 1, 512, Outside));
        Assert.Equal(NvmeStatus.DataTransferError, _drv.Write(1, _rig.Nsid, 0, 16, 512, Outside));
        Assert.Equal(NvmeStatus.DataTransferError, _drv.Read(1, _rig.Nsid, 0, 64, 512, Outside));
        // Misaligned PRP1 (bits 1:0)
        var rd = NvmeDriver.ReadWrite(NvmeIoOpcode.Read, _rig.Nsid, 0, 1);
        Assert.Equal(NvmeStatus.PrpOffsetInvalid, _drv.ExecuteRaw(1, rd with { Prp1 = Buf + 2 }).Status);
        // PRP2 with an offset when it must be a page pointer
        var rd2 = NvmeDriver.ReadWrite(NvmeIoOpcode.Read, _rig.Nsid, 0, 16);
        Assert.Equal(NvmeStatus.PrpOffsetInvalid, _drv.ExecuteRaw(1, rd2 with { Prp1 = Buf, Prp2 = Buf + 4096 + 8 }).Status);
        // A malformed PRP list: second entry has an offset
        ulong list = _drv.Allocate(4096);
        byte[] l = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(l, Buf + 4096);
        BinaryPrimitives.WriteUInt64LittleEndian(l.AsSpan(8), Buf + 8192 + 4);
        _ram.Write(list, l);
        var rd3 = NvmeDriver.ReadWrite(NvmeIoOpcode.Read, _rig.Nsid, 0, 24);
        Assert.Equal(NvmeStatus.PrpOffsetInvalid, _drv.ExecuteRaw(1, rd3 with { Prp1 = Buf, Prp2 = list }).Status);
        // A PRP list pointer outside guest memory
        Assert.Equal(NvmeStatus.DataTransferError, _drv.ExecuteRaw(1, rd3 with { Prp1 = Buf, Prp2 = Outside }).Status);
        // The controller is still healthy
        Assert.Equal((uint)ControllerStatus.Rdy, Reg(NvmeRegisters.Csts));
        Assert.True(_drv.Read(2, _rig.Nsid, 0, 64, 512, Buf).IsSuccess);
    }

    [Fact]
    public void Doorbell_past_queue_size_and_to_a_missing_queue_raise_error_events()
    {
        ushort aer = _drv.Submit(0, Op(NvmeAdminOpcode.AsynchronousEventRequest));
        Doorbell(NvmeRegisters.SqTailDoorbell(1), 5000);
        var c = _drv.Wait(0, aer, 2000);
        Assert.True(c.Status.IsSuccess);
        var ev = AsyncEvent.FromDw0(c.Dw0);
        Assert.Equal(new AsyncEvent(AsyncEventType.ErrorStatus, (byte)AsyncEventErrorInfo.InvalidDoorbellWriteValue, LogPageId.ErrorInformation), ev);

        // Error events stay masked until the error log is read.
        ushort aer2 = _drv.Submit(0, Op(NvmeAdminOpcode.AsynchronousEventRequest));
        Doorbell(NvmeRegisters.SqTailDoorbell(9), 1);
        Thread.Sleep(20);
        Assert.Contains(aer2, _drv.InFlightCommands(0));
        ulong page = _drv.Allocate(4096);
        Assert.True(Admin(Op(NvmeAdminOpcode.GetLogPage, (uint)LogPageId.ErrorInformation | (15u << 16)), page, 64).IsSuccess);
        c = _drv.Wait(0, aer2, 2000);
        Assert.Equal(new AsyncEvent(AsyncEventType.ErrorStatus, (byte)AsyncEventErrorInfo.WriteToInvalidDoorbell, LogPageId.ErrorInformation), AsyncEvent.FromDw0(c.Dw0));
        // A CQ head that claims entries the controller never posted is an invalid value too.
        ushort aer3 = _drv.Submit(0, Op(NvmeAdminOpcode.AsynchronousEventRequest));
        Assert.True(Admin(Op(NvmeAdminOpcode.GetLogPage, (uint)LogPageId.ErrorInformation | (15u << 16)), page, 64).IsSuccess);
        Doorbell(NvmeRegisters.CqHeadDoorbell(2), 7);
        Assert.Equal((byte)AsyncEventErrorInfo.InvalidDoorbellWriteValue, AsyncEvent.FromDw0(_drv.Wait(0, aer3, 2000).Dw0).Info);
        Assert.True(_drv.Read(1, _rig.Nsid, 0, 1, 512, Buf).IsSuccess);
    }

    [Fact]
    public void Too_many_async_event_requests_get_the_limit_status()
    {
        for (int i = 0; i <= NvmeController.Aerl; i++)
        {
            _drv.Submit(0, Op(NvmeAdminOpcode.AsynchronousEventRequest));
        }
        Assert.Equal(NvmeStatus.AsyncEventRequestLimitExceeded, Admin(Op(NvmeAdminOpcode.AsynchronousEventRequest)));
    }

    [Fact]
    public void Invalid_admin_doorbell_sets_controller_fatal_status_and_reset_recovers()
    {
        Doorbell(NvmeRegisters.SqTailDoorbell(0), 4000);
        Assert.NotEqual(0u, Reg(NvmeRegisters.Csts) & (uint)ControllerStatus.Cfs);
        // A fresh driver resets the controller and works again.
        var drv2 = NvmeDriver.Initialize(_ram, _fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 1, Interrupts = false });
        Assert.Equal(0u, Reg(NvmeRegisters.Csts) & (uint)ControllerStatus.Cfs);
        Assert.True(drv2.Read(1, _rig.Nsid, 0, 1, 512, Buf).IsSuccess);
    }

    [Fact]
    public void Commands_to_a_disabled_controller_are_not_processed()
    {
        Doorbell(NvmeRegisters.Cc, 0);
        Assert.Equal(0u, Reg(NvmeRegisters.Csts) & 1);
        // Put a command in the admin SQ and ring; nothing may be posted.
        ulong q0 = Region + NvmeDriverState.OffQueues;
        ulong sq = _ram.ReadUInt64(q0 + NvmeDriverState.QSqBase);
        ulong cq = _ram.ReadUInt64(q0 + NvmeDriverState.QCqBase);
        byte[] zero = new byte[32 * 16];
        _ram.Write(cq, zero);
        byte[] sqe = new byte[64];
        new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.KeepAlive, Cid = 1 }.WriteTo(sqe);
        _ram.Write(sq, sqe);
        Doorbell(NvmeRegisters.SqTailDoorbell(0), 1);
        Thread.Sleep(10);
        byte[] cqe = new byte[16];
        _ram.Read(cq, cqe);
        Assert.Equal(new byte[16], cqe);
        Assert.Equal(0u, Reg(NvmeRegisters.Csts) & 3);
    }

    [Fact]
    public void Enable_with_invalid_admin_queue_attributes_sets_cfs()
    {
        Doorbell(NvmeRegisters.Cc, 0);
        Doorbell(NvmeRegisters.Aqa, 0);
        Doorbell(NvmeRegisters.Cc, ControllerConfiguration.Encode(true).Value);
        Assert.Equal((uint)ControllerStatus.Cfs, Reg(NvmeRegisters.Csts) & 3);
    }

    [Fact]
    public void Shutdown_reports_complete_and_stops_processing()
    {
        _drv.Shutdown();
        Assert.Equal((uint)ControllerStatus.ShstComplete, Reg(NvmeRegisters.Csts) & 0xC);
        Assert.Throws<NvmeDriverException>(() => _drv.Wait(1, _drv.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Read, _rig.Nsid, 0, 1), Buf, 512), 100));
    }

    [Fact]
    public void Identify_variants_and_secondary_only_commands_on_primary()
    {
        ulong page = _drv.Allocate(4096);
        Assert.True(Admin(Op(NvmeAdminOpcode.Identify, (uint)IdentifyCns.NamespaceIdDescriptorList, nsid: _rig.Nsid), page, 4096).IsSuccess);
        byte[] b = new byte[4096];
        _ram.Read(page, b);
        var descs = NamespaceIdDescriptor.ReadList(b);
        Assert.Equal([NamespaceIdType.Eui64, NamespaceIdType.Nguid, NamespaceIdType.Csi], descs.Select(d => d.Nidt));
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, Admin(Op(NvmeAdminOpcode.Identify, (uint)IdentifyCns.Namespace, nsid: 0), page, 4096));
        // A valid but inactive NSID returns zeroes.
        Assert.True(Admin(Op(NvmeAdminOpcode.Identify, (uint)IdentifyCns.Namespace, nsid: 5), page, 4096).IsSuccess);
        _ram.Read(page, b);
        Assert.All(b, x => Assert.Equal(0, x));
        Assert.Equal(NvmeStatus.InvalidField, Admin(Op(NvmeAdminOpcode.Identify, 0x55), page, 4096));
        Assert.Equal(NvmeStatus.DataTransferError, Admin(Op(NvmeAdminOpcode.Identify, 1), Outside, 4096));

        Assert.True(Admin(Op(NvmeAdminOpcode.Identify, (uint)IdentifyCns.PrimaryControllerCapabilities), page, 4096).IsSuccess);
        _ram.Read(page, b);
        Assert.True(PrimaryControllerCapabilities.TryRead(b, out var caps));
        Assert.Equal(3, caps.Crt);
        Assert.Equal((uint)(9 * 2), caps.Vqfrt);
        Assert.True(Admin(Op(NvmeAdminOpcode.Identify, (uint)IdentifyCns.SecondaryControllerList), page, 4096).IsSuccess);
        _ram.Read(page, b);
        var list = SecondaryControllerEntry.ReadList(b);
        Assert.Equal([(ushort)1, (ushort)2], list.Select(e => e.Scid));
        Assert.All(list, e => Assert.False(e.Online));
    }

    private CompletionQueueEntry ReadCqe(ulong cq, int index)
    {
        byte[] b = new byte[CompletionQueueEntry.Size];
        _ram.Read(cq + (ulong)(index * CompletionQueueEntry.Size), b);
        Assert.True(CompletionQueueEntry.TryRead(b, out var e));
        return e;
    }

    /// <summary>Rings a doorbell as a shadow-doorbell driver does: the shadow copy in memory, then the register.</summary>
    private void Ring(int qid, bool sq, uint value)
    {
        ulong shadow = _ram.ReadUInt64(_drv.StateGpa + NvmeDriverState.OffShadow);
        if (shadow != 0)
        {
            _ram.WriteUInt32(shadow + (ulong)(sq ? ShadowDoorbell.SqOffset(qid) : ShadowDoorbell.CqOffset(qid)), value);
        }
        Doorbell(sq ? NvmeRegisters.SqTailDoorbell(qid) : NvmeRegisters.CqHeadDoorbell(qid), value);
    }

    private NvmeCompletion Abort(ushort sqid, ushort cid) => AdminC(Op(NvmeAdminOpcode.Abort, sqid | ((uint)cid << 16)));

    [Fact]
    public void Abort_of_a_command_waiting_in_its_sq_completes_it_with_command_abort_requested_without_running_it()
    {
        // Qid 2 again, with a 2-entry CQ (room for one completion): commands wait in the SQ while the CQ is full.
        Assert.True(Admin(Op(NvmeAdminOpcode.DeleteIoSubmissionQueue, 2)).IsSuccess);
        Assert.True(Admin(Op(NvmeAdminOpcode.DeleteIoCompletionQueue, 2)).IsSuccess);
        ulong cq = _drv.Allocate(4096), sq = _drv.Allocate(4096);
        Assert.True(Admin(Op(NvmeAdminOpcode.CreateIoCompletionQueue, 2 | (1u << 16), cdw11: 1) with { Prp1 = cq }).IsSuccess);
        Assert.True(Admin(Op(NvmeAdminOpcode.CreateIoSubmissionQueue, 2 | (7u << 16), cdw11: 1 | (2u << 16)) with { Prp1 = sq }).IsSuccess);
        byte[] raw = new byte[SubmissionQueueEntry.Size];
        for (int i = 0; i < 3; i++)
        {
            _ram.Write(Buf + (ulong)(i * 4096), Pattern(4096, 60 + i));
            var w = NvmeDriver.ReadWrite(NvmeIoOpcode.Write, _rig.Nsid, 100 + (ulong)(i * 8), 8) with { Cid = (ushort)(i + 1), Prp1 = Buf + (ulong)(i * 4096) };
            w.WriteTo(raw);
            _ram.Write(sq + (ulong)(i * SubmissionQueueEntry.Size), raw);
        }
        Ring(2, sq: true, 3);
        Assert.Equal(1, ReadCqe(cq, 0).Cid); // CID 1 ran; CIDs 2 and 3 wait for room in the CQ

        Assert.Equal(0u, Abort(2, 3).Dw0 & 1);  // found in the SQ: aborted
        Assert.Equal(1u, Abort(2, 1).Dw0 & 1);  // already completed
        Assert.Equal(1u, Abort(2, 9).Dw0 & 1);  // no such command
        Assert.Equal(1u, Abort(7, 2).Dw0 & 1);  // no such SQ

        Ring(2, sq: false, 1);
        var second = ReadCqe(cq, 1);
        Assert.Equal((2, true), (second.Cid, second.Status.IsSuccess));
        Ring(2, sq: false, 0);
        var third = ReadCqe(cq, 0);
        Assert.Equal(3, third.Cid);
        Assert.Equal(NvmeStatus.AbortRequested, third.Status);
        Assert.False(third.Phase); // second pass over the CQ
        Assert.Equal(Pattern(4096, 61), _rig.ReadFile(108 * 512, 4096));
        Assert.Equal(new byte[4096], _rig.ReadFile(116 * 512, 4096)); // the aborted write never ran
    }

    [Fact]
    public void Abort_of_an_outstanding_async_event_request_completes_it_with_command_abort_requested()
    {
        ushort aer = _drv.Submit(0, Op(NvmeAdminOpcode.AsynchronousEventRequest));
        var abort = Abort(0, aer);
        Assert.True(abort.Status.IsSuccess);
        Assert.Equal(0u, abort.Dw0 & 1);
        Assert.Equal(NvmeStatus.AbortRequested, _drv.Wait(0, aer, 2000).Status);
        Assert.Equal(1u, Abort(0, aer).Dw0 & 1); // gone now
        // The AER slot is free again: four may be outstanding (AERL 3), a fifth is refused.
        for (int i = 0; i < 4; i++)
        {
            _drv.Submit(0, Op(NvmeAdminOpcode.AsynchronousEventRequest));
        }
        Assert.Equal(NvmeStatus.AsyncEventRequestLimitExceeded, Admin(Op(NvmeAdminOpcode.AsynchronousEventRequest)));
    }
}
