using System.Buffers.Binary;
using Vmig.Native;
using Vmig.VfioUser;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Conformance;

// Dirty logging, DEVICE_FEATURE validation and resilience to malformed messages.
internal sealed partial class SuiteRun
{
    private const ushort LogStart = 6, LogStop = 7, LogReport = 8;

    // ---------------------------------------------------------------- dirty logging

    private void DirtyLogging()
    {
        const string cat = "dirty-logging";
        bool supported = Feature(RawPeer.FeaturePayload(8, DeviceFeatureHead.Probe | DeviceFeatureHead.Set | LogStart), out _) == 0
            && Feature(RawPeer.FeaturePayload(8, DeviceFeatureHead.Probe | DeviceFeatureHead.Set | LogStop), out _) == 0
            && Feature(RawPeer.FeaturePayload(8, DeviceFeatureHead.Probe | DeviceFeatureHead.Get | LogReport), out _) == 0;
        if (!supported)
        {
            Record("dirty-logging.supported", cat, CheckOutcome.Skip, "DMA_LOGGING_START/STOP/REPORT not all offered (PROBE)", SpecLogging, 0);
            return;
        }
        if (!ToRunning(out string w0))
        {
            Record("dirty-logging.setup", cat, CheckOutcome.Fail, w0, SpecLogging, 0);
            return;
        }
        const ulong iova = 0x4000_0000, size = 1 << 20;
        using var mem = MemFd.Create("vmig-conform-dirty", (long)size);
        try
        {
            C.DmaMap(iova, size, mem, 0, DmaProt.Read | DmaProt.Write);
        }
        catch (Exception e) when (e is VfioUserException)
        {
            Record("dirty-logging.setup", cat, CheckOutcome.Fail, "DMA_MAP of a 1 MiB memfd window failed: " + e.Message, SpecLogging, 0);
            return;
        }
        ulong granule = 4096;
        try
        {
            Check("dirty-logging.start", cat, SpecLogging, () =>
            {
                granule = C.StartDirtyLogging(4096, [(iova, size)]);
                return granule >= 4096 && (granule & (granule - 1)) == 0 && granule <= size
                    ? Pass($"granule {granule}")
                    : Fail($"server picked granule {granule}, not a power of two in 4096..{size}");
            });
            Check("dirty-logging.start-twice-refused", cat, SpecLogging + ": a second START without STOP is rejected", () =>
            {
                int e = Feature(StartPayload(4096, [(iova, size)]), out _);
                return e != 0 ? Pass($"errno {e}") : Fail("a second START was accepted");
            });
            Check("dirty-logging.idle-report-empty", cat, SpecLogging, () =>
            {
                int e = Report(iova, size, granule, out var bits);
                if (e != 0)
                {
                    return Fail($"REPORT: errno {e}");
                }
                int n = CountBits(bits);
                int expectBytes = (int)(((size / granule) + 63) / 64 * 8);
                if (bits.Length != expectBytes)
                {
                    return Fail($"bitmap is {bits.Length} bytes, expected roundup(pages, 64)/8 = {expectBytes}");
                }
                return n == 0 ? Pass($"{bits.Length}-byte bitmap, no bits set") : Fail($"{n} pages dirty although the device did no DMA");
            });
            foreach (var (id, page, start, argsz, what) in new (string, ulong, ulong, uint, string)[]
            {
                ("dirty-logging.report-page-not-power-of-two", 3 * 4096, iova, 0, "page size 12288"),
                ("dirty-logging.report-page-below-4k", 512, iova, 0, "page size 512"),
                ("dirty-logging.report-unaligned-iova", 4096, iova + 1, 0, "iova not page aligned"),
                ("dirty-logging.report-argsz-too-small", 4096, iova, 8 + 24, "argsz without room for the bitmap"),
            })
            {
                Check(id, cat, SpecLogging + ": page_size a power of two ≥ 4 KiB; argsz covers the bitmap", () =>
                {
                    int e = Report(start, size, page, out _, argsz);
                    return e != 0 ? Pass($"{what}: errno {e}") : Fail($"{what} was accepted");
                });
            }
            DirtyBits(iova, granule);
            Check("dirty-logging.stop", cat, SpecLogging, () =>
            {
                C.StopDirtyLogging();
                return Pass("stopped");
            });
            Check("dirty-logging.report-after-stop-refused", cat, SpecLogging, () =>
            {
                int e = Report(iova, size, granule, out _);
                return e != 0 ? Pass($"errno {e}") : Fail("REPORT answered after STOP");
            });
            Check("dirty-logging.stop-twice-refused", cat, SpecLogging, () =>
            {
                int e = Feature(RawPeer.FeaturePayload(8, DeviceFeatureHead.Set | LogStop), out _);
                return e != 0 ? Pass($"errno {e}") : Fail("a second STOP was accepted");
            });
        }
        finally
        {
            try
            {
                C.DmaUnmap(iova, size);
            }
            catch (VfioUserException)
            {
            }
        }
    }

