using System.Text.Json;
using System.Text.Json.Serialization;

namespace Vmig.Bench;

/// <summary>What <see cref="BenchRunner.Run"/> runs.</summary>
public sealed record BenchOptions
{
    /// <summary>Smaller sizes and fewer runs (minutes, not tens of minutes); still ≥ 5 measured runs per figure.</summary>
    public bool Quick { get; init; }

    /// <summary>Scenario ids to run (case-insensitive prefixes, e.g. "region", "migdata", "nvme", "accel", "vm");
    /// null or empty = all. The micro-benchmarks run only through <see cref="Micro"/>.</summary>
    public IReadOnlyList<string>? Scenarios { get; init; }

    /// <summary>Measured runs per figure (median and spread are over these). Default: 5 quick, 7 full.</summary>
    public int? Runs { get; init; }

    /// <summary>How to start a peer process: the program and the arguments that come before "serve …". Null = this
    /// assembly under the same dotnet host.</summary>
    public IReadOnlyList<string>? PeerCommand { get; init; }

    /// <summary>Directory for sockets and files (default: a new temp directory, removed afterwards).</summary>
    public string? WorkDirectory { get; init; }

    internal int RunCount => Runs ?? (Quick ? 5 : 7);

    internal bool Wants(string id) =>
        Scenarios is null || Scenarios.Count == 0
        || Scenarios.Any(s => id.StartsWith(s, StringComparison.OrdinalIgnoreCase) || s.Equals("all", StringComparison.OrdinalIgnoreCase));
}

/// <summary>Median and spread of one series of per-run values.</summary>
/// <param name="Median">Median of the runs.</param>
/// <param name="Min">Smallest run.</param>
/// <param name="Max">Largest run.</param>
/// <param name="Q1">First quartile (linear interpolation).</param>
/// <param name="Q3">Third quartile.</param>
/// <param name="Runs">Number of runs.</param>
public sealed record Summary(double Median, double Min, double Max, double Q1, double Q3, int Runs)
{
    /// <summary>Summarizes <paramref name="values"/> (at least one).</summary>
    public static Summary Of(IReadOnlyList<double> values)
    {
        ArgumentNullException.ThrowIfNull(values);
        if (values.Count == 0)
        {
            throw new ArgumentException("no values", nameof(values));
        }
        var s = values.OrderBy(v => v).ToArray();
        return new Summary(Quantile(s, 0.5), s[0], s[^1], Quantile(s, 0.25), Quantile(s, 0.75), s.Length);
    }

    private static double Quantile(double[] sorted, double q)
    {
        double pos = (sorted.Length - 1) * q;
        int lo = (int)Math.Floor(pos);
        int hi = Math.Min(lo + 1, sorted.Length - 1);
        return sorted[lo] + ((sorted[hi] - sorted[lo]) * (pos - lo));
    }
}

/// <summary>Which way a ratio should go to be good.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<GoalDirection>))]
public enum GoalDirection
{
    /// <summary>Ratio must be at most the goal (time-like: round-trip time, migration time).</summary>
    AtMost,

    /// <summary>Ratio must be at least the goal (throughput-like).</summary>
    AtLeast,

    /// <summary>No goal; informational.</summary>
    None,
}

/// <summary>
/// One figure: a vmig measurement next to its baseline from the same run. <see cref="Ratio"/> is per-run
/// vmig ÷ baseline (each run pairs one vmig measurement with the baseline measured right before it).
/// </summary>
public sealed record BenchFigure
{
    public required string Scenario { get; init; }
    public required string Name { get; init; }
    /// <summary>Unit of <see cref="Value"/> and <see cref="Baseline"/> (e.g. "µs/op", "MiB/s", "IOPS").</summary>
    public required string Unit { get; init; }
    public required Summary Value { get; init; }
    public Summary? Baseline { get; init; }
    /// <summary>What the baseline is.</summary>
    public string? BaselineName { get; init; }
    public Summary? Ratio { get; init; }
    public double? Goal { get; init; }
    public GoalDirection Direction { get; init; } = GoalDirection.None;
    /// <summary>Null when there is no goal.</summary>
    public bool? GoalMet => Goal is not double g || Ratio is null ? null
        : Direction == GoalDirection.AtMost ? Ratio.Median <= g : Direction == GoalDirection.AtLeast ? Ratio.Median >= g : null;
    /// <summary>Free-form extra measurements (latency percentiles, breakdowns), name → value.</summary>
    public Dictionary<string, double> Extra { get; init; } = [];
    public string? Note { get; init; }
}

/// <summary>A growth series (x → y) for the table and SVG plot.</summary>
public sealed record GrowthSeries(string Name, string XUnit, string YUnit, IReadOnlyList<(double X, double Y)> Points)
{
    /// <summary>Points as [x, y] pairs (tuples do not serialize to JSON).</summary>
    public IReadOnlyList<double[]> Data => Points.Select(p => new[] { p.X, p.Y }).ToList();
}

/// <summary>Everything one <see cref="BenchRunner.Run"/> produced.</summary>
public sealed class BenchReport
{
    public DateTimeOffset StartedAt { get; set; }
    public double TotalSeconds { get; set; }
    public bool Quick { get; set; }
    public string Machine { get; set; } = "";
    public int ProcessorCount { get; set; } = Environment.ProcessorCount;
    public string Runtime { get; set; } = System.Runtime.InteropServices.RuntimeInformation.FrameworkDescription;
    public List<BenchFigure> Figures { get; } = [];
    [JsonIgnore]
    public List<GrowthSeries> Growth { get; } = [];
    public List<object> GrowthData => Growth.Select(g => (object)new { g.Name, g.XUnit, g.YUnit, g.Data }).ToList();
    /// <summary>Scenarios that could not run, with the reason.</summary>
    public Dictionary<string, string> Skipped { get; } = [];
    public List<string> Notes { get; } = [];

    private static readonly JsonSerializerOptions JsonOptions = new() { WriteIndented = true, NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals };

    public string ToJson() => JsonSerializer.Serialize(this, JsonOptions);
}
