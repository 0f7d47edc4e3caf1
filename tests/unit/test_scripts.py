"""The launch scripts, run for real with a fake ``msrun`` (and ``npu-smi``) first on PATH.

The fake msrun records the arguments it got, then behaves like msrun in one of several ways chosen by
FAKE_MSRUN_MODE: ``join`` (start the ranks, wait, kill the rest when one fails, exit 1 - msrun's own
behaviour), ``hang`` (start the ranks and never exit), ``detach`` (start the ranks and exit 0 at once, as msrun
with --join False), ``fail_early`` (exit 1 before starting anything).  The ranks it starts run the real
``rank_guard.py`` with a tiny task, so the supervisor is exercised end to end in seconds.
"""
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mf_longseq.tools import launch as L

ROOT = Path(__file__).resolve().parents[2]
HUNG = 600          # seconds a blocked fake rank sleeps: a launch that ends well before it did not wait for it
LAUNCHER = ROOT / "scripts" / "msrun_launcher.sh"

FAKE_MSRUN = textwrap.dedent("""\
    #!{python}
    import json, os, signal, subprocess, sys, time
    args = sys.argv[1:]
    with open(os.environ["FAKE_MSRUN_RECORD"], "a") as rec:
        rec.write(json.dumps({{"argv": args, "pythonpath": os.environ.get("PYTHONPATH", "")}}) + "\\n")
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    task = [a for a in args if not a.startswith("--")]
    task = args[args.index(task[0]):]
    mode = os.environ.get("FAKE_MSRUN_MODE", "join")
    log_dir = opts["log_dir"]
    os.makedirs(log_dir, exist_ok=True)
    if mode == "fail_early":
        open(os.path.join(log_dir, "scheduler.log"), "w").write("scheduler: port in use\\n")
        sys.exit(1)
    total, local = int(opts["worker_num"]), int(opts["local_worker_num"])
    first = int(opts.get("node_rank", 0)) * local
    procs = []
    for rank in range(first, first + local):
        env = dict(os.environ, RANK_ID=str(rank), MS_ROLE="MS_WORKER")
        log = open(os.path.join(log_dir, "worker_%d.log" % rank), "w")
        procs.append(subprocess.Popen([sys.executable] + task, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    if mode == "detach":
        sys.exit(0)
    if mode == "hang":
        while True:
            time.sleep(1)
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            sys.exit(1)
        if all(c == 0 for c in codes):
            sys.exit(0)
        time.sleep(0.2)
    """)

TASK = textwrap.dedent("""\
    import os, sys, time
    rank = int(os.environ["RANK_ID"])
    mode = sys.argv[1]
    print("task: rank %d args %s" % (rank, sys.argv[1:]), flush=True)
    open(os.path.join(os.environ["TASK_MARK_DIR"], "ran_%d" % rank), "w").write(str(os.getpid()))
    if mode.startswith("fail:") and rank == int(mode[5:]):
        print("task: rank %d raises now" % rank, flush=True)
        raise SystemExit(3)
    if mode.startswith("fail:"):
        time.sleep(600)                        # a peer blocked in a collective that will never complete (HUNG)
    """)