    private void DirtyBits(ulong iova, ulong granule)
    {
        const string cat = "dirty-logging";
        const ulong size = 1 << 20;
        var stim = _o.DmaWriteStimulus;
        if (stim is null || granule != 4096)
        {
            foreach (var id in new[] { "dirty-logging.bit-order", "dirty-logging.clear-on-read", "dirty-logging.page-size-folding" })
            {
                Record(id, cat, CheckOutcome.Skip, stim is null ? "no DMA write stimulus for this device" : $"granule {granule} ≠ 4096", SpecLogging, 0);
            }
            return;
        }
        Check("dirty-logging.bit-order", cat, SpecLogging + ": bit n = page iova + n·page_size, u64 words LSB first", () =>
        {
            stim.MakeDeviceWrite(C, iova + (3 * 4096), 16);
            stim.MakeDeviceWrite(C, iova + (70 * 4096) + 100, 8);
            int e = Report(iova, size, 4096, out var bits);
            if (e != 0)
            {
                return Fail($"REPORT: errno {e}");
            }
            var set = SetPages(bits);
            // Page 70 = u64 word 1, bit 6 = byte 8, bit 6.
            return set.SequenceEqual([3, 70]) && bits[8] == 0x40 && bits[0] == 0x08
                ? Pass("pages 3 and 70 exactly (word 0 bit 3, word 1 bit 6)")
                : Fail($"dirty pages [{string.Join(",", set)}], expected [3,70]");
        });
        Check("dirty-logging.clear-on-read", cat, SpecLogging + ": REPORT reads and clears", () =>
        {
            int e = Report(iova, size, 4096, out var bits);
            return e != 0 ? Fail($"REPORT: errno {e}") : CountBits(bits) == 0 ? Pass("second REPORT is empty") : Fail($"second REPORT still has {CountBits(bits)} pages");
        });
        Check("dirty-logging.page-size-folding", cat, SpecLogging + ": the report page size may be a multiple of the granule; bits are OR-folded", () =>
        {
            stim.MakeDeviceWrite(C, iova + (3 * 4096), 16);
            stim.MakeDeviceWrite(C, iova + (70 * 4096), 8);
            stim.MakeDeviceWrite(C, iova + (71 * 4096), 8);
            int e = Report(iova, size, 16384, out var bits);
            if (e != 0)
            {
                return Fail($"REPORT at 16 KiB: errno {e}");
            }
            var set = SetPages(bits);
            return set.SequenceEqual([0, 17]) ? Pass("4 KiB pages 3, 70, 71 fold to 16 KiB pages 0 and 17") : Fail($"16 KiB pages [{string.Join(",", set)}], expected [0,17]");
        });
    }

