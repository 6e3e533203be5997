"""Typed errors of the virtio core.

Every error names what was wrong (which descriptor, which address, which rule)
so that a log line is enough to find the culprit; none leaves a ring in an
unknown state (see the docstring of the raiser for what state it leaves).
"""


class VirtioError(Exception):
    """Base of every error raised by the virtio layer."""


class MemoryAccessError(VirtioError):
    """A guest-physical access that leaves every memory region."""

    def __init__(self, addr: int, length: int, reason: str = "outside guest memory") -> None:
        super().__init__(f"guest access [{addr:#x}, +{length:#x}) {reason}")
        self.addr = addr
        self.length = length


class DescriptorError(VirtioError):
    """A descriptor chain the device must refuse (VIRTIO 1.2, 2.7.5).

    ``head`` is the chain's head id when it is a valid index, so that the
    caller can hand the buffer back (used length 0) instead of losing it;
    ``None`` when the available ring itself named an impossible head.
    """

    def __init__(self, message: str, head: int | None = None) -> None:
        super().__init__(message if head is None else f"chain at head {head}: {message}")
        self.head = head


class AvailIndexError(DescriptorError):
    """The driver moved the avail index more than a queue's worth ahead.

    Nothing was consumed: the queue cannot be trusted any more (vhost's
    "Guest moved avail index"); the device stops it until a reset.
    """


class UsedRingError(VirtioError):
    """A used-ring entry the driver must refuse (unknown id, length too large).

    ``head`` is the id the entry named; ``token`` the buffer's token when the id
    was a buffer in flight (detached first, so the caller can recycle it).
    """

    def __init__(self, message: str, head: int | None = None, token: object = None) -> None:
        super().__init__(message)
        self.head = head
        self.token = token


class UsedIndexError(VirtioError):
    """The device moved the used index more than a queue's worth ahead.

    No entry can be refused for it: the ring itself is impossible. The queue
    is marked broken (Linux's BAD_RING → vq->broken) and returns nothing more;
    the owner resets the device or ends the session.
    """


class QueueFullError(VirtioError):
    """No free descriptors for the buffer (the driver's -ENOSPC)."""


class FeatureError(VirtioError):
    """An impossible feature negotiation or device-status transition."""
