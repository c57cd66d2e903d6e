using System.Buffers.Binary;
using System.Text;

namespace Vmig.Spec.Nvme;

/// <summary>Identify CNS values (CDW10 [7:0]; NVMe Base 2.x figure "CNS Values").</summary>
public enum IdentifyCns : byte
{
    Namespace = 0x00,
    Controller = 0x01,
    ActiveNamespaceList = 0x02,
    NamespaceIdDescriptorList = 0x03,
    AllocatedNamespaceList = 0x10,
    AllocatedNamespace = 0x11,
    AttachedControllerList = 0x12,
    ControllerList = 0x13,
    PrimaryControllerCapabilities = 0x14,
    SecondaryControllerList = 0x15,

    /// <summary>TP4159: Supported Controller State Formats.</summary>
    SupportedControllerStateFormats = 0x20,
}

/// <summary>Optional Admin Command Support bits (Identify Controller OACS, bytes 257:256).</summary>
[Flags]
public enum OptionalAdminCommands : ushort
{
    None = 0,
    SecuritySendReceive = 1 << 0,
    FormatNvm = 1 << 1,
    FirmwareCommitDownload = 1 << 2,
    NamespaceManagement = 1 << 3,
    DeviceSelfTest = 1 << 4,
    Directives = 1 << 5,
    NvmeMi = 1 << 6,
    VirtualizationManagement = 1 << 7,
    DoorbellBufferConfig = 1 << 8,
    GetLbaStatus = 1 << 9,
    CommandFeatureLockdown = 1 << 10,

    /// <summary>HMLMS: host managed live migration support (TP4159).</summary>
    HostManagedLiveMigration = 1 << 11,
}

/// <summary>Optional NVM Command Support bits (Identify Controller ONCS, bytes 521:520).</summary>
[Flags]
public enum OptionalNvmCommands : ushort
{
    None = 0,
    Compare = 1 << 0,
    WriteUncorrectable = 1 << 1,
    DatasetManagement = 1 << 2,
    WriteZeroes = 1 << 3,
    SaveSelectFeatures = 1 << 4,
    Reservations = 1 << 5,
    Timestamp = 1 << 6,
    Verify = 1 << 7,
    Copy = 1 << 8,
}

/// <summary>Space-padded ASCII fields of Identify structures.</summary>
public static class NvmeAscii
{
    /// <summary>Writes <paramref name="value"/> as ASCII into <paramref name="field"/>, padded with spaces, truncated to fit.</summary>
    public static void Write(Span<byte> field, string value)
    {
        field.Fill((byte)' ');
        int n = Math.Min(field.Length, value.Length);
        for (int i = 0; i < n; i++)
        {
            char c = value[i];
            field[i] = c is >= ' ' and < (char)0x7F ? (byte)c : (byte)'?';
        }
    }

    /// <summary>Reads an ASCII field, trimming trailing spaces and NULs.</summary>
    public static string Read(ReadOnlySpan<byte> field) => Encoding.ASCII.GetString(field).TrimEnd(' ', '\0');
}

