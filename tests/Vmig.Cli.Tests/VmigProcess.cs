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
