"""Alpha per request (``SamplingParams(extra_args={"ivl_alpha": [...]})``): rows of different alphas in one batch
give what separate checkpoints composed with those alphas give (tokens, and logprobs with
``logprobs_mode="processed_logprobs"``); prompt logprobs keep the checkpoint's alphas (documented); bad values
are refused for that request only. The processors' row bookkeeping is also checked directly for both model
runners' interfaces (vLLM's CPU build runs only the V1 runner: the V2 runner needs Triton's CPU backend)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _vllm_models import PROXY_ALPHAS, write_proxy  # noqa: E402
from _vllm_util import ENGINE, prompts, reference, shutdown  # noqa: E402

NEW = 8
ROWS = prompts([3, 21, 9, 40, 14], seed=51)
# Per row: its request's ivl_alpha (None: the checkpoint's) and max_tokens (different lengths: requests leave the
# batch at different steps, so vLLM moves the remaining rows and the processor must follow them).
ALPHAS = [None, [0.0] * 5, [2.0, -1.0, 0.0, 0.5, -0.3], list(PROXY_ALPHAS), [0.5, 0.0, 0.0, 0.0, 0.0]]
MAX_TOKENS = [NEW, 3, NEW, 5, NEW]


@pytest.fixture(scope="module")
def llm(checkpoints):
    from vllm import LLM

    llm = LLM(model=checkpoints["proxy"], enforce_eager=True, logprobs_mode="processed_logprobs", **ENGINE)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def separate(models, tmp_path_factory):
    """Row -> (tokens, logits) of GuidedCausalLM on a checkpoint composed with that row's alphas."""
    root = tmp_path_factory.mktemp("per_request")
    out = []
    for r, (row, alpha) in enumerate(zip(ROWS, ALPHAS)):
        path = write_proxy(str(root / f"alphas_{r}"), models, alpha or PROXY_ALPHAS)
        out.append(reference(path, [row], NEW))
    return out


def _params(alpha, **kw):
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": NEW, "temperature": 0.0,
                             "extra_args": None if alpha is None else {"ivl_alpha": alpha}, **kw})


def test_processor_installed_by_the_plugin(llm):
    from ivl_kernels.vllm._per_request import processor_fqcn

    # Its name carries the checkpoint's alphas (float32 bits), for the front-end's checks of each request.
    assert llm.llm_engine.vllm_config.model_config.logits_processors == [processor_fqcn(5, False, PROXY_ALPHAS)]


def test_mixed_alphas_in_one_batch_match_separate_checkpoints(llm, separate):
    outs = llm.generate([{"prompt_token_ids": r} for r in ROWS],
                        [_params(a, max_tokens=n, logprobs=3) for a, n in zip(ALPHAS, MAX_TOKENS)], use_tqdm=False)
    worst = 0.0
    for r, o in enumerate(outs):
        want, logits = separate[r]
        n = MAX_TOKENS[r]
        assert list(o.outputs[0].token_ids) == want[0][:n], r
        ref = torch.log_softmax(logits[0].double(), dim=-1)
        for t, step in enumerate(o.outputs[0].logprobs):
            assert set(torch.topk(ref[t], 3).indices.tolist()) <= set(step), (r, t)
            worst = max(worst, max(abs(lp.logprob - float(ref[t, tok])) for tok, lp in step.items()))
    assert worst < 1e-4, worst
    # The rows really differ: all terms off (row 1) is the base alone, not the checkpoint.
    assert separate[1][0] != reference(llm.llm_engine.model_config.model, [ROWS[1]], NEW)[0]


