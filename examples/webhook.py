"""Post every migration event of the inventory's nodes to a webhook, built on migctl's public
Python client only (migctl.client.api): one JSON object per event (NodeEvent, as JSON), POSTed
to URL.

    python examples/webhook.py --url http://ops.example:8080/migctl [--state FILE]

Each node's stream (Events) is followed from the last token this consumer posted, kept in
--state (JSON, default ./webhook-state.json). An event is saved as posted only once the
webhook answered 2xx, so a restart of this consumer, of an agent, or of the webhook, misses
nothing the agents still journal, and an event may be posted twice, never lost (a webhook
that must not see one twice keys it by node and token).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from migctl.client import api

RETRY_S = 2.0  # after the webhook or an agent failed


class Tokens:
    """The last token posted, per node, in a JSON file (written whole, then renamed)."""

    def __init__(self, path: Path) -> None:
        self.path, self.lock = path, threading.Lock()
        self.tokens: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, node: str) -> str:
        with self.lock:
            return self.tokens.get(node, "")

    def put(self, node: str, token: str) -> None:
        with self.lock:
            self.tokens[node] = token
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.tokens))
            tmp.replace(self.path)


def post(url: str, event: dict, timeout: float = 10.0) -> None:
    request = urllib.request.Request(url, data=json.dumps(event).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        if not 200 <= answer.status < 300:
            raise urllib.error.HTTPError(url, answer.status, "not 2xx", answer.headers, None)


def follow(inventory: api.Inventory, node: str, url: str, tokens: Tokens,
           stop: threading.Event) -> None:
    """NODE's events to URL until STOP, reconnecting from the last token posted."""
    while not stop.is_set():
        try:
            with api.AgentClient(inventory.node(node), inventory.tls()) as client:
                for event in client.events(tokens.get(node), follow=True):
                    body = MessageToDict(event, preserving_proto_field_name=True)
                    while not stop.is_set():
                        try:
                            post(url, body)
                            break
                        except (OSError, urllib.error.URLError) as err:
                            print(f"webhook: {err}; again in {RETRY_S:.0f} s", flush=True)
                            stop.wait(RETRY_S)
                    if stop.is_set():
                        return
                    tokens.put(node, event.token)
        except api.MigctlError as err:
            print(f"{node}: {err}; again in {RETRY_S:.0f} s", flush=True)
        stop.wait(RETRY_S)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--inventory", type=Path, default=None)
    p.add_argument("--tls-dir", type=Path, default=None)
    p.add_argument("--state", type=Path, default=Path("webhook-state.json"))
    args = p.parse_args()
    inventory = api.Inventory.load(args.inventory, args.tls_dir)
    tokens, stop = Tokens(args.state), threading.Event()
    threads = [threading.Thread(target=follow, args=(inventory, n, args.url, tokens, stop),
                                daemon=True, name=n) for n in inventory.nodes]
    for t in threads:
        t.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop.set()


if __name__ == "__main__":
    main()
