"""`migctl`: start migrations, look at nodes, run a lab."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from migctl.agent.version import VersionAction
from migctl.client import completion
from migctl.client.api import (
    AgentClient,
    Inventory,
    default_tls_dir,
    each_node,
    locate,
    migrate,
    plan,
    trial,
)
from migctl.common.errors import MigctlError
from migctl.proto import migctl_pb2 as pb

if TYPE_CHECKING:  # rich is imported by a live progress only (~40 ms of start-up)
    from rich.console import Console
    from rich.progress import TaskID


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"


def _phase(p: int) -> str:
    return pb.Phase.Name(p).lower().replace("_", "-")


def _event_text(ev: pb.MigrationEvent) -> str | None:
    """An event as one line for the operator; None for those that print nothing (progress,
    which only a terminal shows, as bars; the report)."""
    kind = ev.WhichOneof("event")
    if kind == "phase_started":
        return f"▶ {_phase(ev.phase_started.phase)}"
    if kind == "phase_done":
        p = ev.phase_done
        extra = (f", delta: {_mb(p.literal_bytes)} literal / {_mb(p.matched_bytes)} matched"
                 if p.literal_bytes or p.matched_bytes else "")
        return f"✓ {_phase(p.phase)} {p.seconds:.2f} s, {_mb(p.bytes)}{extra}"
    if kind == "transfer":
        t = ev.transfer
        item = ", ".join(i[:19] if i.startswith("sha256:") else i for i in t.item.split(", "))
        if t.method == "skipped":
            return f"  {t.kind} {item}: already on the destination"
        why = f" — {t.reason}" if t.reason else ""
        return (f"  {t.kind} {item} from {t.origin}: {_mb(t.bytes)} in {t.seconds:.2f} s "
                f"({t.method}){why}")
    if kind == "log":
        return f"  {ev.log}"
    return None


def render_event(ev: pb.MigrationEvent, out: TextIO | None = None) -> None:
    """An event as a line on OUT (stderr); progress events print nothing."""
    text = _event_text(ev)
    if text is not None:
        print(text, file=out or sys.stderr, flush=True)  # stderr looked up now, not at import


class LiveProgress:
    """On a terminal: a bar for each transfer under way (bytes, rate, time left), above which
    the other events print as `render_event` prints them; the bars of a kind go when its
    transfer report arrives, all of them at the end of a phase."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bars = Progress(TextColumn("  {task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(),
                             console=console or Console(stderr=True), transient=True)
        self.tasks: dict[tuple[str, str], TaskID] = {}

    def __enter__(self) -> LiveProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def __call__(self, ev: pb.MigrationEvent) -> None:
        kind = ev.WhichOneof("event")
        if kind == "progress":
            p = ev.progress
            key = (p.kind, p.item)
            if key not in self.tasks:
                self.tasks[key] = self.bars.add_task(f"{p.kind} {p.item}",
                                                     total=p.bytes_total or None)
            self.bars.update(self.tasks[key], completed=p.bytes_done)
            return
        if kind in ("transfer", "phase_done"):
            for key in [k for k in self.tasks if kind == "phase_done" or k[0] == ev.transfer.kind]:
                self.bars.remove_task(self.tasks.pop(key))
        text = _event_text(ev)
        if text is not None:
            self.bars.console.print(text, highlight=False, markup=False)


def render_report(r: pb.MigrationReport, out=sys.stdout) -> None:
    print(f"{r.container} migrated {r.source_node} -> {r.destination_node}", file=out)
    print(f"new container: {r.new_container_id}", file=out)
    print(f"total {r.total_seconds:.2f} s, downtime {r.downtime_seconds:.2f} s"
          + (f", every memory page {r.pages_seconds:.2f} s after the restore"
             if r.memory_transfer == "post-copy" else ""), file=out)
    print(f"checkpoint {r.checkpoint_method or '-'} on {r.source_node}, memory by "
          f"{r.memory_transfer or '-'}, restore {r.restore_method or '-'} on "
          f"{r.destination_node}, connections {r.connections or '-'}", file=out)
    for p in r.phases:
        print(f"  {_phase(p.phase):<11} {p.seconds:7.2f} s  {_mb(p.bytes):>12}", file=out)
    print(f"by origin ({pb.Mode.Name(r.mode).lower()}):", file=out)
    for o in r.origins:
        print(f"  {o.node:<11} {o.seconds:7.2f} s  {_mb(o.bytes):>12}", file=out)


