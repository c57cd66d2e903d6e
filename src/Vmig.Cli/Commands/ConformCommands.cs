using System.CommandLine;

namespace Vmig.Cli.Commands;

internal static class ConformCommands
{
    public static Command CreateConform() => Pending("conform");
    public static Command CreateFuzz() => Pending("fuzz");

    private static Command Pending(string name)
    {
        var cmd = new Command(name, "(being built)");
        cmd.SetAction(_ => { Console.Error.WriteLine("vmig: this command is not in this build yet"); return 2; });
        return cmd;
    }
}
