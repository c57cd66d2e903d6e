using Vmig.InProcess;
using System.Buffers.Binary;
using Vmig.Devices.Nvme;
using Vmig.Guest;
using Vmig.Native;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>Guest RAM for tests: one memfd mapped twice, as the guest's <see cref="IGuestMemory"/> and as the device's DMA window at IOVA 0.</summary>
internal sealed class TestGuestRam : IGuestMemory, IDisposable
{
    private readonly UnixFd _fd;
    private readonly Mapping _map;

    public TestGuestRam(long size)
    {
        _fd = MemFd.Create("test-guest-ram", size);
        _map = Mapping.Map(_fd, 0, size);
        Dma = new DmaSpace();
        int rc = Dma.Map(0, (ulong)size, DmaProt.Read | DmaProt.Write, Mapping.Map(_fd, 0, size));
        if (rc != 0)
        {
            throw new InvalidOperationException($"DMA map failed: {rc}");
        }
        Size = (ulong)size;
    }

    public DmaSpace Dma { get; }
    public ulong Size { get; }

    /// <summary>The memfd behind this RAM (to hand to a vfio-user server with DMA_MAP).</summary>
    public UnixFd Fd => _fd;

    public void Read(ulong gpa, Span<byte> destination) => _map.GetSpan(Check(gpa, destination.Length), destination.Length).CopyTo(destination);

    public void Write(ulong gpa, ReadOnlySpan<byte> source)
    {
        source.CopyTo(_map.GetSpan(Check(gpa, source.Length), source.Length));
    }

    public uint ReadUInt32(ulong gpa) => _map.ReadUInt32Volatile(Check(gpa, 4));

    /// <summary>Copies all of <paramref name="other"/>'s RAM into this one (what RAM migration does).</summary>
    public void CopyFrom(TestGuestRam other)
    {
        const int Chunk = 1 << 20;
        for (long o = 0; o < (long)Size; o += Chunk)
        {
            other._map.GetSpan(o, Chunk).CopyTo(_map.GetSpan(o, Chunk));
        }
    }

    public void WriteUInt32(ulong gpa, uint value)
    {
        _map.WriteUInt32Volatile(Check(gpa, 4), value);
    }

    public ulong ReadUInt64(ulong gpa) => (ulong)_map.ReadInt64Volatile(Check(gpa, 8));

    public void WriteUInt64(ulong gpa, ulong value)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(_map.GetSpan(Check(gpa, 8), 8), value);
    }

    private long Check(ulong gpa, int len)
    {
        if (gpa > Size || (ulong)len > Size - gpa)
        {
            throw new ArgumentOutOfRangeException(nameof(gpa), $"0x{gpa:X}+{len} outside guest RAM");
        }
        return (long)gpa;
    }

    public void Dispose()
    {
        Dma.Dispose();
        _map.Dispose();
        _fd.Dispose();
    }
}

/// <summary>A subsystem with one namespace file in a temp dir, and helpers to attach a guest to any controller.</summary>
internal sealed class NvmeRig : IDisposable
{
    public const long NamespaceBytes = 4 << 20;

    private readonly List<IDisposable> _owned = [];

    public NvmeRig(int lbaSize = 512, int vfs = 2, NvmeSubsystemOptions? options = null, string? sharedNamespacePath = null)
    {
        Dir = Directory.CreateTempSubdirectory("vmig-nvme-");
        NamespacePath = sharedNamespacePath ?? Path.Combine(Dir.FullName, "ns1.img");
        if (sharedNamespacePath is null)
        {
            using var f = File.Create(NamespacePath);
            f.SetLength(NamespaceBytes);
        }
        Subsystem = new NvmeSubsystem((options ?? new NvmeSubsystemOptions()) with { MaxSecondaryControllers = vfs });
        Nsid = Subsystem.AddNamespace(NamespacePath, lbaSize);
        LbaSize = lbaSize;
    }

    public DirectoryInfo Dir { get; }
    public string NamespacePath { get; }
    public NvmeSubsystem Subsystem { get; }
    public uint Nsid { get; }
    public int LbaSize { get; }

    /// <summary>Guest RAM + function for a controller (primary if cntlid 0).</summary>
    public (TestGuestRam Ram, NvmeDirectFunction Fn) Connect(ushort cntlid, long ramBytes = 16 << 20, int vectors = 9, Func<IDmaSpace, IDmaSpace>? wrapDma = null)
    {
        var ram = new TestGuestRam(ramBytes);
        var fn = new NvmeDirectFunction(Subsystem.GetController(cntlid)!, wrapDma is null ? ram.Dma : wrapDma(ram.Dma), vectors);
        _owned.Add(fn);
        _owned.Add(ram);
        return (ram, fn);
    }

    /// <summary>Provisions secondary <paramref name="cntlid"/> (queues, vectors, online) and attaches the namespace to it.</summary>
    public void ProvisionVf(ushort cntlid, ushort queues = 5, ushort vectors = 5, bool attach = true)
    {
        if (Subsystem.EnabledVfs < cntlid)
        {
            Subsystem.EnableVfs(Subsystem.Secondaries.Count);
        }
        Subsystem.ProvisionSecondary(cntlid, queues, vectors);
        if (attach)
        {
            Assert.True(Subsystem.AttachNamespace(Nsid, [cntlid]).IsSuccess);
        }
    }

    public byte[] ReadFile(long offset, int count)
    {
        using var f = new FileStream(NamespacePath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        f.Position = offset;
        byte[] b = new byte[count];
        f.ReadExactly(b);
        return b;
    }

    public void Dispose()
    {
        for (int i = _owned.Count - 1; i >= 0; i--)
        {
            _owned[i].Dispose();
        }
        Subsystem.Dispose();
        Dir.Delete(recursive: true);
    }
}

/// <summary>Counts every device access to guest memory (to prove migration never goes through the guest's DMA windows).</summary>
internal sealed class CountingDma(IDmaSpace inner) : IDmaSpace
{
    public long Accesses;

    public bool TryRead(ulong iova, Span<byte> destination)
    {
        Interlocked.Increment(ref Accesses);
        return inner.TryRead(iova, destination);
    }

    public bool TryWrite(ulong iova, ReadOnlySpan<byte> source)
    {
        Interlocked.Increment(ref Accesses);
        return inner.TryWrite(iova, source);
    }

    public bool TryReadUInt32(ulong iova, out uint value)
    {
        Interlocked.Increment(ref Accesses);
        return inner.TryReadUInt32(iova, out value);
    }

    public bool TryWriteUInt32(ulong iova, uint value)
    {
        Interlocked.Increment(ref Accesses);
        return inner.TryWriteUInt32(iova, value);
    }
}

/// <summary>Guest-physical layout the NVMe tests share: the driver's region, a data buffer area, and test data.</summary>
internal static class NvmeTestLayout
{
    /// <summary>Driver region (state block first).</summary>
    public const ulong Region = 0x100000;
    public const ulong RegionSize = 8 << 20;

    /// <summary>Data buffers, above the driver region.</summary>
    public const ulong Buf = 0xA00000;

    /// <summary>Deterministic test data.</summary>
    public static byte[] Pattern(int len, int seed)
    {
        var b = new byte[len];
        new Random(seed).NextBytes(b);
        return b;
    }
}
