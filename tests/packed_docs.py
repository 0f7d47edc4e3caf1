"""Test helper: every array a packed batch needs, from EOD tokens (the library's three functions in a row)."""
from typing import Optional

import numpy as np

from mf_longseq.documents import position_ids_from_actual_seq_len, segment_ids_from_actual_seq_len
from mf_longseq.train.packing import actual_seq_len_from_tokens


def pack_documents(tokens, eod_token_id: int, eod_pad_length: int, use_eod_reset: bool = True,
                   seq_len: Optional[int] = None) -> dict:
    """(S,) or (B, S) tokens -> actual_seq_len (B, eod_pad_length), segment_ids and position_ids (B, S), int64."""
    seq_len = np.shape(tokens)[-1] if seq_len is None else seq_len
    ends = actual_seq_len_from_tokens(tokens, eod_token_id, eod_pad_length)
    return {"actual_seq_len": ends, "segment_ids": segment_ids_from_actual_seq_len(ends, seq_len),
            "position_ids": position_ids_from_actual_seq_len(ends, seq_len, use_eod_reset)}
