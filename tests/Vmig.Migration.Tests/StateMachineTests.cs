using Vmig.Migration;

namespace Vmig.Migration.Tests;

/// <summary>
/// The next-step tables below are typed by hand from reference §1.5 (full set) and §1.6 (SC|P2P, SC|PRE,
/// SC only), never produced by the code under test. Rows = current state, columns = target, both in numeric order
/// ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P. "X" = EINVAL; a diagonal cell is
/// the state itself.
/// </summary>
public class StateMachineTests
{
    private const int EINVAL = 22;
    private const MigrationFlags SC = MigrationFlags.StopCopy;
    private const MigrationFlags P2P = MigrationFlags.P2P;
    private const MigrationFlags PRE = MigrationFlags.PreCopy;

    private static readonly string[] FullTable =
    [
        "X X    X    X    X    X    X    X",   // ERROR
        "X STOP RP   SC   RES  RP   RP   RP",  // STOP
        "X RP   RUN  RP   RP   RP   PC   RP",  // RUNNING
        "X STOP STOP SC   STOP STOP X    X",   // STOP_COPY
        "X STOP STOP STOP RES  STOP STOP STOP", // RESUMING
        "X STOP RUN  STOP STOP RP   RUN  PCP", // RUNNING_P2P
        "X RUN  RUN  PCP  RUN  RUN  PC   PCP", // PRE_COPY
        "X RP   RP   SC   RP   RP   PC   PCP", // PRE_COPY_P2P
    ];

    private static readonly string[] StopCopyP2PTable =
    [
        "X X    X    X    X    X    X X",
        "X STOP RP   SC   RES  RP   X X",
        "X RP   RUN  RP   RP   RP   X X",
        "X STOP STOP SC   STOP STOP X X",
        "X STOP STOP STOP RES  STOP X X",
        "X STOP RUN  STOP STOP RP   X X",
        "X X    X    X    X    X    X X",
        "X X    X    X    X    X    X X",
    ];

    private static readonly string[] StopCopyPreCopyTable =
    [
        "X X    X    X    X    X X   X",
        "X STOP RUN  SC   RES  X RUN X",
        "X STOP RUN  STOP STOP X PC  X",
        "X STOP STOP SC   STOP X X   X",
        "X STOP STOP STOP RES  X STOP X",
        "X X    X    X    X    X X   X",
        "X RUN  RUN  SC   RUN  X PC  X",
        "X X    X    X    X    X X   X",
    ];

    // STOP_COPY only: every request that is not a single arc goes through STOP.
    private static readonly string[] StopCopyOnlyTable =
    [
        "X X    X    X    X    X X X",
        "X STOP RUN  SC   RES  X X X",
        "X STOP RUN  STOP STOP X X X",
        "X STOP STOP SC   STOP X X X",
        "X STOP STOP STOP RES  X X X",
        "X X    X    X    X    X X X",
        "X X    X    X    X    X X X",
        "X X    X    X    X    X X X",
    ];

    public static TheoryData<MigrationFlags, string> FlagSets => new()
    {
        { SC | P2P | PRE, nameof(FullTable) },
        { SC | P2P, nameof(StopCopyP2PTable) },
        { SC | PRE, nameof(StopCopyPreCopyTable) },
        { SC, nameof(StopCopyOnlyTable) },
    };

    private static string[] TableNamed(string name) => name switch
    {
        nameof(FullTable) => FullTable,
        nameof(StopCopyP2PTable) => StopCopyP2PTable,
        nameof(StopCopyPreCopyTable) => StopCopyPreCopyTable,
        _ => StopCopyOnlyTable,
    };

    private static DeviceState? Parse(string cell) => cell switch
    {
        "X" => null,
        "STOP" => DeviceState.Stop,
        "RUN" => DeviceState.Running,
        "SC" => DeviceState.StopCopy,
        "RES" => DeviceState.Resuming,
        "RP" => DeviceState.RunningP2P,
        "PC" => DeviceState.PreCopy,
        "PCP" => DeviceState.PreCopyP2P,
        _ => throw new ArgumentException(cell),
    };

