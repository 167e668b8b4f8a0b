"""The root filesystem moves with the container: what it wrote outside its volumes (files
added, changed and deleted) is there at the destination before the restore, so a process that
holds a file of its own root filesystem open goes on writing it."""

from __future__ import annotations

import time

import pytest

from migctl.lab.workloads import TOY_IMAGE, ensure_toy_image, numbers, remove_everywhere
from tests.conftest import CACHE, DELTA, LabHandle, migrate_json
from tests.test_faults import running_copies

pytestmark = pytest.mark.lab

# changes a file of the image, deletes another, writes a large file once, then keeps a log
# open in its own root filesystem, as any service writing a log or a pid file does
WRITER = ("sed -i 's/^line 5$/line five/' /lines.txt && rm /bin/vi && "
          "dd if=/dev/urandom of=/big bs=1M count=16 2>/dev/null && "
          "exec 3>>/app.log && i=0 && while true; do echo $i >&3; i=$((i+1)); sleep 0.2; done")
BIG = 16 << 20


def sh(client, name: str, cmd: str):
    return client.containers.get(name).exec_run(["sh", "-c", cmd])


@pytest.fixture
def writer(lab: LabHandle):
    remove_everywhere(lab.docker, ["rootw"], [])
    ensure_toy_image(lab.docker["nodeA"], CACHE)
    lab.docker["nodeA"].containers.run(TOY_IMAGE, ["sh", "-c", WRITER], name="rootw",
                                       detach=True)
    time.sleep(3)
    yield
    remove_everywhere(lab.docker, ["rootw"], [])


def test_root_filesystem_changes_move_with_the_container(lab: LabHandle, writer: None) -> None:
    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    before = numbers(sh(a, "rootw", "cat /app.log").output.decode())
    assert before[:3] == [0, 1, 2]
    report = migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", "rootw")
    assert running_copies(lab, "rootw") == ["nodeB"]

    time.sleep(1)
    log = numbers(sh(b, "rootw", "cat /app.log").output.decode())
    assert log[: len(before)] == before, "earlier lines of the open log were lost"
    assert log == list(range(len(log))), "the log has a gap or a repeat"
    time.sleep(1.5)
    later = numbers(sh(b, "rootw", "cat /app.log").output.decode())
    assert len(later) > len(log), "the process stopped writing its open log"

    assert sh(b, "rootw", "test -e /bin/vi").exit_code == 1, "a file deleted from the image"
    assert "line five" in sh(b, "rootw", "cat /lines.txt").output.decode()
    assert sh(b, "rootw", "wc -c < /big").output.decode().strip() == str(BIG)

    rootfs = [t for t in report["transfers"] if t["kind"] == "root filesystem"]
    final = [t for t in rootfs if t["phase"] == "FINAL_SYNC"]
    assert rootfs and final, report["transfers"]
    assert all(t["bytes"] < BIG // 8 for t in final), f"the large file travelled again: {final}"
