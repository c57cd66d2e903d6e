using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Xml.Linq;

namespace Vmig.Conformance;

/// <summary>Result of one conformance check.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<CheckOutcome>))]
public enum CheckOutcome
{
    Pass,
    Fail,
    Skip,
}

/// <summary>
/// One check: <paramref name="Id"/> (stable, e.g. "transition.SC|P2P.STOP->RUNNING"), its
/// <paramref name="Category"/> (negotiation, features, transitions, data, gating, reset, dirty-logging, validation,
/// resilience), the outcome, a human reason (what was expected and seen), the spec clause it rests on and how long
/// it took in milliseconds.
/// </summary>
public sealed record CheckResult(string Id, string Category, CheckOutcome Outcome, string Reason, string SpecClause, double DurationMs);

/// <summary>What <see cref="ConformanceSuite.Run"/> found about one server.</summary>
public sealed class ConformanceReport
{
    private static readonly JsonSerializerOptions JsonOptions = new() { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase };

    public ConformanceReport(string target, DateTimeOffset started, TimeSpan duration, ulong? migrationFlags, IReadOnlyList<CheckResult> checks)
    {
        Target = target;
        Started = started;
        Duration = duration;
        MigrationFlags = migrationFlags;
        Checks = checks ?? throw new ArgumentNullException(nameof(checks));
    }

    /// <summary>The socket path checked.</summary>
    public string Target { get; }

    public DateTimeOffset Started { get; }

    public TimeSpan Duration { get; }

    /// <summary>The flags DEVICE_FEATURE MIGRATION reported (null if it failed).</summary>
    public ulong? MigrationFlags { get; }

    public IReadOnlyList<CheckResult> Checks { get; }

    public int Passed => Checks.Count(c => c.Outcome == CheckOutcome.Pass);

    public int Failed => Checks.Count(c => c.Outcome == CheckOutcome.Fail);

    public int Skipped => Checks.Count(c => c.Outcome == CheckOutcome.Skip);

    /// <summary>True when no check failed (the CLI exits non-zero otherwise).</summary>
    public bool Success => Failed == 0;

    /// <summary>The failed checks.</summary>
    public IEnumerable<CheckResult> Failures => Checks.Where(c => c.Outcome == CheckOutcome.Fail);

    /// <summary>
    /// JSON: {target, started (ISO 8601), durationMs, migrationFlags, passed, failed, skipped,
    /// checks: [{id, category, outcome ("Pass"|"Fail"|"Skip"), reason, specClause, durationMs}]}.
    /// </summary>
    public string ToJson() => JsonSerializer.Serialize(new JsonShape(Target, Started, Duration.TotalMilliseconds, MigrationFlags, Passed, Failed, Skipped, Checks), JsonOptions);

    /// <summary>
    /// JUnit XML: one &lt;testsuite&gt; per category inside &lt;testsuites&gt;, one &lt;testcase name=Id classname="vfio-user.Category"
    /// time=seconds&gt; per check, with &lt;failure message=Reason&gt; (spec clause in the body) or &lt;skipped message=Reason/&gt;.
    /// </summary>
    public string ToJUnitXml()
    {
        var suites = new XElement("testsuites",
            new XAttribute("name", "vmig conform " + Target),
            new XAttribute("tests", Checks.Count),
            new XAttribute("failures", Failed),
            new XAttribute("skipped", Skipped),
            new XAttribute("time", Seconds(Duration.TotalMilliseconds)));
        foreach (var g in Checks.GroupBy(c => c.Category))
        {
            var suite = new XElement("testsuite",
                new XAttribute("name", g.Key),
                new XAttribute("tests", g.Count()),
                new XAttribute("failures", g.Count(c => c.Outcome == CheckOutcome.Fail)),
                new XAttribute("skipped", g.Count(c => c.Outcome == CheckOutcome.Skip)),
                new XAttribute("time", Seconds(g.Sum(c => c.DurationMs))));
            foreach (var c in g)
            {
                var tc = new XElement("testcase",
                    new XAttribute("name", c.Id),
                    new XAttribute("classname", "vfio-user." + c.Category),
                    new XAttribute("time", Seconds(c.DurationMs)));
                if (c.Outcome == CheckOutcome.Fail)
                {
                    tc.Add(new XElement("failure", new XAttribute("message", c.Reason), "spec: " + c.SpecClause));
                }
                else if (c.Outcome == CheckOutcome.Skip)
                {
                    tc.Add(new XElement("skipped", new XAttribute("message", c.Reason)));
                }
                else
                {
                    tc.Add(new XElement("system-out", c.Reason + " (spec: " + c.SpecClause + ")"));
                }
                suite.Add(tc);
            }
            suites.Add(suite);
        }
        return new XDocument(new XDeclaration("1.0", "utf-8", null), suites).ToString();
    }

    /// <summary>Writes <see cref="ToJson"/> to <paramref name="path"/>.</summary>
    public void WriteJson(string path) => File.WriteAllText(path, ToJson());

    /// <summary>Writes <see cref="ToJUnitXml"/> to <paramref name="path"/>.</summary>
    public void WriteJUnit(string path) => File.WriteAllText(path, ToJUnitXml());

    /// <summary>One line per failed check plus a totals line, for a console.</summary>
    public string Summary()
    {
        var sb = new System.Text.StringBuilder();
        foreach (var f in Failures)
        {
            sb.Append("FAIL ").Append(f.Id).Append(": ").Append(f.Reason).Append(" [").Append(f.SpecClause).AppendLine("]");
        }
        sb.Append(CultureInfo.InvariantCulture, $"{Passed} passed, {Failed} failed, {Skipped} skipped ({Duration.TotalSeconds:F1} s) against {Target}");
        return sb.ToString();
    }

    private static string Seconds(double ms) => (ms / 1000).ToString("F3", CultureInfo.InvariantCulture);

    private sealed record JsonShape(
        [property: JsonPropertyName("target")] string Target,
        [property: JsonPropertyName("started")] DateTimeOffset Started,
        [property: JsonPropertyName("durationMs")] double DurationMs,
        [property: JsonPropertyName("migrationFlags")] ulong? MigrationFlags,
        [property: JsonPropertyName("passed")] int Passed,
        [property: JsonPropertyName("failed")] int Failed,
        [property: JsonPropertyName("skipped")] int Skipped,
        [property: JsonPropertyName("checks")] IReadOnlyList<CheckResult> Checks);
}