/// <summary>
/// Identify Controller data structure (CNS 01h, 4096 bytes; NVMe Base 2.x figure "Identify Controller Data
/// Structure"; offsets as in libnvme <c>struct nvme_id_ctrl</c>). Only fields this project uses are modelled;
/// the rest are written as zero.
/// </summary>
public readonly record struct IdentifyController
{
    public const int Size = 4096;

    public ushort Vid { get; init; }               // 1:0
    public ushort Ssvid { get; init; }             // 3:2
    public string Sn { get; init; }                // 23:4
    public string Mn { get; init; }                // 63:24
    public string Fr { get; init; }                // 71:64
    public byte Rab { get; init; }                 // 72
    public uint Ieee { get; init; }                // 75:73 (24 bits)
    public byte Cmic { get; init; }                // 76
    public byte Mdts { get; init; }                // 77: max transfer 2^MDTS * CAP.MPSMIN pages, 0 = no limit
    public ushort Cntlid { get; init; }            // 79:78
    public uint Ver { get; init; }                 // 83:80
    public uint Oaes { get; init; }                // 95:92
    public uint Ctratt { get; init; }              // 99:96
    public byte Cntrltype { get; init; }           // 111: 1 = I/O controller
    public OptionalAdminCommands Oacs { get; init; } // 257:256
    public byte Acl { get; init; }                 // 258: abort command limit, 0's based
    public byte Aerl { get; init; }                // 259: async event request limit, 0's based
    public byte Frmw { get; init; }                // 260
    public byte Lpa { get; init; }                 // 261
    public byte Elpe { get; init; }                // 262: error log page entries, 0's based
    public byte Npss { get; init; }                // 263
    public ushort Wctemp { get; init; }            // 267:266 (Kelvin)
    public ushort Cctemp { get; init; }            // 269:268 (Kelvin)
    public UInt128 Tnvmcap { get; init; }          // 295:280 (bytes)
    public ushort Kas { get; init; }               // 321:320 (100 ms units)
    public byte Sqes { get; init; }                // 512: max [7:4], required [3:0] (log2 bytes)
    public byte Cqes { get; init; }                // 513
    public ushort Maxcmd { get; init; }            // 515:514
    public uint Nn { get; init; }                  // 519:516: number of namespaces (max NSID)
    public OptionalNvmCommands Oncs { get; init; } // 521:520
    public byte Vwc { get; init; }                 // 525: bit 0 = volatile write cache present
    public uint Sgls { get; init; }                // 539:536
    public uint Mnan { get; init; }                // 543:540
    public string Subnqn { get; init; }            // 1023:768
    public ushort Psd0MaxPower { get; init; }      // 2049:2048 (power state 0 MP, centiwatts)

    public static bool TryRead(ReadOnlySpan<byte> s, out IdentifyController v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new IdentifyController
        {
            Vid = BinaryPrimitives.ReadUInt16LittleEndian(s),
            Ssvid = BinaryPrimitives.ReadUInt16LittleEndian(s[2..]),
            Sn = NvmeAscii.Read(s.Slice(4, 20)),
            Mn = NvmeAscii.Read(s.Slice(24, 40)),
            Fr = NvmeAscii.Read(s.Slice(64, 8)),
            Rab = s[72],
            Ieee = (uint)(s[73] | (s[74] << 8) | (s[75] << 16)),
            Cmic = s[76],
            Mdts = s[77],
            Cntlid = BinaryPrimitives.ReadUInt16LittleEndian(s[78..]),
            Ver = BinaryPrimitives.ReadUInt32LittleEndian(s[80..]),
            Oaes = BinaryPrimitives.ReadUInt32LittleEndian(s[92..]),
            Ctratt = BinaryPrimitives.ReadUInt32LittleEndian(s[96..]),
            Cntrltype = s[111],
            Oacs = (OptionalAdminCommands)BinaryPrimitives.ReadUInt16LittleEndian(s[256..]),
            Acl = s[258],
            Aerl = s[259],
            Frmw = s[260],
            Lpa = s[261],
            Elpe = s[262],
            Npss = s[263],
            Wctemp = BinaryPrimitives.ReadUInt16LittleEndian(s[266..]),
            Cctemp = BinaryPrimitives.ReadUInt16LittleEndian(s[268..]),
            Tnvmcap = BinaryPrimitives.ReadUInt128LittleEndian(s[280..]),
            Kas = BinaryPrimitives.ReadUInt16LittleEndian(s[320..]),
            Sqes = s[512],
            Cqes = s[513],
            Maxcmd = BinaryPrimitives.ReadUInt16LittleEndian(s[514..]),
            Nn = BinaryPrimitives.ReadUInt32LittleEndian(s[516..]),
            Oncs = (OptionalNvmCommands)BinaryPrimitives.ReadUInt16LittleEndian(s[520..]),
            Vwc = s[525],
            Sgls = BinaryPrimitives.ReadUInt32LittleEndian(s[536..]),
            Mnan = BinaryPrimitives.ReadUInt32LittleEndian(s[540..]),
            Subnqn = NvmeAscii.Read(s.Slice(768, 256)),
            Psd0MaxPower = BinaryPrimitives.ReadUInt16LittleEndian(s[2048..]),
        };
        return true;
    }

    /// <summary>Writes all 4096 bytes (unmodelled fields zero).</summary>
    public void WriteTo(Span<byte> d)
    {
        if (d.Length < Size)
        {
            throw new ArgumentException($"need {Size} bytes", nameof(d));
        }
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(d, Vid);
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], Ssvid);
        NvmeAscii.Write(d.Slice(4, 20), Sn ?? "");
        NvmeAscii.Write(d.Slice(24, 40), Mn ?? "");
        NvmeAscii.Write(d.Slice(64, 8), Fr ?? "");
        d[72] = Rab;
        d[73] = (byte)Ieee;
        d[74] = (byte)(Ieee >> 8);
        d[75] = (byte)(Ieee >> 16);
        d[76] = Cmic;
        d[77] = Mdts;
        BinaryPrimitives.WriteUInt16LittleEndian(d[78..], Cntlid);
        BinaryPrimitives.WriteUInt32LittleEndian(d[80..], Ver);
        BinaryPrimitives.WriteUInt32LittleEndian(d[92..], Oaes);
        BinaryPrimitives.WriteUInt32LittleEndian(d[96..], Ctratt);
        d[111] = Cntrltype;
        BinaryPrimitives.WriteUInt16LittleEndian(d[256..], (ushort)Oacs);
        d[258] = Acl;
        d[259] = Aerl;
        d[260] = Frmw;
        d[261] = Lpa;
        d[262] = Elpe;
        d[263] = Npss;
        BinaryPrimitives.WriteUInt16LittleEndian(d[266..], Wctemp);
        BinaryPrimitives.WriteUInt16LittleEndian(d[268..], Cctemp);
        BinaryPrimitives.WriteUInt128LittleEndian(d[280..], Tnvmcap);
        BinaryPrimitives.WriteUInt16LittleEndian(d[320..], Kas);
        d[512] = Sqes;
        d[513] = Cqes;
        BinaryPrimitives.WriteUInt16LittleEndian(d[514..], Maxcmd);
        BinaryPrimitives.WriteUInt32LittleEndian(d[516..], Nn);
        BinaryPrimitives.WriteUInt16LittleEndian(d[520..], (ushort)Oncs);
        d[525] = Vwc;
        BinaryPrimitives.WriteUInt32LittleEndian(d[536..], Sgls);
        BinaryPrimitives.WriteUInt32LittleEndian(d[540..], Mnan);
        d.Slice(768, 256).Clear();
        Encoding.ASCII.GetBytes((Subnqn ?? "").AsSpan(0, Math.Min((Subnqn ?? "").Length, 255)), d.Slice(768, 255));
        BinaryPrimitives.WriteUInt16LittleEndian(d[2048..], Psd0MaxPower);
    }
}

