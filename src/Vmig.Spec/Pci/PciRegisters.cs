namespace Vmig.Spec.Pci;

/// <summary>
/// Type-0 configuration space offsets and bits (PCI Local Bus 3.0 §6.1, PCIe Base 6.x §7.5.1). Shared by the
/// device-side function model (Vmig.Devices.Pci) and guest drivers that program config space.
/// </summary>
public static class PciConfig
{
    /// <summary>Size of PCIe configuration space (with the extended space from 0x100).</summary>
    public const int Size = 4096;

    /// <summary>First offset of the PCIe extended configuration space.</summary>
    public const int ExtendedStart = 0x100;

    public const int VendorId = 0x00;
    public const int DeviceId = 0x02;
    public const int Command = 0x04;
    public const int Status = 0x06;
    public const int RevisionId = 0x08;
    /// <summary>Class code: 3 bytes, programming interface at 0x09, subclass 0x0A, base class 0x0B.</summary>
    public const int ClassCode = 0x09;
    public const int CacheLineSize = 0x0C;
    public const int HeaderType = 0x0E;
    /// <summary>BAR0; BAR n is at Bar0 + 4n (n = 0..5).</summary>
    public const int Bar0 = 0x10;
    public const int SubsystemVendorId = 0x2C;
    public const int SubsystemId = 0x2E;
    public const int ExpansionRom = 0x30;
    public const int CapabilitiesPointer = 0x34;
    public const int InterruptLine = 0x3C;
    public const int InterruptPin = 0x3D;

    /// <summary>Command register bits.</summary>
    public const ushort CommandIoSpace = 1 << 0;
    public const ushort CommandMemorySpace = 1 << 1;
    public const ushort CommandBusMaster = 1 << 2;
    public const ushort CommandParityErrorResponse = 1 << 6;
    public const ushort CommandSerrEnable = 1 << 8;
    public const ushort CommandInterruptDisable = 1 << 10;

    /// <summary>Status register bits.</summary>
    public const ushort StatusCapabilitiesList = 1 << 4;
    public const ushort StatusMasterDataParityError = 1 << 8;
    public const ushort StatusSignaledTargetAbort = 1 << 11;
    public const ushort StatusReceivedTargetAbort = 1 << 12;
    /// <summary>Received Master Abort: a PCIe requester sets it when a request it issued completes with Unsupported Request.</summary>
    public const ushort StatusReceivedMasterAbort = 1 << 13;
    public const ushort StatusSignaledSystemError = 1 << 14;
    public const ushort StatusDetectedParityError = 1 << 15;

    /// <summary>Memory BAR low bits: bit 0 = 0 (memory), bits 2:1 type (00 = 32-bit, 10 = 64-bit), bit 3 prefetchable.</summary>
    public const uint BarType64 = 0b100;
    public const uint BarPrefetchable = 0b1000;
    public const uint BarFlagsMask = 0xF;
}

/// <summary>Capability IDs (PCI Code and ID Assignment §2, §3).</summary>
public static class PciCapabilityId
{
    public const byte PowerManagement = 0x01;
    public const byte Msi = 0x05;
    public const byte PciExpress = 0x10;
    public const byte MsiX = 0x11;

    /// <summary>Extended capability ID of SR-IOV (PCIe §7.9.3).</summary>
    public const ushort ExtendedSriov = 0x0010;
}

/// <summary>Power Management capability (PCI PM 1.2 §3.2): offsets relative to the capability.</summary>
public static class PciPm
{
    public const int Pmc = 0x02;
    public const int Pmcsr = 0x04;
    public const int Length = 8;
    /// <summary>PMCSR PowerState field (bits 1:0): 0 = D0, 3 = D3hot.</summary>
    public const ushort PmcsrPowerStateMask = 0x3;
    /// <summary>PMCSR No_Soft_Reset: D3hot → D0 keeps the function's state.</summary>
    public const ushort PmcsrNoSoftReset = 1 << 3;
    public const ushort PmcsrPmeStatus = 1 << 15;
}

