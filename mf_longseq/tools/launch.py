"""The msrun launcher behind ``scripts/msrun_launcher.sh``: MindFormers' positional forms and named flags,
environment checks, ``--dry-run``, and a supervised run that names a failed rank.

Positional forms (MindFormers' ``scripts/msrun_launcher.sh``; COMMAND is one quoted string, script first)::

    1 arg   COMMAND                                   8 workers on this node
    2 args  COMMAND WORKER_NUM                        WORKER_NUM workers on this node
    6 args  COMMAND WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
    9 args  COMMAND WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT

Named flags (``--worker-num 64 --local-worker-num 8 --master-addr 10.0.0.1 --node-rank 0 -- train.py ARGS``) say
the same without counting.  Launcher options (``--dry-run``, ``--device``, ``--config``, ``--grace``...) may be
added to either form.  Unlike MindFormers' script, one worker runs (it is not skipped), a failed rank ends the
launch with a non-zero status naming the rank, and ``--dry-run`` prints the msrun command of every node.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from mf_longseq.tools import supervise
from mf_longseq.tools.msrun import msrun_command

GUARD = supervise.GUARD
POSITIONAL_FORMS = {
    1: ("COMMAND",),
    2: ("COMMAND", "WORKER_NUM"),
    6: ("COMMAND", "WORKER_NUM", "MASTER_PORT", "LOG_DIR", "JOIN", "CLUSTER_TIME_OUT"),
    9: ("COMMAND", "WORKER_NUM", "LOCAL_WORKER", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOG_DIR", "JOIN",
        "CLUSTER_TIME_OUT"),
}
USAGE = """usage:
  msrun_launcher.sh "SCRIPT ARGS"                                  8 workers on this node
  msrun_launcher.sh "SCRIPT ARGS" WORKER_NUM                       WORKER_NUM workers on this node
  msrun_launcher.sh "SCRIPT ARGS" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
  msrun_launcher.sh "SCRIPT ARGS" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
  msrun_launcher.sh [--worker-num N] [--local-worker-num N] [--master-addr A] [--master-port P] [--node-rank R]
                    [--log-dir D] [--join True|False] [--cluster-time-out S] -- SCRIPT ARGS
