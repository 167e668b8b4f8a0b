"""The pre-flight reads /proc for what CRIU will refuse (the service issue: `migctl ps` said
Postgres, MariaDB, memcached, mosquitto and nginx could move; each failed at the first
checkpoint). A fake /proc per case; the real one in the last test."""

from __future__ import annotations

import os
from pathlib import Path

from migctl.agent.runtime import dumpable
from migctl.lab.nodes import LAB_DIR
from migctl.lab.workloads import TOY_IMAGE, ensure_toy_image, remove_everywhere, run_toy
from tests.conftest import CACHE, DELTA, migctl


def fake(proc: Path, pid: int, name: str, uid: int = 0, gid: int = 0,
         anon: tuple[str, ...] = ()) -> None:
    d = proc / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "status").write_text(f"Name:\t{name}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                              f"Gid:\t{gid}\t{gid}\t{gid}\t{gid}\n")
    os.symlink("/dev/null", d / "fd" / "0")
    for i, kind in enumerate(anon, start=3):
        os.symlink(f"anon_inode:{kind}", d / "fd" / str(i))


def test_a_service_of_its_own_user_is_named_when_root_lacks_sys_resource(tmp_path) -> None:
    fake(tmp_path, 10, "postgres", uid=999, gid=999)
    fake(tmp_path, 11, "postgres", uid=999, gid=999)
    fake(tmp_path, 1, "sh")
    [why] = dumpable.problems([1, 10, 11], sys_resource=False, proc=tmp_path)
    assert why.startswith("processes postgres (pid 10, uid 999/999 gid 999/999), postgres "
                          "(pid 11, uid 999/999 gid 999/999) do not run as root")
    assert "CAP_SYS_RESOURCE" in why and "Run the service as root" in why
    assert dumpable.problems([1, 10, 11], sys_resource=True, proc=tmp_path) == []


def test_a_group_alone_counts_too(tmp_path) -> None:
    fake(tmp_path, 5, "nginx", uid=0, gid=33)
    assert dumpable.problems([5], sys_resource=False, proc=tmp_path)


def test_io_uring_and_unknown_anonymous_inodes_are_named(tmp_path) -> None:
    fake(tmp_path, 7, "mariadbd", anon=("[io_uring]", "[eventfd]", "[eventpoll]"))
    fake(tmp_path, 8, "odd", anon=("[userfaultfd]", "[timerfd]"))
    out = dumpable.problems([7, 8], sys_resource=True, proc=tmp_path)
    assert out == [
        "process mariadbd (pid 7) uses io_uring, which CRIU cannot dump: turn it off in the "
        "service (MariaDB: innodb_use_native_aio=0)",
        "process odd (pid 8) holds an anonymous inode [userfaultfd], which CRIU cannot dump",
    ]


def test_what_criu_dumps_is_no_problem_and_a_process_gone_is_skipped(tmp_path) -> None:
    fake(tmp_path, 3, "redis-server", anon=tuple(sorted(dumpable.DUMPABLE_ANON_INODES)))
    assert dumpable.problems([3, 4], sys_resource=True, proc=tmp_path) == []


def test_many_processes_are_counted_not_listed(tmp_path) -> None:
    for pid in range(20, 30):
        fake(tmp_path, pid, "worker", anon=("[io_uring]",))
    [why] = dumpable.problems(range(20, 30), sys_resource=True, proc=tmp_path)
    assert "and 7 more use io_uring" in why


def test_this_machine_answers_about_itself() -> None:
    """Root here lacks CAP_SYS_RESOURCE (HOST.md); on a machine whose root has it, it says so."""
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
    assert dumpable.has_sys_resource() == bool(cap_eff >> 24 & 1)
    assert dumpable.problems([os.getpid()], sys_resource=True) == []


def test_a_service_of_its_own_user_is_refused_up_front_or_moves(lab) -> None:
    """On the lab: a container whose process runs as uid 1000. Where root lacks
    CAP_SYS_RESOURCE (these machines, HOST.md) `migctl ps` and the migration say why before
    anything moves, and the container runs on; where root has it, it moves."""
    import json

    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    remove_everywhere(lab.docker, ["ownuser"], [])
    ensure_toy_image(a, CACHE)
    a.containers.run(TOY_IMAGE, ["sleep", "1000"], name="ownuser", detach=True, user="1000")
    try:
        listed = json.loads(migctl("ps", "--node", "nodeA", "--json").stdout)
        [row] = [r for r in listed if r["name"] == "ownuser"]
        res = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "ownuser",
                     check=False)
        if dumpable.has_sys_resource():
            assert row["movable"], row
            assert res.returncode == 0, res.stderr
            return
        why = "does not run as root, and this node's root lacks CAP_SYS_RESOURCE"
        assert not row["movable"] and any(why in u for u in row["unsupported"]), row
        assert res.returncode == 1 and why in res.stderr, res.stderr
        assert "sleep (pid" in res.stderr  # names the process
        assert a.containers.get("ownuser").status == "running"
        assert "ownuser" not in [c.name for c in b.containers.list(all=True)]
        assert "Traceback" not in res.stderr
    finally:
        remove_everywhere(lab.docker, ["ownuser"], [])


