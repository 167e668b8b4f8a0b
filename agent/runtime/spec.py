"""What a container's description may ask of the node that recreates it.

The description comes from the source agent, which the destination does not believe: the
engine's create request is rebuilt here from an allow-list, what a migration cannot carry is
computed here, and anything that would give the container power over the node (privileged
mode, added capabilities, security options) is refused unless the operator allowed it for
this migration.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
import re
from typing import Any

from migctl.agent.runtime.base import Network
from migctl.common.errors import InvalidArgument, Refused
from migctl.proto import migctl_pb2 as pb

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$")  # the engine's rule for names
_IMAGE_REF = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._/:@-]{0,254}$")
_CHECKPOINT_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CONTAINER_ID = re.compile(r"^[0-9a-f]{64}$")
_NETWORK_ID = re.compile(r"^[0-9a-f]{12,64}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

# Copied as they are: none of them reaches outside the container's own namespaces and cgroup.
SAFE_CONFIG = ("Hostname", "Domainname", "User", "ExposedPorts", "Env", "Cmd", "Entrypoint",
               "Labels", "WorkingDir", "StopSignal", "StopTimeout", "Healthcheck", "OpenStdin",
               "StdinOnce", "AttachStdin", "AttachStdout", "AttachStderr", "Shell",
               "ArgsEscaped", "Volumes")
SAFE_HOST = ("RestartPolicy", "PortBindings", "PublishAllPorts", "AutoRemove", "Memory",
             "MemoryReservation", "MemorySwap", "MemorySwappiness", "NanoCpus", "CpuShares",
             "CpuPeriod", "CpuQuota", "CpusetCpus", "CpusetMems", "BlkioWeight", "PidsLimit",
             "Init", "ShmSize", "Tmpfs", "Dns", "DnsOptions", "DnsSearch", "ExtraHosts",
             "ReadonlyRootfs", "Sysctls", "GroupAdd", "CapDrop", "LogConfig")
# Given only when the operator allows privileged containers for this migration: the OOM
# settings and resource limits ask the node for what only CAP_SYS_RESOURCE may take.
PRIVILEGED_HOST = ("Privileged", "CapAdd", "SecurityOpt", "MaskedPaths", "ReadonlyPaths",
                   "OomKillDisable", "OomScoreAdj", "Ulimits")
LOCAL_LOG_DRIVERS = ("json-file", "local", "journald", "none", "")
# CgroupnsMode is left out: "host" is the engine's default on cgroup v1, and it is not copied
# (the destination's engine applies its own default).
_SHARED_NAMESPACES = ("NetworkMode", "PidMode", "IpcMode", "UTSMode", "UsernsMode")


def valid_name(kind: str, name: str) -> str:
    if not _NAME.match(name or ""):
        raise InvalidArgument(f"invalid {kind} name {name!r}: names are letters, digits and "
                              "_ . - (not starting with a symbol)")
    return name


def valid_container_id(text: str) -> bool:
    return bool(_CONTAINER_ID.match(text))


def check_description(spec: pb.ContainerSpec) -> None:
    """The identifiers of a description that become names and paths on this node: refused
    unless they have the engine's own shapes."""
    try:
        valid_name("container", spec.name)
        for name in spec.networks:
            valid_name("network", name)
        for vol in spec.volumes:
            valid_name("volume", vol.name)
    except InvalidArgument as err:
        raise Refused(f"the container's description has an {err}") from None
    for what, value in [("image id", spec.image_id), *(("layer", d) for d in spec.diff_ids)]:
        if not _DIGEST.match(value):
            raise Refused(f"invalid {what} {value!r} in the container's description")
    if not _IMAGE_REF.match(spec.image):
        raise Refused(f"invalid image reference {spec.image!r} in the container's description")


def engine_config(spec: pb.ContainerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Config, HostConfig) of the engine's create request, as the source described them."""
    try:
        engine = json.loads(spec.engine_config_json or "{}")
        config, host = engine.get("Config") or {}, engine.get("HostConfig") or {}
    except (ValueError, AttributeError) as err:
        raise Refused(f"the container's engine configuration is not JSON: {err}") from None
    if not isinstance(config, dict) or not isinstance(host, dict):
        raise Refused("the container's engine configuration is malformed")
    return config, host


