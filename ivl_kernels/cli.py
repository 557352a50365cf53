"""Command line: ``ivl-kernels bench | demo | map | info``."""

from __future__ import annotations

import sys


def _info(argv) -> int:
    import json

    from ._backends import info

    print(json.dumps(info(), indent=2))
    return 0


def _bench(argv) -> int:
    from .bench import main

    return main(argv)


def _demo(argv) -> int:
    from .hf.demo import main

    return main(argv)


def _map(argv) -> int:
    from ._map_cli import main

    return main(argv)


COMMANDS = {
    "bench": (_bench, "side-by-side benchmarks (fused vs unfused vs peers); see `ivl-kernels bench --help`"),
    "demo": (_demo, "train a tiny value network with IVL on CPU and attach it to two base models"),
    "map": (_map, "build a vocabulary map between two tokenizers"),
    "info": (_info, "versions, devices and which backends this installation can run"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: ivl-kernels {bench,demo,map,info} [args...]\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:6s} {doc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    fn, _ = COMMANDS[argv[0]]
    return fn(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