/// <summary>LBA Format entry (4 bytes): MS [15:0] metadata bytes, LBADS [23:16] log2 of the data size, RP [25:24].</summary>
public readonly record struct LbaFormat(ushort Ms, byte Lbads, byte Rp)
{
    public const int Size = 4;

    /// <summary>Data size in bytes (2^LBADS).</summary>
    public int DataSize => 1 << Lbads;

    public uint Encode() => Ms | ((uint)Lbads << 16) | ((uint)(Rp & 3) << 24);

    public static LbaFormat Decode(uint v) => new((ushort)v, (byte)(v >> 16), (byte)((v >> 24) & 3));
}

/// <summary>
/// Identify Namespace data structure for the NVM command set (CNS 00h, 4096 bytes; NVM Command Set spec figure
/// "Identify Namespace Data Structure"; libnvme <c>struct nvme_id_ns</c>). Only the fields this project uses.
/// </summary>
public readonly record struct IdentifyNamespace
{
    public const int Size = 4096;

    /// <summary>Maximum LBA formats in the table (LBAF0..LBAF63 at bytes 128..383).</summary>
    public const int MaxLbaFormats = 64;

    public ulong Nsze { get; init; }     // 7:0, in logical blocks
    public ulong Ncap { get; init; }     // 15:8
    public ulong Nuse { get; init; }     // 23:16
    public byte Nsfeat { get; init; }    // 24: bit 0 thin provisioning (deallocate supported)
    public byte Nlbaf { get; init; }     // 25: number of LBA formats, 0's based
    public byte Flbas { get; init; }     // 26: [3:0] format index (low bits)
    public byte Mc { get; init; }        // 27
    public byte Dpc { get; init; }       // 28
    public byte Dps { get; init; }       // 29
    public byte Nmic { get; init; }      // 30: bit 0 = may be attached to several controllers
    public byte Dlfeat { get; init; }    // 33: [2:0] = 001b: deallocated blocks read as zeroes
    public UInt128 Nvmcap { get; init; } // 63:48 (bytes)
    public UInt128 Nguid { get; init; }  // 119:104, big-endian byte string
    public ulong Eui64 { get; init; }    // 127:120, big-endian byte string
    public IReadOnlyList<LbaFormat>? Lbaf { get; init; } // 383:128

    /// <summary>The formatted LBA size in bytes (LBAF[FLBAS]), or 0 if the table lacks that entry.</summary>
    public int FormattedLbaSize => Lbaf is { } l && (Flbas & 0xF) < l.Count ? l[Flbas & 0xF].DataSize : 0;

    public static bool TryRead(ReadOnlySpan<byte> s, out IdentifyNamespace v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        int n = Math.Min(s[25] + 1, MaxLbaFormats);
        var l = new LbaFormat[n];
        for (int i = 0; i < n; i++)
        {
            l[i] = LbaFormat.Decode(BinaryPrimitives.ReadUInt32LittleEndian(s[(128 + 4 * i)..]));
        }
        v = new IdentifyNamespace
        {
            Nsze = BinaryPrimitives.ReadUInt64LittleEndian(s),
            Ncap = BinaryPrimitives.ReadUInt64LittleEndian(s[8..]),
            Nuse = BinaryPrimitives.ReadUInt64LittleEndian(s[16..]),
            Nsfeat = s[24],
            Nlbaf = s[25],
            Flbas = s[26],
            Mc = s[27],
            Dpc = s[28],
            Dps = s[29],
            Nmic = s[30],
            Dlfeat = s[33],
            Nvmcap = BinaryPrimitives.ReadUInt128LittleEndian(s[48..]),
            Nguid = BinaryPrimitives.ReadUInt128BigEndian(s[104..]),
            Eui64 = BinaryPrimitives.ReadUInt64BigEndian(s[120..]),
            Lbaf = l,
        };
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        if (d.Length < Size)
        {
            throw new ArgumentException($"need {Size} bytes", nameof(d));
        }
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt64LittleEndian(d, Nsze);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], Ncap);
        BinaryPrimitives.WriteUInt64LittleEndian(d[16..], Nuse);
        d[24] = Nsfeat;
        d[25] = Nlbaf;
        d[26] = Flbas;
        d[27] = Mc;
        d[28] = Dpc;
        d[29] = Dps;
        d[30] = Nmic;
        d[33] = Dlfeat;
        BinaryPrimitives.WriteUInt128LittleEndian(d[48..], Nvmcap);
        BinaryPrimitives.WriteUInt128BigEndian(d[104..], Nguid);
        BinaryPrimitives.WriteUInt64BigEndian(d[120..], Eui64);
        if (Lbaf is { } l)
        {
            for (int i = 0; i < Math.Min(l.Count, MaxLbaFormats); i++)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(d[(128 + 4 * i)..], l[i].Encode());
            }
        }
    }
}

