using Vmig.VfioUser.Client;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Tests;

/// <summary>
/// Base of tests that serve devices on real vfio-user sockets: a temporary directory for the sockets (and any image
/// files), and everything the test creates through <see cref="Own{T}"/>, disposed in reverse order, then the directory.
/// </summary>
public abstract class SocketTestScope : IDisposable
{
    private readonly List<IDisposable> _owned = [];

    /// <param name="prefix">Prefix of the temporary directory's name (which test class left it, if it is ever left).</param>
    protected SocketTestScope(string prefix) => Dir = Directory.CreateTempSubdirectory(prefix).FullName;

    /// <summary>The temporary directory: sockets are <c>Dir/NAME.sock</c>.</summary>
    protected string Dir { get; }

    /// <summary>Disposes what was owned, last first, then deletes <see cref="Dir"/>.</summary>
    public void Dispose()
    {
        for (int i = _owned.Count - 1; i >= 0; i--)
        {
            _owned[i].Dispose();
        }
        Directory.Delete(Dir, recursive: true);
        GC.SuppressFinalize(this);
    }

    /// <summary>Disposes <paramref name="d"/> when the test ends (after everything owned later).</summary>
    protected T Own<T>(T d) where T : IDisposable
    {
        _owned.Add(d);
        return d;
    }

    /// <summary>Serves <paramref name="device"/> on <c>Dir/<paramref name="name"/>.sock</c> and connects a client to it (both owned).</summary>
    protected VfioUserClient Serve(VfioUserDevice device, string name)
    {
        var s = Own(new VfioUserServer(device, Path.Combine(Dir, name + ".sock")));
        s.Start();
        return Own(VfioUserClient.Connect(s.SocketPath));
    }
}
