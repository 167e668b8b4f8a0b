"""Services people run move whole, with every acknowledged write, or are refused up front with
the reason (the service issue). Each has a real client outside the container that records
every acknowledged write, retries at whichever node answers, and checks at the end: none lost,
none twice, and its longest gap between two acknowledgements.

Built from Debian's packages (no registry is reachable). Services that switch to their own
user (Postgres, nginx's workers, memcached, mosquitto) cannot be dumped on machines whose root
lacks CAP_SYS_RESOURCE; tests/test_dumpable.py shows that refusal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pymysql
import pytest

from client.workloads import MARIADB, MARIADB_IMAGE, ensure_mariadb_image, remove_everywhere
from tests.conftest import CACHE, DELTA, LabHandle, migrate_json

PORT = 13306
WRITE_EVERY = 0.01


class Writer(threading.Thread):
    """INSERTs of 1, 2, 3... into seq, autocommitted; a number counts as acknowledged when
    its INSERT returned. After an error it reconnects to whichever host answers and sends the
    same number again: a duplicate key then means the first one was committed."""

    def __init__(self, hosts: list[str]) -> None:
        super().__init__(daemon=True)
        self.hosts = hosts
        self.acked: list[int] = []
        self.longest = 0.0
        self.errors = 0
        self.stop = threading.Event()

    def connect(self):  # noqa: ANN201 - pymysql's connection
        while not self.stop.is_set():
            for host in self.hosts:
                try:
                    return pymysql.connect(host=host, port=PORT, user="root", database="m",
                                           autocommit=True, connect_timeout=2,
                                           read_timeout=5, write_timeout=5)
                except pymysql.MySQLError:
                    continue
            time.sleep(0.05)
        return None

    def run(self) -> None:
        conn, n, last = self.connect(), 1, time.monotonic()
        while not self.stop.is_set() and conn is not None:
            try:
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO seq (n) VALUES (%s)", (n,))
            except pymysql.err.IntegrityError:
                pass  # committed before the connection broke: acknowledged now
            except pymysql.MySQLError:
                self.errors += 1
                conn = self.connect()
                continue
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now
            self.acked.append(n)
            n += 1
            time.sleep(WRITE_EVERY)


def wait_for_mariadb(host: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = pymysql.connect(host=host, port=PORT, user="root", connect_timeout=1)
            with conn.cursor() as cur:
                cur.execute("CREATE DATABASE IF NOT EXISTS m")
                cur.execute("CREATE TABLE IF NOT EXISTS m.seq (n BIGINT PRIMARY KEY) "
                            "ENGINE=InnoDB")
            conn.close()
            return
        except pymysql.MySQLError as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"MariaDB did not answer on {host}:{PORT}: {err}") from err
            time.sleep(0.5)


@pytest.fixture
def mariadb(lab: LabHandle) -> Iterator[list[str]]:
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["mariadb"], ["mariadb-data"])
    for node in ("nodeA", "nodeB"):  # the same image at both ends: no layer to move
        ensure_mariadb_image(lab.docker[node], CACHE)
    a.containers.run(MARIADB_IMAGE, ["sh", "-c", MARIADB], name="mariadb", detach=True,
                     volumes={"mariadb-data": {"bind": "/var/lib/mysql", "mode": "rw"}},
                     ports={"3306/tcp": PORT})
    hosts = [lab.address(n).split(":")[0] for n in ("nodeA", "nodeB")]
    wait_for_mariadb(hosts[0])
    yield hosts
    remove_everywhere(lab.docker, ["mariadb"], ["mariadb-data"])


def test_mariadb_with_innodb_moves_with_every_acknowledged_write(
        lab: LabHandle, mariadb: list[str]) -> None:
    writer = Writer(mariadb)
    writer.start()
    time.sleep(3)
    before = len(writer.acked)
    assert before > 20, "the writer did not write"
    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", "mariadb")
    time.sleep(3)
    writer.stop.set()
    writer.join(timeout=30)
    assert len(writer.acked) > before + 20, "no writes were acknowledged at the destination"
    conn = pymysql.connect(host=mariadb[1], port=PORT, user="root", database="m")
    with conn.cursor() as cur:
        cur.execute("SELECT n FROM seq ORDER BY n")
        stored = [row[0] for row in cur.fetchall()]
    conn.close()
    lost = sorted(set(writer.acked) - set(stored))
    print(f"\n[services] mariadb: {len(writer.acked)} writes acknowledged, {len(lost)} lost, "
          f"downtime {report['downtime_seconds']:.2f} s, client's longest gap "
          f"{writer.longest:.2f} s, {writer.errors} errors retried")
    assert lost == [], f"acknowledged writes lost: {lost[:10]}"
    assert len(stored) == len(set(stored))
    assert stored == list(range(1, len(stored) + 1)), "a write is missing or out of order"
    assert lab.docker["nodeA"].containers.get("mariadb").status == "exited"
    assert lab.docker["nodeB"].containers.get("mariadb").status == "running"