def test_criu_words_add_the_first_error_of_the_log_the_engine_names(tmp_path) -> None:
    from migctl.agent.migration.source import criu_words

    log = tmp_path / "dump.log"
    log.write_text("(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for "
                   "self: Operation not permitted\n"
                   "(00.001) info\n(00.002) Error (criu/sk-inet.c:99): Unsupported socket "
                   "family 38\n(00.003) Error (criu/cr-dump.c:2): Dumping FAILED.\n")
    said = f"checkpoint of 'x' failed (CRIU): criu failed: type NOTIFY errno 0 | log file: {log}"
    assert criu_words(said) == f"{said} — CRIU: (00.002) Error (criu/sk-inet.c:99): " \
                               "Unsupported socket family 38"
    gone = "criu failed | log file: /nonexistent/dump.log: unknown"
    assert criu_words(gone) == gone
    runc = f"criu failed: type NOTIFY errno 0 path= {log}: unknown"  # runc's checkpoint words
    assert criu_words(runc).endswith("Unsupported socket family 38")


VSOCK_HOLDER = r"""
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int s = socket(40 /* AF_VSOCK */, SOCK_STREAM, 0);
    printf("AF_VSOCK socket %d\n", s);
    fflush(stdout);
    for (;;) pause();
}
"""


def test_plan_check_asks_criu_what_the_pre_flight_cannot_see(lab) -> None:
    """A virtual-machine socket (AF_VSOCK) is no anonymous inode and no other user: /proc shows
    the pre-flight nothing, and CRIU 4.2 cannot dump it. `plan --check` asks CRIU (a dump left
    running, thrown away) and names the refusal; the container runs on, untouched."""
    import json
    import shutil
    import time

    from tests.test_file_locks import compiled

    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["algy", "toytsm"], ["algvol"])
    ensure_toy_image(a, CACHE)
    volume = Path(a.volumes.create("algvol").attrs["Mountpoint"])
    shutil.copy(compiled("vsock-holder", VSOCK_HOLDER), volume / "holder")
    a.containers.run(TOY_IMAGE, ["/data/holder"], name="algy", detach=True,
                     volumes={"algvol": {"bind": "/data", "mode": "rw"}})
    try:
        time.sleep(1)
        assert "AF_VSOCK socket 3" in a.containers.get("algy").logs().decode()
        quiet = json.loads(migctl("plan", "--json", "--from", "nodeA", "--to", "nodeB",
                                  "algy").stdout)
        assert quiet.get("problems", []) == [], "the pre-flight saw it after all"
        asked = json.loads(migctl("plan", "--json", "--check", "--from", "nodeA", "--to",
                                  "nodeB", "algy").stdout)
        [problem] = asked["problems"]
        assert problem.startswith("CRIU cannot dump it now at nodeA:"), problem
        assert asked["trial"]["problem"] and "Traceback" not in problem
        assert a.containers.get("algy").status == "running"
        staging = LAB_DIR / "nodeA" / "agent" / "staging"
        assert staging.is_dir() and not list(staging.glob("trial-*")), "the trial's dump stayed"
        # a container CRIU dumps: no problem, and the time it paused
        run_toy(a)
        fine = json.loads(migctl("plan", "--json", "--check", "--from", "nodeA", "--to",
                                 "nodeB", "toytsm").stdout)
        assert fine.get("problems", []) == [] and fine["trial"]["seconds"] > 0
    finally:
        remove_everywhere(lab.docker, ["algy", "toytsm"], ["algvol"])
