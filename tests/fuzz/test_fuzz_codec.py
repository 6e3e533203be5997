"""Fuzz the vhost-user message codec (``MessageParser``, ``decode``, ``encode``).

A stream is a run of frames -- well-formed messages of every request and reply shape
with their fds (real ones), headers that lie about the payload (size, flags, request
number, fd count), and raw garbage -- cut into the chunks a ``recvmsg`` could return
(fds with the chunk that reads the first byte of their message, as Linux delivers
SCM_RIGHTS). Whatever the bytes, on all four parsers (front-end / back-end requests,
requests / replies):

* only ``VhostUserProtocolError`` comes out, and after one with ``framing_intact=False``
  the parser refuses all further use;
* no fd leaks: every fd fed is either handed out in a ``Message`` or closed by the
  parser (the process's fd table is back to where it was);
* every message it returns re-encodes and decodes to itself (``encode`` accepts what
  ``decode`` produced: both read the one table);
* without fds, where the stream is cut does not change what comes out.

Short profile in CI; the long run is in docs/conformance.md ("Fuzzing").
"""

from __future__ import annotations

import os
import struct
from types import SimpleNamespace

from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz.conftest import fuzz_settings
from virtnet.vhost_user.errors import VhostUserProtocolError
from virtnet.vhost_user.messages import (
    HEADER,
    MAX_PAYLOAD_SIZE,
    REQUESTS,
    U64,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    BackendRequest,
    ConfigSpace,
    FdRule,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    MessageParser,
    NoPayload,
    Raw,
    SingleMemoryRegion,
    close_fds,
    decode,
    encode,
)

ENUMS = (FrontendRequest, BackendRequest)
FLAGS = [VHOST_USER_VERSION, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
         VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 0, 2, 3, 0xFFFF_FFFF]  # fmt: skip
SIZES = [0, 1, 7, 8, 12, 16, 24, 40, 8 + 32 * 8, 8 + 32 * 9, MAX_PAYLOAD_SIZE,
         MAX_PAYLOAD_SIZE + 1, 1 << 31, 0xFFFF_FFFF]  # fmt: skip


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fixed(cls, data: st.DataObject):
    return cls.unpack(data.draw(st.binary(min_size=cls.SIZE, max_size=cls.SIZE)))


def _payload(cls, data: st.DataObject):
    """A payload object of ``cls``, its fields anything the wire can hold."""
    if cls is NoPayload:
        return b""
    if cls is Raw:
        return data.draw(st.binary(max_size=64))
    if cls is U64:
        # Vring-index u64s: sometimes with the NOFD bit, so UNLESS_NOFD takes 0 fds.
        value = data.draw(st.integers(0, (1 << 64) - 1) | st.sampled_from(
            [0, 1, VHOST_USER_VRING_NOFD_MASK, VHOST_USER_VRING_NOFD_MASK | 1]))  # fmt: skip
        return U64(value)
    if cls is MemoryTable:
        n = data.draw(st.integers(0, VHOST_MEMORY_BASELINE_NREGIONS))
        return MemoryTable(tuple(_fixed(MemoryRegionDesc, data) for _ in range(n)))
    if cls is SingleMemoryRegion:
        return SingleMemoryRegion(_fixed(MemoryRegionDesc, data))
    if cls is ConfigSpace:
        return ConfigSpace(data.draw(st.integers(0, 0xFFFF_FFFF)),
                           data.draw(st.integers(0, 0xFFFF_FFFF)),
                           data.draw(st.binary(max_size=VHOST_USER_MAX_CONFIG_SIZE)))  # fmt: skip
    return _fixed(cls, data)


def _fd_count(rule: FdRule, payload) -> int:
    if rule is FdRule.PER_REGION:
        return payload.nregions
    if rule is FdRule.UNLESS_NOFD:
        return 0 if payload.nofd else 1
    return 1 if rule is FdRule.ONE else 0


