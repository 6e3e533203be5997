"""The in-flight region (PROTOCOL_F_INFLIGHT_SHMFD), as a memfd and as a mapping.

vhost-user.rst "Inflight I/O tracking": the back-end makes the region
(GET_INFLIGHT_FD: a zeroed memfd, ``num_queues`` queue regions of one size
each) and the front-end keeps the fd, sending it back with SET_INFLIGHT_FD
each time it starts the device, the first time included, so that a restarted
back-end finds what its predecessor had in flight. Queue ``i``'s region starts
at ``i * region_size(queue_size, packed)``: the layout is the negotiated ring's,
QueueRegionSplit or QueueRegionPacked (virtio/ring/inflight.py), as DPDK sizes it.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from virtnet.vhost_user.mapping import MappingError, seal_shrink
from virtnet.virtio.ring.inflight import InflightPacked, InflightSplit, region_size

MAX_INFLIGHT_QUEUES = 1024  # a bound on num_queues that no front-end reaches (2 * 64 pairs here)


def make_inflight_fd(num_queues: int, queue_size: int, packed: bool) -> tuple[int, int]:
    """GET_INFLIGHT_FD: a zeroed, sealed memfd for ``num_queues`` queues; (fd, size)."""
    if not 1 <= num_queues <= MAX_INFLIGHT_QUEUES:
        raise ValueError(f"in-flight region for {num_queues} queues: 1..{MAX_INFLIGHT_QUEUES}")
    if not 1 <= queue_size <= 32768:
        raise ValueError(f"in-flight region for queues of {queue_size}: 1..32768 descriptors")
    size = num_queues * region_size(queue_size, packed)
    fd = os.memfd_create("virtnet-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)  # a new file's pages read as zero: "version 0", fresh
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        os.close(fd)
        raise
    return fd, size


class MappedInflight:
    """A front-end's in-flight region, mapped shared; ``queue(i)`` is vring i's part."""

    def __init__(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int,
                 packed: bool) -> None:  # fmt: skip
        per = region_size(queue_size, packed) if queue_size > 0 else 0
        if not 1 <= num_queues <= MAX_INFLIGHT_QUEUES or per == 0:
            raise MappingError(0, f"in-flight region for {num_queues} queues of {queue_size} "
                                  "descriptors: no such device")  # fmt: skip
        if size < num_queues * per:
            raise MappingError(0, f"in-flight mmap_size {size:#x} is smaller than {num_queues} "
                                  f"{'packed' if packed else 'split'} queues of {queue_size} "
                                  f"need ({num_queues * per:#x})")
        self.unsealed = seal_shrink(fd)  # before the size check: nothing can shrink it after
        try:
            file_size = os.fstat(fd).st_size
        except OSError as e:
            raise MappingError(e.errno or 0, f"in-flight fd: {e.strerror}") from None
        if offset + size > file_size:
            raise MappingError(0, f"in-flight mmap_size {size:#x} at mmap_offset {offset:#x} "
                                  f"is larger than its file ({file_size:#x} bytes)")  # fmt: skip
        try:
            self._map = mmap.mmap(fd, offset + size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        except (OSError, ValueError, OverflowError) as e:
            raise MappingError(getattr(e, "errno", 0) or 0, f"in-flight region: mmap: {e}"
                               ) from None  # fmt: skip
        self.view = memoryview(self._map)[offset : offset + size]
        self.size, self.num_queues, self.queue_size = size, num_queues, queue_size
        self.per_queue, self.packed = per, packed

    def queue(self, index: int, num: int) -> InflightSplit | InflightPacked:
        """Vring ``index``'s region, for a ring of ``num`` descriptors."""
        if not 0 <= index < self.num_queues:
            raise MappingError(0, f"vring {index} has no in-flight region (the front-end "
                                  f"gave one for {self.num_queues} queues)")  # fmt: skip
        if num != self.queue_size:
            raise MappingError(0, f"vring {index} has {num} descriptors, its in-flight region "
                                  f"was made for {self.queue_size}")  # fmt: skip
        part = self.view[index * self.per_queue : (index + 1) * self.per_queue]
        return InflightPacked(part, num, index) if self.packed else InflightSplit(part, num, index)

    def clear(self) -> None:
        """A device reset: every queue's region back to "never used"."""
        self.view[:] = bytes(len(self.view))

    def close(self) -> None:
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a ring still holds a view; the map goes when it does
