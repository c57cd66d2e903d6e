using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Vmig.VfioUser.Protocol;

/// <summary>
/// VERSION capabilities (vfio-user.rst "Version"): one side's offer or the negotiated result.
/// Defaults are the spec's: max_msg_fds 1, max_data_xfer_size 1 MiB, max_dma_maps 65535, pgsizes 4096.
/// The "vmig" object carries our extensions (docs/vfio-user.md): MIG_DATA_SIZE, pre-copy info and the P2P
/// states; a peer that does not send it never sees them.
/// </summary>
public sealed record VfioUserCapabilities
{
    public const int DefaultMaxMsgFds = 1;
    public const uint DefaultMaxDataXferSize = 1 << 20;
    public const uint DefaultMaxDmaMaps = 65535;
    public const ulong DefaultPgSizes = 4096;
    /// <summary>Largest max_data_xfer_size we accept from a peer (QEMU's VFIO_USER_MAX_MAX_XFER: 64 MiB).</summary>
    public const uint MaxMaxDataXferSize = 64u << 20;
    /// <summary>Largest max_msg_fds we accept (libvfio-user rejects above 1024).</summary>
    public const int MaxMaxMsgFds = 1024;

    public int MaxMsgFds { get; init; } = DefaultMaxMsgFds;
    public uint MaxDataXferSize { get; init; } = DefaultMaxDataXferSize;
    public uint MaxDmaMaps { get; init; } = DefaultMaxDmaMaps;
    public ulong PgSizes { get; init; } = DefaultPgSizes;
    public bool WriteMultiple { get; init; }
    public bool TwinSocketSupported { get; init; }
    /// <summary>Reply only: index in the fd array of the server→client socket.</summary>
    public int? TwinSocketFdIndex { get; init; }
    /// <summary>The legacy "migration" object was present (v1 spec; QEMU still sends it).</summary>
    public bool Migration { get; init; }
    /// <summary>migration.pgsize (dirty bitmap granule), if sent.</summary>
    public ulong? MigrationPgSize { get; init; }
    /// <summary>migration.max_bitmap_size, if sent.</summary>
    public ulong? MigrationMaxBitmapSize { get; init; }
    /// <summary>vmig extension: DEVICE_FEATURE MIG_DATA_SIZE (feature 9, kernel layout).</summary>
    public bool VmigMigDataSize { get; init; }
    /// <summary>vmig extension: DEVICE_FEATURE <see cref="VmigFeatures.PrecopyInfo"/>.</summary>
    public bool VmigPrecopyInfo { get; init; }
    /// <summary>vmig extension: RUNNING_P2P / PRE_COPY_P2P are used.</summary>
    public bool VmigP2P { get; init; }

    /// <summary>The JSON text (no NUL) as sent in a VERSION message.</summary>
    public string ToJson()
    {
        var caps = new JsonObject
        {
            ["max_msg_fds"] = MaxMsgFds,
            ["max_data_xfer_size"] = MaxDataXferSize,
            ["max_dma_maps"] = MaxDmaMaps,
            ["pgsizes"] = PgSizes,
        };
        if (WriteMultiple)
        {
            caps["write_multiple"] = true;
        }
        if (TwinSocketSupported)
        {
            var t = new JsonObject { ["supported"] = true };
            if (TwinSocketFdIndex is int i)
            {
                t["fd_index"] = i;
            }
            caps["twin_socket"] = t;
        }
        if (Migration)
        {
            var m = new JsonObject();
            if (MigrationPgSize is ulong p)
            {
                m["pgsize"] = p;
            }
            if (MigrationMaxBitmapSize is ulong b)
            {
                m["max_bitmap_size"] = b;
            }
            caps["migration"] = m;
        }
        if (VmigMigDataSize || VmigPrecopyInfo || VmigP2P)
        {
            caps["vmig"] = new JsonObject
            {
                ["mig_data_size"] = VmigMigDataSize,
                ["precopy_info"] = VmigPrecopyInfo,
                ["p2p"] = VmigP2P,
            };
        }
        return new JsonObject { ["capabilities"] = caps }.ToJsonString();
    }

