using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text.Json;

namespace Vmig.Cli.Tests;

/// <summary>`vmig migrate --tls-ca` to `vmig vm --incoming --tls-cert --tls-key`, as processes.</summary>
public sealed class TlsMigrationTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-tls-").FullName;
    private readonly VmigProcesses _procs = new();

    public void Dispose()
    {
        _procs.Dispose();
        Directory.Delete(_dir, true);
    }

    private (string Cert, string Key) SelfSigned(string name)
    {
        using var rsa = RSA.Create(2048);
        var req = new CertificateRequest("CN=localhost", rsa, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        var san = new SubjectAlternativeNameBuilder();
        san.AddDnsName("localhost");
        req.CertificateExtensions.Add(san.Build());
        req.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1")], false));
        using var cert = req.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(30));
        string c = Path.Combine(_dir, name + ".crt"), k = Path.Combine(_dir, name + ".key");
        File.WriteAllText(c, cert.ExportCertificatePem());
        File.WriteAllText(k, rsa.ExportPkcs8PrivateKeyPem());
        return (c, k);
    }

    private string BootSource(string name)
    {
        File.WriteAllText(Path.Combine(_dir, name + ".json"), JsonSerializer.Serialize(new
        {
            name,
            memory = "32M",
            runtimeDir = Path.Combine(_dir, "src"),
            workloads = new[] { new { kind = "memory-dirtier", size = "8M", rate = "4M" } },
        }));
        _procs.Start("vm", "--config", Path.Combine(_dir, name + ".json"));
        string ctl = Path.Combine(_dir, "src", name + ".ctl");
        VmigProcesses.WaitFor(() => File.Exists(ctl), ctl);
        return ctl;
    }

    [Fact]
    public void Migration_over_tls_completes_and_an_untrusted_target_is_refused_with_the_source_still_running()
    {
        var (cert, key) = SelfSigned("target");
        var (otherCa, _) = SelfSigned("other");
        string ctl = BootSource("t0");

        // A source that trusts another CA refuses the target's certificate: nothing moves, the VM keeps running.
        int port = VmigProcess.FreePort();
        _procs.Start("vm", "--incoming", $"tcp:127.0.0.1:{port}", "--name", "t0", "--runtime-dir", Path.Combine(_dir, "dst1"), "--tls-cert", cert, "--tls-key", key);
        Thread.Sleep(2000);
        var (bad, badOut) = VmigProcess.Run(TimeSpan.FromMinutes(2), "migrate", ctl, "--to", $"tcp:127.0.0.1:{port}", "--tls-ca", otherCa);
        Assert.True(bad != 0, badOut);
        Assert.Equal("Running", VmigProcesses.Control(ctl, "{\"op\":\"status\"}").GetProperty("result").GetProperty("state").GetString());

        port = VmigProcess.FreePort();
        _procs.Start("vm", "--incoming", $"tcp:127.0.0.1:{port}", "--name", "t0", "--runtime-dir", Path.Combine(_dir, "dst2"), "--tls-cert", cert, "--tls-key", key);
        Thread.Sleep(2000);
        string json = Path.Combine(_dir, "report.json");
        var (code, output) = VmigProcess.Run(TimeSpan.FromMinutes(2), "migrate", ctl, "--to", $"tcp:127.0.0.1:{port}", "--tls-ca", cert, "--json", json);
        Assert.True(code == 0, output);
        using var r = JsonDocument.Parse(File.ReadAllText(json));
        Assert.Equal("completed", r.RootElement.GetProperty("Outcome").GetString());
        Assert.True(r.RootElement.GetProperty("Tls").GetBoolean());
        string ctl2 = Path.Combine(_dir, "dst2", "t0.ctl");
        VmigProcesses.WaitFor(() => File.Exists(ctl2), ctl2);
        var v = VmigProcesses.Control(ctl2, "{\"op\":\"verify\"}").GetProperty("result");
        Assert.Equal(0, v.GetProperty("corrupt").GetInt64());
    }
}
