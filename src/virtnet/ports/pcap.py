"""``--pcap FILE``: what crossed a virtnet driver or device, readable by tshark.

Frames are written without their virtio-net header (link type Ethernet); a
TSO frame is written whole, as tcpdump on a tap shows it. The snap length is
the largest GSO frame, so nothing is cut.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import dpkt

from virtnet.net.constants import MAX_GSO_FRAME


class PcapWriter:
    """Appends frames to a pcap file; ``hdr_len`` bytes of vnet header are skipped."""

    def __init__(self, path: str, hdr_len: int) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.writer = dpkt.pcap.Writer(
            self.file, snaplen=MAX_GSO_FRAME, linktype=dpkt.pcap.DLT_EN10MB
        )
        self.hdr_len = hdr_len
        self.frames = 0

    def write_views(self, views: Sequence, nbytes: int | None = None) -> None:
        """One frame given as views that start with the vnet header (``nbytes`` in all)."""
        data = b"".join(views)
        if nbytes is not None:
            data = data[:nbytes]
        self.write_frame(data[self.hdr_len :])

    def write_frame(self, frame: bytes) -> None:
        self.writer.writepkt(frame, ts=time.time())
        self.frames += 1

    def close(self) -> None:
        self.file.flush()
        self.writer.close()