    [Theory]
    [MemberData(nameof(FlagSets))]
    public async Task NextStepTableMatchesTheKernelTableForEachFlagSet(MigrationFlags flags, string tableName)
    {
        // Off the test thread with a deadline, so a lost n != ERROR guard fails this test instead of hanging the run.
        await Task.Run(() => AssertTable(flags, TableNamed(tableName))).WaitAsync(TimeSpan.FromSeconds(10));
    }

    private static void AssertTable(MigrationFlags flags, string[] table)
    {
        Assert.Equal(8, table.Length);
        for (int from = 0; from < 8; from++)
        {
            var cells = table[from].Split(' ', StringSplitOptions.RemoveEmptyEntries);
            Assert.Equal(8, cells.Length);
            for (int to = 0; to < 8; to++)
            {
                var expected = Parse(cells[to]);
                int rc = MigrationStateMachine.TryGetNextState(flags, (DeviceState)from, (DeviceState)to, out var next);
                if (expected is null)
                {
                    Assert.True(rc == EINVAL, $"{(DeviceState)from}->{(DeviceState)to}: expected EINVAL, got rc={rc} next={next}");
                    Assert.Equal(DeviceState.Error, next);
                }
                else
                {
                    Assert.True(rc == 0 && next == expected,
                        $"{(DeviceState)from}->{(DeviceState)to}: expected {expected}, got rc={rc} next={next}");
                }
            }
        }
    }

    [Theory]
    [InlineData(8u)]
    [InlineData(9u)]
    [InlineData(0xFFFF_FFFFu)]
    public void OutOfRangeStatesAreRefusedAsCurrentOrTarget(uint raw)
    {
        var all = SC | P2P | PRE;
        Assert.Equal(EINVAL, MigrationStateMachine.TryGetNextState(all, DeviceState.Running, (DeviceState)raw, out _));
        Assert.Equal(EINVAL, MigrationStateMachine.TryGetNextState(all, (DeviceState)raw, DeviceState.Running, out _));
    }

    [Theory]
    [InlineData(DeviceState.PreCopy)]
    [InlineData(DeviceState.PreCopyP2P)]
    public async Task StopCopyToPreCopyRequestTerminatesWithEinval(DeviceState target)
    {
        // Without the n != ERROR guard this call never returns (the FIXLOOP soft lockup); the timeout turns a hang
        // into a failure.
        var task = Task.Run(() =>
        {
            int rc = MigrationStateMachine.TryGetNextState(SC | P2P | PRE, DeviceState.StopCopy, target, out var next);
            int pathRc = MigrationStateMachine.GetPath(SC | P2P | PRE, DeviceState.StopCopy, target, out var path);
            return (rc, next, pathRc, path.Count);
        });
        var result = await task.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal((EINVAL, DeviceState.Error, EINVAL, 0), result);
    }

    [Fact]
    public void StopCopyToPreCopyIsRefusedOnAStopCopyPreCopyDevice()
    {
        Assert.Equal(EINVAL, MigrationStateMachine.TryGetNextState(SC | PRE, DeviceState.StopCopy, DeviceState.PreCopy, out _));
    }

    // Every multi-step path of reference §1.5 (parenthesised extensions written out), full feature set.
    [Theory]
    [InlineData("STOP RP RUN")]
    [InlineData("STOP RP RUN PC")]
    [InlineData("STOP RP PCP")]
    [InlineData("RUN RP STOP")]
    [InlineData("RUN RP STOP SC")]
    [InlineData("RUN RP STOP RES")]
    [InlineData("RUN RP PCP")]
    [InlineData("SC STOP RP")]
    [InlineData("SC STOP RP RUN")]
    [InlineData("SC STOP RES")]
    [InlineData("RES STOP SC")]
    [InlineData("RES STOP RP")]
    [InlineData("RES STOP RP RUN")]
    [InlineData("RES STOP RP RUN PC")]
    [InlineData("RES STOP RP PCP")]
    [InlineData("RP STOP SC")]
    [InlineData("RP STOP RES")]
    [InlineData("RP RUN PC")]
    [InlineData("PC PCP SC")]
    [InlineData("PC RUN RP")]
    [InlineData("PC RUN RP STOP")]
    [InlineData("PC RUN RP STOP RES")]
    [InlineData("PCP RP STOP")]
    [InlineData("PCP RP STOP RES")]
    [InlineData("PCP RP RUN")]
    public void FullFeaturePathMatchesReferenceList(string states) => AssertPath(SC | P2P | PRE, states);

