using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Vmig.Native;
using Vmig.VfioUser.Internal;
using Vmig.VfioUser.Transport;

namespace Vmig.VfioUser.Server;

/// <summary>Server limits and defaults (advertised in the VERSION reply).</summary>
public sealed record VfioUserServerOptions
{
    /// <summary>max_msg_fds we accept per message.</summary>
    public int MaxMsgFds { get; init; } = 16;
    /// <summary>max_data_xfer_size: the largest count in REGION/DMA/MIG_DATA transfers, in bytes.</summary>
    public uint MaxDataXferSize { get; init; } = 1 << 20;
    /// <summary>max_dma_maps: windows at once.</summary>
    public uint MaxDmaMaps { get; init; } = 65535;
    /// <summary>Offer the vmig extensions (MIG_DATA_SIZE, pre-copy info, P2P) to clients that ask for them.</summary>
    public bool OfferExtensions { get; init; } = true;
    /// <summary>Offer twin-socket mode to clients that ask (server→client DMA messages on their own socket).</summary>
    public bool OfferTwinSocket { get; init; } = true;
}

/// <summary>
/// Serves one <see cref="VfioUserDevice"/> on a UNIX socket path. One client at a time: a second connection
/// is accepted and closed at once (the spec's "the server takes the first client"). A client disconnect unmaps
/// its DMA windows and closes its eventfds; the device keeps its state and the server waits for the next client.
/// Many servers (devices) can live in one process.
/// </summary>
public sealed class VfioUserServer : IDisposable
{
    private readonly VfioUserDevice _device;
    private readonly ILoggerFactory _loggers;
    private readonly ILogger _logger;
    private readonly object _gate = new();
    // Held across a session's detach and a new session's attach, never inside _gate.
    private readonly object _lifecycle = new();
    private Socket? _listener;
    private Thread? _acceptThread;
    private ServerSession? _session;
    private int _disposed;

    public VfioUserServer(VfioUserDevice device, string socketPath, VfioUserServerOptions? options = null, ILoggerFactory? loggers = null)
    {
        _device = device ?? throw new ArgumentNullException(nameof(device));
        SocketPath = socketPath ?? throw new ArgumentNullException(nameof(socketPath));
        Options = options ?? new VfioUserServerOptions();
        _loggers = loggers ?? NullLoggerFactory.Instance;
        _logger = _loggers.CreateLogger("vfio-user.server");
        Migration = new MigrationEndpoint(device);
    }

    public string SocketPath { get; }
    public VfioUserServerOptions Options { get; }
    public VfioUserDevice Device => _device;

    /// <summary>The device's migration state machine as the server drives it (also after a client leaves).</summary>
    internal MigrationEndpoint Migration { get; }

    /// <summary>True while a client is attached.</summary>
    public bool HasClient
    {
        get
        {
            lock (_gate)
            {
                return _session is not null;
            }
        }
    }

    /// <summary>Raised when a client attaches or detaches (true = attached).</summary>
    public event Action<bool>? ClientChanged;

    /// <summary>Binds and listens (an existing socket file at the path is replaced) and starts accepting.</summary>
    /// <exception cref="SocketException">Bind or listen failed.</exception>
    public void Start()
    {
        if (File.Exists(SocketPath))
        {
            File.Delete(SocketPath);
        }
        var l = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        l.Bind(new UnixDomainSocketEndPoint(SocketPath));
        l.Listen(4);
        _listener = l;
        _acceptThread = new Thread(AcceptLoop) { IsBackground = true, Name = "vfio-user accept " + Path.GetFileName(SocketPath) };
        _acceptThread.Start();
    }

    private void AcceptLoop()
    {
        while (Volatile.Read(ref _disposed) == 0)
        {
            Socket s;
            try
            {
                // Synchronous accept keeps the accepted socket blocking for our raw sendmsg/recvmsg.
                s = _listener!.Accept();
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                return;
            }
            // A client that reconnects at once must not find its attach undone by the previous session's detach
            // still running (seen in the bench: admin commands then timed out): wait for that detach first.
            lock (_lifecycle)
            lock (_gate)
            {
                if (_session is not null || Volatile.Read(ref _disposed) != 0)
                {
                    _logger.LogWarning("{Path}: refusing a second client", SocketPath);
                    s.Dispose();
                    continue;
                }
                var conn = new VfioUserConnection(new FdSocket(s), Path.GetFileName(SocketPath), _loggers.CreateLogger("vfio-user.connection"));
                var session = new ServerSession(this, conn, _loggers.CreateLogger("vfio-user.session"));
                _session = session;
                conn.Closed += _ => OnSessionEnded(session);
                session.Start();
            }
            ClientChanged?.Invoke(true);
        }
    }

    private void OnSessionEnded(ServerSession session)
    {
        lock (_lifecycle)
        {
            lock (_gate)
            {
                if (_session != session)
                {
                    return;
                }
            }
            // The slot is freed only after the device has been detached, so the next client attaches to a device
            // that this session no longer touches.
            session.Detach();
            lock (_gate)
            {
                _session = null;
            }
        }
        ClientChanged?.Invoke(false);
    }

    /// <summary>Stops accepting, disconnects the client, removes the socket file. Idempotent.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        _listener?.Dispose();
        ServerSession? s;
        lock (_gate)
        {
            s = _session;
        }
        s?.Connection.Dispose();
        _acceptThread?.Join(2000);
        try
        {
            File.Delete(SocketPath);
        }
        catch (IOException)
        {
        }
    }
}
