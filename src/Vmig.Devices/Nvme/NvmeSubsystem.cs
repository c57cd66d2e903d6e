using System.Buffers.Binary;
using Vmig.Devices.Pci;
using Vmig.Spec.Nvme;
using Vmig.Spec.Pci;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Nvme;

/// <summary>Fixed identity and resource limits of an <see cref="NvmeSubsystem"/>.</summary>
public sealed record NvmeSubsystemOptions
{
    /// <summary>PCI vendor id, also Identify VID/SSVID (0x1B36 = Red Hat's id used by QEMU's emulated devices; pick yours).</summary>
    public ushort VendorId { get; init; } = 0x1B36;

    /// <summary>PCI device id of the PF; VFs use <see cref="VfDeviceId"/>. Ids no Linux driver lists, so the class code
    /// (01/08/02) binds the nvme driver without quirks: 1B36:0010 is QEMU's NVMe (Linux applies its quirks) and
    /// 1B36:0011 is QEMU's pvpanic, which Linux bound to our VFs instead of nvme (docs/realguest.md).</summary>
    public ushort DeviceId { get; init; } = 0x5A10;

    /// <summary>PCI device id of the VFs (SR-IOV VF Device ID).</summary>
    public ushort VfDeviceId { get; init; } = 0x5A11;

    public string SerialNumber { get; init; } = "VMIG-NVME-0001";
    public string ModelNumber { get; init; } = "vmig emulated NVMe";
    public string FirmwareRevision { get; init; } = "vmig0.1";
    public string Subnqn { get; init; } = "nqn.2026-11.io.vmig:nvme:subsys0";

    /// <summary>Secondary controllers (= SR-IOV TotalVFs), CNTLID 1..N; at most 127 (Secondary Controller List limit).</summary>
    public int MaxSecondaryControllers { get; init; } = 4;

    /// <summary>CAP.MQES (0's based): largest queue is MQES + 1 entries.</summary>
    public ushort Mqes { get; init; } = 1023;

    /// <summary>VQPRT / VIPRT: the primary's private queue and vector resources (admin queue included).</summary>
    public ushort PrimaryQueues { get; init; } = 9;
    public ushort PrimaryVectors { get; init; } = 9;

    /// <summary>VQFRSM / VIFRSM: most flexible queue / vector resources one secondary may get.</summary>
    public ushort MaxQueuesPerSecondary { get; init; } = 9;
    public ushort MaxVectorsPerSecondary { get; init; } = 9;

    /// <summary>
    /// Where Namespace Management (admin 0Dh) creates image files ("nsN.img"); null = creation by admin command is
    /// refused with Invalid Field (namespaces then come only from <see cref="NvmeSubsystem.AddNamespace"/>).
    /// </summary>
    public string? NamespaceDirectory { get; init; }

    /// <summary>VQFRT / VIFRT: flexible resources in total (default: enough for every secondary at its maximum).</summary>
    public uint? FlexibleQueuesTotal { get; init; }
    public uint? FlexibleVectorsTotal { get; init; }
}

/// <summary>
/// An NVM subsystem: namespaces on files, one primary controller (the PF, CNTLID 0) and up to N secondary
/// controllers (the VFs, CNTLID 1..N, VF number = CNTLID). The primary assigns flexible queue/interrupt resources to
/// secondaries, brings them online and offline (Virtualization Management), and attaches namespaces to controllers
/// (Namespace Attachment). The host-side methods here are the same operations those admin commands perform.
/// </summary>
public sealed class NvmeSubsystem : IDisposable
{
    /// <summary>NN: the largest NSID.</summary>
    public const uint MaxNamespaces = 16;

    public const ushort PrimaryCntlid = 0;

    private readonly object _gate = new();
    private readonly Dictionary<uint, NvmeNamespace> _namespaces = [];
    private readonly Dictionary<uint, HashSet<ushort>> _attached = [];
    private readonly Dictionary<ushort, SortedSet<uint>> _changed = [];
    private readonly NvmeController[] _secondaries;
    private int _enabledVfs;

