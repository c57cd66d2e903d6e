using System.Text.Json;

namespace Vmig.Cli.Tests;

public sealed class DemoTests
{
    [Fact]
    public void Short_demo_migrates_there_and_back_and_the_verifier_finds_nothing_lost_or_corrupt()
    {
        string dir = Directory.CreateTempSubdirectory("vmig-demo-test-").FullName;
        string json = Path.Combine(dir, "report.json");
        try
        {
            var (code, output) = VmigProcess.Run(TimeSpan.FromMinutes(4), "demo", "--dir", Path.Combine(dir, "work"), "--json", json,
                "--migrations", "2", "--memory", "64M", "--device-memory", "8M", "--run-seconds", "0.5", "--dirty-rate", "8M", "--downtime-limit", "100");
            Assert.True(code == 0, output + Logs(Path.Combine(dir, "work")));
            using var doc = JsonDocument.Parse(File.ReadAllText(json));
            var root = doc.RootElement;
            Assert.True(root.GetProperty("passed").GetBoolean());
            var migrations = root.GetProperty("migrations");
            Assert.Equal(2, migrations.GetArrayLength());
            foreach (var m in migrations.EnumerateArray())
            {
                Assert.Equal("completed", m.GetProperty("outcome").GetString());
                Assert.True(m.GetProperty("bytes").GetInt64() > 0);
            }
            Assert.Equal("hostB", migrations[0].GetProperty("to").GetString());
            Assert.Equal("hostA", migrations[1].GetProperty("to").GetString());
            var v = root.GetProperty("verifier");
            Assert.True(v.GetProperty("writes").GetInt64() > 0);
            Assert.True(v.GetProperty("verified").GetInt64() > 0);
            Assert.Equal(0, v.GetProperty("lost").GetInt64());
            Assert.Equal(0, v.GetProperty("corrupt").GetInt64());
            Assert.True(File.Exists(root.GetProperty("svg").GetString()));
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    internal static string Logs(string dir) => Directory.Exists(dir)
        ? string.Concat(Directory.GetFiles(dir, "*.log").Select(f => $"\n--- {Path.GetFileName(f)}\n{string.Join('\n', File.ReadAllLines(f).TakeLast(25))}"))
        : "";
}
