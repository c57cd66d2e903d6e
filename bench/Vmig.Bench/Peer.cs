using System.Diagnostics;
using System.Globalization;
using Vmig.Devices.Accelerator;
using Vmig.Devices.Nvme;
using Vmig.VfioUser.Server;

namespace Vmig.Bench;

/// <summary>
/// A server in its own process (the bench exe in "serve" mode): started with a kind, a socket path and a size,
/// it prints "ready" once listening, answers "crc" with the state checksum, and exits on "quit" or stdin EOF.
/// </summary>
internal sealed class PeerProcess : IDisposable
{
    private readonly Process _process;

    private PeerProcess(Process p, string socketPath)
    {
        _process = p;
        SocketPath = socketPath;
    }

    public string SocketPath { get; }

    public int Pid => _process.Id;

    /// <summary>Starts "serve <paramref name="kind"/> <paramref name="socketPath"/> <paramref name="bytes"/>" and waits for "ready".</summary>
    /// <exception cref="InvalidOperationException">The peer exited or did not get ready within 60 s.</exception>
    public static PeerProcess Start(BenchOptions options, string kind, string socketPath, long bytes)
    {
        var psi = new ProcessStartInfo { RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = false, UseShellExecute = false };
        if (options.PeerCommand is { Count: > 0 } cmd)
        {
            psi.FileName = cmd[0];
            foreach (string a in cmd.Skip(1))
            {
                psi.ArgumentList.Add(a);
            }
        }
        else
        {
            string? self = Environment.ProcessPath;
            psi.FileName = self is not null && Path.GetFileNameWithoutExtension(self) == "dotnet" ? self : "dotnet";
            string dll = typeof(PeerProcess).Assembly.Location;
            string rc = Path.ChangeExtension(dll, ".runtimeconfig.json");
            psi.ArgumentList.Add("exec");
            if (!File.Exists(rc))
            {
                // Hosted by another app (e.g. the vmig CLI referencing this assembly): borrow its runtime config.
                string host = Path.ChangeExtension(System.Reflection.Assembly.GetEntryAssembly()?.Location ?? dll, ".runtimeconfig.json");
                psi.ArgumentList.Add("--runtimeconfig");
                psi.ArgumentList.Add(host);
            }
            psi.ArgumentList.Add(dll);
        }
        psi.ArgumentList.Add("serve");
        psi.ArgumentList.Add(kind);
        psi.ArgumentList.Add(socketPath);
        psi.ArgumentList.Add(bytes.ToString(CultureInfo.InvariantCulture));
        var p = Process.Start(psi) ?? throw new InvalidOperationException("could not start peer");
        var peer = new PeerProcess(p, socketPath);
        var ready = p.StandardOutput.ReadLineAsync();
        if (!ready.Wait(60_000) || ready.Result != "ready")
        {
            peer.Dispose();
            throw new InvalidOperationException($"peer '{kind}' did not get ready: {(ready.IsCompleted ? ready.Result : "timeout")}");
        }
        return peer;
    }

    /// <summary>Sends one command line and returns the reply line.</summary>
    public string Ask(string line)
    {
        _process.StandardInput.WriteLine(line);
        _process.StandardInput.Flush();
        return _process.StandardOutput.ReadLine() ?? throw new InvalidOperationException("peer exited");
    }

    public void Dispose()
    {
        try
        {
            _process.StandardInput.WriteLine("quit");
            _process.StandardInput.Close();
        }
        catch (IOException)
        {
        }
        if (!_process.WaitForExit(10_000))
        {
            _process.Kill();
            _process.WaitForExit(5000);
        }
        _process.Dispose();
    }
}

