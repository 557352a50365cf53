"""Command line: ``ivl-kernels bench | demo | map | train | compose | info``."""

from __future__ import annotations

import sys


def _info(argv) -> int:
    import json

    from ._backends import info

    print(json.dumps(info(), indent=2))
    return 0


BENCHMARKS = {"logits": "bench_guided_logits.py", "loss": "bench_guided_loss.py", "generate": "bench_generate.py"}


def _bench(argv) -> int:
    """``ivl-kernels bench [logits|loss|generate|all] [benchmark args]``: runs the scripts in benchmarks/."""
    import importlib.util
    import os

    which = argv[0] if argv and argv[0] in (*BENCHMARKS, "all") else "logits"
    rest = argv[1:] if argv and argv[0] == which else argv
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if not os.path.isdir(root):
        print(f"benchmarks/ not found next to the package ({root}): run from a source checkout "
              "(pip install -e .)", file=sys.stderr)
        return 2
    status = 0
    for name in (BENCHMARKS if which == "all" else [which]):
        path = os.path.join(root, BENCHMARKS[name])
        spec = importlib.util.spec_from_file_location(f"ivl_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        status |= module.main(rest) or 0
    return status


def _demo(argv) -> int:
    from .hf.demo import main

    return main(argv)


def _map(argv) -> int:
    from ._map_cli import main

    return main(argv)


def _train(argv) -> int:
    from .hf.train_cli import main

    return main(argv)


def _compose(argv) -> int:
    from .hf._compose_cli import main

    return main(argv)


COMMANDS = {
    "bench": (_bench, "side-by-side benchmarks (fused vs unfused vs peers); see `ivl-kernels bench --help`"),
    "demo": (_demo, "train a tiny value network with IVL on CPU and attach it to two base models"),
    "map": (_map, "build a vocabulary map between two tokenizers"),
    "train": (_train, "train a value network against a frozen base (IVL loss, transformers.Trainer)"),
    "compose": (_compose, "write a guided checkpoint (base + guidance terms, no weights copied)"),
    "info": (_info, "versions, devices and which backends this installation can run"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: ivl-kernels {" + ",".join(COMMANDS) + "} [args...]\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:8s} {doc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    fn, _ = COMMANDS[argv[0]]
    return fn(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
