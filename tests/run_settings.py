"""Tests that state a run as one flat set of keys: the parallel ones build a ``LongSeqConfig``, the model's facts
(their home is ``model.model_config``) are checked against it with ``LongSeqConfig.check_model``."""
from mf_longseq.config import LongSeqConfig

# Spellings the tests use for the model facts -> model.model_config keys.
_MODEL_KEYS = {"seq_length": "seq_length", "num_heads": "num_heads", "num_kv_heads": "n_kv_heads",
               "n_kv_heads": "n_kv_heads", "num_layers": "num_layers", "use_flash_attention": "use_flash_attention"}


def checked_settings(**kw):
    """(LongSeqConfig of the parallel keys, the model facts as model.model_config keys), after
    ``check_model``; raises what either raises."""
    model = {_MODEL_KEYS[k]: kw.pop(k) for k in list(kw) if k in _MODEL_KEYS}
    config = LongSeqConfig(**kw)
    config.check_model(model)
    return config, {"n_kv_heads": model.get("num_heads"), **model}
