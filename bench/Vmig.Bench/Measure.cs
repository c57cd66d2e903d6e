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

    /// <summary>Runs warm-up once for each, then <paramref name="runs"/> pairs. Returns per-run values (as the
    /// measure functions return them, e.g. µs/op or MiB/s).</summary>
    public static (List<double> Baseline, List<double> Vmig) Paired(int runs, Func<double> baseline, Func<double> vmig, Action? warmup = null)
    {
        if (warmup is not null)
        {
            warmup();
        }
        else
        {
            baseline();
            vmig();
        }
        var b = new List<double>(runs);
        var v = new List<double>(runs);
        for (int i = 0; i < runs; i++)
        {
            if (i % 2 == 0)
            {
                b.Add(baseline());
                v.Add(vmig());
            }
            else
            {
                v.Add(vmig());
                b.Add(baseline());
            }
        }
        return (b, v);
    }

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
