using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;

namespace Vmig.Cli.Vm;

/// <summary>Talks to a VM process's control socket (see <see cref="VmControl"/>).</summary>
internal sealed class ControlClient : IDisposable
{
    private readonly Socket _socket;
    private readonly StreamReader _reader;
    private readonly StreamWriter _writer;

    private ControlClient(Socket s)
    {
        _socket = s;
        var stream = new NetworkStream(s, ownsSocket: false);
        _reader = new StreamReader(stream, Encoding.UTF8);
        _writer = new StreamWriter(stream, new UTF8Encoding(false)) { AutoFlush = true, NewLine = "\n" };
    }

    /// <summary>Default directory of VM control sockets.</summary>
    public static string DefaultDir => Path.Combine(Path.GetTempPath(), "vmig", "vms");

    /// <summary>Resolves a VM name or a control socket path.</summary>
    public static string Resolve(string vm) => vm.Contains('/', StringComparison.Ordinal) ? vm : Path.Combine(DefaultDir, vm + ".ctl");

    public static ControlClient Connect(string vm)
    {
        string path = Resolve(vm);
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            s.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException e)
        {
            s.Dispose();
            throw new IOException($"no VM answers at {path}: {e.Message}", e);
        }
        return new ControlClient(s);
    }

    /// <summary>Sends one request; calls <paramref name="onProgress"/> for each progress line; returns the final line.</summary>
    public JsonObject Call(JsonObject request, Action<JsonObject>? onProgress = null)
    {
        _writer.WriteLine(request.ToJsonString());
        while (true)
        {
            string line = _reader.ReadLine() ?? throw new IOException("the VM process closed its control socket");
            var o = JsonNode.Parse(line) as JsonObject ?? throw new IOException("malformed control reply");
            if (o["event"]?.GetValue<string>() == "progress")
            {
                onProgress?.Invoke(o);
                continue;
            }
            return o;
        }
    }

    public void Dispose()
    {
        _reader.Dispose();
        _writer.Dispose();
        _socket.Dispose();
    }
}
