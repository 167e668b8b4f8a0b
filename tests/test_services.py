"""Services people run move whole, with every acknowledged write, or are refused up front with
the reason (the service issue). Each has a real client outside the container that records
every acknowledged write, retries at whichever node answers, and checks at the end: none lost,
none twice, and its longest gap between two acknowledgements.

Built from Debian's packages (no registry is reachable). Postgres runs as its own user, as
it must: where root lacks CAP_SYS_RESOURCE (these machines) CRIU cannot dump it, and the
pre-flight refuses it with the reason before anything moves. memcached, nginx (its workers
too) and mosquitto run as root here for the same reason.
"""

from __future__ import annotations

import http.client
import io
import socket
import tarfile
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pymysql
import pytest

from migctl.agent.runtime import dumpable
from migctl.lab.workloads import (
    MARIADB,
    MARIADB_IMAGE,
    MEMCACHED,
    MOSQUITTO,
    NGINX,
    POSTGRES,
    SERVICES_IMAGE,
    SQLITE_APP,
    ensure_mariadb_image,
    ensure_services_image,
    remove_everywhere,
)
from tests.conftest import CACHE, DELTA, LabHandle, migctl, migrate_json

PORT = 13306
MEMCACHED_PORT = 11211
WRITE_EVERY = 0.01


class Acked(threading.Thread):
    """Writes 1, 2, 3... one every WRITE_EVERY s; a number counts as acknowledged when the
    service answered it. After an error it reconnects to whichever host answers and sends the
    same number again (each service's write must be idempotent, or say it was done)."""

    def __init__(self, hosts: list[str]) -> None:
        super().__init__(daemon=True)
        self.hosts = hosts
        self.acked: list[int] = []
        self.longest = 0.0
        self.errors = 0
        self.stop = threading.Event()

    def open(self, host: str):  # noqa: ANN201 - the service's connection
        raise NotImplementedError

    def write(self, conn, n: int) -> None:  # noqa: ANN001
        """Raises OSError (or the service's error) when N may not have been written."""
        raise NotImplementedError

    def connect(self):  # noqa: ANN201
        while not self.stop.is_set():
            for host in self.hosts:
                try:
                    return self.open(host)
                except (OSError, pymysql.MySQLError):
                    continue
            time.sleep(0.05)
        return None

    def run(self) -> None:
        conn, n, last = self.connect(), 1, time.monotonic()
        while not self.stop.is_set() and conn is not None:
            try:
                self.write(conn, n)
            except (OSError, pymysql.MySQLError):
                self.errors += 1
                conn = self.connect()
                continue
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now
            self.acked.append(n)
            n += 1
            time.sleep(WRITE_EVERY)


class Writer(Acked):
    """INSERTs into MariaDB's seq, autocommitted: a duplicate key after a retry means the
    first one was committed."""

    def open(self, host: str):  # noqa: ANN201
        return pymysql.connect(host=host, port=PORT, user="root", database="m",
                               autocommit=True, connect_timeout=2, read_timeout=5,
                               write_timeout=5)

    def write(self, conn, n: int) -> None:  # noqa: ANN001
        try:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO seq (n) VALUES (%s)", (n,))
        except pymysql.err.IntegrityError:
            pass  # committed before the connection broke: acknowledged now


class Memcached(Acked):
    """`set kN` of N's bytes (memcached's text protocol); STORED acknowledges it."""

    def open(self, host: str) -> socket.socket:
        return socket.create_connection((host, MEMCACHED_PORT), timeout=2)

    def write(self, conn: socket.socket, n: int) -> None:
        value = str(n).encode()
        conn.sendall(b"set k%d 0 0 %d\r\n%s\r\n" % (n, len(value), value))
        if _until(conn, b"\r\n") != b"STORED\r\n":
            raise OSError(f"memcached did not store k{n}")