    public NvmeSubsystem(NvmeSubsystemOptions? options = null)
    {
        Options = options ?? new NvmeSubsystemOptions();
        if (Options.MaxSecondaryControllers is < 0 or > SecondaryControllerEntry.MaxListEntries)
        {
            throw new ArgumentOutOfRangeException(nameof(options), "MaxSecondaryControllers must be 0..127");
        }
        Primary = new NvmeController(this, PrimaryCntlid, isPrimary: true, Options.Mqes)
        {
            QueueResources = Options.PrimaryQueues,
            VectorResources = Options.PrimaryVectors,
            Online = true,
        };
        _secondaries = new NvmeController[Options.MaxSecondaryControllers];
        for (int i = 0; i < _secondaries.Length; i++)
        {
            _secondaries[i] = new NvmeController(this, (ushort)(i + 1), isPrimary: false, Options.Mqes);
        }
        Migration = new NvmeMigrationController(this);
        PrimaryFunction = new NvmeFunction(this, Primary, NvmeFunction.Declare(Options, pf: true, Options.PrimaryVectors));
        _vfFunctions = [.. _secondaries.Select(c => new NvmeFunction(this, c, NvmeFunction.Declare(Options, pf: false, Options.MaxVectorsPerSecondary)))];
    }

    private readonly NvmeFunction[] _vfFunctions;

    /// <summary>
    /// The PF as a vfio-user device: serve it on a host-only socket (a host migration agent or management tool uses
    /// it; a VM never gets it). Setting NumVFs and VF Enable in its SR-IOV capability creates the VFs.
    /// </summary>
    public NvmeFunction PrimaryFunction { get; }

    /// <summary>
    /// VF <paramref name="vfIndex"/> (0-based; CNTLID = index + 1) as a vfio-user device to serve on its own socket,
    /// or null while that VF is not enabled (see <see cref="VfEnableChanged"/>).
    /// </summary>
    public NvmeFunction? GetVfFunction(int vfIndex) => vfIndex >= 0 && vfIndex < EnabledVfs ? _vfFunctions[vfIndex] : null;

    internal NvmeFunction? SecondaryFunction(ushort cntlid) => cntlid is >= 1 && cntlid <= _vfFunctions.Length ? _vfFunctions[cntlid - 1] : null;

