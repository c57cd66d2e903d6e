using Vmig.Guest.Workloads;
using Vmig.Vmm;

namespace Vmig.Vmm.Tests;

public class VcpuTests
{
    [Fact]
    public void Pause_StopsAtAConsistentPointAndResumeContinues()
    {
        using var vm = TestVms.Dirtier(8, "gpa=1M,size=4M,rate=0");
        vm.Start();
        TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 20);
        for (int i = 0; i < 5; i++)
        {
            ulong before = TestVms.PauseAndVerify(vm);
            long slices = vm.Vcpus[0].Slices;
            byte[] regs = vm.Vcpus[0].Registers;
            Thread.Sleep(30);
            Assert.Equal(slices, vm.Vcpus[0].Slices);
            Assert.Equal(regs, vm.Vcpus[0].Registers);
            Assert.Equal(VmRunState.Paused, vm.State);
            vm.Resume();
            TestVms.WaitUntil(() => vm.Vcpus[0].Slices > slices + 3);
            Assert.True(TestVms.PauseAndVerify(vm) > before);
            vm.Resume();
        }
    }

    [Fact]
    public void Verify_DetectsRamThatDisagreesWithTheRegisters()
    {
        using var vm = TestVms.Dirtier(4, "gpa=0,size=1M,rate=0");
        vm.Start();
        TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 10);
        TestVms.PauseAndVerify(vm);
        vm.Memory.WriteUInt32(4096 * 17 + 100, 0xDEAD);
        Assert.Equal(1, MemoryDirtier.Verify(vm.Memory, vm.Vcpus[0].Registers));
    }

    [Fact]
    public void Throttle_KeepsTheDirtyRateNearTheSetting()
    {
        using var vm = TestVms.Dirtier(8, "gpa=0,size=4M,rate=20");
        Thread.Sleep(300); // credit accrued before the vCPU starts must not turn into a burst
        vm.Start();
        Thread.Sleep(500);
        ulong written = TestVms.PauseAndVerify(vm);
        // 20 MiB/s for ~0.5 s (+ one slice of burst): far under the unthrottled GiB/s, and not stalled.
        Assert.InRange(written, 2 * TestVms.MiB, 11 * TestVms.MiB);
    }

    [Fact]
    public void BadProgramArguments_FailVmCreation()
    {
        Assert.Throws<FormatException>(() => TestVms.Dirtier(4, "gpa=3M,size=2M"));
        Assert.Throws<FormatException>(() => TestVms.Dirtier(4, "size=banana"));
    }
}
