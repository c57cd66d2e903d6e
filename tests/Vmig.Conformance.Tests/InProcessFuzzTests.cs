using Microsoft.Extensions.Logging;
using Vmig.TestPeer;
using Vmig.VfioUser.Server;
using Xunit.Abstractions;

namespace Vmig.Conformance.Tests;

/// <summary>Fuzzing an in-process server, where its log is visible: no handler may throw (the SDK would answer EIO).</summary>
public sealed class InProcessFuzzTests(ITestOutputHelper output)
{
    /// <summary>Collects Error-level log lines (the connection logs a handler exception there).</summary>
    private sealed class ErrorLog : ILoggerFactory, ILogger
    {
        public List<string> Lines { get; } = [];
        public void AddProvider(ILoggerProvider provider) { }
        public ILogger CreateLogger(string categoryName) => this;
        public void Dispose() { }
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Error;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (logLevel >= LogLevel.Error)
            {
                lock (Lines)
                {
                    Lines.Add(formatter(state, exception) + " :: " + exception);
                }
            }
        }
    }

    [Fact]
    public void Fuzzing_makes_no_request_handler_throw()
    {
        var dir = Directory.CreateTempSubdirectory("vmig-fuzz-inproc-").FullName;
        using var dev = new SampleDevice();
        var cap = new ErrorLog();
        using var server = new VfioUserServer(dev, Path.Combine(dir, "s.sock"), null, cap);
        server.Start();
        var r = ProtocolFuzzer.Run(server.SocketPath, new FuzzOptions { Seed = 77, Duration = TimeSpan.FromSeconds(5) });
        output.WriteLine(r.Summary());
        foreach (var l in cap.Lines.Take(5))
        {
            output.WriteLine(l);
        }
        Directory.Delete(dir, true);
        Assert.True(r.Success, r.Summary());
        Assert.Empty(cap.Lines);
        Assert.False(r.Errnos.ContainsKey(5), "EIO is the SDK's answer to a handler exception: " + r.Summary());
    }
}
