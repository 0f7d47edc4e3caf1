"""Training tokens: a seeded synthetic stream by default, or a token file (.npy, .bin, .mindrecord).

A source hands out *samples* of ``seq_length + 1`` tokens by index.  The batch of one data-parallel rank at one
step is a pure function of (step, dp_id): the same on every CP rank of a dp group (each rank then keeps its
shard), different across dp ranks, and reproducible after a restart without any saved iterator state::

    sample index = (step * dp + dp_id) * batch_size + b          b = 0 .. batch_size - 1

Labels are shifted *globally*, before sharding (``labels[t] = tokens[t + 1]``), so every rank holds the label of
each of its tokens, including the last token of a zigzag chunk whose successor lives on another rank.

Synthetic tokens follow a seeded sparse Markov chain (each token has ``branching`` likely successors, with a
little uniform noise): a model can learn it, so the loss visibly falls from ln(vocab) in a few steps.  With an
``eod_token_id`` they also hold EOD tokens at seeded random places, so packed training (``train/packing.py``) has
documents to separate.
"""
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mf_longseq.train.step_math import shift_labels

DATA_SUFFIXES = (".npy", ".bin", ".mindrecord")


@dataclass(frozen=True)
class Batch:
    """One dp rank's batch of whole sequences (before CP sharding). All arrays are (B, S)."""

    input_ids: np.ndarray      # int32 tokens[:, :-1]
    labels: np.ndarray         # int32 tokens[:, 1:]
    loss_mask: np.ndarray      # float32, 1 where the label counts

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


class SyntheticTokens:
    """Seeded sparse Markov-chain token stream; ``sample(i)`` depends only on (seed, i).

    Args:
        vocab_size: token ids are in [0, vocab_size).
        seq_length: tokens per sample seen by the model; samples hold seq_length + 1 tokens.
        seed: seed of the transition table and of every sample.
        branching: likely successors per token (the learnable structure).
        noise: probability of a uniformly random next token.
        eod_token_id: when set, this id ends a document at random places (seeded by the sample index);
            the Markov chain restarts after it.  None (default): no EOD insertion, the stream of earlier versions.
        mean_document_length: mean tokens per document when ``eod_token_id`` is set (EODs are placed
            independently with probability 1 / mean_document_length per token).
    """

    kind = "synthetic"

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 0, branching: int = 4, noise: float = 0.1,
                 eod_token_id: Optional[int] = None, mean_document_length: int = 256):
        if vocab_size < 2:
            raise ValueError(f"model.model_config.vocab_size = {vocab_size}: synthetic tokens need at least 2 ids. "
                             "Fix: set vocab_size >= 2.")
        if eod_token_id is not None and not 0 <= eod_token_id < vocab_size:
            raise ValueError(f"EOD token id {eod_token_id}: not in the vocabulary [0, {vocab_size}). Fix: set "
                             "train_dataset.data_loader.config.eod (or model.model_config.eos_token_id) below "
                             "vocab_size.")
        if mean_document_length < 1:
            raise ValueError(f"mean_document_length = {mean_document_length}: must be at least 1.")
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        self.branching, self.noise = branching, noise
        self.eod_token_id, self.mean_document_length = eod_token_id, mean_document_length
        table_rng = np.random.default_rng([seed, 0x7AB1E])
        self.successors = table_rng.integers(0, vocab_size, size=(vocab_size, branching))   # (V, K)

    def __len__(self) -> int:
        return 2 ** 62

    def sample(self, index: int) -> np.ndarray:
        """Tokens of sample ``index``: (seq_length + 1,) int64."""
        n = self.seq_length + 1
        rng = np.random.default_rng([self.seed, 1, index])
        choice = rng.integers(0, self.branching, size=n)
        random_tok = rng.integers(0, self.vocab_size, size=n)
        use_noise = rng.random(n) < self.noise
        is_eod = np.zeros(n, dtype=bool)
        if self.eod_token_id is not None:       # own generator: the draws of the EOD-free stream stay
            is_eod = np.random.default_rng([self.seed, 2, index]).random(n) < 1.0 / self.mean_document_length
        out = np.empty(n, dtype=np.int64)
        out[0] = random_tok[0]
        succ = self.successors
        for t in range(1, n):
            if is_eod[t]:
                out[t] = self.eod_token_id
            elif is_eod[t - 1]:
                out[t] = random_tok[t]                                 # a new document starts anywhere
            else:
                out[t] = random_tok[t] if use_noise[t] else succ[out[t - 1], choice[t]]
        return out

    def describe(self) -> dict:
        out = {"kind": self.kind, "vocab_size": self.vocab_size, "seed": self.seed, "branching": self.branching,
               "noise": self.noise}
        if self.eod_token_id is not None:
            out.update(eod_token_id=self.eod_token_id, mean_document_length=self.mean_document_length)
        return out


