"""A local RabbitMQ cluster (Debian's rabbitmq-server) on loopback: start, stop, crash, partition.

Each node is a `scripts.broker.LocalBroker` in ``DIR/<name>`` (own name, AMQP and distribution
ports, data dir); the nodes share one Erlang cookie and one epmd of their own on 127.0.0.1. The
first start joins nodes 2..N to node 1; later starts keep the data and the membership.

Partitions: every node runs with a group id of its own (``setpriv --regid``), so iptables can tell
its sockets apart although all nodes share 127.0.0.1. A chain in the mangle table marks each
loopback connection with a bit per node that sent on it (``CONNMARK --or-mark``, by ``owner
--gid-owner``); `partition` drops the packets of connections that carry the bits of the isolated
node and of any other node. That cuts the Erlang distribution links both ways, while AMQP clients
(and rabbitmqctl) still reach every node. Needs root and Debian's ``iptables``.

The pieces: `ClusterNode` (a member: a `LocalBroker` with a group id and cluster settings),
`ClusterView` (what the running cluster reports, asked of whichever node answers),
`Partitioner` (the iptables chain) and `LocalCluster`, which owns the nodes' processes, epmd and
state, and offers all of it as one API.

CLI::

    python -m scripts.cluster start --dir .broker/cluster [--size 3]
    python -m scripts.cluster status --dir .broker/cluster
    python -m scripts.cluster urls --dir .broker/cluster        # the comma-separated host list
    python -m scripts.cluster kill|stop-node|restart|partition NODE --dir .broker/cluster
    python -m scripts.cluster heal --dir .broker/cluster
    python -m scripts.cluster leader QUEUE --dir .broker/cluster
    python -m scripts.cluster stop --dir .broker/cluster
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from scripts._testing import nodekit
from scripts.broker import (
    DIST_ARGS,
    SERVER,
    STATE_KEYS,
    BrokerError,
    LocalBroker,
    ensure_installed,
    start_epmd,
)

__all__ = (
    "ClusterError",
    "ClusterNode",
    "ClusterView",
    "LocalCluster",
    "Partitioner",
    "ensure_iptables",
    "main",
)

log = logging.getLogger(__name__)

_NODE_BIT = 0x10000  # connmark bit of node i: _NODE_BIT << i (low bits left to anyone else)
_GID_BASE = 200_000  # node i of the cluster whose epmd listens on port P runs as gid BASE + 8P + i
_NODE_PORTS = ("amqp_port", "dist_port", "management_port", "tls_port")  # epmd: the cluster's


class ClusterError(BrokerError):
    """The local cluster could not be started, changed or queried."""


def ensure_iptables() -> None:
    """Install Debian's iptables if it is missing and we are root (partitions need it).

    Without root, or if apt-get fails, the cluster still starts; only `partition` will fail.
    """
    if shutil.which("iptables") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    log.warning("iptables is missing: installing it with apt-get (for partitions)")
    failed = nodekit.apt_install("iptables")
    if failed is not None:
        log.warning("`%s` failed: partitions will not be available", failed)


@dataclass
class ClusterNode(LocalBroker):
    """A cluster member: a LocalBroker with a group id of its own and cluster settings."""

    gid: int = 0
    net_ticktime: int = 10
    partition_handling: str = "pause_minority"

    def close(self) -> None:
        """Stop the node; the cluster owns the shared epmd."""
        self.stop()

    def state(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in STATE_KEYS if k != "tls"}
        state.update(gid=self.gid, net_ticktime=self.net_ticktime)
        return state

    def _erl_args(self) -> str:
        return f"{DIST_ARGS} -kernel net_ticktime {self.net_ticktime}"

    def _config_lines(self) -> list[str]:
        return [
            *super()._config_lines(),
            f"cluster_partition_handling = {self.partition_handling}",
        ]

    def _server_command(self) -> list[str]:
        if not self.gid or not shutil.which("setpriv"):
            return super()._server_command()
        return ["setpriv", f"--regid={self.gid}", "--clear-groups", str(SERVER)]


@dataclass(frozen=True)
class Partitioner:
    """Cuts and heals the Erlang distribution links of a cluster's nodes with iptables.

    One chain in the mangle table per cluster (named after its epmd port) marks each loopback
    connection with the bit of every node that sent on it (by the node's group id); a cut drops
    the packets of connections that carry the bits of the cut-off node and of another node.
    Needs root and Debian's ``iptables``; without them only `cut` fails.
    """

    epmd_port: int
    nodes: tuple[ClusterNode, ...]

    @property
    def chain(self) -> str:
        return f"WORKQ{self.epmd_port}"

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and shutil.which("iptables") is not None

    def install(self) -> None:
        """Mark connections by the nodes that use them (best effort: no iptables, no cuts)."""
        if not self.available():
            log.info("no iptables (or not root): partitions will not be available")
            return
        if not self._chain_exists():
            self._iptables("-N", self.chain)
            self._iptables("-A", "OUTPUT", "-o", "lo", "-j", self.chain)
        self._iptables("-F", self.chain)
        self._add_mark_rules()

    def cut(self, cut: ClusterNode) -> None:
        """Drop the traffic between cut and every other node (both ways).

        Raises:
            ClusterError: iptables is not available, or the chain was never installed.
        """
        self._require_chain()
        for other in self.nodes:
            if other is cut:
                continue
            bits = self._bit(cut) | self._bit(other)
            for owner in (cut, other):
                self._iptables(
                    "-A", self.chain, "-m", "owner", "--gid-owner", str(owner.gid),
                    "-m", "connmark", "--mark", f"{bits:#x}/{bits:#x}", "-j", "DROP",
                )  # fmt: skip

    def heal(self) -> None:
        """Remove every cut (the marks stay, so later cuts cut live links too)."""
        if not self.available():
            return
        self._iptables("-F", self.chain)
        self._add_mark_rules()

    def remove(self) -> None:
        """Remove the chain and its jump from OUTPUT."""
        if not self.available() or not self._chain_exists():
            return
        self._iptables("-D", "OUTPUT", "-o", "lo", "-j", self.chain, check=False)
        self._iptables("-F", self.chain, check=False)
        self._iptables("-X", self.chain, check=False)

    def _bit(self, node: ClusterNode) -> int:
        return _NODE_BIT << self.nodes.index(node)

    def _add_mark_rules(self) -> None:
        for n in self.nodes:
            self._iptables(
                "-A", self.chain, "-m", "owner", "--gid-owner", str(n.gid),
                "-j", "CONNMARK", "--or-mark", f"{self._bit(n):#x}",
            )  # fmt: skip

    def _require_chain(self) -> None:
        if not self.available():
            raise ClusterError(
                "partitions need root and iptables (`apt-get install iptables`); "
                "the chain is installed when the cluster starts, so restart it afterwards"
            )
        if not self._chain_exists():
            raise ClusterError(
                f"iptables chain {self.chain} is missing: it is made when the cluster starts "
                "(connections older than the chain are not tracked); restart the cluster"
            )

    def _chain_exists(self) -> bool:
        return self._iptables("-S", self.chain, check=False)

    def _iptables(self, *args: str, check: bool = True) -> bool:
        res = subprocess.run(
            ["iptables", "-w", "5", "-t", "mangle", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if check and res.returncode != 0:
            cmd = " ".join(args)
            raise ClusterError(f"`iptables -t mangle {cmd}` failed: {res.stderr.strip()}")
        return res.returncode == 0


@dataclass(frozen=True)
class ClusterView:
    """What a running cluster reports, asked of whichever of its nodes answers.

    Node lookup by any of a member's names, `rabbitmqctl` queries (status, queues and their
    leaders, client connections, partitions) and waits on them. It starts, stops and changes
    nothing: `LocalCluster` does, and answers its queries through a view of its nodes.
    """

    base_dir: Path
    nodes: tuple[ClusterNode, ...]

    def node(self, node: str) -> ClusterNode:
        """The member called node (short name, name or Erlang node name)."""
        for n in self.nodes:
            if node in (n.name, n.node, n.name.rsplit("-", 1)[-1]):
                return n
        names = ", ".join(n.name for n in self.nodes) or "none (start the cluster first)"
        raise ClusterError(f"no node {node!r} in the cluster in {self.base_dir}: nodes are {names}")

    # --- queries --------------------------------------------------------------------------

    def running_nodes(self) -> list[str]:
        """The Erlang names of the nodes the cluster reports as running (asked of a live node)."""
        status = self.cluster_status()
        running: list[str] = status.get("running_nodes", [])
        return sorted(running)

    def cluster_status(self) -> dict[str, Any]:
        """`rabbitmqctl cluster_status` of the first node that answers, as a dict."""
        result: dict[str, Any] = json.loads(self._ctl_any("cluster_status", "--formatter", "json"))
        return result

    def wait_running(self, nodes: list[str] | None = None, timeout: float = 60) -> None:
        """Wait until the cluster reports nodes (default: all) as running."""
        want = set(nodes if nodes is not None else [n.node for n in self.nodes])

        def up() -> bool:
            try:
                return want <= set(self.running_nodes())
            except BrokerError:
                return False

        if not nodekit.wait_until(up, timeout):
            raise ClusterError(
                f"nodes {sorted(want)} not all running after {timeout:g}s "
                f"(running: {self._running_or_error()})"
            )

    def queues(self) -> list[dict[str, Any]]:
        """Queues with their type, leader, members and counts (asked of a live node)."""
        out = self._ctl_any(
            "list_queues", "-q", "--formatter", "json",
            "name", "type", "leader", "members", "online", "messages", "consumers",
        )  # fmt: skip
        result: list[dict[str, Any]] = json.loads(out)
        return result

    def connections(self) -> list[dict[str, Any]]:
        """Client connections of the whole cluster: ``node`` (short name), ``name``, ``port``.

        ``name`` is the client's ``connection_name`` (aio-workq's ``name=``), ``port`` the
        node's listener port the client reached, so ``node`` is where the client sits.
        """
        out = self._ctl_any(
            "list_connections", "-q", "--formatter", "json", "port", "client_properties", "ssl"
        )
        by_port = {n.amqp_port: n.name for n in self.nodes}
        by_port.update({n.tls_port: n.name for n in self.nodes if n.tls})
        found = []
        for row in json.loads(out):
            props = {p[0]: p[2] for p in row.get("client_properties") or [] if len(p) == 3}
            found.append(
                {
                    "node": by_port.get(row.get("port")),
                    "name": props.get("connection_name"),
                    "port": row.get("port"),
                    "ssl": row.get("ssl"),
                }
            )
        return found

    def leader(self, queue: str) -> ClusterNode:
        """The node that leads the quorum queue named queue.

        Raises:
            ClusterError: no such queue, or it has no leader (not a quorum queue, or no quorum).
        """
        for q in self.queues():
            if q.get("name") == queue:
                leader = q.get("leader")
                if not isinstance(leader, str) or "@" not in leader:
                    raise ClusterError(f"queue {queue!r} has no leader now (got {leader!r})")
                return self.node(leader)
        raise ClusterError(f"no queue {queue!r} in the cluster")

    def wait_leader(self, queue: str, *, not_on: str | None = None, timeout: float = 30) -> str:
        """Wait until queue has a leader (other than not_on) and return its node name."""
        avoid = self.node(not_on).node if not_on else None
        found: list[str] = []

        def elected() -> bool:
            try:
                leader = self.leader(queue).node
            except BrokerError:
                return False
            found[:] = [leader]
            return leader != avoid

        if not nodekit.wait_until(elected, timeout):
            raise ClusterError(f"queue {queue!r}: no new leader in {timeout:g}s (saw {found})")
        return self.node(found[0]).name

    def partitions(self) -> list[str]:
        """The partitions RabbitMQ itself reports (`cluster_status`), asked of a live node."""
        found: list[str] = []
        for n in self.nodes:
            if not n.running():
                continue
            try:
                status = json.loads(n.ctl("cluster_status", "--formatter", "json", timeout=15))
            except (BrokerError, ValueError):
                continue
            for node, seen in (status.get("partitions") or {}).items():
                found.append(f"{node}: {sorted(seen)}")
        return sorted(set(found))

    def _running_or_error(self) -> str:
        try:
            return ", ".join(self.running_nodes()) or "none"
        except BrokerError as e:
            return f"unknown: {e}"

    def _ctl_any(self, *args: str) -> str:
        errors: list[str] = []
        for n in self.nodes:
            if n.beam_pid() is None:
                continue
            try:
                return n.ctl(*args, timeout=20)
            except BrokerError as e:
                errors.append(f"{n.name}: {e}")
        raise ClusterError(
            f"no node of the cluster in {self.base_dir} answered `rabbitmqctl {args[0]}`"
            + (": " + "; ".join(errors) if errors else " (none is running)")
        )


@dataclass
class LocalCluster:
    """N RabbitMQ nodes on 127.0.0.1 that form one cluster; its state lives in ``base_dir``.

    Node names are ``<prefix>-a``, ``<prefix>-b``, ...; every method that takes a node accepts the
    short name (``"a"``), the name (``"workq-a"``) or the Erlang node (``"workq-a@localhost"``).
    """

    base_dir: Path
    size: int = 3
    prefix: str = "workq"
    net_ticktime: int = 10
    epmd_port: int = 0
    epmd_pid: int | None = None
    joined: bool = False
    nodes: list[ClusterNode] = field(default_factory=list)
    _epmd: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).resolve()
        if self.size < 1:
            raise ClusterError(f"a cluster needs at least 1 node, got size={self.size}")

    # --- addresses ------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Every node's AMQP URL, in node order."""
        return [n.url for n in self.nodes]

    @property
    def host_list(self) -> str:
        """The URLs as one comma-separated string (for AMQP_URL)."""
        return ",".join(self.urls)

    def url(self, node: str) -> str:
        return self.node(node).url

    def node(self, node: str) -> ClusterNode:
        """The member called node (short name, name or Erlang node name)."""
        return self._view.node(node)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        """Start every node that is down (in parallel) and, the first time, form the cluster."""
        t0 = time.monotonic()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._make_nodes()
        self._start_epmd()
        self._partitioner.install()
        down = [n for n in self.nodes if n.beam_pid() is None]  # a paused node is not down
        try:
            with ThreadPoolExecutor(len(down) or 1) as pool:
                for f in [pool.submit(n.start, timeout) for n in down]:
                    f.result()
            if not self.joined:
                seed = self.nodes[0]
                for n in self.nodes[1:]:
                    n.ctl("stop_app")
                    n.ctl("join_cluster", seed.node)
                    n.ctl("start_app")
                self.joined = True
            self.save_state()
            self.wait_running(timeout=max(timeout - (time.monotonic() - t0), 10))
        except BaseException:
            self.save_state()
            raise
        log.info(
            "cluster of %d nodes up in %.1fs: %s", self.size, time.monotonic() - t0, self.host_list
        )

    def stop(self, timeout: float = 30) -> None:
        """Stop every node gracefully (in parallel); data and membership are kept."""
        with ThreadPoolExecutor(len(self.nodes) or 1) as pool:
            for f in [pool.submit(n.stop, timeout) for n in self.nodes]:
                f.result()
        self.save_state()

    def close(self) -> None:
        """stop(), remove the iptables chain, stop the cluster's epmd."""
        try:
            self.stop()
        finally:
            self._partitioner.remove()
            nodekit.terminate(self.epmd_pid, "epmd")
            if self._epmd is not None:
                self._epmd.poll()
                self._epmd = None
            self.epmd_pid = None
            self.save_state()

    def kill(self, node: str) -> None:
        """SIGKILL one node's beam (a crash); `restart` brings it back with its data."""
        self.node(node).kill()
        self.save_state()

    def stop_node(self, node: str, timeout: float = 30) -> None:
        """Stop one node gracefully."""
        self.node(node).stop(timeout)
        self.save_state()

    def restart(self, node: str, timeout: float = 90) -> None:
        """Start one stopped or killed node again; it rejoins the cluster with its data."""
        n = self.node(node)
        if n.beam_pid() is not None and not n.running():
            raise ClusterError(
                f"{n.node} is running but not serving (paused in a minority?): heal() and it "
                "resumes by itself; kill() it first to restart it"
            )
        n.start(timeout)
        self.save_state()
        self.wait_running([n.node], timeout=timeout)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- queries (see ClusterView) --------------------------------------------------------

    def running_nodes(self) -> list[str]:
        """The Erlang names of the nodes the cluster reports as running."""
        return self._view.running_nodes()

    def cluster_status(self) -> dict[str, Any]:
        """`rabbitmqctl cluster_status` of the first node that answers, as a dict."""
        return self._view.cluster_status()

    def wait_running(self, nodes: list[str] | None = None, timeout: float = 60) -> None:
        """Wait until the cluster reports nodes (default: all) as running."""
        self._view.wait_running(nodes, timeout)

    def queues(self) -> list[dict[str, Any]]:
        """Queues with their type, leader, members and counts."""
        return self._view.queues()

    def connections(self) -> list[dict[str, Any]]:
        """Client connections of the whole cluster: ``node`` (short name), ``name``, ``port``."""
        return self._view.connections()

    def leader(self, queue: str) -> ClusterNode:
        """The node that leads the quorum queue named queue (ClusterError if none)."""
        return self._view.leader(queue)

    def wait_leader(self, queue: str, *, not_on: str | None = None, timeout: float = 30) -> str:
        """Wait until queue has a leader (other than not_on) and return its node name."""
        return self._view.wait_leader(queue, not_on=not_on, timeout=timeout)

    def partitions(self) -> list[str]:
        """The partitions RabbitMQ itself reports (`cluster_status`)."""
        return self._view.partitions()

    @property
    def _view(self) -> ClusterView:
        return ClusterView(self.base_dir, tuple(self.nodes))

    # --- partitions -----------------------------------------------------------------------

    def partition(self, node: str) -> None:
        """Cut node's Erlang distribution links to all other nodes (both ways).

        AMQP clients still reach every node; with ``pause_minority`` the cut-off node pauses
        itself (closing its client connections) once it sees it is in a minority.

        Raises:
            ClusterError: iptables is not available (not root, or ``apt-get install iptables``).
        """
        cut = self.node(node)
        self._partitioner.cut(cut)
        log.info("partitioned %s from the other nodes", cut.node)

    def heal(self) -> None:
        """Remove every partition (the marks stay, so later partitions cut live links too)."""
        self._partitioner.heal()

    @property
    def _partitioner(self) -> Partitioner:
        return Partitioner(self.epmd_port, tuple(self.nodes))

    # --- state (lets another process drive the cluster) -----------------------------------

    def save_state(self) -> None:
        if not self.base_dir.is_dir():
            return
        state = {
            "size": self.size,
            "prefix": self.prefix,
            "net_ticktime": self.net_ticktime,
            "epmd_port": self.epmd_port,
            "epmd_pid": self.epmd_pid,
            "joined": self.joined,
            "nodes": [n.state() for n in self.nodes],
        }
        nodekit.write_state(self.base_dir / "cluster.json", state)

    @classmethod
    def from_dir(cls, base_dir: Path) -> LocalCluster:
        """The cluster whose cluster.json is in base_dir.

        Raises:
            ClusterError: there is no cluster state in base_dir.
        """
        state = nodekit.read_state(Path(base_dir) / "cluster.json", ClusterError, "cluster")
        nodes = state.pop("nodes")
        cluster = cls(Path(base_dir), **state)
        cluster.nodes = [ClusterNode(cluster.base_dir / n["name"], **n) for n in nodes]
        return cluster

    # --- internals ------------------------------------------------------------------------

    def _make_nodes(self) -> None:
        """The members (made the first time), their ports and the cluster's cookie."""
        if not self.epmd_port:
            self.epmd_port = nodekit.free_port()
        cookie = nodekit.write_cookie(self.base_dir / "cookie")
        if not self.nodes:
            self.nodes = [
                ClusterNode(
                    self.base_dir / f"{self.prefix}-{chr(ord('a') + i)}",
                    name=f"{self.prefix}-{chr(ord('a') + i)}",
                    gid=_GID_BASE + 8 * self.epmd_port + i,
                    net_ticktime=self.net_ticktime,
                )
                for i in range(self.size)
            ]
        taken = {self.epmd_port}
        for n in self.nodes:
            n.epmd_port = self.epmd_port
            nodekit.pick_ports(n, _NODE_PORTS, taken)
            n.base_dir.mkdir(parents=True, exist_ok=True)
            nodekit.write_cookie(n.base_dir / ".erlang.cookie", cookie)

    def _start_epmd(self) -> None:
        if not nodekit.alive(self.epmd_pid, "epmd"):
            self._epmd = start_epmd(self.epmd_port, self.base_dir / "log")
            self.epmd_pid = self._epmd.pid
        for n in self.nodes:
            n.epmd_pid = self.epmd_pid  # so LocalBroker.start does not start one of its own
        self.save_state()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.cluster", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "command",
        choices=[
            "start", "stop", "status", "urls", "kill", "stop-node", "restart", "partition",
            "heal", "leader",
        ],
    )  # fmt: skip
    parser.add_argument("target", nargs="?", help="node (kill/stop-node/restart/partition), queue")
    parser.add_argument("--dir", type=Path, default=Path(".broker/cluster"), help="cluster dir")
    parser.add_argument("--size", type=int, default=3, help="nodes (start of a new cluster)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds (start/restart)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    needs_target = {"kill", "stop-node", "restart", "partition", "leader"}
    if args.command in needs_target and not args.target:
        parser.error(f"{args.command} needs a {'queue' if args.command == 'leader' else 'node'}")
    try:
        if args.command == "start":
            ensure_installed()
            ensure_iptables()
            try:
                cluster = LocalCluster.from_dir(args.dir)
            except ClusterError:
                cluster = LocalCluster(args.dir, size=args.size)
            cluster.start(timeout=args.timeout)
            print(cluster.host_list)
            return 0
        if args.command == "stop" and not (args.dir / "cluster.json").exists():
            print(f"no cluster in {args.dir}")
            return 0
        cluster = LocalCluster.from_dir(args.dir)
        if args.command == "stop":
            cluster.close()
            print(f"stopped {len(cluster.nodes)} nodes")
        elif args.command == "status":
            all_up = True
            for n in cluster.nodes:
                up = n.running()
                all_up = all_up and up
                print(f"{n.node}: {'running' if up else 'stopped'}, {n.url}")
            if all_up:
                print(f"cluster: {', '.join(cluster.running_nodes())}")
            for p in cluster.partitions():
                print(f"partition: {p}")
            return 0 if all_up else 1
        elif args.command == "urls":
            print(cluster.host_list)
        elif args.command == "kill":
            cluster.kill(args.target)
            print(f"killed {cluster.node(args.target).node}")
        elif args.command == "stop-node":
            cluster.stop_node(args.target)
            print(f"stopped {cluster.node(args.target).node}")
        elif args.command == "restart":
            cluster.restart(args.target, timeout=args.timeout)
            print(cluster.url(args.target))
        elif args.command == "partition":
            cluster.partition(args.target)
            print(f"partitioned {cluster.node(args.target).node}")
        elif args.command == "heal":
            cluster.heal()
            print("healed")
        else:
            print(cluster.leader(args.target).node)
        return 0
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