def _until(conn: socket.socket, end: bytes) -> bytes:
    """What CONN sends until it ends with END (OSError when it closes first)."""
    data = b""
    while not data.endswith(end):
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def memcached_values(host: str, numbers: list[int]) -> dict[int, int]:
    """What memcached at HOST holds for kN of NUMBERS (gets of 100 keys at once)."""
    out = {}
    with socket.create_connection((host, MEMCACHED_PORT), timeout=5) as conn:
        for i in range(0, len(numbers), 100):
            conn.sendall(b"get " + b" ".join(b"k%d" % n for n in numbers[i:i + 100]) + b"\r\n")
            lines = _until(conn, b"END\r\n").split(b"\r\n")
            for head, value in zip(lines, lines[1:], strict=False):
                if head.startswith(b"VALUE "):
                    out[int(head.split()[1][1:])] = int(value)
    return out


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


NGINX_PORT = 18080
PAGE = b"<html>migctl " + b"x" * 4000 + b"</html>\n"


class Http(Acked):
    """A client of an HTTP service on PORT."""

    port = 0

    def open(self, host: str) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(host, self.port, timeout=2)
        conn.connect()
        return conn

    @staticmethod
    def ask(conn: http.client.HTTPConnection, method: str, path: str) -> tuple[int, bytes]:
        try:
            conn.request(method, path)
            res = conn.getresponse()
            return res.status, res.read()
        except http.client.HTTPException as err:
            raise OSError(str(err)) from err


class Reader(Http):
    """GETs nginx's page; an answer counts when it is the page, whole."""

    port = NGINX_PORT

    def write(self, conn: http.client.HTTPConnection, n: int) -> None:
        status, body = self.ask(conn, "GET", "/index.html")
        if status != 200 or body != PAGE:
            raise OSError(f"nginx answered {status} with {len(body)} bytes")


@pytest.fixture
def services(lab: LabHandle) -> Iterator[list[str]]:
    names = ["memcached", "nginx", "postgres", "mosquitto", "sqliteapp"]
    volumes = ["nginx-site", "pg-data", "mosquitto-data", "sqlite-data"]
    remove_everywhere(lab.docker, names, volumes)
    for node in ("nodeA", "nodeB"):  # the same image at both ends: no layer to move
        ensure_services_image(lab.docker[node], CACHE)
    yield [lab.address(n).split(":")[0] for n in ("nodeA", "nodeB")]
    remove_everywhere(lab.docker, names, volumes)