def _privileged(host: dict[str, Any]) -> list[str]:
    out = []
    if host.get("Privileged"):
        out.append("privileged mode")
    if host.get("CapAdd"):
        out.append(f"added capabilities {', '.join(map(str, host['CapAdd']))}")
    risky = [o for o in host.get("SecurityOpt") or []
             if not str(o).startswith("no-new-privileges")]
    if risky:
        out.append(f"security options {', '.join(map(str, risky))}")
    if host.get("OomKillDisable"):
        out.append("the OOM killer disabled")
    if (host.get("OomScoreAdj") or 0) < 0:
        out.append(f"OOM score adjustment {host['OomScoreAdj']} (spared before the node's own "
                   "processes)")
    if host.get("Ulimits"):
        out.append("resource limits (--ulimit) " + ", ".join(
            f"{u.get('Name')}={u.get('Soft')}:{u.get('Hard')}" for u in host["Ulimits"]))
    return out


def unsupported(spec: pb.ContainerSpec, allow_privileged: bool = False) -> list[str]:
    """What a migration cannot carry, or what the operator did not allow, in words an operator
    can act on. Computed from the description alone, on the node that would create it."""
    config, host = engine_config(spec)
    out = [f"bind mount {b.split(':')[0]} (a host path; use a named volume)"
           for b in host.get("Binds") or [] if str(b).startswith("/")]
    out += [f"bind mount {m.get('Source')} -> {m.get('Target')} (a host path; use a named "
            "volume)" for m in host.get("Mounts") or [] if m.get("Type") == "bind"]
    if host.get("VolumesFrom"):
        out.append("volumes from another container (--volumes-from)")
    out += [f"network {n!r}: it is not a network of its own (host, none or another "
            "container's)" for n in spec.networks if n in ("host", "none")]
    out += [f"network {n!r} looks like a network's id, which the engine would match before "
            "any name: networks move by name" for n in spec.networks if _NETWORK_ID.match(n)]
    if spec.networks and str(host.get("NetworkMode") or "") not in (spec.networks[0], "default"):
        out.append(f"network mode {host.get('NetworkMode')!r} differs from its first network "
                   f"{spec.networks[0]!r}")
    if config.get("Tty"):
        out.append("a terminal (-t): CRIU cannot checkpoint a container's TTY")
    for mode in _SHARED_NAMESPACES:
        value = str(host.get(mode) or "")
        if value == "host" or value.startswith("container:"):
            out.append(f"{mode} {value}: it shares namespaces of its node")
    out += [f"device {d.get('PathOnHost')}" for d in host.get("Devices") or []]
    if host.get("DeviceRequests") or host.get("DeviceCgroupRules"):
        out.append("device requests or device cgroup rules")
    log_driver = (host.get("LogConfig") or {}).get("Type") or ""
    if log_driver not in LOCAL_LOG_DRIVERS:
        out.append(f"log driver {log_driver!r} (migctl keeps logs on the node: "
                   f"{', '.join(d for d in LOCAL_LOG_DRIVERS if d)})")
    for vol in spec.volumes:
        out += _volume_problems(vol)
    if not allow_privileged:
        out += [f"{p} (it gives the container power over the node: the operator must allow "
                "it with --allow-privileged)" for p in _privileged(host)]
    return out


def _volume_problems(vol: pb.VolumeSpec) -> list[str]:
    if not _NAME.match(vol.name):
        return [f"volume name {vol.name!r} is not a valid name"]
    out = []
    dest = vol.destination
    if not dest.startswith("/") or posixpath.normpath(dest) != dest or set(dest) & set(":,\0"):
        out.append(f"volume {vol.name} mount point {dest!r} is not a plain absolute path")
    if (vol.driver or "local") != "local":
        out.append(f"volume {vol.name} uses driver {vol.driver} (only local volumes move)")
    opts = dict(vol.driver_options)
    if opts and not (opts.get("type") == "tmpfs" and opts.get("device") == "tmpfs"
                     and "bind" not in opts.get("o", "") and set(opts) <= {"type", "device",
                                                                          "o"}):
        out.append(f"volume {vol.name} has driver options {opts} (only tmpfs options move: "
                   "others can mount host paths)")
    return out


