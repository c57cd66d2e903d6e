using System.CommandLine;
using Microsoft.Extensions.Logging;

namespace Vmig.Cli;

/// <summary>Shared CLI plumbing: the -v option and the logger factory it configures (logs go to stderr).</summary>
internal static class CliContext
{
    /// <summary>-v / --verbosity: 0 warnings (default), 1 information, 2 debug, 3 trace.</summary>
    public static readonly Option<int> Verbosity = new("--verbosity", "-v")
    {
        Description = "Log level: 0 = warnings, 1 = info, 2 = debug, 3 = trace (logs go to stderr)",
        Recursive = true,
        DefaultValueFactory = _ => 0,
    };

    public static ILoggerFactory CreateLoggers(ParseResult parse)
    {
        var level = parse.GetValue(Verbosity) switch
        {
            <= 0 => LogLevel.Warning,
            1 => LogLevel.Information,
            2 => LogLevel.Debug,
            _ => LogLevel.Trace,
        };
        return LoggerFactory.Create(b => b
            .SetMinimumLevel(level)
            .AddSimpleConsole(o =>
            {
                o.SingleLine = true;
                o.TimestampFormat = "HH:mm:ss.fff ";
            })
            .AddFilter((_, l) => l >= level));
    }

    /// <summary>Runs a command body, turning expected failures into one red line and exit code 1.</summary>
    public static int Run(Func<int> body)
    {
        try
        {
            return body();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidDataException or ArgumentException or FormatException or System.Net.Sockets.SocketException or TimeoutException or InvalidOperationException)
        {
            Spectre.Console.AnsiConsole.MarkupLineInterpolated($"[red]vmig: {e.Message}[/]");
            return 1;
        }
    }
}
