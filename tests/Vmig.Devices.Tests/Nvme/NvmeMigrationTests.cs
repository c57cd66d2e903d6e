using Vmig.Spec;
using System.Buffers.Binary;
using Vmig.Devices.Nvme;
using Vmig.Guest.Nvme;
using Vmig.Spec.Nvme;

using static Vmig.Devices.Tests.Nvme.NvmeTestLayout;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>TP4159 on the primary: suspend, get/set controller state, resume, naming the secondary by CNTLID.</summary>
public sealed class NvmeMigrationTests
{

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Secondary_with_io_in_flight_moves_to_another_subsystem_and_every_write_lands_once(bool shadow)
    {
        using var src = new NvmeRig();
        src.ProvisionVf(1);
        var (ramA, fnA) = src.Connect(1, vectors: 5);
        var drvA = NvmeDriver.Initialize(ramA, fnA, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2, ShadowDoorbells = shadow });
        // Acknowledged before migration:
        ramA.Write(Buf, Pattern(4096, 1));
        Assert.True(drvA.Write(1, src.Nsid, 0, 8, 512, Buf).IsSuccess);
        // An AER stays outstanding across the move.
        ushort aer = drvA.Submit(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.AsynchronousEventRequest });
        // Completed by the device but not yet reaped by the guest:
        ramA.Write(Buf + 0x10000, Pattern(512, 2));
        ushort done = drvA.Submit(1, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, src.Nsid, 100, 1), Buf + 0x10000, 512, tag: 2);
        Thread.Sleep(shadow ? 20 : 0);

        var mig = src.Subsystem.Migration;
        Assert.True(mig.Suspend(1, SuspendType.Notification).IsSuccess);
        Assert.True(mig.Suspend(1, SuspendType.Suspend).IsSuccess);
        // Submitted while suspended: the doorbell is recorded, nothing is fetched.
        var inflight = new List<(ushort Cid, int Q, ulong Lba, int Seed)>();
        for (int i = 0; i < 6; i++)
        {
            int q = 1 + (i % 2);
            ulong buf = Buf + 0x20000 + (ulong)(i * 4096);
            ramA.Write(buf, Pattern(4096, 10 + i));
            inflight.Add((drvA.Submit(q, NvmeDriver.ReadWrite(NvmeIoOpcode.Write, src.Nsid, 200 + (ulong)(i * 8), 8), buf, 4096, tag: (ulong)(10 + i)), q, 200 + (ulong)(i * 8), 10 + i));
        }
        Thread.Sleep(20);
        Assert.Equal(new byte[4096], src.ReadFile(200 * 512, 4096));
        Assert.True(mig.GetControllerState(1, out byte[] state).IsSuccess);

        // Target: another subsystem on the same (shared) namespace file, RAM copied.
        using var dst = new NvmeRig(sharedNamespacePath: src.NamespacePath);
        dst.ProvisionVf(1);
        var (ramB, fnB) = dst.Connect(1, vectors: 5);
        ramB.CopyFrom(ramA);
        var tmig = dst.Subsystem.Migration;
        Assert.True(tmig.Suspend(1, SuspendType.Suspend).IsSuccess);
        Assert.True(tmig.SetControllerState(1, state, out string err).IsSuccess, err);
        Assert.True(tmig.Resume(1).IsSuccess);
        Assert.True(dst.Subsystem.Secondaries[0].IsReady);

        var drvB = NvmeDriver.Attach(ramB, fnB, Region);
        Assert.True(drvB.Wait(1, done, 2000).Status.IsSuccess);
        foreach (var (cid, q, lba, seed) in inflight)
        {
            var c = drvB.Wait(q, cid, 2000);
            Assert.True(c.Status.IsSuccess);
            Assert.Equal((ulong)seed, c.Tag);
            Assert.Equal(Pattern(4096, seed), src.ReadFile((long)lba * 512, 4096));
        }
        Assert.Equal(Pattern(4096, 1), src.ReadFile(0, 4096));
        Assert.Equal(Pattern(512, 2), src.ReadFile(100 * 512, 512));
        // The source never ran them: resuming the source (the abort path) now would run them there instead; here the
        // source is left suspended, as the migration flow does after a successful switchover.
        Assert.Equal(true, mig.IsSuspended(1));
        // The AER travelled: an error event on the target completes it.
        fnB.MmioWrite(0, (ulong)NvmeRegisters.SqTailDoorbell(9), BitConverter.GetBytes(1u));
        Assert.Equal(AsyncEventType.ErrorStatus, AsyncEvent.FromDw0(drvB.Wait(0, aer, 2000).Dw0).Type);
        // New I/O on the target works.
        ramB.Write(Buf, Pattern(512, 99));
        Assert.True(drvB.Write(2, dst.Nsid, 999, 1, 512, Buf).IsSuccess);
        Assert.Equal(Pattern(512, 99), src.ReadFile(999 * 512, 512));
    }

    [Fact]
    public void Host_api_and_primary_admin_commands_give_byte_identical_state()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        var (vram, vfn) = rig.Connect(1, vectors: 5);
        var vf = NvmeDriver.Initialize(vram, vfn, Region, RegionSize);
        vram.Write(Buf, Pattern(512, 3));
        Assert.True(vf.Write(1, rig.Nsid, 5, 1, 512, Buf).IsSuccess);
        Assert.Equal(NvmeStatus.InvalidNamespaceOrFormat, vf.Read(1, 9, 5, 1, 512, Buf)); // an error log entry in the state

        var (pram, pfn) = rig.Connect(0);
        var pf = NvmeDriver.Initialize(pram, pfn, Region, RegionSize, new NvmeDriverOptions { Interrupts = false });
        Assert.True((pf.IdentifyController().Oacs & OptionalAdminCommands.HostManagedLiveMigration) != 0);
        byte[] fmt = pf.IdentifyRaw(IdentifyCns.SupportedControllerStateFormats, 0, 0);
        Assert.Equal(1, fmt[0]);

        Assert.True(pf.SuspendSecondary(1).IsSuccess);
        byte[] viaAdmin = pf.GetSecondaryState(1, out bool csup);
        Assert.True(csup);
        Assert.True(ControllerStateHeader.TryRead(viaAdmin, out var hdr));
        Assert.True(hdr.Suspended);
        Assert.True(rig.Subsystem.Migration.GetControllerState(1, out byte[] viaHost).IsSuccess);
        Assert.Equal(viaHost, viaAdmin);

        // Set Controller State through the admin queue (SEQIND chunks when larger than one transfer), then Resume.
        Assert.True(pf.SetSecondaryState(1, viaAdmin).IsSuccess);
        Assert.True(pf.ResumeSecondary(1).IsSuccess);
        Assert.Equal(NvmeStatus.ControllerNotSuspended, pf.ResumeSecondary(1));
        Assert.True(vf.Read(2, rig.Nsid, 5, 1, 512, Buf + 4096).IsSuccess);
        byte[] back = new byte[512];
        vram.Read(Buf + 4096, back);
        Assert.Equal(Pattern(512, 3), back);
    }

    [Fact]
    public void Misuse_gets_its_status()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        var mig = rig.Subsystem.Migration;
        Assert.Equal(NvmeStatus.InvalidControllerIdentifier, mig.Suspend(0, SuspendType.Suspend));
        Assert.Equal(NvmeStatus.InvalidControllerIdentifier, mig.Suspend(9, SuspendType.Suspend));
        Assert.Equal(NvmeStatus.InvalidControllerIdentifier, mig.Resume(9));
        Assert.Equal(NvmeStatus.ControllerNotSuspended, mig.Resume(1));
        Assert.Equal(NvmeStatus.ControllerNotSuspended, mig.GetControllerState(1, out _));
        Assert.Equal(NvmeStatus.ControllerNotSuspended, mig.SetControllerState(1, new byte[100], out _));
        Assert.True(mig.Suspend(1, SuspendType.Suspend).IsSuccess);
        Assert.Equal(NvmeStatus.ControllerSuspended, mig.Suspend(1, SuspendType.Suspend));
        Assert.Equal(NvmeStatus.InvalidField, mig.Suspend(1, (SuspendType)7));

        // Through the admin queue: unknown select, and Migration Receive naming the primary.
        var (pram, pfn) = rig.Connect(0);
        var pf = NvmeDriver.Initialize(pram, pfn, Region, RegionSize, new NvmeDriverOptions { Interrupts = false });
        ulong buf = pf.Allocate(4096);
        Assert.Equal(NvmeStatus.InvalidField, pf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationSend, Cdw10 = 9, Cdw11 = 1 }).Status);
        Assert.Equal(NvmeStatus.InvalidControllerIdentifier,
            pf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationReceive, Cdw11 = 0, Cdw15 = 1023 }, buf, 4096).Status);
        // A Set chunk out of sequence (middle without first) is refused.
        Assert.Equal(NvmeStatus.InvalidField,
            pf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationSend, Cdw10 = 2, Cdw11 = 1, Cdw12 = 4096, Cdw15 = 1023 }, buf, 4096).Status);
        // A secondary cannot migrate anything.
        var (vram, vfn) = rig.Connect(1, vectors: 5);
        Assert.True(mig.Resume(1).IsSuccess);
        var vf = NvmeDriver.Initialize(vram, vfn, Region, RegionSize);
        Assert.Equal(NvmeStatus.InvalidOpcode, vf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationSend, Cdw11 = 1 }).Status);
    }

    private static (NvmeRig Rig, byte[] State) SavedState()
    {
        var rig = new NvmeRig();
        rig.ProvisionVf(1);
        var (ram, fn) = rig.Connect(1, vectors: 5);
        NvmeDriver.Initialize(ram, fn, Region, RegionSize);
        Assert.True(rig.Subsystem.Migration.Suspend(1, SuspendType.Suspend).IsSuccess);
        Assert.True(rig.Subsystem.Migration.GetControllerState(1, out var s).IsSuccess);
        return (rig, s);
    }

    [Fact]
    public void Corrupt_truncated_foreign_and_incompatible_states_are_refused_and_the_target_stays_clean()
    {
        var (srcRig, state) = SavedState();
        using var srcOwner = srcRig;
        using var dst = new NvmeRig(sharedNamespacePath: srcRig.NamespacePath);
        dst.ProvisionVf(1);
        var mig = dst.Subsystem.Migration;
        Assert.True(mig.Suspend(1, SuspendType.Suspend).IsSuccess);
        byte[] before = NvmeStateCodec.Save(dst.Subsystem.Secondaries[0].State, mig.ProfileOf(1));

        byte[] corrupt = (byte[])state.Clone();
        corrupt[state.Length / 2] ^= 0x40;
        Assert.Equal(NvmeStatus.InvalidField, mig.SetControllerState(1, corrupt, out string e1));
        Assert.Contains("CRC32C", e1);

        Assert.Equal(NvmeStatus.InvalidField, mig.SetControllerState(1, state.AsSpan(0, state.Length - 8), out string e2));
        Assert.Contains("do not add up", e2);
        Assert.Equal(NvmeStatus.InvalidField, mig.SetControllerState(1, state.AsSpan(0, 10), out _));

        byte[] foreign = (byte[])state.Clone();
        int nvmeBytes = (int)(BinaryPrimitives.ReadUInt32LittleEndian(foreign.AsSpan(16)) * 4);
        BinaryPrimitives.WriteUInt32LittleEndian(foreign.AsSpan(ControllerStateHeader.Size + nvmeBytes), 0x12345678);
        BinaryPrimitives.WriteUInt32LittleEndian(foreign.AsSpan(foreign.Length - 4), Vmig.Spec.Crc32C.Compute(foreign.AsSpan(0, foreign.Length - 4)));
        Assert.Equal(NvmeStatus.InvalidField, mig.SetControllerState(1, foreign, out string e3));
        Assert.Contains("foreign", e3);

        Assert.Equal(before, NvmeStateCodec.Save(dst.Subsystem.Secondaries[0].State, mig.ProfileOf(1)));
        Assert.True(mig.SetControllerState(1, state, out string ok).IsSuccess, ok);
    }

    [Theory]
    [InlineData("lba", "LBA format")]
    [InlineData("queues", "queue resources")]
    [InlineData("vectors", "interrupt vector resources")]
    [InlineData("namespaces", "attached namespaces")]
    public void A_target_with_a_different_profile_is_refused_naming_the_difference(string what, string message)
    {
        var (srcRig, state) = SavedState();
        using var srcOwner = srcRig;
        using var dst = what == "lba" ? new NvmeRig(lbaSize: 4096) : new NvmeRig();
        dst.ProvisionVf(1, queues: (ushort)(what == "queues" ? 4 : 5), vectors: (ushort)(what == "vectors" ? 4 : 5), attach: what != "namespaces");
        var mig = dst.Subsystem.Migration;
        Assert.True(mig.Suspend(1, SuspendType.Suspend).IsSuccess);
        Assert.Equal(NvmeStatus.InvalidField, mig.SetControllerState(1, state, out string err));
        Assert.Contains(message, err);
    }

    [Fact]
    public void Migration_never_touches_the_guest_dma_windows()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        CountingDma? counter = null;
        var (ram, fn) = rig.Connect(1, vectors: 5, wrapDma: d => counter = new CountingDma(d));
        var drv = NvmeDriver.Initialize(ram, fn, Region, RegionSize);
        ushort cid = drv.Submit(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.AsynchronousEventRequest });
        var mig = rig.Subsystem.Migration;
        Assert.True(mig.Suspend(1, SuspendType.Suspend).IsSuccess);
        // The baseline is taken once suspended: until then the shadow-doorbell poller may legitimately read guest RAM.
        long start = Interlocked.Read(ref counter!.Accesses);
        Assert.True(mig.GetControllerState(1, out var st).IsSuccess);
        Assert.True(mig.SetControllerState(1, st, out string err).IsSuccess, err);
        Assert.True(mig.GetControllerState(1, out var st2).IsSuccess);
        Assert.Equal(st, st2);
        // A bad doorbell rung while suspended raises an event that waits in the state: still no DMA.
        fn.MmioWrite(0, (ulong)NvmeRegisters.SqTailDoorbell(7), BitConverter.GetBytes(3u));
        Assert.True(mig.GetControllerState(1, out var st3).IsSuccess);
        Assert.NotEqual(st, st3);
        Assert.Equal(start, Interlocked.Read(ref counter.Accesses));
        Assert.True(mig.Resume(1).IsSuccess);
        Assert.True(drv.Wait(0, cid, 2000).Status.IsSuccess); // the event raised while suspended is delivered after resume
    }

    [Fact]
    public void Controller_data_queue_logs_the_lba_ranges_a_secondary_changes()
    {
        using var rig = new NvmeRig();
        rig.ProvisionVf(1);
        var (vram, vfn) = rig.Connect(1, vectors: 5);
        var vf = NvmeDriver.Initialize(vram, vfn, Region, RegionSize);
        Assert.True(rig.Subsystem.AttachNamespace(rig.Nsid, [0]).IsSuccess);
        var (pram, pfn) = rig.Connect(0);
        var pf = NvmeDriver.Initialize(pram, pfn, Region, RegionSize, new NvmeDriverOptions { Interrupts = false });
        ulong cdq = pf.Allocate(4096);
        var create = new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.ControllerDataQueue, Cdw11 = 1 | (1u << 16), Cdw12 = 64, Prp1 = cdq }; // 8 entries
        Assert.Equal(NvmeStatus.InvalidControllerIdentifier, pf.ExecuteRaw(0, create with { Cdw11 = 1 }).Status);
        Assert.Equal(NvmeStatus.InvalidField, pf.ExecuteRaw(0, create with { Cdw11 = 1u << 16 }).Status);
        uint cdqid = pf.Execute(0, create).Dw0;
        var track = new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.TrackSend, Cdw10 = 0 | (1u << 16), Cdw11 = cdqid };
        pf.Execute(0, track);

        vram.Write(Buf, Pattern(4096, 1));
        Assert.True(vf.Write(1, rig.Nsid, 100, 8, 512, Buf).IsSuccess);
        Assert.True(vf.ExecuteRaw(1, NvmeDriver.ReadWrite(NvmeIoOpcode.WriteZeroes, rig.Nsid, 500, 4)).Status.IsSuccess);
        Assert.True(vf.Read(1, rig.Nsid, 100, 8, 512, Buf).IsSuccess); // reads are not logged
        UserDataChangeEntry Entry(int i)
        {
            byte[] b = new byte[32];
            pram.Read(cdq + (ulong)(i * 32), b);
            UserDataChangeEntry.TryRead(b, out var e);
            return e;
        }
        Assert.Equal(new UserDataChangeEntry(rig.Nsid, 8, 100, true, 0, 0), Entry(0));
        Assert.Equal(new UserDataChangeEntry(rig.Nsid, 4, 500, true, 0, 0), Entry(1));
        Assert.False(Entry(2).Phase);

        // Consume two, then fill the queue: the last free slot gets the "queue full" marker and logging stops.
        pf.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.SetFeatures, Cdw10 = (uint)FeatureId.ControllerDataQueue, Cdw11 = cdqid, Cdw12 = 2 });
        Assert.Equal(2u, pf.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.GetFeatures, Cdw10 = (uint)FeatureId.ControllerDataQueue, Cdw11 = cdqid }).Dw0);
        for (int i = 0; i < 10; i++)
        {
            Assert.True(vf.ExecuteRaw(1, NvmeDriver.ReadWrite(NvmeIoOpcode.WriteZeroes, rig.Nsid, (ulong)(1000 + i), 1)).Status.IsSuccess);
        }
        Assert.Equal(new UserDataChangeEntry(rig.Nsid, 1, 1000, true, 0, 0), Entry(2));
        Assert.Equal(UserDataChangeEntry.EsaLastQueueFull, Entry(0).Esa); // slot 0 after wrap: phase flipped
        Assert.False(Entry(0).Phase);

        // Restart logging after consuming everything; a suspend ends it with the "suspended" marker and DUDMQ deletes the queue.
        pf.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.SetFeatures, Cdw10 = (uint)FeatureId.ControllerDataQueue, Cdw11 = cdqid, Cdw12 = 1 });
        pf.Execute(0, track);
        pf.Execute(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationSend, Cdw10 = 0, Cdw11 = 1 | (1u << 16) | (1u << 31) });
        Assert.Equal((UserDataChangeEntry.EsaLastSuspended, false), (Entry(1).Esa, Entry(1).Phase));
        Assert.Equal(NvmeStatus.InvalidQueueIdentifier, pf.ExecuteRaw(0, track).Status);
    }

    [Fact]
    public void Set_controller_state_in_first_middle_last_chunks_through_the_admin_queue()
    {
        var (rig, state) = SavedState();
        using var owner = rig;
        var (pram, pfn) = rig.Connect(0);
        var pf = NvmeDriver.Initialize(pram, pfn, Region, RegionSize, new NvmeDriverOptions { Interrupts = false });
        ulong buf = pf.Allocate(4096);
        const int Chunk = 128;
        byte[] padded = new byte[(state.Length + Chunk - 1) / Chunk * Chunk];
        state.CopyTo(padded, 0);
        int chunks = padded.Length / Chunk;
        Assert.True(chunks >= 3);
        for (int i = 0; i < chunks; i++)
        {
            uint seq = i == 0 ? 1u : i == chunks - 1 ? 2u : 0u;
            pram.Write(buf, padded.AsSpan(i * Chunk, Chunk));
            var set = new SubmissionQueueEntry
            {
                Opcode = (byte)NvmeAdminOpcode.MigrationSend, Cdw10 = 2 | (seq << 16), Cdw11 = 1, Cdw12 = (uint)(i * Chunk), Cdw15 = (Chunk / 4) - 1,
            };
            Assert.True(pf.ExecuteRaw(0, set, buf, Chunk).Status.IsSuccess);
        }
        Assert.True(rig.Subsystem.Migration.GetControllerState(1, out var after).IsSuccess);
        Assert.Equal(state, after);
        // A last chunk whose offset does not continue the sequence is refused.
        pram.Write(buf, padded.AsSpan(0, Chunk));
        Assert.True(pf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationSend, Cdw10 = 2 | (1u << 16), Cdw11 = 1, Cdw15 = (Chunk / 4) - 1 }, buf, Chunk).Status.IsSuccess);
        Assert.Equal(NvmeStatus.InvalidField, pf.ExecuteRaw(0, new SubmissionQueueEntry { Opcode = (byte)NvmeAdminOpcode.MigrationSend, Cdw10 = 2 | (2u << 16), Cdw11 = 1, Cdw12 = 4 * Chunk, Cdw15 = (Chunk / 4) - 1 }, buf, Chunk).Status);
    }

    [Fact]
    public void An_abort_marked_sq_slot_travels_in_the_state_and_one_naming_no_sq_is_refused()
    {
        using var src = new NvmeRig();
        src.ProvisionVf(1);
        var (ram, fn) = src.Connect(1, vectors: 5);
        NvmeDriver.Initialize(ram, fn, Region, RegionSize, new NvmeDriverOptions { IoQueues = 2 });
        var ctrl = src.Subsystem.GetController(1)!;
        ctrl.WithLock(s =>
        {
            s.AbortedSlots.Add((2, 5)); // as Abort leaves it for a command still waiting in SQ 2
            return 0;
        });
        var mig = src.Subsystem.Migration;
        Assert.True(mig.Suspend(1, SuspendType.Suspend).IsSuccess);
        Assert.True(mig.GetControllerState(1, out byte[] state).IsSuccess);

        using var dst = new NvmeRig(sharedNamespacePath: src.NamespacePath);
        dst.ProvisionVf(1);
        var tmig = dst.Subsystem.Migration;
        Assert.True(tmig.Suspend(1, SuspendType.Suspend).IsSuccess);
        Assert.True(tmig.SetControllerState(1, state, out string err).IsSuccess, err);
        Assert.Equal([((ushort)2, (ushort)5)], dst.Subsystem.GetController(1)!.WithLock(s => s.AbortedSlots.ToArray()));

        ctrl.WithLock(s =>
        {
            s.AbortedSlots.Add((7, 0)); // no SQ 7
            return 0;
        });
        Assert.True(mig.GetControllerState(1, out byte[] bad).IsSuccess);
        Assert.Equal(NvmeStatus.InvalidField, tmig.SetControllerState(1, bad, out err));
        Assert.Contains("aborted slot", err, StringComparison.Ordinal);
    }
}
