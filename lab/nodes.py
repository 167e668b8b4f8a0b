"""`migctl lab`: several nodes on one machine, each a network namespace with its own Docker
engine and agent, joined by a bridge that lives in a lab namespace of its own.

Layout (all names are the lab's own, so `down` removes exactly them):
  namespace migctl-sw        bridge br0; veth end `host` to the host's `migctl-host`
  namespace migctl-nodeX     eth0 (LAB.1x), lo; dockerd + containerd + agent run here
  host                       migctl-host (LAB.1), the only address the lab adds to the host
The host's only new route is the lab subnet, chosen so that it overlaps no existing route.

Every node's engine also has the Docker network `lan` (LAN_NETWORK): macvlan over the node's
eth0, the lab subnet, containers' addresses from its upper half (LAB.128/25, apart from the
nodes' and the host's). It is one segment across the nodes, so a container on it keeps its
address when it moves, and with it its established connections (docs/real-machines.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

from migctl.agent import certs
from migctl.client.api import MIGCTL_HOME, AgentClient, Node, default_inventory
from migctl.common.errors import MigctlError
from migctl.common.tls import TLSFiles

LAB_DIR = MIGCTL_HOME / "lab"
RUN_DIR = Path("/run/migctl")  # exec roots: socket paths must stay short
SWITCH_NS = "migctl-sw"
HOST_IF = "migctl-host"
AGENT_PORT = 50051
CRIU_BIN = Path("/opt/migctl/bin")
LAN_NETWORK = "lan"
CANDIDATE_SUBNETS = ["10.213.77.0/24", "10.231.19.0/24", "172.29.213.0/24", "192.168.213.0/24"]


def node_names(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise MigctlError(f"--nodes must be between 1 and 26, not {n}")
    return [f"node{c}" for c in string.ascii_uppercase[:n]]


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise MigctlError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()


def in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


def pick_subnet() -> ipaddress.IPv4Network:
    """A subnet that overlaps no route of the host (shadowing the host's own subnet once cut a
    machine off its mirrors), unless it is the lab's own route from an earlier `up`."""
    routes = []
    for line in sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        dest = line.split()[0]
        if dest == "default" or HOST_IF in line.split():
            continue
        with contextlib.suppress(ValueError):
            routes.append(ipaddress.ip_network(dest if "/" in dest else f"{dest}/32", False))
    for cand in map(ipaddress.ip_network, CANDIDATE_SUBNETS):
        if not any(cand.overlaps(r) for r in routes):
            return cand  # type: ignore[return-value]
    raise MigctlError(f"every lab subnet candidate overlaps a host route: {CANDIDATE_SUBNETS}")


