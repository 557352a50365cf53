"""Guidance strength per request on vLLM: ``SamplingParams(extra_args={"ivl_alpha": [1.0, -0.5]})``.

vLLM 0.32 calls ``model.compute_logits(hidden_states)`` with the rows it samples from and nothing else (no request
ids, no sampling parameters), so the guided head computes every row with the checkpoint's alphas. A request that
sets its own alphas gets them from a vLLM *logits processor* (the one place that knows which row is which request):

* ``compute_logits`` keeps a reference to the rows it was given (``model.last_rows``, ``[M, Hb + Hv_0 + ...]``:
  the base's and every term's final hidden states side by side; no copy);
* the processor, which vLLM calls on those same logits before it samples, adds for each term ``i``
  ``(alpha_req[m, i] - alpha_ckpt[i]) * remap_i(term_i[m])`` in place with ``fused_guided_logits`` and a per-row
  alpha tensor ``[M]`` (rows of requests without ``ivl_alpha`` get 0, i.e. stay exactly as computed). The result
  is ``base + sum_i alpha_req[m, i] * remap_i(term_i[m])``: what a checkpoint composed with those alphas gives, up
  to float32 rounding of the two-step sum (a few ulps). Ids the checkpoint suppresses stay ``-inf``.

The processor class is added to the engine's ``logits_processors`` by the plugin's config hook
(``enable_per_request_alpha``), so nothing is to be passed by the user. Its name carries the number of terms
and the checkpoint's alphas as float32 bit patterns (``AlphaProcessorV1_T2_3f333333_bf000000``: the module's
``__getattr__`` builds it on demand), because vLLM validates each request with ``validate_params(sampling_params)``
in the front-end without any configuration: the class itself must know how many alphas a request may give, and
the checkpoint's alphas, to refuse a request whose change from them is beyond float32's range. Invalid values are
refused there, for that request only (``LLM.generate`` raises; the OpenAI server answers 400); the engine never
sees them.

Semantics (also in the README's serving section):

* sampled tokens, and returned logprobs with ``logprobs_mode="processed_logprobs"`` / ``"processed_logits"``,
  follow the request's alphas;
* returned logprobs in vLLM's default ``logprobs_mode="raw_logprobs"`` (and ``"raw_logits"``) are taken before
  logits processors run: they are the checkpoint's alphas' distribution;
* prompt logprobs (``prompt_logprobs=k``) are computed by ``compute_logits`` directly, bypassing processors: the
  checkpoint's alphas;
* both model runners: V1 (``update_state(BatchUpdate)`` / ``apply(logits)``; rows are batch indices) and V2
  (``add_request(slot, params)`` / ``apply(logits, ctx)``; rows map to slots through
  ``ctx.expanded_idx_mapping``, one row per draft token under speculative decoding). In V2 the processor runs
  after the penalties: presence/frequency penalties are additive and commute with the correction, a repetition
  penalty (multiplicative) is applied to the checkpoint-alpha logits before it;
* vLLM's V1 runner refuses custom logits processors under speculative decoding (``build_logitsprocs`` raises when
  any is configured), so there the processor is not installed and ``ivl_alpha`` is not available. A request that
  sets it is refused in the front-end (``refuse_alpha_under_speculative``; ``LLM.generate`` raises a
  ``ValueError``, the OpenAI server answers 400), for that request only: it would otherwise silently get the
  checkpoint's alphas. vLLM runs ``validate_params`` only for the processors it is configured with, i.e. none
  there, so the plugin extends the front-end's per-request logits-processor validator instead
  (``install_speculative_refusal``); requests without ``ivl_alpha`` are served unchanged.
"""

from __future__ import annotations

import functools
import logging
import numbers
import re
import struct
import weakref
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .._validate import _FLOAT32_MAX, _shown, check_alpha_float
from ..checkpoint_format import GUIDED_ARCHITECTURE
from ..ops.guided_logits import fused_guided_logits

ALPHA_KEY = "ivl_alpha"
_MODULE = __name__
# AlphaProcessor<runner>_T<n terms>[_<alpha_i as float32 bits, 8 hex digits> for each term]
_CLASS_NAME = re.compile(r"^AlphaProcessor(V1|V2)_T([1-9][0-9]{0,3})((?:_[0-9a-f]{8})*)$")

logger = logging.getLogger(__name__)


