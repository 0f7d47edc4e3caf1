"""The ``mf-longseq`` command. Each verb lives in its own module, which provides ``register(subparsers)``:
the parser of the verb, with ``set_defaults(func=...)`` pointing at the function that runs it.
"""
import argparse
import contextlib
import importlib
import sys

# module providing register(subparsers), one per verb family
VERB_MODULES = [
    "mf_longseq.tools.train_cli",
    "mf_longseq.tools.validate",
    "mf_longseq.tools.adopt",
    "mf_longseq.planner.cli",
    "mf_longseq.models.convert",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mf-longseq", description="Long-sequence training with context "
                                     "parallelism for MindFormers (LLaMA2, Qwen, Qwen1.5).")
    sub = parser.add_subparsers(dest="verb", required=True)
    with contextlib.redirect_stdout(sys.stderr):   # import-time logs (MindFormers') keep stdout clean for --json
        for name in VERB_MODULES:
            importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:                     # configuration errors: message only, no traceback
        print(f"mf-longseq {args.verb}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
