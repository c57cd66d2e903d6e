using System.Buffers.Binary;
using Vmig.Spec.Nvme;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>Golden layouts of the NVMe structures shared by the device and the guest driver.</summary>
public sealed class NvmeSpecLayoutTests
{
    [Fact]
    public void Sqe_layout_matches_the_common_command_format()
    {
        var sqe = new SubmissionQueueEntry
        {
            Opcode = 0x02, Flags = 0x00, Cid = 0x1234, Nsid = 0x01020304, Cdw2 = 0x11, Cdw3 = 0x22, Mptr = 0x33,
            Prp1 = 0x0000_0000_AABB_C000, Prp2 = 0x0000_0001_0000_0000, Cdw10 = 0xA, Cdw11 = 0xB, Cdw12 = 0xC,
            Cdw13 = 0xD, Cdw14 = 0xE, Cdw15 = 0xF,
        };
        byte[] b = new byte[64];
        sqe.WriteTo(b);
        Assert.Equal("02003412040302011100000022000000330000000000000000C0BBAA0000000000000000010000000A0000000B0000000C0000000D0000000E0000000F000000",
            Convert.ToHexString(b));
        Assert.True(SubmissionQueueEntry.TryRead(b, out var back));
        Assert.Equal(sqe, back);
        Assert.False(SubmissionQueueEntry.TryRead(b.AsSpan(0, 63), out _));
    }

