namespace Vmig.Cli.Tests;

public sealed class CliErrorTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-cli-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private static readonly TimeSpan T = TimeSpan.FromSeconds(60);

    /// <summary>`vmig host --config FILE` with <paramref name="text"/> written to FILE in the test's directory.</summary>
    private (int Code, string Output) RunHost(string file, string text)
    {
        string cfg = Path.Combine(_dir, file);
        File.WriteAllText(cfg, text);
        return VmigProcess.Run(T, "host", "--config", cfg);
    }

    [Fact]
    public void Host_config_with_a_wrong_type_names_file_line_and_field()
    {
        var (code, output) = RunHost("h.json", "{\n  \"name\": \"h\",\n  \"accelerators\": [ { \"name\": \"a\", \"vfs\": \"many\" } ]\n}\n");
        Assert.Equal(1, code);
        Assert.Contains("h.json:3", output, StringComparison.Ordinal);
        Assert.Contains("vfs", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Host_yaml_config_with_an_unknown_field_names_the_line()
    {
        var (code, output) = RunHost("h.yaml", "name: h\naccelerators:\n  - name: a\n    bogus: 1\n");
        Assert.Equal(1, code);
        Assert.Contains("h.yaml:4", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Host_config_value_out_of_range_is_refused_with_the_field()
    {
        var (code, output) = RunHost("h.json", """{ "name": "h", "runtimeDir": "RUN", "accelerators": [ { "name": "a", "vfs": 0 } ] }""".Replace("RUN", Path.Combine(_dir, "run"), StringComparison.Ordinal));
        Assert.Equal(1, code);
        Assert.Contains("accelerators[a].vfs", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Missing_config_file_is_a_clear_error()
    {
        var (code, output) = VmigProcess.Run(T, "host", "--config", Path.Combine(_dir, "nope.json"));
        Assert.Equal(1, code);
        Assert.Contains("nope.json", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Vm_needs_exactly_one_of_config_incoming_restore()
    {
        var (code, output) = VmigProcess.Run(T, "vm");
        Assert.NotEqual(0, code);
        Assert.Contains("exactly one of --config, --incoming or --restore", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Device_migrate_requires_both_sockets()
    {
        var (code, output) = VmigProcess.Run(T, "device", "migrate", "--from", "/tmp/x.sock");
        Assert.NotEqual(0, code);
        Assert.Contains("--to", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Migrate_to_a_vm_that_does_not_exist_says_so()
    {
        var (code, output) = VmigProcess.Run(T, "migrate", Path.Combine(_dir, "none.ctl"), "--to", "tcp:127.0.0.1:1");
        Assert.Equal(1, code);
        Assert.Contains("no VM answers", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Bad_tcp_endpoint_is_refused()
    {
        var (code, output) = VmigProcess.Run(T, "vm", "--incoming", "udp:1.2.3.4", "--device", "a=b");
        Assert.Equal(1, code);
        Assert.Contains("tcp:HOST:PORT", output, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("--mem-prealloc goes with --incoming", "vm", "--config", "x.json", "--mem-prealloc", "1G")]
    [InlineData("not a size", "vm", "--incoming", "tcp:127.0.0.1:1", "--mem-prealloc", "lots")]
    [InlineData("more than the 64 GiB", "vm", "--incoming", "tcp:127.0.0.1:1", "--mem-prealloc", "100T")]
    [InlineData("not a size", "migrate", "x.ctl", "--to", "tcp:127.0.0.1:1", "--max-bandwidth", "fast")]
    public void Bad_sizes_and_misplaced_size_options_are_refused_before_anything_is_allocated(string expected, params string[] args)
    {
        var (code, output) = VmigProcess.Run(T, args);
        Assert.Equal(1, code);
        Assert.Contains(expected, output, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", output, StringComparison.Ordinal); // one red line, no stack trace
    }

    [Fact]
    public void Every_command_has_help_with_an_example()
    {
        foreach (string[] c in new[] { new[] { "demo" }, ["host"], ["vm"], ["migrate"], ["snapshot"], ["status"], ["device", "migrate"], ["device", "info"], ["conform"], ["fuzz"], ["bench"] })
        {
            var (code, output) = VmigProcess.Run(T, [.. c, "--help"]);
            Assert.True(code == 0, string.Join(' ', c) + ": " + output);
            Assert.Contains("Example", output, StringComparison.Ordinal);
        }
    }
}
