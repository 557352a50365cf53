"""``ivl-kernels map``: build a :class:`~ivl_kernels.vocab.VocabMap` from two tokenizer files and save it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _show(piece) -> str:
    return "None" if piece is None else repr(piece.decode("utf-8", errors="backslashreplace"))


def _spread(ids, k: int):
    """``k`` ids evenly spaced over ``ids`` (deterministic examples from the whole id range)."""
    if len(ids) <= k:
        return list(ids)
    step = len(ids) / k
    return [ids[int(i * step)] for i in range(k)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ivl-kernels map",
        description="Map every base-tokenizer id to a value-tokenizer id (or -1) and save the map. BASE and VALUE "
                    "are tokenizer files (Hugging Face tokenizer.json, SentencePiece .model, tiktoken ranks "
                    "file, Tekken .json) or tokenizer directories.",
    )
    p.add_argument("base", metavar="BASE", help="the base model's tokenizer file or directory")
    p.add_argument("value", metavar="VALUE", help="the value model's tokenizer file or directory")
    p.add_argument("-o", "--output", required=True, help="where to write the map (torch file, e.g. map.pt)")
    p.add_argument("--method", choices=("exact", "dtw"), default="exact",
                   help="exact: byte-identical tokens; dtw: IVL corpus co-alignment (needs --corpus)")
    p.add_argument("--corpus", help="UTF-8 text file for --method dtw")
    p.add_argument("--base-vocab-size", type=int, default=None,
                   help="pad the map to the base model's (padded) LM-head size")
    p.add_argument("--value-vocab-size", type=int, default=None,
                   help="pad the map to the value model's (padded) LM-head size")
    p.add_argument("--examples", type=int, default=8, help="how many mapped/unmapped examples to print")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    return p


def main(argv: list[str]) -> int:
    """Run ``ivl-kernels map`` with ``argv`` (the arguments after ``map``); returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse already printed the message
        return int(e.code or 0)

    from ._atomic import atomic_file, check_not_input, check_output_file
    from .vocab import VocabMap, load_tokenizer, tokenizer_vocab

    try:
        if args.method == "dtw" and not args.corpus:
            raise ValueError("--method dtw needs --corpus TEXT_FILE")
        if args.method == "exact" and args.corpus:
            raise ValueError("--corpus is only used with --method dtw")
        if args.examples < 0:
            raise ValueError(f"--examples must be >= 0, got {args.examples}")
        for flag, size in (("--base-vocab-size", args.base_vocab_size), ("--value-vocab-size", args.value_vocab_size)):
            if size is not None and size < 1:
                raise ValueError(f"{flag} must be >= 1, got {size}")
        # Before the (possibly long) DTW alignment: the output is never an input file, nor an existing file
        # without --overwrite.
        out = Path(args.output)
        check_not_input(out, [("base tokenizer", args.base), ("value tokenizer", args.value),
                              ("corpus", args.corpus)], flag="-o")
        check_output_file(out, overwrite=args.overwrite, what="-o")
        base = tokenizer_vocab(load_tokenizer(args.base))
        value = tokenizer_vocab(load_tokenizer(args.value))
        corpus = Path(args.corpus) if args.corpus else None
        vmap = VocabMap.from_tokenizers(base, value, method=args.method, corpus=corpus)
        if args.base_vocab_size is not None or args.value_vocab_size is not None:
            vmap = vmap.pad_to(args.base_vocab_size, args.value_vocab_size)
        with atomic_file(out) as tmp:  # whole or not at all
            vmap.save(tmp)
    except (OSError, ValueError, TypeError, ImportError) as e:
        print(f"ivl-kernels map: error: {e}", file=sys.stderr)
        return 2

    index = vmap.index.tolist()
    print(f"base:     {base.name} ({base.kind}, {base.size} ids, {base.num_mappable} mappable)")
    print(f"value:    {value.name} ({value.kind}, {value.size} ids, {value.num_mappable} mappable)")
    print(f"method:   {args.method}")
    if args.method == "dtw":
        m = vmap.meta
        ratio = m["dtw_agree_with_exact"] / max(m["dtw_seen_with_exact"], 1)
        print(f"corpus:   {m['corpus_chars']} chars in {m['corpus_chunks']} chunks, {m['dtw_seconds']} s; "
              f"{m['dtw_base_tokens_seen']} base tokens seen, agreement with exact map {ratio:.4f}")
    print(f"coverage: {vmap.coverage:.4f} ({vmap.num_mapped} of {vmap.base_vocab_size} base ids mapped; "
          f"{base.num_mappable} base ids are not special)")
    mapped = [b for b, v in enumerate(index) if v >= 0]
    unmapped = [b for b, v in enumerate(index[: base.size]) if v < 0 and base.pieces[b] is not None]
    if args.examples > 0:
        print("mapped examples (base id piece -> value id piece):")
        for b in _spread(mapped, args.examples):
            print(f"  {b:>7} {_show(base.pieces[b])} -> {index[b]} {_show(value.pieces[index[b]])}")
        print(f"unmapped examples ({len(unmapped)} non-special base ids have no counterpart):")
        for b in _spread(unmapped, args.examples):
            print(f"  {b:>7} {_show(base.pieces[b])}")
    print(f"saved:    {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
