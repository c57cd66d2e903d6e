using System.Diagnostics;

namespace Vmig.Cli.Tests;

/// <summary>Runs the real `vmig` (the built vmig.dll next to the tests) as a child process.</summary>
internal static class VmigProcess
{
    public static string Dll => Path.Combine(AppContext.BaseDirectory, "vmig.dll");

    public static Process Start(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Dll);
        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }
        psi.Environment["NO_COLOR"] = "1";
        psi.Environment["COLUMNS"] = "200";
        return Process.Start(psi)!;
    }

    /// <summary>Runs to completion (or kills after <paramref name="timeout"/>); returns exit code and combined output.</summary>
    public static (int Code, string Output) Run(TimeSpan timeout, params string[] args)
    {
        using var p = Start(args);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(true);
            p.WaitForExit();
            return (-1, "TIMEOUT\n" + stdout.Result + stderr.Result);
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }
}

/// <summary>The vmig child processes of one test: started with output drained, killed and disposed at the end.</summary>
internal sealed class VmigProcesses : IDisposable
{
    private readonly List<Process> _procs = [];

    public Process Start(params string[] args)
    {
        var p = VmigProcess.Start(args);
        p.OutputDataReceived += (_, _) => { };
        p.ErrorDataReceived += (_, _) => { };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        _procs.Add(p);
        return p;
    }

    /// <summary>Waits up to 60 s for <paramref name="cond"/>.</summary>
    public static void WaitFor(Func<bool> cond, string what)
    {
        var sw = Stopwatch.StartNew();
        while (!cond())
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), "timed out waiting for " + what);
            Thread.Sleep(50);
        }
    }

    /// <summary>One request on a VM control socket; returns the final reply line.</summary>
    public static System.Text.Json.JsonElement Control(string ctl, string request)
    {
        using var c = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
        c.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(ctl));
        using var s = new System.Net.Sockets.NetworkStream(c);
        using var w = new StreamWriter(s) { AutoFlush = true };
        using var r = new StreamReader(s);
        w.WriteLine(request);
        while (true)
        {
            using var d = System.Text.Json.JsonDocument.Parse(r.ReadLine()!);
            if (d.RootElement.GetProperty("event").GetString() != "progress")
            {
                return d.RootElement.Clone();
            }
        }
    }

    public void Dispose()
    {
        foreach (var p in _procs)
        {
            if (!p.HasExited)
            {
                Vmig.Native.ProcessSignals.Send(p.Id, Vmig.Native.ProcessSignals.SIGTERM);
                if (!p.WaitForExit(5000))
                {
                    p.Kill(true);
                }
            }
            p.Dispose();
        }
    }
}
