using System.Text;
using Vmig.Conformance;
using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;
using static Vmig.VfioUser.Tests.TestServer;

namespace Vmig.VfioUser.Tests;

/// <summary>
/// Golden bytes on a real socket in both directions: literal requests sent to the server must get literal replies;
/// the client's requests must be literal bytes; server→client DMA_READ/DMA_WRITE must get literal replies.
/// </summary>
public sealed class WireGoldenTests
{
    private static void Exchange(RawPeer p, string request, string reply, int fds = 0)
    {
        p.SendBytes(Hex(request));
        var r = p.Receive(5000)!;
        var bytes = new byte[16 + r.Payload.Length];
        r.Header.WriteTo(bytes);
        r.Payload.CopyTo(bytes, 16);
        Assert.Equal(Convert.ToHexString(Hex(reply)), Convert.ToHexString(bytes));
        Assert.Equal(fds, r.FdCount);
    }

    [Fact]
    public void Server_answers_literal_requests_with_literal_replies()
    {
        using var s = new TestServer();
        using var p = s.Raw();
        // DEVICE_GET_INFO: PCI|RESET, 9 regions, 5 irqs.
        Exchange(p, "01 01 04 00 20 00 00 00 00 00 00 00 00 00 00 00 | 10 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00",
            "01 01 04 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 03 00 00 00 09 00 00 00 05 00 00 00");
        // DEVICE_GET_REGION_INFO BAR0 (argsz 256): READ|WRITE|MMAP|CAPS, 64 KiB, sparse cap {0x1000, 0xF000}, one fd.
        Exchange(p, "02 01 05 00 30 00 00 00 00 00 00 00 00 00 00 00 | 00 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00",
            "02 01 05 00 50 00 00 00 01 00 00 00 00 00 00 00 | 40 00 00 00 0f 00 00 00 00 00 00 00 20 00 00 00 00 00 01 00 00 00 00 00 00 00 00 00 00 00 00 00"
            + " 01 00 01 00 00 00 00 00 01 00 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00 f0 00 00 00 00 00 00", fds: 1);
        // DEVICE_GET_REGION_IO_FDS: none offered.
        Exchange(p, "03 01 06 00 20 00 00 00 00 00 00 00 00 00 00 00 | 10 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00",
            "03 01 06 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00");
        // DEVICE_GET_IRQ_INFO MSI-X: EVENTFD|NORESIZE, 4 vectors.
        Exchange(p, "04 01 07 00 20 00 00 00 00 00 00 00 00 00 00 00 | 10 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00",
            "04 01 07 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 09 00 00 00 02 00 00 00 04 00 00 00");
        // REGION_READ config[0..4): vendor 0x1af4, device 0x10f0.
        Exchange(p, "05 01 09 00 20 00 00 00 00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 07 00 00 00 04 00 00 00",
            "05 01 09 00 24 00 00 00 01 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 07 00 00 00 04 00 00 00 f4 1a f0 10");
        // REGION_WRITE config[0x40..0x44): the reply echoes the head without data.
        Exchange(p, "06 01 0a 00 24 00 00 00 00 00 00 00 00 00 00 00 | 40 00 00 00 00 00 00 00 07 00 00 00 04 00 00 00 de ad be ef",
            "06 01 0a 00 20 00 00 00 01 00 00 00 00 00 00 00 | 40 00 00 00 00 00 00 00 07 00 00 00 04 00 00 00");
        // REGION_WRITE_MULTI, 1 entry of 4 bytes: the reply carries wr_cnt.
        Exchange(p, "07 01 0f 00 30 00 00 00 00 00 00 00 00 00 00 00 | 01 00 00 00 00 00 00 00 | 44 00 00 00 00 00 00 00 07 00 00 00 04 00 00 00 01 02 03 04 00 00 00 00",
            "07 01 0f 00 18 00 00 00 01 00 00 00 00 00 00 00 | 01 00 00 00 00 00 00 00");
        Exchange(p, "08 01 09 00 20 00 00 00 00 00 00 00 00 00 00 00 | 40 00 00 00 00 00 00 00 07 00 00 00 08 00 00 00",
            "08 01 09 00 28 00 00 00 01 00 00 00 00 00 00 00 | 40 00 00 00 00 00 00 00 07 00 00 00 08 00 00 00 de ad be ef 01 02 03 04");
        // DMA_MAP of a window without an fd, then DMA_UNMAP (reply echoes the request).
        Exchange(p, "09 01 02 00 30 00 00 00 00 00 00 00 00 00 00 00 | 20 00 00 00 03 00 00 00 00 00 00 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00 01 00 00 00 00 00",
            "09 01 02 00 10 00 00 00 01 00 00 00 00 00 00 00");
        Exchange(p, "0a 01 03 00 28 00 00 00 00 00 00 00 00 00 00 00 | 18 00 00 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00 01 00 00 00 00 00",
            "0a 01 03 00 28 00 00 00 01 00 00 00 00 00 00 00 | 18 00 00 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00 01 00 00 00 00 00");
        // DEVICE_SET_IRQS DATA_NONE|ACTION_TRIGGER, count 0: disable MSI-X.
        Exchange(p, "0b 01 08 00 24 00 00 00 00 00 00 00 00 00 00 00 | 14 00 00 00 21 00 00 00 02 00 00 00 00 00 00 00 00 00 00 00",
            "0b 01 08 00 10 00 00 00 01 00 00 00 00 00 00 00");
        // Reference §3.4: PROBE migration (argsz 8, flags 0x00040001, msg_size 24) → echo.
        Exchange(p, "0c 01 10 00 18 00 00 00 00 00 00 00 00 00 00 00 | 08 00 00 00 01 00 04 00",
            "0c 01 10 00 18 00 00 00 01 00 00 00 00 00 00 00 | 08 00 00 00 01 00 04 00");
        // GET MIGRATION (msg_size 24) → msg_size 32 with flags. No vmig extension negotiated: P2P hidden, SC|PRE = 5.
        Exchange(p, "0d 01 10 00 18 00 00 00 00 00 00 00 00 00 00 00 | 10 00 00 00 01 00 01 00",
            "0d 01 10 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 01 00 01 00 05 00 00 00 00 00 00 00");
        // SET MIG_DEVICE_STATE → STOP_COPY (3), data_fd 0xFFFFFFFF → echo.
        Exchange(p, "0e 01 10 00 20 00 00 00 00 00 00 00 00 00 00 00 | 10 00 00 00 02 00 02 00 03 00 00 00 ff ff ff ff",
            "0e 01 10 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 02 00 02 00 03 00 00 00 ff ff ff ff");
        // GET MIG_DEVICE_STATE: device_state at payload offset 8.
        Exchange(p, "0f 01 10 00 18 00 00 00 00 00 00 00 00 00 00 00 | 10 00 00 00 02 00 01 00",
            "0f 01 10 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 02 00 01 00 03 00 00 00 ff ff ff ff");
        // MIG_DATA_READ of 8 bytes: the stream starts with "SAMP" and the BAR size 0x10000.
        Exchange(p, "10 01 11 00 18 00 00 00 00 00 00 00 00 00 00 00 | 10 00 00 00 08 00 00 00",
            "10 01 11 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 08 00 00 00 50 4d 41 53 00 00 01 00");
        // MIG_DATA_WRITE outside RESUMING → error reply REPLY|ERROR, EINVAL (22).
        Exchange(p, "11 01 12 00 1c 00 00 00 00 00 00 00 00 00 00 00 | 08 00 00 00 04 00 00 00 01 02 03 04",
            "11 01 12 00 10 00 00 00 21 00 00 00 16 00 00 00");
        // DEVICE_RESET: empty reply; back to RUNNING.
        Exchange(p, "12 01 0d 00 10 00 00 00 00 00 00 00 00 00 00 00", "12 01 0d 00 10 00 00 00 01 00 00 00 00 00 00 00");
        Assert.Equal((int)DeviceState.Running, p.GetState(5000));
    }

