using Vmig.Migration;
using Vmig.VfioUser.Protocol;

namespace Vmig.Devices.Accelerator;

/// <summary>
/// A VF's migration driver (the analogue of a VFIO variant driver): implements the 15 arcs of
/// STOP_COPY | P2P | PRE_COPY by issuing commands to the controlling function (<see cref="AcceleratorPf"/>) about
/// VF <c>index</c>, never by touching the VF directly. Mapping (after mlx5): RUNNING→RUNNING_P2P and
/// PRE_COPY→PRE_COPY_P2P = Suspend(Initiator); →STOP = Suspend(Responder); the reverse arcs Resume; RUNNING→PRE_COPY
/// = StartTracking + open save; PRE_COPY_P2P→STOP_COPY = Suspend(Responder) and the stream goes on to State and End.
/// Zero-copy both ways: STOP_COPY reads hand out device memory as gather segments (<see cref="IMigrationDataSource"/>),
/// resume writes land in device memory (<see cref="IMigrationDataSink"/>); see <see cref="AcceleratorLoadStream"/>.
/// </summary>
internal sealed class AcceleratorVfMigration(AcceleratorPf pf, int index) : IMigrationDevice, IMigrationDataSource, IMigrationDataSink
{
    private AcceleratorSaveStream? _save;
    private AcceleratorLoadStream? _load;

    public MigrationFlags MigrationFlags => MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;

    public void Step(DeviceState from, DeviceState to)
    {
        switch (from, to)
        {
            case (DeviceState.Running, DeviceState.RunningP2P):
            case (DeviceState.PreCopy, DeviceState.PreCopyP2P):
                pf.Suspend(index, AcceleratorSuspendScope.Initiator);
                break;
            case (DeviceState.RunningP2P, DeviceState.Running):
            case (DeviceState.PreCopyP2P, DeviceState.PreCopy):
                pf.Resume(index, AcceleratorSuspendScope.Initiator);
                break;
            case (DeviceState.RunningP2P, DeviceState.Stop):
                pf.Suspend(index, AcceleratorSuspendScope.Responder);
                break;
            case (DeviceState.Stop, DeviceState.RunningP2P):
                pf.Resume(index, AcceleratorSuspendScope.Responder);
                break;
            case (DeviceState.Stop, DeviceState.StopCopy):
                _save = pf.SaveState(index);
                _save.EnterStopCopy();
                break;
            case (DeviceState.StopCopy, DeviceState.Stop):
                EndSave();
                break;
            case (DeviceState.Stop, DeviceState.Resuming):
                _load = pf.LoadState(index);
                break;
            case (DeviceState.Resuming, DeviceState.Stop):
                var load = _load ?? throw new MigrationException(Errno.EINVAL, "no resume session");
                _load = null;
                try
                {
                    load.Commit();
                }
                catch (MigrationException e)
                {
                    throw new MigrationException(e.Errno, e.Message, DeviceState.Error);
                }
                break;
            case (DeviceState.Running, DeviceState.PreCopy):
            case (DeviceState.RunningP2P, DeviceState.PreCopyP2P):
                pf.StartTracking(index);
                _save = pf.SaveState(index);
                break;
            case (DeviceState.PreCopy, DeviceState.Running):
            case (DeviceState.PreCopyP2P, DeviceState.RunningP2P):
                EndSave();
                break;
            case (DeviceState.PreCopyP2P, DeviceState.StopCopy):
                pf.Suspend(index, AcceleratorSuspendScope.Responder);
                (_save ?? throw new MigrationException(Errno.EINVAL, "no save session")).EnterStopCopy();
                break;
            default:
                throw new MigrationException(Errno.EINVAL, $"{from} → {to} is not a direct arc");
        }
    }

    public int ReadData(Span<byte> buffer) =>
        (_save ?? throw new MigrationException(Errno.EINVAL, "no save session")).Read(buffer);

    public void WriteData(ReadOnlySpan<byte> data) =>
        (_load ?? throw new MigrationException(Errno.EINVAL, "no resume session")).Write(data);

    public int ReadDataGather(int maxBytes, MigrationGatherList segments) =>
        (_save ?? throw new MigrationException(Errno.EINVAL, "no save session")).ReadGather(maxBytes, segments);

    public Span<byte> GetWriteSpan(int sizeHint) =>
        (_load ?? throw new MigrationException(Errno.EINVAL, "no resume session")).GetWriteSpan(sizeHint);

    public void AdvanceWrite(int count) =>
        (_load ?? throw new MigrationException(Errno.EINVAL, "no resume session")).AdvanceWrite(count);

    public PrecopyInfo GetPrecopyInfo() =>
        (_save ?? throw new MigrationException(Errno.EINVAL, "no pre-copy session")).GetPrecopyInfo();

    public ulong GetStopCopySize()
    {
        var vf = pf.GetVf(index);
        return _save is { } s ? s.GetStopCopySize(AcceleratorPf.StateLength(vf)) : pf.FullImageSize(index);
    }

    public void OnReset()
    {
        _load = null;
        _save = null;
        if (pf.Vfs.Count > index)
        {
            pf.StopTracking(index);
            pf.Resume(index, AcceleratorSuspendScope.Initiator);
        }
    }

    private void EndSave()
    {
        _save = null;
        pf.StopTracking(index);
    }
}
