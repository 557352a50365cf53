"""``ivl-kernels train`` end to end on tiny models (CPU, offline): a base pretrained briefly on COPY, a value
network trained with IVL's loss on REVERSE; loss, guided accuracy, resume, two processes, LoRA, vocabulary map.

The toy: a WordLevel tokenizer over ``<pad> <s> | </s> 0-9`` (the ids of ``ivl_kernels.hf.demo``), a 2-layer
Llama base (hidden 48) pretrained for 30 steps on COPY (``3 1 4 | 3 1 4``), a 2-layer Qwen2 value network
(hidden 32), 384 REVERSE examples ``{"prompt": "3 1 4 |", "response": "4 1 3"}`` and 128 held-out ones.
One reference run (1 process, global batch 16, constant lr 1e-2, 120 steps, IVL's default loss) serves the
learning, resume and two-process tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
pytest.importorskip("tokenizers")

from ivl_kernels import cli  # noqa: E402
from ivl_kernels.hf import demo  # noqa: E402
from ivl_kernels.hf.train_cli import (COMPLETE_NAME, IVLDataCollator, build_parser, read_info,  # noqa: E402
                                      tokenize_record)

ROOT = Path(__file__).resolve().parents[2]
L = 3  # digits per example
N_TRAIN, N_TEST = 384, 128  # 24 steps per epoch at batch 16: step 60 is mid-epoch
STEPS, HALF, DIST_STEPS = 120, 60, 30
# Steps of the 2-process run compared with the 1-process run (test_two_processes_match_one_process says why).
COMPARE_STEPS = 20
COMMON = ["--batch-size", "16", "--lr", "1e-2", "--lr-scheduler", "constant", "--logging-steps", "1",
          "--use-cpu", "--no-progress", "--seed", "0"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
                 "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def make_tokenizer(chat: bool = False, digit_ids=None):
    """WordLevel tokenizer: ``<pad>``=0, ``<s>``=1, ``|``=2, ``</s>``=3, digits 4..13 (demo's ids), ``user:``
    and ``assistant:`` 14, 15; BOS prepended. ``digit_ids``: another id layout (a different vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    digits = digit_ids or {str(d): demo.DIGIT0 + d for d in range(10)}
    vocab = {"<pad>": 0, "<s>": 1, "|": 2, "</s>": 3, **digits, "user:": 14, "assistant:": 15}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def _digits(i: int):
    return [int(c) for c in f"{int(i):0{L}d}"]


def _run(args):
    return cli.main(["train", *map(str, args)])


def _history(out):
    with open(Path(out) / "trainer_state.json") as f:
        return [h for h in json.load(f)["log_history"] if "loss" in h]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads per op
    # made the in-process runs ~10x slower (measured: 120 steps in 20 s vs 2 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tok = make_tokenizer()
    base = demo._pretrain(demo._llama(48, 2, 1), 30, L, g, 3e-3, "", lambda it, **k: it, 32)
    value = demo._qwen(32, 2, 3)
    for name, model in (("base", base), ("value", value)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    perm = torch.randperm(10 ** L, generator=torch.Generator().manual_seed(1)).tolist()
    with open(root / "train.jsonl", "w") as f:
        for i in perm[:N_TRAIN]:
            d = _digits(i)
            rec = {"prompt": " ".join(map(str, d)) + " |", "response": " ".join(map(str, d[::-1]))}
            f.write(json.dumps(rec) + "\n")
    test = torch.tensor([[1, *[demo.DIGIT0 + x for x in _digits(i)], 2, *[demo.DIGIT0 + x for x in _digits(i)[::-1]]]
                         for i in perm[N_TRAIN:N_TRAIN + N_TEST]])
    return SimpleNamespace(root=root, base=root / "base", value=root / "value", data=root / "train.jsonl", test=test)


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    """1 process, global batch 16, 120 steps, checkpoints at 60 and 120."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert _run([toy.base, toy.value, "--data", toy.data, "-o", out, "--max-steps", STEPS, "--save-steps", HALF,
                 *COMMON]) == 0
    return SimpleNamespace(out=out, history=_history(out))


@torch.no_grad()
def _accuracy(toy, value_dir=None, vocab_map=None):
    from transformers import AutoModelForCausalLM

    from ivl_kernels.hf import GuidedCausalLM

    base = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    prompts = toy.test[:, : L + 2]
    kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=L + 1, do_sample=False, pad_token_id=0,
              eos_token_id=3)
    if value_dir is None:
        out = base.generate(prompts, **kw)
    else:
        value = AutoModelForCausalLM.from_pretrained(value_dir).eval()
        out = GuidedCausalLM(base, value, vocab_map=vocab_map).generate(prompts, **kw)
    return (out[:, L + 2: 2 * L + 2] == toy.test[:, L + 2:]).all(1).float().mean().item()


# ---- data --------------------------------------------------------------------------------------------------------


def test_tokenize_prompt_response_masks_the_prompt_and_appends_eos():
    tok = make_tokenizer()
    ex = tokenize_record({"prompt": "3 1 4 |", "response": "4 1 3"}, tok)
    assert ex["input_ids"] == [1, 7, 5, 8, 2, 8, 5, 7, 3]
    assert ex["labels"] == [-100] * 5 + [8, 5, 7, 3]
    assert tokenize_record({"prompt": "3 |", "completion": "3"}, tok, add_eos=False)["input_ids"] == [1, 7, 2, 7]
    assert tokenize_record({"prompt": "3 1 4 |", "response": "4 1 3"}, tok, max_length=7)["labels"][-2:] == [8, 5]
    assert tokenize_record({"prompt": "3 1 4 |", "response": "4"}, tok, max_length=5) is None  # no response left
    with pytest.raises(ValueError, match="must be strings"):
        tokenize_record({"prompt": "3", "response": 4}, tok)


def test_tokenize_messages_with_the_chat_template():
    base_tok, chat_tok = make_tokenizer(), make_tokenizer(chat=True)
    rec = {"messages": [{"role": "user", "content": "3 1 4 |"}, {"role": "assistant", "content": "4 1 3"}]}
    ex = tokenize_record(rec, base_tok, chat_tok)
    # "user: 3 1 4 | assistant: " is the prompt, "4 1 3 </s> " the response (the template writes EOS).
    assert ex["input_ids"] == [14, 7, 5, 8, 2, 15, 8, 5, 7, 3]
    assert ex["labels"] == [-100] * 6 + [8, 5, 7, 3]
    with pytest.raises(ValueError, match="last message must be the assistant"):
        tokenize_record({"messages": rec["messages"][:1]}, base_tok, chat_tok)
    with pytest.raises(ValueError, match="chat template"):
        tokenize_record(rec, base_tok, base_tok)


def test_collator_right_pads_with_ignored_labels():
    batch = IVLDataCollator(pad_token_id=0)([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
                                              {"input_ids": [1, 7], "labels": [-100, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert IVLDataCollator(pad_to=5)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape == (1, 5)


# ---- end to end --------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_guided_beats_the_base(toy, reference):
    losses = [h["loss"] for h in reference.history]
    assert [h["step"] for h in reference.history] == list(range(1, STEPS + 1))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    base_acc, guided_acc = _accuracy(toy), _accuracy(toy, reference.out)
    print(f"loss {first:.3f} -> {last:.3f}; exact match on {N_TEST} held-out: base {base_acc:.3f}, "
          f"guided {guided_acc:.3f}")
    assert guided_acc > base_acc + 0.3, (base_acc, guided_acc)

    # OUT: the value network (no base weights), its tokenizer, ivl_train.json naming the base and the loss.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = reference.out
    assert {"config.json", "model.safetensors", "tokenizer.json", "ivl_train.json"} <= set(os.listdir(out))
    value_keys = set(AutoModelForCausalLM.from_pretrained(toy.value).state_dict())
    assert set(load_file(out / "model.safetensors")) <= value_keys
    info = read_info(out)
    assert info["base_model"] == str(toy.base) and info["value_init"] == str(toy.value)
    assert info["alpha"] == 1.0 and info["loss"] == {"alpha": 1.0, "l1_coef": 1.0, "l1_reduction": "all"}
    assert info["vocab_map"] is None and not info["adapter"] and info["global_step"] == STEPS
    assert read_info(out / f"checkpoint-{HALF}")["global_step"] == HALF


def test_resume_latest_continues_from_the_checkpoint(toy, reference, tmp_path, capsys):
    out = tmp_path / "out"
    args = [toy.base, toy.value, "--data", toy.data, "-o", out, "--save-steps", HALF, *COMMON]
    assert _run(args + ["--max-steps", HALF]) == 0
    assert (out / f"checkpoint-{HALF}").is_dir()
    assert (out / f"checkpoint-{HALF}" / COMPLETE_NAME).is_file()  # written last: the checkpoint is whole
    capsys.readouterr()
    assert _run(args + ["--max-steps", STEPS]) == 2  # checkpoints there and no --resume: refused
    assert "--resume latest" in capsys.readouterr().err
    assert _run(args + ["--max-steps", STEPS, "--resume"]) == 0  # --resume alone means latest
    assert f"resuming from {out / f'checkpoint-{HALF}'}" in capsys.readouterr().out
    resumed = _history(out)
    assert [h["step"] for h in resumed] == list(range(1, STEPS + 1))
    # Weights, optimizer, scheduler, RNG and data position restored: the same run as the uninterrupted one.
    ref = {h["step"]: h for h in reference.history}
    for h in resumed[HALF:]:
        assert h["loss"] == pytest.approx(ref[h["step"]]["loss"], rel=1e-5), h["step"]
        assert h["grad_norm"] == pytest.approx(ref[h["step"]]["grad_norm"], rel=1e-4), h["step"]
    print(f"resumed: step {HALF + 1} loss {resumed[HALF]['loss']:.6f} (uninterrupted "
          f"{ref[HALF + 1]['loss']:.6f}), final {resumed[-1]['loss']:.6f} ({ref[STEPS]['loss']:.6f})")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run_torchrun(cmd, timeout=300):
    """``subprocess.run`` for a torchrun command, which either finishes or shows where it is stuck: on a timeout
    every worker gets SIGABRT (``PYTHONFAULTHANDLER`` makes each print its threads' Python stacks) and the test
    fails with what they printed. The run below takes about 11 s on 2 cores."""
    env = dict(_env(), PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = [int(d) for d in os.listdir("/proc") if d.isdigit() and _parent_pid(int(d)) == proc.pid]
        for pid in workers:
            _signal(pid, signal.SIGABRT)
        time.sleep(5)
        _signal(-proc.pid, signal.SIGKILL)  # torchrun and anything left in its session
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s; workers {workers} got SIGABRT. stderr:\n"
                    f"{err[-15000:]}\nstdout:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _parent_pid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _signal(pid, sig):
    try:
        os.kill(pid, sig) if pid > 0 else os.killpg(-pid, sig)
    except ProcessLookupError:
        pass


def test_two_processes_match_one_process(toy, reference, tmp_path):
    """torchrun, 2 CPU processes (gloo), 8 examples each: the same global batches as the 1-process run of 16
    (accelerate's seeded sampler gives the same order; rank r takes the r-th half of each global batch). Every
    example has the same length and number of response tokens, so the mean of the two ranks' mean losses (and
    DDP's average of their gradients) is the 1-process mean: the runs differ by float summation order only.
    Adam at lr 1e-2 amplifies that in this toy run, and where it starts moves with the versions (transformers
    5.25 / torch 2.14.1, 2026-12-04: 1e-7 relative through step 26, then 7e-4 at step 27 and 2e-3 at step 28;
    earlier stacks held 1e-7 to step 30), so the first COMPARE_STEPS steps are compared, all DIST_STEPS run."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ivl_kernels.cli", "train", str(toy.base), str(toy.value), "--data", str(toy.data), "-o", str(out),
           "--max-steps", str(DIST_STEPS), "--save-steps", "0", *COMMON]
    cmd[cmd.index("--batch-size") + 1] = "8"
    proc = _run_torchrun(cmd)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.stdout.count("ivl-kernels train: 384 examples") == 1  # rank 0 prints, rank 1 does not
    # The workers end with os._exit (train_cli.exit_process): what they printed last still arrives.
    assert proc.stdout.count("ivl-kernels train: saved the value network") == 1
    assert (out / "train_results.json").is_file()
    assert "2 process(es), global batch 16" in proc.stdout
    two = _history(out)
    one = reference.history[:DIST_STEPS]
    assert [h["step"] for h in two] == list(range(1, DIST_STEPS + 1))
    pairs = list(zip(one, two))[:COMPARE_STEPS]
    worst = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in pairs)
    worst_g = max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in pairs)
    print(f"2 processes vs 1 over {COMPARE_STEPS} of {DIST_STEPS} steps: max relative difference loss {worst:.2e}, "
          f"grad norm {worst_g:.2e}")
    assert worst < 1e-4 and worst_g < 1e-3
    info = read_info(out)
    assert info["training"]["processes"] == 2 and info["global_step"] == DIST_STEPS
    assert (out / "model.safetensors").is_file()


def test_steps_are_token_weighted_across_micro_batches_and_processes(toy, tmp_path):
    """Examples of 1 to 6 digits (responses of 2 to 7 tokens): one process at --batch-size 16, one at 8 with
    --grad-accum 2, and 2 torchrun processes at 8 run the same global batches, and each step's loss is the mean
    over its 16 examples' response tokens in all three (IVLTrainer's count over the micro-batches, gathered over
    the processes: ivl-kernels train turns average_tokens_across_devices on, which transformers 4.x leaves off).
    Averaging the micro-batches' (or, on 4.50, the processes') own means logged 3.1950 against 3.2027 at step 1."""
    g = torch.Generator().manual_seed(5)
    data = tmp_path / "varied.jsonl"
    with open(data, "w") as f:
        for _ in range(64):
            d = torch.randint(0, 10, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(map(str, d)) + " |", "response": " ".join(map(str, d[::-1]))})
                    + "\n")
    # The "kept" L1 term: "all" averages over a micro-batch's padded positions, which a token count does not pool.
    steps = ["--max-steps", "4", "--save-steps", "0", "--l1-reduction", "kept"]
    runs = {}
    for name, extra in (("one", []), ("accumulated", ["--batch-size", "8", "--grad-accum", "2"])):
        out = tmp_path / name
        args = [toy.base, toy.value, "--data", data, "-o", out, *steps, *COMMON, *extra]
        assert _run(args) == 0
        runs[name] = _history(out)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ivl_kernels.cli", "train", str(toy.base), str(toy.value), "--data", str(data), "-o", str(out),
           *steps, *COMMON]
    cmd[cmd.index("--batch-size") + 1] = "8"
    proc = _run_torchrun(cmd)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    runs["two"] = _history(out)
    one = runs["one"]
    assert len(one) == 4
    for name in ("accumulated", "two"):
        assert [h["step"] for h in runs[name]] == [1, 2, 3, 4], name
        for a, b in zip(one, runs[name]):
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (name, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"], (name, a, b)


@pytest.mark.parametrize("missing", ["accelerate", "peft"])
def test_missing_training_package_is_named_before_any_work(toy, tmp_path, monkeypatch, capsys, missing):
    """Without accelerate (transformers' Trainer needs it), or peft with --lora-r, train stops before loading
    anything, naming the extra (it failed only after loading both models)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    out = tmp_path / "out"
    assert _run([toy.base, toy.value, "--data", toy.data, "-o", out, "--max-steps", "1", "--lora-r", "2"]) == 2
    err = capsys.readouterr().err
    assert f"needs {missing} (not installed): pip install 'ivl-kernels[train]'" in err, err
    assert not out.exists()


@pytest.mark.parametrize("stack", ["installed", "transformers-4.55"])
def test_models_load_in_their_dtype_with_the_keyword_transformers_takes(toy, tmp_path, monkeypatch, stack):
    """from_pretrained gets the dtype keyword the installed transformers reads, found by capability: ``dtype``
    where configs carry a ``dtype`` (4.56 on; ``torch_dtype`` is there a deprecated alias that warns), else
    ``torch_dtype``. transformers 4.50-4.55 (``[hf]`` allows them) take only ``torch_dtype`` and hand ``dtype`` on
    to the model's ``__init__``: the run failed with "unexpected keyword argument 'dtype'". "transformers-4.55"
    stands such a release in: a config without ``dtype`` and a from_pretrained that refuses the keyword."""
    import inspect

    import transformers
    from transformers import AutoModelForCausalLM

    from ivl_kernels.hf.train_cli import _setup

    real = AutoModelForCausalLM.from_pretrained
    calls = []

    def from_pretrained(path, *args, **kwargs):
        calls.append(sorted(k for k in kwargs if k in ("dtype", "torch_dtype")))
        if stack != "installed":
            if "dtype" in kwargs:  # as 4.55: the model's __init__ gets it
                raise TypeError("LlamaForCausalLM.__init__() got an unexpected keyword argument 'dtype'")
            kwargs[real_keyword] = kwargs.pop("torch_dtype")
        return real(path, *args, **kwargs)

    real_keyword = "dtype" if hasattr(transformers.PretrainedConfig(), "dtype") else "torch_dtype"
    if stack != "installed":
        class Config4_55:  # transformers 4.55's PretrainedConfig: torch_dtype, no dtype
            def __init__(self, **kwargs):
                self.torch_dtype = kwargs.pop("torch_dtype", None)

        monkeypatch.setattr(transformers, "PretrainedConfig", Config4_55)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    setup = _setup(build_parser().parse_args([str(a) for a in (toy.base, toy.value, "--data", toy.data, "-o",
                                                                tmp_path / "out", "--max-steps", "1", "--bf16",
                                                                "--use-cpu", "--no-progress")]))
    monkeypatch.undo()
    assert setup["model"].base_model.dtype == torch.bfloat16
    assert setup["model"].value_model.dtype == torch.float32
    if stack != "installed":
        assert calls == [["torch_dtype"]] * 2, calls
    elif isinstance(inspect.getattr_static(transformers.PretrainedConfig, "torch_dtype", None), property):
        assert calls == [["dtype"]] * 2, calls  # torch_dtype is the deprecated alias there: never passed


@pytest.mark.parametrize("distributed", [True, False], ids=["after-multi-process-run", "otherwise"])
def test_exit_process(distributed):
    """After a finished multi-process run the entry point ends with os._exit, destroying nothing of the run (the
    objects ``main`` keeps referenced), having run the atexit handlers and flushed what was printed; otherwise it
    is sys.exit."""
    code = ("import atexit\n"
            "from ivl_kernels.hf import train_cli\n"
            "atexit.register(lambda: print('atexit handler ran', flush=True))\n"
            "class Finalised:\n"
            "    def __del__(self): print('finalised', flush=True)\n"
            "keep = Finalised()\n"
            f"train_cli._finished_distributed_run = {{'trainer': keep}} if {distributed} else None\n"
            "del keep\n"
            "print('buffered, not flushed', end=' ')\n"
            "train_cli.exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "buffered, not flushed" in proc.stdout and "atexit handler ran" in proc.stdout
    # the run's objects are never destroyed after a multi-process run (held, then os._exit); otherwise the
    # interpreter's finalisation destroys them
    assert ("finalised" in proc.stdout) == (not distributed)


def test_lora_bf16_gradient_checkpointing_on_chat_data(toy, tmp_path):
    """messages data rendered with the VALUE tokenizer's chat template (the base tokenizer has none), a LoRA
    adapter saved and resumed, bf16 autocast, activation checkpointing in the value model."""
    from transformers import AutoModelForCausalLM

    from ivl_kernels.hf import GuidedCausalLM
    from ivl_kernels.hf.train_cli import _setup

    value_dir = tmp_path / "value_chat"
    AutoModelForCausalLM.from_pretrained(toy.value).save_pretrained(value_dir)
    make_tokenizer(chat=True).save_pretrained(value_dir)
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            d = " ".join(map(str, _digits(i * 7)))
            f.write(json.dumps({"messages": [{"role": "user", "content": d + " |"},
                                             {"role": "assistant", "content": d[::-1]}]}) + "\n")
    out = tmp_path / "out"
    args = [toy.base, value_dir, "--data", data, "-o", out, "--lora-r", "4", "--bf16", "--gradient-checkpointing",
            "--save-steps", "2", "--batch-size", "8", "--lr", "1e-2", "--logging-steps", "1", "--use-cpu",
            "--no-progress"]
    setup = _setup(build_parser().parse_args([str(a) for a in args + ["--max-steps", "1"]]))
    value = setup["model"].value_model
    lm = value.get_base_model()
    # By capability: transformers 5.2x has is_activation_checkpointing, 5.17 (the GPU image's) only
    # is_gradient_checkpointing.
    assert getattr(lm, "is_activation_checkpointing", None) or lm.is_gradient_checkpointing
    assert setup["model"].base_model.dtype == torch.bfloat16 and setup["trainer"].args.bf16
    assert setup["examples"][0]["labels"][:6] == [-100] * 6  # "user: d d d | assistant:" masked
    del setup

    assert _run(args + ["--max-steps", "2"]) == 0
    assert _run(args + ["--max-steps", "4", "--resume", "latest"]) == 0
    assert [h["step"] for h in _history(out)] == [1, 2, 3, 4]
    assert {"adapter_config.json", "adapter_model.safetensors", "ivl_train.json"} <= set(os.listdir(out))
    assert not (out / "model.safetensors").exists()
    assert read_info(out)["adapter"] and read_info(out)["value_init"] == str(value_dir)
    # transformers loads the adapter onto the model it adapts (recorded in adapter_config.json).
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert hasattr(lm, "peft_config")
    ids = toy.test[:4, : L + 2]
    gen = GuidedCausalLM(AutoModelForCausalLM.from_pretrained(toy.base), lm).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert gen.shape == (4, L + 4)


def test_different_vocabularies_need_a_map(toy, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from ivl_kernels._map_cli import main as map_main
    from ivl_kernels.hf import GuidedCausalLM
    from ivl_kernels.vocab import VocabMap

    value_dir = tmp_path / "value_other_vocab"  # digits at other ids: another vocabulary
    demo._qwen(32, 2, 5).save_pretrained(value_dir)
    make_tokenizer(digit_ids={str(d): 13 - d for d in range(10)}).save_pretrained(value_dir)
    out = tmp_path / "out"
    args = [toy.base, value_dir, "--data", toy.data, "-o", out, "--max-steps", "2", "--save-steps", "2",
            "--use-cpu", "--no-progress"]
    assert _run(args) == 2
    assert "ivl-kernels map" in capsys.readouterr().err
    map_file = tmp_path / "map.pt"
    assert map_main([str(toy.base), str(value_dir), "-o", str(map_file)]) == 0
    assert _run(args + ["--map", map_file]) == 0
    info = read_info(out)
    assert info["vocab_map"]["file"] == "vocab_map.pt" and info["vocab_map"]["method"] == "exact"
    assert (out / "checkpoint-2" / "vocab_map.pt").is_file()
    vmap = VocabMap.load(out / "vocab_map.pt")
    assert vmap.index[demo.DIGIT0 + 3].item() == 13 - 3  # base "3" -> value "3"
    ids = toy.test[:4, : L + 2]
    lm = GuidedCausalLM(AutoModelForCausalLM.from_pretrained(toy.base), AutoModelForCausalLM.from_pretrained(out),
                        vocab_map=vmap)
    assert lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       pad_token_id=0).shape == (4, L + 4)


def test_usage_errors(toy, tmp_path, capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "usage: ivl-kernels train" in capsys.readouterr().out
    assert _run([toy.base, toy.value, "--data", tmp_path / "missing.jsonl", "-o", tmp_path / "o"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert _run([toy.base, toy.value, "--data", toy.data, "-o", tmp_path / "o", "--resume", "latest"]) == 2
    assert "no checkpoint-N directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 |", "response": "1"}\n{"text": "x"}\n')
    assert _run([toy.base, toy.value, "--data", bad, "-o", tmp_path / "o"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


# ---- writers: starting over, re-saving, odd outputs, bad numbers --------------------------------------------------

SHORT = ["--batch-size", "16", "--logging-steps", "1", "--use-cpu", "--no-progress"]


def _checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def test_overwrite_never_resumes_into_the_earlier_run(toy, tmp_path, monkeypatch, capsys):
    """Run A leaves complete checkpoints 2 and 4; run B starts over with --overwrite and is interrupted (Ctrl-C)
    just after its own complete checkpoint-2. Before: A's checkpoints stayed, so --resume latest took A's
    checkpoint-4; now B removes them when it starts, and latest is B's checkpoint-2."""
    from ivl_kernels.hf import trainer as T
    from ivl_kernels.hf.train_cli import _resolve_resume

    out = tmp_path / "out"
    args = [toy.base, toy.value, "--data", toy.data, "-o", out, "--save-steps", 2, *SHORT]
    assert _run(args + ["--max-steps", 4, "--seed", 0]) == 0
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    real = T.IVLTrainer._save_checkpoint

    def interrupted(self, model, trial):
        real(self, model, trial)
        if self.state.global_step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(T.IVLTrainer, "_save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(args + ["--max-steps", 8, "--seed", 7, "--overwrite"])
    assert "removed the earlier run's checkpoint-4, checkpoint-2" in capsys.readouterr().err
    assert _checkpoints(out) == ["checkpoint-2"] and not [n for n in os.listdir(out) if n.startswith(".")]
    assert read_info(out / "checkpoint-2")["training"]["seed"] == 7
    assert _resolve_resume("latest", str(out), False) == str(out / "checkpoint-2")

    # A complete-looking checkpoint-N that ivl-kernels did not write is never removed: --overwrite refuses to start.
    foreign = tmp_path / "foreign"
    (foreign / "checkpoint-9").mkdir(parents=True)
    (foreign / "checkpoint-9" / "trainer_state.json").write_text("{}")
    (foreign / "checkpoint-9" / "model.safetensors").write_text("x")
    assert _run([toy.base, toy.value, "--data", toy.data, "-o", foreign, "--max-steps", 1, "--overwrite",
                 *SHORT]) == 2
    assert "checkpoint-9, a checkpoint ivl-kernels train did not write" in capsys.readouterr().err
    assert sorted(os.listdir(foreign / "checkpoint-9")) == ["model.safetensors", "trainer_state.json"]


def test_resaving_an_existing_checkpoint_invalidates_it_first(toy, tmp_path, monkeypatch):
    """Resumed from checkpoint-2, the run writes checkpoint-4 again over the complete one and is interrupted
    after the weights, before the optimizer state. Before: the old marker stayed and checkpoint-4 (new weights,
    old optimizer and trainer state) was taken as complete; now it is incomplete and latest is checkpoint-2."""
    from ivl_kernels.hf import trainer as T
    from ivl_kernels.hf.train_cli import _resolve_resume, checkpoint_problem

    out = tmp_path / "out"
    args = [toy.base, toy.value, "--data", toy.data, "-o", out, "--save-steps", 2, "--max-steps", 4, *SHORT]
    assert _run(args) == 0
    assert checkpoint_problem(str(out / "checkpoint-4")) is None

    def interrupted(self, output_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.IVLTrainer, "_save_optimizer_and_scheduler", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(args + ["--resume", "checkpoint-2"])
    assert checkpoint_problem(str(out / "checkpoint-4")) is not None
    assert not (out / "checkpoint-4" / COMPLETE_NAME).exists()
    assert _resolve_resume("latest", str(out), False) == str(out / "checkpoint-2")


def test_output_given_as_a_symlink(toy, tmp_path, capsys):
    """-o a link to an empty directory: before, the finished run's save did os.rmdir on the link
    (NotADirectoryError, the training lost); now the run is written into the directory the link points to.
    A link to nothing is refused before any work."""
    real, link = tmp_path / "scratch" / "run", tmp_path / "run"
    real.mkdir(parents=True)
    link.symlink_to(real)
    assert _run([toy.base, toy.value, "--data", toy.data, "-o", link, "--max-steps", 1, "--save-steps", 0,
                 *SHORT]) == 0
    assert link.is_symlink() and {"model.safetensors", "ivl_train.json"} <= set(os.listdir(real))
    assert sorted(os.listdir(tmp_path)) == ["run", "scratch"] and os.listdir(tmp_path / "scratch") == ["run"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    assert _run([toy.base, toy.value, "--data", toy.data, "-o", dangling, "--max-steps", 1, *SHORT]) == 2
    assert "symbolic link" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_overwrite_replaces_weights_of_the_other_kind(toy, tmp_path):
    """A full run with --overwrite over a LoRA run: before, the old adapter_config.json / adapter_model.safetensors
    stayed and every loader took the old adapter instead of the new weights; now they are removed. And the
    reverse: an adapter over full weights removes model.safetensors."""
    from safetensors.torch import load_file

    from ivl_kernels.hf.checkpoint import load_causal_lm

    out = tmp_path / "out"
    args = [toy.base, toy.value, "--data", toy.data, "-o", out, "--max-steps", 1, "--save-steps", 0, *SHORT]
    assert _run(args + ["--lora-r", 2]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert _run(args + ["--overwrite"]) == 0
    names = set(os.listdir(out))
    assert "model.safetensors" in names and not names & {"adapter_config.json", "adapter_model.safetensors"}
    loaded = load_causal_lm(str(out), "value")
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    assert _run(args + ["--lora-r", 2, "--overwrite"]) == 0
    names = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names


def test_an_input_inside_out_is_refused(toy, tmp_path, capsys):
    """VALUE = OUT/checkpoint-2 (or --map OUT/vocab_map.pt) with -o OUT: before, the run wrote its own checkpoint-2
    (its final vocab_map.pt) over its input; now it is refused, with or without --overwrite."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(toy.value, out / "checkpoint-2")
    before = (out / "checkpoint-2" / "model.safetensors").read_bytes()
    for extra in ([], ["--overwrite"], ["--resume", "latest"]):
        assert _run([toy.base, out / "checkpoint-2", "--data", toy.data, "-o", out, "--max-steps", 2,
                     "--save-steps", 2, *SHORT, *extra]) == 2
        err = capsys.readouterr().err
        assert "lies inside -o" in err and "checkpoint-2" in err, err
    assert (out / "checkpoint-2" / "model.safetensors").read_bytes() == before
    assert os.listdir(out) == ["checkpoint-2"]


@pytest.mark.parametrize("extra, flag", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"), (["--epochs", "nan"], "--epochs"),
    (["--max-steps", "0"], "--max-steps"), (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"), (["--l1-coef", "-1"], "--l1-coef"), (["--l1-coef", "1e39"], "--l1-coef"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--alpha", "0"], "--alpha"), (["--alpha", "nan"], "--alpha"),
    (["--lora-r", "2", "--lora-alpha", "nan"], "--lora-alpha"),
    (["--lora-r", "2", "--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-r", "2", "--lora-dropout", "1"], "--lora-dropout"), (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--seed", "-1"], "--seed"), (["--save-total-limit", "0"], "--save-total-limit"),
])
def test_bad_numbers_are_refused_before_any_work(toy, tmp_path, capsys, extra, flag):
    """Before: --epochs nan, --lr -1, --l1-coef -1 raised a traceback once training started and left an empty
    OUT; --weight-decay nan and --lora-alpha nan trained to NaN with exit 0; --epochs 0 saved an untrained
    network. Now: exit 2, a message naming the flag, nothing written."""
    out = tmp_path / "out"
    assert _run([toy.base, toy.value, "--data", toy.data, "-o", out, *SHORT, *extra]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must be" in err and "Traceback" not in err, err
    assert not out.exists()


def test_console_script_help(capsys):
    """The console entry point (``ivl-kernels``, else ``python -m ivl_kernels.cli``) runs ``train``."""
    assert cli.main([]) == 2 and "train" in capsys.readouterr().out  # listed in the top-level usage
    script = Path(sys.executable).parent / "ivl-kernels"
    prefix = [str(script)] if script.is_file() else [sys.executable, "-m", "ivl_kernels.cli"]
    proc = subprocess.run(prefix + ["train", "--help"], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: ivl-kernels train" in proc.stdout and "--resume" in proc.stdout
