namespace Vmig.Migration;

/// <summary>
/// Classes of vfio-user client commands whose execution depends on the migration state. The server maps each
/// command to one class (VfioUser cannot be referenced from here): REGION_READ/REGION_WRITE/REGION_WRITE_MULTI →
/// <see cref="RegionAccess"/>; DEVICE_GET_INFO/GET_REGION_INFO/GET_REGION_IO_FDS/GET_IRQ_INFO → <see cref="DeviceQuery"/>;
/// DMA_MAP/DMA_UNMAP → <see cref="DmaMap"/>; DEVICE_SET_IRQS → <see cref="SetIrqs"/>; DEVICE_RESET →
/// <see cref="DeviceReset"/>; DEVICE_FEATURE → <see cref="DeviceFeature"/>; MIG_DATA_READ/WRITE →
/// <see cref="MigDataRead"/>/<see cref="MigDataWrite"/>. VERSION (handshake only) is not state-gated.
/// </summary>
public enum DeviceOperation
{
    RegionAccess,
    DeviceQuery,
    DmaMap,
    SetIrqs,
    DeviceReset,
    DeviceFeature,
    MigDataRead,
    MigDataWrite,
}

/// <summary>
/// Per-state command gating for a migratable vfio-user server (reference §3.6, libvfio-user
/// <c>should_exec_command</c>). A refused command is answered with EINVAL, as libvfio-user does.
/// </summary>
/// <remarks>
/// The policy, state by state:
/// <list type="bullet">
/// <item>RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P, RESUMING: every command runs, except the data commands
/// below. The P2P states are not restricted: the kernel does not police user access there, and peer P2P traffic
/// reaches an emulated device as region accesses that it must keep answering. RESUMING allows DMA_MAP and
/// SET_IRQS because the target VMM maps guest RAM and restores MSI-X while loading (libvfio-user allows all too).</item>
/// <item>STOP, STOP_COPY (and ERROR): only REGION_READ/WRITE (config space and MSI-X must still answer),
/// DEVICE_FEATURE (state GET/SET, logging, which are how one leaves) and MIG_DATA_READ (meaningful in STOP_COPY
/// only). DMA_MAP/UNMAP, SET_IRQS and info queries are refused, exactly as libvfio-user.</item>
/// <item>Deliberate difference from libvfio-user: DEVICE_RESET runs in every state, because the kernel UAPI makes
/// reset the only way out of ERROR and vmig's reset returns the state to RUNNING (ARCHITECTURE §6).</item>
/// <item>MIG_DATA_READ only in the saving group ({PRE_COPY, PRE_COPY_P2P, STOP_COPY}); MIG_DATA_WRITE only in
/// RESUMING (reference §3.5).</item>
/// </list>
/// </remarks>
public static class MigrationGate
{
    /// <summary>MIG_DATA_READ is served in PRE_COPY, PRE_COPY_P2P and STOP_COPY; EINVAL elsewhere.</summary>
    public static bool CanReadData(DeviceState state) => MigrationStateMachine.IsSavingState(state);

    /// <summary>MIG_DATA_WRITE is served only in RESUMING; EINVAL elsewhere.</summary>
    public static bool CanWriteData(DeviceState state) => state == DeviceState.Resuming;

    /// <summary>
    /// True for STOP, STOP_COPY and ERROR: the device is not running and takes only the commands listed in the
    /// class remarks.
    /// </summary>
    public static bool IsStopped(DeviceState state) =>
        state is DeviceState.Stop or DeviceState.StopCopy or DeviceState.Error;

    /// <summary>Whether a command of class <paramref name="operation"/> may run in <paramref name="state"/> (see remarks).</summary>
    public static bool IsAllowed(DeviceState state, DeviceOperation operation) => operation switch
    {
        DeviceOperation.MigDataRead => CanReadData(state),
        DeviceOperation.MigDataWrite => CanWriteData(state),
        DeviceOperation.DeviceReset or DeviceOperation.RegionAccess or DeviceOperation.DeviceFeature => true,
        DeviceOperation.DeviceQuery or DeviceOperation.DmaMap or DeviceOperation.SetIrqs => !IsStopped(state),
        _ => false,
    };
}