    /// <summary>
    /// Parses the JSON of a VERSION payload (the bytes after major/minor, NUL-terminated). Never throws:
    /// returns EINVAL with a reason for malformed JSON, wrong types or out-of-range values.
    /// An empty payload means "all defaults".
    /// </summary>
    public static int TryParse(ReadOnlySpan<byte> json, out VfioUserCapabilities caps, out string? error)
    {
        caps = new VfioUserCapabilities();
        error = null;
        if (json.IsEmpty)
        {
            return 0;
        }
        int nul = json.IndexOf((byte)0);
        if (nul < 0)
        {
            error = "version data is not NUL-terminated";
            return Errno.EINVAL;
        }
        json = json[..nul];
        if (json.IsEmpty)
        {
            return 0;
        }
        JsonNode? root;
        try
        {
            root = JsonNode.Parse(Encoding.UTF8.GetString(json), documentOptions: new JsonDocumentOptions { MaxDepth = 8 });
        }
        catch (JsonException e)
        {
            error = "malformed JSON: " + e.Message;
            return Errno.EINVAL;
        }
        if (root is not JsonObject o)
        {
            error = "version data is not a JSON object";
            return Errno.EINVAL;
        }
        if (!o.TryGetPropertyValue("capabilities", out var cn) || cn is null)
        {
            return 0;
        }
        if (cn is not JsonObject c)
        {
            error = "capabilities is not an object";
            return Errno.EINVAL;
        }
        try
        {
            var r = new VfioUserCapabilities();
            if (c["max_msg_fds"] is JsonNode f)
            {
                long v = f.GetValue<long>();
                if (v < 0 || v > MaxMaxMsgFds)
                {
                    error = $"max_msg_fds {v} out of range 0..{MaxMaxMsgFds}";
                    return Errno.EINVAL;
                }
                r = r with { MaxMsgFds = (int)v };
            }
            if (c["max_data_xfer_size"] is JsonNode x)
            {
                long v = x.GetValue<long>();
                if (v < 1 || v > MaxMaxDataXferSize)
                {
                    error = $"max_data_xfer_size {v} out of range 1..{MaxMaxDataXferSize}";
                    return Errno.EINVAL;
                }
                r = r with { MaxDataXferSize = (uint)v };
            }
            if (c["max_dma_maps"] is JsonNode d)
            {
                long v = d.GetValue<long>();
                if (v < 1 || v > uint.MaxValue)
                {
                    error = $"max_dma_maps {v} out of range";
                    return Errno.EINVAL;
                }
                r = r with { MaxDmaMaps = (uint)v };
            }
            if (c["pgsizes"] is JsonNode p)
            {
                ulong v = p.GetValue<ulong>();
                if (v == 0 || (v & 4095) != 0)
                {
                    error = $"pgsizes 0x{v:x} is not a multiple of 4 KiB";
                    return Errno.EINVAL;
                }
                r = r with { PgSizes = v };
            }
            if (c["write_multiple"] is JsonNode w)
            {
                r = r with { WriteMultiple = w.GetValue<bool>() };
            }
            if (c["twin_socket"] is JsonNode tn)
            {
                if (tn is not JsonObject t)
                {
                    error = "twin_socket is not an object";
                    return Errno.EINVAL;
                }
                r = r with
                {
                    TwinSocketSupported = t["supported"]?.GetValue<bool>() ?? false,
                    TwinSocketFdIndex = t["fd_index"] is JsonNode fi ? fi.GetValue<int>() : null,
                };
            }
            if (c["migration"] is JsonNode mn)
            {
                if (mn is not JsonObject m)
                {
                    error = "migration is not an object";
                    return Errno.EINVAL;
                }
                r = r with
                {
                    Migration = true,
                    MigrationPgSize = m["pgsize"]?.GetValue<ulong>(),
                    MigrationMaxBitmapSize = m["max_bitmap_size"]?.GetValue<ulong>(),
                };
            }
            if (c["vmig"] is JsonNode vn)
            {
                if (vn is not JsonObject v)
                {
                    error = "vmig is not an object";
                    return Errno.EINVAL;
                }
                r = r with
                {
                    VmigMigDataSize = v["mig_data_size"]?.GetValue<bool>() ?? false,
                    VmigPrecopyInfo = v["precopy_info"]?.GetValue<bool>() ?? false,
                    VmigP2P = v["p2p"]?.GetValue<bool>() ?? false,
                };
            }
            caps = r;
            return 0;
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException or OverflowException or JsonException)
        {
            error = "capability has the wrong type: " + e.Message;
            return Errno.EINVAL;
        }
    }
}

/// <summary>vmig's project-defined DEVICE_FEATURE numbers (docs/vfio-user.md). The kernel uses 0-11.</summary>
public static class VmigFeatures
{
    /// <summary>
    /// Pre-copy info, GET only, valid in PRE_COPY/PRE_COPY_P2P (EINVAL otherwise, as VFIO_MIG_GET_PRECOPY_INFO).
    /// Reply data (16 bytes): initial_bytes u64 @0, dirty_bytes u64 @8.
    /// </summary>
    public const ushort PrecopyInfo = 0x7601;
}