@pytest.fixture
def fake(tmp_path):
    """A bin dir with the fake msrun (and python) first on PATH; returns a helper to run the launcher."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "msrun").write_text(FAKE_MSRUN.format(python=sys.executable))
    (bin_dir / "msrun").chmod(0o755)
    # A wrapper, not a symlink: a venv's interpreter finds its site-packages only when started by its own path.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "task.py").write_text(TASK)
    (tmp_path / "marks").mkdir()
    record = tmp_path / "record.jsonl"

    def run(args, mode="join", extra_env=None, timeout=400):
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", FAKE_MSRUN_RECORD=str(record),
                   FAKE_MSRUN_MODE=mode, TASK_MARK_DIR=str(tmp_path / "marks"))
        env.pop("ASCEND_HOME_PATH", None)
        env.pop("ASCEND_TOOLKIT_HOME", None)
        env.update(extra_env or {})
        start = time.time()
        proc = subprocess.run(["bash", str(LAUNCHER), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)
        proc.elapsed = time.time() - start
        proc.calls = [json.loads(ln) for ln in record.read_text().splitlines()] if record.exists() else []
        return proc

    run.tmp = tmp_path
    run.task = str(tmp_path / "task.py")
    return run


def _guard_tail(log_dir, task_args):
    return [L.GUARD, "--status-dir", os.path.join(log_dir, "mf_longseq_status"), *task_args]


# ----------------------------------------------------------------------------------------------- MindFormers' forms
@pytest.mark.parametrize("form, expected", [
    (["TASK ok"], ["--worker_num=8", "--local_worker_num=8", "--master_port=8118", "--log_dir=output/msrun_log",
                   "--join=False", "--cluster_time_out=7200"]),
    (["TASK ok", "2"], ["--worker_num=2", "--local_worker_num=2", "--master_port=8118",
                        "--log_dir=output/msrun_log", "--join=False", "--cluster_time_out=7200"]),
    (["TASK ok", "2", "8123", "logs", "True", "300"],
     ["--worker_num=2", "--local_worker_num=2", "--master_port=8123", "--log_dir=logs", "--join=True",
      "--cluster_time_out=300"]),
    (["TASK ok", "4", "2", "10.1.1.1", "8124", "1", "logs", "True", "300"],
     ["--worker_num=4", "--local_worker_num=2", "--master_addr=10.1.1.1", "--master_port=8124", "--node_rank=1",
      "--log_dir=logs", "--join=True", "--cluster_time_out=300"]),
    (["TASK ok", "2", "2", "10.1.1.1", "8124", "0", "logs", "True", "300"],       # 9 args, one node: single node
     ["--worker_num=2", "--local_worker_num=2", "--master_port=8124", "--log_dir=logs", "--join=True",
      "--cluster_time_out=300"]),
])
def test_positional_forms_give_mindformers_msrun_arguments(fake, form, expected):
    form = [form[0].replace("TASK", fake.task), *form[1:]]
    proc = fake(["--device", "CPU", "--grace", "2", *form], mode="join")
    assert proc.returncode == 0, proc.stderr
    (call,) = proc.calls
    log_dir = dict(a[2:].split("=", 1) for a in expected)["log_dir"]
    assert call["argv"] == expected + _guard_tail(log_dir, [fake.task, "ok"])
    assert str(ROOT) in call["pythonpath"].split(os.pathsep)
    workers = int(form[2]) if len(form) == 9 else (int(form[1]) if len(form) > 1 else 8)
    first = int(form[5]) * workers if len(form) == 9 else 0
    assert sorted(os.listdir(fake.tmp / "marks")) == sorted(f"ran_{r}" for r in range(first, first + workers))


def test_named_flags_equal_the_nine_argument_form(fake):
    named = L.parse_args(["--worker-num", "16", "--local-worker-num", "8", "--master-addr", "10.0.0.2",
                          "--master-port", "9000", "--node-rank", "1", "--log-dir", "d", "--join", "True",
                          "--cluster-time-out", "60", "--", "train.py", "--config", "x.yaml"])
    positional = L.parse_args(["train.py --config x.yaml", "16", "8", "10.0.0.2", "9000", "1", "d", "True", "60"])
    assert named.command() == positional.command()
    assert named.local_ranks() == [str(r) for r in range(8, 16)]
    assert named.config == "x.yaml"                                 # the task's --config is validated


def test_one_worker_runs_and_is_not_skipped(fake):
    proc = fake(["--device", "CPU", f"{fake.task} ok", "1"])
    assert proc.returncode == 0, proc.stderr
    assert proc.calls[0]["argv"][:2] == ["--worker_num=1", "--local_worker_num=1"]
    assert os.listdir(fake.tmp / "marks") == ["ran_0"]
    assert "all 1 local ranks finished with exit code 0" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["a.py", "2", "3"], "3 positional arguments ['a.py', '2', '3']: MindFormers' forms take 1, 2, 6 or 9"),
    (["a.py", "two"], "WORKER_NUM (--worker-num) = 'two': not an integer"),
    (["a.py", "0"], "WORKER_NUM (--worker-num) = 0: must be >= 1"),
    (["--worker-num", "2", "--local-worker-num", "4", "--", "a.py"],
     "LOCAL_WORKER (--local-worker-num) = 4: more than WORKER_NUM = 2"),
    (["--worker-num", "16", "--local-worker-num", "8", "--node-rank", "2", "--", "a.py"],
     "NODE_RANK (--node-rank) = 2: only 2 nodes"),
    (["a.py", "2", "8118", "logs", "maybe", "60"], "JOIN (--join) = 'maybe': not True or False"),
    (["--bogus", "--", "a.py"], "option '--bogus' is not a launcher option"),
    ([], "no command given"),
])
def test_bad_arguments_exit_2_naming_the_argument(fake, args, message):
    proc = fake(args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Fix:" in proc.stderr
    assert proc.calls == []


# ----------------------------------------------------------------------------------------------- dry run
def test_dry_run_prints_every_node_command_and_starts_nothing(fake):
    proc = fake(["--dry-run", "--device", "CPU", "--worker-num", "16", "--local-worker-num", "8",
                 "--master-addr", "10.0.0.9", "--", "train.py", "--steps", "3"])
    assert proc.returncode == 0 and proc.calls == []
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("msrun ")]
    assert len(lines) == 2
    for node, line in enumerate(lines):
        launch = L.parse_args(["--worker-num", "16", "--local-worker-num", "8", "--master-addr", "10.0.0.9",
                               "--node-rank", str(node), "--", "train.py", "--steps", "3"])
        assert shlex.split(line) == launch.command()
        assert f"--node_rank={node}" in line


def test_dry_run_validates_the_config_for_the_device_count(fake):
    data = {"parallel_config": {"data_parallel": 2, "context_parallel": 4, "pipeline_stage": 1},   # MF requires it
            "model": {"model_config": {"seq_length": 4096, "num_heads": 8}}}
    (fake.tmp / "run.yaml").write_text(yaml.safe_dump(data))
    ok = fake(["--dry-run", "--device", "CPU", "--worker-num", "8", "--", "train.py", "--config", "run.yaml"])
    assert ok.returncode == 0 and "run.yaml: OK" in ok.stdout
    bad = fake(["--dry-run", "--device", "CPU", "--worker-num", "16", "--", "train.py", "--config", "run.yaml"])
    assert bad.returncode == 1
    assert "long_seq.device_num = 16: device_num must equal" in bad.stdout and "= 8. Fix:" in bad.stdout
    auto = fake(["--dry-run", "--device", "CPU", "--worker-num", "auto", "--config", "run.yaml", "--", "train.py"])
    assert auto.returncode == 0 and "--worker_num=8" in auto.stdout


# ----------------------------------------------------------------------------------------------- Ascend checks
def _fake_npu_smi(tmp, count):
    path = tmp / "bin" / "npu-smi"
    path.write_text(f"#!/bin/sh\necho 'Total Count                    : {count}'\n")
    path.chmod(0o755)


def test_ascend_without_cann_or_npu_smi_fails_with_the_fix(fake):
    proc = fake([f"{fake.task} ok", "2"])
    assert proc.returncode == 1 and proc.calls == []
    assert "neither ASCEND_HOME_PATH nor ASCEND_TOOLKIT_HOME is set" in proc.stderr
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in proc.stderr
    assert "npu-smi not found on PATH" in proc.stderr


def test_ascend_checks_npu_count_then_runs(fake):
    cann = fake.tmp / "cann"
    cann.mkdir()
    _fake_npu_smi(fake.tmp, 1)
    few = fake([f"{fake.task} ok", "2"], extra_env={"ASCEND_HOME_PATH": str(cann)})
    assert few.returncode == 1 and "npu-smi sees only 1 NPUs on this node" in few.stderr and few.calls == []
    _fake_npu_smi(fake.tmp, 8)
    ok = fake([f"{fake.task} ok", "2"], extra_env={"ASCEND_TOOLKIT_HOME": str(cann)})
    assert ok.returncode == 0, ok.stderr
    assert len(ok.calls) == 1


def test_check_environment_without_msrun():
    launch = L.parse_args(["--device", "CPU", "--", "a.py"])
    errors, _ = L.check_environment(launch, environ={"PATH": "/nonexistent"})
    assert any("msrun not found on PATH" in e for e in errors)
    assert any("python not found on PATH" in e for e in errors)


# ----------------------------------------------------------------------------------------------- failures
def _no_task_left(tmp):
    pids = [int((tmp / "marks" / name).read_text()) for name in os.listdir(tmp / "marks")]
    time.sleep(0.3)
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}") and
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]


@pytest.mark.parametrize("mode", ["join", "hang", "detach"])
def test_failed_rank_ends_the_launch_naming_it(fake, mode):
    """rank 1 exits 3 while rank 0 blocks; whatever msrun does, the launch exits 1 in bounded time."""
    proc = fake(["--device", "CPU", "--grace", "2", "--tail", "5", "--log-dir", "logs", "--worker-num", "2", "--",
                 fake.task, "fail:1"], mode=mode)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rank 1 exited with code 3" in proc.stderr
    assert "failed rank: 1" in proc.stderr
    assert "task: rank 1 raises now" in proc.stderr                # the tail of its log
    assert proc.elapsed < HUNG / 2             # did not wait for the blocked rank (or a hung msrun) to end
    assert _no_task_left(fake.tmp) == []


def test_msrun_hanging_after_success_still_returns_0(fake):
    proc = fake(["--device", "CPU", "--grace", "1", "--worker-num", "2", "--", fake.task, "ok"], mode="hang")
    assert proc.returncode == 0, proc.stderr
    assert proc.elapsed < HUNG / 2


def test_msrun_failing_before_the_ranks_start(fake):
    proc = fake(["--device", "CPU", "--grace", "1", "--log-dir", "logs", "--worker-num", "2", "--", fake.task, "ok"],
                mode="fail_early")
    assert proc.returncode == 1
    assert "msrun exited with code 1; ranks 0, 1 never started" in proc.stderr
    assert "scheduler: port in use" in proc.stderr


def test_timeout_ends_a_launch_that_never_finishes(fake):
    proc = fake(["--device", "CPU", "--grace", "1", "--timeout", "3", "--worker-num", "2", "--", fake.task, "fail:9"])
    assert proc.returncode == 1 and "ran past --timeout 3 s" in proc.stderr
    assert _no_task_left(fake.tmp) == []


# ----------------------------------------------------------------------------------------------- per-model scripts
@pytest.mark.parametrize("family", ["llama2", "qwen", "qwen1_5"])
def test_model_scripts_find_their_template_at_run_time(fake, family):
    templates = fake.tmp / "templates" / family
    templates.mkdir(parents=True)
    data = {"parallel_config": {"data_parallel": 1, "context_parallel": 8, "context_parallel_algo": "colossalai_cp",
                                "pipeline_stage": 1},                   # MindFormers' build_parallel_config reads it
            "model": {"model_config": {"seq_length": 32768, "num_heads": 32}}}
    (templates / "7b_32k_cp8_colossalai_cp.yaml").write_text(yaml.safe_dump(data))
    env = {"MF_LONGSEQ_TEMPLATES": str(fake.tmp / "templates")}
    script = ROOT / "scripts" / f"launch_{family}.sh"
    base = dict(os.environ, PATH=f"{fake.tmp / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", **env)
    run = lambda *a: subprocess.run(["bash", str(script), *a], cwd=fake.tmp, env=base, capture_output=True, text=True)
    ok = run("--size", "7b", "--cp", "8", "--dry-run", "--device", "CPU", "--route", "train", "--steps", "2")
    assert ok.returncode == 0, ok.stderr
    (line,) = [ln for ln in ok.stdout.splitlines() if ln.startswith("msrun ")]
    assert "--worker_num=8" in line and "--local_worker_num=8" in line
    assert line.endswith(f"python -m mf_longseq.cli train --config {templates / '7b_32k_cp8_colossalai_cp.yaml'} "
                         "--steps 2")
    missing = run("--size", "13b", "--dry-run")
    assert missing.returncode == 1 and "0 templates match" in missing.stderr
    assert "7b_32k_cp8_colossalai_cp.yaml" in missing.stderr             # the available ones are listed


def test_model_script_runs_run_mindformer_with_the_plugin_registered(fake):
    """--mindformers DIR: every rank runs DIR/run_mindformer.py with --register_path at the plugin, dry-run prints it."""
    checkout = fake.tmp / "mindformers_checkout"
    checkout.mkdir()
    (checkout / "run_mindformer.py").write_text("# stand-in\n")
    template = ROOT / "yaml_templates" / "llama2" / "7b_32k_cp2_colossalai_cp.yaml"
    base = dict(os.environ, PATH=f"{fake.tmp / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    run = lambda *a: subprocess.run(["bash", str(ROOT / "scripts" / "launch_llama2.sh"), *a], cwd=fake.tmp, env=base,
                                    capture_output=True, text=True)
    ok = run("--template", str(template), "--mindformers", str(checkout), "--train-dataset-dir", "/data/wiki.mindrecord",
             "--dry-run", "--device", "CPU")
    assert ok.returncode == 0, ok.stderr
    (line,) = [ln for ln in ok.stdout.splitlines() if ln.startswith("msrun ")]
    assert line.endswith(f"python {checkout / 'run_mindformer.py'} --config {template} --register_path "
                         f"{ROOT / 'mf_longseq'} --use_parallel True --train_dataset_dir /data/wiki.mindrecord"), line
    no_entry = run("--template", str(template), "--mindformers", str(fake.tmp), "--dry-run")
    assert no_entry.returncode == 2 and "has no run_mindformer.py" in no_entry.stderr
    steps = run("--template", str(template), "--mindformers", str(checkout), "--steps", "3", "--dry-run")
    assert steps.returncode == 2 and "--steps is a 'mf-longseq train' flag" in steps.stderr


def test_model_script_train_route_hands_the_dataset_dir_to_mf_longseq_train(fake):
    """--route train: --train-dataset-dir DIR becomes 'mf-longseq train --dataset-dir DIR' (the YAML's
    dataset_dir, as on the MindFormers route), and --dry-run shows it."""
    template = ROOT / "yaml_templates" / "llama2" / "7b_32k_cp2_colossalai_cp.yaml"
    base = dict(os.environ, PATH=f"{fake.tmp / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    ok = subprocess.run(["bash", str(ROOT / "scripts" / "launch_llama2.sh"), "--template", str(template), "--route",
                         "train", "--steps", "3", "--train-dataset-dir", "/data/wiki", "--dry-run", "--device", "CPU"],
                        cwd=fake.tmp,
                        env=base, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (line,) = [ln for ln in ok.stdout.splitlines() if ln.startswith("msrun ")]
    assert line.endswith(f"python -m mf_longseq.cli train --config {template} --steps 3 --dataset-dir /data/wiki")


@pytest.mark.parametrize("family", ["llama2", "qwen", "qwen1_5"])
def test_model_scripts_help_prints_usage_and_exits_0(family):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / f"launch_{family}.sh"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: bash scripts/launch_{family}.sh") and "templates match" not in proc.stderr
    for flag in ("--size", "--template", "--steps", "--mindformers", "--route", "--train-dataset-dir", "--dry-run",
                 "Examples:"):
        assert flag in proc.stdout, flag
    assert "--dataset-dir PATH" in proc.stdout and "--train_dataset_dir PATH" in proc.stdout    # the two routes


def test_model_script_default_route_is_run_mindformer_with_absolute_paths(fake):
    """Issue 22: the default route is the README's (run_mindformer.py, which needs --mindformers), and a relative
    --template / --mindformers / --train-dataset-dir given from any directory reaches the ranks absolute
    (run_mindformer.py would join a relative --config onto its own folder)."""
    checkout = fake.tmp / "mf" / "mindformers_checkout"
    checkout.mkdir(parents=True)
    (checkout / "run_mindformer.py").write_text("# stand-in\n")
    base = dict(os.environ, PATH=f"{fake.tmp / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    run = lambda cwd, *a: subprocess.run(["bash", str(ROOT / "scripts" / "launch_llama2.sh"), *a], cwd=cwd, env=base,
                                         capture_output=True, text=True)
    template = ROOT / "yaml_templates" / "llama2" / "7b_32k_cp2_colossalai_cp.yaml"
    for cwd in (ROOT, ROOT / "docs"):
        rel = os.path.relpath(template, cwd)
        ok = run(cwd, "--template", rel, "--mindformers", os.path.relpath(checkout, cwd), "--train-dataset-dir",
                 "data/wiki.mindrecord", "--dry-run", "--device", "CPU")
        assert ok.returncode == 0, ok.stderr
        (line,) = [ln for ln in ok.stdout.splitlines() if ln.startswith("msrun ")]
        assert line.endswith(f"python {checkout / 'run_mindformer.py'} --config {template} --register_path "
                             f"{ROOT / 'mf_longseq'} --use_parallel True --train_dataset_dir "
                             f"{cwd / 'data' / 'wiki.mindrecord'}"), line
    missing = run(fake.tmp, "--template", str(template), "--dry-run", "--device", "CPU")
    assert missing.returncode == 2 and "needs --mindformers DIR" in missing.stderr and "--route train" in missing.stderr
    both = run(fake.tmp, "--template", str(template), "--route", "train", "--mindformers", str(checkout), "--dry-run")
    assert both.returncode == 2 and "drop one of them" in both.stderr


def test_launcher_makes_a_relative_task_config_absolute(tmp_path, monkeypatch):
    """Issue 22: run_mindformer.py joins a relative --config onto its own folder; the launcher hands the ranks an
    absolute one (both spellings), and leaves a path it cannot find as it is (the task reports it)."""
    from mf_longseq.tools.launch import parse_args
    (tmp_path / "run.yaml").write_text("x: 1\n")
    (tmp_path / "pkg").mkdir()
    monkeypatch.chdir(tmp_path)
    launch = parse_args(["--worker-num", "2", "--no-validate", "--", "python", "/mf/run_mindformer.py", "--config",
                         "run.yaml", "--register_path=pkg", "--train_dataset_dir", "data"])
    assert launch.task == ["python", "/mf/run_mindformer.py", "--config", str(tmp_path / "run.yaml"),
                           f"--register_path={tmp_path / 'pkg'}", "--train_dataset_dir", "data"]
    assert launch.config == str(tmp_path / "run.yaml")
    missing = parse_args(["--worker-num", "2", "--no-validate", "--", "python", "x.py", "--config", "nope.yaml"])
    assert missing.task[-1] == "nope.yaml"
