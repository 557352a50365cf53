"""The transformers-free core and the direction of the layers.

* ``ivl_kernels.guidance`` (the guidance rule) and ``ivl_kernels.checkpoint_format`` (the guided checkpoint's
  format) import and compute with transformers and vLLM unimportable (blocked by a ``sys.meta_path`` finder in a
  fresh interpreter), and the guided sum matches the fp64 oracle (``ivl_kernels.reference``);
* ``_backends`` never imports ``ops`` (ops -> _backends, one way), and each layer imports first in a fresh
  interpreter;
* ``ivl_kernels.vllm`` imports nothing private from ``ivl_kernels.hf``.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "ivl_kernels")

_BLOCK = """
import sys

class _Blocked:
    BLOCKED = ("transformers", "vllm")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocked())
for _name in [m for m in sys.modules if m.split(".")[0] in _Blocked.BLOCKED]:
    del sys.modules[_name]
"""

_CORE = _BLOCK + """
import json, os, tempfile
import torch

try:
    import transformers  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("transformers was not blocked")

from ivl_kernels import checkpoint_format as fmt
from ivl_kernels import guidance
from ivl_kernels.reference import guided_logits_naive

assert not any(m.split(".")[0] in ("transformers", "vllm") for m in sys.modules), "the core imported a framework"

torch.manual_seed(0)
M, Hb, Vb = 5, 12, 37
Hv, Vv = [8, 6], [30, 41]
bh, bw = torch.randn(M, Hb), torch.randn(Vb, Hb)
vhs = [torch.randn(M, h) for h in Hv]
vws = [torch.randn(v, h) for v, h in zip(Vv, Hv)]
# Term 0: identity (base ids >= 30 unmapped); term 1: a many-to-one map with -1 entries, a per-row alpha.
map1 = torch.randint(-1, Vv[1], (Vb,), dtype=torch.int32)
map1[:3] = 7
alpha1 = torch.linspace(-1.5, 0.5, M)
heads = [guidance.TermHead(vws[0], None, 0.75), guidance.TermHead(vws[1], map1, alpha1)]
fill, limit = -0.5, 33
got = guidance.guided_logits(bh, bw, vhs, heads, fill=fill, backend="torch", suppress_from=limit)

ref = guided_logits_naive(vhs[0], vws[0], base_hidden=bh, base_weight=bw, alpha=0.75, fill=fill,
                          dtype=torch.float64)
ref = guided_logits_naive(vhs[1], vws[1], base_logits=ref, vocab_map=map1, alpha=alpha1, fill=fill,
                          dtype=torch.float64)
ref[:, limit:] = float("-inf")
assert got.dtype == torch.float32 and got.shape == (M, Vb)
torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
assert bool(torch.isinf(got[:, limit:]).all()) and bool(torch.isfinite(got[:, :limit]).all())

# Base -> value ids: mapped ids, -1 and ids past the embedding read the fallback.
tr = guidance.BaseToValueIds(map1, input_size := 20, fallback_id := 3)
ids = torch.arange(Vb)
want = torch.where((map1.long() >= 0) & (map1.long() < input_size), map1.long(), fallback_id)
assert torch.equal(tr(ids), want) and torch.equal(tr.table(Vb), want)
assert torch.equal(guidance.BaseToValueIds(None, 30, 0)(ids), torch.where(ids < 30, ids, 0))

# The head checks and suppression rule.
class _Cfg:
    final_logit_softcapping = 30.0
assert "final_logit_softcapping=30.0" in guidance.logit_transform(_Cfg())
assert guidance.logit_transform(object()) is None
assert guidance.resolve_suppress_from(None, None, Vb) is None and guidance.resolve_suppress_from(33, None, Vb) == 33

# The checkpoint format reads without transformers.
with tempfile.TemporaryDirectory() as d:
    doc = fmt.guided_config_dict("base", [{"model": "value", "alpha": 0.5, "map": None}], fill=0.0,
                                 suppress_ids_from=None,
                                 base_config=type("C", (), {"to_dict": lambda self: {"vocab_size": Vb}})())
    with open(os.path.join(d, fmt.CONFIG_NAME), "w") as f:
        json.dump(doc, f)
    spec = fmt.read_guided_checkpoint(d)
    assert spec.base == "base" and spec.terms[0].alpha == 0.5 and fmt.load_checkpoint_tokenizer(spec) is None
    assert doc["architectures"] == [fmt.GUIDED_ARCHITECTURE] and doc["model_type"] == fmt.GUIDED_MODEL_TYPE

# One tokenizer rule, two strictnesses.
class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab
    def get_vocab(self):
        return dict(self.vocab)
a, b = _Tok({"x": 0, "y": 1}), _Tok({"x": 0, "y": 1, "<extra>": 2})
assert fmt.tokenizer_difference(a, b) is None                      # shared ids agree: the identity map holds
assert fmt.tokenizer_difference(a, b, exact=True) is not None      # but the texts may split differently
assert "id 1" in fmt.tokenizer_difference(a, _Tok({"x": 0, "z": 1}))
print("ok")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)


def test_core_without_transformers_or_vllm():
    r = _run(_CORE)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr[-3000:]


def test_blocking_finder_blocks():
    """The finder the test above relies on does block an importable module (sqlite3 stands in for a framework)."""
    r = _run(_BLOCK.replace('("transformers", "vllm")', '("transformers", "vllm", "sqlite3")') +
             "try:\n    import sqlite3\nexcept ImportError as e:\n    print('blocked', e)\n")
    assert "blocked" in r.stdout, r.stdout + r.stderr


def _imported_modules(path: str):
    """Every module an ``import`` / ``from ... import`` in ``path`` names (at any depth), resolved to absolute
    dotted names inside ``ivl_kernels``, with the names imported from it."""
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    package = rel.rsplit(".", 1)[0] if not rel.endswith("__init__") else rel[: -len(".__init__")]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, [a.name for a in node.names]


def test_backends_never_imports_ops():
    mods = [m for m, names in _imported_modules(os.path.join(PKG, "_backends.py"))]
    mods += [f"{m}.{n}" for m, names in _imported_modules(os.path.join(PKG, "_backends.py")) for n in names]
    assert not [m for m in mods if m.startswith("ivl_kernels.ops")], mods


@pytest.mark.parametrize("module", ["ivl_kernels._backends", "ivl_kernels.ops.guided_logits", "ivl_kernels.guidance",
                                    "ivl_kernels.checkpoint_format", "ivl_kernels.hf", "ivl_kernels.vllm"])
def test_each_layer_imports_first(module):
    r = _run(f"import importlib; importlib.import_module({module!r}); print('ok')")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_vllm_imports_nothing_private_from_hf():
    vllm_dir = os.path.join(PKG, "vllm")
    bad = []
    for name in sorted(os.listdir(vllm_dir)):
        if not name.endswith(".py"):
            continue
        for module, names in _imported_modules(os.path.join(vllm_dir, name)):
            if not module.startswith("ivl_kernels.hf"):
                continue
            private = [p for p in module.split(".")[2:] if p.startswith("_")] + [n for n in names if n.startswith("_")]
            if private:
                bad.append(f"{name}: from {module} import {names}")
    assert not bad, bad