    /// <summary>
    /// What a host PF driver does to create <paramref name="count"/> VFs: clear VF Enable if set, write NumVFs, set
    /// VF Enable and VF MSE, through the PF's config space (so the SR-IOV capability and <see cref="EnabledVfs"/> agree).
    /// </summary>
    public void EnableVfs(int count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(count, _secondaries.Length);
        Span<byte> b = stackalloc byte[2];
        const int Cap = PciFunction.SriovCapabilityOffset;
        if (PrimaryFunction.SriovSettings.VfEnable)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(b, 0);
            PrimaryFunction.WriteConfig(Cap + PciSriov.Control, b);
        }
        if (count == 0)
        {
            return;
        }
        BinaryPrimitives.WriteUInt16LittleEndian(b, (ushort)count);
        PrimaryFunction.WriteConfig(Cap + PciSriov.NumVfs, b);
        BinaryPrimitives.WriteUInt16LittleEndian(b, PciSriov.ControlVfEnable | PciSriov.ControlVfMemorySpaceEnable);
        PrimaryFunction.WriteConfig(Cap + PciSriov.Control, b);
    }

    public NvmeSubsystemOptions Options { get; }

    /// <summary>The primary controller (PF).</summary>
    public NvmeController Primary { get; }

    /// <summary>Secondary controllers by VF index (0-based): CNTLID = index + 1.</summary>
    public IReadOnlyList<NvmeController> Secondaries => _secondaries;

    /// <summary>The TP4159 command engine of the primary controller.</summary>
    public NvmeMigrationController Migration { get; }

    /// <summary>Raised (outside any lock) when NumVFs/VF Enable changes: the count of enabled VFs.</summary>
    public event Action<int>? VfEnableChanged;

    /// <summary>The number of VFs currently enabled through the PF's SR-IOV capability.</summary>
    public int EnabledVfs => Volatile.Read(ref _enabledVfs);

    /// <summary>The controller with <paramref name="cntlid"/>, or null.</summary>
    public NvmeController? GetController(ushort cntlid) =>
        cntlid == PrimaryCntlid ? Primary : cntlid <= _secondaries.Length ? _secondaries[cntlid - 1] : null;

    /// <summary>The secondary controller with <paramref name="cntlid"/>, or null (the primary is not one).</summary>
    public NvmeController? GetSecondary(ushort cntlid) => cntlid is >= 1 && cntlid <= _secondaries.Length ? _secondaries[cntlid - 1] : null;

    internal UInt128 TotalCapacityBytes
    {
        get
        {
            lock (_gate)
            {
                UInt128 t = 0;
                foreach (var ns in _namespaces.Values)
                {
                    t += (UInt128)ns.BlockCount * (UInt128)(uint)ns.LbaSize;
                }
                return t;
            }
        }
    }

    // ---- namespaces ----

    /// <summary>
    /// Creates namespace <paramref name="nsid"/> (0 = the lowest free NSID) on the raw image <paramref name="path"/> with
    /// <paramref name="lbaSize"/>-byte blocks (512 or 4096). Not attached to any controller yet. Returns the NSID.
    /// </summary>
    /// <exception cref="ArgumentException">Bad LBA size, NSID in use or out of range, file too small.</exception>
    public uint AddNamespace(string path, int lbaSize = 512, uint nsid = 0)
    {
        lock (_gate)
        {
            if (nsid == 0)
            {
                for (uint i = 1; i <= MaxNamespaces; i++)
                {
                    if (!_namespaces.ContainsKey(i))
                    {
                        nsid = i;
                        break;
                    }
                }
            }
            if (nsid == 0 || nsid > MaxNamespaces || _namespaces.ContainsKey(nsid))
            {
                throw new ArgumentException($"NSID {nsid} is in use or outside 1..{MaxNamespaces}", nameof(nsid));
            }
            _namespaces[nsid] = NvmeNamespace.Open(nsid, path, lbaSize);
            _attached[nsid] = [];
            return nsid;
        }
    }

    private readonly HashSet<uint> _createdByCommand = [];

    /// <summary>
    /// Namespace Management create (SEL 0): a new namespace of <paramref name="blocks"/> blocks of
    /// <paramref name="lbaSize"/> bytes on a sparse file in <see cref="NvmeSubsystemOptions.NamespaceDirectory"/>.
    /// Returns the NSID in <paramref name="nsid"/>. Statuses: Invalid Field (no directory, bad size), Invalid Format
    /// (LBA format not offered), Namespace Identifier Unavailable when all NSIDs are in use.
    /// </summary>
    public NvmeStatus CreateNamespace(ulong blocks, int lbaSize, out uint nsid)
    {
        nsid = 0;
        string? dir = Options.NamespaceDirectory;
        if (dir is null || blocks == 0 || blocks > (ulong)long.MaxValue / 4096)
        {
            return NvmeStatus.InvalidField;
        }
        if (!NvmeNamespace.LbaFormats.Any(f => f.DataSize == lbaSize))
        {
            return NvmeStatus.InvalidFormat;
        }
        lock (_gate)
        {
            uint id = 0;
            for (uint i = 1; i <= MaxNamespaces && id == 0; i++)
            {
                id = _namespaces.ContainsKey(i) ? 0 : i;
            }
            if (id == 0)
            {
                return NvmeStatus.NamespaceIdentifierUnavailable;
            }
            string path = Path.Combine(dir, $"ns{id}.img");
            try
            {
                Directory.CreateDirectory(dir);
                using (var f = new FileStream(path, FileMode.CreateNew, FileAccess.Write))
                {
                    f.SetLength((long)blocks * lbaSize);
                }
                _namespaces[id] = NvmeNamespace.Open(id, path, lbaSize);
            }
            catch (IOException)
            {
                return NvmeStatus.InternalError;
            }
            catch (UnauthorizedAccessException)
            {
                return NvmeStatus.InternalError;
            }
            _attached[id] = [];
            _createdByCommand.Add(id);
            nsid = id;
            return NvmeStatus.Success;
        }
    }

    /// <summary>
    /// Namespace Management delete (SEL 1): detaches <paramref name="nsid"/> from every controller and removes it; the
    /// image file is deleted only if Namespace Management created it. Invalid Namespace or Format if unknown.
    /// </summary>
    public NvmeStatus DeleteNamespace(uint nsid)
    {
        ushort[] had;
        lock (_gate)
        {
            if (!_namespaces.TryGetValue(nsid, out _))
            {
                return NvmeStatus.InvalidNamespaceOrFormat;
            }
            had = [.. _attached[nsid]];
        }
        if (had.Length > 0)
        {
            DetachNamespace(nsid, had);
        }
        lock (_gate)
        {
            if (!_namespaces.Remove(nsid, out var ns))
            {
                return NvmeStatus.InvalidNamespaceOrFormat;
            }
            _attached.Remove(nsid);
            ns.Dispose();
            if (_createdByCommand.Remove(nsid))
            {
                File.Delete(ns.Path);
            }
            return NvmeStatus.Success;
        }
    }

    /// <summary>The namespace with <paramref name="nsid"/>, attached or not, or null.</summary>
    public NvmeNamespace? GetNamespace(uint nsid)
    {
        lock (_gate)
        {
            return _namespaces.GetValueOrDefault(nsid);
        }
    }

    internal NvmeNamespace? GetAttachedNamespace(ushort cntlid, uint nsid)
    {
        lock (_gate)
        {
            return _attached.TryGetValue(nsid, out var set) && set.Contains(cntlid) ? _namespaces[nsid] : null;
        }
    }

    internal bool IsShared(uint nsid)
    {
        lock (_gate)
        {
            return _attached.TryGetValue(nsid, out var set) && set.Count > 1;
        }
    }

    /// <summary>All NSIDs, ascending.</summary>
    public IReadOnlyList<uint> NamespaceIds()
    {
        lock (_gate)
        {
            return [.. _namespaces.Keys.Order()];
        }
    }

    /// <summary>NSIDs attached to <paramref name="cntlid"/>, ascending.</summary>
    public IReadOnlyList<uint> AttachedNamespaceIds(ushort cntlid)
    {
        lock (_gate)
        {
            return [.. _attached.Where(kv => kv.Value.Contains(cntlid)).Select(kv => kv.Key).Order()];
        }
    }

    internal void FlushNamespacesOf(ushort cntlid)
    {
        foreach (uint id in AttachedNamespaceIds(cntlid))
        {
            GetNamespace(id)?.Flush();
        }
    }

    /// <summary>
    /// Namespace Attachment, attach (SEL 0): attaches <paramref name="nsid"/> to every controller in
    /// <paramref name="cntlids"/>. All-or-nothing. Statuses: Invalid Namespace or Format (unknown or broadcast NSID),
    /// Controller List Invalid (empty list, unknown or duplicate CNTLID), Namespace Already Attached.
    /// </summary>
    public NvmeStatus AttachNamespace(uint nsid, IReadOnlyList<ushort> cntlids) => ChangeAttachment(nsid, cntlids, attach: true);

    /// <summary>Namespace Attachment, detach (SEL 1). Statuses as for attach, with Namespace Not Attached.</summary>
    public NvmeStatus DetachNamespace(uint nsid, IReadOnlyList<ushort> cntlids) => ChangeAttachment(nsid, cntlids, attach: false);

    private NvmeStatus ChangeAttachment(uint nsid, IReadOnlyList<ushort> cntlids, bool attach)
    {
        ArgumentNullException.ThrowIfNull(cntlids);
        lock (_gate)
        {
            if (!_namespaces.ContainsKey(nsid))
            {
                return NvmeStatus.InvalidNamespaceOrFormat;
            }
            if (cntlids.Count == 0 || cntlids.Distinct().Count() != cntlids.Count || cntlids.Any(id => GetController(id) is null))
            {
                return NvmeStatus.ControllerListInvalid;
            }
            var set = _attached[nsid];
            foreach (ushort id in cntlids)
            {
                if (attach && set.Contains(id))
                {
                    return NvmeStatus.NamespaceAlreadyAttached;
                }
                if (!attach && !set.Contains(id))
                {
                    return NvmeStatus.NamespaceNotAttached;
                }
            }
            foreach (ushort id in cntlids)
            {
                if (attach)
                {
                    set.Add(id);
                }
                else
                {
                    set.Remove(id);
                }
                if (!_changed.TryGetValue(id, out var ch))
                {
                    _changed[id] = ch = [];
                }
                ch.Add(nsid);
            }
        }
        // Outside the subsystem lock: a controller takes its own lock to post the event (lock order controller → subsystem).
        foreach (ushort id in cntlids)
        {
            var ctrl = GetController(id)!;
            if ((ctrl.WithLock(s => s.AsyncEventConfig) & (1u << 8)) != 0)
            {
                ctrl.RaiseEvent(new AsyncEvent(AsyncEventType.Notice, (byte)AsyncEventNoticeInfo.NamespaceAttributeChanged, LogPageId.ChangedNamespaceList));
            }
        }
        return NvmeStatus.Success;
    }

    internal void TakeChangedNamespaces(ushort cntlid, Span<byte> page)
    {
        lock (_gate)
        {
            if (_changed.Remove(cntlid, out var set))
            {
                int i = 0;
                foreach (uint id in set.Take(1024))
                {
                    System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(page[(4 * i++)..], id);
                }
            }
        }
    }

    internal NvmeStatus AttachedControllerList(uint nsid, ushort start, Span<byte> page)
    {
        lock (_gate)
        {
            if (!_attached.TryGetValue(nsid, out var set))
            {
                return NvmeStatus.InvalidNamespaceOrFormat;
            }
            ControllerList.Write(page, [.. set.Where(id => id >= start).Order()]);
            return NvmeStatus.Success;
        }
    }

    internal List<ushort> ControllerIds(ushort start) =>
        [.. Enumerable.Range(0, _secondaries.Length + 1).Select(i => (ushort)i).Where(id => id >= start)];

    // ---- secondary controllers (Virtualization Management) ----

    private uint FlexQueuesTotal => Options.FlexibleQueuesTotal ?? (uint)(Options.MaxQueuesPerSecondary * _secondaries.Length);
    private uint FlexVectorsTotal => Options.FlexibleVectorsTotal ?? (uint)(Options.MaxVectorsPerSecondary * _secondaries.Length);

    /// <summary>Identify CNS 14h.</summary>
    public PrimaryControllerCapabilities PrimaryCapabilities()
    {
        lock (_gate)
        {
            return new PrimaryControllerCapabilities
            {
                Cntlid = PrimaryCntlid,
                Crt = 3,
                Vqfrt = FlexQueuesTotal,
                Vqrfa = (uint)_secondaries.Sum(c => c.QueueResources),
                Vqprt = Options.PrimaryQueues,
                Vqfrsm = Options.MaxQueuesPerSecondary,
                Vqgran = 1,
                Vifrt = FlexVectorsTotal,
                Virfa = (uint)_secondaries.Sum(c => c.VectorResources),
                Viprt = Options.PrimaryVectors,
                Vifrsm = Options.MaxVectorsPerSecondary,
                Vigran = 1,
            };
        }
    }

    /// <summary>Identify CNS 15h entries with SCID ≥ <paramref name="start"/>.</summary>
    public IReadOnlyList<SecondaryControllerEntry> SecondaryList(ushort start = 0)
    {
        lock (_gate)
        {
            return [.. _secondaries.Where(c => c.Cntlid >= start).Select(c =>
                new SecondaryControllerEntry(c.Cntlid, PrimaryCntlid, (byte)(c.Online ? 1 : 0), c.Cntlid, (ushort)c.QueueResources, (ushort)c.VectorResources))];
        }
    }

    /// <summary>
    /// Virtualization Management (admin 1Ch): the action <paramref name="action"/> for resource type <paramref name="rt"/>
    /// on <paramref name="cntlid"/> with <paramref name="count"/> resources. DW0 returns the resources now assigned.
    /// Statuses: Invalid Controller Identifier, Invalid Resource Identifier, Invalid Secondary Controller State
    /// (assigning while online), Invalid Number of Controller Resources (over VQFRSM/VIFRSM or the pool; online with
    /// fewer than 2 VQ or 1 VI), Invalid Field (unknown action).
    /// </summary>
    public NvmeStatus VirtualizationManagement(VirtualizationAction action, VirtualizationResource rt, ushort cntlid, ushort count, out uint dw0)
    {
        dw0 = 0;
        if (action == VirtualizationAction.PrimaryFlexibleAllocation)
        {
            // The primary's queues and vectors are all private (VQPRT/VIPRT); it takes no flexible resources.
            return cntlid != PrimaryCntlid ? NvmeStatus.InvalidControllerIdentifier
                : count != 0 ? NvmeStatus.InvalidNumberOfControllerResources : NvmeStatus.Success;
        }
        var sec = GetSecondary(cntlid);
        if (sec is null)
        {
            return NvmeStatus.InvalidControllerIdentifier;
        }
        switch (action)
        {
            case VirtualizationAction.SecondaryAssign:
                lock (_gate)
                {
                    if (rt is not (VirtualizationResource.Queue or VirtualizationResource.Interrupt))
                    {
                        return NvmeStatus.InvalidResourceIdentifier;
                    }
                    if (sec.Online)
                    {
                        return NvmeStatus.InvalidSecondaryControllerState;
                    }
                    bool q = rt == VirtualizationResource.Queue;
                    uint others = (uint)_secondaries.Where(c => c != sec).Sum(c => q ? c.QueueResources : c.VectorResources);
                    if (count > (q ? Options.MaxQueuesPerSecondary : Options.MaxVectorsPerSecondary)
                        || others + count > (q ? FlexQueuesTotal : FlexVectorsTotal)
                        || (q && count > NvmeControllerState.MaxQueueId + 1))
                    {
                        return NvmeStatus.InvalidNumberOfControllerResources;
                    }
                    if (q)
                    {
                        sec.QueueResources = count;
                    }
                    else
                    {
                        sec.VectorResources = count;
                    }
                    dw0 = count;
                    return NvmeStatus.Success;
                }
            case VirtualizationAction.SecondaryOnline:
                lock (_gate)
                {
                    if (sec.QueueResources < 2 || sec.VectorResources < 1)
                    {
                        return NvmeStatus.InvalidNumberOfControllerResources;
                    }
                    sec.Online = true;
                    return NvmeStatus.Success;
                }
            case VirtualizationAction.SecondaryOffline:
                lock (_gate)
                {
                    sec.Online = false;
                }
                // Going offline resets the secondary (its host loses the controller until it is online and enabled again).
                sec.ForceReset(keepAdminQueueRegisters: true);
                return NvmeStatus.Success;
            default:
                return NvmeStatus.InvalidField;
        }
    }

    /// <summary>
    /// Host-side convenience: gives secondary <paramref name="cntlid"/> <paramref name="queues"/> VQ and
    /// <paramref name="vectors"/> VI resources and sets it online (offline first if needed).
    /// </summary>
    /// <exception cref="InvalidOperationException">A Virtualization Management step failed (message has the status).</exception>
    public void ProvisionSecondary(ushort cntlid, ushort queues, ushort vectors)
    {
        Check(VirtualizationManagement(VirtualizationAction.SecondaryOffline, 0, cntlid, 0, out _));
        Check(VirtualizationManagement(VirtualizationAction.SecondaryAssign, VirtualizationResource.Queue, cntlid, queues, out _));
        Check(VirtualizationManagement(VirtualizationAction.SecondaryAssign, VirtualizationResource.Interrupt, cntlid, vectors, out _));
        Check(VirtualizationManagement(VirtualizationAction.SecondaryOnline, 0, cntlid, 0, out _));

        static void Check(NvmeStatus st)
        {
            if (!st.IsSuccess)
            {
                throw new InvalidOperationException($"Virtualization Management failed: {st}");
            }
        }
    }

    // ---- SR-IOV ----

    /// <summary>
    /// The PF's SR-IOV capability changed VF Enable / NumVFs: <paramref name="numVfs"/> VFs now exist (0 = disabled).
    /// VFs that disappear are reset and their secondaries go offline, as on real hardware when VF Enable clears.
    /// </summary>
    internal void SetEnabledVfs(int numVfs)
    {
        numVfs = Math.Clamp(numVfs, 0, _secondaries.Length);
        int old = Interlocked.Exchange(ref _enabledVfs, numVfs);
        for (int i = numVfs; i < old; i++)
        {
            VirtualizationManagement(VirtualizationAction.SecondaryOffline, 0, _secondaries[i].Cntlid, 0, out _);
            _vfFunctions[i].FunctionLevelReset();
        }
        if (old != numVfs)
        {
            VfEnableChanged?.Invoke(numVfs);
        }
    }

    public void Dispose()
    {
        Primary.Detach();
        Primary.Dispose();
        foreach (var s in _secondaries)
        {
            s.Dispose();
        }
        lock (_gate)
        {
            foreach (var ns in _namespaces.Values)
            {
                ns.Dispose();
            }
            _namespaces.Clear();
        }
    }
}
