"""Link delay and bandwidth on a device inside a network namespace, without netem.

    shape("ns-a", "eth0", delay_ms=10, rate_mbit=20)   # what eth0 sends: +10 ms, at most 20 Mbit/s
    unshape("ns-a", "eth0")

Why not netem: some kernels are built without sch_netem and without modules (the 6.18 test VM).
Delay is added on egress only: give each end of a link its share (10 ms each way: 20 ms RTT).

Delay starts with a tc egress eBPF program (BPF_PROG_TYPE_SCHED_CLS, assembled here, loaded with
bpf(2), pinned in a bpffs mounted only for the `tc filter add ... object-pinned` call: the filter
holds the program, so no pin or mount outlives shape()). Then one of two ways:
- Earliest departure time (EDT), where sch_fq exists: the program sets skb->tstamp (offset 152 of
  struct __sk_buff; bpf_delay_supported() test-runs it and reads now + delay back) and an fq root
  qdisc, with limits raised so a fast flow is not dropped, holds each packet until then.
- Forwarder, where it does not (the test VM has no fq, etf or taprio: nothing honours skb->tstamp):
  the program redirects every frame to a tap; a child process in the namespace reads it (GSO
  frames whole, up to 64 KiB) and sends it out of the device delay_ms later through an AF_PACKET
  socket whose SO_MARK lets it pass the program. It exits if its parent dies (undoing the redirect).
Rate: tbf, with fq as its child under EDT, or on the tap under the forwarder (rate, then delay;
local TCP senders get backpressure rather than drops).
Measured on the VM (forwarder, two namespaces joined by a veth, 10 ms on each end): ping RTT
20.4/20.55/20.7 ms min/avg/max (0.05 ms unshaped); TCP at 20 Mbit/s + 10 ms: 19.0 Mbit/s; TCP with
10 ms alone: 0.78 Gbit/s over 50 MB, 1.0 Gbit/s over 300 MB, limited by the sender's 4 MiB tcp_wmem
as on any 20 ms path (3.2 Gbit/s with 16 MiB; the forwarders then use 31% and 17% of a core).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import errno
import fcntl
import os
import platform
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Optional

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())  # bpf(2)'s number differs per architecture
_PROG_LOAD, _OBJ_PIN, _PROG_TEST_RUN = 5, 6, 10
_SCHED_CLS = 3
_TSTAMP_OFF, _MARK_OFF = 152, 8  # offsets in struct __sk_buff
_MARK = 0x706C6400  # SO_MARK of the forwarder's frames (< 2**31: the eBPF compare sign-extends)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_forwarders: dict[tuple[str, str], subprocess.Popen] = {}
_edt: Optional[tuple[bool, str]] = None


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def _edt_program(delay_ns: int) -> bytes:
    return b"".join(
        [
            _insn(0xBF, 6, 1),  # r6 = r1 (the __sk_buff)
            _insn(0x85, imm=5),  # r0 = bpf_ktime_get_ns()
            _insn(0x18, 1, imm=delay_ns & 0xFFFFFFFF),
            _insn(0, imm=delay_ns >> 32),  # r1 = delay_ns
            _insn(0x0F, 0, 1),  # r0 += r1
            _insn(0x7B, 6, 0, _TSTAMP_OFF),  # skb->tstamp = r0
            _insn(0xB7, 0),  # r0 = TC_ACT_OK
            _insn(0x95),
        ]
    )


def _redirect_program(ifindex: int) -> bytes:
    return b"".join(
        [
            _insn(0x61, 2, 1, _MARK_OFF),  # r2 = skb->mark
            _insn(0xB7, 0),  # r0 = TC_ACT_OK
            _insn(0x15, 2, off=3, imm=_MARK),  # the forwarder's own frame: goto exit
            _insn(0xB7, 1, imm=ifindex),
            _insn(0xB7, 2),  # r0 = bpf_redirect(ifindex, 0)
            _insn(0x85, imm=23),
            _insn(0x95),
        ]
    )


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    if _SYS_BPF is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    if (ret := _libc.syscall(_SYS_BPF, ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))) < 0:
        raise OSError(ctypes.get_errno(), f"bpf(cmd={cmd}): {os.strerror(ctypes.get_errno())}")
    return ret


def _load(insns: bytes, name: bytes) -> int:
    """BPF_PROG_LOAD a tc program; returns its fd. The verifier's log goes into the error."""
    code, license, log = (
        ctypes.create_string_buffer(insns),
        ctypes.create_string_buffer(b"GPL"),
        ctypes.create_string_buffer(1 << 16),
    )
    attr = ctypes.create_string_buffer(
        struct.pack(
            "<IIQQIIQII16s",
            _SCHED_CLS,
            len(insns) // 8,
            ctypes.addressof(code),
            ctypes.addressof(license),
            1,
            len(log),
            ctypes.addressof(log),
            0,
            0,
            name,
        ),
        128,
    )
    try:
        return _bpf(_PROG_LOAD, attr)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}; verifier log:\n{log.value.decode(errors='replace')}") from None


