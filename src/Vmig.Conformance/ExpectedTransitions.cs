using Vmig.Migration;

namespace Vmig.Conformance;

/// <summary>
/// The VFIO migration v2 next-step tables for the four defined flag sets, typed by hand from reference §1.5/§1.6
/// (torvalds/linux drivers/vfio/vfio_main.c <c>vfio_mig_get_next_state</c>, run for every pair). Deliberately
/// NOT computed with Vmig.Migration: this is the oracle a server is judged against.
/// </summary>
/// <remarks>Grid cells: S STOP, R RUNNING, SC STOP_COPY, RS RESUMING, RP RUNNING_P2P, PC PRE_COPY, PP PRE_COPY_P2P,
/// "-" already there, "X" refused (EINVAL, state unchanged). Rows are the current state, columns the target, both in
/// the order S R SC RS RP PC PP; a state the flag set lacks has no row and its column is X.</remarks>
public static class ExpectedTransitions
{
    // SC | P2P | PRE (reference §1.5).
    private static readonly string[] Full =
    [
        /* S  */ "-  RP SC RS RP RP RP",
        /* R  */ "RP -  RP RP RP PC RP",
        /* SC */ "S  S  -  S  S  X  X ",
        /* RS */ "S  S  S  -  S  S  S ",
        /* RP */ "S  R  S  S  -  R  PP",
        /* PC */ "R  R  PP R  R  -  PP",
        /* PP */ "RP RP SC RP RP PC - ",
    ];

    // SC | P2P (reference §1.6).
    private static readonly string[] StopCopyP2P =
    [
        /* S  */ "-  RP SC RS RP X  X ",
        /* R  */ "RP -  RP RP RP X  X ",
        /* SC */ "S  S  -  S  S  X  X ",
        /* RS */ "S  S  S  -  S  X  X ",
        /* RP */ "S  R  S  S  -  X  X ",
    ];

    // SC | PRE (reference §1.6; libvfio-user's table).
    private static readonly string[] StopCopyPre =
    [
        /* S  */ "-  R  SC RS X  R  X ",
        /* R  */ "S  -  S  S  X  PC X ",
        /* SC */ "S  S  -  S  X  X  X ",
        /* RS */ "S  S  S  -  X  S  X ",
        /* PC */ "R  R  SC R  X  -  X ",
    ];

    // SC only (reference §1.6; the 2025 NVMe RFC).
    private static readonly string[] StopCopyOnly =
    [
        /* S  */ "-  R  SC RS X  X  X ",
        /* R  */ "S  -  S  S  X  X  X ",
        /* SC */ "S  S  -  S  X  X  X ",
        /* RS */ "S  S  S  -  X  X  X ",
    ];

    /// <summary>The four flag sets the UAPI defines: SC, SC|P2P, SC|PRE, SC|P2P|PRE.</summary>
    public static IReadOnlyList<MigrationFlags> FlagSets { get; } =
    [
        MigrationFlags.StopCopy,
        MigrationFlags.StopCopy | MigrationFlags.P2P,
        MigrationFlags.StopCopy | MigrationFlags.PreCopy,
        MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy,
    ];

    /// <summary>True for one of <see cref="FlagSets"/>.</summary>
    public static bool IsDefined(MigrationFlags flags) => FlagSets.Contains(flags);

    /// <summary>The states a device with <paramref name="flags"/> has (ERROR excluded), in row order.</summary>
    /// <exception cref="ArgumentException">Not a defined flag set.</exception>
    public static IReadOnlyList<DeviceState> States(MigrationFlags flags)
    {
        var s = new List<DeviceState> { DeviceState.Stop, DeviceState.Running, DeviceState.StopCopy, DeviceState.Resuming };
        if (!IsDefined(flags))
        {
            throw new ArgumentException($"flags {flags} are not a defined set", nameof(flags));
        }
        if ((flags & MigrationFlags.P2P) != 0)
        {
            s.Add(DeviceState.RunningP2P);
        }
        if ((flags & MigrationFlags.PreCopy) != 0)
        {
            s.Add(DeviceState.PreCopy);
        }
        if ((flags & (MigrationFlags.P2P | MigrationFlags.PreCopy)) == (MigrationFlags.P2P | MigrationFlags.PreCopy))
        {
            s.Add(DeviceState.PreCopyP2P);
        }
        return s;
    }

