using Vmig.Migration;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.VfioUser.Internal;

/// <summary>
/// The migration side of a served device: its <see cref="MigrationStateDriver"/> (null when the device does not
/// migrate), which extensions the current client negotiated, and the per-state command gate. Lives as long as
/// the server, so the migration state survives a client reconnect (spec "Client Disconnection": state retained).
/// </summary>
internal sealed class MigrationEndpoint
{
    private VfioUserCapabilities _caps = new();

    public MigrationEndpoint(VfioUserDevice device)
    {
        Driver = device.Migration is { } m ? new MigrationStateDriver(m) : null;
    }

    public MigrationStateDriver? Driver { get; }

    /// <summary>Extensions of the current client (defaults until VERSION).</summary>
    public VfioUserCapabilities Caps => _caps;

    /// <summary>Flags as this client sees them: P2P only when it negotiated the vmig p2p extension (the spec
    /// documents the P2P states as unused in vfio-user).</summary>
    public MigrationFlags VisibleFlags => Driver is null ? MigrationFlags.None
        : _caps.VmigP2P ? Driver.Flags : Driver.Flags & ~MigrationFlags.P2P;

    public void Negotiate(VfioUserCapabilities caps) => _caps = caps;

    /// <summary>Resets migration state to RUNNING and ends any open data stream (DEVICE_RESET, ARCHITECTURE §6).</summary>
    public void Reset() => Driver?.Reset();

    /// <summary>Whether <paramref name="command"/> may run in the current migration state (reference §3.6).</summary>
    public bool IsCommandAllowed(VfioUserCommand command)
    {
        if (Driver is null || command == VfioUserCommand.Version)
        {
            return true;
        }
        DeviceOperation? op = command switch
        {
            VfioUserCommand.RegionRead or VfioUserCommand.RegionWrite or VfioUserCommand.RegionWriteMulti => DeviceOperation.RegionAccess,
            VfioUserCommand.DeviceGetInfo or VfioUserCommand.DeviceGetRegionInfo or VfioUserCommand.DeviceGetRegionIoFds
                or VfioUserCommand.DeviceGetIrqInfo => DeviceOperation.DeviceQuery,
            VfioUserCommand.DmaMap or VfioUserCommand.DmaUnmap => DeviceOperation.DmaMap,
            VfioUserCommand.DeviceSetIrqs => DeviceOperation.SetIrqs,
            VfioUserCommand.DeviceReset => DeviceOperation.DeviceReset,
            VfioUserCommand.DeviceFeature => DeviceOperation.DeviceFeature,
            // MIG_DATA_* are gated by the driver itself (EINVAL outside their states).
            _ => null,
        };
        return op is not DeviceOperation o || MigrationGate.IsAllowed(Driver.State, o);
    }
}