def create_request(spec: pb.ContainerSpec, allow_privileged: bool,
                   runtime: str = "") -> dict[str, Any]:
    """The engine's create request for SPEC, from the allow-lists only. Call `unsupported`
    first: this assumes the description passed it. RUNTIME is this node's choice (never the
    peer's): the engine's runtime to run the container with."""
    check_description(spec)
    config, host = engine_config(spec)
    out = {k: config[k] for k in SAFE_CONFIG if k in config}
    out["Image"] = spec.image
    new_host = {k: host[k] for k in SAFE_HOST if k in host}
    if allow_privileged:
        new_host.update({k: host[k] for k in PRIVILEGED_HOST if k in host})
    elif (host.get("OomScoreAdj") or 0) > 0:  # killed sooner: no power over the node
        new_host["OomScoreAdj"] = host["OomScoreAdj"]
    new_host["Mounts"] = [m for m in host.get("Mounts") or [] if m.get("Type") == "tmpfs"]
    # Volumes are attached by name, so that anonymous ones keep the name they were given.
    mounted = {v.destination for v in spec.volumes}
    out["Volumes"] = {d: {} for d in (out.get("Volumes") or {}) if d not in mounted}
    new_host["Binds"] = [f"{v.name}:{v.destination}:{'ro' if v.read_only else 'rw'}"
                         for v in spec.volumes]
    new_host["NetworkMode"] = (list(spec.networks) or ["bridge"])[0]
    if runtime:
        new_host["Runtime"] = runtime
    out["HostConfig"] = new_host
    return out


def endpoint_problems(spec: pb.ContainerSpec, networks: dict[str, Network | None],
                      node: str) -> list[str]:
    """Why SPEC's addresses cannot be its addresses here, each in words: NETWORKS are this
    node's networks of the names its endpoints give (None: none of that name). The source's
    word on its network is only compared; what decides is this node's network, and an address
    must be one it gives containers: never its gateway, a reserved address, one outside its
    range (a node's or another host's on the segment), or one a container here already has."""
    out: list[str] = []
    seen: set[str] = set()
    for e in spec.endpoints:
        where = f"network {e.network!r}"
        if e.network not in spec.networks or e.network in seen:
            out.append(f"{where}: an address on a network the container is not on, or a "
                       "second one")
            continue
        seen.add(e.network)
        try:
            address = ipaddress.IPv4Address(e.ipv4)
        except ValueError:
            out.append(f"{where}: {e.ipv4!r} is not an IPv4 address")
            continue
        if e.mac and (not _MAC.match(e.mac) or int(e.mac[:2], 16) & 1 or
                      e.mac == "00:00:00:00:00:00"):
            out.append(f"{where}: {e.mac!r} is not a unicast MAC address")
        net = networks.get(e.network)
        if net is None:
            out.append(f"{where}: {node} has no network of that name; create it as the "
                       f"source's, on the same segment (docker network create -d {e.driver} "
                       f"--subnet {e.subnet} -o parent=<the node's interface> {e.network})")
            continue
        if not net.moves_addresses:
            out.append(f"{where} is a {net.driver} network on {node}: its addresses are "
                       f"{node}'s own, not the source's segment ({e.driver} at the source)")
            continue
        if net.driver != e.driver or e.subnet not in net.subnets:
            out.append(f"{where} is {net.driver} {', '.join(net.subnets) or 'without a subnet'} "
                       f"on {node}, {e.driver} {e.subnet} at the source: not the same segment")
            continue
        if not any(address in ipaddress.ip_network(s, strict=False) for s in net.subnets):
            out.append(f"{where}: {address} is outside its subnet on {node}")
        elif e.ipv4 in net.gateways or e.ipv4 in net.reserved:
            out.append(f"{where}: {address} is the segment's gateway or an address {node}'s "
                       "engine keeps reserved, never a container's")
        elif net.ip_ranges and not any(address in ipaddress.ip_network(r, strict=False)
                                       for r in net.ip_ranges):
            out.append(f"{where}: {address} is outside the range {node} gives containers "
                       f"({', '.join(net.ip_ranges)}): it may be a node's or another host's")
        elif e.ipv4 in net.used:
            out.append(f"{where}: {address} is already used by a container on {node}")
    return out


def port_protocol(container_port: str) -> str:
    """The protocol of an engine port key ("80/tcp", "53/udp"; a bare "80" is TCP)."""
    return (container_port.split("/") + ["tcp"])[1]


def checkpoint_path(path: str, name: str) -> str:
    """A checkpoint file's staging path as the source announced it, if it is one of ours:
    checkpoints/NAME/FILE with a plain file name."""
    prefix = f"checkpoints/{name}/"
    if not path.startswith(prefix) or not _CHECKPOINT_FILE.match(path[len(prefix):]):
        raise Refused(f"checkpoint file {path!r} is not a plain file of checkpoint {name!r}")
    return path