def _valid_frame(data: st.DataObject, enum, replies: bool) -> tuple[bytes, int]:
    request = data.draw(st.sampled_from(list(enum)))
    spec = REQUESTS[enum][request]
    shape = spec.reply if replies else spec.request
    payload = _payload(data.draw(st.sampled_from(shape.payloads)), data)
    flags = VHOST_USER_VERSION | (VHOST_USER_REPLY_MASK if replies else 0)
    if not replies and data.draw(st.booleans()):
        flags |= VHOST_USER_NEED_REPLY_MASK
    nfds = _fd_count(shape.fds, payload)
    if shape.fds is FdRule.OPTIONAL:
        nfds = data.draw(st.integers(0, 1))
    fake = tuple(range(1000, 1000 + nfds))  # encode checks the count, never the numbers
    try:
        wire = encode(Message(request, flags, payload, fake))
    except VhostUserProtocolError:
        # One wire form, two readings (a 0-region table is 8 bytes, as a u64 status):
        # encode rightly refuses the ambiguous one. Send the lie instead.
        return _lying_frame(data)
    if shape.fds is FdRule.DROPPED:
        nfds = data.draw(st.integers(0, 1))  # never sent, tolerated (and closed) on receipt
    return wire, nfds


def _lying_frame(data: st.DataObject) -> tuple[bytes, int]:
    request = data.draw(st.integers(0, 45) | st.sampled_from([0xFFFF_FFFF, 1 << 31]))
    flags = data.draw(st.sampled_from(FLAGS) | st.integers(0, 0xFFFF_FFFF))
    payload = data.draw(st.binary(max_size=300))
    size = len(payload) if data.draw(st.booleans()) else data.draw(st.sampled_from(SIZES))
    nfds = data.draw(st.sampled_from([0, 0, 0, 1, 2, 8, 9]))
    return HEADER.pack(request, flags, size) + payload, nfds


@st.composite
def streams(draw):
    """(enum, replies, [(chunk bytes, nfds)]) -- the reads a recvmsg loop would make."""
    data = draw(st.data())
    enum = draw(st.sampled_from(ENUMS))
    replies = draw(st.booleans())
    chunks: list[tuple[bytes, int]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["valid", "valid", "lying", "garbage"]))
        if kind == "valid":
            frame, nfds = _valid_frame(data, enum, replies)
        elif kind == "lying":
            frame, nfds = _lying_frame(data)
        else:
            frame, nfds = draw(st.binary(min_size=1, max_size=40)), draw(st.integers(0, 2))
        cuts = sorted(draw(st.lists(st.integers(1, max(1, len(frame) - 1)), max_size=3)))
        pieces = [frame[a:b] for a, b in zip([0, *cuts], [*cuts, len(frame)], strict=True)
                  if a < b]
        # SCM_RIGHTS comes with the first read of its message's bytes.
        first = pieces[0]
        if chunks and chunks[-1][1] == 0 and draw(st.booleans()):
            first = chunks.pop()[0] + first  # fd-less bytes before it, merged into one read
        chunks.append((first, nfds))
        chunks += [(p, 0) for p in pieces[1:]]
    if draw(st.integers(0, 20)) == 0:
        chunks.append((b"", 1))  # fds with no data: refused, and closed
    return enum, replies, chunks


def _parse(enum, replies: bool, chunks, with_fds: bool) -> tuple[list, list[str], list[int]]:
    """Feed every chunk; (messages, errors as text, fds handed out)."""
    parser = MessageParser(enum, replies=replies)
    out: list[Message] = []
    errors: list[str] = []
    handed: list[int] = []
    lost = False
    for data, nfds in chunks:
        fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
               for _ in range(nfds if with_fds else 0)]
        try:
            parser.feed(data, fds)
        except VhostUserProtocolError as e:
            errors.append(f"feed: {e}")
            if not data:
                continue
            assert lost or "unusable" in str(e)
            break
        while True:
            try:
                msg = parser.next_message()
            except VhostUserProtocolError as e:
                assert not lost, "a parser that lost framing must refuse, not parse"
                errors.append(str(e))
                if not e.framing_intact:
                    lost = True
                    assert _must_refuse(parser)
                    break
                continue
            if msg is None:
                break
            out.append(msg)
            handed += msg.fds
        if lost:
            break
    if not lost:
        try:
            parser.feed_eof()
        except VhostUserProtocolError as e:
            errors.append(f"eof: {e}")
    parser.close()
    return out, errors, handed


