"""Constants of the seed's receive path, each named once (Linux's names)."""

PAGE_SIZE = 4096
# The seed: netdev_alloc_skb(vi->dev, GOOD_COPY_LEN + NET_IP_ALIGN).
GOOD_COPY_LEN = 128
NET_IP_ALIGN = 2
# include/linux/skbuff.h (2009): (65536/PAGE_SIZE + 2).
MAX_SKB_FRAGS = 65536 // PAGE_SIZE + 2
ETH_HLEN = 14
ETH_DATA_LEN = 1500
VLAN_HLEN = 4
# virtio_net.c: MAX_PACKET_LEN (ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN), the small-buffer size.
MAX_PACKET_LEN = ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN
# The largest GSO frame a device may hand over: Ethernet + VLAN tag + IPv6 header + a
# full 64 KiB payload (what a TSO tap can produce; BIG TCP is never switched on).
MAX_GSO_FRAME = ETH_HLEN + VLAN_HLEN + 40 + 65535
# NAPI's default weight.
NAPI_POLL_WEIGHT = 64
