"""``ivl-kernels train BASE VALUE --data FILE -o OUT``: train a value network against a frozen base (IVL).

The loss is ``IVLForCausalLM``'s (with its defaults, those of IVL's released training: ``alpha=1``,
``l1_coef=1``, ``l1_reduction="all"``); the loop is ``transformers.Trainer``'s, so progress bars, logging,
checkpoints, resuming, mixed precision, and several processes (``torchrun`` / ``accelerate launch``: DDP) come
from the ecosystem. What this module adds:

- ``load_records`` / ``tokenize_record`` / ``IVLDataCollator`` (``ivl_kernels.hf.train_data``, re-exported
  here): a JSONL of ``{"prompt", "response"}`` or ``{"messages": [...]}``, tokenised with the BASE tokenizer
  (the base reads these ids; the value model reads them through the vocabulary map when it has another
  vocabulary); the prompt's labels are ``-100``; right padding.
- ``IVLTrainer`` (``ivl_kernels.hf.trainer``, re-exported here): a ``Trainer`` whose checkpoints and final save hold the value network only (full model, or the
  PEFT adapter) plus the value tokenizer and ``ivl_train.json`` (base, alpha, map...), never the base's weights,
  and which resumes into the value network.

OUT, and every ``OUT/checkpoint-N``, is a value-model directory: ``AutoModelForCausalLM.from_pretrained(OUT)``
(or the adapter with PEFT) plugs into ``GuidedCausalLM(base, value)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from ..checkpoint_format import TRAINED_MAP as MAP_NAME  # the map saved beside the value network
from .train_data import IVLDataCollator, ListDataset, load_records, tokenize_record  # noqa: F401
from .trainer import COMPLETE_NAME, INFO_NAME, IVLTrainer, mark_checkpoint_complete, write_info  # noqa: F401

INFO_FORMAT = "ivl-kernels/trained-value"
INFO_VERSION = 1

DESCRIPTION = ("Train a value network against a frozen base model with Inverse Value Learning's loss "
               "(cross-entropy of base_logits + alpha * value_logits, plus IVL's L1 term) on transformers.Trainer. "
               "Runs on several processes unchanged under torchrun / accelerate launch (DDP).")

EPILOG = """\
data: a JSONL file, one example a line: {"prompt": ..., "response": ...} (the response gets the tokenizer's EOS
appended unless --no-eos) or {"messages": [{"role": ..., "content": ...}, ...]} rendered with the value
tokenizer's chat template, the last (assistant) message being the response. Ids come from the base tokenizer;
the loss is taken on the response tokens only.

OUT holds the value network (or its LoRA adapter), the value tokenizer and ivl_train.json (base, alpha, map);
checkpoints go to OUT/checkpoint-N. Use it with
  GuidedCausalLM(base_model, AutoModelForCausalLM.from_pretrained(OUT), alpha=1.0)
