using Vmig.Migration;
using Vmig.VfioUser.Server;

namespace Vmig.TestPeer;

/// <summary>
/// Test peer process. `serve SOCKET [FLAGS]` serves a <see cref="SampleDevice"/> until stdin closes or a line "quit"
/// arrives; prints "ready" once listening. FLAGS is the migration flag value (1, 3, 5 or 7).
/// </summary>
internal static class Program
{
    private static int Main(string[] args)
    {
        if (args.Length >= 2 && args[0] == "serve")
        {
            var flags = args.Length >= 3 ? (MigrationFlags)ulong.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture) : MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;
            using var dev = new SampleDevice(flags);
            using var server = new VfioUserServer(dev, args[1]);
            server.Start();
            Console.Out.WriteLine("ready");
            Console.Out.Flush();
            string? line;
            while ((line = Console.In.ReadLine()) is not null && line != "quit")
            {
                if (line == "checksum")
                {
                    Console.Out.WriteLine(Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(dev.Bar)));
                    Console.Out.Flush();
                }
            }
            return 0;
        }
        if (args.Length >= 3 && args[0] == "serve-broken")
        {
            return BrokenDevice.Serve(args);
        }
        Console.Error.WriteLine("usage: Vmig.TestPeer serve SOCKET [FLAGS] | serve-broken SOCKET MODE [FLAGS]");
        return 2;
    }
}