def report_dict(report: Message) -> dict:
    """A report (or a message holding one) as plain JSON: protobuf's mapping writes int64 as
    strings, byte counts here are numbers."""

    def numbers(obj: object) -> object:
        if isinstance(obj, dict):
            return {k: int(v) if k.endswith("bytes") else numbers(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [numbers(v) for v in obj]
        return obj

    return numbers(_dict(report))


MEMORY_TRANSFER = {"auto": "", "page-server": "page server", "delta": "delta",
                   "post-copy": "post-copy"}


def _has_rich() -> bool:
    """rich comes with the `progress` extra; without it progress is plain lines."""
    import importlib.util

    return importlib.util.find_spec("rich") is not None


def _source(inv: Inventory, args: argparse.Namespace) -> str:
    """--from, or the node that runs the container."""
    if args.source:
        return args.source
    args.source = locate(inv, args.container)
    print(f"{args.container} runs on {args.source}", file=sys.stderr)
    return args.source


def cmd_migrate(args: argparse.Namespace) -> int:
    inv = Inventory.load(args.inventory, args.tls_dir)
    _source(inv, args)
    live = LiveProgress() if not args.quiet and sys.stderr.isatty() and _has_rich() else None
    with live or contextlib.nullcontext():
        report = migrate(inv, args.container, args.source, args.dest,
                         on_event=None if args.quiet else live or render_event,
                         remove_source=args.remove_source, mode=args.mode,
                         allow_privileged=args.allow_privileged,
                         memory_transfer=MEMORY_TRANSFER[args.memory_transfer],
                         connections=args.connections or "")
    if args.json:
        print(json.dumps(report_dict(report)))
    else:
        render_report(report)
    return 0


def cmd_evacuate(args: argparse.Namespace) -> int:
    from migctl.client import fleet

    inv = Inventory.load(args.inventory, args.tls_dir)
    moves = fleet.plan(inv, args.node, args.to or ())
    parallel = args.parallel or fleet.default_parallel(moves)
    if args.dry_run:
        if args.json:
            print(json.dumps([_move_dict(m) for m in moves]))
        else:
            print(f"plan for {args.node} ({parallel} at once):")
            _table(["container", "to", "why"],
                   [[m.container, m.destination or "stays", m.reason] for m in moves])
        return 0 if all(m.destination for m in moves) else 1
    live = EvacuationTable(moves) if not args.json and sys.stderr.isatty() else None
    lines = not args.json and live is None

    def changed(m: fleet.Move) -> None:
        if live is not None:
            live.draw()
        elif lines:
            print(f"{m.container}: {m.state}{' ' + m.phase if m.phase else ''}"
                  f"{' -> ' + m.destination if m.destination else ''}", file=sys.stderr,
                  flush=True)

    if lines:
        for m in moves:
            if m.state == "stays":
                print(f"{m.container}: stays on {args.node}: {m.reason}", file=sys.stderr)
    fleet.run(inv, args.node, moves, parallel, on_change=changed,
              memory_transfer=MEMORY_TRANSFER[args.memory_transfer],
              connections=args.connections or "")
    if live is not None:
        live.draw(final=True)
    if args.json:
        print(json.dumps([_move_dict(m) for m in moves]))
    else:
        _table(["container", "result", "on", "detail"],
               [[m.container, m.state, m.destination if m.moved else args.node,
                 f"downtime {m.report.downtime_seconds:.2f} s, {m.report.total_seconds:.1f} s"
                 if m.moved and m.report is not None else m.reason] for m in moves])
        moved = sum(m.moved for m in moves)
        print(f"{moved} of {len(moves)} moved off {args.node}"
              + ("" if moved == len(moves) else "; the others run there still"))
    return 0 if all(m.moved for m in moves) else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from migctl.client import api

    inv = Inventory.load(args.inventory, args.tls_dir)
    node, reply = api.cancel(inv, args.migration_id)
    said = {"aborted": "aborted: nothing stays at the destination, the source's container "
                       "never stopped",
            "rolling back": "rolling back: the source resumes its container"}
    print(f"migration {args.migration_id} at {node} ({reply.state}): "
          f"{said.get(reply.outcome, reply.outcome)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from migctl.client import api

    inv = Inventory.load(args.inventory, args.tls_dir)
    known = api.ends(inv, args.migration_id)
    if args.json:
        print(json.dumps({node: report_dict(e) for node, e in known.items()}))
        return 0
    for node, e in known.items():
        when = time.strftime("%H:%M:%S", time.localtime(e.updated))
        print(f"{node:<8} {e.role:<12} {e.container:<20} {e.state:<18} {when}"
              + (f"  {e.error}" if e.error else ""))
        if e.role == "destination" and e.report.downtime_seconds:
            print(f"{'':<8} downtime {e.report.downtime_seconds:.2f} s, total "
                  f"{e.report.total_seconds:.1f} s")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Every node's migrations under way, and those that ended in the last minute."""
    from migctl.client.fleet import ENDED

    inv = Inventory.load(args.inventory, args.tls_dir)
    drawn = 0
    while True:
        found, errors = each_node(inv, lambda c: c.history(50))
        now = time.time()
        rows = sorted(([e.migration_id, node, e.role, e.container, e.peer, e.state,
                        f"{now - e.updated:.0f} s ago"]
                       for node, entries in found.items() for e in entries
                       if e.state not in ENDED or now - e.updated < 60),
                      key=lambda r: (r[0], r[2]))
        lines = [f"{time.strftime('%H:%M:%S')}  {len(rows)} entries"
                 + (f"; no answer from {', '.join(e.node for e in errors)}" if errors else "")]
        buffer = io.StringIO()
        _table(["migration", "node", "role", "container", "peer", "state", "updated"], rows,
               out=buffer)
        lines += buffer.getvalue().splitlines()
        if drawn and sys.stdout.isatty():
            sys.stdout.write(f"\x1b[{drawn}F\x1b[J")
        print("\n".join(lines), flush=True)
        drawn = len(lines)
        if args.once:
            return _unanswered(errors)
        time.sleep(args.interval)


def _move_dict(m: object) -> dict:
    from migctl.client import fleet

    assert isinstance(m, fleet.Move)
    return {"container": m.container, "destination": m.destination, "state": m.state,
            "reason": m.reason, "plan_seconds": m.seconds, "plan_bytes": m.bytes,
            "report": report_dict(m.report) if m.report is not None else None}


class EvacuationTable:
    """The moves as a table redrawn in place on a terminal (stderr)."""

    def __init__(self, moves: list) -> None:
        self.moves, self.drawn = moves, 0
        self.lock = threading.Lock()

    def draw(self, final: bool = False) -> None:
        with self.lock:
            out = sys.stderr
            if self.drawn:
                out.write(f"\x1b[{self.drawn}F\x1b[J")
            for m in self.moves:
                where = f" -> {m.destination}" if m.destination else ""
                out.write(f"{m.container:<24} {m.state:<8} {m.phase:<11}{where}\n")
            self.drawn = 0 if final else len(self.moves)
            out.flush()


def cmd_nodes(args: argparse.Namespace) -> int:
    inv = Inventory.load(args.inventory, args.tls_dir)
    tls = inv.tls()
    for node in inv.nodes.values():
        try:
            with AgentClient(node, tls, timeout=3) as c:
                info = c.info()
            state = (f"up, migctl {info.version or '-'} (protocol {info.protocol_version}), "
                     f"engine {info.engine_version}, CRIU {info.criu_version or '-'}, "
                     f"{info.checkpoint_method or 'engine'} checkpoints, connections "
                     + (f"closed ({info.no_kept_connections})" if info.no_kept_connections
                        else "kept"))
        except MigctlError as err:
            if not err.node:  # not the agent's answer: this machine's own trouble
                raise
            state = f"DOWN: {err.message}"
        print(f"{node.name:<8} {node.address:<22} {state}")
    return 0


def _table(headers: list[str], rows: list[list[str]], out: TextIO | None = None) -> None:
    """Columns as wide as their widest cell; the last one runs on."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    for row in [headers, *rows]:
        print("  ".join([c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]),
              file=out or sys.stdout)


def _dict(message: object) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True,  # type: ignore[arg-type]
                         always_print_fields_with_no_presence=True)


def _unanswered(errors: list[MigctlError]) -> int:
    """Each node that did not answer, on stderr: 1 if any, for the exit status."""
    for err in errors:
        print(f"migctl: error: {err}", file=sys.stderr)
    return 1 if errors else 0


def cmd_ps(args: argparse.Namespace) -> int:
    inv = Inventory.load(args.inventory, args.tls_dir)
    found, errors = each_node(inv, AgentClient.containers, args.node)
    listed = [(node, c) for node, containers in found.items() for c in containers]
    if args.json:
        print(json.dumps([{"node": node, **_dict(c), "movable": not c.unsupported}
                          for node, c in listed]))
    else:
        _table(["NODE", "CONTAINER", "IMAGE", "STATE", "VOLUMES", "MOVABLE"],
               [[node, c.name, c.image, c.state, ",".join(c.volumes) or "-",
                 "no: " + "; ".join(c.unsupported) if c.unsupported else "yes"]
                for node, c in listed])
    return _unanswered(errors)


def render_plan(r: pb.PlanReply, container: str, source: str, dest: str,
                out: TextIO | None = None) -> None:
    out = out or sys.stdout
    print(f"plan: {container} {source} -> {dest} over a {r.link}", file=out)
    _table(["KIND", "ITEM", "FROM", "BYTES", "TIME", "WHY"],
           [[i.kind, i.item[:19] if i.item.startswith("sha256:") else i.item, i.origin,
             _mb(i.bytes), f"{i.seconds:.2f} s", i.reason or "-"] for i in r.items], out)
    print(f"total {_mb(r.bytes)}, about {r.seconds:.2f} s of transfers before the freeze "
          "(the downtime depends on what changes meanwhile)", file=out)
    for problem in r.problems:
        print(f"would be refused: {problem}", file=out)


def cmd_plan(args: argparse.Namespace) -> int:
    inv = Inventory.load(args.inventory, args.tls_dir)
    source = _source(inv, args)
    reply = plan(inv, args.container, source, args.dest)
    asked = trial(inv, args.container, source) if args.check else None
    if asked is not None and asked.problem:
        reply.problems.append(f"CRIU cannot dump it now at {source}: {asked.problem}")
    if args.json:
        out = report_dict(reply)
        if asked is not None:
            out["trial"] = report_dict(asked)
        print(json.dumps(out))
    else:
        render_plan(reply, args.container, source, args.dest)
        if asked is not None and not asked.problem:
            print(f"CRIU dumped it at {source} in {asked.seconds:.2f} s (the container paused "
                  "that long; the dump was thrown away)")
    return 0


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to 1000")
    return int(text)


def cmd_history(args: argparse.Namespace) -> int:
    inv = Inventory.load(args.inventory, args.tls_dir)
    found, errors = each_node(inv, lambda c: c.history(args.limit), args.node)
    entries = sorted(((node, e) for node, listed in found.items() for e in listed),
                     key=lambda ne: -ne[1].updated)[:args.limit]
    if args.json:
        print(json.dumps([{"node": node, **report_dict(e)} for node, e in entries]))
    else:
        _table(["TIME", "NODE", "ROLE", "CONTAINER", "PEER", "STATE", "DOWNTIME", "ERROR"],
               [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.updated)), node, e.role,
                 e.container, e.peer, e.state,
                 f"{e.report.downtime_seconds:.2f} s" if e.report.downtime_seconds else "-",
                 e.error or "-"] for node, e in entries])
    return _unanswered(errors)


def _certs_dir(args: argparse.Namespace) -> Path:
    """A `certs` command's folder: --dir, else --tls-dir, else the configured one."""
    return args.dir or args.tls_dir or default_tls_dir()


def _dir_flag(parser: argparse.ArgumentParser) -> None:
    """The certificates' folder of a `certs` command (default: as for init)."""
    parser.add_argument("--dir", type=Path, default=None
                        ).complete = completion.DIRECTORY  # type: ignore[attr-defined]


def cmd_certs_init(args: argparse.Namespace) -> int:
    from migctl.agent import certs

    directory = _certs_dir(args)
    try:
        certs.init(directory, args.nodes, args.client or ["client"], days=args.days)
    except MigctlError as err:
        raise MigctlError(str(err)) from None
    print(f"certificates in {directory}: ca.crt, " +
          ", ".join(f"{n}.crt" for n in [*args.nodes, *(args.client or ["client"])]) +
          f"; give each agent only its own folder {directory}/nodes/NODE as --tls-dir; "
          f"the CA key is in {directory}/private and no agent needs it")
    return 0


def cmd_certs_request(args: argparse.Namespace) -> int:
    from migctl.agent import certs

    directory = _certs_dir(args)
    try:
        csr = certs.request(directory, args.node)
    except MigctlError as err:
        raise MigctlError(str(err)) from None
    print(f"{args.node}'s key is in {directory}/{args.node}.key (it stays on this node); send "
          f"the request {csr} to the operator, who runs `migctl certs sign {csr.name}`, and "
          f"put the {args.node}.crt and ca.crt it returns in {directory}")
    return 0


def cmd_certs_token(args: argparse.Namespace) -> int:
    from migctl.agent import join

    directory = _certs_dir(args)
    print(join.mint(directory, args.node, args.server, ttl=args.ttl))
    return 0


def cmd_certs_serve(args: argparse.Namespace) -> int:
    from migctl.agent import join

    directory = _certs_dir(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(f"join service on {args.listen} for the CA in {directory} (Ctrl-C stops it)",
          flush=True)
    try:
        join.serve(args.listen, directory, args.days)
    except KeyboardInterrupt:
        pass
    except OSError as err:
        raise MigctlError(f"cannot serve joins on {args.listen}: {err}") from None
    return 0


def cmd_certs_join(args: argparse.Namespace) -> int:
    from migctl.agent import join

    directory = _certs_dir(args)
    token = args.token if args.token != "-" else sys.stdin.readline()
    crt = join.join(token, directory)
    print(f"joined: {crt} and {directory}/ca.crt (the key stayed in {directory})")
    return 0


def cmd_certs_sign(args: argparse.Namespace) -> int:
    from migctl.agent import certs

    directory = _certs_dir(args)
    try:
        node, pem = certs.sign(directory, args.request.read_bytes(), days=args.days)
        out = args.out or args.request.parent
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{node}.crt").write_bytes(pem)
        (out / "ca.crt").write_bytes((directory / "ca.crt").read_bytes())
    except OSError as err:
        raise MigctlError(f"cannot sign {args.request}: {err}") from None
    except MigctlError as err:
        raise MigctlError(f"{args.request}: {err}") from None
    print(f"signed: {out / (node + '.crt')} (node {node}, {args.days} days) and {out / 'ca.crt'}"
          f"; send both to {node} (no key travels)")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion.script(build_parser(), args.shell))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="migctl", description="Live migration of stateful "
                                "containers between nodes (CRIU + gRPC + delta transfer).")
    p.add_argument("--version", action=VersionAction)
    p.add_argument("--inventory", type=Path, default=None,
                   help="node inventory (default: $MIGCTL_INVENTORY, else the config file's "
                        "inventory, else $MIGCTL_HOME/inventory.json)"
                   ).complete = completion.FILE  # type: ignore[attr-defined]
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="the operator's ca.crt, client.crt and client.key (default: the "
                        "inventory's tls_dir, else $MIGCTL_TLS_DIR, else the config file's "
                        "tls_dir, else $MIGCTL_HOME/tls)"
                   ).complete = completion.DIRECTORY  # type: ignore[attr-defined]
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="move a running container to another node")
    m.add_argument("--from", dest="source", metavar="NODE",
                   help="the node that runs it (default: the one node that does)")
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
    m.add_argument("--connections", choices=["keep", "close"], default=None,
                   help="the container's established TCP connections: keep (its address moves "
                        "with it, on a macvlan or ipvlan network; what prevents it is refused "
                        "before anything moves) or close (clients reconnect); default: keep "
                        "for a container whose address moves, close for one on a bridge")
    m.add_argument("--memory-transfer", choices=list(MEMORY_TRANSFER), default="auto",
                   help="how the final checkpoint's memory pages travel: page-server (straight "
                        "from CRIU, for fast links; needs the direct checkpoint path at the "
                        "source and CRIU at the destination), delta (dumped at the source, only "
                        "what changed since pre-copy, for slow links), auto: chosen from the "
                        "measured link (default), or post-copy: the container starts at the "
                        "destination at once and faults its memory in from the source. RISK: "
                        "until its last page has arrived (the report's 'pages'), its memory is "
                        "on both nodes, and losing the source or the link loses what it did "
                        "at the destination (it goes on at the source from the freeze) or, "
                        "with the source gone, the container; never chosen by auto")
    m.add_argument("container")
    m.set_defaults(func=cmd_migrate)

    e = sub.add_parser("evacuate", help="move every container that can move off NODE (the "
                       "others stay, each with its reason); exit 0 only if all moved")
    e.add_argument("node", metavar="NODE")
    e.add_argument("--to", nargs="+", metavar="NODE", default=None,
                   help="only these destinations (default: every other node)")
    e.add_argument("--parallel", type=int, default=0, metavar="N",
                   help="migrations at once (default: one per destination the plan uses; "
                        "docs/benchmarks.md says why)")
    e.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    e.add_argument("--json", action="store_true", help="the moves as one JSON list")
    e.add_argument("--memory-transfer", choices=list(MEMORY_TRANSFER), default="auto",
                   help="as for migrate")
    e.add_argument("--connections", choices=["keep", "close"], default=None,
                   help="as for migrate")
    e.set_defaults(func=cmd_evacuate)

    st = sub.add_parser("status", help="one migration, as its source and destination journal it")
    st.add_argument("migration_id", metavar="ID")
    st.add_argument("--json", action="store_true", help="each end's entry, by node")
    st.set_defaults(func=cmd_status)
    w = sub.add_parser("watch", help="the migrations under way on every node, redrawn")
    w.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    w.add_argument("--once", action="store_true", help="draw once and exit")
    w.set_defaults(func=cmd_watch)
    cn = sub.add_parser("cancel", help="cancel a migration: aborted before its freeze, rolled "
                        "back after it, refused once the source committed")
    cn.add_argument("migration_id", metavar="ID")
    cn.set_defaults(func=cmd_cancel)

    n = sub.add_parser("nodes", help="list the inventory's nodes and whether their agents answer")
    n.set_defaults(func=cmd_nodes)

    ps = sub.add_parser("ps", help="list the containers of the inventory's nodes, and whether "
                        "each can be migrated (and why not)")
    ps.add_argument("--node", metavar="NODE", help="only this node")
    ps.add_argument("--json", action="store_true", help="one JSON list, one object a container")
    ps.set_defaults(func=cmd_ps)

    pl = sub.add_parser("plan", help="a dry run of a migration: what would move, from where, "
                        "how many bytes and about how long over the measured link")
    pl.add_argument("--from", dest="source", metavar="NODE",
                    help="the node that runs it (default: the one node that does)")
    pl.add_argument("--to", dest="dest", required=True, metavar="NODE")
    pl.add_argument("--json", action="store_true", help="the plan as one JSON object")
    pl.add_argument("--check", action="store_true",
                    help="also ask CRIU at the source: a checkpoint left running and thrown "
                         "away (the container pauses for the dump)")
    pl.add_argument("container")
    pl.set_defaults(func=cmd_plan)

    h = sub.add_parser("history", help="past migrations of the inventory's nodes, newest first, "
                       "from their journals (as destination with the report)")
    h.add_argument("--node", metavar="NODE", help="only this node")
    h.add_argument("--limit", type=_limit, default=20, metavar="N",
                   help="the newest N (default 20, at most 1000)")
    h.add_argument("--json", action="store_true",
                   help="one JSON list, one object a journal entry, with its report")
    h.set_defaults(func=cmd_history)

    c = sub.add_parser("certs", help="certificates for mutual TLS between agents and clients")
    csub = c.add_subparsers(dest="certs_command", required=True)
    ci = csub.add_parser("init", help="a CA (kept if present) and a certificate per node and "
                         "client, in DIR (default: --tls-dir, else $MIGCTL_TLS_DIR, else the "
                         "config file's tls_dir, else $MIGCTL_HOME/tls)")
    _dir_flag(ci)
    ci.add_argument("--client", action="append", default=None, metavar="NAME",
                    help="client certificate names (default: client)")
    ci.add_argument("--days", type=int, default=825,
                    help="how long the certificates made now are valid (default 825; the CA "
                         "at least 10 years); an agent serves a renewed one after SIGHUP")
    ci.add_argument("nodes", nargs="*", metavar="NODE")
    ci.set_defaults(func=cmd_certs_init)
    cr = csub.add_parser("request", help="on a new node: its key (kept here) and a request "
                         "NODE.csr for the operator to sign, in DIR (default as for init)")
    _dir_flag(cr)
    cr.add_argument("node", metavar="NODE")
    cr.set_defaults(func=cmd_certs_request)
    cs = csub.add_parser("sign", help="at the operator's CA (DIR, default as for init): a node "
                         "certificate for a request; writes NODE.crt and ca.crt beside it")
    _dir_flag(cs)
    cs.add_argument("--days", type=int, default=825, help="validity (default 825)")
    cs.add_argument("--out", type=Path, default=None, help="where to write (default: the "
                    "request's folder)")
    cs.add_argument("request", type=Path, metavar="NODE.csr")
    cs.set_defaults(func=cmd_certs_sign)
    ct = csub.add_parser("token", help="at the operator's CA (DIR, default as for init): a "
                         "one-time token for NODE to get its certificate from `certs serve`")
    _dir_flag(ct)
    ct.add_argument("--server", required=True, metavar="HOST:PORT",
                    help="where the node reaches `migctl certs serve`")
    ct.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS",
                    help="how long the token may be used (default 3600)")
    ct.add_argument("node", metavar="NODE")
    ct.set_defaults(func=cmd_certs_token)
    cv = csub.add_parser("serve", help="at the operator's CA (DIR): sign the requests of nodes "
                         "that hold a token, until interrupted")
    _dir_flag(cv)
    cv.add_argument("--listen", default="0.0.0.0:50050", metavar="HOST:PORT")
    cv.add_argument("--days", type=int, default=825, help="validity (default 825)")
    cv.set_defaults(func=cmd_certs_serve)
    cj = csub.add_parser("join", help="on a new node: its key (kept here) and its certificate "
                         "from the operator's join service, with a token; in DIR (default as "
                         "for init)")
    _dir_flag(cj)
    cj.add_argument("token", metavar="TOKEN", help="the token (- reads it from stdin, which "
                    "keeps it out of the process list)")
    cj.set_defaults(func=cmd_certs_join)

    # the lab's and the evaluation's commands are theirs (migctl.lab), registered where it is
    # installed (a node's image built without lab/ has neither)
    try:
        from migctl.lab import nodes as lab
        from migctl.lab.evaluation import cli as bench
    except ImportError:
        pass
    else:
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
    except MigctlError as err:
        print(f"migctl: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("migctl: interrupted (a migration already started goes on in the destination "
              "agent)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
