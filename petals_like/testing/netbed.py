"""NetBed: hosts made of Linux network namespaces, an "internet" bridge, home routers doing NAT.

    with NetBed() as bed:
        boot = bed.add_host("boot")                       # on the internet: 10.77.0.x
        home = bed.add_host("home", nat=True, uplink_mbit=20, delay_ms=10)  # behind a NAT router
        proc = home.popen([sys.executable, "-m", "petals_like.cli.run_server", ...])

Layout. One namespace holds the bridge that plays the internet (10.77.0.0/16). A public host is a
namespace with one veth ("eth0") plugged into that bridge. A host behind NAT sits on its own LAN
(10.78.K.2/24) behind a router namespace whose "wan" end is on the bridge (10.77.1.K) and which
masquerades the LAN with nftables and drops connections opened from outside. Every address is private
and inside namespaces made here: nothing is routed to the machine's own interfaces.

Links. delay_ms is added on each direction of a host's access link (testing/netshape.py: an eBPF
program with fq's earliest departure times, or a small delay forwarder where the kernel lacks fq, as
netem is missing on some kernels), so two hosts see the sum of their delays one way; uplink_mbit
caps what the host (or its router) sends to the internet.

Cleanup. Every process started in a namespace is killed by PID, then every namespace is deleted (its
veths, qdiscs and nftables tables go with it), on exit, on an exception, on Ctrl-C and on SIGTERM.
Needs root; available() says why not.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from petals_like.testing.processes import Child

logger = logging.getLogger(__name__)

INTERNET = "10.77"  # 10.77.0.0/16: public hosts 10.77.0.x, routers' WAN ends 10.77.1.x
LANS = "10.78"  # home K: 10.78.K.0/24, router 10.78.K.1, host 10.78.K.2
_counter = itertools.count()
_live: set[str] = set()  # namespaces made by this process and not deleted yet


def available() -> tuple[bool, str]:
    """(True, "") if this process can build a bed; else (False, why)."""
    if sys.platform != "linux":
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` is not installed (apt-get install iproute2 nftables)"
    return True, ""


def sh(*argv: str, netns: Optional[str] = None, stdin: Optional[str] = None) -> str:
    """Run a command (in a namespace); raise with its stderr if it fails."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    done = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    bed: NetBed
    name: str
    netns: str
    ip: str  # the host's own address
    public_ip: str  # where the internet sees it from: its own address, or its router's
    nat: bool
    router: Optional[str] = None  # the router's namespace, for a host behind NAT
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process in this host's namespace (stopped by the bed's cleanup)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def start(self, name: str, module_args: Sequence[str]) -> Child:
        """`python -m MODULE ARGS...` of this project in this host, its output kept (a Child)."""
        child = Child(
            f"{self.name}/{name}", ["ip", "netns", "exec", self.netns, sys.executable, "-m", *module_args], cwd=repo_root()
        )
        self.procs.append(child.process)
        return child

    def run(self, *argv: str) -> str:
        return sh(*argv, netns=self.netns)

    def maddr(self, port: int) -> str:
        return f"/ip4/{self.ip}/tcp/{port}"


