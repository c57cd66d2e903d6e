using Vmig.Migration;

namespace Vmig.Migration.Tests;

public class StateDriverTests
{
    private const int EIO = 5;
    private const int EINVAL = 22;
    private const MigrationFlags All = MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;

    private static MigrationArc A(DeviceState f, DeviceState t) => new(f, t);

    [Fact]
    public void InitialStateIsRunning()
    {
        Assert.Equal(DeviceState.Running, new MigrationStateDriver(new RecordingDevice(All)).State);
    }

    [Theory]
    [InlineData(MigrationFlags.None)]
    [InlineData(MigrationFlags.P2P | MigrationFlags.PreCopy)]
    [InlineData(MigrationFlags.StopCopy | (MigrationFlags)16)]
    public void ConstructorRejectsUndefinedFlagSets(MigrationFlags flags)
    {
        Assert.Throws<ArgumentException>(() => new MigrationStateDriver(new RecordingDevice(flags)));
    }

    [Fact]
    public void SetStateCallsEachArcOnceInOrder()
    {
        var dev = new RecordingDevice(All);
        var drv = new MigrationStateDriver(dev);

        Assert.Equal(0, drv.SetState(DeviceState.StopCopy, out var reached));

        Assert.Equal(DeviceState.StopCopy, reached);
        Assert.Equal(DeviceState.StopCopy, drv.State);
        Assert.Equal(
            [A(DeviceState.Running, DeviceState.RunningP2P), A(DeviceState.RunningP2P, DeviceState.Stop), A(DeviceState.Stop, DeviceState.StopCopy)],
            dev.Arcs);
    }

    [Fact]
    public void FullMigrationCycleOnTargetCallsResumeArcsInOrder()
    {
        var dev = new RecordingDevice(All);
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(0, drv.SetState(DeviceState.Resuming, out _));
        Assert.Equal(0, drv.SetState(DeviceState.Running, out var reached));
        Assert.Equal(DeviceState.Running, reached);
        Assert.Equal(
            [
                A(DeviceState.Running, DeviceState.RunningP2P), A(DeviceState.RunningP2P, DeviceState.Stop),
                A(DeviceState.Stop, DeviceState.Resuming), A(DeviceState.Resuming, DeviceState.Stop),
                A(DeviceState.Stop, DeviceState.RunningP2P), A(DeviceState.RunningP2P, DeviceState.Running),
            ],
            dev.Arcs);
    }

    [Fact]
    public void StopCopyOnlyDeviceGoesThroughStop()
    {
        var dev = new RecordingDevice(MigrationFlags.StopCopy);
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(0, drv.SetState(DeviceState.StopCopy, out _));
        Assert.Equal([A(DeviceState.Running, DeviceState.Stop), A(DeviceState.Stop, DeviceState.StopCopy)], dev.Arcs);
    }

    [Theory]
    [InlineData(MigrationFlags.StopCopy, DeviceState.RunningP2P)]
    [InlineData(MigrationFlags.StopCopy, DeviceState.PreCopy)]
    [InlineData(MigrationFlags.StopCopy | MigrationFlags.PreCopy, DeviceState.PreCopyP2P)]
    [InlineData(All, DeviceState.Error)]
    [InlineData(All, (DeviceState)8)]
    [InlineData(All, (DeviceState)0xFFFFFFFF)]
    public void InvalidTargetIsEinvalWithStateUnchangedAndNoArc(MigrationFlags flags, DeviceState target)
    {
        var dev = new RecordingDevice(flags);
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(EINVAL, drv.SetState(target, out var reached));
        Assert.Equal(DeviceState.Running, reached);
        Assert.Equal(DeviceState.Running, drv.State);
        Assert.Empty(dev.Arcs);
    }

    [Fact]
    public void StopCopyToPreCopyIsRefusedAndStaysInStopCopy()
    {
        var dev = new RecordingDevice(All);
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(0, drv.SetState(DeviceState.StopCopy, out _));
        dev.Arcs.Clear();
        Assert.Equal(EINVAL, drv.SetState(DeviceState.PreCopy, out var reached));
        Assert.Equal(DeviceState.StopCopy, reached);
        Assert.Empty(dev.Arcs);
    }

    [Fact]
    public void RequestingTheCurrentStateIsASuccessfulNoOp()
    {
        var dev = new RecordingDevice(All);
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(0, drv.SetState(DeviceState.Running, out var reached));
        Assert.Equal(DeviceState.Running, reached);
        Assert.Empty(dev.Arcs);
    }

    [Fact]
    public void FailedArcWithoutReachedStateStopsAtTheArcsSource()
    {
        var dev = new RecordingDevice(All)
        {
            FailArc = a => a.From == DeviceState.RunningP2P ? new MigrationException(EIO, "drain failed") : null,
        };
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(EIO, drv.SetState(DeviceState.StopCopy, out var reached));
        Assert.Equal(DeviceState.RunningP2P, reached);
        Assert.Equal(DeviceState.RunningP2P, drv.State);
        Assert.Equal([A(DeviceState.Running, DeviceState.RunningP2P), A(DeviceState.RunningP2P, DeviceState.Stop)], dev.Arcs);
    }

