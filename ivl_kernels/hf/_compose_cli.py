"""``ivl-kernels compose``: write a guided checkpoint (``ivl_kernels.hf.checkpoint``) from model references."""

from __future__ import annotations

import argparse
import sys

USAGE = """ivl-kernels compose BASE [VALUE] -o DIR [--alpha A] [--map FILE] [--term MODEL:ALPHA[:MAP]]... [--overwrite]

Writes DIR/config.json naming BASE and the guidance terms (no weights are copied), each term's vocabulary map,
and BASE's tokenizer. GuidedCausalLM.from_pretrained(DIR) loads it in transformers; with the vLLM plugin,
vllm.LLM(model=DIR) serves it. Local models are referenced relative to DIR, so the tree can move as a whole.

  ivl-kernels compose Qwen/Qwen2.5-7B ./value -o guided --alpha 1.0
  ivl-kernels compose llama-2-13b -o proxy --term llama-2-7b-chat:1.0 --term llama-2-7b:-1.0
"""


def _term(text: str, default_map):
    """``MODEL:ALPHA`` or ``MODEL:ALPHA:MAP`` (the model part may itself hold ':', e.g. a Windows path)."""
    parts = text.rsplit(":", 2)
    for n_tail in (2, 1):
        if len(parts) > n_tail:
            head, tail = ":".join(parts[:-n_tail]), parts[-n_tail:]
            try:
                alpha = float(tail[0])
            except ValueError:
                continue
            return {"model": head, "alpha": alpha, "map": tail[1] if n_tail == 2 else default_map}
    raise argparse.ArgumentTypeError(f"--term {text!r}: expected MODEL:ALPHA or MODEL:ALPHA:MAP")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ivl-kernels compose", usage=USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the base model (directory or hub id)")
    ap.add_argument("value", nargs="?", help="the value network (one term with --alpha and --map)")
    ap.add_argument("-o", "--output", required=True, help="the checkpoint directory to write")
    ap.add_argument("--alpha", type=float, default=1.0, help="guidance strength of VALUE (default 1.0)")
    ap.add_argument("--map", default=None, help="VocabMap file (`ivl-kernels map`): base id -> value id")
    ap.add_argument("--term", action="append", default=[], metavar="MODEL:ALPHA[:MAP]",
                    help="a guidance term (repeatable): proxy-tuning is --term EXPERT:1 --term ANTI:-1")
    ap.add_argument("--fill", type=float, default=0.0, help="value logit of unmapped base ids (default 0)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into an existing directory that holds other files (same-named files are replaced); "
                         "without it only a new, empty or earlier guided-checkpoint directory is written")
    ap.add_argument("--suppress-ids-from", type=int, default=None,
                    help="ids >= N are never generated (default: the tokenizer's length when smaller than the head)")
    args = ap.parse_args(argv)
    terms = []
    if args.value is not None:
        terms.append({"model": args.value, "alpha": args.alpha, "map": args.map})
    try:
        terms += [_term(t, args.map) for t in args.term]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    if not terms:
        ap.error("give VALUE or at least one --term MODEL:ALPHA")

    from .checkpoint import write_guided_checkpoint

    try:
        spec = write_guided_checkpoint(args.output, args.base, terms, fill=args.fill,
                                       suppress_ids_from=args.suppress_ids_from, overwrite=args.overwrite,
                                       overwrite_flag="--overwrite")
    except (ValueError, TypeError, OSError) as exc:
        print(f"ivl-kernels compose: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: base {spec.base}; " +
          ", ".join(f"{t.model} (alpha {t.alpha:g}{', map ' + t.map if t.map else ''})" for t in spec.terms))
    return 0