    [Fact]
    public void Cqe_layout_puts_phase_in_bit_16_of_dw3_and_status_above_it()
    {
        var cqe = new CompletionQueueEntry(0xDEADBEEF, 0, 0x0005, 0x0002, 0x0077, NvmeStatus.InvalidQueueIdentifier, Phase: true);
        byte[] b = new byte[16];
        cqe.WriteTo(b);
        // SC 0x01, SCT 1, DNR → field 0x4101; shifted left by 1 with phase 1 → 0x8203.
        Assert.Equal("EFBEADDE00000000050002007700" + "0382", Convert.ToHexString(b));
        Assert.True(CompletionQueueEntry.TryRead(b, out var back));
        Assert.Equal(cqe, back);
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, back.Status);
    }

    [Fact]
    public void Register_offsets_and_doorbells()
    {
        Assert.Equal(0x1000, NvmeRegisters.SqTailDoorbell(0));
        Assert.Equal(0x1004, NvmeRegisters.CqHeadDoorbell(0));
        Assert.Equal(0x1018, NvmeRegisters.SqTailDoorbell(3));
        Assert.Equal(0x1038, NvmeRegisters.CqHeadDoorbell(3, dstrd: 1));
        Assert.True(NvmeRegisters.TryDecodeDoorbell(0x101C, 0, out int qid, out bool cq));
        Assert.Equal((3, true), (qid, cq));
        Assert.False(NvmeRegisters.TryDecodeDoorbell(0x1002, 0, out _, out _));
        var cap = ControllerCapabilities.Encode(1023, true, 2, 0, 1, 0, 0);
        Assert.Equal(0x0000_0020_0201_03FFUL, cap.Value);
        Assert.Equal((ushort)1023, cap.Mqes);
        Assert.Equal(0x00460001u, ControllerConfiguration.Encode(en: true).Value);
        Assert.Equal(0x001F001Fu, AdminQueueAttributes.Encode(31, 31).Value);
    }

    [Fact]
    public void Identify_controller_fields_sit_at_libnvme_offsets()
    {
        var id = new IdentifyController
        {
            Vid = 0x1B36, Sn = "SN1", Mn = "Model", Fr = "FW", Mdts = 9, Cntlid = 0x0102, Ver = 0x00020000,
            Cntrltype = 1, Oacs = OptionalAdminCommands.DoorbellBufferConfig | OptionalAdminCommands.HostManagedLiveMigration,
            Aerl = 3, Sqes = 0x66, Cqes = 0x44, Nn = 16, Oncs = OptionalNvmCommands.WriteZeroes, Vwc = 1, Subnqn = "nqn.x",
        };
        byte[] b = new byte[IdentifyController.Size];
        id.WriteTo(b);
        Assert.Equal(0x1B36, BinaryPrimitives.ReadUInt16LittleEndian(b));
        Assert.Equal("SN1 ", System.Text.Encoding.ASCII.GetString(b, 4, 4));
        Assert.Equal(9, b[77]);
        Assert.Equal(0x0102, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(78)));
        Assert.Equal(0x00020000u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(80)));
        Assert.Equal(1, b[111]);
        Assert.Equal(0x0900, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(256)));
        Assert.Equal(3, b[259]);
        Assert.Equal(0x66, b[512]);
        Assert.Equal(0x44, b[513]);
        Assert.Equal(16u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(516)));
        Assert.Equal(8, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(520)));
        Assert.Equal(1, b[525]);
        Assert.Equal((byte)'n', b[768]);
        Assert.True(IdentifyController.TryRead(b, out var back));
        Assert.Equal(id with { Fr = "FW", Sn = "SN1" }, back);
    }

    [Fact]
    public void Identify_namespace_fields_and_lba_formats()
    {
        var ns = new IdentifyNamespace
        {
            Nsze = 8192, Ncap = 8192, Nuse = 8192, Nlbaf = 1, Flbas = 1, Nmic = 1, Dlfeat = 1,
            Nguid = UInt128.Parse("0123456789ABCDEF0011223344556677", System.Globalization.NumberStyles.HexNumber),
            Eui64 = 0x0102030405060708, Lbaf = [new LbaFormat(0, 9, 0), new LbaFormat(0, 12, 0)],
        };
        byte[] b = new byte[IdentifyNamespace.Size];
        ns.WriteTo(b);
        Assert.Equal(8192UL, BinaryPrimitives.ReadUInt64LittleEndian(b));
        Assert.Equal(1, b[25]);
        Assert.Equal(1, b[26]);
        Assert.Equal(0x01, b[104]);
        Assert.Equal(0x77, b[119]);
        Assert.Equal(0x01, b[120]);
        Assert.Equal(0x00090000u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(128)));
        Assert.Equal(0x000C0000u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(132)));
        Assert.True(IdentifyNamespace.TryRead(b, out var back));
        Assert.Equal(4096, back.FormattedLbaSize);
        Assert.Equal(ns.Nguid, back.Nguid);
    }

    [Fact]
    public void Primary_capabilities_and_secondary_list_layouts()
    {
        var p = new PrimaryControllerCapabilities { Cntlid = 0, Crt = 3, Vqfrt = 36, Vqrfa = 10, Vqprt = 9, Vqfrsm = 9, Vqgran = 1, Vifrt = 36, Viprt = 9, Vifrsm = 9, Vigran = 1 };
        byte[] b = new byte[4096];
        p.WriteTo(b);
        Assert.Equal(3, b[4]);
        Assert.Equal(36u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(32)));
        Assert.Equal(10u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(36)));
        Assert.Equal(9, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(42)));
        Assert.Equal(36u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(64)));
        Assert.True(PrimaryControllerCapabilities.TryRead(b, out var pb));
        Assert.Equal(p, pb);

        SecondaryControllerEntry.WriteList(b, [new SecondaryControllerEntry(1, 0, 1, 1, 5, 4), new SecondaryControllerEntry(2, 0, 0, 2, 0, 0)]);
        Assert.Equal(2, b[0]);
        Assert.Equal(1, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(32)));
        Assert.Equal(1, b[36]);
        Assert.Equal(5, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(42)));
        Assert.Equal(4, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(44)));
        Assert.Equal(2, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(64)));
        Assert.Equal(2, SecondaryControllerEntry.ReadList(b).Count);
    }

    [Fact]
    public void Controller_state_layouts_follow_reference_5_6()
    {
        byte[] h = new byte[ControllerStateHeader.Size];
        new ControllerStateHeader(0, 1, 0x20, 0x40).WriteTo(h);
        Assert.Equal(1, h[2]);
        Assert.Equal(0x20u, BinaryPrimitives.ReadUInt32LittleEndian(h.AsSpan(16)));
        Assert.Equal(0x40u, BinaryPrimitives.ReadUInt32LittleEndian(h.AsSpan(32)));
        BinaryPrimitives.WriteUInt64LittleEndian(h.AsSpan(40), 1); // > 64-bit size: refused
        Assert.False(ControllerStateHeader.TryRead(h, out _));

        byte[] sq = new byte[24];
        new IoSubmissionQueueState(0x1000, 63, 1, 1, 1, 5, 9).WriteTo(sq);
        Assert.Equal("0010000000000000" + "3F00" + "0100" + "0100" + "0100" + "0500" + "0900" + "00000000", Convert.ToHexString(sq));
        byte[] cq = new byte[24];
        new IoCompletionQueueState(0x2000, 63, 1, 3, 4, IoCompletionQueueState.EncodeAttrs(true, true, true, 2)).WriteTo(cq);
        Assert.Equal("0020000000000000" + "3F00" + "0100" + "0300" + "0400" + "07000200" + "00000000", Convert.ToHexString(cq));
    }

    [Theory]
    [InlineData(10, 11, 10, true)]   // crossing the event index: ring
    [InlineData(5, 11, 10, false)]   // event index behind: no ring
    [InlineData(12, 11, 10, false)]  // event index ahead: no ring yet
    [InlineData(65535, 0, 65535, true)] // wrap-around
    public void Shadow_doorbell_need_event_rule(int eventIdx, int newValue, int oldValue, bool expected) =>
        Assert.Equal(expected, ShadowDoorbell.NeedEvent((ushort)eventIdx, (ushort)newValue, (ushort)oldValue));
}
