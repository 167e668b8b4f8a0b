"""`migctl`: start migrations, look at nodes, run a lab."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import shtab
from google.protobuf.json_format import MessageToDict

from agent.errors import MigctlError
from client.api import (
    AgentClient,
    AgentError,
    ClientError,
    Inventory,
    default_tls_dir,
    migrate,
)
from proto import migctl_pb2 as pb


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"


def _phase(p: int) -> str:
    return pb.Phase.Name(p).lower().replace("_", "-")


def render_event(ev: pb.MigrationEvent, out: TextIO | None = None) -> None:
    out = out or sys.stderr  # looked up now: whoever replaced sys.stderr since import
    kind = ev.WhichOneof("event")
    if kind == "phase_started":
        print(f"▶ {_phase(ev.phase_started.phase)}", file=out, flush=True)
    elif kind == "phase_done":
        p = ev.phase_done
        extra = (f", delta: {_mb(p.literal_bytes)} literal / {_mb(p.matched_bytes)} matched"
                 if p.literal_bytes or p.matched_bytes else "")
        print(f"✓ {_phase(p.phase)} {p.seconds:.2f} s, {_mb(p.bytes)}{extra}", file=out,
              flush=True)
    elif kind == "transfer":
        t = ev.transfer
        item = ", ".join(i[:19] if i.startswith("sha256:") else i for i in t.item.split(", "))
        if t.method == "skipped":
            print(f"  {t.kind} {item}: already on the destination", file=out, flush=True)
        else:
            why = f" — {t.reason}" if t.reason else ""
            print(f"  {t.kind} {item} from {t.origin}: {_mb(t.bytes)} in {t.seconds:.2f} s "
                  f"({t.method}){why}", file=out, flush=True)
    elif kind == "log":
        print(f"  {ev.log}", file=out, flush=True)


def render_report(r: pb.MigrationReport, out=sys.stdout) -> None:
    print(f"{r.container} migrated {r.source_node} -> {r.destination_node}", file=out)
    print(f"new container: {r.new_container_id}", file=out)
    print(f"total {r.total_seconds:.2f} s, downtime {r.downtime_seconds:.2f} s", file=out)
    print(f"checkpoint {r.checkpoint_method or '-'} on {r.source_node}, restore "
          f"{r.restore_method or '-'} on {r.destination_node}", file=out)
    for p in r.phases:
        print(f"  {_phase(p.phase):<11} {p.seconds:7.2f} s  {_mb(p.bytes):>12}", file=out)
    print(f"by origin ({pb.Mode.Name(r.mode).lower()}):", file=out)
    for o in r.origins:
        print(f"  {o.node:<11} {o.seconds:7.2f} s  {_mb(o.bytes):>12}", file=out)


def report_dict(report: pb.MigrationReport) -> dict:
    """The report as plain JSON: protobuf's mapping writes int64 as strings, byte counts here
    are numbers."""

    def numbers(obj: object) -> object:
        if isinstance(obj, dict):
            return {k: int(v) if k.endswith("bytes") else numbers(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [numbers(v) for v in obj]
        return obj

    return numbers(MessageToDict(report, preserving_proto_field_name=True,  # type: ignore
                                 always_print_fields_with_no_presence=True))


def cmd_migrate(args: argparse.Namespace) -> int:
    inv = Inventory.load(args.inventory, args.tls_dir)
    report = migrate(inv, args.container, args.source, args.dest,
                     on_event=None if args.quiet else render_event,
                     remove_source=args.remove_source, mode=args.mode,
                     allow_privileged=args.allow_privileged)
    if args.json:
        print(json.dumps(report_dict(report)))
    else:
        render_report(report)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    inv = Inventory.load(args.inventory, args.tls_dir)
    tls = inv.tls()
    for node in inv.nodes.values():
        try:
            with AgentClient(node, tls, timeout=3) as c:
                info = c.info()
            state = (f"up, engine {info.engine_version}, CRIU {info.criu_version or '-'}, "
                     f"{info.checkpoint_method or 'engine'} checkpoints")
        except AgentError as err:
            state = f"DOWN: {err.message}"
        print(f"{node.name:<8} {node.address:<22} {state}")
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from agent import certs

    directory = args.dir or args.tls_dir or default_tls_dir()
    try:
        certs.init(directory, args.nodes, args.client or ["client"])
    except MigctlError as err:
        raise ClientError(str(err)) from None
    print(f"certificates in {directory}: ca.crt, " +
          ", ".join(f"{n}.crt" for n in [*args.nodes, *(args.client or ["client"])]) +
          f"; give each agent only its own folder {directory}/nodes/NODE as --tls-dir; "
          f"the CA key is in {directory}/private and no agent needs it")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="migctl", description="Live migration of stateful "
                                "containers between nodes (CRIU + gRPC + delta transfer).")
    p.add_argument("--inventory", type=Path, default=None,
                   help="node inventory (default: $MIGCTL_INVENTORY, else the config file's "
                        "inventory, else $MIGCTL_HOME/inventory.json)"
                   ).complete = shtab.FILE  # type: ignore[attr-defined]
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="the operator's ca.crt, client.crt and client.key (default: the "
                        "inventory's tls_dir, else $MIGCTL_TLS_DIR, else the config file's "
                        "tls_dir, else $MIGCTL_HOME/tls)"
                   ).complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="move a running container to another node")
    m.add_argument("--from", dest="source", required=True, metavar="NODE")
    m.add_argument("--to", dest="dest", required=True, metavar="NODE")
    m.add_argument("--remove-source", action="store_true",
                   help="remove the stopped source container after success")
    m.add_argument("--json", action="store_true", help="print the report as one JSON object")
    m.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    m.add_argument("--mode", choices=["cooperative", "traditional"], default="cooperative",
                   help="cooperative: pieces may come from neighbours that hold them "
                        "(default); traditional: everything from the source")
    m.add_argument("--allow-privileged", action="store_true",
                   help="let the destination recreate a container with privileged mode, added "
                        "capabilities or security options (they give it power over the node); "
                        "refused without this")
    m.add_argument("container")
    m.set_defaults(func=cmd_migrate)

    n = sub.add_parser("nodes", help="list the inventory's nodes and whether their agents answer")
    n.set_defaults(func=cmd_nodes)

    c = sub.add_parser("certs", help="certificates for mutual TLS between agents and clients")
    csub = c.add_subparsers(dest="certs_command", required=True)
    ci = csub.add_parser("init", help="a CA (kept if present) and a certificate per node and "
                         "client, in DIR (default: --tls-dir, else $MIGCTL_TLS_DIR, else the "
                         "config file's tls_dir, else $MIGCTL_HOME/tls)")
    ci.add_argument("--dir", type=Path, default=None
                    ).complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    ci.add_argument("--client", action="append", default=None, metavar="NAME",
                    help="client certificate names (default: client)")
    ci.add_argument("nodes", nargs="+", metavar="NODE")
    ci.set_defaults(func=cmd_certs_init)

    from client import lab
    from client.evaluation import cli as bench

    lab.add_parser(sub)
    bench.add_parser(sub)

    k = sub.add_parser("completion", help="print a shell completion script, e.g. "
                       "`migctl completion bash > /etc/bash_completion.d/migctl`, or "
                       "`source <(migctl completion zsh)`")
    k.add_argument("shell", choices=["bash", "zsh"])
    k.set_defaults(func=cmd_completion)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except ClientError as err:
        print(f"migctl: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("migctl: interrupted (a migration already started goes on in the destination "
              "agent)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