class ArrayTokens:
    """Samples cut from a token array: rows of a 2-D array (each >= seq_length + 1 tokens), or consecutive
    non-overlapping windows of a 1-D stream (window i = stream[i*S : i*S + S + 1]).

    Sample indices wrap around (epochs repeat in the same order).
    """

    kind = "file"

    def __init__(self, tokens: np.ndarray, seq_length: int, path: str = "<array>"):
        self.path, self.seq_length = path, seq_length
        need = seq_length + 1
        if tokens.ndim == 2 and tokens.shape[1] < need:
            tokens = tokens.reshape(-1)                       # short rows: read them as one stream
        if tokens.ndim == 2:
            self.rows, self.stream = tokens, None
            self.count = tokens.shape[0]
        elif tokens.ndim == 1:
            self.rows, self.stream = None, tokens
            self.count = (tokens.shape[0] - 1) // seq_length
        else:
            raise ValueError(f"--data {path}: expected a 1-D token stream or a 2-D (samples, tokens) array, "
                             f"got shape {tokens.shape}. Fix: save the tokens as a 1-D or 2-D array.")
        if self.count < 1:
            raise ValueError(f"--data {path}: {tokens.size} tokens do not make one sample of seq_length + 1 = "
                             f"{need} tokens. Fix: use more data or a smaller model.model_config.seq_length.")
        if tokens.size and int(tokens.min()) < 0:
            raise ValueError(f"--data {path}: negative token id {int(tokens.min())}. Fix: check --data-dtype.")

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> np.ndarray:
        i = index % self.count
        if self.rows is not None:
            return np.asarray(self.rows[i, :self.seq_length + 1], dtype=np.int64)
        start = i * self.seq_length
        return np.asarray(self.stream[start:start + self.seq_length + 1], dtype=np.int64)

    def max_token(self) -> int:
        data = self.rows if self.rows is not None else self.stream
        return int(data.max())

    def padding_samples(self, pad_token_id: int) -> np.ndarray:
        """Indices of the samples whose every label (tokens 1 .. seq_length) is ``pad_token_id`` (one pass)."""
        s = self.seq_length
        labels = (self.rows[:, 1:s + 1] if self.rows is not None
                  else self.stream[1:self.count * s + 1].reshape(self.count, s))          # (samples, S)
        return np.flatnonzero((np.asarray(labels) == pad_token_id).all(axis=1))

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "samples": self.count}


def read_token_file(path: str, dtype: Optional[str] = None, column: str = "input_ids") -> np.ndarray:
    """Load the tokens of a ``.npy`` (any int array), ``.bin`` (raw ints of ``dtype``) or ``.mindrecord`` file.

    A MindRecord (as MindFormers' data scripts write it) is read row by row from ``column``; the rows come back
    as a 2-D array when they all have one length, else as one concatenated stream.
    """
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file. Fix: give an existing .npy, .bin or .mindrecord file.")
    suffix = os.path.splitext(path)[1]
    if suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if suffix == ".bin":
        return np.memmap(path, dtype=np.dtype(dtype or "uint16"), mode="r")
    if suffix == ".mindrecord" or path.endswith(".mindrecord0"):
        return _read_mindrecord(path, column)
    raise ValueError(f"--data {path}: unknown suffix {suffix!r}. Fix: use one of {', '.join(DATA_SUFFIXES)}.")


def _read_mindrecord(path: str, column: str) -> np.ndarray:
    from mindspore.mindrecord import FileReader
    reader = FileReader(path)
    try:
        rows = []
        for item in reader.get_next():
            if column not in item:
                raise ValueError(f"--data {path}: no column {column!r} (columns: {sorted(item)}). Fix: write the "
                                 f"tokens in a column named {column!r}, as MindFormers' data scripts do.")
            rows.append(np.asarray(item[column]).reshape(-1))
    finally:
        reader.close()
    if not rows:
        raise ValueError(f"--data {path}: the MindRecord file has no rows. Fix: check the file.")
    if len({len(r) for r in rows}) == 1:
        return np.stack(rows)                                              # (samples, tokens)
    return np.concatenate(rows)                                            # one stream


def default_bin_dtype(vocab_size: int) -> str:
    """Raw .bin token files: uint16 when every id fits (vocab <= 65536), else int32."""
    return "uint16" if vocab_size <= 65536 else "int32"


def open_source(path: Optional[str], *, vocab_size: int, seq_length: int, seed: int = 0,
                dtype: Optional[str] = None, eod_token_id: Optional[int] = None,
                pad_token_id: Optional[int] = None):
    """The token source of a run: synthetic when ``path`` is None, else the file, checked before any step: ids
    in [0, vocab_size), no all-padding sample (every label ``pad_token_id``: it would end the run when drawn).

    ``eod_token_id`` (packed training): synthetic samples then contain EOD tokens; a file is read as it is.

    Raises:
        ValueError: naming ``--data``, the id or the sample, and the fix.
    """
    if path is None:
        return SyntheticTokens(vocab_size, seq_length, seed, eod_token_id=eod_token_id)
    tokens = read_token_file(path, dtype or default_bin_dtype(vocab_size))
    source = ArrayTokens(np.asarray(tokens), seq_length, path)
    top = source.max_token()
    if top >= vocab_size:
        raise ValueError(f"--data {path}: token id {top} >= model.model_config.vocab_size = {vocab_size}. "
                         "Fix: use data tokenized for this model (or check --data-dtype for .bin files).")
    empty = source.padding_samples(pad_token_id) if pad_token_id is not None else []
    if len(empty):
        raise ValueError(f"--data {path}: sample {int(empty[0])} ({len(empty)} of {source.count} samples) has no "
                         f"label that counts: every label is model.model_config.pad_token_id = {pad_token_id}. "
                         "Fix: drop all-padding samples from the data (or check pad_token_id).")
    return source


def batch_for_step(source, step: int, *, batch_size: int, dp: int = 1, dp_id: int = 0,
                   pad_token_id: Optional[int] = None) -> Batch:
    """The whole-sequence batch of data-parallel rank ``dp_id`` at ``step`` (shifted labels, loss mask)."""
    first = (step * dp + dp_id) * batch_size
    tokens = np.stack([source.sample(first + b) for b in range(batch_size)])   # (B, S + 1)
    ids, labels, loss_mask = shift_labels(tokens, pad_token_id)                # (B, S) each (train/step_math.py)
    return Batch(ids.astype(np.int32), labels.astype(np.int32), loss_mask)
