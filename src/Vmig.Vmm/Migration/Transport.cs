using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>One migration connection: a socket, its (TLS) stream, and a section reader and writer over it.</summary>
internal sealed class MigrationConnection : IDisposable
{
    private MigrationConnection(Socket socket, System.IO.Stream stream)
    {
        Socket = socket;
        Stream = stream;
        // Separate buffers per direction: one BufferedStream cannot switch between reading and writing on a
        // non-seekable stream.
        Writer = new SectionWriter(new BufferedStream(stream, 64 * 1024));
        Reader = new SectionReader(new BufferedStream(stream, 64 * 1024), Math.Max(RamPages.MaxPayload, 4 << 20));
    }

    public Socket Socket { get; }
    public System.IO.Stream Stream { get; }
    public SectionWriter Writer { get; }
    public SectionReader Reader { get; }

    public static MigrationConnection Connect(EndPoint endPoint, MigrationTlsOptions? tls, TimeSpan replyTimeout, CancellationToken ct)
    {
        var s = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            Tune(s, replyTimeout);
            using (ct.Register(s.Dispose))
            {
                s.Connect(endPoint);
            }
            return Wrap(s, tls, server: false);
        }
        catch
        {
            s.Dispose();
            throw;
        }
    }

    public static async Task<MigrationConnection> AcceptAsync(TcpListener listener, MigrationTlsOptions? tls, TimeSpan receiveTimeout, CancellationToken ct)
    {
        Socket s = await listener.AcceptSocketAsync(ct).ConfigureAwait(false);
        try
        {
            Tune(s, receiveTimeout);
            return Wrap(s, tls, server: true);
        }
        catch
        {
            s.Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        try
        {
            Stream.Dispose();
        }
        catch (IOException)
        {
            // The peer is gone; closing is all that is left.
        }
        Socket.Dispose();
    }

    private static void Tune(Socket s, TimeSpan timeout)
    {
        s.NoDelay = true;
        s.SendBufferSize = 4 << 20;
        s.ReceiveBufferSize = 4 << 20;
        int ms = timeout == Timeout.InfiniteTimeSpan ? 0 : (int)Math.Clamp(timeout.TotalMilliseconds, 1, int.MaxValue);
        s.ReceiveTimeout = ms;
        s.SendTimeout = ms;
    }

    private static MigrationConnection Wrap(Socket s, MigrationTlsOptions? tls, bool server)
    {
        var net = new NetworkStream(s, ownsSocket: false);
        if (tls is null)
        {
            return new MigrationConnection(s, net);
        }
        X509Certificate2? trusted = tls.TrustedCertificatePath is null ? null : X509CertificateLoader.LoadCertificateFromFile(tls.TrustedCertificatePath);
        X509Certificate2? own = tls.CertificatePath is null ? null : LoadOwn(tls);
        var ssl = new SslStream(net, leaveInnerStreamOpen: false, (_, cert, _, errors) => Validate(cert, errors, trusted, server));
        try
        {
            if (server)
            {
                if (own is null)
                {
                    throw new InvalidOperationException("TLS on the target needs a certificate (CertificatePath)");
                }
                ssl.AuthenticateAsServer(new SslServerAuthenticationOptions
                {
                    ServerCertificate = own,
                    ClientCertificateRequired = trusted is not null,
                });
            }
            else
            {
                ssl.AuthenticateAsClient(new SslClientAuthenticationOptions
                {
                    TargetHost = tls.TargetHost,
                    ClientCertificates = own is null ? null : new X509CertificateCollection { own },
                });
            }
            return new MigrationConnection(s, ssl);
        }
        catch
        {
            ssl.Dispose();
            throw;
        }
    }

    private static X509Certificate2 LoadOwn(MigrationTlsOptions tls)
    {
        using var pem = X509Certificate2.CreateFromPemFile(tls.CertificatePath!, tls.KeyPath);
        // Re-import as PKCS#12 so the private key is usable by the TLS stack (an ephemeral PEM key is not on all platforms).
        return X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
    }

    private static bool Validate(X509Certificate? cert, SslPolicyErrors errors, X509Certificate2? trusted, bool server)
    {
        if (trusted is null)
        {
            // Server without a trust anchor does not ask for client certificates; a client trusts the OS store.
            return server || errors == SslPolicyErrors.None;
        }
        if (cert is null || (errors & SslPolicyErrors.RemoteCertificateNameMismatch) != 0 && !server)
        {
            return false;
        }
        using var peer = new X509Certificate2(cert);
        if (peer.RawData.AsSpan().SequenceEqual(trusted.RawData))
        {
            return true;
        }
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.Add(trusted);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        return chain.Build(peer);
    }
}

/// <summary>Caps a send rate: callers report bytes and are put to sleep when ahead of the budget. Thread-safe.</summary>
internal sealed class Throttle
{
    private readonly long _bytesPerSecond;
    private readonly System.Diagnostics.Stopwatch _clock = System.Diagnostics.Stopwatch.StartNew();
    private long _bytes;

    public Throttle(long bytesPerSecond) => _bytesPerSecond = bytesPerSecond;

    public void Consume(long bytes)
    {
        if (_bytesPerSecond <= 0)
        {
            return;
        }
        long total = Interlocked.Add(ref _bytes, bytes);
        double due = (double)total / _bytesPerSecond;
        double ahead = due - _clock.Elapsed.TotalSeconds;
        if (ahead > 0.001)
        {
            Thread.Sleep(TimeSpan.FromSeconds(ahead));
        }
    }
}