    [Fact]
    public void Server_answers_qemus_version_offer_with_a_literal_subset()
    {
        using var s = new TestServer();
        using var p = s.Raw(negotiate: false);
        // QEMU's client offer (reference §3.3), proposing 0.0.
        const string offer = """{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}""";
        const string answer = """{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"max_dma_maps":65535,"pgsizes":4096,"write_multiple":true,"migration":{"pgsize":4096}}}""";
        byte[] request = [0x01, 0x00, 0x01, 0x00, (byte)(16 + 4 + offer.Length + 1), 0x00, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x00, 0x00, .. Encoding.ASCII.GetBytes(offer), 0x00];
        byte[] reply = [0x01, 0x00, 0x01, 0x00, (byte)(16 + 4 + answer.Length + 1), 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x00, 0x00, .. Encoding.ASCII.GetBytes(answer), 0x00];
        Assert.True(request.Length < 256 && reply.Length < 256);
        p.SendBytes(request);
        Assert.Equal(Convert.ToHexString(reply), Convert.ToHexString(Frame(p.Receive(5000)!)));
    }

    private sealed class ArrayDma(byte[] memory, ulong baseIova) : IClientDmaHandler
    {
        public int Read(ulong address, Span<byte> destination)
        {
            memory.AsSpan((int)(address - baseIova), destination.Length).CopyTo(destination);
            return 0;
        }

        public int Write(ulong address, ReadOnlySpan<byte> source)
        {
            source.CopyTo(memory.AsSpan((int)(address - baseIova)));
            return 0;
        }
    }

