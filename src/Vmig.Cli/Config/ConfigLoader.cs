using System.Text.Json;
using System.Text.Json.Serialization;
using YamlDotNet.Core;
using YamlDotNet.Serialization;
using YamlDotNet.Serialization.NamingConventions;

namespace Vmig.Cli.Config;

/// <summary>A config file problem, always naming the file and, where known, the line and field.</summary>
public sealed class ConfigException : IOException
{
    public ConfigException(string file, long? line, string? field, string message)
        : base($"{file}{(line is long l ? $":{l}" : "")}: {(field is null ? "" : $"field '{field}': ")}{message}")
    {
    }
}

/// <summary>Loads JSON (.json) or YAML (.yaml/.yml) config files into the same model, with camelCase keys.</summary>
public static class ConfigLoader
{
    private static readonly JsonSerializerOptions Json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        ReadCommentHandling = JsonCommentHandling.Skip,
        AllowTrailingCommas = true,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        Converters = { new JsonStringEnumConverter() },
    };

    /// <summary>Parses <paramref name="path"/>; throws <see cref="ConfigException"/> with file:line and the field path.</summary>
    public static T Load<T>(string path) where T : class
    {
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (IOException e)
        {
            throw new ConfigException(path, null, null, e.Message);
        }
        string ext = Path.GetExtension(path).ToLowerInvariant();
        if (ext is ".yaml" or ".yml")
        {
            try
            {
                var d = new DeserializerBuilder().WithNamingConvention(CamelCaseNamingConvention.Instance).Build();
                return d.Deserialize<T>(text) ?? throw new ConfigException(path, 1, null, "the file is empty");
            }
            catch (YamlException e)
            {
                throw new ConfigException(path, e.Start.Line, null, (e.InnerException?.Message ?? e.Message).Split('\n')[0]);
            }
        }
        try
        {
            return JsonSerializer.Deserialize<T>(text, Json) ?? throw new ConfigException(path, 1, null, "the file is empty");
        }
        catch (JsonException e)
        {
            throw new ConfigException(path, e.LineNumber + 1, e.Path, e.Message.Split(". Path:")[0]);
        }
    }

    /// <summary>Writes <paramref name="value"/> as JSON, atomically (the demo's configs; the device host's ready file).</summary>
    public static void SaveJson<T>(string path, T value)
    {
        // Written beside and renamed into place: readers treat a file's existence as "ready" (the device host's
        // runtime host.json), and must never see it empty or half-written (rename(2) is atomic within a directory).
        string tmp = path + ".tmp";
        File.WriteAllText(tmp, JsonSerializer.Serialize(value, new JsonSerializerOptions(Json) { WriteIndented = true }));
        File.Move(tmp, path, overwrite: true);
    }
}
