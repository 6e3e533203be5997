"""The kinds of lie ``virtnet device --faults`` tells, named once.

The device counts what it injects as ``fault_KIND`` (device_stats) and the driver
counts what it meets under the same names (driver_stats, net/ratelimit.py), so a
run can be checked by comparing the two.
"""

from __future__ import annotations

# kind -> what the device does (``virtnet device --help`` prints these)
FAULT_KINDS: dict[str, str] = {
    "bad_id": "a used entry names a descriptor id beyond the ring (Linux: 'id N out of "
    "range', queue broken)",
    "dup_id": "a used id returned a second time, right after the first (Linux: 'id N is "
    "not a head!', queue broken)",
    "bad_len": "a used length beyond the buffer's writable bytes (rx)",
    "idx_jump": "the used index moved more than the ring size ahead (queue broken)",
    "num_buffers_big": "num_buffers larger than the buffers returned: more than the "
    "driver ever posted",
    "num_buffers_small": "num_buffers smaller than the buffers returned (0 for a "
    "one-buffer packet)",
    "short": "a packet shorter than the virtio-net header + an Ethernet header",
    "bad_csum": "NEEDS_CSUM with csum_start + csum_offset past the end of the frame",
    "bad_gso": "a gso_type (TCPV4) with gso_size 0",
    "irq_drop": "an interrupt (call eventfd) the driver asked for is not sent",
    "irq_late": "an interrupt sent late (by the next loop pass after LATE_MS)",
}