/// <summary>MSI-X capability and table layout (PCIe §7.7.2): offsets relative to the capability.</summary>
public static class PciMsix
{
    public const int MessageControl = 0x02;
    /// <summary>Table Offset/BIR: bits 2:0 BAR indicator, bits 31:3 offset (8-aligned).</summary>
    public const int TableOffsetBir = 0x04;
    /// <summary>PBA Offset/BIR.</summary>
    public const int PbaOffsetBir = 0x08;
    public const int Length = 12;

    /// <summary>Message Control: Table Size (N-1) in bits 10:0.</summary>
    public const ushort ControlTableSizeMask = 0x07FF;
    public const ushort ControlFunctionMask = 1 << 14;
    public const ushort ControlEnable = 1 << 15;

    /// <summary>Table entry: Message Address (u64), Message Data (u32), Vector Control (u32).</summary>
    public const int EntrySize = 16;
    public const int EntryMessageAddress = 0x0;
    public const int EntryMessageData = 0x8;
    public const int EntryVectorControl = 0xC;
    public const uint VectorControlMask = 1;

    /// <summary>Most vectors one function may have (Table Size is 11 bits).</summary>
    public const int MaxVectors = 2048;
}

/// <summary>PCI Express capability (PCIe §7.5.3), version 2: offsets relative to the capability.</summary>
public static class PciExpress
{
    public const int Capabilities = 0x02;
    public const int DeviceCapabilities = 0x04;
    public const int DeviceControl = 0x08;
    public const int DeviceStatus = 0x0A;
    public const int LinkCapabilities = 0x0C;
    public const int LinkControl = 0x10;
    public const int LinkStatus = 0x12;
    public const int DeviceCapabilities2 = 0x24;
    public const int DeviceControl2 = 0x28;
    /// <summary>Length of a version-2 capability for an endpoint (through Link Status 2).</summary>
    public const int Length = 0x3C;

    /// <summary>DevCap Function Level Reset Capability (bit 28).</summary>
    public const uint DevCapFlr = 1u << 28;
    /// <summary>DevCap Role-Based Error Reporting (bit 15; must be 1 for PCIe 1.1+ functions).</summary>
    public const uint DevCapRoleBasedErrorReporting = 1u << 15;
    /// <summary>DevCtl Initiate Function Level Reset (bit 15; always reads 0).</summary>
    public const ushort DevCtlInitiateFlr = 1 << 15;
    /// <summary>DevSta bits 3:0: Correctable/Non-Fatal/Fatal Error Detected, Unsupported Request Detected (RW1C).</summary>
    public const ushort DevStaErrorBits = 0xF;
    public const ushort DevStaUnsupportedRequest = 1 << 3;
}

/// <summary>SR-IOV extended capability (PCIe §9.3.3): offsets relative to the capability (at 0x100 here).</summary>
public static class PciSriov
{
    public const int Capabilities = 0x04;
    public const int Control = 0x08;
    public const int Status = 0x0A;
    public const int InitialVfs = 0x0C;
    public const int TotalVfs = 0x0E;
    public const int NumVfs = 0x10;
    public const int FunctionDependencyLink = 0x12;
    public const int FirstVfOffset = 0x14;
    public const int VfStride = 0x16;
    public const int VfDeviceId = 0x1A;
    public const int SupportedPageSizes = 0x1C;
    public const int SystemPageSize = 0x20;
    /// <summary>VF BAR0; VF BAR n at VfBar0 + 4n.</summary>
    public const int VfBar0 = 0x24;
    public const int VfMigrationStateArrayOffset = 0x3C;
    public const int Length = 0x40;

    /// <summary>SR-IOV Control bits.</summary>
    public const ushort ControlVfEnable = 1 << 0;
    public const ushort ControlVfMigrationEnable = 1 << 1;
    public const ushort ControlVfMigrationInterruptEnable = 1 << 2;
    public const ushort ControlVfMemorySpaceEnable = 1 << 3;
    public const ushort ControlAriCapableHierarchy = 1 << 4;
}
