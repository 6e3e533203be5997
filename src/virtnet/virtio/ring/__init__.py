"""Virtqueues. ``split`` is the VIRTIO 1.x split virtqueue, both sides."""
