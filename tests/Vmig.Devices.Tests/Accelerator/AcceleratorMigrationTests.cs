using Vmig.Spec;
using System.Buffers.Binary;
using Vmig.Devices.Accelerator;
using Vmig.Guest.Accelerator;
using Vmig.Migration;
using Vmig.Spec.Accelerator;
using Vmig.VfioUser.Protocol;

namespace Vmig.Devices.Tests.Accelerator;

public sealed class AcceleratorMigrationTests
{
    private const int Page = 4096;
    private const long RecordOverhead = AcceleratorRecordHeader.Size + AcceleratorRecordHeader.TrailerSize;

    private static void FillRandom(AcceleratorRig rig, int seed, long offset, int length)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        rig.Ram.Write(AcceleratorRig.BufferArea, data);
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.CopyToDevice, AcceleratorRig.BufferArea, (ulong)offset, (ulong)length).Status);
    }

    [Fact]
    public void Flags_AreStopCopyP2PPreCopy() =>
        Assert.Equal(MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, new AcceleratorRig(initDriver: false).Migration.MigrationFlags);

    [Fact]
    public void PrecopyInfo_ExactInitial_FallsToZeroWhenIdle_GrowsUnderWrites()
    {
        using var rig = new AcceleratorRig(deviceMemory: 2 << 20);
        rig.Step(DeviceState.Running, DeviceState.PreCopy);
        long memRecords = (2 << 20) / (256 * Page);
        long expectedInitial = RecordOverhead + AcceleratorProfile.Size + (2 << 20) + memRecords * RecordOverhead;
        Assert.Equal(new PrecopyInfo((ulong)expectedInitial, 0), rig.Migration.GetPrecopyInfo());

        // Exact after a partial read, even mid-record.
        var wire = new MemoryStream();
        var buf = new byte[100];
        Assert.Equal(100, rig.Migration.ReadData(buf));
        Assert.Equal((ulong)expectedInitial - 100, rig.Migration.GetPrecopyInfo().InitialBytes);

        Assert.Equal(expectedInitial - 100, rig.Drain(wire));
        Assert.Equal(new PrecopyInfo(0, 0), rig.Migration.GetPrecopyInfo());
        Assert.Equal(0, rig.Migration.ReadData(buf)); // temporary end of stream: nothing for now

        // Writes grow dirty_bytes: 3 pages in one run, then one far page (a second run).
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.Fill, 0, 0x1_0000, 3 * Page, 5).Status);
        Assert.Equal(new PrecopyInfo(0, (ulong)(3 * Page + RecordOverhead)), rig.Migration.GetPrecopyInfo());
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.Fill, 0, 0x10_0000 + 8, 16, 5).Status);
        ulong dirty = (ulong)(4 * Page + 2 * RecordOverhead);
        Assert.Equal(new PrecopyInfo(0, dirty), rig.Migration.GetPrecopyInfo());
        Assert.Equal(4u, rig.Pf.QueryDirtyPages(0));
        // Reads do not dirty device memory; CopyFromDevice and CRC leave dirty_bytes alone.
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.Crc32C, AcceleratorRig.BufferArea, 0, 1 << 20).Status);
        Assert.Equal(dirty, rig.Migration.GetPrecopyInfo().DirtyBytes);

        Assert.Equal((long)dirty, rig.Drain(wire));
        Assert.Equal(new PrecopyInfo(0, 0), rig.Migration.GetPrecopyInfo());

        // Leaving PRE_COPY for RUNNING ends tracking.
        rig.Step(DeviceState.PreCopy, DeviceState.Running);
        Assert.Equal(0u, rig.Vf.ReadHiddenRegister(AcceleratorMigrationRegister.Status) & AcceleratorMigrationRegister.StatusTracking);
    }

    [Fact]
    public void PrecopyInfo_PagesDirtiedAheadOfTheInitialCursor_AreNotCountedTwice()
    {
        using var rig = new AcceleratorRig(deviceMemory: 2 << 20);
        rig.Step(DeviceState.Running, DeviceState.PreCopy);
        var first = rig.Migration.GetPrecopyInfo();
        // Dirty a page the initial image has not reached yet: still one copy, in initial_bytes.
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.Fill, 0, (1 << 20) + Page, 8, 1).Status);
        Assert.Equal(first, rig.Migration.GetPrecopyInfo());
        var wire = new MemoryStream();
        Assert.Equal((long)first.InitialBytes, rig.Drain(wire));
    }

    [Fact]
    public void StopCopySize_MatchesTheBytesStopCopyProduces()
    {
        using var rig = new AcceleratorRig(deviceMemory: 1 << 20);
        FillRandom(rig, 3, 0, 64 * 1024);
        ulong predicted = rig.Migration.GetStopCopySize();
        rig.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.StopCopy);
        Assert.Equal(predicted, rig.Migration.GetStopCopySize());
        var wire = new MemoryStream();
        Assert.Equal((long)predicted, rig.Drain(wire, 7000));
        Assert.Equal(0, rig.Migration.ReadData(new byte[10])); // permanent end
        rig.Step(DeviceState.StopCopy, DeviceState.Stop, DeviceState.RunningP2P, DeviceState.Running);
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.Fill, 0, 0, 8, 1).Status); // the source runs on
    }

    /// <summary>
    /// A busy VF: data in device memory, pre-copy rounds while jobs keep writing, jobs queued and in flight at the
    /// switchover. The target VF (another PF, another guest RAM copy) ends with identical device memory and the
    /// guest driver re-attached from RAM sees every job complete exactly once.
    /// </summary>
    [Fact]
    public void BusyVf_MigratesThroughPreCopyAndStopCopy_ToAnIdenticalTarget()
    {
        using var src = new AcceleratorRig();
        using var dst = new AcceleratorRig(initDriver: false);
        var d = src.D;
        FillRandom(src, 10, 0, 256 * 1024);
        FillRandom(src, 11, 3 << 20, 64 * 1024);

        src.Step(DeviceState.Running, DeviceState.PreCopy);
        var wire = new MemoryStream();
        var info0 = src.Migration.GetPrecopyInfo();
        Assert.Equal((long)info0.InitialBytes, src.Drain(wire, 256 * 1024 + 17));

        // Round 2: the guest keeps writing device memory.
        for (int i = 0; i < 10; i++)
        {
            Assert.Equal(AcceleratorJobStatus.Success, src.Run(AcceleratorOpcode.Fill, 0, (ulong)(i * 5 * Page), Page, (ulong)i).Status);
        }
        var info1 = src.Migration.GetPrecopyInfo();
        Assert.Equal(0ul, info1.InitialBytes);
        Assert.Equal((ulong)(10 * (Page + RecordOverhead)), info1.DirtyBytes);
        Assert.Equal((long)info1.DirtyBytes, src.Drain(wire));

        // Switchover with work queued: 24 jobs submitted, some fetched and finished, others still in the ring.
        var slots = new List<uint>();
        for (int i = 0; i < 24; i++)
        {
            ulong off = (ulong)(0x20_0000 + i * 2 * Page);
            slots.Add(d.Submit(new AcceleratorJob(AcceleratorOpcode.Fill, 0, 0, 0, off, 2 * Page, 0x0101_0101_0101_0101UL * (ulong)(i + 1))));
        }
        src.Step(DeviceState.PreCopy, DeviceState.PreCopyP2P, DeviceState.StopCopy);
        src.Drain(wire, 100_000);
        Assert.Equal(0, src.Migration.ReadData(new byte[1]));
        uint srcCompleted = src.Vf.Registers.CompletedJobs;

        // RAM migration (the VMM's job): the target guest RAM is a copy of the source's after the stop.
        src.Ram.At(0, (int)AcceleratorRig.RamSize).CopyTo(dst.Ram.At(0, (int)AcceleratorRig.RamSize));

        dst.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.Resuming);
        var bytes = wire.ToArray();
        for (int at = 0; at < bytes.Length; at += 7777)
        {
            dst.Migration.WriteData(bytes.AsSpan(at, Math.Min(7777, bytes.Length - at)));
        }
        dst.Step(DeviceState.Resuming, DeviceState.Stop);
        Assert.True(src.Vf.Memory.GetSpan(0, 4 << 20).SequenceEqual(dst.Vf.Memory.GetSpan(0, 4 << 20)));
        dst.Step(DeviceState.Stop, DeviceState.RunningP2P, DeviceState.Running);

        var td = AcceleratorDriver.Attach(dst.Ram, dst.Function, AcceleratorRig.DriverBlock);
        var sequences = new HashSet<uint>();
        foreach (var s in slots)
        {
            var c = td.Wait(s);
            Assert.Equal(AcceleratorJobStatus.Success, c.Status);
            Assert.True(sequences.Add(c.Sequence), $"sequence {c.Sequence} completed twice");
        }
        // Jobs the source finished keep the source's completion; the rest completed on the target, once each.
        uint total = dst.Vf.Registers.CompletedJobs;
        Assert.Equal(srcCompleted + (uint)slots.Count(s => !src.D.TryGetCompletion(s, out _)), total);
        Assert.Equal(12u + 24u, total); // 2 copies + 10 fills + 24 queued
        for (int i = 0; i < 24; i++)
        {
            Assert.True(dst.Vf.Memory.GetSpan(0x20_0000 + i * 2 * Page, 2 * Page).IndexOfAnyExcept((byte)(i + 1)) < 0);
        }
        // The target computes over the migrated memory exactly what the source held.
        var crcSrc = src.Vf.Memory.GetSpan(0, 256 * 1024).ToArray();
        Assert.Equal(Vmig.Spec.Crc32C.Compute(crcSrc), td.Run(new AcceleratorJob(AcceleratorOpcode.Crc32C, 0, 0, AcceleratorRig.BufferArea, 0, 256 * 1024)).Result);
    }

    [Fact]
    public void ProfileMismatch_IsRefusedBeforeAnyDeviceMemoryIsWritten()
    {
        using var src = new AcceleratorRig();
        using var dst = new AcceleratorRig(deviceMemory: 8 << 20, initDriver: false);
        FillRandom(src, 4, 0, Page);
        src.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.StopCopy);
        var wire = new MemoryStream();
        src.Drain(wire);

        dst.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.Resuming);
        var e = Assert.Throws<MigrationException>(() => dst.Migration.WriteData(wire.ToArray()));
        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Contains("profile mismatch", e.Message);
        Assert.True(dst.Vf.Memory.GetSpan(0, Page).IndexOfAnyExcept((byte)0) < 0);
        // The session is dead; leaving RESUMING fails into ERROR.
        var commit = Assert.Throws<MigrationException>(() => dst.Step(DeviceState.Resuming, DeviceState.Stop));
        Assert.Equal(DeviceState.Error, commit.ReachedState);
    }

    [Fact]
    public void CorruptOrTruncatedStreams_AreRefused()
    {
        using var src = new AcceleratorRig(deviceMemory: 1 << 20);
        FillRandom(src, 5, 0, 3 * Page);
        src.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.StopCopy);
        var wire = new MemoryStream();
        src.Drain(wire);
        var good = wire.ToArray();

        void Load(byte[] stream, bool expectWriteFailure)
        {
            using var dst = new AcceleratorRig(deviceMemory: 1 << 20, initDriver: false);
            dst.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.Resuming);
            if (expectWriteFailure)
            {
                Assert.Equal(Errno.EINVAL, Assert.Throws<MigrationException>(() => dst.Migration.WriteData(stream)).Errno);
                return;
            }
            dst.Migration.WriteData(stream);
            Assert.Equal(Errno.EINVAL, Assert.Throws<MigrationException>(() => dst.Step(DeviceState.Resuming, DeviceState.Stop)).Errno);
        }

        var payloadFlip = (byte[])good.Clone();
        payloadFlip[AcceleratorRecordHeader.Size + AcceleratorProfile.Size + 4 + AcceleratorRecordHeader.Size + 100] ^= 1; // inside the first Pages payload
        Load(payloadFlip, expectWriteFailure: true);
        var headerFlip = (byte[])good.Clone();
        headerFlip[AcceleratorRecordHeader.Size + AcceleratorProfile.Size + 4 + 8] ^= 0x10; // first Pages record's device offset
        Load(headerFlip, expectWriteFailure: true);
        Load(good.AsSpan(0, good.Length - 40).ToArray(), expectWriteFailure: false); // End record missing
        var extra = good.Concat(new byte[] { 1 }).ToArray();
        Load(extra, expectWriteFailure: true); // bytes after End

        // A stream that does not start with the profile.
        var noProfile = good.AsSpan(AcceleratorRecordHeader.Size + AcceleratorProfile.Size + 4).ToArray();
        Load(noProfile, expectWriteFailure: true);

        // A valid-CRC State whose registers name a ring the target VF would refuse.
        var state = (byte[])good.Clone();
        int stateAt = FindRecord(state, AcceleratorRecordType.State);
        var payload = state.AsSpan(stateAt + AcceleratorRecordHeader.Size, (int)BinaryPrimitives.ReadUInt32LittleEndian(state.AsSpan(stateAt + 16)));
        BinaryPrimitives.WriteUInt32LittleEndian(payload[0..], AcceleratorRegister.ControlEnable);
        BinaryPrimitives.WriteUInt32LittleEndian(payload[16..], 3); // ring size 3
        BinaryPrimitives.WriteUInt32LittleEndian(state.AsSpan(stateAt + AcceleratorRecordHeader.Size + payload.Length), Vmig.Spec.Crc32C.Compute(payload));
        Load(state, expectWriteFailure: false);
    }

    /// <summary>A 4 MiB VF filled with a pattern, saved in STOP_COPY: Profile, four 1 MiB Pages records, State, End.</summary>
    private static (AcceleratorRig Src, byte[] Wire) SavedFullVf()
    {
        var src = new AcceleratorRig();
        Assert.Equal(AcceleratorJobStatus.Success, src.Run(AcceleratorOpcode.Fill, 0, 0, 4 << 20, 0x9E37_79B9_7F4A_7C15UL).Status);
        src.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.StopCopy);
        var wire = new MemoryStream();
        src.Drain(wire, 1 << 20);
        return (src, wire.ToArray());
    }

    /// <summary>Writes <paramref name="stream"/> in pieces of the sizes <paramref name="next"/> gives; returns the first write's error, if any.</summary>
    private static MigrationException? LoadInPieces(AcceleratorRig dst, byte[] stream, Func<int, int> next)
    {
        dst.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.Resuming);
        for (int at = 0, i = 0; at < stream.Length; i++)
        {
            int n = Math.Clamp(next(i), 1, stream.Length - at);
            try
            {
                dst.Migration.WriteData(stream.AsSpan(at, n));
            }
            catch (MigrationException e)
            {
                return e;
            }
            at += n;
        }
        return null;
    }

    public static TheoryData<string> Segmentations => new() { "whole", "1 MiB", "1 MiB + 36", "1 MiB - 3", "4 KiB + 1", "1 byte near each trailer", "random" };

    private static Func<int, int> Pieces(string how, byte[] stream)
    {
        var rng = new Random(how.Length);
        return how switch
        {
            "whole" => _ => stream.Length,
            "1 MiB" => _ => 1 << 20,
            "1 MiB + 36" => _ => (1 << 20) + 36,
            "1 MiB - 3" => _ => (1 << 20) - 3,
            "4 KiB + 1" => _ => 4097,
            // The header, the payload but its last 2 bytes, then single bytes: the trailer arrives across writes.
            "1 byte near each trailer" => PiecesAlongRecords(stream),
            _ => _ => rng.Next(1, 300_000),
        };
    }

    [Theory]
    [MemberData(nameof(Segmentations))]
    public void AnySegmentationOfTheResumeStream_GivesAnIdenticalTarget(string how)
    {
        var (src, wire) = SavedFullVf();
        using var _ = src;
        using var dst = new AcceleratorRig(initDriver: false);
        Assert.Null(LoadInPieces(dst, wire, Pieces(how, wire)));
        dst.Step(DeviceState.Resuming, DeviceState.Stop);
        Assert.True(dst.Vf.Memory.GetSpan(0, 4 << 20).SequenceEqual(src.Vf.Memory.GetSpan(0, 4 << 20)));
    }

    [Theory]
    [MemberData(nameof(Segmentations))]
    public void CorruptPagesRecord_IsRefusedBeforeAnyOfItReachesDeviceMemory(string how)
    {
        var (src, wire) = SavedFullVf();
        using var _ = src;
        // Corrupt the last payload byte of the third Pages record (device memory [2 MiB, 3 MiB)): its CRC fails only
        // once the whole payload has been seen, after most of it has arrived.
        int third = FindRecord(wire, AcceleratorRecordType.Pages) + (2 * (int)AcceleratorRecordHeader.RecordSize(1 << 20));
        Assert.True(AcceleratorRecordHeader.TryRead(wire.AsSpan(third), out var h));
        Assert.Equal(2ul << 20, h.DeviceOffset);
        wire[third + AcceleratorRecordHeader.Size + (1 << 20) - 1] ^= 0x80;

        using var dst = new AcceleratorRig(initDriver: false);
        var e = LoadInPieces(dst, wire, Pieces(how, wire));
        Assert.NotNull(e);
        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Contains("CRC32C mismatch", e.Message);
        // Records before it were applied, none of the bad one was, nothing after it.
        Assert.True(dst.Vf.Memory.GetSpan(0, 2 << 20).SequenceEqual(src.Vf.Memory.GetSpan(0, 2 << 20)));
        Assert.True(dst.Vf.Memory.GetSpan(2 << 20, 2 << 20).IndexOfAnyExcept((byte)0) < 0);
    }

    /// <summary>Pieces that follow the records: the header, the payload less 2 bytes, then 1-byte writes through the trailer.</summary>
    private static Func<int, int> PiecesAlongRecords(byte[] stream)
    {
        var sizes = new List<int>();
        for (int at = 0; at < stream.Length;)
        {
            Assert.True(AcceleratorRecordHeader.TryRead(stream.AsSpan(at), out var h));
            int payload = (int)h.PayloadLength;
            sizes.Add(AcceleratorRecordHeader.Size);
            if (payload > 2)
            {
                sizes.Add(payload - 2);
            }
            sizes.AddRange(Enumerable.Repeat(1, Math.Min(payload, 2) + AcceleratorRecordHeader.TrailerSize));
            at += (int)AcceleratorRecordHeader.RecordSize(payload);
        }
        return i => sizes[i];
    }

    private static int FindRecord(byte[] stream, AcceleratorRecordType type)
    {
        int at = 0;
        while (at < stream.Length)
        {
            Assert.True(AcceleratorRecordHeader.TryRead(stream.AsSpan(at), out var h));
            if (h.Type == type)
            {
                return at;
            }
            at += (int)AcceleratorRecordHeader.RecordSize(h.PayloadLength);
        }
        throw new InvalidOperationException($"no {type} record");
    }

    [Fact]
    public async Task DirtyingJob_StillConvergesThroughStopCopy()
    {
        using var src = new AcceleratorRig(deviceMemory: 2 << 20);
        using var dst = new AcceleratorRig(deviceMemory: 2 << 20, initDriver: false);
        src.Step(DeviceState.Running, DeviceState.PreCopy);
        var wire = new MemoryStream();
        src.Drain(wire);
        // A writer that keeps dirtying while rounds are read: it never reaches 0, so we stop after a few rounds.
        using var cts = new CancellationTokenSource();
        var writer = Task.Run(() =>
        {
            int i = 0;
            while (!cts.IsCancellationRequested)
            {
                src.Run(AcceleratorOpcode.Fill, 0, (ulong)(i++ % 64) * 8 * Page, 8 * Page, (ulong)i);
            }
        });
        for (int round = 0; round < 5; round++)
        {
            // Each round the writer has dirtied something new, and the round sends exactly what was reported.
            Assert.True(SpinWait.SpinUntil(() => src.Migration.GetPrecopyInfo().DirtyBytes > 0, 10_000));
            var info = src.Migration.GetPrecopyInfo();
            Assert.True(src.Drain(wire, limit: (long)(info.InitialBytes + info.DirtyBytes)) > 0);
        }
        cts.Cancel();
        await writer;
        src.Step(DeviceState.PreCopy, DeviceState.PreCopyP2P, DeviceState.StopCopy);
        src.Drain(wire);
        dst.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.Resuming);
        dst.Migration.WriteData(wire.ToArray());
        dst.Step(DeviceState.Resuming, DeviceState.Stop);
        Assert.True(src.Vf.Memory.GetSpan(0, 2 << 20).SequenceEqual(dst.Vf.Memory.GetSpan(0, 2 << 20)));
    }

    [Fact]
    public void LargeSparseDeviceMemory_JobsAndPrecopyInfoBeyond4GiB()
    {
        const ulong size = 5UL << 30; // sparse memfd: only touched pages are allocated
        using var rig = new AcceleratorRig(deviceMemory: size);
        Assert.Equal(size, rig.D.DeviceMemorySize);
        ulong high = (9UL << 29) + 8; // 4.5 GiB + 8
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.Fill, 0, high, 16, 0x0123_4567_89AB_CDEF).Status);
        Assert.Equal(0x0123_4567_89AB_CDEFul, BinaryPrimitives.ReadUInt64LittleEndian(rig.Vf.Memory.GetSpan((long)high, 8)));
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.CopyFromDevice, AcceleratorRig.BufferArea, high, 16).Status);
        Assert.Equal(0x0123_4567_89AB_CDEFul, rig.Ram.ReadUInt64(AcceleratorRig.BufferArea));
        Assert.Equal(AcceleratorJobStatus.DeviceRangeError, rig.Run(AcceleratorOpcode.Fill, 0, size - 8, 16, 1).Status);

        rig.Step(DeviceState.Running, DeviceState.PreCopy);
        long pages = (long)(size / Page);
        Assert.Equal((ulong)(RecordOverhead + AcceleratorProfile.Size + (long)size + pages / 256 * RecordOverhead), rig.Migration.GetPrecopyInfo().InitialBytes);
        // The first record header names the profile; nothing beyond it needs the whole memory in a buffer.
        var head = new byte[AcceleratorRecordHeader.Size];
        Assert.Equal(head.Length, rig.Migration.ReadData(head));
        Assert.True(AcceleratorRecordHeader.TryRead(head, out var h));
        Assert.Equal(AcceleratorRecordType.Profile, h.Type);
        rig.Step(DeviceState.PreCopy, DeviceState.Running);
    }

    [Fact]
    public void PreCopyAbandoned_BackToRunning_AndResetDropsTheSession()
    {
        using var rig = new AcceleratorRig(deviceMemory: 1 << 20);
        rig.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.PreCopyP2P);
        Assert.NotEqual(0ul, rig.Migration.GetPrecopyInfo().InitialBytes);
        rig.Step(DeviceState.PreCopyP2P, DeviceState.RunningP2P, DeviceState.Running);
        Assert.Throws<MigrationException>(() => rig.Migration.ReadData(new byte[16]));
        rig.Step(DeviceState.Running, DeviceState.PreCopy, DeviceState.PreCopyP2P);
        rig.Migration.OnReset();
        Assert.Throws<MigrationException>(() => rig.Migration.GetPrecopyInfo());
        Assert.Equal(0u, rig.Vf.ReadHiddenRegister(AcceleratorMigrationRegister.Status));
        Assert.Equal(AcceleratorJobStatus.Success, rig.Run(AcceleratorOpcode.Fill, 0, 0, 8, 1).Status);
    }
}
