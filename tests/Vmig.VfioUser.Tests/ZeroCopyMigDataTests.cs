using Vmig.Conformance;
using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.VfioUser.Tests;

/// <summary>
/// The zero-copy MIG_DATA paths over real sockets: MIG_DATA_WRITE received from the socket straight into the spans a
/// device gives (<see cref="IMigrationDataSink"/>), MIG_DATA_READ replies sent from the device's gather segments with
/// vectored sendmsg (<see cref="IMigrationDataSource"/>, <see cref="FdSocket.SendGather"/>), and the checks that keep
/// the connection in frame when a write is refused.
/// </summary>
public sealed class ZeroCopyMigDataTests : IDisposable
{
    private const int StateBytes = 3 << 20;
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-zc-").FullName;
    private readonly List<IDisposable> _owned = [];

    public void Dispose()
    {
        for (int i = _owned.Count - 1; i >= 0; i--)
        {
            _owned[i].Dispose();
        }
        Directory.Delete(_dir, true);
    }

    private T Own<T>(T d) where T : IDisposable
    {
        _owned.Add(d);
        return d;
    }

    private (ScatterStateDevice Device, VfioUserServer Server) Serve(string name, int seed, MigrationFlags flags = MigrationFlags.StopCopy)
    {
        var dev = Own(new ScatterStateDevice(StateBytes, seed, flags));
        var server = Own(new VfioUserServer(dev, Path.Combine(_dir, name + ".sock")));
        server.Start();
        return (dev, server);
    }

    [Fact]
    public void SendGather_SendsEverySegmentInOrder_AcrossIovecBatchesAndPartialWrites()
    {
        var (a, b) = FdSocket.CreatePair();
        using var _a = a;
        using var _b = b;
        using var fd = MemFd.Create("gather", 4 << 20);
        using var map = Mapping.Map(fd, 0, 4 << 20);
        var rng = new Random(5);
        rng.NextBytes(map.GetSpan(0, 4 << 20));
        // 300 segments (several iovec batches), mapped memory and arrays mixed, some empty, ~4 MiB in all: far more than
        // the socket buffer, so sendmsg returns short writes that end inside segments.
        var segments = new List<ReadOnlyMemory<byte>>();
        var expected = new MemoryStream();
        byte[] first = [1, 2, 3, 4, 5];
        expected.Write(first);
        long at = 0;
        for (int i = 0; i < 300; i++)
        {
            ReadOnlyMemory<byte> s;
            if (i % 3 == 0)
            {
                var arr = new byte[rng.Next(0, 100)];
                rng.NextBytes(arr);
                s = arr;
            }
            else
            {
                int n = rng.Next(1, 25_000);
                s = map.GetMemory(at, n);
                at += n;
            }
            segments.Add(s);
            expected.Write(s.Span);
        }
        var got = new byte[expected.Length];
        bool received = false;
        var reader = new Thread(() => received = b.Receive(got, null, out _));
        reader.Start();
        a.SendGather(first, segments.ToArray());
        Assert.True(reader.Join(10_000) && received);
        Assert.True(expected.ToArray().AsSpan().SequenceEqual(got));
    }

    [Fact]
    public void GatheredStopCopyReplies_GiveTheSameStreamAsReadData_ForAnyReadSize()
    {
        var (dev, server) = Serve("src", 1);
        using var client = VfioUserClient.Connect(server.SocketPath);
        var expected = dev.StateCopy();
        var rng = new Random(11);
        foreach (bool gather in new[] { true, false })
        {
            dev.Gather = gather;
            client.SetState(DeviceState.StopCopy);
            var got = new MemoryStream();
            var buf = new byte[1 << 20];
            int n;
            do
            {
                int ask = rng.Next(0, 4) switch { 0 => rng.Next(1, 64), 1 => 1 << 20, _ => rng.Next(1, 1 << 20) };
                n = client.ReadMigrationData(buf.AsSpan(0, ask));
                got.Write(buf, 0, n);
                if (n < ask)
                {
                    break;
                }
            }
            while (true);
            client.SetState(DeviceState.Running);
            Assert.True(expected.AsSpan().SequenceEqual(got.ToArray()), gather ? "gathered replies differ from the state" : "copied replies differ from the state");
        }
        Assert.True(dev.GatherCalls > 0);
    }

