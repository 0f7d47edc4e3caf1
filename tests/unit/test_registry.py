"""Importing mf_longseq registers the plugin's classes in MindFormers' registry, in a fresh interpreter."""
import subprocess
import sys

CODE = """
import mf_longseq
from mindformers.tools.register import MindFormerModuleType as T, MindFormerRegister as R
names = {"ContextParallelAttention": T.MODULES, "LlamaLongSeqForCausalLM": T.MODELS,
         "Qwen2LongSeqForCausalLM": T.MODELS, "QwenLongSeqForCausalLM": T.MODELS,
         "LlamaLongSeqConfig": T.CONFIG, "Qwen2LongSeqConfig": T.CONFIG, "QwenLongSeqConfig": T.CONFIG,
         "LongSeqTrainer": T.TRAINER, "LongSeqCausalLanguageModelDataset": T.DATASET,
         "LongSeqTrainOneStepCell": T.WRAPPER}
missing = [n for n, t in names.items() if not R.is_exist(t, n)]
print("MISSING", missing)
"""


def test_import_registers_everything(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CODE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MISSING []" in proc.stdout