def _check_tstamp(fd: int, delay_ns: int) -> None:
    """Run the EDT program once on a dummy packet: skb->tstamp must come back as now + delay."""
    data, ctx_in, ctx_out = ctypes.create_string_buffer(64), ctypes.create_string_buffer(192), ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(
        struct.pack(
            "<IIIIQQIIIIQQ",
            fd,
            0,
            64,
            0,
            ctypes.addressof(data),
            0,
            1,
            0,
            192,
            256,
            ctypes.addressof(ctx_in),
            ctypes.addressof(ctx_out),
        ),
        80,
    )
    before, _, after = time.monotonic_ns(), _bpf(_PROG_TEST_RUN, attr), time.monotonic_ns()
    (tstamp,) = struct.unpack_from("<Q", ctx_out, _TSTAMP_OFF)
    if not before + delay_ns <= tstamp <= after + delay_ns:
        raise OSError(0, f"skb->tstamp came back as {tstamp}, not in [{before}, {after}] + {delay_ns}")


def bpf_delay_supported() -> tuple[bool, str]:
    """(True, "") if EDT delay works here; else (False, why). Loads, test-runs and unloads the program."""
    try:
        fd = _load(_edt_program(1_000_000), b"pl_probe")
        try:
            _check_tstamp(fd, 1_000_000)
        finally:
            os.close(fd)  # unloads it
    except OSError as e:
        return False, f"the eBPF delay program fails: {e}"
    probe = subprocess.run(["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "fq"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"no fq qdisc to honour skb->tstamp (CONFIG_NET_SCH_FQ): {probe.stderr.strip()}"
    return True, ""


def _tc(netns: str, *args: object, check: bool = True) -> None:
    done = subprocess.run(
        argv := ["ip", "netns", "exec", netns, "tc", *map(str, args)], capture_output=True, text=True, timeout=30
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _tbf(rate_mbit: float) -> list[object]:
    rate = int(rate_mbit * 125_000)  # bytes/s
    burst = max(32 * 1024, rate // 200)  # >= 5 ms of traffic and > a few MTUs
    return ["tbf", "rate", f"{rate}bps", "burst", burst, "limit", max(rate // 10, 4 * burst)]  # queue: 100 ms


def _attach(netns: str, dev: str, insns: bytes) -> None:
    """Load `insns`, pin them in a bpffs mounted for this call only, attach them on dev's egress, unpin."""
    fd, bpffs = _load(insns, b"pl_netshape"), tempfile.mkdtemp(prefix="petals_like-bpffs-")
    pin, mounted = os.path.join(bpffs, f"{dev}-delay"), False
    try:
        subprocess.run(["mount", "-t", "bpf", "bpf", bpffs], check=True, capture_output=True)
        mounted = True
        path = ctypes.create_string_buffer(pin.encode())
        _bpf(_OBJ_PIN, ctypes.create_string_buffer(struct.pack("<QII", ctypes.addressof(path), fd, 0), 16))
        _tc(netns, "qdisc", "add", "dev", dev, "clsact")
        _tc(netns, "filter", "add", "dev", dev, "egress", "bpf", "da", "object-pinned", pin)
    finally:  # the filter keeps the program alive: drop the pin, the mount and our fd
        os.close(fd)
        if os.path.exists(pin):
            os.unlink(pin)
        if mounted:
            subprocess.run(["umount", bpffs], capture_output=True)
        os.rmdir(bpffs)


def shape(netns: str, dev: str, *, delay_ms: float = 0.0, rate_mbit: Optional[float] = None) -> None:
    """Delay what `dev` (in `netns`) sends by delay_ms and cap it at rate_mbit; replaces earlier shaping."""
    global _edt
    if delay_ms < 0 or (rate_mbit is not None and rate_mbit <= 0):
        raise ValueError(f"bad shaping: delay_ms={delay_ms}, rate_mbit={rate_mbit}")
    unshape(netns, dev)
    if not delay_ms:
        if rate_mbit:
            _tc(netns, "qdisc", "add", "dev", dev, "root", *_tbf(rate_mbit))
        return
    try:
        if _edt is None:
            _edt = bpf_delay_supported()
        if _edt[0]:
            fq = ["fq", "limit", 100_000, "flow_limit", 10_000, "horizon", f"{max(10.0, 4 * delay_ms / 1000)}s"]
            if rate_mbit:
                _tc(netns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *_tbf(rate_mbit))
                _tc(netns, "qdisc", "add", "dev", dev, "parent", "1:1", *fq)
            else:
                _tc(netns, "qdisc", "add", "dev", dev, "root", *fq)
            _attach(netns, dev, _edt_program(int(delay_ms * 1e6)))
            return
        tap = f"pldelay{zlib.crc32(dev.encode()) & 0xFFFFFF:06x}"
        argv = ["ip", "netns", "exec", netns, sys.executable, "-I", os.path.abspath(__file__), dev, tap, str(delay_ms)]
        proc = _forwarders[(netns, dev)] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready = select.select([proc.stdout], [], [], 30)[0] and proc.stdout.readline()  # type: ignore
        if not ready:
            proc.kill()
            raise RuntimeError(f"delay forwarder for {netns}/{dev} did not start: {proc.communicate()[1].decode()}")
        if rate_mbit:
            _tc(netns, "qdisc", "add", "dev", tap, "root", *_tbf(rate_mbit))
        _attach(netns, dev, _redirect_program(int(ready)))
    except BaseException:
        unshape(netns, dev)
        raise


def unshape(netns: str, dev: str) -> None:
    """Remove what shape() put on `dev`: the forwarder (stopped by PID), the filter, the qdiscs."""
    if (proc := _forwarders.pop((netns, dev), None)) is not None:
        _stop(proc)
    _tc(netns, "qdisc", "del", "dev", dev, "clsact", check=False)
    _tc(netns, "qdisc", "del", "dev", dev, "root", check=False)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    proc.communicate()  # closes the pipes


@atexit.register
def cleanup() -> None:
    """Stop every forwarder this process started (pins and bpffs mounts never outlive a shape() call)."""
    while _forwarders:
        _stop(_forwarders.popitem()[1])


def _forward(dev: str, tap: str, delay_ms: float) -> None:
    """Child process, inside the namespace: send each frame read from `tap` out of `dev` delay_ms later."""
    parent, delay = os.getppid(), delay_ms / 1000
    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000 | 0x4000))  # TUNSETIFF: TAP, NO_PI, VNET_HDR
    fcntl.ioctl(tun, 0x400454D0, 1 | 2 | 4)  # TUNSETOFFLOAD: CSUM, TSO4, TSO6: GSO frames come whole
    subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{tap}.disable_ipv6=1"], capture_output=True)  # it sends nothing of its own
    with open(f"/sys/class/net/{dev}/mtu") as f:
        mtu = f.read().strip()
    subprocess.run(["ip", "link", "set", tap, "mtu", mtu, "txqueuelen", "10000", "arp", "off", "up"], check=True)
    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    out.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR: frames keep their virtio_net_hdr (GSO)
    out.setsockopt(socket.SOL_SOCKET, 36, _MARK)  # SO_MARK
    out.setsockopt(socket.SOL_SOCKET, 32, 1 << 26)  # SO_SNDBUFFORCE
    out.bind((dev, 0))
    print(socket.if_nametoindex(tap), flush=True)
    held: collections.deque[tuple[float, bytes]] = collections.deque()
    while os.getppid() == parent:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.5
        if select.select([tun], [], [], timeout)[0]:
            due = time.monotonic() + delay
            for _ in range(256):
                try:
                    held.append((due, os.read(tun, 66_000)))  # vnet header + a GSO frame of at most 64 KiB
                except BlockingIOError:
                    break
        now = time.monotonic()
        while held and held[0][0] <= now:
            try:
                out.send(held.popleft()[1])
            except OSError as e:  # ENOBUFS and the like: dropped downstream, as on a real link
                if e.errno in (errno.ENODEV, errno.ENXIO):
                    return  # the device is gone
    subprocess.run(["tc", "qdisc", "del", "dev", dev, "clsact"], capture_output=True)  # caller died: unredirect


if __name__ == "__main__":
    _forward(sys.argv[1], sys.argv[2], float(sys.argv[3]))