def test_prompt_logprobs_keep_the_checkpoint_alphas(llm, checkpoints):
    from ivl_kernels.hf import GuidedCausalLM

    row = ROWS[3]
    out = llm.generate([{"prompt_token_ids": row}], _params(ALPHAS[2], max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    lm = GuidedCausalLM.from_pretrained(checkpoints["proxy"], backend="torch")
    with torch.no_grad():
        ref = torch.log_softmax(lm(torch.tensor([row])).logits[0].double(), dim=-1)  # [T, V]
    worst = max(abs(lp.logprob - float(ref[t - 1, tok]))
                for t, step in enumerate(out.prompt_logprobs) if step for tok, lp in step.items())
    assert worst < 1e-4, worst


@pytest.mark.parametrize("bad, message", [
    ([1.0, 2.0], "has 2 entries: expected a list of 5"),
    ([1.0, float("nan"), 0.0, 0.0, 0.0], r"\[1\]=nan"),
    ("0.5", r"'0.5' \(str\)"),
    (["1.0", 0.0, 0.0, 0.0, 0.0], r"\[0\]='1.0' \(str\)"),
    (0.5, "has 5 terms"),
    ([True, 0.0, 0.0, 0.0, 0.0], r"\(bool\)"),
    ({"a": 1}, r"\(dict\)"),
    # beyond float32's range, in which the kernels compute: refused as NaN is (the correction used to fail inside
    # the engine every step, and the request silently got the checkpoint's alphas)
    ([1e39, 0.0, 0.0, 0.0, 0.0], r"\[0\]=1e\+39: ivl_alpha must be finite in float32"),
    ([0.0, 0.0, 0.0, -3.5e38, 0.0], r"\[3\]=-3.5e\+38: ivl_alpha must be finite in float32"),
])
def test_bad_values_are_refused_for_that_request_only(llm, separate, bad, message):
    # vLLM raises its VLLMValidationError (an HTTP 400 in the server) with the processor's message.
    with pytest.raises(Exception, match=r'extra_args\["ivl_alpha"\].*' + message):
        llm.generate([{"prompt_token_ids": ROWS[0]}], _params(bad), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": ROWS[2]}], _params(ALPHAS[2]), use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == separate[2][0][0]


# ---- the processors' bookkeeping, without an engine --------------------------------------------------------------
class _FakeModel:
    """What the processors read from IVLGuidedForCausalLM: the plan's maps, the alphas, the heads, the rows."""

    def __init__(self, Vb=37, sizes=(8, 5, 6), alphas=(0.7, -0.4), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.hidden_sizes, self.alphas = Vb, list(sizes), list(alphas)
        self.fill, self.backend = 0.25, "torch"
        self.vocab = [Vb, 23]  # term 1: a smaller vocabulary with a map
        vmap = torch.randint(-1, 23, (Vb,), generator=g).to(torch.int32)
        self.plan = SimpleNamespace(terms=[SimpleNamespace(vocab_map=None), SimpleNamespace(vocab_map=vmap)])
        self.heads = [torch.randn(Vb, sizes[0], generator=g)] + [
            torch.randn(v, h, generator=g) for v, h in zip(self.vocab, sizes[1:])]
        self.last_rows = None

    def _term_weight(self, i):
        return self.heads[i + 1]

    def guided(self, rows, alphas):
        """Reference: ``[M, Vb]`` with per-row alphas ``[M, T]`` (fp64)."""
        parts = torch.split(rows.double(), self.hidden_sizes, dim=-1)
        out = parts[0] @ self.heads[0].double().T
        for i, vmap in enumerate([None, self.plan.terms[1].vocab_map]):
            v = parts[i + 1] @ self.heads[i + 1].double().T
            idx = torch.arange(self.vocab_size) if vmap is None else vmap.long()
            ok = (idx >= 0) & (idx < v.shape[1])
            term = torch.where(ok, v[:, idx.clamp(0, v.shape[1] - 1)], torch.tensor(self.fill, dtype=torch.float64))
            out += alphas[:, i:i + 1].double() * term
        return out

    def compute_logits(self, rows):
        self.last_rows = rows
        return self.guided(rows, torch.tensor([self.alphas] * rows.shape[0])).float()


def _processor(runner, model, *args):
    from ivl_kernels.vllm import _per_request

    config = object()
    _per_request.register_model(model, config)
    cls = getattr(_per_request, f"AlphaProcessor{runner}_T2")
    assert cls.__name__ == f"AlphaProcessor{runner}_T2" and cls.n_terms == 2
    return cls(config, *args)


def test_v1_processor_follows_added_removed_moved_rows():
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    model = _FakeModel()
    proc = _processor("V1", model, torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()
    a = {0: [1.5, 0.0], 1: None, 2: [0.0, -2.0], 3: list(model.alphas)}
    added = [(i, _params(al), [1, 2], []) for i, al in a.items()]
    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))

    def check(order):  # order[row] = the key of ``a`` now in that row
        rows = torch.randn(len(order), sum(model.hidden_sizes))
        got = proc.apply(model.compute_logits(rows))
        want = model.guided(rows, torch.tensor([a[k] or model.alphas for k in order]))
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)

    check([0, 1, 2, 3])
    # Request 0 finishes, 3 moves into its row; 1 and 2 swap.
    proc.update_state(BatchUpdate(batch_size=3, removed=[0], added=[],
                                  moved=[(3, 0, MoveDirectionality.UNIDIRECTIONAL), (1, 2, MoveDirectionality.SWAP)]))
    check([3, 2, 1])
    # A new request reuses a removed row; one with the checkpoint's alphas replaces a custom one.
    a[4], a[5] = [0.0, 0.0], None
    proc.update_state(BatchUpdate(batch_size=3, removed=[0, 1], added=[(0, _params(a[4]), None, []),
                                                                     (1, _params(a[5]), None, [])], moved=[]))
    check([4, 5, 1])
    proc.update_state(None)  # no change
    check([4, 5, 1])
    # Rows that do not line up with the model's last rows (not expected from vLLM): left as computed, no raise.
    logits = model.compute_logits(torch.randn(3, sum(model.hidden_sizes)))
    model.last_rows = model.last_rows[:2]
    before = logits.clone()
    assert torch.equal(proc.apply(logits), before)
    # An unexpected failure inside the correction is logged, never raised into the engine.
    model.compute_logits(torch.randn(3, sum(model.hidden_sizes)))
    model._term_weight = lambda i: (_ for _ in ()).throw(RuntimeError("boom"))
    proc.apply(model.compute_logits(torch.randn(3, sum(model.hidden_sizes))))


def test_v2_processor_maps_rows_to_slots_including_draft_rows():
    model = _FakeModel()
    states = SimpleNamespace(max_num_reqs=6, device=torch.device("cpu"))
    proc = _processor("V2", model, states)
    slots = {5: [1.5, 0.0], 2: None, 0: [0.0, -2.0]}
    assert [proc.add_request(s, _params(al)) for s, al in slots.items()] == [True, False, True]

    def run(expanded, req_slots):
        ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor(expanded, dtype=torch.int32),
                              idx_mapping_np=np.array(req_slots, dtype=np.int32))
        rows = torch.randn(len(expanded), sum(model.hidden_sizes))
        got = proc.apply(model.compute_logits(rows), ctx)
        want = model.guided(rows, torch.tensor([slots[s] or model.alphas for s in expanded]))
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)

    run([2, 5, 0], [2, 5, 0])
    run([0, 0, 0, 2, 5, 5], [0, 2, 5])  # speculative decoding: a row per draft token
    # Slot 5 is recycled by a request with the checkpoint's alphas: its old delta must not leak.
    slots[5] = None
    assert proc.add_request(5, _params(None)) is False
    run([5, 2], [5, 2])
    run([5, 0], [5, 0])


