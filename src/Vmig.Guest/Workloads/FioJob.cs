using System.Globalization;

namespace Vmig.Guest.Workloads;

/// <summary>fio's rw= patterns supported here.</summary>
public enum FioPattern : byte
{
    Read = 1,
    Write = 2,
    RandRead = 3,
    RandWrite = 4,
    RandRw = 5,
}

/// <summary>
/// One fio job after [global] defaults are applied. Units: bytes and milliseconds. Each of
/// <see cref="NumJobs"/> clones gets its own slice of the device, [<c>k × Size</c>, <c>(k+1) × Size</c>), so
/// their verification ledgers never overlap (fio would let them overlap).
/// </summary>
public sealed record FioJob
{
    public string Name { get; init; } = "job";
    public FioPattern Rw { get; init; } = FioPattern.Read;
    public int BlockSize { get; init; } = 4096;
    public int IoDepth { get; init; } = 1;
    /// <summary>Region size per clone (fio size=). 0 = must be set.</summary>
    public ulong Size { get; init; }
    public int NumJobs { get; init; } = 1;
    /// <summary>fio runtime= in ms; 0 = no time limit.</summary>
    public long RuntimeMs { get; init; }
    /// <summary>fio io_size= (bytes to transfer); 0 = <see cref="Size"/>.</summary>
    public ulong IoSize { get; init; }
    /// <summary>verify=crc32c: record every acknowledged write in the ledger and check every read.</summary>
    public bool Verify { get; init; }
    /// <summary>rwmixread= percentage of reads for randrw (default 50).</summary>
    public int RwMixRead { get; init; } = 50;
    /// <summary>time_based: run for the whole runtime even after io_size is done.</summary>
    public bool TimeBased { get; init; }

    /// <summary>Blocks (of <see cref="BlockSize"/>) in the region.</summary>
    public ulong Blocks => Size / (ulong)BlockSize;
}

/// <summary>
/// Parser for a documented subset of fio's job-file syntax: INI sections ([global] + one per job), <c>key=value</c>
/// lines, comments starting with # or ;. Supported keys: rw (read, write, randread, randwrite, randrw), bs, iodepth,
/// size, numjobs, runtime (s, or with ms/s/m suffix), io_size, verify (crc32c only), rwmixread, time_based.
/// Accepted and ignored: name, filename, ioengine, direct, group_reporting. Anything else is an error (so a job file
/// never silently means something other than what fio would do).
/// </summary>
public static class FioJobParser
{
    private static readonly HashSet<string> Ignored = new(StringComparer.Ordinal) { "name", "filename", "ioengine", "direct", "group_reporting" };

    /// <summary>Parses a job file. Throws <see cref="FormatException"/> with the line number on any error.</summary>
    public static IReadOnlyList<FioJob> Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var global = new Dictionary<string, (string Value, int Line)>(StringComparer.Ordinal);
        var jobs = new List<(string Name, Dictionary<string, (string, int)> Keys)>();
        Dictionary<string, (string, int)>? current = null;
        string[] lines = text.Split('\n');
        for (int i = 0; i < lines.Length; i++)
        {
            string line = lines[i].Trim();
            if (line.Length == 0 || line[0] is '#' or ';')
            {
                continue;
            }
            if (line[0] == '[')
            {
                if (line[^1] != ']' || line.Length < 3)
                {
                    throw new FormatException($"line {i + 1}: malformed section header '{line}'");
                }
                string name = line[1..^1].Trim();
                if (name == "global")
                {
                    current = global;
                }
                else
                {
                    current = new Dictionary<string, (string, int)>(StringComparer.Ordinal);
                    jobs.Add((name, current));
                }
                continue;
            }
            if (current is null)
            {
                throw new FormatException($"line {i + 1}: option outside a section");
            }
            int eq = line.IndexOf('=', StringComparison.Ordinal);
            string key = (eq < 0 ? line : line[..eq]).Trim().ToLowerInvariant();
            string value = eq < 0 ? "1" : line[(eq + 1)..].Trim();
            current[key] = (value, i + 1);
        }
        if (jobs.Count == 0)
        {
            throw new FormatException("no job sections");
        }
        return jobs.Select(j => Build(j.Name, global, j.Keys)).ToArray();
    }

    private static FioJob Build(string name, Dictionary<string, (string Value, int Line)> global, Dictionary<string, (string Value, int Line)> own)
    {
        var job = new FioJob { Name = name };
        foreach (var (key, (value, line)) in global.Concat(own))
        {
            string where = $"line {line}: {key}";
            job = key switch
            {
                "rw" or "readwrite" => job with { Rw = ParsePattern(value, where) },
                "bs" => job with { BlockSize = (int)Bounded(SizeParser.Parse(value, where), 512, 1 << 20, where) },
                "iodepth" => job with { IoDepth = (int)Bounded(Int(value, where), 1, 256, where) },
                "size" => job with { Size = SizeParser.Parse(value, where) },
                "numjobs" => job with { NumJobs = (int)Bounded(Int(value, where), 1, 64, where) },
                "runtime" => job with { RuntimeMs = ParseTimeMs(value, where) },
                "io_size" or "io_limit" => job with { IoSize = SizeParser.Parse(value, where) },
                "verify" => value == "crc32c" ? job with { Verify = true } : value is "0" or "none" ? job with { Verify = false }
                    : throw new FormatException($"{where}: only verify=crc32c is supported"),
                "rwmixread" => job with { RwMixRead = (int)Bounded(Int(value, where), 0, 100, where) },
                "time_based" => job with { TimeBased = value != "0" },
                _ when Ignored.Contains(key) => job,
                _ => throw new FormatException($"{where}: unsupported option"),
            };
        }
        if (job.Size == 0 || job.Size % (ulong)job.BlockSize != 0)
        {
            throw new FormatException($"job {name}: size must be set and a multiple of bs ({job.BlockSize})");
        }
        if (job.BlockSize % 512 != 0)
        {
            throw new FormatException($"job {name}: bs must be a multiple of 512");
        }
        return job;
    }

    private static FioPattern ParsePattern(string v, string where) => v switch
    {
        "read" => FioPattern.Read,
        "write" => FioPattern.Write,
        "randread" => FioPattern.RandRead,
        "randwrite" => FioPattern.RandWrite,
        "randrw" => FioPattern.RandRw,
        _ => throw new FormatException($"{where}: rw={v} is not one of read, write, randread, randwrite, randrw"),
    };

    private static ulong Int(string v, string where) =>
        ulong.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out ulong n) ? n : throw new FormatException($"{where}: '{v}' is not a number");

    private static ulong Bounded(ulong v, ulong min, ulong max, string where) =>
        v >= min && v <= max ? v : throw new FormatException($"{where}: {v} is outside [{min}, {max}]");

    private static long ParseTimeMs(string v, string where)
    {
        string s = v.Trim().ToLowerInvariant();
        long mult = 1000;
        if (s.EndsWith("ms", StringComparison.Ordinal))
        {
            mult = 1;
            s = s[..^2];
        }
        else if (s.EndsWith('s'))
        {
            s = s[..^1];
        }
        else if (s.EndsWith('m'))
        {
            mult = 60_000;
            s = s[..^1];
        }
        return (long)Bounded(Int(s, where), 0, 7 * 24 * 3600 * 1000L, where) * mult;
    }
}
