using System.CommandLine;

namespace Vmig.Cli.Commands;

internal static class HostCommand
{
    public static Command Create()
    {
        var cmd = new Command("Host".ToLowerInvariant(), "(being built)");
        cmd.SetAction(_ => { Console.Error.WriteLine("vmig: this command is not in this build yet"); return 2; });
        return cmd;
    }
}
