using System.Globalization;

namespace Vmig.Guest.Workloads;

/// <summary>fio-style sizes: a decimal or 0x-hex integer with an optional K/M/G/T suffix (powers of 1024, optional "i"/"B").</summary>
public static class SizeParser
{
    /// <summary>Parses <paramref name="text"/>; false on anything else (never throws).</summary>
    public static bool TryParse(string? text, out ulong value)
    {
        value = 0;
        if (string.IsNullOrWhiteSpace(text))
        {
            return false;
        }
        string s = text.Trim();
        ulong mult = 1;
        if (s.EndsWith('B') || s.EndsWith('b'))
        {
            s = s[..^1];
        }
        if (s.EndsWith('i') || s.EndsWith('I'))
        {
            s = s[..^1];
        }
        if (s.Length > 0 && char.IsLetter(s[^1]) && !s.StartsWith("0x", StringComparison.OrdinalIgnoreCase))
        {
            mult = char.ToUpperInvariant(s[^1]) switch
            {
                'K' => 1UL << 10,
                'M' => 1UL << 20,
                'G' => 1UL << 30,
                'T' => 1UL << 40,
                _ => 0,
            };
            if (mult == 0)
            {
                return false;
            }
            s = s[..^1];
        }
        ulong n;
        bool ok = s.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
            ? ulong.TryParse(s.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out n)
            : ulong.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out n);
        if (!ok || (n != 0 && mult > ulong.MaxValue / n))
        {
            return false;
        }
        value = n * mult;
        return true;
    }

    /// <summary>Parses <paramref name="text"/> or throws <see cref="FormatException"/> naming <paramref name="what"/>.</summary>
    public static ulong Parse(string? text, string what) =>
        TryParse(text, out ulong v) ? v : throw new FormatException($"{what}: '{text}' is not a size (e.g. 4k, 16M, 0x1000)");

    /// <summary>Parses "k=v,k=v" argument strings into a dictionary (keys lower-cased). Throws <see cref="FormatException"/> on a malformed pair.</summary>
    public static Dictionary<string, string> ParseKeyValues(string? text)
    {
        var d = new Dictionary<string, string>(StringComparer.Ordinal);
        if (string.IsNullOrWhiteSpace(text))
        {
            return d;
        }
        foreach (string part in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            int eq = part.IndexOf('=', StringComparison.Ordinal);
            if (eq <= 0)
            {
                throw new FormatException($"'{part}' is not key=value");
            }
            d[part[..eq].Trim().ToLowerInvariant()] = part[(eq + 1)..].Trim();
        }
        return d;
    }
}
