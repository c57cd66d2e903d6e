using System.Net;
using System.Net.Sockets;

namespace Vmig.Cli.Tests.Faults;

/// <summary>
/// A TCP proxy between the migration source and the target (source → 127.0.0.1:Port → target) that injects one
/// fault when told: <see cref="Cut"/> resets both sides (RST, as a dead link or a killed middlebox),
/// <see cref="CorruptAfter"/> flips one bit of the Nth byte that crosses it afterwards (either direction, whichever
/// carries that byte first), <see cref="Stall"/> stops forwarding in both directions (TCP windows fill; nothing is closed).
/// One pump thread per direction; bytes are forwarded as read, so the fault lands at an exact stream offset.
/// </summary>
internal sealed class FaultProxy : IDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly IPEndPoint _target;
    private readonly List<Socket> _sockets = [];
    private readonly ManualResetEventSlim _flowing = new(true);
    private readonly object _lock = new();
    private long _corruptCountdown = -1;
    private volatile bool _cut;

    public FaultProxy(IPEndPoint target)
    {
        _target = target;
        _listener.Start();
        Port = ((IPEndPoint)_listener.LocalEndpoint).Port;
        new Thread(AcceptLoop) { IsBackground = true, Name = "fault-proxy-accept" }.Start();
    }

    /// <summary>Port the source migrates to.</summary>
    public int Port { get; }

    /// <summary>Bytes forwarded source → target so far.</summary>
    public long BytesToTarget => Interlocked.Read(ref _toTarget);

    /// <summary>Bytes forwarded target → source so far.</summary>
    public long BytesToSource => Interlocked.Read(ref _toSource);

    /// <summary>Stream offset (source → target, or target → source) of the flipped byte; -1 until a bit was flipped.</summary>
    public long CorruptedAt { get; private set; } = -1;

    /// <summary>"s2t" or "t2s": which direction carried the flipped byte.</summary>
    public string? CorruptedDirection { get; private set; }

    private long _toTarget, _toSource;

    /// <summary>Resets every connection now and every one accepted later.</summary>
    public void Cut()
    {
        _cut = true;
        lock (_lock)
        {
            foreach (var s in _sockets)
            {
                Reset(s);
            }
        }
    }

    /// <summary>Flips bit 0x10 of the <paramref name="n"/>-th byte (1-based) forwarded from now on.</summary>
    public void CorruptAfter(long n) => Interlocked.Exchange(ref _corruptCountdown, n);

    /// <summary>Stops forwarding (both directions) until <see cref="Dispose"/>.</summary>
    public void Stall() => _flowing.Reset();

    private static void Reset(Socket s)
    {
        try
        {
            s.LingerState = new LingerOption(true, 0);
            s.Close();
        }
        catch (ObjectDisposedException)
        {
        }
        catch (SocketException)
        {
        }
    }

    private void AcceptLoop()
    {
        while (true)
        {
            Socket client;
            try
            {
                client = _listener.AcceptSocket();
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException or InvalidOperationException)
            {
                return;
            }
            var server = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                server.Connect(_target);
            }
            catch (SocketException)
            {
                Reset(client);
                server.Dispose();
                continue;
            }
            if (_cut)
            {
                // Cut before the first byte: both ends see the connection reset.
                Reset(client);
                Reset(server);
                continue;
            }
            lock (_lock)
            {
                _sockets.Add(client);
                _sockets.Add(server);
            }
            new Thread(() => Pump(client, server, true)) { IsBackground = true, Name = "fault-proxy-s2t" }.Start();
            new Thread(() => Pump(server, client, false)) { IsBackground = true, Name = "fault-proxy-t2s" }.Start();
        }
    }

    private void Pump(Socket from, Socket to, bool toTarget)
    {
        var buf = new byte[16384];
        try
        {
            while (true)
            {
                _flowing.Wait();
                int n = from.Receive(buf);
                if (n == 0)
                {
                    to.Shutdown(SocketShutdown.Send);
                    return;
                }
                _flowing.Wait();
                long before = toTarget ? Interlocked.Add(ref _toTarget, n) - n : Interlocked.Add(ref _toSource, n) - n;
                lock (_lock)
                {
                    long c = _corruptCountdown;
                    if (c > 0)
                    {
                        if (c <= n)
                        {
                            buf[c - 1] ^= 0x10;
                            CorruptedAt = before + c - 1;
                            CorruptedDirection = toTarget ? "s2t" : "t2s";
                            _corruptCountdown = -1;
                        }
                        else
                        {
                            _corruptCountdown = c - n;
                        }
                    }
                }
                to.Send(buf, 0, n, SocketFlags.None);
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            // A dead peer on one side must reach the other as a reset, as it would without a proxy in between:
            // a source busy writing pre-copy never reads, and would otherwise sit out its 60 s send timeout.
            Reset(to);
            Reset(from);
        }
    }

    public void Dispose()
    {
        _listener.Stop();
        Cut();
        _flowing.Set();
        _listener.Dispose();
    }
}
