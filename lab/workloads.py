"""Lab workloads built locally (no registry): a busybox base image and the seed's toys.

The base image's tar is deterministic, so importing it on two nodes yields the same layer and
the "already there" path of layer transfer can be exercised.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import docker

from migctl.client.api import MIGCTL_HOME

BASE = "migctl-busybox:1"
TOY_IMAGE = "toytsm:1"
CACHE = MIGCTL_HOME / "cache"  # images' inputs built once per machine
COUNTER = ("i=0; while true; do echo $i | tee -a /testrw/counter; i=$((i+1)); sleep 1; done")
# A server holding its state in memory (the shell variable): every connection gets the next hit.
SERVER = ("i=0; while true; do i=$((i+1)); printf 'hits=%d\\n' $i | nc -l -p 8080; done")


def busybox_rootfs(cache: Path) -> Path:
    out = cache / "busybox-rootfs.tar"
    if out.exists():
        return out
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is missing: run scripts/setup.sh"
    cache.mkdir(parents=True, exist_ok=True)
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    tmp = out.with_suffix(".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        def add_dir(name: str) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(ti)

        for d in ("bin", "tmp", "etc", "proc", "sys", "dev"):
            add_dir(d)
        data = Path(busybox).read_bytes()
        ti = tarfile.TarInfo("bin/busybox")
        ti.size, ti.mode, ti.mtime = len(data), 0o755, 0
        tar.addfile(ti, io.BytesIO(data))
        for applet in sorted(set(applets) - {"busybox"}):
            ti = tarfile.TarInfo(f"bin/{applet}")
            ti.type, ti.linkname, ti.mtime = tarfile.SYMTYPE, "busybox", 0
            tar.addfile(ti)
    tmp.rename(out)
    return out


def ensure_base(client: docker.DockerClient, cache: Path) -> None:
    try:
        client.images.get(BASE)
    except docker.errors.ImageNotFound:
        client.api.import_image_from_file(str(busybox_rootfs(cache)), repository=BASE.split(":")[0],
                                          tag=BASE.split(":")[1])


def _has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def ensure_toy_image(client: docker.DockerClient, cache: Path) -> None:
    """The seed's toy image: the base plus a layer holding a 1000-line text file."""
    ensure_base(client, cache)
    if _has_image(client, TOY_IMAGE):
        return
    with tempfile.TemporaryDirectory() as ctx:
        Path(ctx, "lines.txt").write_text("".join(f"line {i}\n" for i in range(1000)))
        Path(ctx, "Dockerfile").write_text(f"FROM {BASE}\nCOPY lines.txt /lines.txt\n")
        client.images.build(path=ctx, tag=TOY_IMAGE, rm=True)


REDIS_IMAGE = "migctl-redis:1"


def ensure_redis_image(client: docker.DockerClient, cache: Path) -> None:
    """Redis without a registry: the host's redis-server and the libraries it links, on the
    base image (built the same way on every node, so its layers match)."""
    ensure_base(client, cache)
    if _has_image(client, REDIS_IMAGE):
        return
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: run scripts/setup.sh"
    libs = [line.split("=>")[-1].split("(")[0].strip() for line in subprocess.run(
        ["ldd", server], capture_output=True, text=True, check=True).stdout.splitlines()]
    with tempfile.TemporaryDirectory() as ctx:
        root = Path(ctx, "rootfs")
        for f in [server, *[lib for lib in libs if lib.startswith("/")]]:
            dest = root / Path(f).resolve().relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(f).resolve(), dest)
            if Path(f).resolve() != Path(f):  # the name the loader asks for
                link = root / Path(f).relative_to("/")
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(Path(f).resolve())
        Path(ctx, "Dockerfile").write_text(
            f"FROM {BASE}\nCOPY rootfs/ /\n"
            'CMD ["/usr/bin/redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", '
            '"--save", "", "--appendonly", "no"]\n')
        client.images.build(path=ctx, tag=REDIS_IMAGE, rm=True)


MARIADB_IMAGE = "migctl-mariadb:1"
DEBIAN_SUITE = "bookworm"
# InnoDB uses io_uring by default, which CRIU cannot dump (docs/runtime.md); the server runs
# as root because this machine's root lacks CAP_SYS_RESOURCE (HOST.md); no grant tables: a
# test server, reached only on the lab's segment; no reverse lookups of clients (no DNS here)
MARIADB = ("mkdir -p /run/mysqld && "
           "{ [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=root "
           "--datadir=/var/lib/mysql --auth-root-authentication-method=normal >/dev/null; } && "
           "exec mariadbd --user=root --datadir=/var/lib/mysql --bind-address=0.0.0.0 "
           "--skip-grant-tables --skip-name-resolve --innodb-use-native-aio=0 "
           "--innodb-flush-log-at-trx-commit=1")


