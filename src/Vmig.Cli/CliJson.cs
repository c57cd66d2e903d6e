using System.Text.Json;
using System.Text.Json.Serialization;

namespace Vmig.Cli;

/// <summary>JSON settings for every report the CLI writes: indented, enums as names, camelCase.</summary>
internal static class CliJson
{
    public static readonly JsonSerializerOptions Options = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        Converters = { new JsonStringEnumConverter() },
    };
}
