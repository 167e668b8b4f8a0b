"""A real agent with fault-test hooks, injected by the tests as code: production never reads
them. Run as `python -m tests.agent_hooks [--test-pause STATE=SECONDS]
[--test-slow-serve SECONDS] [--test-die-serving N] [--test-no-hold] <migagent arguments>`
(client.lab
`restart_agent(module=...)`).

--test-pause: the destination pauses right after journalling STATE (and says so in its
events), so that a test can inject a fault at that point. --test-slow-serve: every chunk of
a held item (cooperative fetches from this node) is delayed, to look like a slow neighbour.
--test-die-serving: the agent kills itself (SIGKILL) once it has served N chunks of one held
item: a neighbour dying mid-fetch, whatever the link's speed.
--test-no-hold: the destination takes no hold on the frozen source, so that the source's lease
is what brings it back.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from migctl.agent import server
from migctl.agent.migration.flow import Migration
from migctl.agent.service import AgentService


def main() -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--test-pause", default="", metavar="STATE=SECONDS")
    p.add_argument("--test-slow-serve", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--test-die-serving", type=int, default=0, metavar="N")
    p.add_argument("--test-no-hold", action="store_true")
    hooks, rest = p.parse_known_args()
    if hooks.test_no_hold:  # a destination that never holds: only the lease protects
        Migration.take_hold = lambda self: None  # type: ignore[method-assign]
    if hooks.test_pause:
        state, _, seconds = hooks.test_pause.partition("=")
        step = Migration.step

        def paused(self: Migration, to: str, **data: Any) -> None:
            step(self, to, **data)
            if to == state:
                self.report.log(f"paused before {state} (test hook)")
                time.sleep(float(seconds))

        Migration.step = paused  # type: ignore[method-assign]
    if hooks.test_slow_serve:
        serve = AgentService.serve_held

        def slow(self: AgentService, path: Path) -> Iterator[bytes]:
            for data in serve(self, path):
                time.sleep(hooks.test_slow_serve)
                yield data

        AgentService.serve_held = slow  # type: ignore[method-assign]
    if hooks.test_die_serving:
        held = AgentService.serve_held

        def dying(self: AgentService, path: Path) -> Iterator[bytes]:
            for i, data in enumerate(held(self, path), start=1):
                if i > hooks.test_die_serving:
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-item, as a crash would
                yield data

        AgentService.serve_held = dying  # type: ignore[method-assign]
    server.main(rest)


if __name__ == "__main__":
    sys.exit(main())