    // Paths through the smaller flag sets (reference §1.6): optional states are routed around.
    [Theory]
    [InlineData(SC, "RUN STOP SC")]
    [InlineData(SC, "RES STOP RUN")]
    [InlineData(SC, "SC STOP RES")]
    [InlineData(SC | P2P, "RUN RP STOP SC")]
    [InlineData(SC | P2P, "RES STOP RP RUN")]
    [InlineData(SC | PRE, "STOP RUN PC")]
    [InlineData(SC | PRE, "PC SC")]
    [InlineData(SC | PRE, "PC RUN STOP RES")]
    [InlineData(SC | PRE, "RES STOP RUN PC")]
    public void ReducedFlagSetPathRoutesAroundMissingStates(MigrationFlags flags, string states) => AssertPath(flags, states);

    private static void AssertPath(MigrationFlags flags, string states)
    {
        var seq = states.Split(' ').Select(s => Parse(s)!.Value).ToArray();
        var expected = seq.Zip(seq.Skip(1), (a, b) => new MigrationArc(a, b)).ToArray();
        Assert.Equal(0, MigrationStateMachine.GetPath(flags, seq[0], seq[^1], out var path));
        Assert.Equal(expected, path);
    }

    [Fact]
    public void PathToTheCurrentStateIsEmpty()
    {
        Assert.Equal(0, MigrationStateMachine.GetPath(SC, DeviceState.Running, DeviceState.Running, out var path));
        Assert.Empty(path);
    }

    [Fact]
    public void PathToAnUnsupportedTargetIsRefusedAndEmpty()
    {
        Assert.Equal(EINVAL, MigrationStateMachine.GetPath(SC | PRE, DeviceState.Running, DeviceState.RunningP2P, out var path));
        Assert.Empty(path);
        Assert.Equal(EINVAL, MigrationStateMachine.GetPath(SC, DeviceState.Running, DeviceState.Error, out path));
        Assert.Empty(path);
    }

    // The direct arcs each flag set uses (reference §1.3): 6, 8, 9 and 15.
    [Theory]
    [InlineData(SC, "RUN>STOP STOP>RUN STOP>SC SC>STOP STOP>RES RES>STOP")]
    [InlineData(SC | P2P, "RUN>RP RP>RUN RP>STOP STOP>RP STOP>SC SC>STOP STOP>RES RES>STOP")]
    [InlineData(SC | PRE, "RUN>STOP STOP>RUN RUN>PC PC>RUN PC>SC STOP>SC SC>STOP STOP>RES RES>STOP")]
    [InlineData(SC | P2P | PRE,
        "RUN>RP RP>RUN RP>STOP STOP>RP STOP>SC SC>STOP STOP>RES RES>STOP RUN>PC PC>RUN RP>PCP PCP>RP PC>PCP PCP>PC PCP>SC")]
    public void EveryRequestUsesOnlyTheFlagSetsDirectArcs(MigrationFlags flags, string arcs)
    {
        var expected = arcs.Split(' ')
            .Select(a => a.Split('>'))
            .Select(p => new MigrationArc(Parse(p[0])!.Value, Parse(p[1])!.Value))
            .ToHashSet();
        var used = new HashSet<MigrationArc>();
        for (int from = 0; from < 8; from++)
        {
            for (int to = 0; to < 8; to++)
            {
                if (MigrationStateMachine.GetPath(flags, (DeviceState)from, (DeviceState)to, out var path) == 0)
                {
                    used.UnionWith(path);
                }
            }
        }
        Assert.Equal(expected.OrderBy(a => a.ToString()), used.OrderBy(a => a.ToString()));
    }

