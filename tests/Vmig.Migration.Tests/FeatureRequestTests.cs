using Vmig.Migration;

namespace Vmig.Migration.Tests;

public class FeatureRequestTests
{
    private const int EINVAL = 22;
    private const int ENOTTY = 25;
    private const uint GET = 0x1_0000;
    private const uint SET = 0x2_0000;
    private const uint PROBE = 0x4_0000;

    private static readonly FeatureSupport? Migration = FeatureSupport.VfioUser(DeviceFeature.Migration);
    private static readonly FeatureSupport? MigState = FeatureSupport.VfioUser(DeviceFeature.MigDeviceState);

    private static (int Rc, FeatureAction Action) V(uint argsz, uint flags, FeatureSupport? s) =>
        (FeatureRequest.Validate(argsz, flags, s, out var a), a);

    [Fact]
    public void FeatureNumbersAreTheUapiValues()
    {
        Assert.Equal(1, (int)DeviceFeature.Migration);
        Assert.Equal(2, (int)DeviceFeature.MigDeviceState);
        Assert.Equal(6, (int)DeviceFeature.DmaLoggingStart);
        Assert.Equal(7, (int)DeviceFeature.DmaLoggingStop);
        Assert.Equal(8, (int)DeviceFeature.DmaLoggingReport);
        Assert.Equal(9, (int)DeviceFeature.MigDataSize);
        Assert.Equal(DeviceFeature.MigDeviceState, FeatureRequest.FeatureOf(0x0002_0002));
        Assert.Equal(DeviceFeature.DmaLoggingReport, FeatureRequest.FeatureOf(0x0005_0008));
    }

    [Theory]
    [InlineData(0u)]
    [InlineData(7u)]
    public void ArgszBelowHeaderIsEinvalEvenForUnknownFeatures(uint argsz)
    {
        Assert.Equal((EINVAL, FeatureAction.None), V(argsz, GET | 1, Migration));
        Assert.Equal((EINVAL, FeatureAction.None), V(argsz, GET | 0x1234, null));
    }

    [Theory]
    [InlineData(1u << 19)]
    [InlineData(1u << 31)]
    public void UnknownFlagBitsAreEinval(uint bit)
    {
        Assert.Equal((EINVAL, FeatureAction.None), V(16, GET | 1 | bit, Migration));
        Assert.Equal((EINVAL, FeatureAction.None), V(16, GET | 0x1234 | bit, null));
    }

    [Fact]
    public void GetAndSetTogetherWithoutProbeAreEinval()
    {
        Assert.Equal((EINVAL, FeatureAction.None), V(16, GET | SET | 2, MigState));
        // Header rule comes before the "not offered" answer.
        Assert.Equal((EINVAL, FeatureAction.None), V(16, GET | SET | 0x55, null));
    }

    [Fact]
    public void ProbeWithGetAndSetSucceedsWhenBothAreSupported()
    {
        Assert.Equal((0, FeatureAction.None), V(8, PROBE | GET | SET | 2, MigState));
    }

    [Fact]
    public void ProbeNamingAnUnsupportedOperationIsEinval()
    {
        Assert.Equal((EINVAL, FeatureAction.None), V(8, PROBE | SET | 1, Migration));
        Assert.Equal((EINVAL, FeatureAction.None), V(8, PROBE | GET | SET | 1, Migration));
    }

    [Fact]
    public void ProbeIgnoresThePayloadSize()
    {
        Assert.Equal((0, FeatureAction.None), V(8, PROBE | 1, Migration));
        Assert.Equal((0, FeatureAction.None), V(8, PROBE | GET | 1, Migration));
    }

    [Fact]
    public void FeatureNotOfferedIsEnotty()
    {
        Assert.Equal((ENOTTY, FeatureAction.None), V(16, GET | 1, null));
        Assert.Equal((ENOTTY, FeatureAction.None), V(8, PROBE | 1, null));
        Assert.Null(FeatureSupport.VfioUser(DeviceFeature.LowPowerEntry));
        Assert.Null(FeatureSupport.Kernel((DeviceFeature)0x77));
    }

    [Fact]
    public void NeitherGetNorSetWithoutProbeIsEinval()
    {
        Assert.Equal((EINVAL, FeatureAction.None), V(16, 2, MigState));
    }

    [Fact]
    public void UnsupportedOperationIsEinval()
    {
        Assert.Equal((EINVAL, FeatureAction.None), V(16, SET | 1, Migration));
        Assert.Equal((EINVAL, FeatureAction.None), V(40, SET | 8, FeatureSupport.VfioUser(DeviceFeature.DmaLoggingReport)));
        Assert.Equal((EINVAL, FeatureAction.None), V(8, GET | 7, FeatureSupport.VfioUser(DeviceFeature.DmaLoggingStop)));
        Assert.Equal((EINVAL, FeatureAction.None), V(16, SET | 9, FeatureSupport.VfioUser(DeviceFeature.MigDataSize)));
    }

    [Fact]
    public void PayloadShorterThanTheFeatureMinimumIsEinval()
    {
        Assert.Equal((EINVAL, FeatureAction.None), V(15, GET | 1, Migration));
        Assert.Equal((0, FeatureAction.Get), V(16, GET | 1, Migration));
        Assert.Equal((EINVAL, FeatureAction.None), V(15, SET | 2, MigState));
        Assert.Equal((0, FeatureAction.Set), V(16, SET | 2, MigState));
        Assert.Equal((0, FeatureAction.Get), V(16, GET | 2, MigState));
        Assert.Equal((0, FeatureAction.Set), V(8, SET | 7, FeatureSupport.VfioUser(DeviceFeature.DmaLoggingStop)));
    }

    [Fact]
    public void VfioUserInlineLayoutsNeedLessThanKernelPointerLayouts()
    {
        // vfio-user START = page_size, num_ranges, reserved (16); kernel adds the ranges pointer (24).
        Assert.Equal((0, FeatureAction.Set), V(8 + 16, SET | 6, FeatureSupport.VfioUser(DeviceFeature.DmaLoggingStart)));
        Assert.Equal((EINVAL, FeatureAction.None), V(8 + 16, SET | 6, FeatureSupport.Kernel(DeviceFeature.DmaLoggingStart)));
        Assert.Equal((0, FeatureAction.Set), V(8 + 24, SET | 6, FeatureSupport.Kernel(DeviceFeature.DmaLoggingStart)));
        // vfio-user REPORT = iova, length, page_size (24); kernel adds the bitmap pointer (32).
        Assert.Equal((0, FeatureAction.Get), V(8 + 24, GET | 8, FeatureSupport.VfioUser(DeviceFeature.DmaLoggingReport)));
        Assert.Equal((EINVAL, FeatureAction.None), V(8 + 24, GET | 8, FeatureSupport.Kernel(DeviceFeature.DmaLoggingReport)));
        Assert.Equal((0, FeatureAction.Get), V(8 + 32, GET | 8, FeatureSupport.Kernel(DeviceFeature.DmaLoggingReport)));
        Assert.Equal((0, FeatureAction.Get), V(16, GET | 9, FeatureSupport.Kernel(DeviceFeature.MigDataSize)));
    }
}
