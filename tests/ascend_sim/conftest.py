"""The ``ascend_sim`` tier: the Ascend code path run on MindSpore's dry-run (MS_SIMULATION_LEVEL) over the
test-only fake CANN runtime of ``../shared/tools/ascend-sim`` (values meaningless; shapes, dtypes, the ops that
run and MindSpore's own errors are real).

Set-up, once per session: build the tool into a temporary prefix ending in ``cann`` (``build.sh`` writes only
there and into its own mktemp dir; the tool's folder may be read-only), then run each batch of cases in a fresh
process (``asim_worker.py BATCH``) with the environment ``env.sh`` prints for the batch's RANK_SIZE / RANK_ID / level.
Batches run two at a time in the background from the start of the session; each test waits for its batch.

The tool is looked for in ``$MF_LONGSEQ_ASCEND_SIM``, then ``shared/tools/ascend-sim`` beside the clone or one
level higher.  Without it (or without gcc / g++ / nm) every case is skipped, with the reason.
"""
from pathlib import Path

import pytest

from asim_harness import HERE, Simulation, find_tool, skip_reason


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.ascend_sim)


@pytest.fixture(scope="session")
def sim(request, tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    simulation = Simulation(find_tool(), tmp_path_factory.mktemp("ascend_sim"))
    simulation.build()
    wanted = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "sim_case" in params and params["sim_case"][0] not in wanted:
            wanted.append(params["sim_case"][0])
    simulation.start(wanted)
    yield simulation
    simulation.close()
    TIMINGS.update(simulation.timings())


TIMINGS = {}


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line("ascend_sim batches (wall s / worker CPU s): " + ", ".join(
            f"{name} {wall}/{cpu}" for name, (wall, cpu) in TIMINGS.items()))