    /// <summary>
    /// The next single step from <paramref name="from"/> toward <paramref name="to"/> (raw u32 wire values), or null when
    /// the request is refused (EINVAL): ERROR, out-of-range or unsupported states, STOP_COPY→PRE_COPY*.
    /// <paramref name="from"/> == <paramref name="to"/> (supported) gives <paramref name="to"/>.
    /// </summary>
    public static DeviceState? NextStep(MigrationFlags flags, uint from, uint to)
    {
        var rows = Table(flags);
        int r = RowOf(flags, from);
        int c = ColumnOf(to);
        if (r < 0 || c < 0)
        {
            return null;
        }
        string cell = rows[r].Split(' ', StringSplitOptions.RemoveEmptyEntries)[c];
        return cell switch
        {
            "X" => null,
            "-" => (DeviceState)to,
            _ => StateOf(cell),
        };
    }

    /// <summary>
    /// The arcs a SET from <paramref name="from"/> to <paramref name="to"/> walks (empty when already there), or null
    /// when the request is refused.
    /// </summary>
    public static IReadOnlyList<(DeviceState From, DeviceState To)>? Path(MigrationFlags flags, uint from, uint to)
    {
        var arcs = new List<(DeviceState, DeviceState)>();
        uint cur = from;
        while (cur != to)
        {
            var n = NextStep(flags, cur, to);
            if (n is not DeviceState next || arcs.Count > 8)
            {
                return null;
            }
            arcs.Add(((DeviceState)cur, next));
            cur = (uint)next;
        }
        return NextStep(flags, from, to) is null ? null : arcs;
    }

    /// <summary>The saving group {PRE_COPY, PRE_COPY_P2P, STOP_COPY}: MIG_DATA_READ is served there (UAPI, reference §1.1).</summary>
    public static bool IsSaving(DeviceState s) => s is DeviceState.PreCopy or DeviceState.PreCopyP2P or DeviceState.StopCopy;

    /// <summary>An arc that opens a new save or resume stream (reference §2.1: STOP→STOP_COPY, RUNNING→PRE_COPY,
    /// RUNNING_P2P→PRE_COPY_P2P, STOP→RESUMING).</summary>
    public static bool OpensStream(DeviceState from, DeviceState to) =>
        (from, to) is (DeviceState.Stop, DeviceState.StopCopy) or (DeviceState.Running, DeviceState.PreCopy)
            or (DeviceState.RunningP2P, DeviceState.PreCopyP2P) or (DeviceState.Stop, DeviceState.Resuming);

    /// <summary>An arc that ends the open stream (leaving the saving group or RESUMING).</summary>
    public static bool ClosesStream(DeviceState from, DeviceState to) =>
        (IsSaving(from) && !IsSaving(to)) || (from == DeviceState.Resuming && to != DeviceState.Resuming);

    private static string[] Table(MigrationFlags flags) => flags switch
    {
        MigrationFlags.StopCopy => StopCopyOnly,
        MigrationFlags.StopCopy | MigrationFlags.P2P => StopCopyP2P,
        MigrationFlags.StopCopy | MigrationFlags.PreCopy => StopCopyPre,
        MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy => Full,
        _ => throw new ArgumentException($"flags {flags} are not a defined set", nameof(flags)),
    };

    private static int RowOf(MigrationFlags flags, uint state)
    {
        if (state is 0 or > 7)
        {
            return -1;
        }
        var states = States(flags);
        for (int i = 0; i < states.Count; i++)
        {
            if ((uint)states[i] == state)
            {
                return i;
            }
        }
        return -1;
    }

    private static int ColumnOf(uint state) => state switch
    {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        5 => 4,
        6 => 5,
        7 => 6,
        _ => -1,
    };

    private static DeviceState StateOf(string cell) => cell switch
    {
        "S" => DeviceState.Stop,
        "R" => DeviceState.Running,
        "SC" => DeviceState.StopCopy,
        "RS" => DeviceState.Resuming,
        "RP" => DeviceState.RunningP2P,
        "PC" => DeviceState.PreCopy,
        "PP" => DeviceState.PreCopyP2P,
        _ => throw new InvalidOperationException("bad table cell " + cell),
    };
}