    private static byte[] StartPayload(ulong pageSize, IReadOnlyList<(ulong Iova, ulong Length)> ranges)
    {
        var d = new byte[16 + (16 * ranges.Count)];
        BinaryPrimitives.WriteUInt64LittleEndian(d, pageSize);
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(8), (uint)ranges.Count);
        for (int i = 0; i < ranges.Count; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(16 + (16 * i)), ranges[i].Iova);
            BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(24 + (16 * i)), ranges[i].Length);
        }
        return RawPeer.FeaturePayload((uint)(8 + d.Length), DeviceFeatureHead.Set | LogStart, d);
    }

    /// <summary>Raw DMA_LOGGING_REPORT; the bitmap bytes are decoded here, not with Vmig.Migration.DirtyBitmap.</summary>
    private int Report(ulong iova, ulong length, ulong pageSize, out byte[] bitmap, uint argsz = 0)
    {
        bitmap = [];
        ulong pages = pageSize == 0 ? 1 : (length + pageSize - 1) / pageSize;
        uint bytes = (uint)((pages + 63) / 64 * 8);
        var d = new byte[24];
        BinaryPrimitives.WriteUInt64LittleEndian(d, iova);
        BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(8), length);
        BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(16), pageSize);
        int e = Feature(RawPeer.FeaturePayload(argsz != 0 ? argsz : 8 + 24 + bytes, DeviceFeatureHead.Get | LogReport, d), out var r);
        if (e == 0)
        {
            bitmap = r.Length >= 32 ? r[32..] : [];
        }
        return e;
    }

    private static int CountBits(byte[] b) => b.Sum(x => System.Numerics.BitOperations.PopCount(x));

    private static List<int> SetPages(byte[] b)
    {
        var l = new List<int>();
        for (int i = 0; i < b.Length * 8; i++)
        {
            if ((b[i / 8] & (1 << (i % 8))) != 0)
            {
                l.Add(i);
            }
        }
        return l;
    }

    // ---------------------------------------------------------------- DEVICE_FEATURE validation

    private void Validation()
    {
        var state = new byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(state, 2);
        BinaryPrimitives.WriteInt32LittleEndian(state.AsSpan(4), -1);
        var bad = new byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(bad, 8);
        BinaryPrimitives.WriteInt32LittleEndian(bad.AsSpan(4), -1);
        var error = new byte[8];
        BinaryPrimitives.WriteInt32LittleEndian(error.AsSpan(4), -1);
        var cases = new (string Id, byte[] Payload, int[] Allowed, string What)[]
        {
            ("validation.argsz-below-8", RawPeer.FeaturePayload(4, DeviceFeatureHead.Get | 1), [Errno.EINVAL], "argsz 4"),
            ("validation.get-and-set", RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | DeviceFeatureHead.Set | DeviceStateFeature, state), [Errno.EINVAL], "GET|SET without PROBE"),
            ("validation.unknown-flag-bit", RawPeer.FeaturePayload(16, (1u << 19) | DeviceFeatureHead.Get | 1), [Errno.EINVAL], "flag bit 19"),
            ("validation.unknown-feature", RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | 0x1234), [Errno.ENOTTY, Errno.EINVAL], "feature 0x1234"),
            ("validation.no-operation", RawPeer.FeaturePayload(16, 1), [Errno.EINVAL], "neither GET, SET nor PROBE"),
            ("validation.set-on-get-only", RawPeer.FeaturePayload(16, DeviceFeatureHead.Set | 1, new byte[8]), [Errno.EINVAL], "SET MIGRATION"),
            ("validation.get-argsz-too-small", RawPeer.FeaturePayload(8, DeviceFeatureHead.Get | 1), [Errno.EINVAL], "GET MIGRATION with argsz 8"),
            ("validation.set-payload-short", RawPeer.FeaturePayload(12, DeviceFeatureHead.Set | DeviceStateFeature, state[..4]), [Errno.EINVAL], "SET MIG_DEVICE_STATE with 4 payload bytes"),
            ("validation.state-out-of-range", RawPeer.FeaturePayload(16, DeviceFeatureHead.Set | DeviceStateFeature, bad), [Errno.EINVAL], "SET device_state 8"),
            ("validation.state-error", RawPeer.FeaturePayload(16, DeviceFeatureHead.Set | DeviceStateFeature, error), [Errno.EINVAL], "SET device_state ERROR"),
        };
        foreach (var c in cases)
        {
            Check(c.Id, "validation", SpecFeature, () =>
            {
                int before = GetState();
                int e = Feature(c.Payload, out _);
                int after = GetState();
                if (after < 0)
                {
                    return Fail($"{c.What}: the server stopped answering (GET errno {-after})");
                }
                if (e == 0)
                {
                    return Fail($"{c.What} was accepted");
                }
                if (!c.Allowed.Contains(e))
                {
                    return Fail($"{c.What}: errno {e}, expected {string.Join(" or ", c.Allowed)}");
                }
                return before == after ? Pass($"{c.What}: errno {e}, state unchanged") : Fail($"{c.What}: errno {e} but the state moved {StateText(before)} → {StateText(after)}");
            });
        }
        Check("validation.probe-existence", "validation", SpecFeature + ": PROBE without GET/SET asks whether the feature exists", () =>
        {
            int e = Feature(RawPeer.FeaturePayload(8, DeviceFeatureHead.Probe | 1), out _);
            return e == 0 ? Pass("0") : Fail($"errno {e}");
        });
    }

    // ---------------------------------------------------------------- resilience (raw)

    private void Resilience()
    {
        RawPeer? p = ConnectRaw(true, out string? why);
        if (p is null)
        {
            Record("resilience.connect", "resilience", CheckOutcome.Fail, "raw client could not attach: " + why, SpecHeader, 0);
            return;
        }
        try
        {
            foreach (var (id, what, send, expectClose) in MalformedCases())
            {
                Check("resilience." + id, "resilience", SpecHeader + "; vfio-user.rst error replies", () =>
                {
                    p ??= ConnectRaw(true, out _);
                    if (p is null)
                    {
                        return Fail("cannot reconnect");
                    }
                    ushort msgId = p.NextId();
                    RawMessage? r;
                    try
                    {
                        send(p, msgId);
                        r = expectClose ? p.Receive(_o.TimeoutMs) : p.WaitFor(msgId, _o.TimeoutMs);
                    }
                    catch (NativeException e)
                    {
                        r = null;
                        if (!expectClose)
                        {
                            return Fail($"{what}: send failed ({e.Message}); the server closed the connection");
                        }
                    }
                    string got;
                    if (r is null)
                    {
                        p.Dispose();
                        p = null;
                        if (!expectClose)
                        {
                            return Fail($"{what}: the server closed the connection instead of answering an error");
                        }
                        p = ConnectRaw(true, out string? w);
                        if (p is null)
                        {
                            return Fail($"{what}: connection closed and the server does not take a new client: {w}");
                        }
                        got = "connection closed; a new client is served";
                    }
                    else if (!r.Header.IsError)
                    {
                        return Fail($"{what} was answered with success");
                    }
                    else
                    {
                        got = $"errno {r.Errno}";
                    }
                    int s = p.GetState(_o.TimeoutMs);
                    return s < 0 ? Fail($"{what}: {got}, then the next valid request failed ({(s == int.MinValue ? "closed" : $"errno {-s}")})") : Pass($"{what}: {got}; next request answered");
                });
            }
        }
        finally
        {
            p?.Dispose();
        }
    }

    private IEnumerable<(string Id, string What, Action<RawPeer, ushort> Send, bool ExpectClose)> MalformedCases()
    {
        static byte[] Region(ulong offset, uint region, uint count)
        {
            var b = new byte[RegionAccessHead.WireSize];
            new RegionAccessHead(offset, region, count).WriteTo(b);
            return b;
        }
        yield return ("unknown-command", "command 99", (p, id) => p.Send(id, (VfioUserCommand)99, default), false);
        yield return ("command-14", "removed command 14 (DIRTY_PAGES)", (p, id) => p.Send(id, VfioUserCommand.DirtyPagesRemoved, new byte[16]), false);
        yield return ("dma-read-to-server", "DMA_READ sent to the server", (p, id) => p.Send(id, VfioUserCommand.DmaRead, new byte[16]), false);
        yield return ("truncated-region-read", "REGION_READ with 8 payload bytes", (p, id) => p.Send(id, VfioUserCommand.RegionRead, new byte[8]), false);
        yield return ("truncated-dma-map", "DMA_MAP with 16 payload bytes", (p, id) => p.Send(id, VfioUserCommand.DmaMap, new byte[16]), false);
        yield return ("truncated-feature", "DEVICE_FEATURE with 4 payload bytes", (p, id) => p.Send(id, VfioUserCommand.DeviceFeature, new byte[4]), false);
        yield return ("truncated-mig-data-read", "MIG_DATA_READ with 4 payload bytes", (p, id) => p.Send(id, VfioUserCommand.MigDataRead, new byte[4]), false);
        yield return ("truncated-set-irqs", "SET_IRQS with 10 payload bytes", (p, id) => p.Send(id, VfioUserCommand.DeviceSetIrqs, new byte[10]), false);
        yield return ("region-index-out-of-range", "REGION_READ of region 0xFFFF", (p, id) => p.Send(id, VfioUserCommand.RegionRead, Region(0, 0xFFFF, 4)), false);
        yield return ("region-offset-overflow", "REGION_READ at offset 2^64-2, count 4", (p, id) => p.Send(id, VfioUserCommand.RegionRead, Region(ulong.MaxValue - 1, 0, 4)), false);
        yield return ("region-huge-count", "REGION_READ of 0x7FFFFFFF bytes", (p, id) => p.Send(id, VfioUserCommand.RegionRead, Region(0, 0, 0x7FFF_FFFF)), false);
        yield return ("region-write-lying-count", "REGION_WRITE claiming 100 bytes carrying 4", (p, id) => p.Send(id, VfioUserCommand.RegionWrite, [.. Region(0x100, 0, 100), 1, 2, 3, 4]), false);
        yield return ("write-multi-too-many", "REGION_WRITE_MULTI with wr_cnt 201", (p, id) =>
        {
            var b = new byte[8 + (201 * WriteMultiEntry.WireSize)];
            BinaryPrimitives.WriteUInt64LittleEndian(b, 201);
            p.Send(id, VfioUserCommand.RegionWriteMulti, b);
        }, false);
        yield return ("unmap-unknown-window", "DMA_UNMAP of a window never mapped", (p, id) =>
        {
            var b = new byte[DmaUnmapRequest.WireSize];
            new DmaUnmapRequest(DmaUnmapRequest.WireSize, 0, 0x7_0000_0000, 4096).WriteTo(b);
            p.Send(id, VfioUserCommand.DmaUnmap, b);
        }, false);
        yield return ("set-irqs-bad-flags", "SET_IRQS with flags 0xFFFF", (p, id) =>
        {
            var b = new byte[IrqSetPayload.WireSize];
            new IrqSetPayload(IrqSetPayload.WireSize, (IrqSetFlags)0xFFFF, 2, 0, 1).WriteTo(b);
            p.Send(id, VfioUserCommand.DeviceSetIrqs, b);
        }, false);
        yield return ("fd-on-region-read", "REGION_READ carrying an fd", (p, id) =>
        {
            using var e = EventFd.Create();
            p.Send(id, VfioUserCommand.RegionRead, Region(0, VfioPci.ConfigRegionIndex, 4), fds: [e.Handle.Fd]);
        }, false);
        yield return ("version-again", "VERSION on a negotiated connection", (p, id) => p.Send(id, VfioUserCommand.Version, RawPeer.VersionPayload(0, 0, "{}")), false);
        yield return ("msg-size-over-bound", "msg_size 64 KiB over max_data_xfer_size, payload sent", (p, id) =>
        {
            var big = new byte[(int)Math.Min(_serverMaxXfer, VfioUserCapabilities.MaxMaxDataXferSize) + (64 << 10)];
            p.Send(id, VfioUserCommand.RegionWrite, big);
        }, false);
        yield return ("msg-size-below-header", "msg_size 8 (below the 16-byte header)", (p, id) => p.Send(id, VfioUserCommand.DeviceGetInfo, default, messageSize: 8), true);
    }
}
