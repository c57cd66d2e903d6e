using System.Diagnostics;

namespace Vmig.TestPeer;

/// <summary>
/// Runs this test peer as a SEPARATE process (`dotnet Vmig.TestPeer.dll ARGS`) for cross-process tests: waits for
/// its "ready" line, talks to it over stdin/stdout, and on dispose sends "quit" and waits (killing only this
/// process if it does not exit). The dll is found next to the calling test assembly (the test projects reference
/// this project, so it is copied to their output directory).
/// </summary>
public sealed class PeerProcess : IDisposable
{
    private readonly Process _process;

    private PeerProcess(Process p) => _process = p;

    /// <summary>The peer's process id (for /proc/PID/status).</summary>
    public int Pid => _process.Id;

    /// <summary>True once the process has exited.</summary>
    public bool HasExited => _process.HasExited;

    /// <summary>Starts `Vmig.TestPeer ARGS` and waits up to <paramref name="readyTimeoutMs"/> for "ready".</summary>
    /// <exception cref="InvalidOperationException">The peer did not become ready (its stderr is in the message).</exception>
    public static PeerProcess Start(IEnumerable<string> args, int readyTimeoutMs = 120_000)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "Vmig.TestPeer.dll");
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        psi.ArgumentList.Add(dll);
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        var p = Process.Start(psi) ?? throw new InvalidOperationException("dotnet did not start");
        var peer = new PeerProcess(p);
        var ready = p.StandardOutput.ReadLineAsync();
        if (!ready.Wait(readyTimeoutMs) || ready.Result != "ready")
        {
            string err = p.HasExited ? p.StandardError.ReadToEnd() : "(still running)";
            peer.Dispose();
            throw new InvalidOperationException($"test peer {string.Join(' ', args)} not ready: {ready.Status} {err}");
        }
        return peer;
    }

    /// <summary>Sends a line on stdin and returns the next stdout line (e.g. "checksum").</summary>
    public string? Ask(string line, int timeoutMs = 30_000)
    {
        _process.StandardInput.WriteLine(line);
        _process.StandardInput.Flush();
        var t = _process.StandardOutput.ReadLineAsync();
        return t.Wait(timeoutMs) ? t.Result : null;
    }

    public void Dispose()
    {
        try
        {
            if (!_process.HasExited)
            {
                _process.StandardInput.WriteLine("quit");
                _process.StandardInput.Flush();
                if (!_process.WaitForExit(10_000))
                {
                    _process.Kill();
                    _process.WaitForExit(5000);
                }
            }
        }
        catch (IOException)
        {
        }
        catch (InvalidOperationException)
        {
        }
        _process.Dispose();
    }
}