# ---- validation ------------------------------------------------------------------------------------------------
def parse_alpha(extra_args, n_terms: int,
                checkpoint_alphas: Optional[Sequence[float]] = None) -> Optional[Tuple[float, ...]]:
    """The alphas a request asks for: ``None`` when it sets no ``ivl_alpha`` (the checkpoint's apply), else a
    tuple of ``n_terms`` floats, each finite in float32 (``check_alpha_float``: the package's one rule; the
    kernels compute in float32). ``ValueError`` naming the argument and what it must be otherwise.

    Accepted: a list (or tuple) of ``n_terms`` real numbers, or a single real number when the checkpoint has one
    term. ``0`` turns a term off. Not accepted: strings (also numeric ones), booleans, NaN, infinities, values
    beyond float32's range, a wrong length, a single number for a checkpoint of several terms (which term would it
    be for?). With ``checkpoint_alphas`` (``n_terms`` floats), also not a value whose change from the checkpoint's
    alpha (``alpha_delta``, what the correction computes with) is beyond float32's range."""
    if not extra_args or ALPHA_KEY not in extra_args:
        return None
    value = extra_args[ALPHA_KEY]
    want = (f"a list of {n_terms} numbers finite in float32 (one per guidance term"
            + (", or a single number)" if n_terms == 1 else ")"))
    where = f'extra_args["{ALPHA_KEY}"] (vllm_xargs in the OpenAI API)'
    if value is None:
        return None
    if _is_real(value):
        if n_terms != 1:
            raise ValueError(f"{where}={value!r}: this guided checkpoint has {n_terms} terms; give {want}")
        value = [value]
    elif not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}={value!r} ({type(value).__name__}): expected {want}")
    if len(value) != n_terms:
        raise ValueError(f"{where}={list(value)!r} has {len(value)} entries: expected {want}")
    out = []
    for i, v in enumerate(value):
        if not _is_real(v):
            raise ValueError(f"{where}[{i}]={v!r} ({type(v).__name__}): expected {want}")
        try:  # exact for ints (10**400 is out of range, not an OverflowError); a TypeError must reach vLLM as a
            # ValueError too: vLLM turns only ValueErrors of validate_params into a refusal of this request
            f = check_alpha_float(ALPHA_KEY, v if isinstance(v, (int, float)) else float(v))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"{where}[{i}]={_shown(v)}: {exc}; expected {want}") from None
        out.append(f)
    if checkpoint_alphas is not None:
        for i, d in enumerate(alpha_delta(out, checkpoint_alphas)):
            if abs(d) > _FLOAT32_MAX:
                raise ValueError(f"{where}[{i}]={out[i]!r}: its change from the checkpoint's alpha "
                                 f"{checkpoint_alphas[i]!r} is {d:.4g}, beyond float32's range, in which the "
                                 f"correction is computed; expected a value within {_FLOAT32_MAX:.4g} of the "
                                 f"checkpoint's alpha")
    return tuple(out)


def alpha_delta(alpha: Sequence[float], checkpoint_alphas: Sequence[float]) -> Tuple[float, ...]:
    """Per term, ``float32(alpha_i) - checkpoint_alphas[i]`` (Python floats). The checkpoint's alphas are the
    float32 values the guided head computes with, so the request's are rounded to float32 first: a request that
    repeats the checkpoint's alpha (0.7) gets exactly 0.0 (no correction), not ``0.7 - float32(0.7)``."""
    return tuple(a - float(c) for a, c in zip(float32_alphas(alpha), checkpoint_alphas))


def float32_alphas(alphas: Sequence[float]) -> Tuple[float, ...]:
    """The float32 values of ``alphas`` (what the guided head computes with), as Python floats."""
    return tuple(float(np.float32(a)) for a in alphas)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# ---- the model side: where the processor finds the rows and the heads ----------------------------------------
_MODELS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()


def register_model(model, vllm_config) -> None:
    """Called by ``IVLGuidedForCausalLM.__init__``: the processor built from the same ``vllm_config`` (same
    worker process) finds its model here when it first applies."""
    _MODELS[id(vllm_config)] = model
    _MODELS[0] = model  # the latest one: the fallback when vLLM handed the processor a copy of the config


def _find_model(vllm_config):
    return _MODELS.get(id(vllm_config)) or _MODELS.get(0)


