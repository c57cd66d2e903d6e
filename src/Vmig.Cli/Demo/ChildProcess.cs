using System.Diagnostics;

namespace Vmig.Cli.Demo;

/// <summary>A `vmig` child process (same binary) whose stdout and stderr go to a log file.</summary>
internal sealed class ChildProcess : IDisposable
{
    private readonly Process _p;
    private readonly StreamWriter _log;
    private readonly string _logPath;

    private ChildProcess(Process p, StreamWriter log, string logPath)
    {
        _p = p;
        _log = log;
        _logPath = logPath;
    }

    /// <summary>Starts `vmig ARGS` (via the dotnet host when we run as a dll).</summary>
    public static ChildProcess Start(string logPath, params string[] args)
    {
        string self = Environment.ProcessPath ?? "dotnet";
        var psi = new ProcessStartInfo(self) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(self) == "dotnet")
        {
            psi.ArgumentList.Add(typeof(ChildProcess).Assembly.Location);
        }
        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }
        psi.Environment["NO_COLOR"] = "1";
        var log = new StreamWriter(logPath, append: true) { AutoFlush = true };
        var p = new Process { StartInfo = psi };
        var lockObj = new object();
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) { lock (lockObj) { log.WriteLine(e.Data); } } };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) { lock (lockObj) { log.WriteLine(e.Data); } } };
        p.Start();
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        return new ChildProcess(p, log, logPath);
    }

    /// <summary>Waits until <paramref name="ready"/> holds, failing early with the log tail if the process exits.</summary>
    public void WaitUntil(Func<bool> ready, TimeSpan timeout, string what)
    {
        var sw = Stopwatch.StartNew();
        while (!ready())
        {
            if (_p.HasExited)
            {
                throw new IOException($"{what}: the process exited with {_p.ExitCode}:\n{Tail()}");
            }
            if (sw.Elapsed > timeout)
            {
                throw new TimeoutException($"{what}: not ready after {timeout.TotalSeconds:F0} s:\n{Tail()}");
            }
            Thread.Sleep(50);
        }
    }

    public bool LogContains(string text)
    {
        try
        {
            using var f = new FileStream(_logPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            using var r = new StreamReader(f);
            return r.ReadToEnd().Contains(text, StringComparison.Ordinal);
        }
        catch (IOException)
        {
            return false;
        }
    }

    private string Tail(int lines = 15)
    {
        try
        {
            using var f = new FileStream(_logPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            using var r = new StreamReader(f);
            var all = r.ReadToEnd().Split('\n');
            return string.Join('\n', all.TakeLast(lines));
        }
        catch (IOException e)
        {
            return e.Message;
        }
    }

    /// <summary>SIGTERM, then SIGKILL after <paramref name="grace"/>.</summary>
    public void Stop(TimeSpan grace)
    {
        if (_p.HasExited)
        {
            return;
        }
        _ = Vmig.Native.ProcessSignals.Send(_p.Id, Vmig.Native.ProcessSignals.SIGTERM);
        if (!_p.WaitForExit(grace))
        {
            _p.Kill(true);
            _p.WaitForExit();
        }
    }

    public bool WaitForExit(TimeSpan t) => _p.WaitForExit(t);

    public void Dispose()
    {
        Stop(TimeSpan.FromSeconds(5));
        _p.Dispose();
        _log.Dispose();
    }
}
