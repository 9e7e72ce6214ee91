"""A wire with delay between two network namespaces, for bench/compression.sh: the part of
`tc netem` this machine's kernel lacks (it has no sch_netem; tbf, which sets the rate, is there).

Attaches to a TAP device in each namespace (created by the caller) and carries every Ethernet
frame from one to the other DELAY_MS later, in order. TCP runs end to end between the two
namespaces' own stacks, so slow start and acknowledgements see the round trip; the rate is
set by tbf on each TAP device.

Usage: python3 bench/linkemu.py NETNS_A TAP_A NETNS_B TAP_B DELAY_MS   (runs until killed)
"""
import ctypes
import fcntl
import heapq
import os
import select
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
libc = ctypes.CDLL("libc.so.6", use_errno=True)


def open_tap(netns, name):
    ns = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    if libc.setns(ns, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {netns}")
    os.close(ns)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def main():
    ns_a, tap_a, ns_b, tap_b, delay_ms = sys.argv[1:]
    a, b = open_tap(ns_a, tap_a), open_tap(ns_b, tap_b)
    delay = float(delay_ms) / 1000
    peer = {a: b, b: a}
    queue = []  # (due, seq, fd, frame)
    seq = 0
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        ready, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                seq += 1
                heapq.heappush(queue, (now + delay, seq, peer[fd], frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, frame = heapq.heappop(queue)
            try:
                os.write(fd, frame)
            except BlockingIOError:
                pass  # the receiving device's queue is full: dropped, as a wire would


if __name__ == "__main__":
    main()
