using Vmig.Devices.Accelerator;
using Vmig.Migration;
using Vmig.Spec.Accelerator;
using Vmig.VfioUser;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;

namespace Vmig.Devices.Tests.Accelerator;

/// <summary>
/// The accelerator VF's zero-copy migration paths: the resume stream received into device memory through
/// <see cref="IMigrationDataSink"/> (records straddling messages anywhere), the STOP_COPY stream handed out as gather
/// segments through <see cref="IMigrationDataSource"/>, in-process and over real vfio-user sockets.
/// </summary>
public sealed class AcceleratorZeroCopyTests() : SocketTestScope("vmig-accel-zc-")
{
    private const int MiB = 1 << 20;

    /// <summary>A 4 MiB VF filled with a pattern and stopped in STOP_COPY.</summary>
    private static AcceleratorRig StoppedSource(ulong pattern = 0x9E37_79B9_7F4A_7C15UL)
    {
        var src = new AcceleratorRig();
        Assert.Equal(AcceleratorJobStatus.Success, src.Run(AcceleratorOpcode.Fill, 0, 0, 4 << 20, pattern).Status);
        // The driver may see the completion before the device raises its interrupt, so InterruptStatus (migrated in the
        // state record) is 0 or 1 by timing. RUNNING_P2P waits for the batch, raise included; the ack makes two sources
        // byte-identical, which the gathered-vs-copied comparison needs.
        src.Step(DeviceState.Running, DeviceState.RunningP2P);
        src.D.AcknowledgeInterrupts();
        Assert.Equal(0u, src.D.ReadRegister(AcceleratorRegister.InterruptStatus));
        src.Step(DeviceState.RunningP2P, DeviceState.Stop, DeviceState.StopCopy);
        return src;
    }

    private static byte[] ReadAll(AcceleratorRig src)
    {
        var wire = new MemoryStream();
        src.Drain(wire, 64 * 1024);
        return wire.ToArray();
    }

    /// <summary>One MIG_DATA_WRITE message as the server feeds a sink: span by span, until the message is consumed.</summary>
    private static void FeedMessage(IMigrationDataSink sink, ReadOnlySpan<byte> message)
    {
        while (!message.IsEmpty)
        {
            var span = sink.GetWriteSpan(message.Length);
            Assert.InRange(span.Length, 1, message.Length);
            message[..span.Length].CopyTo(span);
            sink.AdvanceWrite(span.Length);
            message = message[span.Length..];
        }
    }

    public static TheoryData<string> Mixes => new() { "zero-copy", "alternating with the copying path" };