    [Theory]
    [InlineData(SC, true)]
    [InlineData(SC | P2P, true)]
    [InlineData(SC | PRE, true)]
    [InlineData(SC | P2P | PRE, true)]
    [InlineData(MigrationFlags.None, false)]
    [InlineData(P2P, false)]
    [InlineData(PRE, false)]
    [InlineData(P2P | PRE, false)]
    [InlineData(SC | (MigrationFlags)8, false)]
    [InlineData((MigrationFlags)(1UL << 63) | SC, false)]
    public void OnlyTheFourDefinedFlagSetsAreValid(MigrationFlags flags, bool valid) =>
        Assert.Equal(valid, MigrationStateMachine.IsValidFlagSet(flags));

    [Fact]
    public void RequiredFlagsMatchTheKernelStateFlagsTable()
    {
        Assert.Equal((MigrationFlags)ulong.MaxValue, MigrationStateMachine.RequiredFlags(DeviceState.Error));
        Assert.Equal(SC, MigrationStateMachine.RequiredFlags(DeviceState.Stop));
        Assert.Equal(SC, MigrationStateMachine.RequiredFlags(DeviceState.Running));
        Assert.Equal(SC, MigrationStateMachine.RequiredFlags(DeviceState.StopCopy));
        Assert.Equal(SC, MigrationStateMachine.RequiredFlags(DeviceState.Resuming));
        Assert.Equal(SC | P2P, MigrationStateMachine.RequiredFlags(DeviceState.RunningP2P));
        Assert.Equal(SC | PRE, MigrationStateMachine.RequiredFlags(DeviceState.PreCopy));
        Assert.Equal(SC | P2P | PRE, MigrationStateMachine.RequiredFlags(DeviceState.PreCopyP2P));
        Assert.False(MigrationStateMachine.IsSupported(SC | P2P | PRE, DeviceState.Error));
        Assert.False(MigrationStateMachine.IsSupported(SC | PRE, DeviceState.PreCopyP2P));
        Assert.True(MigrationStateMachine.IsSupported(SC | P2P, DeviceState.RunningP2P));
    }

    [Fact]
    public void SessionHelpersClassifyEveryDirectArc()
    {
        var opensSave = new HashSet<string> { "STOP>SC", "RUN>PC", "RP>PCP" };
        var opensResume = new HashSet<string> { "STOP>RES" };
        var ends = new HashSet<string> { "SC>STOP", "PC>RUN", "PCP>RP", "RES>STOP" };
        // Full set's 15 arcs plus the extra arcs of the reduced sets (RUN<->STOP, PC->SC).
        var arcs = "RUN>RP RP>RUN RP>STOP STOP>RP STOP>SC SC>STOP STOP>RES RES>STOP RUN>PC PC>RUN RP>PCP PCP>RP PC>PCP PCP>PC PCP>SC RUN>STOP STOP>RUN PC>SC".Split(' ');
        foreach (var a in arcs)
        {
            var p = a.Split('>');
            var from = Parse(p[0])!.Value;
            var to = Parse(p[1])!.Value;
            Assert.True(opensSave.Contains(a) == MigrationStateMachine.OpensSaveSession(from, to), $"OpensSaveSession {a}");
            Assert.True(opensResume.Contains(a) == MigrationStateMachine.OpensResumeSession(from, to), $"OpensResumeSession {a}");
            Assert.True(ends.Contains(a) == MigrationStateMachine.EndsSession(from, to), $"EndsSession {a}");
        }
        Assert.True(MigrationStateMachine.EndsSession(DeviceState.PreCopy, DeviceState.Error));
        Assert.True(MigrationStateMachine.EndsSession(DeviceState.Resuming, DeviceState.Error));
    }

    [Fact]
    public void SavingGroupIsPreCopyPreCopyP2PAndStopCopy()
    {
        var saving = Enumerable.Range(0, 8).Select(i => (DeviceState)i).Where(MigrationStateMachine.IsSavingState);
        Assert.Equal([DeviceState.StopCopy, DeviceState.PreCopy, DeviceState.PreCopyP2P], saving);
    }
}
