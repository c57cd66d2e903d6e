namespace Vmig.Spec.Nvme;

/// <summary>Status Code Type (SCT), CQE status field bits [11:9] (§4.2.3.2).</summary>
public enum StatusCodeType : byte
{
    Generic = 0,
    CommandSpecific = 1,
    MediaAndDataIntegrity = 2,
    PathRelated = 3,
    VendorSpecific = 7,
}

/// <summary>
/// A completion status: SCT, SC, More and DNR. <see cref="Field"/> is the 15-bit status field (CQE DW3 bits 31:17):
/// SC [7:0], SCT [10:8], CRD [12:11], M bit 13, DNR bit 14.
/// </summary>
public readonly record struct NvmeStatus(StatusCodeType Sct, byte Sc, bool Dnr = false, bool More = false)
{
    public bool IsSuccess => Sct == StatusCodeType.Generic && Sc == 0;

    /// <summary>The 15-bit status field as it sits above the phase tag.</summary>
    public ushort Field => (ushort)(Sc | ((int)Sct << 8) | (More ? 1 << 13 : 0) | (Dnr ? 1 << 14 : 0));

    /// <summary>Decodes the 15-bit status field.</summary>
    public static NvmeStatus FromField(ushort field) =>
        new((StatusCodeType)((field >> 8) & 7), (byte)field, (field & (1 << 14)) != 0, (field & (1 << 13)) != 0);

    public override string ToString() => IsSuccess ? "Success" : $"SCT {(int)Sct:X} SC 0x{Sc:X2}{(Dnr ? " DNR" : "")} ({Name})";

    private string Name => (Sct, Sc) switch
    {
        (StatusCodeType.Generic, 0x01) => "Invalid Command Opcode",
        (StatusCodeType.Generic, 0x02) => "Invalid Field in Command",
        (StatusCodeType.Generic, 0x03) => "Command ID Conflict",
        (StatusCodeType.Generic, 0x04) => "Data Transfer Error",
        (StatusCodeType.Generic, 0x06) => "Internal Error",
        (StatusCodeType.Generic, 0x07) => "Command Abort Requested",
        (StatusCodeType.Generic, 0x08) => "Command Aborted due to SQ Deletion",
        (StatusCodeType.Generic, 0x0B) => "Invalid Namespace or Format",
        (StatusCodeType.Generic, 0x0C) => "Command Sequence Error",
        (StatusCodeType.Generic, 0x13) => "PRP Offset Invalid",
        (StatusCodeType.Generic, 0x38) => "Not Enough Resources",
        (StatusCodeType.Generic, 0x39) => "Controller Suspended",
        (StatusCodeType.Generic, 0x3A) => "Controller Not Suspended",
        (StatusCodeType.Generic, 0x3B) => "Controller Data Queue Failure",
        (StatusCodeType.Generic, 0x80) => "LBA Out of Range",
        (StatusCodeType.CommandSpecific, 0x00) => "Completion Queue Invalid",
        (StatusCodeType.CommandSpecific, 0x01) => "Invalid Queue Identifier",
        (StatusCodeType.CommandSpecific, 0x02) => "Invalid Queue Size",
        (StatusCodeType.CommandSpecific, 0x05) => "Asynchronous Event Request Limit Exceeded",
        (StatusCodeType.CommandSpecific, 0x08) => "Invalid Interrupt Vector",
        (StatusCodeType.CommandSpecific, 0x09) => "Invalid Log Page",
        (StatusCodeType.CommandSpecific, 0x0A) => "Invalid Format",
        (StatusCodeType.CommandSpecific, 0x0C) => "Invalid Queue Deletion",
        (StatusCodeType.CommandSpecific, 0x0D) => "Feature Identifier Not Saveable",
        (StatusCodeType.CommandSpecific, 0x16) => "Namespace Identifier Unavailable",
        (StatusCodeType.CommandSpecific, 0x18) => "Namespace Already Attached",
        (StatusCodeType.CommandSpecific, 0x1A) => "Namespace Not Attached",
        (StatusCodeType.CommandSpecific, 0x1C) => "Controller List Invalid",
        (StatusCodeType.CommandSpecific, 0x1F) => "Invalid Controller Identifier",
        (StatusCodeType.CommandSpecific, 0x20) => "Invalid Secondary Controller State",
        (StatusCodeType.CommandSpecific, 0x21) => "Invalid Number of Controller Resources",
        (StatusCodeType.CommandSpecific, 0x22) => "Invalid Resource Identifier",
        (StatusCodeType.MediaAndDataIntegrity, 0x85) => "Compare Failure",
        _ => "?",
    };

    public static NvmeStatus Success => default;
    public static NvmeStatus InvalidOpcode => new(StatusCodeType.Generic, 0x01, Dnr: true);
    public static NvmeStatus InvalidField => new(StatusCodeType.Generic, 0x02, Dnr: true);
    public static NvmeStatus CommandIdConflict => new(StatusCodeType.Generic, 0x03, Dnr: true);
    public static NvmeStatus DataTransferError => new(StatusCodeType.Generic, 0x04);
    public static NvmeStatus InternalError => new(StatusCodeType.Generic, 0x06);
    public static NvmeStatus AbortRequested => new(StatusCodeType.Generic, 0x07);
    public static NvmeStatus AbortedSqDeletion => new(StatusCodeType.Generic, 0x08);
    public static NvmeStatus InvalidNamespaceOrFormat => new(StatusCodeType.Generic, 0x0B, Dnr: true);
    public static NvmeStatus CommandSequenceError => new(StatusCodeType.Generic, 0x0C, Dnr: true);
    public static NvmeStatus PrpOffsetInvalid => new(StatusCodeType.Generic, 0x13, Dnr: true);
    public static NvmeStatus NotEnoughResources => new(StatusCodeType.Generic, 0x38, Dnr: true);
    public static NvmeStatus ControllerSuspended => new(StatusCodeType.Generic, 0x39, Dnr: true);
    public static NvmeStatus ControllerNotSuspended => new(StatusCodeType.Generic, 0x3A, Dnr: true);
    public static NvmeStatus ControllerDataQueueFailure => new(StatusCodeType.Generic, 0x3B, Dnr: true);
    public static NvmeStatus LbaOutOfRange => new(StatusCodeType.Generic, 0x80, Dnr: true);
    public static NvmeStatus CompletionQueueInvalid => new(StatusCodeType.CommandSpecific, 0x00, Dnr: true);
    public static NvmeStatus InvalidQueueIdentifier => new(StatusCodeType.CommandSpecific, 0x01, Dnr: true);
    public static NvmeStatus InvalidQueueSize => new(StatusCodeType.CommandSpecific, 0x02, Dnr: true);
    public static NvmeStatus AbortCommandLimitExceeded => new(StatusCodeType.CommandSpecific, 0x03, Dnr: true);
    public static NvmeStatus AsyncEventRequestLimitExceeded => new(StatusCodeType.CommandSpecific, 0x05, Dnr: true);
    public static NvmeStatus InvalidInterruptVector => new(StatusCodeType.CommandSpecific, 0x08, Dnr: true);
    public static NvmeStatus InvalidLogPage => new(StatusCodeType.CommandSpecific, 0x09, Dnr: true);
    public static NvmeStatus InvalidQueueDeletion => new(StatusCodeType.CommandSpecific, 0x0C, Dnr: true);
    public static NvmeStatus InvalidFormat => new(StatusCodeType.CommandSpecific, 0x0A, Dnr: true);
    public static NvmeStatus FeatureNotSaveable => new(StatusCodeType.CommandSpecific, 0x0D, Dnr: true);
    public static NvmeStatus NamespaceIdentifierUnavailable => new(StatusCodeType.CommandSpecific, 0x16, Dnr: true);
    public static NvmeStatus NamespaceAlreadyAttached => new(StatusCodeType.CommandSpecific, 0x18, Dnr: true);
    public static NvmeStatus NamespaceNotAttached => new(StatusCodeType.CommandSpecific, 0x1A, Dnr: true);
    public static NvmeStatus ControllerListInvalid => new(StatusCodeType.CommandSpecific, 0x1C, Dnr: true);
    public static NvmeStatus InvalidControllerIdentifier => new(StatusCodeType.CommandSpecific, 0x1F, Dnr: true);
    public static NvmeStatus InvalidSecondaryControllerState => new(StatusCodeType.CommandSpecific, 0x20, Dnr: true);
    public static NvmeStatus InvalidNumberOfControllerResources => new(StatusCodeType.CommandSpecific, 0x21, Dnr: true);
    public static NvmeStatus InvalidResourceIdentifier => new(StatusCodeType.CommandSpecific, 0x22, Dnr: true);
    public static NvmeStatus CompareFailure => new(StatusCodeType.MediaAndDataIntegrity, 0x85, Dnr: true);
}
