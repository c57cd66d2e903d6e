using System.CommandLine;

namespace Vmig.Cli.Commands;

internal static class VmCommands
{
    public static Command CreateVm() => Pending("vm");
    public static Command CreateMigrate() => Pending("migrate");
    public static Command CreateSnapshot() => Pending("snapshot");
    public static Command CreateStatus() => Pending("status");

    private static Command Pending(string name)
    {
        var cmd = new Command(name, "(being built)");
        cmd.SetAction(_ => { Console.Error.WriteLine("vmig: this command is not in this build yet"); return 2; });
        return cmd;
    }
}