    [Fact]
    public void FailedArcReportsTheDevicesReachedState()
    {
        var dev = new RecordingDevice(All)
        {
            FailArc = a => a.To == DeviceState.Stop ? new MigrationException(EIO, "half-stopped", DeviceState.Running) : null,
        };
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(EIO, drv.SetState(DeviceState.Stop, out var reached));
        Assert.Equal(DeviceState.Running, reached);
        Assert.Equal(DeviceState.Running, drv.State);
    }

    [Fact]
    public void ErrorIsLeftOnlyByReset()
    {
        var dev = new RecordingDevice(All)
        {
            FailArc = a => a.To == DeviceState.Stop ? new MigrationException(EIO, "wedged", DeviceState.Error) : null,
        };
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(EIO, drv.SetState(DeviceState.Stop, out var reached));
        Assert.Equal(DeviceState.Error, reached);
        dev.FailArc = null;
        dev.Arcs.Clear();

        foreach (var target in new[] { DeviceState.Running, DeviceState.Stop, DeviceState.StopCopy, DeviceState.Resuming, DeviceState.RunningP2P, DeviceState.PreCopy, DeviceState.PreCopyP2P })
        {
            Assert.Equal(EINVAL, drv.SetState(target, out reached));
            Assert.Equal(DeviceState.Error, reached);
        }
        // Requesting ERROR while in ERROR is the kernel's no-op walk, not a way out.
        Assert.Equal(0, drv.SetState(DeviceState.Error, out reached));
        Assert.Equal(DeviceState.Error, reached);
        Assert.Empty(dev.Arcs);

        drv.Reset();
        Assert.Equal(DeviceState.Running, drv.State);
        Assert.Equal(1, dev.ResetCalls);
        Assert.Equal(0, drv.SetState(DeviceState.Stop, out reached));
        Assert.Equal(DeviceState.Stop, reached);
    }

    [Theory]
    [InlineData(DeviceState.Stop)]
    [InlineData(DeviceState.Error)]
    public void FailedLoadStopsTheWalkAndReportsTheFailure(DeviceState deviceReached)
    {
        var dev = new RecordingDevice(All);
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(0, drv.SetState(DeviceState.Resuming, out _));
        Assert.Equal(0, drv.WriteData(new byte[] { 1, 2, 3 }));
        dev.Arcs.Clear();
        dev.FailArc = a => a == A(DeviceState.Resuming, DeviceState.Stop)
            ? new MigrationException(EINVAL, "incomplete state", deviceReached)
            : null;

        Assert.Equal(EINVAL, drv.SetState(DeviceState.Running, out var reached));

        Assert.Equal(deviceReached, reached);
        Assert.Equal(deviceReached, drv.State);
        // The walk must not go on towards RUNNING with a half-applied state.
        Assert.Equal([A(DeviceState.Resuming, DeviceState.Stop)], dev.Arcs);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(-22)]
    [InlineData(4097)]
    public void DeviceErrnoOutsideOneTo4096BecomesEio(int errno)
    {
        var dev = new RecordingDevice(All) { FailArc = _ => new MigrationException(errno, "bad errno") };
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(EIO, drv.SetState(DeviceState.Stop, out _));
    }

    [Fact]
    public void ReachedStateTheDeviceCannotBeInIsTreatedAsError()
    {
        var dev = new RecordingDevice(MigrationFlags.StopCopy)
        {
            FailArc = _ => new MigrationException(EIO, "nonsense", DeviceState.RunningP2P),
        };
        var drv = new MigrationStateDriver(dev);
        Assert.Equal(EIO, drv.SetState(DeviceState.Stop, out var reached));
        Assert.Equal(DeviceState.Error, reached);
    }

    [Fact]
    public void UnexpectedExceptionFromAnArcLeavesErrorAndPropagates()
    {
        var dev = new RecordingDevice(All) { FailArc = _ => new InvalidOperationException("device bug") };
        var drv = new MigrationStateDriver(dev);
        Assert.Throws<InvalidOperationException>(() => drv.SetState(DeviceState.Stop, out _));
        Assert.Equal(DeviceState.Error, drv.State);
    }

    [Fact]
    public void ConcurrentRequestsNeverOverlapInsideTheDevice()
    {
        var dev = new RecordingDevice(All);
        var drv = new MigrationStateDriver(dev);
        var targets = new[] { DeviceState.StopCopy, DeviceState.Running, DeviceState.Resuming, DeviceState.PreCopy };
        Parallel.For(0, 4, i =>
        {
            var buf = new byte[8];
            for (int k = 0; k < 200; k++)
            {
                drv.SetState(targets[(i + k) % targets.Length], out _);
                drv.ReadData(buf, out _);
            }
        });
        Assert.False(dev.Overlapped);
        // Every recorded arc must continue from where the previous one ended.
        for (int i = 1; i < dev.Arcs.Count; i++)
        {
            Assert.Equal(dev.Arcs[i - 1].To, dev.Arcs[i].From);
        }
    }
}
