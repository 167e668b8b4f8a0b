"""Links shaped as a researcher sets them, checked by what a transfer measures (a ratio to the
set rate), never by reading tc back: the pair is limited both ways, the others are not."""

from __future__ import annotations

import pytest

from migctl.common.errors import MigctlError
from migctl.lab import net as labnet
from migctl.lab.nodes import Lab
from tests.conftest import LabHandle, migctl

pytestmark = pytest.mark.lab

RATE = 40 * 10**6
SIZE = 8 << 20  # 1.7 s at the set rate


@pytest.fixture
def shaped(lab: LabHandle):
    migctl("lab", "link", "--reset")
    yield
    migctl("lab", "link", "--reset")


def test_a_pair_is_shaped_both_ways_and_the_others_are_not(shaped) -> None:
    res = migctl("lab", "link", "nodeA", "nodeB", "--rate", "40mbit")
    assert "nodeA <-> nodeB: rate 40mbit" in res.stdout
    state = Lab().state()
    ab = labnet.measure(state, "nodeA", "nodeB", SIZE)
    ba = labnet.measure(state, "nodeB", "nodeA", SIZE)
    ac = labnet.measure(state, "nodeA", "nodeC", SIZE)
    print(f"[links] set 40 Mbit/s: A->B {ab / 1e6:.1f}, B->A {ba / 1e6:.1f}, "
          f"A->C (unshaped) {ac / 1e6:.1f} Mbit/s")
    for measured in (ab, ba):
        assert 0.6 < measured / RATE < 1.15, f"measured {measured / 1e6:.1f} Mbit/s"
    assert ac > 3 * RATE, "shaping one pair must leave the others untouched"

    migctl("lab", "link", "nodeA", "nodeC", "--rate", "20mbit")  # another pair: A-B stays
    state = Lab().state()
    assert 0.6 < labnet.measure(state, "nodeA", "nodeB", SIZE) / RATE < 1.15
    assert "nodeA <-> nodeC: rate 20mbit" in migctl("lab", "links").stdout

    migctl("lab", "link", "--reset", "nodeA", "nodeB")
    state = Lab().state()
    assert labnet.measure(state, "nodeA", "nodeB", SIZE) > 3 * RATE
    assert "nodeA <-> nodeB" not in migctl("lab", "links").stdout


def test_loss_drops_about_that_share(shaped) -> None:
    migctl("lab", "link", "nodeA", "nodeB", "--loss", "30%")
    state = Lab().state()
    ab, ac = (labnet.delivered(state, "nodeA", n, 400) for n in ("nodeB", "nodeC"))
    print(f"[links] set 30% loss: A->B delivered {ab:.0%}, A->C {ac:.0%}")
    assert 0.55 <= ab <= 0.85, f"{ab:.0%} of datagrams arrived, 70% expected"
    assert ac > 0.98, "loss on one pair must leave the others untouched"


@pytest.mark.parametrize("args,why", [
    (["nodeA", "nodeB", "--rate", "100 mbps"], "tc's units"),
    (["nodeA", "nodeB", "--loss", "150%"], "percentage"),
    (["nodeA", "nodeA", "--rate", "1mbit"], "two different nodes"),
    (["nodeA", "nodeZ", "--rate", "1mbit"], "no lab node 'nodeZ'"),
    (["nodeA", "nodeB"], "at least one of"),
    (["nodeA", "nodeB", "--delay", "10ms"], "netem"),
])
def test_bad_links_get_a_clear_error(shaped, args: list[str], why: str) -> None:
    if why == "netem" and labnet.netem_available("nodeA"):
        pytest.skip("this kernel has netem: delay works")
    res = migctl("lab", "link", *args, check=False)
    assert res.returncode != 0 and why in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_spec_checks_its_fields() -> None:
    assert labnet.LinkSpec(rate="1.5gbit").rate_bps == 1_500_000_000
    assert labnet.LinkSpec(loss="0.1%").loss_fraction == pytest.approx(0.001)
    with pytest.raises(MigctlError, match="--jitter needs --delay"):
        labnet.LinkSpec(rate="1mbit", jitter="2ms")
