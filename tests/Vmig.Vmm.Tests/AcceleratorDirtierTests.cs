using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Vmig.Guest;
using Vmig.Guest.Workloads;
using Vmig.Vmm.Migration;

namespace Vmig.Vmm.Tests;

/// <summary>The "accel-dirtier" guest workload (src/Vmig.Guest/Workloads/AcceleratorDirtier.cs) on a real accelerator VF over vfio-user.</summary>
public sealed class AcceleratorDirtierTests : IDisposable
{
    private const string Profile = "accel mem=1M ring=64";
    private const ulong Chunk = 64 << 10;
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-vmm-ad").FullName;
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);

    public AcceleratorDirtierTests() => _listener.Start();

    public void Dispose()
    {
        _listener.Dispose();
        Directory.Delete(_dir, true);
    }

    private static VmConfig Guest(string args = "") => new()
    {
        Name = "accel-dirtier-vm",
        MemorySize = 8 << 20,
        Vcpus = args.Length == 0 ? [] : [new VcpuConfig(AcceleratorDirtier.Kind, args)],
        Programs = new GuestProgramRegistry().Add(AcceleratorDirtier.Factory),
        SetupGuest = GuestSetup.Accelerator("accel0", "accel0", 0x100000),
    };

    [Fact]
    public async Task Dirtier_FillsEveryChunkWithItsPattern_StaysUnderItsRate_AndContinuesAfterMigration()
    {
        using var hostA = TestVms.Accelerator(Path.Combine(_dir, "a.sock"));
        using var hostB = TestVms.Accelerator(Path.Combine(_dir, "b.sock"));
        var sw = Stopwatch.StartNew();
        var vm = Vm.Create(Guest($"device=accel0,size=1M,rate=8,chunk={Chunk}"), [VfioUserVmDevice.Connect(hostA.SocketPath, "accel0", "accel", Profile)]);
        try
        {
            vm.Start();
            // More than one sweep of the 1 MiB (16 chunks): every chunk has been filled at least once.
            TestVms.WaitUntil(() => AcceleratorDirtier.Counters(vm.Vcpus[0].Registers).Bytes >= (20 * Chunk), 20_000);
            vm.Pause();
            double seconds = sw.Elapsed.TotalSeconds;
            var (bytes, ok, bad) = AcceleratorDirtier.Counters(vm.Vcpus[0].Registers);
            Assert.Equal(0UL, bad);
            Assert.Equal(bytes, ok * Chunk);
            // The pacing is an upper bound (never faster than RATE, plus the first chunk), whatever the machine's load.
            Assert.True(bytes <= (ulong)(seconds * 8 * TestVms.MiB) + Chunk, $"{bytes} bytes in {seconds:F2} s at 8 MiB/s");
            // Job j (0-based) filled chunk j mod 16 with PatternFor(j × CHUNK): the last 16 jobs cover every chunk.
            // Pausing stops the vCPU, not the device: the job it submitted last (number `jobs`, not yet counted) may
            // still be filling chunk jobs mod 16, the oldest one checked, so either end of that chunk may already
            // hold the newer pattern (seen once in a loaded test run).
            var mem = hostA.Pf.GetVf(0).Memory;
            ulong jobs = bytes / Chunk;
            ulong inFlight = AcceleratorDirtier.PatternFor(jobs * Chunk, Chunk);
            for (ulong j = jobs - 16; j < jobs; j++)
            {
                ulong pattern = AcceleratorDirtier.PatternFor(j * Chunk, Chunk);
                var span = mem.GetSpan((long)((j % 16) * Chunk), (int)Chunk);
                foreach (ulong seen in new[] { BinaryPrimitives.ReadUInt64LittleEndian(span), BinaryPrimitives.ReadUInt64LittleEndian(span[^8..]) })
                {
                    Assert.True(seen == pattern || (j == jobs - 16 && seen == inFlight), $"chunk {j % 16}: 0x{seen:X16}, job {j} wrote 0x{pattern:X16}");
                }
            }
            vm.Resume();

            var target = MigrationTarget.AcceptAsync(_listener, Guest(), d => VfioUserVmDevice.Connect(hostB.SocketPath, d.Name, "accel", Profile));
            var report = await MigrationSource.RunAsync(vm, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 4 });
            Assert.Equal("completed", report.Outcome);
            var next = await target;
            var before = AcceleratorDirtier.Counters(vm.Vcpus[0].Registers);
            vm.Dispose();
            vm = next;
            TestVms.WaitUntil(() => AcceleratorDirtier.Counters(vm.Vcpus[0].Registers).Ok > before.Ok + 3, 20_000);
            vm.Pause();
            Assert.Null(vm.Vcpus[0].Fault);
            Assert.Equal(0UL, AcceleratorDirtier.Counters(vm.Vcpus[0].Registers).Bad);
        }
        finally
        {
            vm.Dispose();
        }
    }

    [Theory]
    [InlineData("size=1M,rate=8")]                      // no device
    [InlineData("device=accel0,size=1M,rate=0")]        // no rate
    [InlineData("device=accel0,size=96K,rate=8")]       // smaller than the default 1 MiB chunk
    [InlineData("device=accel0,size=2M,rate=8")]        // beyond the 1 MiB device memory
    [InlineData("device=accel0,size=1M,rate=8,chunk=12")] // chunk not a multiple of 8
    public void Dirtier_RejectsBadArguments(string args)
    {
        using var host = TestVms.Accelerator(Path.Combine(_dir, "c.sock"));
        var e = Record.Exception(() => Vm.Create(Guest(args), [VfioUserVmDevice.Connect(host.SocketPath, "accel0", "accel", Profile)]).Dispose());
        Assert.True(e is FormatException || e?.InnerException is FormatException, e?.ToString() ?? "no exception");
    }
}
