"""Assemble the shards a worker launch saved and compare them with the float64 oracle."""
import os

import numpy as np

from oracle import causal_allowed, reference_attention


def case_errors(case, out_dir):
    """Max abs error of out, dq, dk, dv per dp group, against full attention on that group's inputs."""
    from cases import WORLD
    shards = [dict(np.load(os.path.join(out_dir, case.name, f"rank{r}.npz"))) for r in range(WORLD)]
    errors = {}
    for dp_id in range(case.dp):
        mine = [sh for sh in shards if int(sh["dp_id"]) == dp_id]
        rng = np.random.default_rng(1000 + dp_id)
        b, s, n, kv, d = case.batch, case.seq_len, case.heads, case.kv_heads, case.head_dim
        q, k, v, dout = (rng.standard_normal(shape).astype(np.float32)
                         for shape in ((b, s, n, d), (b, s, kv, d), (b, s, kv, d), (b, s, n, d)))
        pos = np.arange(s)
        out, _, (dq, dk, dv) = reference_attention(q, k, v, causal_allowed(pos, pos, causal=case.causal),
                                                   1.0 / np.sqrt(d), dout)
        positions = np.concatenate([sh["positions"] for sh in mine])
        assert sorted(positions.tolist()) == list(range(s)), "shards do not cover the sequence exactly once"
        for name, ref in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            got = np.concatenate([sh[name] for sh in mine], axis=1)
            errors[(dp_id, name)] = float(np.abs(got - ref[:, positions]).max())
    return errors