def debian_mirror() -> str:
    """The machine's own Debian mirror (no other registry is reachable)."""
    for f in [*Path("/etc/apt/sources.list.d").glob("*.sources")]:
        for line in f.read_text().splitlines():
            if line.lower().startswith("uris:"):
                return line.split(":", 1)[1].split()[0]
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        if f.exists():
            for line in f.read_text().splitlines():
                parts = [x for x in line.split() if not x.startswith("[")]
                if parts[:1] == ["deb"] and len(parts) > 1:
                    return parts[1]
    return "http://deb.debian.org/debian"


def debian_rootfs(cache: Path, name: str, packages: list[str]) -> Path:
    """A minimal Debian root with PACKAGES from the machine's mirror (debootstrap, a few
    minutes once), as a tar in CACHE: the same bytes for every node's import."""
    out = cache / f"{name}-rootfs.tar"
    if out.exists():
        return out
    assert shutil.which("debootstrap"), "debootstrap is missing: run scripts/setup.sh"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp, "root")
        res = subprocess.run(["debootstrap", "--variant=minbase",
                              f"--include={','.join(packages)}", DEBIAN_SUITE, str(root),
                              debian_mirror()], capture_output=True, text=True)
        if res.returncode != 0:
            raise AssertionError(f"debootstrap of {packages} failed: {res.stdout[-2000:]}"
                                 f"{res.stderr[-2000:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / junk, ignore_errors=True)
        part = out.with_suffix(".part")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "-cf",
                        str(part), "--exclude=./proc/*", "--exclude=./sys/*",
                        "--exclude=./dev/*", "."], check=True)
        part.rename(out)
    return out


def ensure_mariadb_image(client: docker.DockerClient, cache: Path) -> None:
    """MariaDB from Debian's packages (no registry is reachable), imported the same on every
    node."""
    if _has_image(client, MARIADB_IMAGE):
        return
    rootfs = debian_rootfs(cache, "mariadb", ["mariadb-server"])
    repo, tag = MARIADB_IMAGE.split(":")
    client.api.import_image_from_file(str(rootfs), repository=repo, tag=tag)


SERVICES_IMAGE = "migctl-services:2"
"""Postgres, nginx, memcached, mosquitto and an application on SQLite (python3) from Debian's
packages, one image for the service matrix (its tag changes with its packages)."""
SERVICES_PACKAGES = ["postgresql", "nginx-light", "memcached", "mosquitto", "python3"]
# root, as this machine's root lacks CAP_SYS_RESOURCE (HOST.md): nginx's workers too
MEMCACHED = "exec memcached -u root -m 64 -p 11211 -U 0 -l 0.0.0.0"
NGINX = ("sed -i 's/^user .*/user root;/' /etc/nginx/nginx.conf && "
         "exec nginx -g 'daemon off;'")
# Postgres refuses to run as root: its own user, as people run it
POSTGRES = ("mkdir -p /run/postgresql && chown postgres /run/postgresql && "
            "chown postgres /var/lib/postgresql/data && "
            "{ [ -f /var/lib/postgresql/data/PG_VERSION ] || setpriv --reuid=postgres "
            "--regid=postgres --init-groups /usr/lib/postgresql/15/bin/initdb "
            "-D /var/lib/postgresql/data --auth=trust >/dev/null; } && "
            "exec setpriv --reuid=postgres --regid=postgres --init-groups "
            "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/data "
            "-c listen_addresses='*'")


# a broker keeping sessions and queued QoS 1 messages, in memory and on its volume
MOSQUITTO = ("printf 'user root\\nlistener 1883 0.0.0.0\\nallow_anonymous true\\n"
             "persistence true\\npersistence_location /var/lib/mosquitto/\\n' "
             "> /etc/mosquitto/migctl.conf && exec mosquitto -c /etc/mosquitto/migctl.conf")
