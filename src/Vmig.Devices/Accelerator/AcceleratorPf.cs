using System.Buffers.Binary;
using Vmig.Devices.Pci;
using Vmig.Migration;
using Vmig.Spec.Accelerator;
using Vmig.Spec.Pci;
using Vmig.VfioUser.Protocol;

namespace Vmig.Devices.Accelerator;

/// <summary>
/// The accelerator's PF: the controlling function. It owns the VFs (created when software sets VF Enable in its
/// SR-IOV capability, each with the device memory of the profile the PF fixed for it) and performs the migration
/// primitives on a VF named by its index: <see cref="Suspend"/>, <see cref="Resume"/>, <see cref="StartTracking"/>,
/// <see cref="StopTracking"/>, <see cref="SaveState"/>, <see cref="LoadState"/>. A VF's migration driver uses only
/// these (never the VF itself), and a host-side agent may call them directly. The PF is never handed to a VM.
/// </summary>
/// <remarks>
/// PF BAR0 (4 KiB) holds read-only identification: 0x0 Id ("ACC1"), 0x4 Version, 0x8 TotalVFs, 0xC VFs created.
/// Errors of the primitives are <see cref="MigrationException"/>: ENODEV for a VF that does not exist.
/// </remarks>
public sealed class AcceleratorPf : PciFunction, IDisposable
{
    private readonly Lock _lock = new();
    private readonly AcceleratorProfile[] _profiles;
    private AcceleratorVf[] _vfs = [];

    /// <summary>A PF with <paramref name="totalVfs"/> VFs, each created with <paramref name="defaultProfile"/> unless <see cref="SetVfProfile"/> says otherwise.</summary>
    public AcceleratorPf(ushort totalVfs, AcceleratorProfile defaultProfile)
        : base(BuildDeclaration(totalVfs))
    {
        defaultProfile.Validate();
        _profiles = new AcceleratorProfile[totalVfs];
        Array.Fill(_profiles, defaultProfile);
    }

    /// <summary>The VFs that exist now (index = VF number).</summary>
    public IReadOnlyList<AcceleratorVf> Vfs
    {
        get
        {
            lock (_lock)
            {
                return _vfs;
            }
        }
    }

    /// <summary>Raised after VFs were created or removed (the host starts or stops serving their sockets).</summary>
    public event EventHandler? VfsChanged;