Several processes: torchrun --nproc-per-node 8 -m ivl_kernels.cli train ... (or accelerate launch);
--batch-size is per process: the global batch is batch-size x grad-accum x processes. A step's loss is the
mean over the response tokens of its whole global batch (token-weighted accumulation), however they are split.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ivl-kernels train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="frozen base model: a transformers model directory or hub id")
    p.add_argument("value", metavar="VALUE", help="value network to train (its initial weights): a directory or hub id")
    p.add_argument("--data", required=True, metavar="FILE", help="training data, JSONL (see below)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory (checkpoints inside)")

    g = p.add_argument_group("models and vocabularies")
    g.add_argument("--value-tokenizer", metavar="PATH", help="value tokenizer (default: VALUE's)")
    g.add_argument("--base-tokenizer", metavar="PATH", help="base tokenizer (default: BASE's); tokenises the data")
    g.add_argument("--map", metavar="FILE", help="vocabulary map base -> value (from `ivl-kernels map`); required "
                   "when the two tokenizers' vocabularies differ")
    g.add_argument("--base-dtype", choices=("float32", "bfloat16", "float16"), default=None, metavar="DTYPE",
                   help="float32, bfloat16 or float16: the frozen base's dtype (default: bfloat16 with --bf16, "
                        "else float32)")
    g.add_argument("--trust-remote-code", action="store_true", help="passed to from_pretrained")

    g = p.add_argument_group("IVL loss")
    g.add_argument("--alpha", type=float, default=1.0, metavar="A",
                   help="guidance strength in the loss (default 1, as IVL)")
    g.add_argument("--l1-coef", type=float, default=1.0, metavar="C",
                   help="weight of IVL's L1 term on the value logits (default 1)")
    g.add_argument("--l1-reduction", choices=("all", "kept"), default="all", metavar="{all,kept}",
                   help="positions the L1 term averages over: all (default, IVL's release) or kept labels")

    g = p.add_argument_group("data")
    g.add_argument("--max-length", type=int, default=1024, metavar="N",
                   help="truncate examples to this many tokens (default 1024)")
    g.add_argument("--pad-to-max-length", action="store_true",
                   help="pad every batch to --max-length (as IVL's release; with --l1-reduction all the L1 weight "
                        "depends on padding)")
    g.add_argument("--no-eos", action="store_true",
                   help="do not append EOS to the responses of prompt/response examples")

    g = p.add_argument_group("training (transformers.TrainingArguments)")
    g.add_argument("--epochs", type=float, default=1.0, metavar="E", help="number of epochs (default 1)")
    g.add_argument("--max-steps", type=int, default=-1, metavar="N",
                   help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--lr", type=float, default=1e-4, metavar="LR", help="peak learning rate (default 1e-4)")
    g.add_argument("--lr-scheduler", default="linear", metavar="NAME",
                   help="scheduler type (linear, cosine, constant, ...)")
    g.add_argument("--warmup-steps", type=int, default=0, metavar="N")
    g.add_argument("--weight-decay", type=float, default=0.0, metavar="W")
    g.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="examples per process per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="K", help="gradient accumulation steps (default 1)")
    g.add_argument("--seed", type=int, default=42, metavar="S")
    g.add_argument("--logging-steps", type=int, default=10, metavar="N")
    g.add_argument("--save-steps", type=int, default=500, metavar="N",
                   help="checkpoint every N steps (default 500); 0: no intermediate checkpoints")
    g.add_argument("--save-total-limit", type=int, default=None, metavar="N", help="keep at most N checkpoints")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from OUT/checkpoint-N, a checkpoint directory, or 'latest' (what --resume alone "
                        "means; put it after BASE VALUE)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that already holds files (checkpoints, a finished run): the earlier "
                        "run's checkpoints are removed, same-named files are replaced. Without it OUT must be new or "
                        "empty (or pass --resume)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    g.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing in the value model")
    g.add_argument("--report-to", default="none", metavar="NAMES", help="tensorboard, wandb, ... (default none)")
    g.add_argument("--use-cpu", action="store_true", help="train on CPU even when a GPU is visible")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs are printed)")

    g = p.add_argument_group("LoRA (peft)")
    g.add_argument("--lora-r", type=int, default=0, metavar="R",
                   help="train a LoRA adapter of rank R on the value network")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="LoRA alpha (default 2 * R)")
    g.add_argument("--lora-dropout", type=float, default=0.0, metavar="P")
    g.add_argument("--lora-target-modules", default="all-linear", metavar="NAMES",
                   help="comma-separated module names, or all-linear (default)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# checkpoints written by the trainer (``ivl_kernels.hf.trainer.IVLTrainer``)


def checkpoint_problem(directory: str) -> Optional[str]:
    """``None`` when ``directory`` is a complete checkpoint, else why not. Complete: the marker the trainer writes
    last; a checkpoint written before the marker existed counts when its ``trainer_state.json`` (Trainer's last
    file) is whole JSON and value weights (or an adapter) are there."""
    if os.path.isfile(os.path.join(directory, COMPLETE_NAME)):
        return None
    state = os.path.join(directory, "trainer_state.json")
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return "interrupted while saving (no completion marker, no whole trainer_state.json)"
    names = set(os.listdir(directory))
    if not names & {"model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                    "adapter_model.bin", "pytorch_model.bin"}:
        return "no value-network weights"
    return None


def is_own_checkpoint(directory: str) -> bool:
    """Whether ``directory`` is a checkpoint this package wrote: it holds the completion marker, or the
    ``ivl_train.json`` of a trained value network (written with the weights, before the marker)."""
    if os.path.isfile(os.path.join(directory, COMPLETE_NAME)):
        return True
    try:
        return read_info(directory).get("format") == INFO_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_dirs(out: str) -> list:
    """``[(N, path), ...]`` of the ``checkpoint-N`` directories in ``out``, newest (largest N) first."""
    import re

    found = []
    if os.path.isdir(out):
        for name in os.listdir(out):
            m = re.fullmatch(r"checkpoint-(\d+)", name)
            if m and os.path.isdir(os.path.join(out, name)):
                found.append((int(m.group(1)), os.path.join(out, name)))
    return sorted(found, reverse=True)


def remove_earlier_checkpoints(out: str) -> list:
    """A run started over with ``--overwrite`` must never be resumed into the run it replaces: the
    ``checkpoint-N`` directories of that earlier run which this package wrote (``is_own_checkpoint``) are
    removed before the new run trains (each renamed to a hidden name first, one atomic step, then deleted, so an
    interrupt leaves no half-deleted checkpoint behind under its name). Returns the removed names."""
    import shutil
    import tempfile

    removed = []
    for _, path in checkpoint_dirs(out):
        if not os.path.islink(path) and is_own_checkpoint(path):
            doomed = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.removed-", dir=out)
            os.rename(path, os.path.join(doomed, "c"))
            shutil.rmtree(doomed)
            removed.append(os.path.basename(path))
    return removed


def latest_complete_checkpoint(out: str):
    """``(newest complete checkpoint-N in out or None, [(incomplete path, why), ...] newer than it)``."""
    skipped = []
    for _, path in checkpoint_dirs(out):
        why = checkpoint_problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def read_info(directory: str) -> dict:
    """``ivl_train.json`` of a trained value directory."""
    with open(os.path.join(directory, INFO_NAME)) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# main


class UsageError(ValueError):
    pass


def _source(name: str) -> str:
    """A local directory as an absolute path (so ivl_train.json stays valid from elsewhere); a hub id as is."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def _same_vocabulary(base_tok, value_tok) -> bool:
    """Whether the identity map is right: every id both tokenizers have is the same token in both (ids only one
    of them has, such as added special tokens past the shared vocabulary, are unmapped or never read)."""
    from ..checkpoint_format import tokenizer_difference

    try:
        return tokenizer_difference(base_tok, value_tok) is None
    except Exception:  # pragma: no cover - tokenizers without get_vocab
        return False


def _resolve_resume(resume: Optional[str], out: str, overwrite: bool) -> Optional[str]:
    """The checkpoint to resume from (``None``: a fresh run). A fresh run needs an OUT that is new or empty
    (``--overwrite`` to write over another run's files: the earlier run's checkpoints are then removed before
    training, ``remove_earlier_checkpoints``, and OUT must hold no complete-looking checkpoint this package did
    not write, which a later ``--resume latest`` would take); ``latest`` is the newest complete checkpoint,
    incomplete ones (an interrupted save) are reported and skipped; a named checkpoint must be complete."""
    from .._atomic import check_output_dir

    if resume is None:
        if overwrite:
            foreign = [p for _, p in checkpoint_dirs(out)
                       if (os.path.islink(p) or not is_own_checkpoint(p)) and checkpoint_problem(p) is None]
            if foreign:
                raise UsageError(f"{out} holds {os.path.basename(foreign[0])}, a checkpoint ivl-kernels train did "
                                 f"not write: --overwrite removes the earlier run's checkpoints so that --resume "
                                 f"latest can only continue the new run, and will not remove this one; move it "
                                 f"away or choose another -o")
            return None
        last, _ = latest_complete_checkpoint(out)
        if last is not None:
            raise UsageError(f"{out} already holds checkpoints ({os.path.basename(last)}): pass --resume latest "
                             f"to continue from it, or --overwrite to start over")
        try:
            check_output_dir(out, overwrite=False, what="-o", flag="--overwrite (or --resume latest)")
        except ValueError as e:
            raise UsageError(str(e)) from None
        return None
    if resume == "latest":
        last, skipped = latest_complete_checkpoint(out)
        for path, why in skipped:
            print(f"ivl-kernels train: skipping {path}: incomplete checkpoint ({why})", file=sys.stderr)
        if last is None:
            raise UsageError(f"--resume latest: no checkpoint-N directory in {out} holds a complete checkpoint")
        return last
    for cand in (resume, os.path.join(out, resume)):
        if os.path.isdir(cand):
            why = checkpoint_problem(cand)
            if why is not None:
                raise UsageError(f"--resume {resume}: {cand} is an incomplete checkpoint ({why}); use --resume "
                                 f"latest for the newest complete one")
            return cand
    raise UsageError(f"--resume {resume}: no such checkpoint directory")


def _check_paths(args) -> None:
    """Before any work: OUT is none of the inputs, nor inside one, nor holds one (the run replaces files and
    checkpoints inside OUT); a symbolic link OUT points to a directory (written through); OUT can be written
    (checked now, not when the finished run is saved)."""
    from .._atomic import check_not_input, check_writable, resolve_output

    check_not_input(args.output, [("base model (BASE)", args.base), ("value model (VALUE)", args.value),
                                  ("--base-tokenizer", args.base_tokenizer),
                                  ("--value-tokenizer", args.value_tokenizer), ("--data file", args.data),
                                  ("--map file", args.map)], flag="-o", inputs_inside=True)
    try:
        resolve_output(args.output)
    except ValueError as e:
        raise UsageError(f"-o {e}") from None
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"-o {args.output!r} exists and is not a directory")
    check_writable(args.output, what="-o")


def _check_numbers(args) -> None:
    """Every numeric option finite and in range, before anything is read or written: a NaN weight decay or LoRA
    alpha trains to NaN weights and exits 0, zero epochs "save" an untrained network, a negative learning rate
    or L1 weight fails only once training has started. ``UsageError`` naming the flag."""
    from .._validate import check_alpha_float

    def number(flag: str, v, ok, what: str) -> None:
        try:
            v = check_alpha_float(flag, v)  # finite, and finite in float32 (the loss and the optimizer's dtype)
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
        if not ok(v):
            raise UsageError(f"{flag} must be {what}, got {v:g}")

    number("--alpha", args.alpha, lambda v: v != 0, "nonzero (with --alpha 0 the value network is not in the "
           "loss: there is nothing to learn)")
    number("--l1-coef", args.l1_coef, lambda v: v >= 0, ">= 0")
    number("--lr", args.lr, lambda v: v > 0, "> 0")
    number("--weight-decay", args.weight_decay, lambda v: v >= 0, ">= 0")
    number("--epochs", args.epochs, lambda v: v > 0, "> 0")
    if args.lora_alpha is not None:
        number("--lora-alpha", args.lora_alpha, lambda v: v > 0, "> 0")
    number("--lora-dropout", args.lora_dropout, lambda v: 0 <= v < 1, "in [0, 1)")
    ints = (("--max-steps", args.max_steps, lambda v: v == -1 or v >= 1, ">= 1 (or -1, the default: --epochs "
             "decides)"),
            ("--warmup-steps", args.warmup_steps, lambda v: v >= 0, ">= 0"),
            ("--seed", args.seed, lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
            ("--lora-r", args.lora_r, lambda v: v >= 0, ">= 0"),
            ("--batch-size", args.batch_size, lambda v: v >= 1, ">= 1"),
            ("--grad-accum", args.grad_accum, lambda v: v >= 1, ">= 1"),
            ("--max-length", args.max_length, lambda v: v >= 2, ">= 2"),
            ("--save-steps", args.save_steps, lambda v: v >= 0, ">= 0 (0: no intermediate checkpoints)"),
            ("--logging-steps", args.logging_steps, lambda v: v >= 1, ">= 1"),
            ("--save-total-limit", args.save_total_limit, lambda v: v is None or v >= 1, ">= 1"))
    for flag, v, ok, what in ints:
        if not ok(v):
            raise UsageError(f"{flag} must be {what}, got {v}")


def _dtype(name: Optional[str]):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_training_stack(args) -> None:
    """What the run will import, present before any work (the ``[train]`` extra): transformers' ``Trainer`` needs
    accelerate, ``--lora-r`` needs peft. Without them the run failed only after loading both models."""
    import importlib.util

    missing = [name for name, needed in (("accelerate", True), ("peft", bool(args.lora_r)))
               if needed and importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"ivl-kernels train needs {' and '.join(missing)} (not installed): "
                         f"pip install 'ivl-kernels[train]'")


def _setup(args) -> dict:
    """Everything before training: tokenizers, map, data, models, Trainer. ``UsageError``/``ValueError``/
    ``FileNotFoundError`` for bad input."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

    from .. import __version__ as ivl_version
    from ._model_api import dtype_keyword
    from .training import IVLForCausalLM

    _check_numbers(args)
    _check_training_stack(args)
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume continues the run in OUT and --overwrite starts over: pass one of them")
    _check_paths(args)
    resume = _resolve_resume(args.resume, args.output, args.overwrite)
    records = load_records(args.data)

    trc = {"trust_remote_code": True} if args.trust_remote_code else {}
    base_tok = AutoTokenizer.from_pretrained(args.base_tokenizer or args.base, **trc)
    value_tok = AutoTokenizer.from_pretrained(args.value_tokenizer or args.value, **trc)

    vmap, map_info = None, None
    if args.map:
        from ..vocab import VocabMap

        vmap = VocabMap.load(args.map, base=base_tok, value=value_tok)
    elif not _same_vocabulary(base_tok, value_tok):
        raise UsageError(
            "the base and value tokenizers have different vocabularies: build a vocabulary map with "
            f"`ivl-kernels map {args.base_tokenizer or args.base} {args.value_tokenizer or args.value} -o map.pt` "
            "(tokenizer directories or files) and pass --map map.pt")

    # Examples: ids from the base tokenizer; chat templates from the value tokenizer (else the base's).
    chat_tok = value_tok if getattr(value_tok, "chat_template", None) else base_tok
    examples, dropped = [], 0
    for rec in records:
        ex = tokenize_record(rec, base_tok, chat_tok, max_length=args.max_length, add_eos=not args.no_eos,
                             where=f"{args.data}:{rec['_line']}")
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise UsageError(f"{args.data}: no example keeps a response token within --max-length {args.max_length}")

    base_dtype = _dtype(args.base_dtype or ("bfloat16" if args.bf16 else "float32"))
    # Local directories by absolute path, so that what OUT records (the config's name_or_path, a PEFT adapter's
    # base_model_name_or_path) stays valid from any working directory.
    dtype_kw = dtype_keyword()
    base = AutoModelForCausalLM.from_pretrained(_source(args.base), **{dtype_kw: base_dtype}, **trc)
    value = AutoModelForCausalLM.from_pretrained(_source(args.value), **{dtype_kw: torch.float32}, **trc)
    if vmap is not None:
        Vb, Vv = base.get_output_embeddings().weight.shape[0], value.get_output_embeddings().weight.shape[0]
        if (vmap.base_vocab_size, vmap.value_vocab_size) != (Vb, Vv):
            vmap = vmap.pad_to(Vb, Vv)  # heads padded past the tokenizers; ValueError when the map is larger
        map_info = {"file": MAP_NAME, "coverage": round(vmap.coverage, 6), "method": vmap.method}
    set_seed(args.seed)  # LoRA initialisation
    if args.lora_r:
        import peft

        targets = args.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        cfg = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                              lora_dropout=args.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
        value = peft.get_peft_model(value, cfg)
    if args.gradient_checkpointing:
        lm = value.get_base_model() if args.lora_r else value
        enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # pragma: no cover - older transformers
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = IVLForCausalLM(base, value, alpha=args.alpha, l1_coef=args.l1_coef, l1_reduction=args.l1_reduction,
                           vocab_map=vmap)

    targs = TrainingArguments(
        output_dir=args.output, num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum, seed=args.seed,
        logging_steps=args.logging_steps, save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(args.save_steps, 1), save_total_limit=args.save_total_limit, bf16=args.bf16,
        report_to=_report_to(args.report_to),
        use_cpu=args.use_cpu, disable_tqdm=True if args.no_progress else None, dataloader_num_workers=0,
        remove_unused_columns=False,
        # Every trainable parameter gets a gradient every step (the frozen base has none to sync).
        ddp_find_unused_parameters=False)
    if targs.world_size > 1:
        # A step's loss is the mean over every process's response tokens (IVLTrainer's count is gathered): the
        # default from transformers 5.0; 4.x's default averaged the processes' own token means. Set after
        # construction: 4.x warns about (and drops) it on one process.
        targs.average_tokens_across_devices = True

    base_tok_src = _source(args.base_tokenizer or args.base)

    def info(global_step: int) -> dict:
        return {
            "format": INFO_FORMAT, "version": INFO_VERSION,
            "base_model": _source(args.base),
            "base_tokenizer": base_tok_src,
            "value_init": _source(args.value),
            "adapter": bool(args.lora_r),
            "alpha": args.alpha,
            "vocab_map": map_info,
            "loss": {"alpha": args.alpha, "l1_coef": args.l1_coef, "l1_reduction": args.l1_reduction},
            "input_ids": "base tokenizer",
            "global_step": int(global_step),
            "training": {
                "data": os.path.abspath(args.data), "examples": len(examples), "max_length": args.max_length,
                "batch_size_per_process": args.batch_size, "grad_accum": args.grad_accum,
                "processes": targs.world_size, "lr": args.lr, "lr_scheduler": args.lr_scheduler,
                "seed": args.seed, "bf16": args.bf16, "lora_r": args.lora_r or None,
            },
            "ivl_kernels_version": ivl_version,
        }

    collator = IVLDataCollator(pad_token_id=_pad_id(base_tok), pad_to=args.max_length if args.pad_to_max_length
                               else None)
    trainer = IVLTrainer(model=model, args=targs, train_dataset=ListDataset(examples),
                               data_collator=collator, value_tokenizer=value_tok, ivl_info=info, vocab_map=vmap)
    return dict(trainer=trainer, resume=resume, info=info, vmap=vmap, examples=examples, dropped=dropped,
                model=model)


def _remove_if_new_and_empty(path: str, existed: bool) -> None:
    """A failed command leaves nothing behind: Trainer creates OUT when it is built."""
    if not existed and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)


def _report_to(value: str):
    if value.strip() in ("", "none"):
        return []
    if value.strip() == "all":
        return "all"
    return [v.strip() for v in value.split(",") if v.strip()]


def _pad_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id, 0):
        if isinstance(tid, int) and tid >= 0:
            return tid
    return 0  # pragma: no cover


