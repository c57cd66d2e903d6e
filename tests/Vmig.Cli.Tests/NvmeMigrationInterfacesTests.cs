using System.Buffers.Binary;
using System.Text.Json;
using Vmig.Guest.Nvme;
using Vmig.Migration;
using Vmig.Spec;
using Vmig.Spec.Nvme;
using Vmig.Vmm;

namespace Vmig.Cli.Tests;

/// <summary>
/// Issue 5, "both interfaces give byte-identical state", over real sockets to a real `vmig host` process: interface 1
/// is the VF's vfio-user socket (MIG_DEVICE_STATE to STOP_COPY, then MIG_DATA_READ), interface 2 is the PF's host-only
/// socket with our NVMe host driver issuing Migration Send / Migration Receive on the primary's admin queue.
/// </summary>
public sealed class NvmeMigrationInterfacesTests : IDisposable
{
    private const ulong Region = 0x100000;
    private const ulong RegionSize = 8 << 20;
    private const ulong Buf = 0xA00000;

    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-nvme-if-").FullName;
    private readonly VmigProcesses _procs = new();

    public void Dispose()
    {
        _procs.Dispose();
        Directory.Delete(_dir, true);
    }

    /// <summary>
    /// Design: one secondary with a non-trivial history (two I/O queue pairs with advanced heads and phases, a
    /// completion the guest has not reaped, an outstanding Asynchronous Event Request, an error log entry, counters)
    /// is read three times with no guest activity in between:
    /// (A) interface 2 suspends it, gets its state, resumes it;
    /// (B) interface 1 takes it to STOP_COPY (suspend issued by the VF's migration driver) and reads the stream;
    /// (C) interface 2 reads the state of the very suspension interface 1 made.
    /// A = B proves the two interfaces produce the same bytes end to end (suspend and state read through different
    /// paths, different transports, different buffers); B = C proves they read the same suspended controller, not
    /// two look-alikes. The state is then shown to be live: the VF resumes and the guest reaps and continues its I/O.
    /// </summary>
    [Fact]
    public void Vf_socket_and_pf_admin_queue_give_byte_identical_secondary_state()
    {
        string run = Path.Combine(_dir, "run");
        File.WriteAllText(Path.Combine(_dir, "host.json"), JsonSerializer.Serialize(new
        {
            name = "ifs",
            runtimeDir = run,
            nvme = new[] { new { name = "nvme0", vfs = 1, namespaces = new[] { new { path = Path.Combine(_dir, "ns.img"), size = "8M" } } } },
        }));
        _procs.Start("host", "--config", Path.Combine(_dir, "host.json"));
        VmigProcesses.WaitFor(() => File.Exists(Path.Combine(run, "host.json")), "device host");

        // The guest: VF socket, guest RAM handed over with DMA_MAP, MSI-X eventfds.
        using var ram = GuestRam.Create(32 << 20);
        using var vf = VfioUserVmDevice.Connect(Path.Combine(run, "nvme0-vf0.sock"), "nvme0-vf0", "nvme", "");
        vf.DmaMap(0, ram.Size, ram.Fd, 0);
        using var vfFn = new VmPciFunction(vf);
        var guest = NvmeDriver.Initialize(ram, vfFn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2 });
        uint nsid = guest.ActiveNamespaces()[0];
        for (int i = 0; i < 7; i++)
        {
            ram.Write(Buf, Pattern(4096, i));
            Assert.True(guest.Write(1 + (i % 2), nsid, (ulong)(i * 8), 8, 512, Buf).IsSuccess);
        }
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, guest.Read(2, nsid + 7, 0, 1, 512, Buf)); // an error log entry
        ram.Write(Buf + 0x10000, Pattern(4096, 40));
        ushort unreaped = guest.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, nsid, 200, 8), Buf + 0x10000, 4096, tag: 40);
        ushort aer = guest.Submit(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.AsynchronousEventRequest });
        // The device has run the write once its data is in the namespace file (it completes it under the same lock
        // a suspend takes); the AER stays outstanding.
        VmigProcesses.WaitFor(() => ReadFile(Path.Combine(_dir, "ns.img"), 200 * 512, 4096).AsSpan().SequenceEqual(Pattern(4096, 40)), "the unreaped write");

        // The host-side agent: PF socket (host-only), its own host memory, our NVMe driver on the primary.
        using var hostMem = GuestRam.Create(16 << 20);
        using var pf = VfioUserVmDevice.Connect(Path.Combine(run, "nvme0-pf.sock"), "nvme0-pf", "nvme", "");
        pf.DmaMap(0, hostMem.Size, hostMem.Fd, 0);
        using var pfFn = new VmPciFunction(pf);
        var agent = NvmeDriver.Initialize(hostMem, pfFn, Region, RegionSize, new NvmeDriverOptions { Interrupts = false, IoQueues = 1 });
        const ushort Cntlid = 1;
        Assert.Contains(agent.SecondaryControllers(), s => s.Scid == Cntlid);

        // (A) interface 2 only.
        Assert.True(agent.SuspendSecondary(Cntlid).IsSuccess);
        byte[] viaPf = agent.GetSecondaryState(Cntlid, out bool csupA);
        Assert.True(csupA);
        Assert.True(agent.ResumeSecondary(Cntlid).IsSuccess);

        // (B) interface 1 only: the kernel's arc walk RUNNING → RUNNING_P2P → STOP → STOP_COPY, then the stream.
        Assert.Equal(DeviceState.StopCopy, vf.SetState(DeviceState.StopCopy));
        byte[] viaVf = StateRecord(ReadStream(vf));

        // (C) interface 2 reads the suspension interface 1 made.
        byte[] viaPfOfVfSuspend = agent.GetSecondaryState(Cntlid, out bool csupC);
        Assert.True(csupC);
        Assert.Equal(NvmeStatus.ControllerSuspended, agent.SuspendSecondary(Cntlid)); // interface 1's suspend is the primary's

        Assert.Equal(viaPf, viaVf);
        Assert.Equal(viaVf, viaPfOfVfSuspend);

        // Not a trivially equal state: it is suspended and carries both I/O queue pairs.
        Assert.True(ControllerStateHeader.TryRead(viaVf, out var hdr));
        Assert.True(hdr.Suspended);
        Assert.True(NvmeControllerStateV0Header.TryRead(viaVf.AsSpan(ControllerStateHeader.Size), out var v0));
        Assert.Equal((2, 2), (v0.Niosq, v0.Niocq));

        // The suspended secondary is live again after interface 1 resumes it: the guest reaps and goes on.
        Assert.Equal(DeviceState.Running, vf.SetState(DeviceState.Running));
        Assert.Equal(40UL, guest.Wait(1, unreaped, 5000).Tag);
        ram.Write(Buf, Pattern(4096, 77));
        Assert.True(guest.Write(2, nsid, 300, 8, 512, Buf).IsSuccess);
        ram.Write(Buf, new byte[4096]);
        Assert.True(guest.Read(1, nsid, 300, 8, 512, Buf).IsSuccess);
        byte[] back = new byte[4096];
        ram.Read(Buf, back);
        Assert.Equal(Pattern(4096, 77), back);
        Assert.Contains(aer, guest.InFlightCommands(0));
    }

    private static byte[] ReadStream(VfioUserVmDevice vf)
    {
        using var ms = new MemoryStream();
        byte[] chunk = new byte[64 * 1024];
        int n;
        while ((n = vf.ReadMigrationData(chunk)) > 0)
        {
            ms.Write(chunk, 0, n);
            if (n < chunk.Length)
            {
                break;
            }
        }
        return ms.ToArray();
    }

    /// <summary>
    /// The controller-state record (kind 2) of a VF's migration stream: records of {u32 "NVMR", u16 kind, u16 0,
    /// u32 length, u32 CRC32C of the payload} + payload (NvmeVfMigration's documented layout).
    /// </summary>
    private static byte[] StateRecord(byte[] stream)
    {
        byte[]? state = null;
        int at = 0;
        while (at < stream.Length)
        {
            var h = stream.AsSpan(at);
            Assert.True(h.Length >= 16, "stream ends inside a record header");
            Assert.Equal(0x524D564Eu, BinaryPrimitives.ReadUInt32LittleEndian(h));
            ushort kind = BinaryPrimitives.ReadUInt16LittleEndian(h[4..]);
            int len = (int)BinaryPrimitives.ReadUInt32LittleEndian(h[8..]);
            var payload = h.Slice(16, len);
            Assert.Equal(BinaryPrimitives.ReadUInt32LittleEndian(h[12..]), Crc32C.Compute(payload));
            if (kind == 2)
            {
                Assert.Null(state);
                state = payload.ToArray();
            }
            at += 16 + len;
        }
        return state ?? throw new Xunit.Sdk.XunitException("no controller-state record in the VF's stream");
    }

    private static byte[] ReadFile(string path, long offset, int count)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        f.Position = offset;
        byte[] b = new byte[count];
        f.ReadExactly(b);
        return b;
    }

    private static byte[] Pattern(int len, int seed)
    {
        var b = new byte[len];
        new Random(seed).NextBytes(b);
        return b;
    }
}
