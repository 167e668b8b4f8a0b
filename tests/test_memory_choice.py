"""The automatic choice of how the final checkpoint's memory travels (`--memory-transfer
auto`), on the lab: the only lab tests that leave it to the measured link. Each one shapes the
link and sets the destination's threshold (`migagent --page-server-min-mbit`) so that the
link measures far outside the threshold's band, on the side it tests: whatever this machine's
unshaped links measure, each branch is taken. The band's inside is the unit tests' (test_pages).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from migctl.lab import net as labnet
from migctl.lab.nodes import Lab
from tests.conftest import LabHandle, migctl
from tests.test_faults import toy  # noqa: F401 - the fixture
from tests.test_migrate_e2e import check_moved

pytestmark = pytest.mark.lab

RATE_MBIT = 100


@pytest.fixture
def shaped_ab(lab: LabHandle) -> Iterator[None]:
    lab_ctl = Lab()
    state = lab_ctl.state()
    labnet.set_link(state, "nodeA", "nodeB", labnet.LinkSpec(rate=f"{RATE_MBIT}mbit"))
    lab_ctl.save(state)
    yield
    state = lab_ctl.state()
    labnet.reset(state, "nodeA", "nodeB")  # the session's shaping, if any, comes back after
    lab_ctl.save(state)


# thresholds 3x above and below the shaped rate: their bands (+-25 %) stay clear of it
@pytest.mark.parametrize("threshold,want", [(RATE_MBIT * 3, "delta"),
                                            (RATE_MBIT // 3, "page server")])
def test_the_measured_link_chooses_and_the_report_says_why(
        lab: LabHandle, toy: None, shaped_ab: None,  # noqa: F811
        threshold: int, want: str) -> None:
    Lab().restart_agent("nodeB", ["--page-server-min-mbit", str(threshold)])
    res = migctl("migrate", "--json", "--memory-transfer", "auto", "--from", "nodeA",
                 "--to", "nodeB", "toytsm")
    report = json.loads(res.stdout)
    why = next((line for line in res.stderr.splitlines()
                if "final checkpoint's memory:" in line), "")
    assert report["memory_transfer"] == want, why
    measured = re.search(r"the link measured (\d+) Mbit/s", why)
    assert measured, f"the report does not say what was measured: {why!r}"
    assert int(measured.group(1)) <= RATE_MBIT * 1.1, f"the shaped link measured more: {why}"
    band = f"{threshold * 0.75:.0f}-{threshold * 1.25:.0f} Mbit/s"
    assert band in why and ("under" if want == "delta" else "above") in why, why
    if want == "page server":
        # the paused source is killed once the destination runs; it never ran again
        assert lab.docker["nodeA"].containers.get("toytsm").status == "exited"
    check_moved(lab, "nodeA", "nodeB", report)