/// <summary>Namespace Identification Descriptor types (NIDT) for CNS 03h.</summary>
public enum NamespaceIdType : byte
{
    Eui64 = 1,
    Nguid = 2,
    Uuid = 3,
    Csi = 4,
}

/// <summary>
/// One Namespace Identification Descriptor: NIDT (1 byte), NIDL (1 byte), 2 reserved, then NIDL bytes of NID.
/// The CNS 03h list is a 4096-byte buffer of these, ended by a zero NIDT.
/// </summary>
public readonly record struct NamespaceIdDescriptor(NamespaceIdType Nidt, byte[] Nid)
{
    public int Size => 4 + Nid.Length;

    public void WriteTo(Span<byte> d)
    {
        d[0] = (byte)Nidt;
        d[1] = (byte)Nid.Length;
        d[2] = 0;
        d[3] = 0;
        Nid.CopyTo(d[4..]);
    }

    /// <summary>Parses a CNS 03h list (stops at NIDT 0 or a truncated entry).</summary>
    public static List<NamespaceIdDescriptor> ReadList(ReadOnlySpan<byte> s)
    {
        var list = new List<NamespaceIdDescriptor>();
        int o = 0;
        while (o + 4 <= s.Length && s[o] != 0)
        {
            int len = s[o + 1];
            if (o + 4 + len > s.Length)
            {
                break;
            }
            list.Add(new NamespaceIdDescriptor((NamespaceIdType)s[o], s.Slice(o + 4, len).ToArray()));
            o += 4 + len;
        }
        return list;
    }
}