    [Theory]
    [MemberData(nameof(Mixes))]
    public void ZeroCopyLoad_GivesTheSameDeviceMemory_AtEveryMessageSplitAroundTheRecordBoundaries(string mix)
    {
        using var src = StoppedSource();
        var wire = ReadAll(src);
        using var dst = new AcceleratorRig(initDriver: false);
        var sink = Assert.IsAssignableFrom<IMigrationDataSink>(dst.Migration);
        var expected = src.Vf.Memory.GetSpan(0, 4 << 20).ToArray();
        // Messages of 1 MiB + d: every Pages record (1 MiB + 36 bytes) straddles messages, and across the d values each
        // of its header, payload and trailer bytes is the last one of some message; then random sizes.
        var plans = Enumerable.Range(-40, 81).Select(d => (Func<int, int>)(_ => MiB + d)).ToList();
        var rng = new Random(17);
        plans.Add(_ => rng.Next(1, 300_000));
        plans.Add(_ => rng.Next(1, 40));
        dst.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop);
        foreach (var plan in plans)
        {
            dst.Vf.Memory.GetSpan(0, 4 << 20).Fill(0xA5);
            dst.Step(DeviceState.Stop, DeviceState.Resuming);
            for (int at = 0, i = 0; at < wire.Length; i++)
            {
                int n = Math.Min(plan(i), wire.Length - at);
                if (mix != "zero-copy" && i % 2 == 1)
                {
                    dst.Migration.WriteData(wire.AsSpan(at, n));
                }
                else
                {
                    FeedMessage(sink, wire.AsSpan(at, n));
                }
                at += n;
            }
            dst.Step(DeviceState.Resuming, DeviceState.Stop);
            Assert.True(expected.AsSpan().SequenceEqual(dst.Vf.Memory.GetSpan(0, 4 << 20)));
        }
    }

    [Fact]
    public void ZeroCopyLoad_CorruptPagesPayloadMidMessage_FailsWithEinval_AndTheLoadCanOnlyEndInError()
    {
        using var src = StoppedSource();
        var wire = ReadAll(src);
        // Flip a byte in the middle of the second Pages record's payload (device memory [1 MiB, 2 MiB)).
        int second = AcceleratorRecordHeader.Size + AcceleratorProfile.Size + 4 + (int)AcceleratorRecordHeader.RecordSize(MiB);
        Assert.True(AcceleratorRecordHeader.TryRead(wire.AsSpan(second), out var h));
        Assert.Equal((ulong)MiB, h.DeviceOffset);
        wire[second + AcceleratorRecordHeader.Size + 300_000] ^= 0x01;

        using var dst = new AcceleratorRig(initDriver: false);
        var sink = (IMigrationDataSink)dst.Migration;
        dst.Step(DeviceState.Running, DeviceState.RunningP2P, DeviceState.Stop, DeviceState.Resuming);
        // The CRC can only fail once the trailer is in: the bad message carries it in its middle.
        int trailerEnd = second + (int)AcceleratorRecordHeader.RecordSize(MiB);
        int badAt = trailerEnd - 500_000;
        for (int at = 0; at < badAt; at += MiB)
        {
            FeedMessage(sink, wire.AsSpan(at, Math.Min(MiB, badAt - at)));
        }
        var e = Assert.Throws<MigrationException>(() => FeedMessage(sink, wire.AsSpan(badAt, MiB)));
        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Contains("CRC32C mismatch", e.Message);
        // The session is dead on both paths; the commit fails into ERROR, so the VF never runs with those bytes.
        Assert.Equal(Errno.EINVAL, Assert.Throws<MigrationException>(() => sink.GetWriteSpan(10)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<MigrationException>(() => dst.Migration.WriteData(wire.AsSpan(badAt + MiB, 10))).Errno);
        var commit = Assert.Throws<MigrationException>(() => dst.Step(DeviceState.Resuming, DeviceState.Stop));
        Assert.Equal(DeviceState.Error, commit.ReachedState);
    }

    [Fact]
    public void GatheredStopCopyStream_EqualsTheCopiedStream_ForAnyReadSize()
    {
        using var a = StoppedSource();
        using var b = StoppedSource();
        var copied = ReadAll(b);
        var source = Assert.IsAssignableFrom<IMigrationDataSource>(a.Migration);
        var list = new MigrationGatherList();
        var gathered = new MemoryStream();
        var rng = new Random(23);
        int segments = 0;
        while (true)
        {
            int ask = rng.Next(0, 3) switch { 0 => rng.Next(1, 40), 1 => MiB, _ => rng.Next(1, 2 * MiB) };
            int n = source.ReadDataGather(ask, list);
            Assert.Equal(n, list.TotalBytes);
            segments += list.Count;
            var buf = new byte[n];
            Assert.Equal(n, list.CopyTo(buf));
            list.Clear();
            gathered.Write(buf);
            if (n < ask)
            {
                break;
            }
        }
        Assert.True(copied.AsSpan().SequenceEqual(gathered.ToArray()));
        Assert.True(segments > 8);
    }

    private (AcceleratorPf Pf, VfioUserClient Client) Host(string name, ulong? fill)
    {
        var pf = Own(new AcceleratorPf(1, AcceleratorProfile.Create(8 << 20, 64)));
        pf.EnableVfs(1);
        var vf = pf.GetVf(0);
        if (fill is ulong seed)
        {
            var words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(vf.Memory.GetSpan(0, 8 << 20));
            for (int i = 0; i < words.Length; i++)
            {
                words[i] = ((ulong)i * 0x9E37_79B9_7F4A_7C15UL) ^ seed;
            }
        }
        return (pf, Serve(vf, name));
    }

    [Fact]
    public void OverSockets_GatheredRepliesMatchReadData_AndZeroCopyWritesRebuildTheVf_ForRandomChunkSizes()
    {
        var (srcPf, src) = Host("src", 7);
        var (twinPf, _) = Host("twin", 7);
        var (dstPf, dst) = Host("dst", null);
        // The in-process copied stream of an identical VF.
        var twin = twinPf.GetVf(0).Migration;
        foreach (var (f, t) in new[] { (DeviceState.Running, DeviceState.RunningP2P), (DeviceState.RunningP2P, DeviceState.Stop), (DeviceState.Stop, DeviceState.StopCopy) })
        {
            twin.Step(f, t);
        }
        var copied = new MemoryStream();
        var b = new byte[64 * 1024];
        int c;
        while ((c = twin.ReadData(b)) > 0)
        {
            copied.Write(b, 0, c);
        }

        src.SetState(DeviceState.StopCopy);
        dst.SetState(DeviceState.Resuming);
        var rng = new Random(31);
        var buf = new byte[MiB];
        var got = new MemoryStream();
        while (true)
        {
            int ask = rng.Next(0, 3) == 0 ? rng.Next(1, 64) : rng.Next(1, MiB + 1);
            int n = src.ReadMigrationData(buf.AsSpan(0, ask));
            got.Write(buf, 0, n);
            // Write in different pieces than were read, so records straddle the writes elsewhere.
            for (int at = 0; at < n;)
            {
                int w = Math.Min(n - at, rng.Next(1, MiB));
                dst.WriteMigrationData(buf.AsSpan(at, w));
                at += w;
            }
            if (n < ask)
            {
                break;
            }
        }
        Assert.True(copied.ToArray().AsSpan().SequenceEqual(got.ToArray()));
        dst.SetState(DeviceState.Stop);
        Assert.True(srcPf.GetVf(0).Memory.GetSpan(0, 8 << 20).SequenceEqual(dstPf.GetVf(0).Memory.GetSpan(0, 8 << 20)));
    }

    [Fact]
    public void OverSockets_CorruptRecordMidMessage_IsRefusedWithEinval_AndTheConnectionAnswersTheNextCommand()
    {
        var (_, src) = Host("src", 3);
        var (_, dst) = Host("dst", null);
        src.SetState(DeviceState.StopCopy);
        var wire = new MemoryStream();
        var buf = new byte[MiB];
        int n;
        while ((n = src.ReadMigrationData(buf)) > 0)
        {
            wire.Write(buf, 0, n);
        }
        var stream = wire.ToArray();
        // Corrupt the payload of the fourth Pages record, well inside the fourth 1 MiB message.
        int fourth = AcceleratorRecordHeader.Size + AcceleratorProfile.Size + 4 + (3 * (int)AcceleratorRecordHeader.RecordSize(MiB));
        stream[fourth + AcceleratorRecordHeader.Size + 500_000] ^= 0x40;

        // The CRC can only fail once the trailer is in: the bad message carries it in its middle (the client sends at
        // most 1 MiB per MIG_DATA_WRITE).
        int badAt = fourth + (int)AcceleratorRecordHeader.RecordSize(MiB) - 500_000;
        dst.SetState(DeviceState.Resuming);
        dst.WriteMigrationData(stream.AsSpan(0, badAt));
        var e = Assert.Throws<VfioUserException>(() => dst.WriteMigrationData(stream.AsSpan(badAt, MiB)));
        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Equal(DeviceState.Resuming, dst.GetState());
        Assert.Equal(Errno.EINVAL, Assert.Throws<VfioUserException>(() => dst.WriteMigrationData(stream.AsSpan(badAt + MiB, 100))).Errno);
        Assert.ThrowsAny<VfioUserException>(() => dst.SetState(DeviceState.Stop));
        Assert.Equal(DeviceState.Error, dst.GetState());
        dst.Reset();
        Assert.Equal(DeviceState.Running, dst.GetState());
    }
}
