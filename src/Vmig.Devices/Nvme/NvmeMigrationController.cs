using Vmig.Spec.Nvme;

namespace Vmig.Devices.Nvme;

/// <summary>TP4159 host-managed live migration commands executed by the primary controller on a secondary named by CNTLID.</summary>
public sealed class NvmeMigrationController
{
    private readonly NvmeSubsystem _subsystem;

    internal NvmeMigrationController(NvmeSubsystem subsystem) => _subsystem = subsystem;

    internal NvmeStatus Execute(NvmeController primary, in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        _ = _subsystem;
        _ = primary;
        return NvmeStatus.InvalidOpcode;
    }

    internal NvmeStatus SetCdqFeature(in SubmissionQueueEntry c) => NvmeStatus.InvalidField;

    internal NvmeStatus GetCdqFeature(NvmeController primary, in SubmissionQueueEntry c, out uint dw0)
    {
        dw0 = 0;
        return NvmeStatus.InvalidField;
    }

    internal static void WriteSupportedFormats(Span<byte> page)
    {
        page[0] = 0;
    }
}
