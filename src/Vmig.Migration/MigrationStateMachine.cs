namespace Vmig.Migration;

/// <summary>One direct arc of the VFIO migration v2 FSM (reference §1.3): a single driver step.</summary>
public readonly record struct MigrationArc(DeviceState From, DeviceState To)
{
    public override string ToString() => $"{From}->{To}";
}

/// <summary>
/// The VFIO migration v2 device state machine exactly as Linux defines it (drivers/vfio/vfio_main.c
/// <c>vfio_mig_get_next_state</c>; reference §1.4–§1.6): one constant full-feature next-step table, the per-state
/// required-flags table, and the skip loop that routes around optional states a device lacks, with the
/// <c>n != ERROR</c> guard of the June 2026 fix so STOP_COPY→PRE_COPY(_P2P) ends in EINVAL instead of spinning.
/// Pure functions; errno-style results (0 or 22 EINVAL).
/// </summary>
public static class MigrationStateMachine
{
    /// <summary>Number of states (<c>VFIO_DEVICE_STATE_NR</c>); valid numeric states are 0..7.</summary>
    public const int StateCount = 8;

    // NEXT[from * 8 + to]: the kernel's full-feature table (all of SC|P2P|PRE), indexed by the numeric states
    // ERROR=0, STOP=1, RUNNING=2, STOP_COPY=3, RESUMING=4, RUNNING_P2P=5, PRE_COPY=6, PRE_COPY_P2P=7.
    // 0 (ERROR) in a cell means "refused". Paths are shortest and never stop inside the saving group.
    private static ReadOnlySpan<byte> NextStepTable =>
    [
        /* ERROR        */ 0, 0, 0, 0, 0, 0, 0, 0,
        /* STOP         */ 0, 1, 5, 3, 4, 5, 5, 5,
        /* RUNNING      */ 0, 5, 2, 5, 5, 5, 6, 5,
        /* STOP_COPY    */ 0, 1, 1, 3, 1, 1, 0, 0,
        /* RESUMING     */ 0, 1, 1, 1, 4, 1, 1, 1,
        /* RUNNING_P2P  */ 0, 1, 2, 1, 1, 5, 2, 7,
        /* PRE_COPY     */ 0, 2, 2, 7, 2, 2, 6, 7,
        /* PRE_COPY_P2P */ 0, 5, 5, 3, 5, 5, 6, 7,
    ];

    private const MigrationFlags SC = MigrationFlags.StopCopy;
    private const MigrationFlags P2P = MigrationFlags.P2P;
    private const MigrationFlags Pre = MigrationFlags.PreCopy;

    /// <summary>
    /// <c>state_flags_table</c>: the flags a device needs for a state to exist. ERROR needs every bit, so it is
    /// never "supported" and can be neither the current state of a SET walk nor a target.
    /// </summary>
    public static MigrationFlags RequiredFlags(DeviceState state) => state switch
    {
        DeviceState.Stop or DeviceState.Running or DeviceState.StopCopy or DeviceState.Resuming => SC,
        DeviceState.RunningP2P => SC | P2P,
        DeviceState.PreCopy => SC | Pre,
        DeviceState.PreCopyP2P => SC | P2P | Pre,
        _ => (MigrationFlags)ulong.MaxValue,
    };

    /// <summary>True if <paramref name="state"/> exists on a device with <paramref name="flags"/> (never for ERROR or out-of-range values).</summary>
    public static bool IsSupported(MigrationFlags flags, DeviceState state)
    {
        var req = RequiredFlags(state);
        return (req & flags) == req;
    }

    /// <summary>
    /// True for the four flag sets the UAPI defines: SC, SC|P2P, SC|PRE, SC|P2P|PRE. Anything else (no STOP_COPY,
    /// unknown bits) is "to be defined" and a device must not advertise it (reference §1.2).
    /// </summary>
    public static bool IsValidFlagSet(MigrationFlags flags) =>
        (flags & SC) != 0 && (flags & ~(SC | P2P | Pre)) == 0;