    [Fact]
    public void ZeroCopyWrites_LandTheSameBytesAsTheSource_ForRandomMessageAndSpanSizes()
    {
        var (src, _) = Serve("src", 1);
        var (dst, dstServer) = Serve("dst", 2);
        using var client = VfioUserClient.Connect(dstServer.SocketPath);
        var stream = src.StateCopy();
        Assert.False(stream.AsSpan().SequenceEqual(dst.StateCopy()));
        var rng = new Random(7);
        client.SetState(DeviceState.Resuming);
        for (int at = 0; at < stream.Length;)
        {
            int n = Math.Min(stream.Length - at, rng.Next(0, 3) == 0 ? rng.Next(1, 100) : rng.Next(1, 1 << 20));
            client.WriteMigrationData(stream.AsSpan(at, n));
            at += n;
        }
        client.SetState(DeviceState.Stop);
        Assert.True(stream.AsSpan().SequenceEqual(dst.StateCopy()));
        // Every message went the streamed way (the buffered fallback would have come through WriteData).
        Assert.Equal(0, dst.CopiedWrites);
        Assert.True(dst.SpansGiven > 10);
    }

    [Fact]
    public void WriteFailingMidMessage_AnswersTheErrno_AndTheConnectionAnswersTheNextCommand()
    {
        var (dst, server) = Serve("dst", 2);
        using var client = VfioUserClient.Connect(server.SocketPath);
        var data = new byte[1 << 20];
        new Random(3).NextBytes(data);
        client.SetState(DeviceState.Resuming);
        client.WriteMigrationData(data.AsSpan(0, 1000));
        dst.FailAt = 300_000;
        var e = Assert.Throws<VfioUserException>(() => client.WriteMigrationData(data));
        Assert.Equal(Errno.EIO, e.Errno);
        // The rest of the 1 MiB message was drained: the next commands are answered, in frame.
        Assert.Equal(DeviceState.Resuming, client.GetState());
        Assert.Equal(Errno.EIO, Assert.Throws<VfioUserException>(() => client.WriteMigrationData(data.AsSpan(0, 10))).Errno);
        // The failed load never commits: RESUMING→STOP fails into ERROR; reset is the way out.
        Assert.ThrowsAny<VfioUserException>(() => client.SetState(DeviceState.Stop));
        Assert.Equal(DeviceState.Error, client.GetState());
        client.Reset();
        Assert.Equal(DeviceState.Running, client.GetState());
        Assert.Equal(300_000, dst.WritePosition);
    }

    [Fact]
    public void DeviceMigrator_AsksPrecopyInfoOncePerRound_AndMovesTheStateZeroCopy()
    {
        var (src, srcServer) = Serve("src", 1, MigrationFlags.StopCopy | MigrationFlags.PreCopy);
        var (dst, dstServer) = Serve("dst", 2, MigrationFlags.StopCopy | MigrationFlags.PreCopy);
        using var s = VfioUserClient.Connect(srcServer.SocketPath);
        using var d = VfioUserClient.Connect(dstServer.SocketPath);
        Assert.True(s.SupportsPrecopyInfo);
        // Round 1 ends with 2 MiB "dirty" (over the 1 MiB threshold), round 2 with nothing: two rounds.
        src.ScriptedPrecopyInfo = [new((ulong)StateBytes, 0), new(0, 2 << 20), new(0, 0)];
        var report = DeviceMigrator.Migrate(s, d);
        Assert.Equal(2, report.PreCopyRounds);
        Assert.Equal(report.PreCopyRounds + 1, src.PrecopyInfoCalls);
        Assert.True(src.StateCopy().AsSpan().SequenceEqual(dst.StateCopy()));
        Assert.Equal(0, dst.CopiedWrites);
    }

    public static TheoryData<string> Lies => new() { "argsz-below-8+size", "size-over-payload", "size-under-payload", "size-over-max-xfer", "payload-under-head", "not-resuming" };

