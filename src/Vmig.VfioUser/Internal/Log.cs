using Microsoft.Extensions.Logging;
using Vmig.Migration;

namespace Vmig.VfioUser.Internal;

internal static partial class Log
{
    [LoggerMessage(Level = LogLevel.Warning, Message = "{Name}: SET {Target} failed with errno {Errno}; device is in {Reached}")]
    public static partial void LogMigrationFailure(this ILogger logger, string name, DeviceState target, DeviceState reached, int errno);
}