# A finished multi-process run's objects (trainer, models, data), kept referenced by ``main`` so that nothing of
# them is destroyed before ``exit_process`` ends the process (see there); None otherwise.
_finished_distributed_run = None


def _end_process_group(trainer) -> bool:
    """Tear the process group down after a finished run (every rank past one barrier); True when there was one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        trainer.accelerator.wait_for_everyone()
        dist.destroy_process_group()
        return True
    return False


def exit_process(status: int):
    """End a command-line process with ``status`` (the ``ivl-kernels`` entry point calls this; ``main`` returns).

    After a finished multi-process run nothing of it is destroyed: the run's objects stay referenced and the
    process ends with ``os._exit`` once the ``atexit`` handlers have run and stdout/stderr are flushed (every file
    was written and closed before). Destroying them is what went wrong, on torch 2.11 with gloo on CPU: a rank
    aborted in the interpreter's finalisation ("terminate called without an active exception", CI Dec 4), and,
    with the process group destroyed first, a rank hung for good in a futex wait while ``main``'s locals (the
    trainer and its DDP-wrapped model) were being released after the run had saved everything (CI stop 33, and
    here 2 runs in about 60 of the 2-process test; faulthandler's stack: the main thread at ``main``'s return).
    Any other exit, a failed run included, is ``sys.exit``."""
    if _finished_distributed_run is not None:
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
                pass
        os._exit(status)
    sys.exit(status)


def main(argv=None) -> int:
    """Run ``ivl-kernels train`` with ``argv`` (the arguments after ``train``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse printed the message
        return int(e.code or 0)

    out_existed = os.path.exists(args.output)
    try:
        s = _setup(args)
    except (UsageError, FileNotFoundError, ValueError, TypeError, ImportError, OSError) as e:
        print(f"ivl-kernels train: error: {e}", file=sys.stderr)
        _remove_if_new_and_empty(args.output, out_existed)
        return 2
    trainer = s["trainer"]
    main_process = trainer.is_world_process_zero()
    if main_process:
        model = s["model"]
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_base = sum(p.numel() for p in model.base_model.parameters())
        tokens = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in s["examples"])
        print(f"ivl-kernels train: {len(s['examples'])} examples ({tokens} response tokens; {s['dropped']} dropped: "
              f"no response token within --max-length), {trainer.args.world_size} process(es), global batch "
              f"{args.batch_size * args.grad_accum * trainer.args.world_size}; base {args.base} "
              f"({n_base / 1e6:.2f}M params, frozen), value {args.value} ({n_train / 1e6:.3f}M trainable"
              f"{', LoRA r=%d' % args.lora_r if args.lora_r else ''})"
              + (f"; map coverage {s['vmap'].coverage:.4f}" if s["vmap"] is not None else "")
              + (f"; resuming from {s['resume']}" if s["resume"] else ""), flush=True)
    if args.overwrite and s["resume"] is None:
        if trainer.args.should_save:  # the process that writes checkpoints removes the earlier run's
            removed = remove_earlier_checkpoints(args.output)
            if removed:
                print(f"ivl-kernels train: --overwrite: removed the earlier run's {', '.join(removed)} from "
                      f"{args.output}", file=sys.stderr, flush=True)
        trainer.accelerator.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=s["resume"])
    trainer.save_model(args.output)
    trainer.save_state()
    if main_process:
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        use = f"AutoModelForCausalLM.from_pretrained({args.output!r})"
        if s["vmap"] is not None:
            use += f", vocab_map=VocabMap.load({os.path.join(args.output, MAP_NAME)!r})"
        print(f"ivl-kernels train: saved the value network{' (LoRA adapter)' if args.lora_r else ''} to "
              f"{args.output} (global step {trainer.state.global_step}); use it with GuidedCausalLM(base, {use})",
              flush=True)
    if _end_process_group(trainer):  # after success only: a barrier with a failed rank would wait forever
        global _finished_distributed_run
        _finished_distributed_run = s  # released by no one: exit_process ends the process
    return 0


if __name__ == "__main__":  # pragma: no cover
    exit_process(main(sys.argv[1:]))
