using Vmig.Migration;

namespace Vmig.Migration.Tests;

/// <summary>
/// <see cref="MigrationStateDriver"/>'s zero-copy entry points: the state gate, the adapter for devices without
/// <see cref="IMigrationDataSink"/>/<see cref="IMigrationDataSource"/>, the span bookkeeping, and the STOP_COPY
/// end-of-stream latch on the gathered read.
/// </summary>
public class ZeroCopyDriverTests
{
    private const int EIO = 5;
    private const int EINVAL = 22;
    private const MigrationFlags All = MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;

    private static MigrationStateDriver In(DeviceState state, IMigrationDevice dev)
    {
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(0, drv.SetState(state, out _));
        return drv;
    }

    [Theory]
    [InlineData(DeviceState.Running)]
    [InlineData(DeviceState.Stop)]
    [InlineData(DeviceState.StopCopy)]
    [InlineData(DeviceState.PreCopy)]
    public void WriteSpan_OutsideResuming_IsEinval_AndTheDeviceIsNotAsked(DeviceState state)
    {
        var dev = new RecordingDevice(All);
        var drv = In(state, dev);
        Assert.Equal(EINVAL, drv.GetWriteSpan(16, out var span));
        Assert.True(span.IsEmpty);
        Assert.Equal(EINVAL, drv.AdvanceWrite(1));
        Assert.Empty(dev.Loaded);
    }

    [Fact]
    public void Adapter_HandsTheStagedBytesToWriteData_InOrder()
    {
        var dev = new RecordingDevice(All);
        var drv = In(DeviceState.Resuming, dev);
        Assert.Equal(0, drv.GetWriteSpan(5, out var span));
        Assert.Equal(5, span.Length);
        new byte[] { 1, 2, 3, 4, 5 }.CopyTo(span);
        Assert.Equal(0, drv.AdvanceWrite(3));
        Assert.Equal(0, drv.GetWriteSpan(2, out span));
        new byte[] { 9, 8 }.CopyTo(span);
        Assert.Equal(0, drv.AdvanceWrite(2));
        Assert.Equal(new byte[] { 1, 2, 3, 9, 8 }, dev.Loaded);
    }

    [Fact]
    public void AdvanceWrite_WithoutASpan_OrPastIt_IsEio_AndNothingIsWritten()
    {
        var dev = new RecordingDevice(All);
        var drv = In(DeviceState.Resuming, dev);
        Assert.Equal(EIO, drv.AdvanceWrite(1));
        Assert.Equal(0, drv.GetWriteSpan(4, out _));
        Assert.Equal(EIO, drv.AdvanceWrite(5));
        // The span is used up by the failed advance too.
        Assert.Equal(EIO, drv.AdvanceWrite(4));
        Assert.Empty(dev.Loaded);
    }

    [Fact]
    public void SinkFailure_ReportsItsErrno_AndMovesToTheStateItNames()
    {
        var dev = new SinkDevice { FailAdvance = new MigrationException(EINVAL, "bad record", DeviceState.Error) };
        var drv = In(DeviceState.Resuming, dev);
        Assert.Equal(0, drv.GetWriteSpan(100, out var span));
        Assert.Equal(SinkDevice.SpanLength, span.Length);
        Assert.Equal(EINVAL, drv.AdvanceWrite(span.Length));
        Assert.Equal(DeviceState.Error, drv.State);
    }

    [Fact]
    public void SinkSpans_AreCutToTheSizeHint()
    {
        var dev = new SinkDevice();
        var drv = In(DeviceState.Resuming, dev);
        Assert.Equal(0, drv.GetWriteSpan(3, out var span));
        Assert.Equal(3, span.Length);
        Assert.Equal(0, drv.AdvanceWrite(3));
        Assert.Equal(3, dev.Advanced);
    }

    [Fact]
    public void GatherAdapter_GivesReadDataBytes_AndLatchesTheEndOfStreamInStopCopy()
    {
        var dev = new RecordingDevice(All);
        foreach (byte b in new byte[] { 1, 2, 3, 4, 5, 6, 7 })
        {
            dev.SaveData.Enqueue(b);
        }
        var drv = In(DeviceState.StopCopy, dev);
        var list = new MigrationGatherList();
        Assert.Equal(0, drv.ReadDataGather(4, list, out int n));
        Assert.Equal(4, n);
        var got = new byte[4];
        list.CopyTo(got);
        Assert.Equal(new byte[] { 1, 2, 3, 4 }, got);
        list.Clear();
        Assert.Equal(0, drv.ReadDataGather(4, list, out n));
        Assert.Equal(3, n);
        list.Clear();
        int calls = dev.ReadCalls;
        Assert.Equal(0, drv.ReadDataGather(4, list, out n));
        Assert.Equal(0, n);
        Assert.Equal(calls, dev.ReadCalls);
        Assert.Equal(0, list.Count);
    }

    [Fact]
    public void GatherSource_WhoseCountDisagreesWithItsSegments_IsEio()
    {
        var dev = new SinkDevice { GatherLie = true };
        var drv = In(DeviceState.StopCopy, dev);
        var list = new MigrationGatherList();
        Assert.Equal(EIO, drv.ReadDataGather(64, list, out int n));
        Assert.Equal(0, n);
    }

    [Fact]
    public void GatherRead_OutsideTheSavingGroup_IsEinval()
    {
        var drv = In(DeviceState.Resuming, new SinkDevice());
        Assert.Equal(EINVAL, drv.ReadDataGather(64, new MigrationGatherList(), out _));
    }

    /// <summary>A device with both zero-copy interfaces over a small array.</summary>
    private sealed class SinkDevice : IMigrationDevice, IMigrationDataSink, IMigrationDataSource
    {
        public const int SpanLength = 10;
        private readonly byte[] _state = new byte[SpanLength];

        public MigrationException? FailAdvance { get; init; }
        public bool GatherLie { get; init; }
        public int Advanced { get; private set; }

        public MigrationFlags MigrationFlags => All;

        public void Step(DeviceState from, DeviceState to)
        {
        }

        public int ReadData(Span<byte> buffer) => 0;

        public void WriteData(ReadOnlySpan<byte> data)
        {
        }

        public Span<byte> GetWriteSpan(int sizeHint) => _state;

        public void AdvanceWrite(int count)
        {
            if (FailAdvance is { } e)
            {
                throw e;
            }
            Advanced += count;
        }

        public int ReadDataGather(int maxBytes, MigrationGatherList segments)
        {
            segments.Add(_state);
            return GatherLie ? _state.Length - 1 : _state.Length;
        }

        public PrecopyInfo GetPrecopyInfo() => default;

        public ulong GetStopCopySize() => 0;

        public void OnReset()
        {
        }
    }
}
