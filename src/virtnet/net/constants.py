"""Constants of the seed's receive path, each named once (Linux's names)."""

from typing import Final

PAGE_SIZE: Final = 4096
# The seed: netdev_alloc_skb(vi->dev, GOOD_COPY_LEN + NET_IP_ALIGN).
GOOD_COPY_LEN: Final = 128
NET_IP_ALIGN: Final = 2
# include/linux/skbuff.h (2009): (65536/PAGE_SIZE + 2).
MAX_SKB_FRAGS: Final = 65536 // PAGE_SIZE + 2
ETH_HLEN: Final = 14
ETH_DATA_LEN: Final = 1500
VLAN_HLEN: Final = 4
# virtio_net.c: MAX_PACKET_LEN (ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN), the small-buffer size.
MAX_PACKET_LEN: Final = ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN
# The largest GSO frame a device may hand over: Ethernet + VLAN tag + IPv6 header + a
# full 64 KiB payload (what a TSO tap can produce; BIG TCP is never switched on).
MAX_GSO_FRAME: Final = ETH_HLEN + VLAN_HLEN + 40 + 65535
# NAPI's default weight.
NAPI_POLL_WEIGHT: Final = 64

# The ewma strategy (virtio_net.c after the seed: "auto-tune mergeable rx buffer size"):
# virtio_net.c GOOD_PACKET_LEN is MAX_PACKET_LEN under its later name, the floor of
# an EWMA-sized buffer.
GOOD_PACKET_LEN: Final = MAX_PACKET_LEN
# include/linux/ip.h: the largest IP packet (mergeable_min_buf_len with big_packets).
IP_MAX_MTU: Final = 0xFFFF
# virtio_net.c: DECLARE_EWMA(pkt_len, 0, 64) — precision 0 bits, weight 1/64.
EWMA_PKT_LEN_WEIGHT_RCP: Final = 64
# get_mergeable_buf_len: ALIGN(len, L1_CACHE_BYTES) (x86-64: 64).
L1_CACHE_BYTES: Final = 64
# include/net/sock.h: SKB_FRAG_PAGE_ORDER = get_order(32768) — the page frag a
# socket's (and virtio_net's rq->alloc_frag) buffers are carved from.
SKB_FRAG_PAGE_ORDER: Final = 3