def wait_for(host: str, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing answers on {host}:{port}") from None
            time.sleep(0.2)


def through_a_migration(client: Acked, name: str) -> dict:
    """CLIENT runs 3 s, through the migration of NAME from nodeA to nodeB, and 3 s after."""
    client.start()
    time.sleep(3)
    before = len(client.acked)
    assert before > 20, f"the client of {name} did not get through"
    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", name)
    time.sleep(3)
    client.stop.set()
    client.join(timeout=30)
    assert len(client.acked) > before + 20, f"{name} answered nothing at the destination"
    print(f"\n[services] {name}: {len(client.acked)} acknowledged, downtime "
          f"{report['downtime_seconds']:.2f} s, client's longest gap {client.longest:.2f} s, "
          f"{client.errors} errors retried")
    return report


def test_memcached_moves_with_every_acknowledged_set(lab: LabHandle,
                                                     services: list[str]) -> None:
    lab.docker["nodeA"].containers.run(SERVICES_IMAGE, ["sh", "-c", MEMCACHED],
                                       name="memcached", detach=True,
                                       ports={"11211/tcp": MEMCACHED_PORT})
    wait_for(services[0], MEMCACHED_PORT)
    writer = Memcached(services)
    through_a_migration(writer, "memcached")
    held = memcached_values(services[1], writer.acked)
    lost = [n for n in writer.acked if held.get(n) != n]
    assert lost == [], f"acknowledged sets lost at the destination: {lost[:10]}"
    assert lab.docker["nodeA"].containers.get("memcached").status == "exited"
    assert lab.docker["nodeB"].containers.get("memcached").status == "running"


def test_nginx_moves_and_serves_its_volume_whole(lab: LabHandle, services: list[str]) -> None:
    a = lab.docker["nodeA"]
    a.volumes.create("nginx-site")
    seed = a.containers.create(SERVICES_IMAGE, ["sleep", "1"],
                               volumes={"nginx-site": {"bind": "/var/www/html", "mode": "rw"}})
    seed.put_archive("/var/www/html", _tar("index.html", PAGE))
    seed.remove()
    a.containers.run(SERVICES_IMAGE, ["sh", "-c", NGINX], name="nginx", detach=True,
                     volumes={"nginx-site": {"bind": "/var/www/html", "mode": "ro"}},
                     ports={"80/tcp": NGINX_PORT})
    wait_for(services[0], NGINX_PORT)
    reader = Reader(services)
    through_a_migration(reader, "nginx")
    assert lab.docker["nodeB"].containers.get("nginx").status == "running"
    conn = reader.open(services[1])
    reader.write(conn, 0)  # the destination serves the page, whole
    workers = lab.docker["nodeB"].containers.get("nginx").top()["Processes"]
    assert sum("nginx: worker" in " ".join(p) for p in workers) >= 1, workers


def _tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_postgres_is_refused_up_front_with_the_reason_or_moves(
        lab: LabHandle, services: list[str]) -> None:
    """Postgres refuses to run as root, and CRIU cannot read the resource limits of a
    process of another user where root lacks CAP_SYS_RESOURCE (these machines, HOST.md): the
    pre-flight says so, naming the process, before anything moves; Postgres runs on."""
    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    a.containers.run(SERVICES_IMAGE, ["sh", "-c", POSTGRES], name="postgres", detach=True,
                     volumes={"pg-data": {"bind": "/var/lib/postgresql/data", "mode": "rw"}},
                     ports={"5432/tcp": 15432})
    wait_for(services[0], 15432)
    if dumpable.has_sys_resource():
        pytest.skip("this node's root has CAP_SYS_RESOURCE, so Postgres is not refused; the "
                    "test of Postgres moving with pgbench through the freeze is not written "
                    "yet (issue 24)")
    res = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "postgres",
                 check=False)
    assert res.returncode == 1, res.stderr
    assert "postgres (pid" in res.stderr and "lacks CAP_SYS_RESOURCE" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert a.containers.get("postgres").status == "running"
    assert "postgres" not in [c.name for c in b.containers.list(all=True)]
    assert "pg-data" not in [v.name for v in b.volumes.list()]


MQTT_PORT = 11883


def mqtt_client(host: str, client_id: str, **callbacks) -> mqtt.Client:  # noqa: ANN003
    """A connected client whose session the broker keeps (clean_session off), its network
    loop running: raises OSError when HOST does not take it."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=False)
    for name, fn in callbacks.items():
        setattr(client, name, fn)
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, reason, props: connected.set()
    client.connect(host, MQTT_PORT, keepalive=5)
    client.loop_start()
    if not connected.wait(2):
        client.loop_stop()
        raise OSError(f"mosquitto on {host} did not take {client_id}")
    return client


class Publisher(Acked):
    """QoS 1 PUBLISHes of each number on `seq`; the broker's PUBACK acknowledges it."""

    def open(self, host: str) -> mqtt.Client:
        return mqtt_client(host, "migctl-pub")

    def write(self, client: mqtt.Client, n: int) -> None:
        info = client.publish("seq", str(n), qos=1)
        try:
            info.wait_for_publish(timeout=2)
            why = "" if info.is_published() else f"no PUBACK for {n}"
        except (RuntimeError, ValueError) as err:
            why = str(err)
        if why:  # this client is done: the next one, under the same id, takes its session
            client.loop_stop()
            client.disconnect()
            raise OSError(why)