class _Correction:
    """Adds ``delta[m, i] * remap_i(term_i[m])`` to guided logits ``[M, Vb]`` in place (full vocabulary: under
    tensor parallelism the logits are the gathered ones, the terms' heads the gathered heads)."""

    def __init__(self, model):
        self.model = model
        plan = model.plan
        self.alphas = float32_alphas(model.alphas)  # the head's float32 values, as Python floats (alpha_delta)
        self.n_terms = len(plan.terms)
        self._maps = [None] * self.n_terms

    def vocab_map(self, i: int, device):
        if self._maps[i] is None:
            m = self.model.plan.terms[i].vocab_map  # the full map (the model's own is sliced per rank under TP)
            self._maps[i] = False if m is None else m.to(device)
        return None if self._maps[i] is False else self._maps[i]

    def apply(self, logits: torch.Tensor, delta: torch.Tensor, active: Sequence[bool]) -> bool:
        """``delta`` ``[M, T]`` float32 on the logits' device; ``active[i]``: whether any row changes term ``i``
        (known on the host: no device sync per step). False (nothing done) when the model's last rows do not line
        up with ``logits``."""
        model = self.model
        rows = getattr(model, "last_rows", None)
        if rows is None or rows.shape[0] != logits.shape[0] or delta.shape[0] != logits.shape[0]:
            return False
        if logits.shape[1] != model.vocab_size:
            return False
        parts = torch.split(rows, model.hidden_sizes, dim=-1)
        for i in range(self.n_terms):
            if not active[i]:
                continue
            fused_guided_logits(parts[i + 1], model._term_weight(i), base_logits=logits, out=logits,
                                vocab_map=self.vocab_map(i, logits.device), alpha=delta[:, i].contiguous(),
                                fill=model.fill, backend=model.backend)
        return True


