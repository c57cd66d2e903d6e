using System.CommandLine;

namespace Vmig.Cli.Commands;

internal static class DemoCommand
{
    public static Command Create()
    {
        var cmd = new Command("Demo".ToLowerInvariant(), "(being built)");
        cmd.SetAction(_ => { Console.Error.WriteLine("vmig: this command is not in this build yet"); return 2; });
        return cmd;
    }
}