class Subscriber:
    """A subscriber of `seq` at QoS 1 with a persistent session: after a disconnection it
    comes back under the same id, to whichever broker answers, and gets what was queued."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts, self.got, self.reconnects = hosts, [], 0
        self.lost = threading.Event()
        self.client = self.connect(subscribe=True)

    def connect(self, subscribe: bool = False) -> mqtt.Client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for host in self.hosts:
                try:
                    client = mqtt_client(host, "migctl-sub", on_message=self.message,
                                         on_disconnect=lambda *a: self.lost.set())
                except OSError:
                    continue
                if subscribe:
                    client.subscribe("seq", qos=1)
                return client
            time.sleep(0.1)
        raise AssertionError("no broker took the subscriber back")

    def message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.got.append(int(msg.payload))

    def keep(self, until: threading.Event) -> None:
        while not until.is_set():
            if self.lost.wait(0.1):
                self.lost.clear()
                self.client.loop_stop()
                self.reconnects += 1
                self.client = self.connect()


def test_mosquitto_moves_with_its_sessions_and_every_acknowledged_message(
        lab: LabHandle, services: list[str]) -> None:
    """QoS 1 is at least once: a number published again after a lost PUBACK may arrive
    twice; any other duplicate, and any acknowledged number missing, fails."""
    lab.docker["nodeA"].containers.run(
        SERVICES_IMAGE, ["sh", "-c", MOSQUITTO], name="mosquitto", detach=True,
        volumes={"mosquitto-data": {"bind": "/var/lib/mosquitto", "mode": "rw"}},
        ports={"1883/tcp": MQTT_PORT})
    wait_for(services[0], MQTT_PORT)
    sub = Subscriber(services)
    done = threading.Event()
    keeper = threading.Thread(target=sub.keep, args=(done,), daemon=True)
    keeper.start()
    pub = Publisher(services)
    through_a_migration(pub, "mosquitto")
    deadline = time.monotonic() + 20
    while not set(pub.acked) <= set(sub.got) and time.monotonic() < deadline:
        time.sleep(0.2)
    done.set()
    keeper.join(timeout=10)
    lost = sorted(set(pub.acked) - set(sub.got))
    twice = sorted({n for n in sub.got if sub.got.count(n) > 1})
    print(f"[services] mosquitto: the subscriber got {len(sub.got)} messages, came back "
          f"{sub.reconnects} times, {len(twice)} delivered twice")
    assert sub.reconnects >= 1, "the subscriber never lost the source: did it move?"
    assert lost == [], f"acknowledged messages the subscriber never got: {lost[:10]}"
    assert len(twice) <= pub.errors, f"duplicates beyond the publisher's retries: {twice}"
    assert lab.docker["nodeB"].containers.get("mosquitto").status == "running"


SQLITE_PORT = 18000


class SqliteWriter(Http):
    """POST /N to the application, which answers once N is committed to SQLite."""

    port = SQLITE_PORT

    def write(self, conn: http.client.HTTPConnection, n: int) -> None:
        status, body = self.ask(conn, "POST", f"/{n}")
        if status != 200 or body != b"ok":
            raise OSError(f"the application answered {status} {body[:40]!r}")


def test_an_application_on_sqlite_moves_with_every_committed_row(
        lab: LabHandle, services: list[str]) -> None:
    lab.docker["nodeA"].containers.run(
        SERVICES_IMAGE, ["python3", "-c", SQLITE_APP], name="sqliteapp", detach=True,
        volumes={"sqlite-data": {"bind": "/data", "mode": "rw"}}, ports={"8000/tcp": SQLITE_PORT})
    wait_for(services[0], SQLITE_PORT)
    writer = SqliteWriter(services)
    through_a_migration(writer, "sqliteapp")
    conn = writer.open(services[1])
    conn.request("GET", "/")
    stored = [int(x) for x in conn.getresponse().read().split()]
    lost = sorted(set(writer.acked) - set(stored))
    assert lost == [], f"acknowledged rows lost: {lost[:10]}"
    assert stored == list(range(1, len(stored) + 1)), "a row is missing or out of order"
    assert lab.docker["nodeB"].containers.get("sqliteapp").status == "running"