class Lab:
    def __init__(self, home: Path = LAB_DIR) -> None:
        self.home = home
        self.state_file = home / "lab.json"
        self.tls_dir = home / "tls"

    # -- state ------------------------------------------------------------------------------

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def save(self, state: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))
        inventory = {"tls_dir": str(self.tls_dir),
                     "nodes": {name: {"address": n.get("address", ""),
                                      "docker_host": n.get("docker_host", "")}
                               for name, n in state.get("nodes", {}).items()}}
        path = default_inventory()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(inventory, indent=2))

    # -- network ----------------------------------------------------------------------------

    def ensure_switch(self, state: dict) -> ipaddress.IPv4Network:
        if "subnet" in state and netns_exists(SWITCH_NS) and \
                sh("ip", "link", "show", HOST_IF, check=False).returncode == 0:
            return ipaddress.ip_network(state["subnet"])  # type: ignore[return-value]
        subnet = pick_subnet()
        if not netns_exists(SWITCH_NS):
            sh("ip", "netns", "add", SWITCH_NS)
        in_ns(SWITCH_NS, "ip", "link", "set", "lo", "up")
        if in_ns(SWITCH_NS, "ip", "link", "show", "br0", check=False).returncode != 0:
            in_ns(SWITCH_NS, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(SWITCH_NS, "ip", "link", "set", "br0", "up")
        sh("ip", "link", "del", HOST_IF, check=False)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", "host",
           "netns", SWITCH_NS)
        in_ns(SWITCH_NS, "ip", "link", "set", "host", "master", "br0", "up")
        sh("ip", "addr", "add", f"{subnet[1]}/{subnet.prefixlen}", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        state["subnet"] = str(subnet)
        return subnet

    def ensure_node_ns(self, name: str, index: int, subnet: ipaddress.IPv4Network) -> str:
        ns, port = f"migctl-{name}", f"p-{name}"
        address = str(subnet[11 + index])
        if not netns_exists(ns):
            sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")  # CRIU's restore needs lo up
        if in_ns(ns, "ip", "link", "show", "eth0", check=False).returncode != 0:
            in_ns(SWITCH_NS, "ip", "link", "del", port, check=False)
            in_ns(SWITCH_NS, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0",
                  "netns", ns)
            in_ns(SWITCH_NS, "ip", "link", "set", port, "master", "br0", "up")
            in_ns(ns, "ip", "addr", "add", f"{address}/{subnet.prefixlen}", "dev", "eth0")
            in_ns(ns, "ip", "link", "set", "eth0", "up")
        return address

    # -- processes --------------------------------------------------------------------------

    def node_dir(self, name: str) -> Path:
        return self.home / name

    @staticmethod
    def alive(pid: int | None, marker: str) -> bool:
        """PID runs and is ours: its command line names MARKER (a path only we use)."""
        if not pid:
            return False
        try:
            return marker in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            return False

    def spawn(self, ns: str, cmd: list[str], log: Path, env: dict[str, str]
              ) -> subprocess.Popen:
        """Start CMD in namespace NS. While we wait for it, ask the Popen whether it lives:
        right after the fork /proc/PID/cmdline may still show ours."""
        with log.open("ab") as out:
            return subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)

    def ensure_dockerd(self, name: str, node: dict) -> None:
        # here, not at the top: every migctl command imports this module, the Docker SDK
        # (under agent.runtime) costs ~0.15 s of start-up
        from migctl.agent.runtime.direct import DIRECT_RUNTIME
        from migctl.agent.runtime.direct import WRAPPER as RUNC_WRAPPER

        d = self.node_dir(name)
        config = d / "daemon.json"
        exec_root = RUN_DIR / name
        sock = d / "docker.sock"
        wanted = json.dumps({
            "data-root": str(d / "data"), "exec-root": str(exec_root),
            "hosts": [f"unix://{sock}"], "pidfile": str(d / "docker.pid"),
            "experimental": True, "storage-driver": "overlay2",
            # the direct checkpoint path (agent/runtime/direct.py)
            "runtimes": {DIRECT_RUNTIME: {"path": str(RUNC_WRAPPER)}},
            "default-runtime": DIRECT_RUNTIME,
        }, indent=2)
        close = d / "criu-tcp-close.conf"
        if self.alive(node.get("dockerd_pid"), str(config)) and self.engine_answers(node):
            if config.read_text() == wanted and \
                    f"CRIU_CONFIG_FILE={close}".encode() in self.environ(node["dockerd_pid"]):
                return
            # an engine of an older checkout: it restarts with this one's configuration
            self._remove_containers(node)
            self.stop_pid(node.get("dockerd_pid"), str(config), timeout=60)
        for sub in ("data", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        exec_root.mkdir(parents=True, exist_ok=True)
        config.write_text(wanted)
        # containers the engine runs with plain runc close their connections at a checkpoint
        # or a restore, as before (migctl-runc chooses per call; docs/real-machines.md)
        close.write_text("tcp-close\n")
        env = dict(os.environ, TMPDIR=str(d / "tmp"), CRIU_CONFIG_FILE=str(close),
                   PATH=f"{CRIU_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        proc = self.spawn(f"migctl-{name}", ["dockerd", "--config-file", str(config)],
                          d / "dockerd.log", env)
        node["dockerd_pid"] = proc.pid
        node["docker_host"] = f"unix://{sock}"
        deadline = time.monotonic() + 60
        while not self.engine_answers(node):
            if time.monotonic() > deadline or proc.poll() is not None:
                self.stop_pid(proc.pid, str(config))
                tail = (d / "dockerd.log").read_text()[-2000:]
                raise MigctlError(f"the Docker engine of {name} did not start:\n{tail}")
            time.sleep(0.3)

    @staticmethod
    def environ(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return b""

    @staticmethod
    def ensure_lan(name: str, node: dict, subnet: ipaddress.IPv4Network) -> None:
        """The node's network `lan` (LAN_NETWORK), the same at every node; one of an earlier
        lab that differs is made anew, unless a container is on it."""
        host = ["docker", "-H", node["docker_host"]]
        ip_range = list(subnet.subnets(prefixlen_diff=1))[-1]
        wanted = {"Driver": "macvlan", "Subnet": str(subnet), "Gateway": str(subnet[1]),
                  "IPRange": str(ip_range), "parent": "eth0"}
        res = sh(*host, "network", "inspect", LAN_NETWORK, check=False)
        if res.returncode == 0:
            info = json.loads(res.stdout)[0]
            ipam = ((info.get("IPAM") or {}).get("Config") or [{}])[0]
            have = {"Driver": info.get("Driver"), "Subnet": ipam.get("Subnet"),
                    "Gateway": ipam.get("Gateway"), "IPRange": ipam.get("IPRange"),
                    "parent": (info.get("Options") or {}).get("parent")}
            if have == wanted:
                return
            if info.get("Containers"):
                raise MigctlError(f"{name}: network {LAN_NETWORK!r} is {have}, not {wanted}, "
                                  "and containers are on it: remove them, or `lab down`")
            sh(*host, "network", "rm", LAN_NETWORK)
        sh(*host, "network", "create", "-d", "macvlan", "--subnet", wanted["Subnet"],
           "--gateway", wanted["Gateway"], "--ip-range", wanted["IPRange"],
           "-o", "parent=eth0", LAN_NETWORK)

    @staticmethod
    def engine_answers(node: dict) -> bool:
        if not node.get("docker_host"):
            return False
        sock = node["docker_host"].removeprefix("unix://")
        res = subprocess.run(["docker", "-H", f"unix://{sock}", "version", "--format",
                              "{{.Server.Version}}"], capture_output=True, text=True)
        return res.returncode == 0

    def start_agent(self, name: str, node: dict, extra_args: list[str] | None = None,
                    module: str = "migctl.agent.server") -> None:
        """(Re)start the agent, so a lab always runs the agent code of this checkout. Tests
        may run it through a MODULE of their own that wraps `migctl.agent.server` with hooks."""
        d = self.node_dir(name)
        self.stop_pid(node.get("agent_pid"), str(d / "agent"))
        cmd = [sys.executable, "-m", module, "--node", name,
               "--listen", node["address"], "--docker-host", node["docker_host"],
               "--state-dir", str(d / "agent"), "--engine-tmp", str(d / "tmp"),
               "--containerd", str(RUN_DIR / name / "containerd" / "containerd.sock"),
               "--tls-dir", str(certs.node_dir(self.tls_dir, name)),
               "--inventory", str(default_inventory()),
               *(extra_args or [])]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        proc = self.spawn(f"migctl-{name}", cmd, d / "agent.log", env)
        node["agent_pid"] = proc.pid
        deadline = time.monotonic() + 30
        while True:
            try:
                with AgentClient(Node(name, node["address"]),
                                 TLSFiles.from_dir(self.tls_dir, "client"), timeout=2) as c:
                    c.info()
                return
            except MigctlError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    self.stop_pid(proc.pid, str(d))
                    tail = (d / "agent.log").read_text()[-2000:]
                    raise MigctlError(f"the agent of {name} did not start:\n{tail}") from None
                time.sleep(0.3)

    @staticmethod
    def stop_pid(pid: int | None, marker: str, timeout: float = 30) -> None:
        if not Lab.alive(pid, marker):
            return
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while Lab.alive(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if Lab.alive(pid, marker):
            os.kill(pid, signal.SIGKILL)

    # -- commands ---------------------------------------------------------------------------

    def up(self, n: int) -> dict:
        names = node_names(n)
        if not shutil.which("dockerd") or not (CRIU_BIN / "criu").exists():
            raise MigctlError("dockerd or the probed CRIU is missing: run scripts/setup.sh")
        state = self.state()
        certs.init(self.tls_dir, sorted({*state.get("nodes", {}), *names}))
        subnet = self.ensure_switch(state)
        nodes = state.setdefault("nodes", {})
        self.save(state)  # record what exists so far: `down` must find it even if we fail
        for i, name in enumerate(names):
            node = nodes.setdefault(name, {})
            node["netns"] = f"migctl-{name}"
            node["address"] = f"{self.ensure_node_ns(name, i, subnet)}:{AGENT_PORT}"
            self.save(state)
            self.ensure_dockerd(name, node)
            self.save(state)
            self.ensure_lan(name, node, subnet)
            self.start_agent(name, node)
            self.save(state)
        return state

    def restart_agent(self, name: str, extra_args: list[str] | None = None,
                      module: str = "migctl.agent.server") -> None:
        state = self.state()
        self.start_agent(name, state["nodes"][name], extra_args, module)
        self.save(state)

    def down(self) -> list[str]:
        state = self.state()
        removed = []
        for name, node in state.get("nodes", {}).items():
            d = self.node_dir(name)
            self.stop_pid(node.get("agent_pid"), str(d / "agent"))
            self._remove_containers(node)
            self.stop_pid(node.get("dockerd_pid"), str(d / "daemon.json"), timeout=60)
            ns = node.get("netns", f"migctl-{name}")
            if netns_exists(ns):
                # whatever still runs in the node's namespace was started there by this lab
                for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                sh("ip", "netns", "del", ns, check=False)
            self._unmount_below(d)
            self._unmount_below(RUN_DIR / name)
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(RUN_DIR / name, ignore_errors=True)
            removed.append(name)
        sh("ip", "link", "del", HOST_IF, check=False)
        if netns_exists(SWITCH_NS):
            sh("ip", "netns", "del", SWITCH_NS, check=False)
        inv = default_inventory()
        if state and inv.exists():
            inv.unlink()
        shutil.rmtree(self.home, ignore_errors=True)
        return removed

    def _remove_containers(self, node: dict) -> None:
        """Container processes live in namespaces of their own, outside the node's, and their
        shims outlive the engine: remove the containers while the engine still runs."""
        if not self.engine_answers(node):
            return
        host = ["docker", "-H", node["docker_host"]]
        ids = sh(*host, "ps", "-aq", check=False).stdout.split()
        if ids:
            sh(*host, "rm", "-f", *ids, check=False)

    @staticmethod
    def _unmount_below(path: Path) -> None:
        prefix = str(path.resolve()) + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            sh("umount", "-l", m, check=False)


def add_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="a multi-node lab on this machine (namespaces + daemons)")
    lsub = lab.add_subparsers(dest="lab_command", required=True)
    up = lsub.add_parser("up", help="start (or reuse) N nodes: nodeA, nodeB, ...")
    up.add_argument("--nodes", type=int, default=2)
    up.set_defaults(func=cmd_up)
    down = lsub.add_parser("down", help="remove everything `up` created")
    down.set_defaults(func=cmd_down)
    env = lsub.add_parser("env", help="print the shell line pointing `docker` at NODE's engine")
    env.add_argument("node")
    env.set_defaults(func=cmd_env)
    link = lsub.add_parser("link", help="shape the path between lab nodes A and B, both "
                           "directions (others stay as they are); --reset clears it")
    link.add_argument("nodes", nargs="*", metavar="NODE", help="A B (with --reset: optional, "
                      "every link when omitted)")
    link.add_argument("--rate", default="", help="e.g. 100mbit, 1gbit (tc's units)")
    link.add_argument("--loss", default="", help="random loss, e.g. 0.1%%")
    link.add_argument("--delay", default="", help="e.g. 10ms (needs netem in the kernel)")
    link.add_argument("--jitter", default="", help="e.g. 2ms, with --delay")
    link.add_argument("--reset", action="store_true", help="clear the pair (or all links)")
    link.set_defaults(func=cmd_link)
    links = lsub.add_parser("links", help="show the links that are shaped")
    links.set_defaults(func=cmd_links)
    toy = lsub.add_parser("toy", help="run the seed's toy container (toytsm) on NODE, "
                          "replacing an earlier one there")
    toy.add_argument("node")
    toy.set_defaults(func=cmd_toy)


def cmd_link(args: argparse.Namespace) -> int:
    from migctl.lab import net as labnet

    lab = Lab()
    state = lab.state()
    if not state.get("nodes"):
        raise MigctlError("the lab is not up: run `migctl lab up` first")
    if args.reset:
        if len(args.nodes) not in (0, 2):
            raise MigctlError("--reset takes two nodes, or none for every link")
        cleared = labnet.reset(state, *args.nodes) if args.nodes else labnet.reset(state)
        lab.save(state)
        print("cleared: " + (", ".join(c.replace("|", " <-> ") for c in cleared) or "nothing"))
        return 0
    if len(args.nodes) != 2:
        raise MigctlError("give two nodes: migctl lab link A B --rate 100mbit")
    spec = labnet.LinkSpec(args.rate, args.loss, args.delay, args.jitter)
    labnet.set_link(state, args.nodes[0], args.nodes[1], spec)
    lab.save(state)
    print("\n".join(labnet.describe(state)))
    return 0


def cmd_links(args: argparse.Namespace) -> int:
    from migctl.lab import net as labnet

    print("\n".join(labnet.describe(Lab().state())) or "no link is shaped")
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    import docker

    from migctl.lab import workloads

    nodes = Lab().state().get("nodes", {})
    if args.node not in nodes:
        raise MigctlError(f"no lab node {args.node!r} (lab nodes: {', '.join(nodes) or 'none'})")
    client = docker.DockerClient(base_url=nodes[args.node]["docker_host"], timeout=120)
    workloads.ensure_toy_image(client, MIGCTL_HOME / "cache")
    workloads.remove_everywhere({args.node: client}, ["toytsm"], ["testrw", "testro"])
    c = workloads.run_toy(client)
    print(f"toytsm running on {args.node} ({c.id[:12]}): counting into volume testrw, "
          "read-only volume testro")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    state = Lab().up(args.nodes)
    for name in node_names(args.nodes):
        n = state["nodes"][name]
        print(f"{name}: agent {n['address']}, engine {n['docker_host']}")
    print(f"inventory: {default_inventory()}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    removed = Lab().down()
    print(f"removed: {', '.join(removed) or 'nothing (no lab was up)'}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    nodes = Lab().state().get("nodes", {})
    if args.node not in nodes:
        raise MigctlError(f"no lab node {args.node!r} (lab nodes: {', '.join(nodes) or 'none'})")
    print(f"export DOCKER_HOST={nodes[args.node]['docker_host']}")
    print(f"# run: eval $(migctl lab env {args.node})")
    return 0
