using Vmig.Spec;
using Vmig.Devices.Accelerator;
using Vmig.Spec.Accelerator;

namespace Vmig.Devices.Tests.Accelerator;

/// <summary>Golden bytes of the layouts shared with the guest driver and of the migration stream records.</summary>
public sealed class AcceleratorLayoutTests
{
    [Fact]
    public void JobDescriptor_GoldenBytes_AndRoundTrip()
    {
        var job = new AcceleratorJob(AcceleratorOpcode.Crc32C, AcceleratorJobFlags.Interrupt, 0x11223344, 0x0102030405060708, 0x1112131415161718, 0x2122232425262728, 0x3132333435363738);
        var b = new byte[AcceleratorJob.Size];
        b.AsSpan().Fill(0xEE);
        job.WriteTo(b);
        Assert.Equal(Convert.FromHexString(
            "04010000" + "44332211" + "0807060504030201" + "1817161514131211" + "2827262524232221" + "3837363534333231"
            + "0000000000000000" + "00000000000000000000000000000000"), b);
        Assert.True(AcceleratorJob.TryRead(b, out var back));
        Assert.Equal(job, back);
        Assert.False(AcceleratorJob.TryRead(b.AsSpan(0, 63), out _));
    }

    [Fact]
    public void Completion_ReadsStatusSequenceResult()
    {
        var b = new byte[AcceleratorJob.Size];
        Convert.FromHexString("01000000" + "07000000" + "EFBEADDE").CopyTo(b, AcceleratorJob.StatusOffset);
        Assert.True(AcceleratorCompletion.TryRead(b, out var c));
        Assert.Equal(new AcceleratorCompletion(AcceleratorJobStatus.Success, 7, 0xDEADBEEF), c);
    }

    [Fact]
    public void RecordHeader_GoldenBytes_AndRejectsCorruption()
    {
        var h = new AcceleratorRecordHeader(AcceleratorRecordType.Pages, 0x0000_0001_0000_2000, 0x1000);
        var b = new byte[AcceleratorRecordHeader.Size];
        h.WriteTo(b);
        Assert.Equal(Convert.FromHexString("41564D52" + "0100" + "0200" + "0020000001000000" + "00100000" + "00000000"), b.AsSpan(0, 24).ToArray());
        Assert.Equal(Vmig.Spec.Crc32C.Compute(b.AsSpan(0, 24)), BitConverter.ToUInt32(b, 24));
        Assert.True(AcceleratorRecordHeader.TryRead(b, out var back));
        Assert.Equal(h, back);
        for (int i = 0; i < 28; i++)
        {
            var bad = (byte[])b.Clone();
            bad[i] ^= 0x04;
            Assert.False(AcceleratorRecordHeader.TryRead(bad, out _), $"flip at byte {i} accepted");
        }
        Assert.False(AcceleratorRecordHeader.TryRead(b.AsSpan(0, 31), out _));
    }

    [Fact]
    public void Profile_And_Registers_GoldenBytes()
    {
        var p = AcceleratorProfile.Create(0x1_0000_0000, 256);
        var b = new byte[AcceleratorProfile.Size];
        p.WriteTo(b);
        Assert.Equal(Convert.FromHexString("01000000" + "00010000" + "0000000001000000" + "02000000" + "00100000"), b);
        Assert.True(AcceleratorProfile.TryRead(b, out var pb));
        Assert.Equal(p, pb);

        var r = new AcceleratorVfRegisters(1, 1, 0x10_0000, 32, 5, 9, 0x001, 2, 100, 3);
        var rb = new byte[AcceleratorVfRegisters.Size];
        r.WriteTo(rb);
        Assert.Equal(Convert.FromHexString("01000000" + "01000000" + "0000100000000000" + "20000000" + "05000000" + "09000000"
            + "01000000" + "02000000" + "64000000" + "03000000" + "00000000"), rb);
        Assert.True(AcceleratorVfRegisters.TryRead(rb, out var rr));
        Assert.Equal(r, rr);
    }

    [Fact]
    public void Profile_Invalid_IsRefused()
    {
        Assert.Throws<ArgumentException>(() => AcceleratorProfile.Create(4097).Validate());
        Assert.Throws<ArgumentException>(() => AcceleratorProfile.Create(4096, 3).Validate());
        Assert.Throws<ArgumentException>(() => (AcceleratorProfile.Create(4096) with { ModelVersion = 2 }).Validate());
    }
}
