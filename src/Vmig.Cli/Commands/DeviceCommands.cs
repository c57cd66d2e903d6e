using System.CommandLine;
using System.Text.Json;
using Spectre.Console;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;

namespace Vmig.Cli.Commands;

/// <summary>`vmig device info SOCK` and `vmig device migrate --from SOCK --to SOCK`.</summary>
internal static class DeviceCommands
{
    public static Command Create()
    {
        var device = new Command("device", "Inspect or migrate one vfio-user device (ours or any spec-conformant server)");
        device.Subcommands.Add(CreateInfo());
        device.Subcommands.Add(CreateMigrate());
        return device;
    }

    private static Command CreateInfo()
    {
        var sock = new Argument<string>("socket") { Description = "vfio-user server socket path" };
        var cmd = new Command("info", "Negotiate with a vfio-user server and print its regions, IRQs and migration support.\nExample: vmig device info /run/vmig/hostA/nvme0-vf0.sock") { sock };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            using var loggers = CliContext.CreateLoggers(p);
            using var c = VfioUserClient.Connect(p.GetValue(sock)!, new VfioUserClientOptions { Loggers = loggers });
            var info = c.GetDeviceInfo();
            AnsiConsole.MarkupLineInterpolated($"device flags [bold]{info.Flags}[/], {info.NumRegions} regions, {info.NumIrqs} IRQ types; protocol 0.{c.Minor}");
            var t = new Table().AddColumns("region", "size", "flags", "sparse mmap");
            for (int i = 0; i < info.NumRegions; i++)
            {
                var r = c.GetRegionInfo(i);
                r.MmapFd?.Dispose();
                if (r.Size != 0)
                {
                    t.AddRow(RegionName(i), $"0x{r.Size:x}", r.Flags.ToString(), Markup.Escape(string.Join(" ", r.SparseAreas.Select(a => $"[0x{a.Offset:x},+0x{a.Size:x})"))));
                }
            }
            AnsiConsole.Write(t);
            var irqs = new Table().AddColumns("irq", "count", "flags");
            for (int i = 0; i < info.NumIrqs; i++)
            {
                var q = c.GetIrqInfo(i);
                if (q.Count != 0)
                {
                    irqs.AddRow(IrqName(i), q.Count.ToString(System.Globalization.CultureInfo.InvariantCulture), q.Flags.ToString());
                }
            }
            AnsiConsole.Write(irqs);
            try
            {
                var flags = c.GetMigrationFlags();
                AnsiConsole.MarkupLineInterpolated($"migration: [bold]{flags}[/], state {c.GetState()}; extensions: mig_data_size={c.SupportsStopCopySize} precopy_info={c.SupportsPrecopyInfo} p2p={c.SupportsP2P}");
            }
            catch (VfioUser.VfioUserException e)
            {
                AnsiConsole.MarkupLineInterpolated($"migration: not supported (errno {e.Errno})");
            }
            return 0;
        }));
        return cmd;
    }

    private static Command CreateMigrate()
    {
        var from = new Option<string>("--from") { Description = "source vfio-user socket", Required = true };
        var to = new Option<string>("--to") { Description = "target vfio-user socket (a device of the same kind and profile)", Required = true };
        var noPre = new Option<bool>("--no-precopy") { Description = "go straight to STOP_COPY even if the source offers PRE_COPY" };
        var rounds = new Option<int>("--max-rounds") { Description = "most pre-copy rounds", DefaultValueFactory = _ => 8 };
        var json = new Option<string?>("--json") { Description = "write the report as JSON to this file" };
        var cmd = new Command("migrate", "Move one device's state between two vfio-user servers: target → RESUMING, source PRE_COPY rounds (if offered), STOP_COPY to the end, target → RUNNING; the source is left in STOP.\nExample: vmig device migrate --from /tmp/a.sock --to /tmp/b.sock")
        {
            from, to, noPre, rounds, json,
        };
        cmd.SetAction(p => CliContext.Run(() =>
        {
            using var loggers = CliContext.CreateLoggers(p);
            var o = new VfioUserClientOptions { Loggers = loggers };
            using var src = VfioUserClient.Connect(p.GetValue(from)!, o);
            using var dst = VfioUserClient.Connect(p.GetValue(to)!, o);
            DeviceMigrationReport? report = null;
            AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new TransferSpeedColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask("migrating", maxValue: 1);
                    var prog = new Progress<DeviceMigrationProgress>(s =>
                    {
                        task.Description = $"{s.Phase} round {s.Round}";
                        if (s.StopCopyEstimate > 0)
                        {
                            task.MaxValue = Math.Max(task.MaxValue, s.BytesMoved + (double)(s.Remaining is { } r ? r.InitialBytes + r.DirtyBytes : 0) + 1);
                        }
                        task.Value = s.BytesMoved;
                    });
                    report = DeviceMigrator.Migrate(src, dst, new DeviceMigrationOptions { NoPreCopy = p.GetValue(noPre), MaxPreCopyRounds = p.GetValue(rounds) }, prog);
                    task.Value = task.MaxValue;
                });
            var t = new Table().AddColumns("source flags", "target flags", "pre-copy rounds", "pre-copy bytes", "stop-copy bytes", "total", "device downtime");
            t.AddRow(report!.SourceFlags.ToString(), report.TargetFlags.ToString(), report.PreCopyRounds.ToString(System.Globalization.CultureInfo.InvariantCulture),
                report.PreCopyBytes.ToString("N0", System.Globalization.CultureInfo.InvariantCulture), report.StopCopyBytes.ToString("N0", System.Globalization.CultureInfo.InvariantCulture),
                $"{report.Total.TotalMilliseconds:F1} ms", $"{report.Downtime.TotalMilliseconds:F1} ms");
            AnsiConsole.Write(t);
            if (p.GetValue(json) is string path)
            {
                File.WriteAllText(path, JsonSerializer.Serialize(report, CliJson.Options));
            }
            return 0;
        }));
        return cmd;
    }

    internal static string RegionName(int i) => i switch
    {
        <= VfioPci.Bar5RegionIndex => $"BAR{i}",
        VfioPci.RomRegionIndex => "ROM",
        VfioPci.ConfigRegionIndex => "config",
        VfioPci.VgaRegionIndex => "VGA",
        _ => $"region {i}",
    };

    internal static string IrqName(int i) => i switch
    {
        VfioPci.IntxIrqIndex => "INTx",
        VfioPci.MsiIrqIndex => "MSI",
        VfioPci.MsixIrqIndex => "MSI-X",
        VfioPci.ErrIrqIndex => "ERR",
        VfioPci.ReqIrqIndex => "REQ",
        _ => $"irq {i}",
    };
}
