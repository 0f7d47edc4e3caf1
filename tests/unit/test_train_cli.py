"""``mf-longseq train`` and ``demo`` from the command line, one rank: checkpoints, an exact resume in a new process,
token files, the demo's dry run and the error messages.  Most calls go through ``mf_longseq.cli.main`` in this
process (a fresh interpreter pays ~30 s of imports here); the resume and the shell script run in new processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from train_worker import case_tree  # noqa: E402


def cli(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "mf_longseq.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny_llama2.yaml"
    path.write_text(yaml.safe_dump(case_tree("llama2")))
    return path


def main(args, capsys):
    from mf_longseq.cli import main as cli_main
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_saves_and_a_new_process_resumes_exactly(tmp_path, config, capsys):
    code, out, err = main(["train", "--config", config, "--steps", "6", "--save-every", "3", "--output-dir",
                           tmp_path / "a"], capsys)
    assert code == 0, err[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 6 and "tok/s" in lines[0] and "peak RSS per rank (MiB)" in lines[0]
    assert "\r[" not in out                                          # no progress bar when stdout is not a tty
    full = metrics(tmp_path / "a")
    step3 = tmp_path / "a" / "checkpoints" / "step_000003"
    meta = json.loads((step3 / "meta.json").read_text())
    assert meta["config"] == "config.yaml" and yaml.safe_load((step3 / "config.yaml").read_text())["seed"] == 3

    second = cli(["train", "--steps", "6", "--resume", step3, "--output-dir", tmp_path / "b"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = metrics(tmp_path / "b")
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full[3:]]


def test_train_reads_a_token_file(tmp_path, config, capsys):
    tokens = np.random.default_rng(0).integers(0, 128, size=(3, 65)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    code, out, err = main(["train", "--config", config, "--steps", "1", "--data", tmp_path / "tokens.npy",
                           "--output-dir", tmp_path / "run"], capsys)
    assert code == 0, err[-3000:]
    assert "data file" in out
    assert len(metrics(tmp_path / "run")) == 1


@pytest.mark.parametrize("args, message", [
    (["train", "--steps", "2"], "--config is missing. Fix: pass --config X.yaml"),
    (["train", "--config", "CFG", "--steps", "1", "--data", "nope.npy"], "--data nope.npy: no such file"),
    (["train", "--config", "CFG", "--steps", "2", "--save-every", "1", "--workers", "0"], "--workers 0: need at least"),
    (["train", "--resume", "."], "--resume .: no complete checkpoint"),
])
def test_cli_errors_are_one_line(tmp_path, config, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = main([str(config) if a == "CFG" else a for a in args], capsys)
    assert code == 1
    assert f"mf-longseq train: error: {message}" in err and "raise ValueError" not in err   # no traceback


def test_demo_dry_run_prints_config_and_msrun_command(tmp_path, capsys):
    code, out, err = main(["demo", "--dry-run", "--output-dir", tmp_path / "demo"], capsys)
    assert code == 0, err[-3000:]
    assert "msrun --worker_num 2 --local_worker_num 2" in out and "--steps 20" in out
    tree = yaml.safe_load((tmp_path / "demo" / "demo_config.yaml").read_text())
    assert tree["model"]["model_config"]["seq_length"] == 8192
    assert (tree["parallel_config"]["context_parallel"], tree["parallel_config"]["context_parallel_algo"],
            tree["long_seq"]["layout"]) == (2, "colossalai_cp", "zigzag")


def test_demo_script_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo_cpu.sh"), "--python", sys.executable, "--dry-run",
                           "--output-dir", str(tmp_path / "demo")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("+ ") and "mf_longseq.cli demo --steps 20 --seq-len 8192" in proc.stdout
    assert "msrun --worker_num 2" in proc.stdout
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "demo_cpu.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr


def _packed_tree(pipeline_stage=1):
    tree = case_tree("llama2")
    tree["train_dataset"] = {"data_loader": {"config": {"create_compressed_eod_mask": True, "eod": 3,
                                                        "eod_pad_length": 64}}}
    tree["parallel_config"]["pipeline_stage"] = pipeline_stage
    tree["parallel_config"]["micro_batch_num"] = pipeline_stage
    return tree


def test_train_packs_documents_when_the_yaml_asks(tmp_path, capsys, monkeypatch):
    """create_compressed_eod_mask: True -> synthetic samples hold EOD tokens and the model gets their ends."""
    from mf_longseq.models.decoder import LongSeqForCausalLM
    seen = []
    original = LongSeqForCausalLM.make_batch

    def spy(self, input_ids, labels=None, loss_mask=None, actual_seq_len=None):
        if actual_seq_len is not None:
            seen.append(np.asarray(actual_seq_len.asnumpy() if hasattr(actual_seq_len, "asnumpy")
                                   else actual_seq_len))
        return original(self, input_ids, labels, loss_mask, actual_seq_len)
    monkeypatch.setattr(LongSeqForCausalLM, "make_batch", spy)
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(_packed_tree()))
    code, out, err = main(["train", "--config", path, "--steps", "1", "--output-dir", tmp_path / "run"], capsys)
    assert code == 0, err[-3000:]
    seq_len = case_tree("llama2")["model"]["model_config"]["seq_length"]
    assert seen and all(ends.shape[-1] == 64 for ends in seen)
    assert (seen[0] < seq_len).any()                                   # the sample really holds several documents


def test_packing_with_pipeline_stages_is_accepted():
    """Packed documents with pipeline stages pass validation: each stage gets the micro-batch's document ids
    through its ShardedBatch (tests/unit/test_pipeline_schedule.py checks the losses)."""
    from mf_longseq.train.validation import check_run
    checked = check_run(_packed_tree(pipeline_stage=2), devices=2)
    assert checked.long_seq.pipeline_stage == 2


def _tiny_template_config(tmp_path, seq_length=32):
    """The shipped tiny LLaMA2 template (dataset_dir empty, shuffle on), at a short seq_length."""
    tree = yaml.safe_load((ROOT / "yaml_templates" / "tiny" / "llama2_tiny_s256_cp1_colossalai_cp.yaml").read_text())
    tree["model"]["model_config"]["seq_length"] = seq_length
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_train_dataset_dir_flag_sets_the_yamls_dataset_dir(tmp_path, capsys):
    """--dataset-dir DIR (a directory, as launch_*.sh --train-dataset-dir passes it) is read as dataset_dir."""
    sys.path.insert(0, str(ROOT / "tests"))
    from mf_route import write_tokens
    (tmp_path / "data").mkdir()
    write_tokens(tmp_path / "data" / "d.mindrecord", np.random.default_rng(0).integers(1, 256, (2, 33)))
    config = _tiny_template_config(tmp_path)
    code, out, err = main(["train", "--config", config, "--steps", "1", "--dataset-dir", tmp_path / "data",
                           "--output-dir", tmp_path / "run"], capsys)
    assert code == 0, err[-3000:]
    assert f"data dataset_dir {tmp_path / 'data'}," in out
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["train_dataset"]["data_loader"]["dataset_dir"] == str(tmp_path / "data")
    code, _, err = main(["train", "--config", config, "--data", "x.npy", "--dataset-dir", tmp_path / "data"], capsys)
    assert code == 1 and "two data sources. Fix: pass one of them." in err


def test_train_refuses_dataset_dir_rows_of_seq_length_and_a_missing_input_ids_column(tmp_path, capsys):
    """Rows of seq_length tokens (not seq_length + 1), or no input_ids column: refused by key, one line."""
    sys.path.insert(0, str(ROOT / "tests"))
    from mindspore.mindrecord import FileWriter
    from mf_route import write_tokens
    config = _tiny_template_config(tmp_path)
    short = write_tokens(tmp_path / "short.mindrecord", np.random.default_rng(0).integers(1, 256, (2, 32)))
    code, _, err = main(["train", "--config", config, "--steps", "1", "--dataset-dir", short], capsys)
    assert code == 1 and "raise ValueError" not in err
    assert (f"train_dataset.data_loader.dataset_dir {short}: input_ids of shape (1, 32): MindFormers' pretraining "
            "column must be (batch, model.model_config.seq_length + 1 = 33). Fix: write samples of 33 tokens") in err
    writer = FileWriter(str(tmp_path / "text.mindrecord"), 1, overwrite=True)
    writer.add_schema({"text": {"type": "int32", "shape": [-1]}}, "text")
    writer.write_raw_data([{"text": np.arange(33, dtype=np.int32)}])
    writer.commit()
    code, _, err = main(["train", "--config", config, "--steps", "1", "--dataset-dir", tmp_path / "text.mindrecord"],
                        capsys)
    assert code == 1 and "raise ValueError" not in err and "can not found in schema" not in err
    assert "train_dataset.data_loader.dataset_dir = " in err and "has no input_ids column (columns: ['text'])" in err
