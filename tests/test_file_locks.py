"""Services that hold file locks move with them (the service issue): a process holding a
flock, a POSIX and an OFD lock on files of its volume is migrated, and at the destination
another process still cannot take any of them. CRIU needs its `file-locks` option for this
(scripts/setup.sh writes it into /etc/criu/runc.conf); MariaDB holds such locks."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migctl.lab.workloads import TOY_IMAGE, ensure_toy_image, numbers, remove_everywhere
from tests.conftest import CACHE, DELTA, LabHandle, migrate_json

HOLDER = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <unistd.h>
int main(void) {
    int a = open("/data/flock", O_RDWR | O_CREAT, 0644);
    int b = open("/data/posix", O_RDWR | O_CREAT, 0644);
    int c = open("/data/ofd", O_RDWR | O_CREAT, 0644);
    struct flock posix = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    struct flock ofd = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (flock(a, LOCK_EX | LOCK_NB) || fcntl(b, F_SETLK, &posix) || fcntl(c, F_OFD_SETLK, &ofd)) {
        perror("lock");
        return 1;
    }
    for (unsigned long i = 0;; i++) {
        printf("%lu\n", i);
        fflush(stdout);
        usleep(100000);
    }
}
"""
PROBE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <unistd.h>
/* which of the holder's three locks another process could take: prints them, exit 0 if none */
int main(void) {
    int free_ = 0;
    int a = open("/data/flock", O_RDWR), b = open("/data/posix", O_RDWR);
    int c = open("/data/ofd", O_RDWR);
    struct flock posix = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    struct flock ofd = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (flock(a, LOCK_EX | LOCK_NB) == 0) { printf("flock free\n"); free_ = 1; }
    if (fcntl(b, F_GETLK, &posix) || posix.l_type == F_UNLCK) { printf("posix free\n"); free_ = 1; }
    if (fcntl(c, F_OFD_GETLK, &ofd) || ofd.l_type == F_UNLCK) { printf("ofd free\n"); free_ = 1; }
    if (!free_) printf("all held, posix by pid %d\n", posix.l_pid);
    return free_;
}
"""


def compiled(name: str, source: str) -> Path:
    """A static binary (the toy image has no C library to speak of), built once per machine."""
    out = CACHE / "locks" / name
    if not out.exists():
        if not shutil.which("gcc"):
            pytest.fail("gcc is missing: scripts/setup.sh installs it (gcc, libc6-dev)")
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.with_suffix(".c")
        src.write_text(source)
        subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(src)], check=True)
    return out


@pytest.fixture
def locky(lab: LabHandle) -> Iterator[None]:
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["locky"], ["lockvol"])
    ensure_toy_image(a, CACHE)
    volume = Path(a.volumes.create("lockvol").attrs["Mountpoint"])
    for name, source in (("holder", HOLDER), ("probe", PROBE)):
        shutil.copy(compiled(name, source), volume / name)
    a.containers.run(TOY_IMAGE, ["/data/holder"], name="locky", detach=True,
                     volumes={"lockvol": {"bind": "/data", "mode": "rw"}})
    time.sleep(1)
    yield
    remove_everywhere(lab.docker, ["locky"], ["lockvol"])


def held(container) -> str:
    res = container.exec_run(["/data/probe"])
    assert res.exit_code == 0, f"a lock is free: {res.output.decode()}"
    return res.output.decode()


def test_a_process_keeps_its_flock_posix_and_ofd_locks_across_a_migration(
        lab: LabHandle, locky: None) -> None:
    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    assert "all held, posix by pid 1" in held(a.containers.get("locky"))
    migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", "locky")
    new = b.containers.get("locky")
    assert new.status == "running"
    assert "all held, posix by pid 1" in held(new), "the restored holder lost a lock"
    last_at_a = numbers(a.containers.get("locky").logs().decode())[-1]
    time.sleep(1)
    counted = numbers(new.logs().decode())
    assert counted and counted[0] == last_at_a + 1 and len(counted) > 2, "it did not go on"
