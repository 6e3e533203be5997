"""vhost-user message codec: payloads, framing, fd rules, errors (QEMU vhost-user.rst).

Wire bytes in the layout tests are spelled out with ``int.to_bytes``, never
through the codec's ``struct.Struct``s, so they check the encoder against the
spec rather than against itself.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from virtnet.vhost_user.errors import VhostUserProtocolError
from virtnet.vhost_user.messages import (
    BACKEND_REQUESTS,
    FRONTEND_REQUESTS,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    REQUESTS,
    U64,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    BackendRequest,
    ConfigSpace,
    DeviceStateTransfer,
    FdRule,
    FrontendRequest,
    InflightDesc,
    IotlbMsg,
    LogDesc,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    MessageParser,
    NoPayload,
    ProtocolFeature,
    Raw,
    SharedObject,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringState,
    ack,
    close_fds,
    decode,
    encode,
    needs_reply,
    rejection_ack,
    reply,
    spec_name,
)

F, B = FrontendRequest, BackendRequest
V, REPLY, NEED_REPLY = 0x1, 0x4, 0x8  # header flag bits, as the spec draws them
NOFD = 1 << 8


def le(value: int, width: int) -> bytes:
    return value.to_bytes(width, "little")


def wire(request: int, flags: int, payload: bytes = b"", size: int | None = None) -> bytes:
    """A header + payload built by hand: u32 request, u32 flags, u32 size."""
    size = len(payload) if size is None else size
    return le(request, 4) + le(flags, 4) + le(size, 4) + payload


def region_bytes(gpa: int, size: int, uva: int, offset: int) -> bytes:
    return le(gpa, 8) + le(size, 8) + le(uva, 8) + le(offset, 8)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def make_fds():
    """Real fds (pipe ends); teardown closes the survivors it still recognises.

    Pipe inodes are unique, so an fd number the parser closed and the OS then
    reused for something else is left alone.
    """
    opened: list[tuple[int, int]] = []

    def make(n: int) -> list[int]:
        fds: list[int] = []
        while len(fds) < n:
            fds.extend(os.pipe())
        for fd in fds:
            opened.append((fd, os.fstat(fd).st_ino))
        close_fds(fds[n:])
        return fds[:n]

    yield make
    for fd, ino in opened:
        try:
            if os.fstat(fd).st_ino == ino:
                os.close(fd)
        except OSError:
            pass


# -- constants: the spec's numbers ------------------------------------------------------

SPEC_FRONTEND_NUMBERS = {
    "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4,
    "SET_MEM_TABLE": 5, "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8,
    "SET_VRING_ADDR": 9, "SET_VRING_BASE": 10, "GET_VRING_BASE": 11, "SET_VRING_KICK": 12,
    "SET_VRING_CALL": 13, "SET_VRING_ERR": 14, "GET_PROTOCOL_FEATURES": 15,
    "SET_PROTOCOL_FEATURES": 16, "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18,
    "SEND_RARP": 19, "NET_SET_MTU": 20, "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22,
    "SET_VRING_ENDIAN": 23, "GET_CONFIG": 24, "SET_CONFIG": 25, "CREATE_CRYPTO_SESSION": 26,
    "CLOSE_CRYPTO_SESSION": 27, "POSTCOPY_ADVISE": 28, "POSTCOPY_LISTEN": 29,
    "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31, "SET_INFLIGHT_FD": 32, "GPU_SET_SOCKET": 33,
    "RESET_DEVICE": 34, "VRING_KICK": 35, "GET_MAX_MEM_SLOTS": 36, "ADD_MEM_REG": 37,
    "REM_MEM_REG": 38, "SET_STATUS": 39, "GET_STATUS": 40, "GET_SHARED_OBJECT": 41,
    "SET_DEVICE_STATE_FD": 42, "CHECK_DEVICE_STATE": 43,
}  # fmt: skip

SPEC_BACKEND_NUMBERS = {
    "IOTLB_MSG": 1, "CONFIG_CHANGE_MSG": 2, "VRING_HOST_NOTIFIER_MSG": 3, "VRING_CALL": 4,
    "VRING_ERR": 5, "SHARED_OBJECT_ADD": 6, "SHARED_OBJECT_REMOVE": 7,
    "SHARED_OBJECT_LOOKUP": 8,
}  # fmt: skip

SPEC_PROTOCOL_FEATURES = {
    "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "NET_MTU": 4, "BACKEND_REQ": 5,
    "CROSS_ENDIAN": 6, "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9,
    "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11, "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13,
    "INBAND_NOTIFICATIONS": 14, "CONFIGURE_MEM_SLOTS": 15, "STATUS": 16, "XEN_MMAP": 17,
    "SHARED_OBJECT": 18, "DEVICE_STATE": 19,
}  # fmt: skip


@pytest.mark.parametrize(
    "enum, numbers",
    [
        (F, SPEC_FRONTEND_NUMBERS),
        (B, SPEC_BACKEND_NUMBERS),
        (ProtocolFeature, SPEC_PROTOCOL_FEATURES),
    ],
)
def test_request_and_feature_numbers_are_the_specs(enum, numbers):
    assert {m.name: int(m) for m in enum} == numbers


def test_every_request_has_exactly_one_table_entry():
    assert set(FRONTEND_REQUESTS) == set(F)
    assert set(BACKEND_REQUESTS) == set(B)


def test_header_constants_are_the_specs():
    assert HEADER_SIZE == 12
    assert (VHOST_USER_VERSION, VHOST_USER_REPLY_MASK, VHOST_USER_NEED_REPLY_MASK) == (1, 4, 8)
    assert VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert (VHOST_USER_VRING_IDX_MASK, VHOST_USER_VRING_NOFD_MASK) == (0xFF, 0x100)
    assert VHOST_MEMORY_BASELINE_NREGIONS == 8
    assert VHOST_USER_MAX_CONFIG_SIZE == 256


def test_spec_names_carry_the_spec_prefixes():
    assert spec_name(F.SET_VRING_ADDR) == "VHOST_USER_SET_VRING_ADDR"
    assert spec_name(B.VRING_CALL) == "VHOST_USER_BACKEND_VRING_CALL"
    assert spec_name(99) == "request 99"


# -- hypothesis strategies ---------------------------------------------------------------

u8, u16 = st.integers(0, 0xFF), st.integers(0, 0xFFFF)
u32, u64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
regions = st.builds(MemoryRegionDesc, u64, u64, u64, u64)

PAYLOADS = {
    U64: st.builds(U64, u64),
    VringState: st.builds(VringState, u32, u32),
    VringAddr: st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    MemoryTable: st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    SingleMemoryRegion: st.builds(SingleMemoryRegion, regions),
    LogDesc: st.builds(LogDesc, u64, u64),
    IotlbMsg: st.builds(IotlbMsg, u64, u64, u64, u8, u8),
    ConfigSpace: st.builds(ConfigSpace, u32, u32, st.binary(max_size=256)),
    VringArea: st.builds(VringArea, u64, u64, u64),
    InflightDesc: st.builds(InflightDesc, u64, u64, u16, u16),
    SharedObject: st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, u32, u32),
    NoPayload: st.just(b""),
    Raw: st.binary(max_size=1024),
}
TYPED = [cls for cls in PAYLOADS if cls not in (NoPayload, Raw)]

# Fake fd numbers far above any real one (RLIMIT_NOFILE): the codec never
# touches the fds of a message it accepts, and close_fds ignores EBADF.
FAKE_FD = 1 << 22


def fd_count(rule: FdRule, payload, draw) -> int:
    if rule is FdRule.ONE:
        return 1
    if rule is FdRule.PER_REGION:
        return payload.nregions
    if rule is FdRule.UNLESS_NOFD:
        return 0 if payload.nofd else 1
    if rule is FdRule.OPTIONAL:
        return draw(st.integers(0, 1))
    return 0


def payload_size(payload) -> int:
    return len(payload) if isinstance(payload, bytes) else len(payload.pack())


@st.composite
def messages(draw, channel=None, replies=None, first_fd=FAKE_FD):
    """A valid message of the given channel/direction, with fake fds."""
    channel = channel or draw(st.sampled_from([F, B]))
    replies = draw(st.booleans()) if replies is None else replies
    request = draw(st.sampled_from(list(channel)))
    spec = REQUESTS[channel][request]
    shape = spec.reply if replies else spec.request
    cls = draw(st.sampled_from(shape.payloads))
    payload = draw(PAYLOADS[cls])
    # Several payload shapes are told apart by size: skip a value whose size
    # is another shape's (an empty memory table reads as an 8-byte ack).
    size = payload_size(payload)
    assume(not any(o.SIZE == size for o in shape.payloads if o is not cls))
    assume(size <= MAX_PAYLOAD_SIZE)
    flags = VHOST_USER_VERSION | draw(st.integers(0, 2**28 - 1)) << 4
    flags |= REPLY if replies else draw(st.sampled_from([0, NEED_REPLY]))
    n = fd_count(shape.fds, payload, draw)
    return Message(request, flags, payload, tuple(range(first_fd, first_fd + n)))


# -- payloads ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", TYPED, ids=lambda c: c.__name__)
@given(data=st.data())
def test_every_payload_type_round_trips(cls, data):
    payload = data.draw(PAYLOADS[cls])
    packed = payload.pack()
    assert cls.SIZE in (None, len(packed))
    assert cls.unpack(packed) == payload


@pytest.mark.parametrize("cls", [c for c in TYPED if c.SIZE], ids=lambda c: c.__name__)
@pytest.mark.parametrize("delta", [-1, 1])
def test_a_fixed_payload_of_the_wrong_size_is_refused(cls, delta):
    buf = bytes(cls.SIZE + delta)
    with pytest.raises(VhostUserProtocolError, match=f"payload size {len(buf)}, expected"):
        cls.unpack(buf)


def test_payload_sizes_are_the_c_structs():
    # vhost_vring_addr 40; VhostUserInflight 24 (tail padding: not packed);
    # vhost_iotlb_msg 32 (26 + 6 padding); VhostUserMemRegMsg 40.
    sizes = {U64: 8, VringState: 8, VringAddr: 40, MemoryRegionDesc: 32, SingleMemoryRegion: 40}
    sizes |= {LogDesc: 16, IotlbMsg: 32, VringArea: 24, InflightDesc: 24, SharedObject: 16}
    sizes |= {DeviceStateTransfer: 8}
    assert {cls: cls.SIZE for cls in sizes} == sizes


def test_payload_constructors_refuse_what_cannot_be_sent():
    with pytest.raises(ValueError, match="9 regions, at most 8"):
        MemoryTable((MemoryRegionDesc(),) * 9)
    with pytest.raises(ValueError, match="257 bytes, at most 256"):
        ConfigSpace(data=bytes(257))
    with pytest.raises(ValueError, match="15 bytes, expected 16"):
        SharedObject(bytes(15))
    with pytest.raises(ValueError, match="vring state description"):
        VringState(index=2**32).pack()


def test_vring_fd_payloads_split_index_and_nofd():
    assert (U64(3 | NOFD).vring_index, U64(3 | NOFD).nofd) == (3, True)
    assert (U64(0x1FF).vring_index, U64(0xFF).nofd) == (0xFF, False)
    assert VringArea(u64=2 | NOFD).nofd and VringArea(u64=2).vring_index == 2


# -- whole messages: round trip and arbitrary splits ----------------------------------------


@given(messages())
def test_any_message_encoded_decodes_identically(message):
    channel = type(message.request)
    assert decode(encode(message), message.fds, requests=channel, replies=message.is_reply) == (
        message
    )


@st.composite
def streams(draw):
    """Messages of one channel and direction, and how recvmsg may cut them."""
    channel, replies = draw(st.sampled_from([F, B])), draw(st.booleans())
    batch: list[Message] = []
    next_fd = FAKE_FD
    for _ in range(draw(st.integers(1, 5))):
        message = draw(messages(channel, replies, first_fd=next_fd))
        next_fd += len(message.fds)
        batch.append(message)
    encoded = [encode(m) for m in batch]
    total = sum(map(len, encoded))
    cuts = set(draw(st.sets(st.integers(1, max(1, total - 1)), max_size=12)))
    starts, pos = [], 0
    for m, data in zip(batch, encoded, strict=True):
        starts.append(pos)
        pos += len(data)
        if m.fds:
            # Linux AF_UNIX: a recvmsg ends right after the skb carrying SCM_RIGHTS.
            cuts.add(pos)
    return channel, replies, batch, b"".join(encoded), sorted(cuts | {total}), starts


@given(streams())
def test_messages_split_at_arbitrary_points_parse_back_identically(stream):
    channel, replies, batch, data, cuts, starts = stream
    parser = MessageParser(channel, replies=replies)
    got: list[Message] = []
    begin = 0
    for end in cuts:
        # The fds come with the read that holds the first byte of their message.
        fds = [fd for m, s in zip(batch, starts, strict=True) if begin <= s < end for fd in m.fds]
        parser.feed(data[begin:end], fds)
        while (message := parser.next_message()) is not None:
            got.append(message)
        begin = end
    parser.feed_eof()
    assert got == batch
    assert parser.buffered == 0


def test_a_stream_fed_one_byte_at_a_time_reads_like_a_qemu_handshake(make_fds):
    call, kick, mem0, mem1 = make_fds(4)
    table = MemoryTable((MemoryRegionDesc(0, 0x10000, 0x7F0000000000, 0),) * 2)
    sent = [
        Message(F.GET_FEATURES),
        Message(F.GET_PROTOCOL_FEATURES),
        Message(F.SET_PROTOCOL_FEATURES, payload=U64(1 << ProtocolFeature.REPLY_ACK)),
        Message(F.SET_OWNER),
        Message(F.SET_VRING_CALL, payload=U64(0), fds=(call,)),
        Message(F.SET_FEATURES, payload=U64(1 << 32 | 1 << 30)),
        Message(F.SET_MEM_TABLE, V | NEED_REPLY, table, (mem0, mem1)),
        Message(F.SET_VRING_NUM, payload=VringState(0, 256)),
        Message(F.SET_VRING_BASE, payload=VringState(0, 0)),
        Message(F.SET_VRING_ADDR, payload=VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)),
        Message(F.SET_VRING_KICK, payload=U64(0), fds=(kick,)),
        Message(F.SET_VRING_ENABLE, V | NEED_REPLY, VringState(0, 1)),
    ]
    parser = MessageParser()
    got = []
    for message in sent:
        data = encode(message)
        for i in range(len(data)):
            parser.feed(data[i : i + 1], message.fds if i == 0 else ())
            if (m := parser.next_message()) is not None:
                got.append(m)
    assert got == sent
    assert all(map(is_open, (call, kick, mem0, mem1)))  # handed over, not closed


# -- wire layout, checked against bytes spelled out by hand --------------------------------


def test_set_vring_addr_wire_bytes_follow_the_c_struct_order():
    addr = VringAddr(
        index=1, flags=1 << 0, desc_user_addr=0x7F00_0000_1000,
        used_user_addr=0x7F00_0000_3000, avail_user_addr=0x7F00_0000_2000,
        log_guest_addr=0xDEAD_0000,
    )  # fmt: skip
    # index, flags, descriptor, *used*, *available*, log -- 40 bytes, no "size".
    payload = le(1, 4) + le(1, 4) + le(0x7F00_0000_1000, 8) + le(0x7F00_0000_3000, 8)
    payload += le(0x7F00_0000_2000, 8) + le(0xDEAD_0000, 8)
    raw = wire(9, V, payload)
    assert raw[:12] == bytes.fromhex("09000000 01000000 28000000")
    assert encode(Message(F.SET_VRING_ADDR, payload=addr)) == raw
    assert decode(raw).payload == addr


def test_set_mem_table_wire_bytes_carry_only_nregions_regions():
    r0, r1 = (0, 0xA0000, 0x7F00_0000_0000, 0), (0x100000, 0x3FF00000, 0x7F00_000A_0000, 0xA0000)
    payload = le(2, 4) + le(0, 4) + region_bytes(*r0) + region_bytes(*r1)
    raw = wire(5, V, payload)
    assert len(payload) == 8 + 2 * 32
    table = MemoryTable((MemoryRegionDesc(*r0), MemoryRegionDesc(*r1)))
    assert encode(Message(F.SET_MEM_TABLE, payload=table, fds=(10, 11))) == raw
    assert decode(raw, [FAKE_FD, FAKE_FD + 1]).payload == table


def test_small_messages_wire_bytes():
    call_nofd = Message(F.SET_VRING_CALL, payload=U64(2 | NOFD))
    assert encode(call_nofd) == wire(13, V, le(0x102, 8))
    features_reply = reply(Message(F.GET_FEATURES), U64(1 << 30))
    assert encode(features_reply) == wire(1, V | REPLY, le(1 << 30, 8))
    inflight = Message(F.GET_INFLIGHT_FD, payload=InflightDesc(0, 0, 2, 256))
    assert encode(inflight) == wire(31, V, le(0, 8) + le(0, 8) + le(2, 2) + le(256, 2) + bytes(4))
    iotlb = Message(F.IOTLB_MSG, V | NEED_REPLY, IotlbMsg(0x1000, 0x2000, 0x3000, 3, 2))
    expected = le(0x1000, 8) + le(0x2000, 8) + le(0x3000, 8) + bytes([3, 2]) + bytes(6)
    assert encode(iotlb) == wire(22, V | NEED_REPLY, expected)
    config = Message(F.SET_CONFIG, payload=ConfigSpace(offset=4, flags=1, data=b"\x05\xdc"))
    assert encode(config) == wire(25, V, le(4, 4) + le(2, 4) + le(1, 4) + b"\x05\xdc")
    add = Message(F.ADD_MEM_REG, payload=SingleMemoryRegion(MemoryRegionDesc(1, 2, 3, 4)))
    assert encode(add.__class__(add.request, add.flags, add.payload, (9,))) == wire(
        37, V, bytes(8) + region_bytes(1, 2, 3, 4)
    )


# -- malformed input: one table, one typed error each ----------------------------------------

GOOD = wire(3, V)  # SET_OWNER
BIG = 0x1000_0000

# (id, channel, replies, bytes, fds, words the error must contain, framing intact)
MALFORMED = [
    ("unknown-request", F, False, wire(99, V, bytes(8)), 0,
     "request 99: unknown front-end request number", True),
    ("unknown-backend-request", B, False, wire(9, V), 0,
     "request 9: unknown back-end request number", True),
    ("unknown-request-with-fd", F, False, wire(0, V), 1,
     "request 0: unknown front-end request number", True),
    ("version-2", F, False, wire(1, 0x2), 0,
     "VHOST_USER_GET_FEATURES: flags 0x2: version 2 (bits 0-1), expected 1", False),
    ("version-0", F, False, wire(2, NEED_REPLY, bytes(8)), 0,
     "VHOST_USER_SET_FEATURES: flags 0x8: version 0 (bits 0-1), expected 1", False),
    ("size-over-cap", F, False, wire(5, V, size=BIG), 1,
     f"VHOST_USER_SET_MEM_TABLE: payload size {BIG} exceeds the maximum of 4096", False),
    ("size-over-cap-unknown", F, False, wire(1234, V, size=4097), 0,
     "request 1234: payload size 4097 exceeds the maximum of 4096", False),
    ("get-features-with-payload", F, False, wire(1, V, bytes(8)), 0,
     "VHOST_USER_GET_FEATURES: no payload: payload size 8, expected 0", True),
    ("set-features-short", F, False, wire(2, V, bytes(4)), 0,
     "VHOST_USER_SET_FEATURES: u64: payload size 4, expected 8", True),
    ("vring-addr-32", F, False, wire(9, V, bytes(32)), 0,
     "VHOST_USER_SET_VRING_ADDR: vring address description: payload size 32, expected 40", True),
    ("inflight-packed-20", F, False, wire(32, V, bytes(20)), 1,
     "VHOST_USER_SET_INFLIGHT_FD: inflight description: payload size 20, expected 24", True),
    ("mem-table-short", F, False, wire(5, V, bytes(4)), 0,
     "VHOST_USER_SET_MEM_TABLE: memory regions description: payload size 4, "
     "shorter than nregions + padding (8)", True),
    ("nregions-9", F, False, wire(5, V, le(9, 4) + bytes(4) + bytes(9 * 32)), 0,
     "VHOST_USER_SET_MEM_TABLE: memory regions description: nregions 9 exceeds the maximum "
     "of 8", True),
    ("nregions-vs-size", F, False, wire(5, V, le(2, 4) + bytes(4) + bytes(32)), 2,
     "VHOST_USER_SET_MEM_TABLE: memory regions description: nregions 2 needs payload size 72, "
     "got 40", True),
    ("config-size-300", F, False, wire(25, V, le(0, 4) + le(300, 4) + le(0, 4) + bytes(300)), 0,
     "VHOST_USER_SET_CONFIG: config space: size 300 exceeds VHOST_USER_MAX_CONFIG_SIZE (256)",
     True),
    ("config-size-vs-payload", F, False, wire(24, V, le(0, 4) + le(4, 4) + le(0, 4) + bytes(8)),
     0, "VHOST_USER_GET_CONFIG: config space: size field 4 needs payload size 16, got 20", True),
    ("reply-bit-on-request", F, False, wire(1, V | REPLY), 0,
     "VHOST_USER_GET_FEATURES: flags 0x5: REPLY bit (bit 2) set, expected a request", True),
    ("request-where-reply-due", F, True, wire(1, V, bytes(8)), 0,
     "VHOST_USER_GET_FEATURES: flags 0x1: REPLY bit (bit 2) clear, expected a reply", True),
    ("log-base-reply-size", F, True, wire(6, V | REPLY, bytes(4)), 0,
     "VHOST_USER_SET_LOG_BASE: payload size 4, expected 0 or 8", True),
    ("mem-table-fds-short", F, False, wire(5, V, le(2, 4) + bytes(4) + bytes(64)), 1,
     "VHOST_USER_SET_MEM_TABLE: expected 2 fds (one fd per memory region), got 1", True),
    ("mem-table-fds-long", F, False, wire(5, V, le(1, 4) + bytes(4) + bytes(32)), 2,
     "VHOST_USER_SET_MEM_TABLE: expected 1 fds (one fd per memory region), got 2", True),
    ("kick-without-fd", F, False, wire(12, V, le(0, 8)), 0,
     "VHOST_USER_SET_VRING_KICK: expected 1 fds (one fd unless VHOST_USER_VRING_NOFD_MASK is "
     "set), got 0", True),
    ("call-nofd-with-fd", F, False, wire(13, V, le(NOFD, 8)), 1,
     "VHOST_USER_SET_VRING_CALL: expected 0 fds", True),
    ("err-two-fds", F, False, wire(14, V, le(1, 8)), 2,
     "VHOST_USER_SET_VRING_ERR: expected 1 fds", True),
    ("log-base-without-fd", F, False, wire(6, V, bytes(16)), 0,
     "VHOST_USER_SET_LOG_BASE: expected 1 fds (exactly one fd), got 0", True),
    ("backend-req-fd-without-fd", F, False, wire(21, V), 0,
     "VHOST_USER_SET_BACKEND_REQ_FD: expected 1 fds (exactly one fd), got 0", True),
    ("add-mem-reg-two-fds", F, False, wire(37, V, bytes(40)), 2,
     "VHOST_USER_ADD_MEM_REG: expected 1 fds (exactly one fd), got 2", True),
    ("rem-mem-reg-two-fds", F, False, wire(38, V, bytes(40)), 2,
     "VHOST_USER_REM_MEM_REG: expected 0 to 1 fds", True),
    ("get-features-with-fd", F, False, wire(1, V), 1,
     "VHOST_USER_GET_FEATURES: expected 0 fds (no fd), got 1", True),
    ("ack-with-fd", F, True, wire(2, V | REPLY, le(0, 8)), 1,
     "VHOST_USER_SET_FEATURES: expected 0 fds (no fd), got 1", True),
    ("host-notifier-without-fd", B, False, wire(3, V, le(0, 8) + le(4096, 8) + le(0, 8)), 0,
     "VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG: expected 1 fds", True),
]  # fmt: skip


@pytest.mark.parametrize(
    "channel, replies, data, nfds, words, intact",
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_messages_raise_a_typed_error_naming_the_fault(
    make_fds, channel, replies, data, nfds, words, intact
):
    fds = make_fds(nfds)
    parser = MessageParser(channel, replies=replies)
    parser.feed(data, fds)
    with pytest.raises(VhostUserProtocolError, match=re.escape(words)) as caught:
        parser.next_message()
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.framing_intact is intact
    assert not any(map(is_open, fds)), "fds of a refused message must be closed"
    assert error.request == int.from_bytes(data[:4], "little")
    assert error.flags == int.from_bytes(data[4:8], "little")
    if intact:
        follow_up = F.SET_OWNER if channel is F else B.CONFIG_CHANGE_MSG  # both payload-less
        parser.feed(wire(follow_up, V | REPLY, le(0, 8)) if replies else wire(follow_up, V))
        assert parser.next_message().request is follow_up
    else:
        with pytest.raises(VhostUserProtocolError, match="unusable after an earlier error"):
            parser.next_message()


def test_a_size_over_the_cap_is_refused_from_the_header_alone():
    parser = MessageParser(max_payload_size=64)
    parser.feed(wire(25, V, size=65))  # nothing after the header: no buffering of 65 bytes
    with pytest.raises(VhostUserProtocolError, match="payload size 65 exceeds the maximum of 64"):
        parser.next_message()


def test_truncated_header_and_payload_are_errors_at_end_of_stream(make_fds):
    with pytest.raises(VhostUserProtocolError, match="truncated header: 5 of 12 bytes") as e:
        decode(GOOD[:5])
    assert e.value.framing_intact is False
    (fd,) = make_fds(1)
    parser = MessageParser()
    parser.feed(wire(13, V, le(0, 8))[:16], [fd])
    assert parser.next_message() is None
    with pytest.raises(
        VhostUserProtocolError, match="VHOST_USER_SET_VRING_CALL: truncated payload: 4 of 8 bytes"
    ):
        parser.feed_eof()
    assert not is_open(fd)


def test_trailing_bytes_after_a_decoded_message_are_an_error(make_fds):
    (fd,) = make_fds(1)
    with pytest.raises(VhostUserProtocolError, match="3 trailing bytes after the message"):
        decode(wire(13, V, le(0, 8)) + b"xyz", [fd])
    assert not is_open(fd)


def test_decode_of_no_bytes_is_a_typed_error():
    # Found by tests/fuzz: decode(b"") used to end in AssertionError("unreachable").
    with pytest.raises(VhostUserProtocolError, match="no message: 0 of 12 header bytes") as e:
        decode(b"")
    assert e.value.framing_intact is False


def test_fds_without_data_are_refused_and_closed(make_fds):
    fds = make_fds(2)
    with pytest.raises(VhostUserProtocolError, match="2 fds arrived with no data bytes"):
        MessageParser().feed(b"", fds)
    assert not any(map(is_open, fds))


def test_unknown_flag_bits_are_kept_not_refused():
    # Bits 4-31 are unassigned; no peer sets them, none checks them on requests.
    assert decode(wire(3, V | 1 << 31)).flags == V | 1 << 31


# -- fd rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(VHOST_MEMORY_BASELINE_NREGIONS + 1))
def test_set_mem_table_takes_one_fd_per_region_in_order(make_fds, n):
    fds = make_fds(n)
    table = MemoryTable(tuple(MemoryRegionDesc(i << 20, 1 << 20, i, 0) for i in range(n)))
    message = decode(encode(Message(F.SET_MEM_TABLE, payload=table, fds=fds)), fds)
    assert message.payload == table and message.fds == tuple(fds)


@pytest.mark.parametrize("req", [F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR])
def test_vring_fd_requests_carry_one_fd_or_the_nofd_bit(make_fds, req):
    (fd,) = make_fds(1)
    with_fd = decode(wire(req, V, le(5, 8)), [fd])
    assert (with_fd.payload.vring_index, with_fd.fds) == (5, (fd,))
    polling = decode(wire(req, V, le(5 | NOFD, 8)))
    assert polling.payload.nofd and polling.fds == ()


@pytest.mark.parametrize(
    "req, payload",
    [(F.SET_LOG_BASE, LogDesc(4096, 0)), (F.SET_LOG_FD, b""), (F.SET_BACKEND_REQ_FD, b""),
     (F.SET_INFLIGHT_FD, InflightDesc(4096, 0, 2, 256)), (F.GPU_SET_SOCKET, b""),
     (F.ADD_MEM_REG, SingleMemoryRegion(MemoryRegionDesc(0, 4096, 0, 0))),
     (F.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0))],
)  # fmt: skip
def test_fd_carrying_requests_need_exactly_one(make_fds, req, payload):
    (fd,) = make_fds(1)
    data = encode(Message(req, payload=payload, fds=(fd,)))
    assert decode(data, [fd]).fds == (fd,)
    with pytest.raises(VhostUserProtocolError, match="expected 1 fds"):
        decode(data)


def test_an_fd_on_rem_mem_reg_is_tolerated_and_closed(make_fds):
    (fd,) = make_fds(1)
    region = SingleMemoryRegion(MemoryRegionDesc(0x100000, 4096, 0x7F00_0000_0000, 0))
    message = decode(wire(38, V, bytes(8) + region.region.pack()), [fd])
    assert message.payload == region and message.fds == ()
    assert not is_open(fd)  # "the back-end MUST close it without using it"


def test_optional_and_nofd_fds_on_replies(make_fds):
    (fd,) = make_fds(1)
    frontend = MessageParser(F, replies=True)
    frontend.feed(wire(42, V | REPLY, le(0, 8)), [fd])  # state transfer: back-end's own pipe
    assert frontend.next_message().fds == (fd,)
    frontend.feed(wire(42, V | REPLY, le(NOFD, 8)))
    assert frontend.next_message().fds == ()
    frontend.feed(wire(31, V | REPLY, bytes(24)))  # inflight with mmap_size 0: no fd
    assert frontend.next_message().payload == InflightDesc()


# -- which message do fds belong to -------------------------------------------------------------


def test_fds_belong_to_the_message_holding_the_chunks_last_byte(make_fds):
    (fd,) = make_fds(1)
    parser = MessageParser()
    # An fd-less message glued in front of an fd-carrying one in one recvmsg.
    parser.feed(wire(3, V) + wire(13, V, le(0, 8)), [fd])
    assert parser.next_message() == Message(F.SET_OWNER)
    assert parser.next_message() == Message(F.SET_VRING_CALL, V, U64(0), (fd,))


def test_fds_read_with_a_partial_header_wait_for_their_message(make_fds):
    (fd,) = make_fds(1)
    data = wire(12, V, le(1, 8))
    parser = MessageParser()
    parser.feed(wire(3, V) + data[:3], [fd])
    assert parser.next_message() == Message(F.SET_OWNER)
    assert parser.next_message() is None
    parser.feed(data[3:])
    assert parser.next_message().fds == (fd,)


def test_fds_that_arrive_with_the_wrong_message_are_refused_with_it(make_fds):
    (fd,) = make_fds(1)
    parser = MessageParser()
    parser.feed(wire(3, V), [fd])  # SET_OWNER carries no fd
    with pytest.raises(VhostUserProtocolError, match="VHOST_USER_SET_OWNER: expected 0 fds"):
        parser.next_message()
    assert not is_open(fd)
    parser.feed(wire(13, V, le(0, 8)))  # ... so the call fd it was meant for is missing
    with pytest.raises(VhostUserProtocolError, match="VHOST_USER_SET_VRING_CALL: expected 1 fds"):
        parser.next_message()


def test_close_releases_the_fds_of_a_partial_message(make_fds):
    fds = make_fds(2)
    parser = MessageParser()
    parser.feed(wire(5, V, le(2, 4) + bytes(4) + bytes(64))[:20], fds)
    assert parser.next_message() is None and parser.buffered == 20
    parser.close()
    assert not any(map(is_open, fds)) and parser.buffered == 0
    (late,) = make_fds(1)
    with pytest.raises(VhostUserProtocolError, match="parser closed"):
        parser.feed(b"x", [late])
    assert not is_open(late)


def test_framing_loss_closes_every_buffered_fd(make_fds):
    early, late = make_fds(2)
    parser = MessageParser()
    parser.feed(wire(13, V, le(0, 8)), [early])
    parser.feed(wire(1, 0x3), [late])  # version 3
    assert parser.next_message().fds == (early,)
    with pytest.raises(VhostUserProtocolError, match="version 3"):
        parser.next_message()
    assert is_open(early) and not is_open(late)


# -- replies ----------------------------------------------------------------------------------

ALWAYS_REPLIED = {
    # "Communication": GET_FEATURES, GET_PROTOCOL_FEATURES, GET_VRING_BASE, SET_LOG_BASE (with
    # LOG_SHMFD), GET_INFLIGHT_FD; plus every request whose "reply payload" is not N/A.
    F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.GET_VRING_BASE, F.SET_LOG_BASE,
    F.GET_INFLIGHT_FD, F.GET_QUEUE_NUM, F.IOTLB_MSG, F.GET_CONFIG, F.CREATE_CRYPTO_SESSION,
    F.POSTCOPY_ADVISE, F.POSTCOPY_END, F.GET_MAX_MEM_SLOTS, F.GET_STATUS, F.GET_SHARED_OBJECT,
    F.SET_DEVICE_STATE_FD, F.CHECK_DEVICE_STATE, B.SHARED_OBJECT_LOOKUP,
}  # fmt: skip


@pytest.mark.parametrize("req", [*F, *B], ids=spec_name)
def test_needs_reply_is_the_reply_list_or_need_reply(req):
    # IntEnums of both channels compare equal by number: test membership by identity.
    assert needs_reply(Message(req)) is any(req is r for r in ALWAYS_REPLIED)
    assert needs_reply(Message(req, V | NEED_REPLY)) is True
    assert needs_reply(Message(req, V | REPLY)) is False


def test_reply_sets_reply_and_clears_need_reply():
    answer = reply(Message(F.GET_VRING_BASE, V | NEED_REPLY, VringState(1, 0)), VringState(1, 7))
    assert answer == Message(F.GET_VRING_BASE, V | REPLY, VringState(1, 7))
    assert decode(encode(answer), replies=True) == answer


def test_ack_is_a_u64_status_reply():
    request = Message(F.SET_VRING_ENABLE, V | NEED_REPLY, VringState(0, 1))
    assert ack(request) == Message(F.SET_VRING_ENABLE, V | REPLY, U64(0))
    assert ack(request, ok=False).payload == U64(1)
    assert encode(ack(request)) == wire(18, V | REPLY, le(0, 8))


def test_ack_of_set_device_state_fd_says_no_fd_follows():
    request = Message(F.SET_DEVICE_STATE_FD, payload=DeviceStateTransfer(1, 0), fds=(FAKE_FD,))
    assert ack(request).payload == U64(NOFD)
    assert ack(request, ok=False).payload == U64(NOFD | 1)
    assert decode(encode(ack(request)), replies=True).fds == ()


@pytest.mark.parametrize("req", [F.GET_FEATURES, F.GET_VRING_BASE, F.GET_CONFIG])
def test_ack_refuses_requests_whose_reply_carries_data(req):
    with pytest.raises(ValueError, match=re.escape("replies with data, not an ack: use reply()")):
        ack(Message(req))


def refused(data: bytes, replies: bool = False) -> VhostUserProtocolError:
    with pytest.raises(VhostUserProtocolError) as caught:
        decode(data, replies=replies)
    return caught.value


def test_rejection_ack_answers_a_refused_request_that_asked_for_one():
    nack = rejection_ack(refused(wire(9, V | NEED_REPLY, bytes(32))))
    assert nack == Message(F.SET_VRING_ADDR, V | REPLY, U64(1))
    unknown = rejection_ack(refused(wire(77, V | NEED_REPLY)))
    assert encode(unknown) == wire(77, V | REPLY, le(1, 8))
    status = rejection_ack(refused(wire(22, V, bytes(31))))  # IOTLB_MSG: status reply anyway
    assert status.payload == U64(1)


def test_rejection_ack_stays_silent_where_no_status_is_owed():
    assert rejection_ack(refused(wire(9, V, bytes(32)))) is None  # no NEED_REPLY
    assert rejection_ack(refused(wire(1, V | NEED_REPLY, bytes(8)))) is None  # a data reply
    assert rejection_ack(refused(wire(9, 0x2 | NEED_REPLY, bytes(40)))) is None  # framing lost
    assert rejection_ack(refused(wire(1, V, bytes(8)), replies=True)) is None  # a reply


# -- encode refuses what the peer would refuse ---------------------------------------------


@pytest.mark.parametrize(
    "message, words",
    [
        (Message(F.SET_FEATURES, payload=bytes(8)), "payload of 8 bytes must be U64, got bytes"),
        (Message(F.SET_VRING_CALL, payload=U64(0)), "expected 1 fds"),
        (Message(F.SET_VRING_CALL, payload=U64(NOFD), fds=(3,)), "expected 0 fds"),
        (Message(F.REM_MEM_REG, payload=SingleMemoryRegion(), fds=(3,)), "expected 0 fds"),
        (Message(F.GET_FEATURES, flags=0), "version bits are not 1"),
        (Message(F.CREATE_CRYPTO_SESSION, payload=bytes(5000)), "payload size 5000 exceeds"),
        (Message(1, payload=U64(0)), "not a FrontendRequest or BackendRequest"),
        (Message(F.SET_VRING_ADDR, payload=VringState()), "expected 40"),
        # An empty table reply is 8 bytes: it would read back as a REPLY_ACK.
        (Message(F.SET_MEM_TABLE, V | REPLY, MemoryTable()), "must be U64, got MemoryTable"),
    ],
)
def test_encode_refuses_what_the_peer_would_refuse(message, words):
    with pytest.raises(VhostUserProtocolError, match=re.escape(words)):
        encode(message)


def test_messages_keep_fds_as_a_tuple():
    assert Message(F.SET_LOG_FD, fds=[7]).fds == (7,)


def test_parser_refuses_an_unknown_channel():
    with pytest.raises(ValueError, match="FrontendRequest or BackendRequest"):
        MessageParser(ProtocolFeature)