/// <summary>The peer side: "serve state|raw|accel SOCKET BYTES".</summary>
internal static class PeerMain
{
    public static int Run(string[] args)
    {
        if (args.Length < 4)
        {
            Console.Error.WriteLine("usage: Vmig.Bench serve state|raw|accel|nvme SOCKET BYTES");
            return 2;
        }
        string kind = args[1], sock = args[2];
        long bytes = long.Parse(args[3], CultureInfo.InvariantCulture);
        Func<uint> crc;
        var owned = new List<IDisposable>();
        switch (kind)
        {
            case "state":
                {
                    // SOCKET may list several paths separated by ',': one device per path (growth runs with many devices).
                    var devs = new List<BenchStateDevice>();
                    foreach (string path in sock.Split(','))
                    {
                        var dev = new BenchStateDevice(bytes, Seed(path));
                        var server = new VfioUserServer(dev, path);
                        server.Start();
                        owned.Add(dev);
                        owned.Add(server);
                        devs.Add(dev);
                    }
                    crc = () => devs.Aggregate(0u, (c, d) => System.Numerics.BitOperations.Crc32C(c, d.Checksum()));
                    break;
                }
            case "nvme":
            case "nvme-shared":
                {
                    // One NVMe subsystem with a BYTES-sized namespace file (4 KiB LBAs) next to the socket; VF 0 served.
                    // "nvme-shared": the file is the one the downtime scenario created for both hosts (shared storage).
                    string img = kind == "nvme" ? sock + ".img" : Path.Combine(Path.GetDirectoryName(sock)!, DowntimeScenario.NvmeSharedImage);
                    if (kind == "nvme")
                    {
                        using var f = new FileStream(img, FileMode.Create, FileAccess.Write);
                        var chunk = new byte[1 << 20];
                        new Random(11).NextBytes(chunk);
                        for (long o = 0; o < bytes; o += chunk.Length)
                        {
                            f.Write(chunk);
                        }
                    }
                    var sub = new NvmeSubsystem(new NvmeSubsystemOptions { MaxSecondaryControllers = 1, MaxQueuesPerSecondary = 3, MaxVectorsPerSecondary = 2 });
                    uint nsid = sub.AddNamespace(img, 4096);
                    if (!sub.AttachNamespace(nsid, [1]).IsSuccess)
                    {
                        throw new InvalidOperationException("namespace attach failed");
                    }
                    sub.ProvisionSecondary(1, 3, 2);
                    sub.EnableVfs(1);
                    var server = new VfioUserServer(sub.GetVfFunction(0) ?? throw new InvalidOperationException("VF 0 did not come up"), sock);
                    server.Start();
                    owned.Add(sub);
                    owned.Add(server);
                    crc = () => 0;
                    break;
                }
            case "raw":
                {
                    var raw = new RawServer(sock, bytes);
                    owned.Add(raw);
                    crc = () => 0;
                    break;
                }
            case "accel":
                {
                    var pf = new AcceleratorPf(1, AcceleratorProfile.Create((ulong)bytes));
                    pf.EnableVfs(1);
                    var vf = pf.GetVf(0);
                    var server = new VfioUserServer(vf, sock);
                    server.Start();
                    owned.Add(server);
                    owned.Add(pf);
                    crc = () => Crc(vf.Memory);
                    break;
                }
            default:
                Console.Error.WriteLine($"unknown peer kind '{kind}'");
                return 2;
        }
        Console.Out.WriteLine("ready");
        Console.Out.Flush();
        string? line;
        while ((line = Console.In.ReadLine()) is not null && line != "quit")
        {
            if (line == "crc")
            {
                Console.Out.WriteLine(crc().ToString("x8", CultureInfo.InvariantCulture));
                Console.Out.Flush();
            }
        }
        for (int i = owned.Count - 1; i >= 0; i--)
        {
            owned[i].Dispose();
        }
        return 0;
    }

    /// <summary>A stable per-socket seed, so every served device starts with different content.</summary>
    private static ulong Seed(string path) => path.Aggregate(0x5EEDu, (c, ch) => System.Numerics.BitOperations.Crc32C(c, (ushort)ch));

    private static uint Crc(DeviceMemory m)
    {
        uint crc = 0;
        for (long off = 0; off < m.Size; off += 1 << 20)
        {
            var words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(m.GetSpan(off, (int)Math.Min(1 << 20, m.Size - off)));
            foreach (ulong w in words)
            {
                crc = System.Numerics.BitOperations.Crc32C(crc, w);
            }
        }
        return crc;
    }
}
