"""Test stand-in for MindFormers' ``run_mindformer.py`` (the 1.9.0 wheel does not ship it).

It handles the arguments the plugin's README, templates and launchers pass exactly as MindFormers' script does:

* ``--config`` and ``--register_path``, when relative, are joined onto the folder of this script (MindFormers'
  ``work_path``), not onto the working directory; ``--register_path`` is exported as ``REGISTER_PATH`` and appended
  to ``sys.path`` (what ``auto_register:`` entries are resolved against);
* ``MindFormerConfig(config)``, then ``--use_parallel``, ``--load_checkpoint``, ``--resume_training``, ``--seed``,
  ``--output_dir``, ``--train_dataset_dir`` (-> ``train_dataset.data_loader.dataset_dir``) and ``--a.b value``
  pairs override it;
* ``set_output_path(output_dir)``, ``build_context(config)``, ``Trainer(config).train()``.

Tests copy it into a temporary "MindFormers checkout" so the joining behaves as on a real one.
"""
import argparse
import os
import sys

from mindformers import MindFormerConfig, Trainer, build_context
from mindformers.utils.file_utils import set_output_path
from mindformers.tools.utils import parse_value, str2bool


def parse(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--register_path", default=None)
    parser.add_argument("--use_parallel", default=None, type=str2bool)
    parser.add_argument("--load_checkpoint", default=None)
    parser.add_argument("--resume_training", default=None, type=str2bool)
    parser.add_argument("--seed", default=None, type=int)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--train_dataset_dir", default=None)
    args, rest = parser.parse_known_args(argv)
    return args, [piece for item in rest for piece in item.split("=")]


def main(argv=None) -> None:
    work_path = os.path.dirname(os.path.abspath(__file__))
    args, rest = parse(argv)
    if not os.path.isabs(args.config):
        args.config = os.path.join(work_path, args.config)
    if args.register_path is not None:
        if not os.path.isabs(args.register_path):
            args.register_path = os.path.join(work_path, args.register_path)
        os.environ["REGISTER_PATH"] = args.register_path
        if args.register_path not in sys.path:
            sys.path.append(args.register_path)
    config = MindFormerConfig(args.config)
    for key in ("use_parallel", "load_checkpoint", "resume_training", "seed", "output_dir"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.train_dataset_dir:
        config.train_dataset.data_loader.dataset_dir = args.train_dataset_dir
    while rest:
        key, value = rest.pop(0), rest.pop(0)
        *parents, last = key[2:].split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = parse_value(value)
    set_output_path(config.output_dir)
    build_context(config)
    Trainer(config).train()


if __name__ == "__main__":
    main()
