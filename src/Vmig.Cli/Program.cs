using System.CommandLine;
using Vmig.Cli.Commands;

[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]

namespace Vmig.Cli;

internal static class Program
{
    private static int Main(string[] args)
    {
        var root = new RootCommand("vmig: live migration of PCIe device functions over vfio-user");
        root.Options.Add(CliContext.Verbosity);
        root.Subcommands.Add(DemoCommand.Create());
        root.Subcommands.Add(HostCommand.Create());
        root.Subcommands.Add(VmCommands.CreateVm());
        root.Subcommands.Add(VmCommands.CreateMigrate());
        root.Subcommands.Add(VmCommands.CreateSnapshot());
        root.Subcommands.Add(VmCommands.CreateStatus());
        root.Subcommands.Add(VmCommands.CreateResolve());
        root.Subcommands.Add(DeviceCommands.Create());
        root.Subcommands.Add(ConformCommands.CreateConform());
        root.Subcommands.Add(ConformCommands.CreateFuzz());
        root.Subcommands.Add(BenchCommand.Create());
        return root.Parse(args).Invoke();
    }
}