class _Core:
    """What both runners' processors share: the checkpoint, the request's alphas -> a delta row, the model."""

    n_terms = 0
    checkpoint_alphas: Optional[Tuple[float, ...]] = None  # float32 values, from the class name (front-end checks)

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self._correction: Optional[_Correction] = None
        self._warned = False

    def correction(self) -> Optional[_Correction]:
        if self._correction is None:
            model = _find_model(self.vllm_config)
            if model is None:
                self._warn("no guided model was built in this process")
                return None
            self._correction = _Correction(model)
        return self._correction

    def delta_for(self, params) -> Optional[Tuple[float, ...]]:
        """The per-term change a request asks for, or None for the checkpoint's alphas. Never raises: values
        were validated in the front-end; anything else here is logged and ignored (the engine must keep
        serving)."""
        try:
            alpha = parse_alpha(getattr(params, "extra_args", None), type(self).n_terms)
        except ValueError as exc:
            self._warn(f"ignored an unvalidated {ALPHA_KEY}: {exc}")
            return None
        if alpha is None:
            return None
        corr = self.correction()
        if corr is None:
            return None
        delta = alpha_delta(alpha, corr.alphas)
        if any(abs(d) > _FLOAT32_MAX for d in delta):  # refused in the front-end when its class knows the alphas
            self._warn(f"ignored {ALPHA_KEY}={list(alpha)}: its change from the checkpoint's alphas "
                       f"{list(corr.alphas)} is beyond float32's range")
            return None
        return delta if any(d != 0.0 for d in delta) else None

    def correct(self, logits: torch.Tensor, delta: torch.Tensor, active: Sequence[bool], where: str) -> None:
        """Apply the correction; never raises (an exception here would stop the engine for every request)."""
        corr = self.correction()
        try:
            done = corr is not None and corr.apply(logits, delta, active)
        except Exception as exc:  # not expected: logged, and this step keeps the logits it has
            logger.exception("ivl_kernels per-request alpha: the correction failed (%s)", where)
            self._warn(f"the correction failed: {type(exc).__name__}: {exc}")
            return
        if not done:
            self._warn(f"rows did not line up ({logits.shape[0]} logits rows, {where}); this step used the "
                       f"checkpoint's alphas")

    def _warn(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("ivl_kernels per-request alpha: %s", msg)


def _validate(cls, sampling_params) -> None:
    parse_alpha(getattr(sampling_params, "extra_args", None), cls.n_terms, cls.checkpoint_alphas)


# ---- model runner V1 (vllm.v1.sample.logits_processor) -----------------------------------------------------------
def _v1_class():
    from vllm.v1.sample.logits_processor.interface import LogitsProcessor, MoveDirectionality

    class AlphaProcessorV1(_Core, LogitsProcessor):
        """V1 interface: rows of ``apply(logits)`` are the persistent batch's indices ``0 .. batch_size - 1``."""

        validate_params = classmethod(_validate)

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            _Core.__init__(self, vllm_config)
            self.device = device
            self.deltas: dict = {}  # batch index -> per-term delta (requests whose alphas differ only)
            self.batch_size = 0
            self._delta: Optional[torch.Tensor] = None  # [batch_size, T], None when every row is default
            self._active: list = []

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token is greedy

        def update_state(self, batch_update) -> None:
            if batch_update is None:
                return
            # vLLM's documented order: removed, then added (may reuse an index), then moved.
            for index in batch_update.removed:
                self.deltas.pop(index, None)
            for index, params, _prompt, _out in batch_update.added:
                d = self.delta_for(params)
                if d is None:
                    self.deltas.pop(index, None)
                else:
                    self.deltas[index] = d
            for a, b, direction in batch_update.moved:
                da, db = self.deltas.pop(a, None), self.deltas.pop(b, None)
                if da is not None:
                    self.deltas[b] = da
                if db is not None and direction == MoveDirectionality.SWAP:
                    self.deltas[a] = db
            self.batch_size = batch_update.batch_size
            live = {i: d for i, d in self.deltas.items() if i < self.batch_size}
            if not live:
                self._delta = None
                return
            delta = torch.zeros((self.batch_size, type(self).n_terms), dtype=torch.float32)
            for i, d in live.items():
                delta[i] = torch.tensor(d, dtype=torch.float32)
            self._active = (delta != 0).any(dim=0).tolist()
            self._delta = delta.to(self.device)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if self._delta is None:
                return logits
            self.correct(logits, self._delta, self._active, f"batch {self.batch_size}")
            return logits

    return AlphaProcessorV1


# ---- model runner V2 (vllm.v1.worker.gpu.sample.logits_processor) -----------------------------------------------
def _v2_class():
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

    class AlphaProcessorV2(_Core, LogitsProcessor):
        """V2 interface: per-slot state set in ``add_request``; ``apply(logits, ctx)`` maps each row to its slot
        with ``ctx.expanded_idx_mapping`` (several rows per request under speculative decoding)."""

        validate_params = classmethod(_validate)

        def __init__(self, vllm_config, req_states):
            _Core.__init__(self, vllm_config)
            n = int(req_states.max_num_reqs)
            self.table = torch.zeros((n, type(self).n_terms), dtype=torch.float32, device=req_states.device)
            self.host = np.zeros((n, type(self).n_terms), dtype=np.float32)  # the table's host copy: per-step
            # decisions (any custom row? which terms?) without a device sync

        def add_request(self, req_idx: int, sampling_params) -> bool:
            d = self.delta_for(sampling_params)
            # A recycled slot: overwrite the previous occupant's row either way.
            self.host[req_idx] = d if d is not None else 0.0
            self.table[req_idx] = torch.from_numpy(self.host[req_idx])
            return d is not None

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            active = (self.host[ctx.idx_mapping_np] != 0).any(axis=0).tolist()
            if not any(active):
                return logits
            self.correct(logits, self.table[ctx.expanded_idx_mapping.long()], active,
                         f"{len(ctx.idx_mapping_np)} requests")
            return logits

    return AlphaProcessorV2


_BASES: dict = {}    # runner -> its processor base class (built on first use: imports that runner's interface)
_CLASSES: dict = {}  # class name -> the class vLLM loads by name


def _alpha_bits(alphas: Sequence[float]) -> str:
    """``_3f333333_bf000000``: each alpha's float32 bit pattern (exact, and a valid Python identifier part)."""
    return "".join("_" + struct.pack(">f", float(a)).hex() for a in alphas)


def _processor_class(runner: str, n_terms: int, bits: str = ""):
    name = f"AlphaProcessor{runner}_T{n_terms}{bits}"
    if name not in _CLASSES:
        if runner not in _BASES:
            _BASES[runner] = _v1_class() if runner == "V1" else _v2_class()
        base = _BASES[runner]
        alphas = tuple(struct.unpack(">f", bytes.fromhex(h))[0] for h in bits.split("_")[1:]) or None
        cls = type(name, (base,), {"n_terms": n_terms, "checkpoint_alphas": alphas, "__module__": _MODULE,
                                   "__qualname__": name})
        _CLASSES[name] = cls
    return _CLASSES[name]


def __getattr__(name: str):
    """``AlphaProcessorV1_T<n>[_<bits>...]`` / ``AlphaProcessorV2_T<n>[_<bits>...]``: the processor class for a
    checkpoint of ``n`` terms, with its alphas when named (vLLM loads it by this name in the front-end and in
    every worker)."""
    m = _CLASS_NAME.match(name)
    if m is None or (m.group(3) and m.group(3).count("_") != int(m.group(2))):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _processor_class(m.group(1), int(m.group(2)), m.group(3))


def processor_fqcn(n_terms: int, v2: bool, alphas: Optional[Sequence[float]] = None) -> str:
    """The processor's ``module:class`` name for a checkpoint of ``n_terms`` terms (with ``alphas``, ``n_terms``
    floats finite in float32: its class also refuses requests whose change from them overflows float32)."""
    if alphas is not None and len(alphas) != int(n_terms):
        raise ValueError(f"alphas must hold n_terms={n_terms} values, got {len(alphas)}")
    bits = "" if alphas is None else _alpha_bits(alphas)
    return f"{_MODULE}:AlphaProcessor{'V2' if v2 else 'V1'}_T{int(n_terms)}{bits}"


def enable_per_request_alpha(vllm_config, alphas: Sequence[float]) -> Optional[str]:
    """The config hook's part (front-end, and again wherever vLLM rebuilds its configuration): add this
    checkpoint's processor (its terms' ``alphas``) to ``model_config.logits_processors`` (once). Returns why it
    was not added, or None.

    Not added under speculative decoding with the V1 model runner, which refuses every custom logits processor
    then (``build_logitsprocs``: "Custom logits processors are not supported when speculative decoding is
    enabled"): requests that set ``ivl_alpha`` are refused in the front-end instead
    (``install_speculative_refusal``)."""
    model_config = vllm_config.model_config
    v2 = bool(vllm_config.use_v2_model_runner)
    if alpha_unavailable(vllm_config):
        why = ("vLLM's V1 model runner refuses custom logits processors under speculative decoding: per-request "
               f"alpha ({ALPHA_KEY}) is not available; ")
        if install_speculative_refusal():
            return why + (f"requests that set {ALPHA_KEY} are refused (LLM.generate raises, the server answers "
                          "400), requests without it get the checkpoint's alphas")
        return why + (f"this vLLM version offers no front-end hook the plugin knows "
                      f"(InputProcessor.{_VALIDATOR_BUILDER}), so requests that set {ALPHA_KEY} are NOT refused: "
                      "they silently get the checkpoint's alphas")
    name = processor_fqcn(len(alphas), v2, alphas)
    current = list(model_config.logits_processors or [])
    if name not in current:
        model_config.logits_processors = current + [name]
    return None


# ---- speculative decoding with the V1 runner: no processor, so a request that sets ivl_alpha is refused -----------
# vLLM 0.32's front-end (``vllm.v1.engine.input_processor.InputProcessor``) validates each request's sampling
# parameters in ``_validate_params``; for logits processors it calls the validator built once per engine by
# ``_build_logits_processors_params_validator`` (V1 runner: ``validate_logits_processors_parameters`` over the
# classes of ``model_config.logits_processors`` and of the ``vllm.logits_processors`` entry points), which runs
# each class's ``validate_params``. Under speculative decoding the plugin cannot list its processor there (the V1
# worker then refuses to start), so no ``validate_params`` of its own ever runs, and ``SamplingParams.verify``
# (vLLM's own refusal of ``min_p``/``logit_bias`` under speculative decoding) has no plugin hook. The plugin wraps
# that builder instead: for a guided engine where ``alpha_unavailable`` (checked per engine, so other engines in
# the process are untouched), the validator it returns first refuses a request that sets ``ivl_alpha``. A
# ``ValueError`` there fails that request only, before it reaches the engine (the engine keeps serving).
_VALIDATOR_BUILDER = "_build_logits_processors_params_validator"
_ERROR_CLASS: list = []


def alpha_unavailable(vllm_config) -> bool:
    """Whether vLLM runs no custom logits processor for this configuration: speculative decoding with the V1 model
    runner (the V2 runner runs them, one row per draft token)."""
    return (getattr(vllm_config, "speculative_config", None) is not None
            and not bool(getattr(vllm_config, "use_v2_model_runner", False)))


def _alpha_unavailable_error(message: str) -> Exception:
    """A ``ValueError`` that is also vLLM's ``VLLMValidationError`` (the OpenAI server answers 400 for it, with its
    message; ``LLM.generate`` raises it)."""
    if not _ERROR_CLASS:
        try:
            from vllm.exceptions import VLLMValidationError
            bases: tuple = (VLLMValidationError, ValueError)
        except ImportError:  # pragma: no cover - vLLM versions without it
            bases = (ValueError,)
        _ERROR_CLASS.append(type("AlphaUnavailableError", bases, {"__module__": _MODULE}))
    return _ERROR_CLASS[0](message)


def _shown_value(value) -> str:
    text = _shown(value) if isinstance(value, int) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse_alpha_under_speculative(sampling_params, checkpoint_alphas: Optional[Sequence[float]] = None) -> None:
    """``ValueError`` when the request sets ``ivl_alpha`` (any value, well-formed or not; ``None`` is unset): under
    speculative decoding with the V1 runner nothing would apply it, and the request would get the checkpoint's
    alphas without a word."""
    extra = getattr(sampling_params, "extra_args", None)
    if not extra or ALPHA_KEY not in extra or extra[ALPHA_KEY] is None:
        return
    have = "" if not checkpoint_alphas else f" {list(checkpoint_alphas)}"
    raise _alpha_unavailable_error(
        f'extra_args["{ALPHA_KEY}"] (vllm_xargs in the OpenAI API)={_shown_value(extra[ALPHA_KEY])}: per-request '
        f"alpha is not available with speculative decoding (vLLM's V1 model runner runs no custom logits processor "
        f"then: this request would get the checkpoint's alphas{have}). Leave {ALPHA_KEY} unset to get the "
        f"checkpoint's alphas; for other alphas serve the checkpoint without speculative_config, or write a "
        f"checkpoint with those alphas (`ivl-kernels compose BASE VALUE -o DIR --alpha A`, or --term MODEL:ALPHA "
        f"per term) and serve that one")


def _is_guided(vllm_config) -> bool:
    model_config = getattr(vllm_config, "model_config", None)
    try:
        return GUIDED_ARCHITECTURE in (getattr(model_config, "architectures", None) or [])
    except Exception:  # a configuration vLLM built without an architecture (not a guided one)
        return False


def _checkpoint_alphas(vllm_config) -> Optional[Tuple[float, ...]]:
    """The guided checkpoint's alphas, for the refusal's message (None where they cannot be read)."""
    try:
        terms = vllm_config.model_config.hf_config.ivl_guided["terms"]
        return tuple(float(t.get("alpha", 1.0)) for t in terms)
    except Exception:
        return None


def install_speculative_refusal() -> bool:
    """Wrap vLLM's ``InputProcessor._build_logits_processors_params_validator`` (once per process; the config hook
    calls this in the front-end before vLLM builds its ``InputProcessor``) so that a guided engine where
    ``alpha_unavailable`` refuses requests that set ``ivl_alpha`` (``refuse_alpha_under_speculative``) before
    vLLM's own checks of logits-processor parameters. Every other engine gets vLLM's validator unchanged. False
    where this vLLM has no such method (then nothing is refused)."""
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:
        return False
    build = getattr(InputProcessor, _VALIDATOR_BUILDER, None)
    if build is None or not callable(build):
        return False
    if getattr(build, "_ivl_refuses_alpha", False):
        return True

    @functools.wraps(build)
    def build_validator(self, *args, **kwargs):
        validate = build(self, *args, **kwargs)
        config = getattr(self, "vllm_config", None)
        if not (_is_guided(config) and alpha_unavailable(config)):
            return validate
        alphas = _checkpoint_alphas(config)

        def validate_params(sampling_params):
            refuse_alpha_under_speculative(sampling_params, alphas)
            return validate(sampling_params)

        validate_params._ivl_refuses_alpha = True
        return validate_params

    build_validator._ivl_refuses_alpha = True
    setattr(InputProcessor, _VALIDATOR_BUILDER, build_validator)
    return True


__all__ = ["ALPHA_KEY", "parse_alpha", "alpha_delta", "register_model", "processor_fqcn",
           "enable_per_request_alpha", "alpha_unavailable", "refuse_alpha_under_speculative",
           "install_speculative_refusal"]
