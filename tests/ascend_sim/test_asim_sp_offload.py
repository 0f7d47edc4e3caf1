"""Sequence parallelism and layer-input offload through the Ascend front end (cases in ``cases_sp_offload.py``)."""
import pytest

from asim_harness import cases_of, check_case


@pytest.mark.parametrize("sim_case", cases_of("cases_sp_offload"))
def test_sp_and_offload_on_ascend(sim, sim_case):
    record = check_case(sim, sim_case)
    print(record.get("info"))