# an application on SQLite: POST /N inserts N (WAL, synchronous=FULL) and answers once it is
# committed; GET / lists every number
SQLITE_APP = """
import http.server, sqlite3
db = sqlite3.connect("/data/app.db", isolation_level=None, check_same_thread=False)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS seq (n INTEGER PRIMARY KEY)")
class App(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        db.execute("INSERT OR IGNORE INTO seq VALUES (?)", (int(self.path[1:]),))
        self.answer(b"ok")
    def do_GET(self):
        self.answer(" ".join(str(r[0]) for r in db.execute("SELECT n FROM seq")).encode())
    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", 8000), App).serve_forever()
"""


def ensure_services_image(client: docker.DockerClient, cache: Path) -> None:
    if _has_image(client, SERVICES_IMAGE):
        return
    rootfs = debian_rootfs(cache, "services-" + SERVICES_IMAGE.split(":")[1], SERVICES_PACKAGES)
    repo, tag = SERVICES_IMAGE.split(":")
    client.api.import_image_from_file(str(rootfs), repository=repo, tag=tag)


def remove_everywhere(clients: dict[str, docker.DockerClient], containers: list[str],
                      volumes: list[str]) -> None:
    for client in clients.values():
        for name in containers:
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(name).remove(force=True)
        for name in volumes:
            with contextlib.suppress(docker.errors.NotFound):
                client.volumes.get(name).remove(force=True)


def run_toy(client: docker.DockerClient, name: str = "toytsm", rw: str = "testrw",
            ro: str = "testro") -> docker.models.containers.Container:
    client.volumes.create(rw, labels={"rw-guid": f"guid-{rw}-{time.time_ns()}"})
    client.volumes.create(ro)
    client.containers.run(BASE, ["sh", "-c", "echo read-only content > /v/file"], remove=True,
                          volumes={ro: {"bind": "/v", "mode": "rw"}})
    return client.containers.run(TOY_IMAGE, ["sh", "-c", COUNTER], name=name, detach=True,
                                 volumes={rw: {"bind": "/testrw", "mode": "rw"},
                                          ro: {"bind": "/testro", "mode": "ro"}})


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split() if x.isdigit()]


CLIENT_PORTS = {"redis": 6379, "hits": 8080}
TICK = 0.01  # seconds between a client's requests  # Redis (INCR), the SERVER script (hits=N)