    /// <summary>Fixes the profile VF <paramref name="vf"/> gets when VFs are next enabled. Only while VFs are disabled.</summary>
    public void SetVfProfile(int vf, AcceleratorProfile profile)
    {
        profile.Validate();
        lock (_lock)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(vf);
            ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(vf, _profiles.Length);
            if (_vfs.Length != 0)
            {
                throw new InvalidOperationException("VF profiles are fixed while VFs exist; disable SR-IOV first");
            }
            _profiles[vf] = profile;
        }
    }

    /// <summary>What a host PF driver does to create VFs: NumVFs, then VF Enable and VF MSE in SR-IOV Control.</summary>
    public void EnableVfs(int count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(count, _profiles.Length);
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, (ushort)count);
        WriteConfig(SriovCapabilityOffset + PciSriov.NumVfs, b);
        BinaryPrimitives.WriteUInt16LittleEndian(b, PciSriov.ControlVfEnable | PciSriov.ControlVfMemorySpaceEnable);
        WriteConfig(SriovCapabilityOffset + PciSriov.Control, b);
    }

    /// <summary>Clears VF Enable: every VF (and its device memory) goes away.</summary>
    public void DisableVfs()
    {
        Span<byte> b = stackalloc byte[2];
        WriteConfig(SriovCapabilityOffset + PciSriov.Control, b);
    }

    /// <summary>The VF with index <paramref name="vf"/>. Throws <see cref="MigrationException"/> (ENODEV) if it does not exist.</summary>
    public AcceleratorVf GetVf(int vf)
    {
        var vfs = Vfs;
        return vf >= 0 && vf < vfs.Count ? vfs[vf] : throw new MigrationException(Errno.ENODEV, $"accelerator VF {vf} does not exist");
    }

    /// <summary>Stops VF <paramref name="vf"/> initiating (Initiator: no new descriptor fetch, fetched ones finished) or entirely (Responder).</summary>
    public void Suspend(int vf, AcceleratorSuspendScope scope) =>
        GetVf(vf).WriteHiddenRegister(AcceleratorMigrationRegister.Command,
            (uint)(scope == AcceleratorSuspendScope.Initiator ? AcceleratorMigrationCommand.SuspendInitiator : AcceleratorMigrationCommand.SuspendResponder));

    /// <summary>Undoes <see cref="Suspend"/>: Responder brings a stopped VF back to quiesced, Initiator to running.</summary>
    public void Resume(int vf, AcceleratorSuspendScope scope) =>
        GetVf(vf).WriteHiddenRegister(AcceleratorMigrationRegister.Command,
            (uint)(scope == AcceleratorSuspendScope.Initiator ? AcceleratorMigrationCommand.ResumeInitiator : AcceleratorMigrationCommand.ResumeResponder));

    /// <summary>Clears and starts device-memory dirty tracking on VF <paramref name="vf"/>.</summary>
    public void StartTracking(int vf) =>
        GetVf(vf).WriteHiddenRegister(AcceleratorMigrationRegister.Command, (uint)AcceleratorMigrationCommand.StartTracking);

    /// <summary>Stops device-memory dirty tracking on VF <paramref name="vf"/>.</summary>
    public void StopTracking(int vf) =>
        GetVf(vf).WriteHiddenRegister(AcceleratorMigrationRegister.Command, (uint)AcceleratorMigrationCommand.StopTracking);

    /// <summary>Dirty device-memory pages logged on VF <paramref name="vf"/>.</summary>
    public uint QueryDirtyPages(int vf) => GetVf(vf).ReadHiddenRegister(AcceleratorMigrationRegister.DirtyPages);

    /// <summary>Opens a save stream of VF <paramref name="vf"/> (the caller suspends or tracks as the arc requires).</summary>
    public AcceleratorSaveStream SaveState(int vf) => new(GetVf(vf));

    /// <summary>Bytes a full STOP_COPY image of VF <paramref name="vf"/> takes (no pre-copy).</summary>
    public ulong FullImageSize(int vf)
    {
        var v = GetVf(vf);
        return AcceleratorSaveStream.FullImageSize(v.Memory.Size, StateLength(v));
    }

    /// <summary>Bytes of the State record payload of <paramref name="v"/>.</summary>
    internal static int StateLength(AcceleratorVf v) => AcceleratorVfRegisters.Size + 4 + v.SaveConfigState().Length;

    /// <summary>Prepares VF <paramref name="vf"/> to take a migrated state (registers cleared) and opens the load stream.</summary>
    public AcceleratorLoadStream LoadState(int vf)
    {
        var v = GetVf(vf);
        v.ClearRegisters();
        return new AcceleratorLoadStream(v);
    }

    protected override int ReadBar(int bar, ulong offset, Span<byte> data)
    {
        if (bar != 0 || (offset & 3) != 0 || data.Length != 4)
        {
            return Errno.EINVAL;
        }
        uint v = offset switch
        {
            0x0 => AcceleratorRegister.IdValue,
            0x4 => AcceleratorRegister.VersionValue,
            0x8 => (uint)_profiles.Length,
            0xC => (uint)Vfs.Count,
            _ => 0,
        };
        BinaryPrimitives.WriteUInt32LittleEndian(data, v);
        return 0;
    }

    protected override void OnSriovChanged(SriovChangedEventArgs e)
    {
        ArgumentNullException.ThrowIfNull(e);
        bool changed = false;
        if (e.Current.VfEnable && !e.Previous.VfEnable)
        {
            var vfs = new AcceleratorVf[e.Current.NumVfs];
            for (int i = 0; i < vfs.Length; i++)
            {
                vfs[i] = new AcceleratorVf(this, i, _profiles[i]);
            }
            lock (_lock)
            {
                _vfs = vfs;
            }
            changed = vfs.Length > 0;
        }
        else if (!e.Current.VfEnable && e.Previous.VfEnable)
        {
            changed = RemoveVfs();
        }
        base.OnSriovChanged(e);
        if (changed)
        {
            VfsChanged?.Invoke(this, EventArgs.Empty);
        }
    }

    public void Dispose() => _ = RemoveVfs();

    private bool RemoveVfs()
    {
        AcceleratorVf[] old;
        lock (_lock)
        {
            old = _vfs;
            _vfs = [];
        }
        foreach (var vf in old)
        {
            vf.Dispose();
        }
        return old.Length > 0;
    }

    private static PciFunctionDeclaration BuildDeclaration(ushort totalVfs) => new()
    {
        VendorId = AcceleratorIds.VendorId,
        DeviceId = AcceleratorIds.PfDeviceId,
        SubsystemVendorId = AcceleratorIds.VendorId,
        SubsystemId = AcceleratorIds.PfDeviceId,
        ClassCode = AcceleratorIds.ClassCode,
        Bars = [new PciBar(0x1000)],
        Sriov = new PciSriovLayout(totalVfs, totalVfs, FirstVfOffset: 1, VfStride: 1, AcceleratorIds.VfDeviceId, AcceleratorVf.VfBars),
    };
}