def test_alpha_validation_in_float32():
    from ivl_kernels.vllm import _per_request
    from ivl_kernels.vllm._per_request import parse_alpha

    # An integer beyond float64 is a ValueError like any value out of range (vLLM refuses only ValueErrors).
    with pytest.raises(ValueError, match=r"\[0\]=.*ivl_alpha must be finite in float32"):
        parse_alpha({"ivl_alpha": [10 ** 400]}, 1)
    assert parse_alpha({"ivl_alpha": [3e38]}, 1) == (3e38,)
    # The change from the checkpoint's alpha must stay within float32 too: the front-end's class knows the
    # checkpoint's alphas from its name.
    cls = getattr(_per_request, _per_request.processor_fqcn(2, False, [-3e38, 0.5]).split(":")[1])
    assert cls.n_terms == 2 and cls.checkpoint_alphas == (float(np.float32(-3e38)), 0.5)
    cls.validate_params(_params([-1e38, 0.5]))  # a change of 2e38: within range
    with pytest.raises(ValueError, match=r"\[0\]=3e\+38: its change from the checkpoint's alpha .* beyond float32"):
        cls.validate_params(_params([3e38, 0.5]))


def test_repeating_the_checkpoint_alpha_takes_the_no_correction_path():
    # The checkpoint's alphas are float32 (0.7 is 0.699999988...): a request repeating them changes nothing and
    # must not pay for a correction every step.
    model = _FakeModel(alphas=(0.7, -0.4))
    v1 = _processor("V1", model, torch.device("cpu"), False)
    assert v1.delta_for(_params([0.7, -0.4])) is None
    v1.update_state(SimpleNamespace(batch_size=2, removed=[], moved=[],
                                    added=[(0, _params([0.7, -0.4]), None, []), (1, _params(None), None, [])]))
    assert v1._delta is None and not v1.deltas
    rows = torch.randn(2, sum(model.hidden_sizes))
    logits = model.compute_logits(rows)
    assert v1.apply(logits) is logits
    assert v1.delta_for(_params([0.7, 0.0])) == (0.0, 0.4000000059604645)
    v2 = _processor("V2", model, SimpleNamespace(max_num_reqs=2, device=torch.device("cpu")))
    assert v2.add_request(0, _params([0.7, -0.4])) is False