    [Fact]
    public async Task Client_sends_literal_requests_and_answers_server_dma_with_literal_replies()
    {
        var (a, b) = FdSocket.CreatePair();
        using var server = new RawPeer(b) { AnswerPeerCommands = false };
        var attach = Task.Run(() => VfioUserClient.Attach(a));
        var version = server.Receive(10_000)!;
        const string offer = """{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"max_dma_maps":65535,"pgsizes":4096,"write_multiple":true,"migration":{"pgsize":4096,"max_bitmap_size":268435456},"vmig":{"mig_data_size":true,"precopy_info":true,"p2p":true}}}""";
        byte[] expectPayload = [0x00, 0x00, 0x02, 0x00, .. Encoding.ASCII.GetBytes(offer), 0x00];
        Assert.Equal(new VfioUserHeader(1, VfioUserCommand.Version, (uint)(16 + expectPayload.Length), VfioUserHeaderFlags.Command).ToString(), version.Header.ToString());
        Assert.Equal(Encoding.ASCII.GetString(expectPayload), Encoding.ASCII.GetString(version.Payload));
        server.Send(1, VfioUserCommand.Version, RawPeer.VersionPayload(0, 1, """{"capabilities":{"max_msg_fds":8,"vmig":{"p2p":true}}}"""), flags: VfioUserHeaderFlags.Reply);
        using var client = await attach;
        Assert.Equal(1, client.Minor);
        Assert.True(client.SupportsP2P);
        var memory = new byte[0x10000];
        client.DmaHandler = new ArrayDma(memory, 0x10000);

        var flags = Task.Run(client.GetMigrationFlags);
        Assert.Equal("02001000180000000000000000000000" + "1000000001000100", Convert.ToHexString(Frame(server.Receive(5000)!)));
        server.SendBytes(Hex("02 00 10 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 01 00 01 00 07 00 00 00 00 00 00 00"));
        Assert.Equal(MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, await flags);

        var set = Task.Run(() => client.SetState(DeviceState.StopCopy));
        Assert.Equal("03001000200000000000000000000000" + "1000000002000200" + "03000000FFFFFFFF", Convert.ToHexString(Frame(server.Receive(5000)!)));
        server.SendBytes(Hex("03 00 10 00 20 00 00 00 01 00 00 00 00 00 00 00 | 10 00 00 00 02 00 02 00 03 00 00 00 ff ff ff ff"));
        Assert.Equal(DeviceState.StopCopy, await set);

        var read = Task.Run(() => client.ReadMigrationData(4096, Stream.Null));
        Assert.Equal("04001100180000000000000000000000" + "0810000000100000", Convert.ToHexString(Frame(server.Receive(5000)!)));
        server.SendBytes(Hex("04 00 11 00 1a 00 00 00 01 00 00 00 00 00 00 00 | 0a 00 00 00 02 00 00 00 aa bb"));
        Assert.Equal(2, await read);

        using var mem = MemFd.Create("golden", 0x10000);
        var map = Task.Run(() => client.DmaMap(0x10000, 0x10000, mem, 0, DmaProt.Read | DmaProt.Write));
        var m = server.Receive(5000)!;
        Assert.Equal("05000200300000000000000000000000" + "2000000003000000" + "0000000000000000" + "0000010000000000" + "0000010000000000", Convert.ToHexString(Frame(m)));
        Assert.Equal(1, m.FdCount);
        server.SendBytes(Hex("05 00 02 00 10 00 00 00 01 00 00 00 00 00 00 00"));
        await map.WaitAsync(TimeSpan.FromSeconds(5));

        // Server→client: DMA_WRITE of 4 bytes at 0x10008, then DMA_READ of them back.
        server.SendBytes(Hex("77 00 0c 00 24 00 00 00 00 00 00 00 00 00 00 00 | 08 00 01 00 00 00 00 00 04 00 00 00 00 00 00 00 aa bb cc dd"));
        Assert.Equal("77000C00200000000100000000000000" + "0800010000000000" + "0400000000000000", Convert.ToHexString(Frame(server.Receive(5000)!)));
        Assert.Equal(new byte[] { 0xAA, 0xBB, 0xCC, 0xDD }, memory[8..12]);
        server.SendBytes(Hex("78 00 0b 00 20 00 00 00 00 00 00 00 00 00 00 00 | 08 00 01 00 00 00 00 00 04 00 00 00 00 00 00 00"));
        Assert.Equal("78000B00240000000100000000000000" + "0800010000000000" + "0400000000000000" + "AABBCCDD", Convert.ToHexString(Frame(server.Receive(5000)!)));
        // A server→client command the client does not serve gets EINVAL.
        server.SendBytes(Hex("79 00 09 00 10 00 00 00 00 00 00 00 00 00 00 00"));
        Assert.Equal("79000900100000002100000016000000", Convert.ToHexString(Frame(server.Receive(5000)!)));
    }

    private static byte[] Frame(RawMessage m)
    {
        var b = new byte[16 + m.Payload.Length];
        m.Header.WriteTo(b);
        m.Payload.CopyTo(b, 16);
        return b;
    }
}
