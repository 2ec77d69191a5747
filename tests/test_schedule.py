from fastdd.distill import loops_for_ipc
from fastdd.distill.dc import LOOPS_BY_IPC


def test_reference_table_is_kept():
    for ipc, loops in LOOPS_BY_IPC.items():
        assert loops_for_ipc(ipc) == loops


def test_rule_between_and_beyond_the_table():
    assert loops_for_ipc(2) == (2, 6)
    assert loops_for_ipc(5) == (5, round(1 + 4 * 49 / 9))
    assert loops_for_ipc(25) == (25, 20)
    assert loops_for_ipc(100) == (50, 5)
    assert loops_for_ipc(1000) == (50, 1)
