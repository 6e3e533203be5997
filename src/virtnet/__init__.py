"""virtnet: a virtio-net driver and device in Python over real virtqueues.

The receive path implements the 2009 RFC "defer skb allocation in virtio_net --
mergable buff part" (see ../shared/seed); the pre-patch code is kept as the
``prealloc`` strategy so the seed's A/B runs in one command.
"""

__version__ = "0.1.0"

# Before any data-plane module is imported: compiled or pure (VIRTNET_PURE=1, stale builds).
from virtnet._build import choose as _choose_build  # noqa: E402

_choose_build()
