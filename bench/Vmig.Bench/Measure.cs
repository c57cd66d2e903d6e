using System.Diagnostics;

namespace Vmig.Bench;

/// <summary>Paired measurement: each run measures the baseline and vmig back to back (order alternating per run,
/// so slow drift of a shared machine hits both), after a warm-up of both.</summary>
internal static class Measure
{
    /// <summary>Seconds taken by <paramref name="action"/>.</summary>
    public static double Seconds(Action action)
    {
        long t0 = Stopwatch.GetTimestamp();
        action();
        return Stopwatch.GetElapsedTime(t0).TotalSeconds;
    }

    /// <summary>
    /// Interleaved paired runs. Each of <paramref name="runs"/> runs is <paramref name="slices"/> slices; in each slice
    /// the baseline and vmig each do one unit of work back to back (order alternating), so load from other processes on
    /// a shared machine falls on both alike. A slice function returns (work done, seconds). A run's value is
    /// Σwork ÷ Σseconds (a rate) or, with <paramref name="perOp"/>, Σseconds ÷ Σwork × 1e6 (µs per unit).
    /// One warm-up run of each comes first and is discarded.
    /// </summary>
    public static (List<double> Baseline, List<double> Vmig) Paired(int runs, int slices, Func<(double Work, double Seconds)> baseline,
        Func<(double Work, double Seconds)> vmig, bool perOp, double unit = 1)
    {
        var b = new List<double>(runs);
        var v = new List<double>(runs);
        for (int r = -1; r < runs; r++)
        {
            double bw = 0, bs = 0, vw = 0, vs = 0;
            for (int i = 0; i < slices; i++)
            {
                if ((i + r) % 2 == 0)
                {
                    var x = baseline();
                    var y = vmig();
                    (bw, bs, vw, vs) = (bw + x.Work, bs + x.Seconds, vw + y.Work, vs + y.Seconds);
                }
                else
                {
                    var y = vmig();
                    var x = baseline();
                    (bw, bs, vw, vs) = (bw + x.Work, bs + x.Seconds, vw + y.Work, vs + y.Seconds);
                }
            }
            if (r >= 0)
            {
                b.Add(perOp ? bs / bw * 1e6 : bw / unit / bs);
                v.Add(perOp ? vs / vw * 1e6 : vw / unit / vs);
            }
        }
        return (b, v);
    }

    /// <summary>(ops, seconds) of <paramref name="ops"/> calls of <paramref name="op"/>.</summary>
    public static (double, double) Ops(int ops, Action op) => (ops, Seconds(() =>
    {
        for (int i = 0; i < ops; i++)
        {
            op();
        }
    }));

    /// <summary>A figure from paired runs; ratio = vmig ÷ baseline per run.</summary>
    public static BenchFigure Figure(string scenario, string name, string unit, List<double> baseline, List<double> vmig,
        string baselineName, double? goal, GoalDirection direction, string? note = null)
    {
        var ratios = vmig.Zip(baseline, (v, b) => v / b).ToList();
        return new BenchFigure
        {
            Scenario = scenario,
            Name = name,
            Unit = unit,
            Value = Summary.Of(vmig),
            Baseline = Summary.Of(baseline),
            BaselineName = baselineName,
            Ratio = Summary.Of(ratios),
            Goal = goal,
            Direction = direction,
            Note = note,
        };
    }

    public const double MiB = 1 << 20;
}