/// <summary>
/// Primary Controller Capabilities (CNS 14h, 4096 bytes; libnvme <c>struct nvme_primary_ctrl_cap</c>): the flexible
/// VQ (queue) and VI (interrupt) resources the primary can assign to secondaries.
/// </summary>
public readonly record struct PrimaryControllerCapabilities
{
    public const int Size = 4096;

    public ushort Cntlid { get; init; }  // 1:0
    public ushort Portid { get; init; }  // 3:2
    public byte Crt { get; init; }       // 4: bit 0 VQ, bit 1 VI resources supported
    public uint Vqfrt { get; init; }     // 35:32 VQ flexible resources total
    public uint Vqrfa { get; init; }     // 39:36 VQ resources assigned to secondaries
    public ushort Vqrfap { get; init; }  // 41:40 VQ flexible allocated to the primary
    public ushort Vqprt { get; init; }   // 43:42 VQ private resources of the primary
    public ushort Vqfrsm { get; init; }  // 45:44 max VQ flexible per secondary
    public ushort Vqgran { get; init; }  // 47:46 VQ granularity
    public uint Vifrt { get; init; }     // 67:64
    public uint Virfa { get; init; }     // 71:68
    public ushort Virfap { get; init; }  // 73:72
    public ushort Viprt { get; init; }   // 75:74
    public ushort Vifrsm { get; init; }  // 77:76
    public ushort Vigran { get; init; }  // 79:78

    public static bool TryRead(ReadOnlySpan<byte> s, out PrimaryControllerCapabilities v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new PrimaryControllerCapabilities
        {
            Cntlid = BinaryPrimitives.ReadUInt16LittleEndian(s),
            Portid = BinaryPrimitives.ReadUInt16LittleEndian(s[2..]),
            Crt = s[4],
            Vqfrt = BinaryPrimitives.ReadUInt32LittleEndian(s[32..]),
            Vqrfa = BinaryPrimitives.ReadUInt32LittleEndian(s[36..]),
            Vqrfap = BinaryPrimitives.ReadUInt16LittleEndian(s[40..]),
            Vqprt = BinaryPrimitives.ReadUInt16LittleEndian(s[42..]),
            Vqfrsm = BinaryPrimitives.ReadUInt16LittleEndian(s[44..]),
            Vqgran = BinaryPrimitives.ReadUInt16LittleEndian(s[46..]),
            Vifrt = BinaryPrimitives.ReadUInt32LittleEndian(s[64..]),
            Virfa = BinaryPrimitives.ReadUInt32LittleEndian(s[68..]),
            Virfap = BinaryPrimitives.ReadUInt16LittleEndian(s[72..]),
            Viprt = BinaryPrimitives.ReadUInt16LittleEndian(s[74..]),
            Vifrsm = BinaryPrimitives.ReadUInt16LittleEndian(s[76..]),
            Vigran = BinaryPrimitives.ReadUInt16LittleEndian(s[78..]),
        };
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        if (d.Length < Size)
        {
            throw new ArgumentException($"need {Size} bytes", nameof(d));
        }
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(d, Cntlid);
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], Portid);
        d[4] = Crt;
        BinaryPrimitives.WriteUInt32LittleEndian(d[32..], Vqfrt);
        BinaryPrimitives.WriteUInt32LittleEndian(d[36..], Vqrfa);
        BinaryPrimitives.WriteUInt16LittleEndian(d[40..], Vqrfap);
        BinaryPrimitives.WriteUInt16LittleEndian(d[42..], Vqprt);
        BinaryPrimitives.WriteUInt16LittleEndian(d[44..], Vqfrsm);
        BinaryPrimitives.WriteUInt16LittleEndian(d[46..], Vqgran);
        BinaryPrimitives.WriteUInt32LittleEndian(d[64..], Vifrt);
        BinaryPrimitives.WriteUInt32LittleEndian(d[68..], Virfa);
        BinaryPrimitives.WriteUInt16LittleEndian(d[72..], Virfap);
        BinaryPrimitives.WriteUInt16LittleEndian(d[74..], Viprt);
        BinaryPrimitives.WriteUInt16LittleEndian(d[76..], Vifrsm);
        BinaryPrimitives.WriteUInt16LittleEndian(d[78..], Vigran);
    }
}