    [Theory]
    [MemberData(nameof(Lies))]
    public void MigDataWrite_WhoseSizesLie_IsRefusedWithEinval_NothingLands_AndTheNextCommandIsAnswered(string lie)
    {
        var (dst, server) = Serve("dst", 2);
        using var peer = RawPeer.Connect(server.SocketPath);
        Assert.True(peer.Negotiate(5000)!.IsSuccess);
        if (lie != "not-resuming")
        {
            var set = new byte[8];
            BitConverter.TryWriteBytes(set, (uint)DeviceState.Resuming);
            BitConverter.TryWriteBytes(set.AsSpan(4), -1);
            Assert.True(peer.Request(VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(16, DeviceFeatureHead.Set | 2, set), 5000)!.IsSuccess);
        }
        byte[] Msg(uint argsz, uint size, int dataBytes)
        {
            var p = new byte[MigDataHead.WireSize + dataBytes];
            new MigDataHead(argsz, size).WriteTo(p);
            p.AsSpan(MigDataHead.WireSize).Fill(0xEE);
            return p;
        }
        byte[] payload = lie switch
        {
            "argsz-below-8+size" => Msg(8, 4096, 4096),
            "size-over-payload" => Msg(8 + 8192, 8192, 4096),
            "size-under-payload" => Msg(8 + 100, 100, 4096),
            "size-over-max-xfer" => Msg(8 + (1u << 20) + 4, (1u << 20) + 4, (1 << 20) + 4),
            "payload-under-head" => [8, 0, 0, 0],
            _ => Msg(8 + 64, 64, 64),
        };
        var r = peer.Request(VfioUserCommand.MigDataWrite, payload, 5000);
        Assert.NotNull(r);
        Assert.Equal(Errno.EINVAL, r.Errno);
        Assert.Equal(lie == "not-resuming" ? (int)DeviceState.Running : (int)DeviceState.Resuming, peer.GetState(5000));
        Assert.Equal(0, dst.WritePosition);
        Assert.Equal(0, dst.SpansGiven);
        if (lie != "not-resuming")
        {
            // A truthful write right after goes through.
            Assert.True(peer.Request(VfioUserCommand.MigDataWrite, Msg(8 + 64, 64, 64), 5000)!.IsSuccess);
            Assert.Equal(64, dst.WritePosition);
        }
    }

    /// <summary>
    /// A device whose state is <c>size</c> bytes of memfd, saved and resumed as is, through the zero-copy interfaces in
    /// awkward pieces: gather segments of pseudo-random sizes (state slices and small staged copies, so one reply takes
    /// several iovec batches) and write spans of pseudo-random lengths. <see cref="FailAt"/> makes the load fail (EIO)
    /// when the stream reaches that offset.
    /// </summary>
    private sealed class ScatterStateDevice : VfioUserDevice, IMigrationDevice, IMigrationDataSink, IMigrationDataSource, IDisposable
    {
        private readonly UnixFd _fd;
        private readonly Mapping _state;
        private readonly long _size;
        private readonly Random _rng = new(42);
        private long _readPos;
        private bool _saving;
        private bool _resuming;
        private bool _failed;
        private int _given;

        public ScatterStateDevice(long size, int seed, MigrationFlags flags)
        {
            MigrationFlags = flags;
            _size = size;
            _fd = MemFd.Create("scatter", size);
            _state = Mapping.Map(_fd, 0, size);
            new Random(seed).NextBytes(_state.GetSpan(0, (int)size));
        }

        public bool Gather { get; set; } = true;
        public int GatherCalls { get; private set; }
        public int SpansGiven { get; private set; }
        public int CopiedWrites { get; private set; }
        public long WritePosition { get; private set; }
        public long FailAt { get; set; } = long.MaxValue;

        public override IReadOnlyList<RegionDescriptor> Regions { get; } =
        [
            RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent, RegionDescriptor.Absent,
            RegionDescriptor.Absent, RegionDescriptor.Absent, new RegionDescriptor(256, RegionFlags.Read | RegionFlags.Write), RegionDescriptor.Absent,
        ];
        public override IReadOnlyList<IrqDescriptor> Irqs { get; } = [IrqDescriptor.Absent];
        public override IMigrationDevice? Migration => this;
        public MigrationFlags MigrationFlags { get; }
        public int PrecopyInfoCalls { get; private set; }
        public PrecopyInfo[] ScriptedPrecopyInfo { get; set; } = [];

