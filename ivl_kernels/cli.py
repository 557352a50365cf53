"""Command line: ``ivl-kernels bench | demo | map | train | compose | info``."""

from __future__ import annotations

import sys


def _info(argv) -> int:
    import json

    from ._backends import info

    print(json.dumps(info(), indent=2))
    return 0


BENCHMARKS = {"logits": "bench_guided_logits.py", "loss": "bench_guided_loss.py", "generate": "bench_generate.py"}


BENCH_USAGE = """usage: ivl-kernels bench [logits|loss|generate|all] [--out DIR] [--overwrite] [benchmark args]

Runs the side-by-side benchmarks of benchmarks/ (a source checkout). Results (CSV, plots) go to DIR (default: the
current directory), never into the package; an existing result of the same name is not replaced without
--overwrite (this run's results are then kept in a new DIR/bench-<time>/ instead). `ivl-kernels bench logits
--help` lists a benchmark's own arguments."""


def _split_bench_args(rest):
    """``(out, overwrite, device, rest)``: the options ``bench`` itself handles, taken out of ``rest``."""
    out, overwrite, device, keep = None, False, None, []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("--out", "--device") and i + 1 < len(rest):
            if a == "--out":
                out = rest[i + 1]
            else:
                device = rest[i + 1]
                keep += rest[i:i + 2]
            i += 2
            continue
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif a == "--overwrite":
            overwrite = True
        else:
            if a.startswith("--device="):
                device = a.split("=", 1)[1]
            keep.append(a)
        i += 1
    return out, overwrite, device, keep


def _load_benchmark(root: str, name: str):
    """The module of benchmark ``name`` (its ``main(argv)`` takes ``--out DIR``)."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(f"ivl_bench_{name}", os.path.join(root, BENCHMARKS[name]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(argv) -> int:
    """``ivl-kernels bench [logits|loss|generate|all] [--out DIR] [--overwrite] [benchmark args]``: runs the scripts
    in benchmarks/, each into a temporary directory inside DIR whose files are moved into DIR when it finishes."""
    import os
    import shutil
    import tempfile
    import time

    from ._atomic import commit_dir, is_within

    which = argv[0] if argv and argv[0] in (*BENCHMARKS, "all") else "logits"
    rest = argv[1:] if argv and argv[0] == which else argv
    if rest and rest[0] in ("-h", "--help") and not (argv and argv[0] in BENCHMARKS):
        print(BENCH_USAGE)
        return 0
    out, overwrite, device, rest = _split_bench_args(rest)
    out = os.path.abspath(out if out is not None else os.getcwd())
    package = os.path.dirname(os.path.abspath(__file__))
    root = os.path.join(os.path.dirname(package), "benchmarks")
    try:
        if is_within(out, package):
            raise ValueError(f"--out {out}: inside the installed package ({package}); choose a results directory")
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out}: exists and is not a directory")
        if not os.path.isdir(os.path.dirname(out)):
            raise FileNotFoundError(f"--out {out}: its parent directory does not exist")
        if device is not None and device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} "
                                 f"(CUDA {torch.version.cuda or 'not built'}); use --device cpu")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"benchmarks/ not found next to the package ({root}): run from a source "
                                    f"checkout (pip install -e .)")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:  # read-only, no permission, a link to nothing
            raise ValueError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    except (ValueError, FileNotFoundError) as e:
        print(f"ivl-kernels bench: error: {e}", file=sys.stderr)
        return 2
    status = 0
    for name in (BENCHMARKS if which == "all" else [which]):
        module = _load_benchmark(root, name)
        try:
            tmp = tempfile.mkdtemp(prefix=f".bench-{name}.tmp-", dir=out)
        except OSError as e:  # nothing run yet: a clear error, not a traceback
            print(f"ivl-kernels bench: error: --out {out}: cannot write there ({e.strerror or e})", file=sys.stderr)
            return 2 | status
        try:
            status |= module.main(rest + ["--out", tmp]) or 0
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves no partial results
            raise
        clash = sorted(n for n in os.listdir(tmp) if os.path.lexists(os.path.join(out, n)))
        if clash and not overwrite:
            kept = os.path.join(out, time.strftime(f"bench-{name}-%Y%m%d-%H%M%S"))
            os.rename(tmp, kept)
            print(f"ivl-kernels bench: refusing to overwrite {', '.join(clash)} in {out} (pass --overwrite to "
                  f"replace them); this run's results are in {kept}", file=sys.stderr)
            status |= 2
        elif os.listdir(tmp):
            names = sorted(os.listdir(tmp))
            try:
                commit_dir(tmp, out)  # every conflict (a directory named like a result) is found before a move
            except (ValueError, OSError) as e:
                kept = os.path.join(out, time.strftime(f"bench-{name}-%Y%m%d-%H%M%S"))
                os.rename(tmp, kept)
                print(f"ivl-kernels bench: error: {e}; this run's results are in {kept}", file=sys.stderr)
                status |= 2
                continue
            print(f"ivl-kernels bench: results in {out}: {', '.join(names)}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


def _run_module(name: str, module: str, extra: str, argv) -> int:
    """Subcommand ``name``: ``module``'s ``main(argv)``. A module that needs an optional extra which is missing
    gives one line naming the extra (exit 2), ``--help`` included, instead of a traceback."""
    import importlib

    try:
        main = importlib.import_module(module, __package__).main
    except ImportError as e:
        print(f"ivl-kernels {name}: error: {e}; install what it needs with: pip install 'ivl-kernels[{extra}]'",
              file=sys.stderr)
        return 2
    return main(argv)


def _demo(argv) -> int:
    return _run_module("demo", ".hf.demo", "hf", argv)


def _map(argv) -> int:
    from ._map_cli import main

    return main(argv)


def _train(argv) -> int:
    return _run_module("train", ".hf.train_cli", "train", argv)


def _compose(argv) -> int:
    return _run_module("compose", ".hf._compose_cli", "hf", argv)


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


def entry() -> None:
    """The ``ivl-kernels`` console script and ``python -m ivl_kernels.cli``: ``main`` on ``sys.argv``, then exit.
    A finished multi-process ``train`` run ends without the interpreter's finalisation
    (``ivl_kernels.hf.train_cli.exit_process`` says why)."""
    status = main()
    train_cli = sys.modules.get("ivl_kernels.hf.train_cli")  # loaded only when `train` ran
    if train_cli is not None:
        train_cli.exit_process(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
