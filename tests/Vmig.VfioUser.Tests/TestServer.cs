using System.Globalization;
using Vmig.Conformance;
using Vmig.Migration;
using Vmig.TestPeer;
using Vmig.VfioUser.Server;

namespace Vmig.VfioUser.Tests;

/// <summary>An in-process <see cref="VfioUserServer"/> serving a <see cref="SampleDevice"/> on a socket in a temp directory.</summary>
internal sealed class TestServer : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-vut-").FullName;

    public TestServer(MigrationFlags flags = MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, VfioUserServerOptions? options = null)
    {
        Device = new SampleDevice(flags);
        Server = new VfioUserServer(Device, System.IO.Path.Combine(_dir, "s.sock"), options);
        Server.Start();
    }

    public SampleDevice Device { get; }

    public VfioUserServer Server { get; }

    public string Path => Server.SocketPath;

    /// <summary>A raw peer that has negotiated VERSION (no vmig extensions), retrying while the server still holds a previous client.</summary>
    public RawPeer Raw(bool negotiate = true)
    {
        for (int i = 0; ; i++)
        {
            var p = RawPeer.Connect(Path);
            if (!negotiate)
            {
                return p;
            }
            var r = p.Negotiate(5000);
            if (r is { IsSuccess: true })
            {
                return p;
            }
            p.Dispose();
            if (i > 200)
            {
                throw new InvalidOperationException("server does not take a new client");
            }
            Thread.Sleep(10);
        }
    }

    public void Dispose()
    {
        Server.Dispose();
        Device.Dispose();
        Directory.Delete(_dir, true);
    }

    /// <summary>Literal bytes written as hex pairs ("01 0a ff").</summary>
    public static byte[] Hex(string hex) =>
        hex.Split([' ', '\n', '\r', '|'], StringSplitOptions.RemoveEmptyEntries).Select(h => byte.Parse(h, NumberStyles.HexNumber, CultureInfo.InvariantCulture)).ToArray();
}