        public byte[] StateCopy() => _state.GetSpan(0, (int)_size).ToArray();

        public override int ReadRegion(int index, ulong offset, Span<byte> data)
        {
            data.Clear();
            return 0;
        }

        public override int WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data) => 0;

        public void Step(DeviceState from, DeviceState to)
        {
            if (MigrationStateMachine.OpensSaveSession(from, to))
            {
                _saving = true;
                _readPos = 0;
            }
            else if (MigrationStateMachine.IsSavingState(from) && !MigrationStateMachine.IsSavingState(to))
            {
                _saving = false;
            }
            if (to == DeviceState.Resuming)
            {
                _resuming = true;
                _failed = false;
                WritePosition = 0;
            }
            else if (from == DeviceState.Resuming)
            {
                _resuming = false;
                if (_failed || WritePosition != _size)
                {
                    throw new MigrationException(Errno.EINVAL, "incomplete or failed load", DeviceState.Error);
                }
            }
        }

        public int ReadData(Span<byte> buffer)
        {
            int n = _saving ? (int)Math.Min(buffer.Length, _size - _readPos) : 0;
            _state.GetSpan(_readPos, n).CopyTo(buffer);
            _readPos += n;
            return n;
        }

        public int ReadDataGather(int maxBytes, MigrationGatherList segments)
        {
            if (!Gather)
            {
                var staging = segments.RentStaging(maxBytes);
                int c = ReadData(staging.Span[..maxBytes]);
                segments.Add(staging[..c]);
                return c;
            }
            GatherCalls++;
            int n = _saving ? (int)Math.Min(maxBytes, _size - _readPos) : 0;
            for (int done = 0; done < n;)
            {
                int k = Math.Min(n - done, _rng.Next(0, 4) == 0 ? _rng.Next(1, 40) : _rng.Next(1, 20_000));
                if (_rng.Next(0, 2) == 0)
                {
                    segments.Add(_state.GetMemory(_readPos + done, k));
                }
                else
                {
                    var copy = segments.RentStaging(k)[..k];
                    _state.GetSpan(_readPos + done, k).CopyTo(copy.Span);
                    segments.Add(copy);
                }
                done += k;
            }
            _readPos += n;
            return n;
        }

        public void WriteData(ReadOnlySpan<byte> data)
        {
            CopiedWrites++;
            while (!data.IsEmpty)
            {
                var span = GetWriteSpan(data.Length);
                data[..span.Length].CopyTo(span);
                AdvanceWrite(span.Length);
                data = data[span.Length..];
            }
        }

        public Span<byte> GetWriteSpan(int sizeHint)
        {
            if (!_resuming || _failed)
            {
                throw new MigrationException(Errno.EIO, "load failed");
            }
            if (WritePosition == _size)
            {
                throw new MigrationException(27, "over the state size");
            }
            SpansGiven++;
            int n = (int)Math.Min(Math.Min(sizeHint, _size - WritePosition), _rng.Next(1, 200_000));
            _given = n;
            return _state.GetSpan(WritePosition, n);
        }

        public void AdvanceWrite(int count)
        {
            Assert.InRange(count, 1, _given);
            if (WritePosition + count > FailAt)
            {
                WritePosition = FailAt;
                _failed = true;
                throw new MigrationException(Errno.EIO, "injected failure");
            }
            WritePosition += count;
        }

        public PrecopyInfo GetPrecopyInfo() =>
            PrecopyInfoCalls++ < ScriptedPrecopyInfo.Length ? ScriptedPrecopyInfo[PrecopyInfoCalls - 1] : default;

        public ulong GetStopCopySize() => (ulong)_size;

        public void OnReset()
        {
            _saving = false;
            _resuming = false;
        }

        public void Dispose()
        {
            _state.Dispose();
            _fd.Dispose();
        }
    }
}
