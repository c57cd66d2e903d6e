using System.Diagnostics;
using Vmig.Guest.Nvme;
using Vmig.Spec.Nvme;

using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>Interrupt Coalescing (FID 08h) applied per vector, and its exceptions: the admin CQ and vectors with CD set (FID 09h).</summary>
public sealed class NvmeInterruptCoalescingTests
{
    [Fact]
    public void Coalescing_holds_an_io_vector_until_the_threshold_or_the_aggregation_time_never_the_admin_queue_or_a_cd_vector()
    {
        using var rig = new NvmeRig();
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (ram, fn) = rig.Connect(0);
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2, ShadowDoorbells = false });
        int VectorOf(int qid) => (ushort)ram.ReadUInt32(drv.StateGpa + NvmeDriverState.OffQueues + (ulong)(qid * NvmeDriverState.QueueDescSize) + NvmeDriverState.QVector);
        int v1 = VectorOf(1), v2 = VectorOf(2);
        Assert.True(v1 != 0 && v2 != 0 && v1 != v2);

        // AGGR THR 3 (0's based: 4 entries), AGGR TIME 200 × 100 µs = 20 ms; CD on queue 2's vector.
        Assert.True(drv.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.SetFeatures, Cdw10 = (uint)FeatureId.InterruptCoalescing, Cdw11 = 3 | (200u << 8) }).Status.IsSuccess);
        Assert.True(drv.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.SetFeatures, Cdw10 = (uint)FeatureId.InterruptVectorConfiguration, Cdw11 = (uint)v2 | (1u << 16) }).Status.IsSuccess);
        for (int v = 0; v < fn.MsixVectorCount; v++)
        {
            fn.WaitInterrupt(v, 0);
        }
        ushort Read(int qid) => drv.Submit(qid, NvmeDriver.ReadWrite(NvmeIoOpcode.Read, rig.Nsid, 0, 1), Buf, 512);

        // Threshold: three completions on queue 1 raise nothing, the fourth raises one interrupt.
        for (int i = 0; i < 3; i++)
        {
            Read(1);
        }
        Assert.False(fn.WaitInterrupt(v1, 0));
        Read(1);
        Assert.True(fn.WaitInterrupt(v1, 0));
        Assert.Equal(4, drv.ProcessCompletions(1));

        // Aggregation time: a lone completion is signalled about 20 ms later, not at once.
        var sw = Stopwatch.StartNew();
        Read(1);
        Assert.False(fn.WaitInterrupt(v1, 0));
        Assert.True(fn.WaitInterrupt(v1, 5000));
        Assert.True(sw.ElapsedMilliseconds >= 15, $"signalled after {sw.ElapsedMilliseconds} ms");
        Assert.Equal(1, drv.ProcessCompletions(1));

        // CD vector: every completion is signalled at once.
        Read(2);
        Assert.True(fn.WaitInterrupt(v2, 0));
        Read(2);
        Assert.True(fn.WaitInterrupt(v2, 0));
        Assert.Equal(2, drv.ProcessCompletions(2));

        // The admin CQ is never coalesced.
        drv.Submit(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.GetFeatures, Cdw10 = (uint)FeatureId.InterruptCoalescing });
        Assert.True(fn.WaitInterrupt(0, 0));
        Assert.Equal(1, drv.ProcessCompletions(0));

        // Coalescing off again (THR 0): queue 1 signals every completion.
        Assert.True(drv.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.SetFeatures, Cdw10 = (uint)FeatureId.InterruptCoalescing, Cdw11 = 0 }).Status.IsSuccess);
        Read(1);
        Assert.True(fn.WaitInterrupt(v1, 0));
    }
}