class Client(threading.Thread):
    """A client outside the container: one request every 10 ms to whichever node answers,
    recording when answers came. The longest gap between two answers is the downtime a user
    sees; each answer must be above the last (no state lost)."""

    def __init__(self, kind: str, hosts: list[str], write_rate: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.kind, self.hosts = kind, hosts
        # Redis only: bytes/s of 1000-byte SETs sent along with each request (memory dirtied)
        self.sets = int(write_rate * TICK / 1000)
        self.answers: list[tuple[float, int]] = []
        self.latencies: list[tuple[float, float]] = []  # (answered at, seconds it took)
        # every attempt: (asked at, done at, host, how it ended): where a gap's time went
        self.attempts: list[tuple[float, float, str, str]] = []
        self.stop = threading.Event()

    def ask(self, host: str) -> int | None:
        asked, step, outcome = time.monotonic(), "connect", "answer"
        try:
            with socket.create_connection((host, CLIENT_PORTS[self.kind]), timeout=0.2) as s:
                step = "answer"
                s.settimeout(0.5)
                if self.kind == "redis":
                    s.sendall(self._writes() + b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n")
                data = b""
                while not _answered(data):
                    chunk = s.recv(4096)
                    if not chunk:
                        outcome = "closed"
                        break
                    data += chunk
        except OSError as err:
            outcome = f"{step} {type(err).__name__}"
            return None
        finally:
            self.attempts.append((asked, time.monotonic(), host, outcome))
        data = data.replace(b"+OK\r\n", b"")  # the SETs' answers come first
        if data.startswith(b":"):
            return int(data[1:].split(b"\r\n")[0])
        if data.startswith(b"hits="):
            return int(data[5:].strip())
        return None

    def _writes(self) -> bytes:
        value = b"x" * 1000
        return b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1000\r\n%s\r\n"
                        % (len(k), k, value)
                        for k in (f"w{random.randrange(100_000)}".encode()
                                  for _ in range(self.sets)))

    def run(self) -> None:
        while not self.stop.is_set():
            for host in self.hosts:
                asked = time.monotonic()
                value = self.ask(host)
                if value is not None:
                    now = time.monotonic()
                    self.answers.append((now, value))
                    self.latencies.append((now, now - asked))
                    break
            time.sleep(TICK)

    def gap(self, start: float, end: float) -> float:
        times = [t for t, _ in self.answers if start - 1 <= t <= end + 5]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def gap_attempts(self, start: float, end: float) -> list[tuple[float, float, str, str]]:
        """The attempts inside the longest gap between START and END (see gap())."""
        times = [t for t, _ in self.answers if start - 1 <= t <= end + 5]
        gaps = [(b - a, a, b) for a, b in zip(times, times[1:], strict=False)]
        if not gaps:
            return []
        _, a, b = max(gaps)
        return [x for x in self.attempts if a <= x[1] <= b]

    def p99(self, start: float, end: float) -> float:
        """The 99th percentile of the answers' latency between START and END (0: none)."""
        got = sorted(lat for t, lat in self.latencies if start <= t <= end)
        return got[min(len(got) - 1, int(len(got) * 0.99))] if got else 0.0

    def forgotten(self) -> int:
        """Answers not above the one before: the container's memory went back (lost state).
        A jump is no loss: a request served just before the freeze whose answer the
        restore's closed connection never delivered."""
        values = [v for _, v in self.answers]
        return sum(1 for a, b in zip(values, values[1:], strict=False) if b <= a)


def _answered(data: bytes) -> bool:
    """A whole answer: the hit server's line, or Redis's INCR reply after any SETs' +OK."""
    if data.startswith(b"hits="):
        return b"\n" in data
    rest = data.replace(b"+OK\r\n", b"")
    return rest.startswith(b":") and rest.endswith(b"\r\n") or rest.startswith(b"-")


def wait_for_redis(host: str, port: int = CLIENT_PORTS["redis"], timeout: float = 20):  # noqa: ANN201
    """A client of the Redis at HOST:PORT once it answers (a container just started)."""
    import redis

    db = redis.Redis(host=host, port=port, socket_timeout=30)
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.ping()
            return db
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis on {host}:{port} does not answer") from None
            time.sleep(0.3)


def fill_redis(host: str, size_mb: float, port: int = CLIENT_PORTS["redis"]) -> None:
    """SIZE_MB of Redis data as keys of 1000 random bytes: DEBUG POPULATE's values are zero
    padded and would compress some 50-fold, flattering every mode that compresses."""
    db = wait_for_redis(host, port)
    keys = int(size_mb * 1000)
    for first in range(0, keys, 1000):
        pipe = db.pipeline(transaction=False)
        for i in range(first, min(first + 1000, keys)):
            pipe.set(f"key:{i}", os.urandom(1000))
        pipe.execute()


def on_segment(container: docker.models.containers.Container, network: str) -> str:
    """CONTAINER's address on NETWORK (the lab's `lan`), once it spoke first there: a run
    before may have left this address, and the MAC the engine derives from it, on another
    node's port of the lab's switch, which learns it anew from this ping."""
    container.reload()
    net = container.attrs["NetworkSettings"]["Networks"][network]
    container.exec_run(["ping", "-c", "1", "-W", "1", net["Gateway"]])
    return net["IPAddress"]


def run_crowd(client: docker.DockerClient, cache: Path, counters: list[str], toys: list[str],
              redis: list[str], redis_mb: float, network: str) -> dict[str, str]:
    """A node's crowd for evacuations: busybox COUNTERS and TOYS (the seed's toy image), each
    counting into its own volume NAME-data, and REDIS servers on NETWORK (its address moves
    with it) holding the key "evacuated" and REDIS_MB of data. Returns each Redis's address."""
    ensure_toy_image(client, cache)
    if redis:
        ensure_redis_image(client, cache)
    for name in [*counters, *toys]:
        client.containers.run(BASE if name in counters else TOY_IMAGE, ["sh", "-c", COUNTER],
                              name=name, detach=True,
                              volumes={f"{name}-data": {"bind": "/testrw", "mode": "rw"}})
    addresses = {}
    for name in redis:
        address = on_segment(client.containers.run(REDIS_IMAGE, name=name, detach=True,
                                                   network=network), network)
        wait_for_redis(address).set("evacuated", "with its state")
        if redis_mb:
            fill_redis(address, redis_mb)
        addresses[name] = address
    return addresses


def crowd_volumes(counters: list[str], toys: list[str]) -> list[str]:
    return [f"{n}-data" for n in [*counters, *toys]]
