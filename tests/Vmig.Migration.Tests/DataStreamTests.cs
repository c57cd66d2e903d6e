using Vmig.Migration;

namespace Vmig.Migration.Tests;

public class DataStreamTests
{
    private const int EIO = 5;
    private const int EINVAL = 22;
    private const int EFBIG = 27;
    private const int ENODEV = 19;
    private const MigrationFlags All = MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;

    public static TheoryData<DeviceState> AllStates => new()
    {
        DeviceState.Error, DeviceState.Stop, DeviceState.Running, DeviceState.StopCopy,
        DeviceState.Resuming, DeviceState.RunningP2P, DeviceState.PreCopy, DeviceState.PreCopyP2P,
    };

    private static MigrationStateDriver DriverIn(DeviceState state, RecordingDevice dev)
    {
        var drv = new MigrationStateDriver(dev);
        if (state == DeviceState.Error)
        {
            dev.FailArc = _ => new MigrationException(EIO, "wedge", DeviceState.Error);
            drv.SetState(DeviceState.Stop, out _);
            dev.FailArc = null;
        }
        else
        {
            Assert.Equal(0, drv.SetState(state, out _));
        }
        Assert.Equal(state, drv.State);
        return drv;
    }

    [Theory]
    [MemberData(nameof(AllStates))]
    public void ReadIsServedOnlyInTheSavingGroup(DeviceState state)
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(state, dev);
        foreach (byte b in new byte[] { 9, 8, 7 })
        {
            dev.SaveData.Enqueue(b);
        }
        var buf = new byte[2];
        int rc = drv.ReadData(buf, out int n);
        bool saving = state is DeviceState.PreCopy or DeviceState.PreCopyP2P or DeviceState.StopCopy;
        if (saving)
        {
            Assert.Equal((0, 2), (rc, n));
            Assert.Equal(new byte[] { 9, 8 }, buf);
        }
        else
        {
            Assert.Equal((EINVAL, 0), (rc, n));
            Assert.Equal(0, dev.ReadCalls);
        }
    }

    [Theory]
    [MemberData(nameof(AllStates))]
    public void WriteIsServedOnlyInResuming(DeviceState state)
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(state, dev);
        int rc = drv.WriteData(new byte[] { 1, 2 });
        if (state == DeviceState.Resuming)
        {
            Assert.Equal(0, rc);
            Assert.Equal(new byte[] { 1, 2 }, dev.Loaded);
        }
        else
        {
            Assert.Equal(EINVAL, rc);
            Assert.Empty(dev.Loaded);
        }
    }

    [Fact]
    public void StopCopyShortReadIsAPermanentEndOfStream()
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(DeviceState.StopCopy, dev);
        for (byte b = 0; b < 10; b++)
        {
            dev.SaveData.Enqueue(b);
        }
        var buf = new byte[4];
        Assert.Equal((0, 4), (drv.ReadData(buf, out int n1), n1));
        Assert.Equal((0, 4), (drv.ReadData(buf, out int n2), n2));
        Assert.Equal((0, 2), (drv.ReadData(buf, out int n3), n3));
        Assert.Equal(new byte[] { 8, 9 }, buf[..2]);
        int calls = dev.ReadCalls;

        // Even if the device had more, the stream has ended for this STOP_COPY.
        dev.SaveData.Enqueue(42);
        Assert.Equal((0, 0), (drv.ReadData(buf, out int n4), n4));
        Assert.Equal(calls, dev.ReadCalls);
    }

    [Fact]
    public void PreCopyShortReadMeansNothingMoreForNow()
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(DeviceState.PreCopy, dev);
        dev.SaveData.Enqueue(1);
        var buf = new byte[4];
        Assert.Equal((0, 1), (drv.ReadData(buf, out int n1), n1));
        Assert.Equal((0, 0), (drv.ReadData(buf, out int n2), n2));

        dev.SaveData.Enqueue(2);
        dev.SaveData.Enqueue(3);
        Assert.Equal((0, 2), (drv.ReadData(buf, out int n3), n3));
        Assert.Equal(new byte[] { 2, 3 }, buf[..2]);
    }

    [Fact]
    public void PreCopyTemporaryEndDoesNotEndTheStopCopyStream()
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(DeviceState.PreCopyP2P, dev);
        var buf = new byte[4];
        Assert.Equal((0, 0), (drv.ReadData(buf, out int n0), n0));
        Assert.Equal(0, drv.SetState(DeviceState.StopCopy, out _));
        dev.SaveData.Enqueue(5);
        Assert.Equal((0, 1), (drv.ReadData(buf, out int n1), n1));
        Assert.Equal(5, buf[0]);
    }

    [Fact]
    public void NewStopCopyVisitStartsAFreshStream()
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(DeviceState.StopCopy, dev);
        var buf = new byte[4];
        Assert.Equal((0, 0), (drv.ReadData(buf, out int n0), n0));
        Assert.Equal(0, drv.SetState(DeviceState.Stop, out _));
        Assert.Equal(0, drv.SetState(DeviceState.StopCopy, out _));
        dev.SaveData.Enqueue(7);
        Assert.Equal((0, 1), (drv.ReadData(buf, out int n1), n1));
    }

    [Fact]
    public void ResetDuringPreCopyEndsTheStream()
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(DeviceState.PreCopy, dev);
        dev.SaveData.Enqueue(1);
        drv.Reset();
        Assert.Equal(DeviceState.Running, drv.State);
        Assert.Equal(1, dev.ResetCalls);
        Assert.Equal(EINVAL, drv.ReadData(new byte[4], out _));
    }

    [Fact]
    public void StreamFailureReturnsDeviceErrnoAndAppliesReachedState()
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(DeviceState.StopCopy, dev);
        dev.ReadFailure = new MigrationException(ENODEV, "stream broke", DeviceState.Error);
        Assert.Equal(ENODEV, drv.ReadData(new byte[4], out int n));
        Assert.Equal(0, n);
        Assert.Equal(DeviceState.Error, drv.State);
    }

    [Fact]
    public void WriteFailureKeepsResumingWhenTheDeviceSaysSo()
    {
        var dev = new RecordingDevice(All);
        var drv = DriverIn(DeviceState.Resuming, dev);
        dev.WriteFailure = new MigrationException(EFBIG, "too large");
        Assert.Equal(EFBIG, drv.WriteData(new byte[] { 1 }));
        Assert.Equal(DeviceState.Resuming, drv.State);
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(5)]
    public void DeviceReturningAnImpossibleCountGivesEio(int bogus)
    {
        var dev = new RecordingDevice(All) { ReadCountOverride = bogus };
        var drv = DriverIn(DeviceState.StopCopy, dev);
        Assert.Equal(EIO, drv.ReadData(new byte[4], out int n));
        Assert.Equal(0, n);
    }

    [Theory]
    [MemberData(nameof(AllStates))]
    public void PrecopyInfoOnlyInPreCopyStates(DeviceState state)
    {
        var dev = new RecordingDevice(All) { Precopy = new PrecopyInfo(123, 45) };
        var drv = DriverIn(state, dev);
        int rc = drv.GetPrecopyInfo(out var info);
        if (state is DeviceState.PreCopy or DeviceState.PreCopyP2P)
        {
            Assert.Equal((0, new PrecopyInfo(123, 45)), (rc, info));
        }
        else
        {
            Assert.Equal((EINVAL, default(PrecopyInfo)), (rc, info));
        }
        Assert.Equal(4096UL, drv.GetStopCopySize());
    }

    // Expected command gating, typed from reference §3.6 plus the documented reset exception.
    // Columns: RegionAccess DeviceQuery DmaMap SetIrqs DeviceReset DeviceFeature MigDataRead MigDataWrite.
    [Theory]
    [InlineData(DeviceState.Error, "1 0 0 0 1 1 0 0")]
    [InlineData(DeviceState.Stop, "1 0 0 0 1 1 0 0")]
    [InlineData(DeviceState.Running, "1 1 1 1 1 1 0 0")]
    [InlineData(DeviceState.StopCopy, "1 0 0 0 1 1 1 0")]
    [InlineData(DeviceState.Resuming, "1 1 1 1 1 1 0 1")]
    [InlineData(DeviceState.RunningP2P, "1 1 1 1 1 1 0 0")]
    [InlineData(DeviceState.PreCopy, "1 1 1 1 1 1 1 0")]
    [InlineData(DeviceState.PreCopyP2P, "1 1 1 1 1 1 1 0")]
    public void CommandGatingPerState(DeviceState state, string row)
    {
        var ops = new[]
        {
            DeviceOperation.RegionAccess, DeviceOperation.DeviceQuery, DeviceOperation.DmaMap, DeviceOperation.SetIrqs,
            DeviceOperation.DeviceReset, DeviceOperation.DeviceFeature, DeviceOperation.MigDataRead, DeviceOperation.MigDataWrite,
        };
        var expected = row.Split(' ').Select(c => c == "1").ToArray();
        for (int i = 0; i < ops.Length; i++)
        {
            Assert.True(expected[i] == MigrationGate.IsAllowed(state, ops[i]), $"{state} {ops[i]}");
        }
    }
}
