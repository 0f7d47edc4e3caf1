"""What each algorithm hands to HCCL on rank r of CP = N, forward and backward (cases in ``cases_comm.py``)."""
import pytest

from asim_harness import cases_of, check_case


@pytest.mark.parametrize("sim_case", cases_of("cases_comm"))
def test_exchanges(sim, sim_case):
    check_case(sim, sim_case)