def _must_refuse(parser: MessageParser) -> bool:
    try:
        parser.next_message()
    except VhostUserProtocolError:
        return True
    return False


def _round_trip(msg: Message, enum, replies: bool) -> None:
    fake = tuple(range(1000, 1000 + len(msg.fds)))  # decode only counts them
    again = decode(encode(Message(msg.request, msg.flags, msg.payload, fake)), fake,
                   requests=enum, replies=replies)  # fmt: skip
    assert (again.request, again.flags, again.payload) == (msg.request, msg.flags, msg.payload)
    assert again.request is msg.request
    assert len(again.fds) == len(msg.fds)


@fuzz_settings()
@given(streams())
def test_parser_over_hostile_streams(stream):
    enum, replies, chunks = stream
    baseline = _open_fds()
    messages, errors, handed = _parse(enum, replies, chunks, with_fds=True)
    close_fds(handed)
    assert _open_fds() == baseline, "the parser leaked fds"
    for msg in messages:
        _round_trip(msg, enum, replies)
    event(f"{len(messages)} messages, {len(errors)} refusals")
    # Where the reads are cut does not matter (fd-less: fds pin their message's chunk).
    whole = b"".join(d for d, _ in chunks)
    one = _parse(enum, replies, [(whole, 0)], with_fds=False)
    cut = _parse(enum, replies, chunks, with_fds=False)
    assert [_key(m) for m in one[0]] == [_key(m) for m in cut[0]]
    assert _tail(one[1]) == _tail(cut[1])


def _key(msg: Message):
    return msg.request, msg.flags, msg.payload


def _tail(errors: list[str]) -> list[str]:
    # feed() of an empty fd-less chunk is a no-op; compare what the stream itself caused.
    return [e for e in errors if not e.startswith("feed:")]


@st.composite
def one_message(draw):
    """(enum, replies, bytes meant to be one message): a well-formed one, a true header
    over any payload (the size field mostly true), or anything at all."""
    enum = draw(st.sampled_from(ENUMS))
    replies = draw(st.booleans())
    kind = draw(st.sampled_from(["valid", "valid", "header", "any"]))
    if kind == "valid":
        return enum, replies, _valid_frame(SimpleNamespace(draw=draw), enum, replies)[0]
    if kind == "any":
        return enum, replies, draw(st.binary(max_size=600))
    request = draw(st.integers(0, 45) | st.sampled_from([0xFFFF_FFFF]))
    flags = draw(st.sampled_from(FLAGS[:3]) | st.integers(0, 0xFFFF_FFFF))
    payload = draw(st.binary(max_size=300) | st.sampled_from(
        [bytes(8), bytes(12), bytes(16), bytes(24), bytes(40), bytes(8 + 32)]))  # fmt: skip
    size = len(payload) if draw(st.integers(0, 7)) else draw(st.sampled_from(SIZES))
    return enum, replies, HEADER.pack(request, flags, size) + payload


@fuzz_settings()
@given(one_message())
def test_decode_of_any_bytes_is_a_message_or_a_typed_error(message):
    enum, replies, data = message
    try:
        msg = decode(data, (), requests=enum, replies=replies)
    except VhostUserProtocolError as e:
        event(f"refused ({'framing' if not e.framing_intact else 'payload'})")
        return
    event("decoded")
    assert HEADER.size + struct.unpack_from("<I", data, 8)[0] == len(data)
    _round_trip(msg, enum, replies)