class NetBed:
    def __init__(self, tag: Optional[str] = None):
        ok, why = available()
        if not ok:
            raise RuntimeError(f"cannot build a network test bed: {why}")
        self.tag = tag or f"pl{os.getpid() % 100000}{next(_counter)}"
        self.internet = f"{self.tag}-inet"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self._public = itertools.count(10)
        self._homes = itertools.count(1)
        self._ports = itertools.count(1)
        self._previous_sigterm: Any = None
        self.shaped: list[tuple[str, str]] = []  # (namespace, device) with delay or rate limits

    # ---- building

    def __enter__(self) -> NetBed:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._netns(self.internet)
            sh("ip", "link", "add", "br0", "type", "bridge", netns=self.internet)
            sh("ip", "link", "set", "br0", "up", netns=self.internet)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _netns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        _live.add(name)
        sh("ip", "link", "set", "lo", "up", netns=name)
        return name

    def _plug(self, netns: str, dev: str, address: str, delay_ms: float, uplink_mbit: Optional[float]) -> None:
        """A veth from `netns` (named `dev`, with `address`) to a new port of the internet bridge."""
        port = f"{self.tag}p{next(self._ports)}"[-15:]
        sh("ip", "link", "add", dev, "netns", netns, "type", "veth", "peer", "name", port, "netns", self.internet)
        sh("ip", "link", "set", port, "master", "br0", "up", netns=self.internet)
        sh("ip", "addr", "add", f"{address}/16", "dev", dev, netns=netns)
        sh("ip", "link", "set", dev, "up", netns=netns)
        if delay_ms or uplink_mbit:
            from petals_like.testing import netshape

            netshape.shape(netns, dev, delay_ms=delay_ms, rate_mbit=uplink_mbit)
            self.shaped.append((netns, dev))
            if delay_ms:
                netshape.shape(self.internet, port, delay_ms=delay_ms)
                self.shaped.append((self.internet, port))

    def add_host(self, name: str, *, nat: bool = False, delay_ms: float = 0.0, uplink_mbit: Optional[float] = None) -> Host:
        """A public host on the internet bridge, or (nat=True) one behind its own NAT router."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        netns = self._netns(f"{self.tag}-{name}")
        if not nat:
            ip = f"{INTERNET}.0.{next(self._public)}"
            self._plug(netns, "eth0", ip, delay_ms, uplink_mbit)
            host = Host(self, name, netns, ip, ip, nat=False)
        else:
            k = next(self._homes)
            router = self._netns(f"{self.tag}-{name}-gw")
            wan, lan_gw, ip = f"{INTERNET}.1.{k}", f"{LANS}.{k}.1", f"{LANS}.{k}.2"
            self._plug(router, "wan", wan, delay_ms, uplink_mbit)
            sh("ip", "link", "add", "lan", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", netns)
            sh("ip", "addr", "add", f"{lan_gw}/24", "dev", "lan", netns=router)
            sh("ip", "link", "set", "lan", "up", netns=router)
            sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", netns=netns)
            sh("ip", "link", "set", "eth0", "up", netns=netns)
            sh("ip", "route", "add", "default", "via", lan_gw, netns=netns)
            sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", netns=router)
            sh("nft", "-f", "-", netns=router, stdin=NAT_RULES)
            host = Host(self, name, netns, ip, wan, nat=True, router=router)
        self.hosts[name] = host
        return host

    def unshape(self) -> None:
        """Take every delay and rate limit off the bed; hosts, NAT and processes stay (a loopback-like baseline)."""
        from petals_like.testing import netshape

        while self.shaped:
            netshape.unshape(*self.shaped.pop())

    # ---- faults

    def kill_host(self, name: str) -> None:
        """SIGKILL every process of a host, as if it lost power."""
        for pid in _netns_pids(self.hosts[name].netns):
            _kill(pid)

    # ---- cleanup

    def close(self) -> None:
        """Kill every process in the bed's namespaces, then delete them. Safe to call twice."""
        try:
            self.unshape()  # stops the delay forwarders this process started (and reaps them)
        except Exception as e:  # the namespaces go below anyway, and their processes with them
            logger.warning(f"could not unshape the bed's links: {e!r}")
        for netns in self.namespaces:
            for pid in _netns_pids(netns):
                _kill(pid)
        for host in self.hosts.values():
            for proc in host.procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for netns in reversed(self.namespaces):
            try:
                sh("ip", "netns", "del", netns)
            except RuntimeError as e:
                logger.warning(f"could not delete namespace {netns}: {e}")
            _live.discard(netns)
        self.namespaces.clear()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


NAT_RULES = """
table ip petals_like_nat {
    chain postrouting { type nat hook postrouting priority 100; oifname "wan" masquerade; }
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
}
"""


def leftovers() -> list[str]:
    """Namespaces this process made that still exist (empty after a clean close)."""
    existing = set(sh("ip", "netns", "list").split()) if available()[0] else set()
    return sorted(name for name in _live if name in existing)


def _netns_pids(netns: str) -> list[int]:
    try:
        return [int(p) for p in sh("ip", "netns", "pids", netns).split()]
    except RuntimeError:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that the with-block's cleanup runs


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
