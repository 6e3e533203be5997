"""GuestMemory: guest-physical address → memoryview, and nothing outside the regions."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.virtio.errors import MemoryAccessError, VirtioError
from virtnet.virtio.memory import U64_MAX, GuestMemory, MemoryRegion

PAGE = 4096


def two_regions() -> tuple[GuestMemory, bytearray, bytearray]:
    """0x1000..0x2000 and 0x8000..0xa000, with a hole between them."""
    low, high = bytearray(PAGE), bytearray(2 * PAGE)
    mem = GuestMemory([MemoryRegion(0x8000, memoryview(high)), MemoryRegion(0x1000, low)])
    return mem, low, high


# -- one region ------------------------------------------------------------------


def test_a_view_is_the_region_bytes_at_the_guest_address():
    buf = bytearray(range(256)) * 16
    mem = GuestMemory.from_buffer(buf, gpa=0x4000)
    assert bytes(mem.view(0x4000 + 10, 4)) == bytes([10, 11, 12, 13])
    assert mem.read(0x4000, 3) == b"\x00\x01\x02"


def test_a_view_writes_through_to_the_backing_buffer():
    buf = bytearray(PAGE)
    mem = GuestMemory.from_buffer(buf, gpa=0x4000)
    mem.view(0x4010, 4)[:] = b"abcd"
    mem.write(0x4020, b"xy")
    assert buf[0x10:0x14] == b"abcd"
    assert buf[0x20:0x22] == b"xy"


def test_an_mmap_is_a_region_like_any_buffer():
    with mmap.mmap(-1, PAGE) as m:
        mem = GuestMemory.from_buffer(m, gpa=0x10000)
        mem.write(0x10000 + 100, b"hello")
        assert m[100:105] == b"hello"
        mem.release()


def test_the_last_byte_and_an_empty_view_at_the_end_are_inside():
    mem = GuestMemory.from_buffer(bytearray(PAGE), gpa=0x1000)
    assert len(mem.view(0x1000 + PAGE - 1, 1)) == 1
    assert len(mem.view(0x1000 + PAGE, 0)) == 0


@pytest.mark.parametrize(
    ("addr", "length", "why"),
    [
        (0x1000 + PAGE, 1, "one byte past the end"),
        (0x1000 + PAGE - 4, 8, "straddles the end"),
        (0x0FFF, 1, "one byte before the start"),
        (0x0FFF, 2, "straddles the start"),
        (0, 16, "below the region"),
        (U64_MAX, 1, "last u64 address"),
        (U64_MAX - 3, 16, "address + length overflows u64"),
        (0x1000, 1 << 32, "u32-max-ish length"),
        (-1, 4, "negative address"),
        (0x1000, -1, "negative length"),
    ],
)
def test_an_access_outside_the_region_is_refused(addr, length, why):
    mem = GuestMemory.from_buffer(bytearray(PAGE), gpa=0x1000)
    with pytest.raises(MemoryAccessError) as e:
        mem.view(addr, length)
    assert e.value.addr == addr and e.value.length == length, why
    assert isinstance(e.value, VirtioError)


def test_the_error_names_the_access():
    mem = GuestMemory.from_buffer(bytearray(PAGE), gpa=0x1000)
    with pytest.raises(MemoryAccessError, match=r"0x2000.*\+0x10"):
        mem.view(0x2000, 0x10)


# -- several regions ---------------------------------------------------------------


def test_each_region_is_found_by_its_address():
    mem, low, high = two_regions()
    mem.write(0x1000 + 5, b"L")
    mem.write(0x8000 + PAGE + 7, b"H")
    assert low[5:6] == b"L"
    assert high[PAGE + 7 : PAGE + 8] == b"H"
    assert [r.gpa for r in mem.regions] == [0x1000, 0x8000]


@pytest.mark.parametrize(
    ("addr", "length"),
    [(0x2000, 1), (0x7FFF, 1), (0x7FFF, 2), (0x0, 1), (0xA000, 1), (0x1FFF, 2)],
)
def test_holes_and_accesses_leaving_a_region_are_refused(addr, length):
    mem, _, _ = two_regions()
    with pytest.raises(MemoryAccessError):
        mem.view(addr, length)


def test_an_access_may_not_straddle_two_adjacent_regions():
    # They are separate memfds in the back-end: no view can span both.
    mem = GuestMemory(
        [MemoryRegion(0x1000, memoryview(bytearray(PAGE))),
         MemoryRegion(0x2000, memoryview(bytearray(PAGE)))]
    )  # fmt: skip
    assert len(mem.view(0x1FF8, 8)) == 8
    assert len(mem.view(0x2000, 8)) == 8
    with pytest.raises(MemoryAccessError):
        mem.view(0x1FFC, 8)


def test_overlapping_regions_are_refused():
    mem = GuestMemory([MemoryRegion(0x1000, memoryview(bytearray(PAGE)))])
    with pytest.raises(ValueError, match="overlaps"):
        mem.add_region(MemoryRegion(0x1800, memoryview(bytearray(PAGE))))
    with pytest.raises(ValueError, match="overlaps"):
        mem.add_region(MemoryRegion(0x0800, memoryview(bytearray(PAGE))))


def test_a_region_can_be_removed_and_then_is_gone():
    mem, _, _ = two_regions()
    region = mem.remove_region(0x8000)
    assert region.gpa == 0x8000
    with pytest.raises(MemoryAccessError):
        mem.view(0x8000, 1)
    assert len(mem.view(0x1000, 1)) == 1
    with pytest.raises(MemoryAccessError, match="names no region"):
        mem.remove_region(0x8000)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 40), addr=st.integers(0, 90 * PAGE), length=st.integers(0, 2 * PAGE))
def test_many_regions_find_the_one_an_access_is_in(n, addr, length):
    """Memory slots: up to hundreds of regions, every other page a hole; the lookup
    (a binary search) agrees with a scan of every region."""
    bufs = [bytearray([i]) * PAGE for i in range(n)]
    # Added out of order, as ADD_MEM_REG may: the table sorts them.
    mem = GuestMemory([MemoryRegion(2 * i * PAGE, bufs[i]) for i in reversed(range(n))])
    inside = [i for i in range(n) if 2 * i * PAGE <= addr and addr + length <= (2 * i + 1) * PAGE]
    if not inside:
        with pytest.raises(MemoryAccessError):
            mem.view(addr, length)
        return
    view = mem.view(addr, length)
    assert len(view) == length
    assert bytes(view) == bytes([inside[0]]) * length


def test_a_region_added_and_removed_at_run_time_is_seen_by_the_next_access():
    mem = GuestMemory([MemoryRegion(0, bytearray(PAGE))])
    with pytest.raises(MemoryAccessError):
        mem.view(0x10000, 1)
    mem.add_region(MemoryRegion(0x10000, bytearray(b"x" * PAGE), uva=0x7000))
    assert mem.read(0x10000, 1) == b"x"
    assert mem.find_region(0x10000, PAGE, 0x7000) is not None
    assert mem.find_region(0x10000, PAGE, 0x8000) is None  # REM names all three
    mem.remove_region(0x10000)
    with pytest.raises(MemoryAccessError):
        mem.view(0x10000, 1)
    assert (mem.first_gpa, mem.first_size) == (0, PAGE)


def test_release_drops_every_region():
    mem, _, _ = two_regions()
    mem.release()
    assert mem.regions == ()
    with pytest.raises(MemoryAccessError):
        mem.view(0x1000, 1)


# -- region construction -----------------------------------------------------------


def test_a_read_only_buffer_is_not_guest_memory():
    with pytest.raises(ValueError, match="read-only"):
        MemoryRegion(0, memoryview(bytes(16)))


def test_a_region_must_fit_the_u64_space():
    with pytest.raises(ValueError, match="u64"):
        MemoryRegion(U64_MAX - 7, memoryview(bytearray(16)))
    assert MemoryRegion(U64_MAX - 15, memoryview(bytearray(16))).size == 16


def test_a_region_of_any_buffer_format_is_bytes():
    words = memoryview(bytearray(64)).cast("Q")
    region = MemoryRegion(0, words)
    assert region.size == 64 and region.buffer.format == "B"


# -- front-end virtual addresses (vhost-user ring addresses) -----------------------


def test_front_end_addresses_translate_through_each_region_uva():
    low, high = bytearray(PAGE), bytearray(PAGE)
    mem = GuestMemory(
        [MemoryRegion(0x1000, memoryview(low), uva=0x7F00_0000_0000),
         MemoryRegion(0x9000, memoryview(high), uva=0x7F00_1000_0000)]
    )  # fmt: skip
    mem.view_uva(0x7F00_1000_0010, 2)[:] = b"ok"
    assert high[0x10:0x12] == b"ok"
    assert mem.uva_to_gpa(0x7F00_0000_0123) == 0x1123
    assert mem.uva_to_gpa(0x7F00_1000_0000) == 0x9000
    with pytest.raises(MemoryAccessError, match="front-end"):
        mem.view_uva(0x7F00_0000_0FF0, 0x20)
    with pytest.raises(MemoryAccessError, match="front-end"):
        mem.uva_to_gpa(0x1000)


# -- property: a view is either exactly inside one region or refused ----------------


@settings(max_examples=300, deadline=None)
@given(
    addr=st.one_of(st.integers(0, 0xC000), st.integers(0, U64_MAX)),
    length=st.one_of(st.integers(0, 0x3000), st.integers(0, 1 << 33)),
)
def test_every_view_lies_inside_exactly_one_region(addr, length):
    mem, _, _ = two_regions()
    inside = any(r.gpa <= addr and addr + length <= r.gpa + r.size for r in mem.regions)
    try:
        view = mem.view(addr, length)
    except MemoryAccessError:
        assert not inside
    else:
        assert inside and len(view) == length


def test_a_chain_popped_from_a_removed_region_keeps_its_mmap_until_it_goes():
    # A one-descriptor chain in the lowest region keeps that region's view, not one
    # of its own (Chain.direct): it must still pin the mmap, as a view would, once
    # the region is removed and its buffer released (vhost_user/mapping.py).
    from virtnet.virtio.ring.layout import VRING_DESC_F_WRITE, VringAddrs, VringViews
    from virtnet.virtio.ring.split import SplitQueueDevice

    with mmap.mmap(-1, 4 * PAGE) as m:
        region = MemoryRegion(0, memoryview(m))
        mem = GuestMemory([region])
        addrs = VringAddrs.contiguous(0, 8)
        ring = VringViews.from_memory(mem, addrs)
        ring.desc[0] = 2 * PAGE
        ring.desc[1] = 64 | VRING_DESC_F_WRITE << 32
        ring.avail[2], ring.avail[1] = 0, 1
        chain = SplitQueueDevice(ring, mem).pop()
        assert chain is not None and chain.region is not None and chain.in_len == 64
        ring.release()
        mem.remove_region(0)
        region.buffer.release()
        with pytest.raises(BufferError):
            m.close()  # pinned by the chain
        chain.writable[0][:3] = b"abc"
        assert m[2 * PAGE : 2 * PAGE + 3] == b"abc"
        assert chain.segments == [(2 * PAGE, 64, True)]
        del chain
        m.close()  # the last view went with the chain
