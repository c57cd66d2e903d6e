using Microsoft.Extensions.Logging;
using Vmig.TestPeer;
using Vmig.VfioUser.Server;
using Xunit.Abstractions;

namespace Vmig.Conformance.Tests;

public sealed class ScratchTests(ITestOutputHelper output)
{
    private sealed class Cap : ILoggerFactory, ILogger
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
    public void Scratch_find_eio()
    {
        var dir = Directory.CreateTempSubdirectory("scr").FullName;
        using var dev = new SampleDevice();
        var cap = new Cap();
        using var server = new VfioUserServer(dev, Path.Combine(dir, "s.sock"), null, cap);
        server.Start();
        var r = ProtocolFuzzer.Run(server.SocketPath, new FuzzOptions { Seed = 20261121, Duration = TimeSpan.FromSeconds(8) });
        output.WriteLine(r.Summary());
        foreach (var l in cap.Lines.Take(5))
        {
            output.WriteLine(l);
        }
        Assert.Empty(cap.Lines);
    }
}