/// <summary>
/// Secondary Controller Entry (32 bytes; libnvme <c>struct nvme_secondary_ctrl</c>): SCID 1:0, PCID 3:2, SCS 4
/// (bit 0 = online), VFN 9:8 (VF number, 1-based), NVQ 11:10, NVI 13:12.
/// </summary>
public readonly record struct SecondaryControllerEntry(ushort Scid, ushort Pcid, byte Scs, ushort Vfn, ushort Nvq, ushort Nvi)
{
    public const int Size = 32;

    public bool Online => (Scs & 1) != 0;

    public static bool TryRead(ReadOnlySpan<byte> s, out SecondaryControllerEntry v)
    {
        if (s.Length < Size)
        {
            v = default;
            return false;
        }
        v = new SecondaryControllerEntry(
            BinaryPrimitives.ReadUInt16LittleEndian(s),
            BinaryPrimitives.ReadUInt16LittleEndian(s[2..]),
            s[4],
            BinaryPrimitives.ReadUInt16LittleEndian(s[8..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[10..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[12..]));
        return true;
    }

    public void WriteTo(Span<byte> d)
    {
        d[..Size].Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(d, Scid);
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], Pcid);
        d[4] = Scs;
        BinaryPrimitives.WriteUInt16LittleEndian(d[8..], Vfn);
        BinaryPrimitives.WriteUInt16LittleEndian(d[10..], Nvq);
        BinaryPrimitives.WriteUInt16LittleEndian(d[12..], Nvi);
    }

    /// <summary>Secondary Controller List (CNS 15h): NUMID byte 0, entries from byte 32; at most 127 entries.</summary>
    public const int MaxListEntries = 127;

    public static void WriteList(Span<byte> d, IReadOnlyList<SecondaryControllerEntry> entries)
    {
        d[..4096].Clear();
        int n = Math.Min(entries.Count, MaxListEntries);
        d[0] = (byte)n;
        for (int i = 0; i < n; i++)
        {
            entries[i].WriteTo(d[(32 + i * Size)..]);
        }
    }

    public static List<SecondaryControllerEntry> ReadList(ReadOnlySpan<byte> s)
    {
        var list = new List<SecondaryControllerEntry>();
        if (s.Length < 32)
        {
            return list;
        }
        int n = Math.Min((int)s[0], MaxListEntries);
        for (int i = 0; i < n && TryRead(s[(32 + i * Size)..], out var e); i++)
        {
            list.Add(e);
        }
        return list;
    }
}

/// <summary>A list of u16 controller identifiers (Namespace Attachment data, CNS 12h/13h): NUMID then IDs.</summary>
public static class ControllerList
{
    public const int MaxEntries = 2047;

    public static void Write(Span<byte> d, IReadOnlyList<ushort> ids)
    {
        d[..4096].Clear();
        int n = Math.Min(ids.Count, MaxEntries);
        BinaryPrimitives.WriteUInt16LittleEndian(d, (ushort)n);
        for (int i = 0; i < n; i++)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(d[(2 + 2 * i)..], ids[i]);
        }
    }

    /// <summary>Parses the list; false if NUMID claims more entries than fit (malformed host data).</summary>
    public static bool TryRead(ReadOnlySpan<byte> s, out ushort[] ids)
    {
        ids = [];
        if (s.Length < 2)
        {
            return false;
        }
        int n = BinaryPrimitives.ReadUInt16LittleEndian(s);
        if (n > MaxEntries || 2 + 2 * n > s.Length)
        {
            return false;
        }
        ids = new ushort[n];
        for (int i = 0; i < n; i++)
        {
            ids[i] = BinaryPrimitives.ReadUInt16LittleEndian(s[(2 + 2 * i)..]);
        }
        return true;
    }
}