launcher options (either form): --dry-run --device {Ascend,CPU} --config YAML --no-validate --skip-env-check
                                --grace S --timeout S --stall-timeout S --tail N
  --worker-num auto takes the config's device count (and --local-worker-num defaults to min(that, 8)).
  --config YAML (default: the task's own --config) is checked with 'mf-longseq validate' against WORKER_NUM
  devices before anything starts; --dry-run prints the msrun command of every node and starts nothing."""


class UsageError(ValueError):
    """Bad launcher arguments; the message names the argument, the value and the fix."""


@dataclass
class Launch:
    """One launch: the task and msrun's settings (names as msrun spells them)."""

    task: List[str]
    worker_num: int = 8
    local_worker_num: int = 8
    master_addr: str = "127.0.0.1"
    master_port: int = 8118
    node_rank: int = 0
    log_dir: str = "output/msrun_log"
    join: bool = True
    cluster_time_out: int = 7200
    device: str = "Ascend"
    config: Optional[str] = None
    no_validate: bool = False
    dry_run: bool = False
    skip_env_check: bool = False
    grace: float = 10.0
    timeout: float = 0.0
    stall_timeout: float = 0.0
    tail: int = 40
    notes: List[str] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return -(-self.worker_num // self.local_worker_num)

    @property
    def multi_node(self) -> bool:
        return self.local_worker_num != self.worker_num

    def command(self, node_rank: Optional[int] = None) -> List[str]:
        """The exact msrun command of one node (default: this node), in MindFormers' ``--option=value``
        spelling, every rank under the rank guard (``tools/msrun.py``)."""
        node = self.node_rank if node_rank is None else node_rank
        return msrun_command(self.task, worker_num=self.worker_num, local_worker_num=len(self.local_ranks(node)),
                             master_addr=self.master_addr if self.multi_node else None,
                             master_port=self.master_port, node_rank=node if self.multi_node else None,
                             log_dir=self.log_dir, join=self.join, cluster_time_out=self.cluster_time_out,
                             joined=True)

    def local_ranks(self, node_rank: Optional[int] = None) -> List[str]:
        node = self.node_rank if node_rank is None else node_rank
        first = node * self.local_worker_num
        return [str(r) for r in range(first, min(first + self.local_worker_num, self.worker_num))]


# ----------------------------------------------------------------------------------------------- parsing
def _int(name: str, text, low: int = 1) -> int:
    try:
        value = int(str(text))
    except ValueError:
        raise UsageError(f"{name} = {text!r}: not an integer. Fix: give a whole number >= {low}") from None
    if value < low:
        raise UsageError(f"{name} = {value}: must be >= {low}. Fix: give a whole number >= {low}")
    return value


def _bool(name: str, text) -> bool:
    if str(text) in ("True", "true", "1"):
        return True
    if str(text) in ("False", "false", "0"):
        return False
    raise UsageError(f"{name} = {text!r}: not True or False. Fix: write True or False")


def _options_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msrun_launcher.sh", add_help=False, allow_abbrev=False)
    for flag, dest in (("--worker-num", "worker_num"), ("--local-worker-num", "local_worker_num"),
                       ("--master-addr", "master_addr"), ("--master-port", "master_port"),
                       ("--node-rank", "node_rank"), ("--log-dir", "log_dir"), ("--join", "join"),
                       ("--cluster-time-out", "cluster_time_out")):
        p.add_argument(flag, flag.replace("-", "_").replace("__", "--"), dest=dest, default=None)
    p.add_argument("--device", choices=("Ascend", "CPU"), default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--skip-env-check", action="store_true")
    p.add_argument("--no-validate", action="store_true")
    for name in ("--grace", "--timeout", "--stall-timeout"):
        p.add_argument(name, type=float, default=None)
    p.add_argument("--tail", type=int, default=None)
    p.add_argument("-h", "--help", action="store_true")
    return p


def parse_args(argv: Sequence[str]) -> Launch:
    """Read either form. Raises UsageError (message names the argument, the value and the fix)."""
    argv = list(argv)
    task: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, task = argv[:cut], argv[cut + 1:]
    opts, rest = _options_parser().parse_known_args(argv)
    if opts.help:
        raise UsageError(USAGE)
    named = {k: v for k, v in vars(opts).items() if k in Launch.__dataclass_fields__ and v not in (None, False)}
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        raise UsageError(f"option {unknown[0]!r} is not a launcher option. Fix: put the task after '--', "
                         f"or see:\n{USAGE}")
    if task and rest:
        raise UsageError(f"arguments {rest} given both before and after '--'. Fix: use one form\n{USAGE}")
    if task:
        values = {"task": task}
    elif rest:
        values = _positional(rest)
    else:
        raise UsageError(f"no command given. Fix: pass the script and its arguments\n{USAGE}")
    msrun_keys = ("worker_num", "local_worker_num", "master_addr", "master_port", "node_rank", "log_dir", "join",
                  "cluster_time_out")
    clash = [k for k in msrun_keys if k in named and k in values]
    if clash:
        raise UsageError(f"--{clash[0].replace('_', '-')} is also given positionally. Fix: give it once")
    values.update(named)
    return _finish(values)


def _positional(args: Sequence[str]) -> dict:
    if len(args) not in POSITIONAL_FORMS:
        raise UsageError(f"{len(args)} positional arguments {list(args)}: MindFormers' forms take 1, 2, 6 or 9. "
                         f"Fix: use one of\n{USAGE}")
    values = dict(zip(POSITIONAL_FORMS[len(args)], args))
    out = {"task": shlex.split(values["COMMAND"]), "join": "False"}         # MindFormers' default JOIN
    names = {"WORKER_NUM": "worker_num", "LOCAL_WORKER": "local_worker_num", "MASTER_ADDR": "master_addr",
             "MASTER_PORT": "master_port", "NODE_RANK": "node_rank", "LOG_DIR": "log_dir", "JOIN": "join",
             "CLUSTER_TIME_OUT": "cluster_time_out"}
    for key, name in names.items():
        if key in values:
            out[name] = values[key]
    if len(args) == 1:
        out["notes"] = ["no WORKER_NUM given: 8 workers on this node (MindFormers' default)"]
    return out


def _finish(values: dict) -> Launch:
    if not values["task"] or not values["task"][0]:
        raise UsageError(f"COMMAND is empty. Fix: pass the script and its arguments\n{USAGE}")
    launch = Launch(task=values["task"], notes=values.get("notes", []))
    if values.get("worker_num") == "auto":
        values["worker_num"] = _world_size(values.get("config") or _config_in_task(values["task"]))
        values.setdefault("local_worker_num", min(values["worker_num"], 8))
    launch.worker_num = _int("WORKER_NUM (--worker-num)", values.get("worker_num", 8))
    launch.local_worker_num = _int("LOCAL_WORKER (--local-worker-num)",
                                   values.get("local_worker_num", launch.worker_num))
    if launch.local_worker_num > launch.worker_num:
        raise UsageError(f"LOCAL_WORKER (--local-worker-num) = {launch.local_worker_num}: more than WORKER_NUM = "
                         f"{launch.worker_num}. Fix: LOCAL_WORKER is the workers of this node, at most WORKER_NUM")
    launch.master_port = _int("MASTER_PORT (--master-port)", values.get("master_port", 8118), low=1024)
    launch.node_rank = _int("NODE_RANK (--node-rank)", values.get("node_rank", 0), low=0)
    if launch.node_rank >= launch.nodes:
        raise UsageError(f"NODE_RANK (--node-rank) = {launch.node_rank}: only {launch.nodes} nodes "
                         f"({launch.worker_num} workers / {launch.local_worker_num} per node). "
                         f"Fix: use 0..{launch.nodes - 1}")
    if launch.worker_num % launch.local_worker_num:
        launch.notes.append(f"WORKER_NUM {launch.worker_num} is not a multiple of LOCAL_WORKER "
                            f"{launch.local_worker_num}: the last node runs {launch.worker_num % launch.local_worker_num}")
    launch.join = _bool("JOIN (--join)", values.get("join", True))
    if not launch.join:
        launch.notes.append("JOIN=False: msrun returns at once, but this launcher still waits for the ranks so "
                            "that a failed rank is reported")
    launch.cluster_time_out = _int("CLUSTER_TIME_OUT (--cluster-time-out)", values.get("cluster_time_out", 7200))
    for name in ("master_addr", "log_dir", "device", "config", "no_validate", "dry_run", "skip_env_check", "grace",
                 "timeout", "stall_timeout", "tail"):
        if name in values:
            setattr(launch, name, values[name])
    launch.task = absolute_paths(launch.task)
    if launch.config is None:
        launch.config = _config_in_task(launch.task)
    return launch


PATH_FLAGS = ("--config", "--register_path")


def absolute_paths(task: Sequence[str]) -> List[str]:
    """The task with a relative ``--config`` / ``--register_path`` that exists from here made absolute:
    ``run_mindformer.py`` joins relative ones onto its own folder, so the command works from any directory."""
    out = list(task)
    for i, arg in enumerate(out):
        flag, sep, value = arg.partition("=")
        if flag in PATH_FLAGS and sep and value and not os.path.isabs(value) and os.path.exists(value):
            out[i] = f"{flag}={os.path.abspath(value)}"
        elif arg in PATH_FLAGS and i + 1 < len(out):
            value = out[i + 1]
            if not os.path.isabs(value) and os.path.exists(value):
                out[i + 1] = os.path.abspath(value)
    return out


def _world_size(config: Optional[str]) -> int:
    """``--worker-num auto``: the product of the parallel degrees of the config."""
    if not config:
        raise UsageError("--worker-num auto needs a config. Fix: pass --config YAML (or a task with --config)")
    from mf_longseq.config import LongSeqConfig
    try:
        return LongSeqConfig.from_mindformers(config).world_size
    except (OSError, ValueError) as err:
        raise UsageError(f"--worker-num auto: {config} cannot give a device count: {err}") from None


def _config_in_task(task: Sequence[str]) -> Optional[str]:
    """The YAML named by ``--config X`` / ``--config=X`` in the task's arguments, if any."""
    for i, arg in enumerate(task):
        if arg == "--config" and i + 1 < len(task):
            return task[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------------------------- commands
def check_environment(launch: Launch, environ=None, which: Callable = shutil.which,
                      run: Callable = subprocess.run) -> Tuple[List[str], List[str]]:
    """(errors, warnings) about the machine: msrun and python on PATH; on Ascend CANN and npu-smi."""
    environ = os.environ if environ is None else environ
    path = environ.get("PATH", "")
    errors, warnings = [], []
    if not which("msrun", path=path):
        errors.append("msrun not found on PATH: it comes with MindSpore. Fix: activate the Python environment "
                      "where mindspore 2.9 is installed (its bin directory first on PATH)")
    if not which("python", path=path):
        errors.append("python not found on PATH: msrun starts every worker with 'python'. Fix: put the "
                      "environment's bin directory (with mindspore installed) first on PATH")
    if launch.device != "Ascend":
        return errors, warnings
    home = environ.get("ASCEND_HOME_PATH") or environ.get("ASCEND_TOOLKIT_HOME")
    if not home:
        errors.append("CANN is not set up: neither ASCEND_HOME_PATH nor ASCEND_TOOLKIT_HOME is set. Fix: source "
                      "CANN's set_env.sh in this shell, e.g. 'source /usr/local/Ascend/ascend-toolkit/set_env.sh'")
    elif not os.path.isdir(home):
        errors.append(f"ASCEND_HOME_PATH = {home!r} does not exist. Fix: source the set_env.sh of the CANN "
                      "version that is installed")
    smi = which("npu-smi", path=path)
    if not smi:
        errors.append("npu-smi not found on PATH: the Ascend driver is missing or not on PATH. Fix: install the "
                      "NPU driver, or add its directory (usually /usr/local/sbin) to PATH")
        return errors, warnings
    count = _npu_count(smi, run)
    if count is None:
        warnings.append("could not read the NPU count from 'npu-smi info -l'; not checked")
    elif count < len(launch.local_ranks()):
        errors.append(f"LOCAL_WORKER (--local-worker-num) = {len(launch.local_ranks())}: npu-smi sees only "
                      f"{count} NPUs on this node. Fix: lower it to {count} or check ASCEND_RT_VISIBLE_DEVICES")
    return errors, warnings


def _npu_count(smi: str, run: Callable) -> Optional[int]:
    try:
        proc = run([smi, "info", "-l"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"Total Count\s*:\s*(\d+)", proc.stdout or "")
    return int(found.group(1)) if found and proc.returncode == 0 else None


def _validate_config(launch: Launch, out) -> bool:
    if not launch.config or launch.no_validate:
        return True
    from mf_longseq.tools.validate import format_report, validate
    route = "mindformers" if any("run_mindformer" in part for part in launch.task) else "train"
    report = validate(launch.config, devices=launch.worker_num, route=route)
    print(format_report(report), file=out)
    return report.valid


# ----------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None, *, environ=None, out=None) -> int:
    """Entry point of ``scripts/msrun_launcher.sh``. Returns the exit status (0 ok, 1 failed, 2 bad usage)."""
    out = out or sys.stdout
    try:
        launch = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"msrun_launcher: {err}", file=sys.stderr)
        return 2
    for note in launch.notes:
        print(f"msrun_launcher: note: {note}", file=out)
    errors, warnings = ([], []) if launch.skip_env_check else check_environment(launch, environ)
    config_ok = _validate_config(launch, out)
    if launch.dry_run:
        return _dry_run(launch, errors, warnings, config_ok, out)
    for warning in warnings:
        print(f"msrun_launcher: warning: {warning}", file=sys.stderr)
    if errors or not config_ok:
        for error in errors:
            print(f"msrun_launcher: error: {error}", file=sys.stderr)
        return 1
    cmd = launch.command()
    print(f"msrun_launcher: running: {shlex.join(cmd)}", file=out)
    print(f"msrun_launcher: logs: {os.path.abspath(launch.log_dir)}/worker_<rank>.log", file=out, flush=True)
    outcome = supervise.supervise(cmd, log_dir=launch.log_dir, ranks=launch.local_ranks(), env=dict(
        environ if environ is not None else os.environ), grace=launch.grace, timeout=launch.timeout,
        stall_timeout=launch.stall_timeout, tail=launch.tail)
    if outcome.code == 0:
        print(f"msrun_launcher: all {len(launch.local_ranks())} local ranks finished with exit code 0", file=out)
    return outcome.code


def _dry_run(launch: Launch, errors, warnings, config_ok: bool, out) -> int:
    print(f"msrun_launcher: dry run, nothing started: {launch.worker_num} workers on {launch.nodes} node(s) "
          f"({launch.device})", file=out)
    for node in range(launch.nodes):
        here = " (this node)" if node == launch.node_rank else ""
        print(f"# node {node}{here}: ranks {launch.local_ranks(node)[0]}-{launch.local_ranks(node)[-1]}", file=out)
        print(shlex.join(launch.command(node)), file=out)
    for text in errors:
        print(f"msrun_launcher: environment problem (fatal without --dry-run): {text}", file=out)
    for text in warnings:
        print(f"msrun_launcher: warning: {text}", file=out)
    return 0 if config_ok else 1


if __name__ == "__main__":
    sys.exit(main())