    /// <summary>
    /// The next single arc from <paramref name="current"/> toward <paramref name="target"/> on a device with
    /// <paramref name="flags"/> (<c>vfio_mig_get_next_state</c>). When current == target, next = current.
    /// </summary>
    /// <returns>0, or 22 (EINVAL) if current or target is unsupported (ERROR, out of range, optional state the
    /// device lacks) or the request is blocked (STOP_COPY→PRE_COPY/PRE_COPY_P2P). <paramref name="next"/> is
    /// ERROR on failure.</returns>
    public static int TryGetNextState(MigrationFlags flags, DeviceState current, DeviceState target, out DeviceState next)
    {
        next = DeviceState.Error;
        if ((uint)current >= StateCount || !IsSupported(flags, current)
            || (uint)target >= StateCount || !IsSupported(flags, target))
        {
            return Errno.EINVAL;
        }
        var n = (DeviceState)NextStepTable[(int)current * StateCount + (int)target];
        // The n != Error guard is the FIXLOOP fix: Table[STOP_COPY][PRE_COPY] is ERROR, and ERROR is never supported,
        // so without it the loop would keep looking up Table[ERROR][PRE_COPY] = ERROR forever.
        while (n != DeviceState.Error && !IsSupported(flags, n))
        {
            n = (DeviceState)NextStepTable[(int)n * StateCount + (int)target];
        }
        if (n == DeviceState.Error)
        {
            return Errno.EINVAL;
        }
        next = n;
        return 0;
    }

    /// <summary>
    /// The whole sequence of direct arcs a SET from <paramref name="current"/> to <paramref name="target"/> walks
    /// (empty when they are equal, as the kernel's <c>while (cur != target)</c> loop does nothing then).
    /// </summary>
    /// <returns>0, or 22 (EINVAL) with an empty path when the request is refused (see <see cref="TryGetNextState"/>).</returns>
    public static int GetPath(MigrationFlags flags, DeviceState current, DeviceState target, out IReadOnlyList<MigrationArc> path)
    {
        var arcs = new List<MigrationArc>(4);
        path = arcs;
        var cur = current;
        // Every table path is at most 4 arcs (e.g. PRE_COPY→RUNNING→RUNNING_P2P→STOP→RESUMING); the bound only
        // guards against a corrupted table turning this into an endless loop.
        while (cur != target && arcs.Count < StateCount)
        {
            int rc = TryGetNextState(flags, cur, target, out var next);
            if (rc != 0)
            {
                arcs.Clear();
                return rc;
            }
            arcs.Add(new MigrationArc(cur, next));
            cur = next;
        }
        return 0;
    }

    /// <summary>True for the saving group {PRE_COPY, PRE_COPY_P2P, STOP_COPY}, whose members share one save session.</summary>
    public static bool IsSavingState(DeviceState state) =>
        state is DeviceState.PreCopy or DeviceState.PreCopyP2P or DeviceState.StopCopy;

    /// <summary>
    /// True if going <paramref name="from"/> → <paramref name="to"/> (an arc or a whole request) enters the saving
    /// group, i.e. opens a new save stream: the arcs STOP→STOP_COPY, RUNNING→PRE_COPY, RUNNING_P2P→PRE_COPY_P2P
    /// (reference §2.1, the cases where the kernel returns a new data_fd).
    /// </summary>
    public static bool OpensSaveSession(DeviceState from, DeviceState to) => !IsSavingState(from) && IsSavingState(to);

    /// <summary>True if the move enters RESUMING (the arc STOP→RESUMING), opening a new resume stream.</summary>
    public static bool OpensResumeSession(DeviceState from, DeviceState to) =>
        from != DeviceState.Resuming && to == DeviceState.Resuming;

    /// <summary>
    /// True if the move leaves the saving group or RESUMING, which ends that data session (later reads/writes of the
    /// old stream fail). Moves inside the saving group (PRE_COPY→PRE_COPY_P2P→STOP_COPY) keep the session.
    /// </summary>
    public static bool EndsSession(DeviceState from, DeviceState to) =>
        (IsSavingState(from) && !IsSavingState(to)) || (from == DeviceState.Resuming && to != DeviceState.Resuming);
}
