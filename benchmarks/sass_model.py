"""Issue-slot model of the CUDA decode kernel (csrc/guided_logits.cu) from its sm_90 SASS (issue 11, item 2).

What it does:
  1. compiles csrc/guided_logits.cu as is to an sm_90 cubin (one nvcc call, the extension's own flags: torch's
     ``COMMON_NVCC_FLAGS`` and include paths plus the ``nvcc`` flags listed in setup.py) and dumps its SASS with
     ``cuobjdump --dump-sass`` (or reads a cubin / .so given with ``--binary``, or a saved dump with ``--sass``);
  2. for every instantiation ``guided_logits_decode_kernel<scalar, base, out, ROWS, BASE_MODE>`` finds the
     streaming loops (innermost loops holding the 16-byte weight loads ``LDG.E.EF.128``: one loop for BASE_MODE 1,
     value then base head for BASE_MODE 2) and the grid-stride loop around them, and counts the warp instructions
     issued per 16-byte weight load (one warp-wide load = 32 lanes x 16 B = 512 B), split by class;
  3. turns the counts into time: issue time = warp instructions / (132 SMs x 4 schedulers x 1 instruction per
     cycle x clock) against memory time = bytes / bandwidth, for the "qwen" heads of the H100 run
     (Vb 152064 x Hb 3584 base, Vv 151936 x Hv 896 value, bf16), and sets the prediction beside the measured
     ``x_floor`` of ``benchmarks/results/gpu/2026-11-22-h100/rerun/bench_guided_logits/guided_logits_qwen_cuda.csv``.

How instructions are counted (static SASS, no profiler): a structured walk over each loop body. Instructions
predicated off still take an issue slot (they are counted); code skipped by a branch is not. A forward branch
whose skipped range holds a row's work (a hidden-state load ``LDG.E.128.CONSTANT`` in the streaming loop, a
``SHFL`` reduction or an ``STG`` of the epilogue) runs iff that row r < M: rows are numbered by the order of
those markers (``if (r < M)`` is unrolled in row order). So an instantiation's count depends on the M it runs at,
not only on ROWS (ROWS = 4 at M = 3 skips row 3's block). A non-row if/else (vocabulary map or not, alpha
tensor or scalar) counts its smaller arm, which is the benchmark's case (identity map, scalar alpha; ``--arms
max`` counts the larger). A warp walks ``ceil(n16 / 128)`` iterations of a streaming loop and issues
``ceil(n16 / 32)`` of its unrolled 16-byte-load blocks (n16 = 16-byte vectors per weight row), so a row whose
vector count is not a multiple of 32 (Hv = 896 bf16: 112) issues a block with half its lanes idle: counted.

Second, rougher bound (column "pipe"): the SM sub-partition's pipes on sm_90 (ALU 16 lanes: 2 cycles per warp
instruction of integer/logic/PRMT/SHF; FMA 32 lanes with IMAD only on its 16-lane heavy half; conversions F2F/I2F
8 cycles; LSU/MIO 4 cycles per warp load/store/shuffle). Neither model sees latency, occupancy or DRAM effects.

Usage (about 20 s here: one nvcc call of ~15 s on 2 cores, the rest is parsing):
    python benchmarks/sass_model.py [--out benchmarks/results/sass_model_sm90.txt] [--clock-ghz 1.755]
    python benchmarks/sass_model.py --binary ivl_kernels/_C.cpython-311-x86_64-linux-gnu.so   # the built extension
Exit status 2 when nvcc or cuobjdump cannot be found.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILE = os.path.join(REPO, "csrc", "guided_logits.cu")
DEFAULT_CSV = os.path.join(REPO, "benchmarks", "results", "gpu", "2026-11-22-h100", "rerun", "bench_guided_logits",
                           "guided_logits_qwen_cuda.csv")

# H100 SXM (the measured board: "NVIDIA H100 80GB HBM3", 132 SMs). The model's clock is 1.755 GHz (issue 11's
# figure; --clock-ghz); the board's nvidia-smi clocks.max.sm is 1980 MHz (env-*.txt of the 2026-11-22 run), shown
# as a second column.
SMS = 132
SCHEDULERS_PER_SM = 4
CLOCK_GHZ = 1.755
CLOCK_MAX_GHZ = 1.98
HBM_PEAK_GBS = 3350.0
HBM_MEASURED_GBS = 3000.0  # replaced by the CSV's "memory floor" bandwidth when the CSV is read
WARP_LOAD_BYTES = 32 * 16  # one warp-wide 16-byte load

# "qwen" heads of benchmarks/bench_guided_logits.py (DESIGN: Qwen2.5-7B base, Qwen2.5-0.5B value).
QWEN = dict(Vb=152064, Hb=3584, Vv=151936, Hv=896)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

CLASSES = ("fp", "cvt", "mem", "shfl", "int", "br")
CLASS_TITLES = {"fp": "FFMA/HFMA2", "cvt": "cvt/unpack", "mem": "LDG/STG", "shfl": "SHFL", "int": "int/addr",
                "br": "br/other"}


class ToolMissing(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# SASS parsing
# ---------------------------------------------------------------------------------------------------------------
_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_PRED_RE = re.compile(r"^@(!?)(U?P[T0-9]+)\s+")
_HEX_RE = re.compile(r"0x([0-9a-fA-F]+)")


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str | None  # "P0", "!P3", None when unpredicated (or @PT)
    op: str  # full opcode with modifiers, e.g. "LDG.E.EF.128"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def is_branch(self) -> bool:
        return self.base in ("BRA", "JMP", "BRX", "JMX")

    @property
    def target(self) -> int | None:
        if not self.is_branch:
            return None
        m = _HEX_RE.findall(self.args)
        return int(m[-1], 16) if m else None

    @property
    def conditional(self) -> bool:
        return self.pred is not None


@dataclasses.dataclass
class Function:
    name: str
    instrs: list


def parse_sass(text: str) -> list:
    """``Function`` list from ``cuobjdump --dump-sass`` (or ``nvdisasm``-like) text."""
    funcs, cur = [], None
    for line in text.splitlines():
        m = _FUNC_RE.match(line)
        if m:
            cur = Function(m.group(1), [])
            funcs.append(cur)
            continue
        if cur is None:
            continue
        m = _INSTR_RE.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        pred = None
        pm = _PRED_RE.match(body)
        if pm:
            if pm.group(2) != "PT" or pm.group(1):
                pred = pm.group(1) + pm.group(2)
            body = body[pm.end():]
        parts = body.split(None, 1)
        if not parts:
            continue
        cur.instrs.append(Instr(int(m.group(1), 16), pred, parts[0], parts[1] if len(parts) > 1 else ""))
    return funcs


_KERNEL_RE = re.compile(r"guided_logits_decode_kernelI(.+?)Li(\d+)ELi(\d+)EE")
_TYPE_NAMES = {"13__nv_bfloat16": "bfloat16", "6__half": "float16", "f": "float32", "d": "float64"}


def _mangled_types(s: str) -> list:
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c.isdigit():
            j = i
            while j < len(s) and s[j].isdigit():
                j += 1
            n = int(s[i:j])
            out.append(s[i:j + n])
            i = j + n
        elif c == "S":
            j = s.index("_", i)
            out.append("S")  # a substitution: here always the scalar type (the first non-builtin type)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return out


def parse_kernel_name(name: str):
    """``(dtype, base_t, out_t, ROWS, BASE_MODE)`` of a mangled decode-kernel name, or None."""
    m = _KERNEL_RE.search(name)
    if not m:
        return None
    toks = _mangled_types(m.group(1))
    if len(toks) != 3:
        return None
    scalar = _TYPE_NAMES.get(toks[0], toks[0])
    names = [scalar if t == "S" else _TYPE_NAMES.get(t, t) for t in toks]
    return names[0], names[1], names[2], int(m.group(2)), int(m.group(3))


# ---------------------------------------------------------------------------------------------------------------
# Instruction classes
# ---------------------------------------------------------------------------------------------------------------
_UNPACK_IMM = ("0x10000", "0xffff0000", "0x10,")


def classify(ins: Instr) -> str:
    """fp (FFMA/HFMA2 and other float arithmetic), cvt (conversions and 16-bit unpacking), mem (global/shared
    loads and stores), shfl, int (integer, address, moves, predicates, uniform datapath), br (branch/other)."""
    op, base, args = ins.op, ins.base, ins.args
    if base in ("SHFL",):
        return "shfl"
    if base in ("LDG", "STG", "LD", "ST", "LDS", "STS", "LDL", "STL", "LDSM", "ATOM", "ATOMG", "RED", "LDGSTS"):
        return "mem"
    if base in ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "PRMT") or op.startswith("HADD2.F32"):
        return "cvt"
    if (op == "SHF.L.U32" and re.search(r",\s*0x10\s*,\s*RZ", args)) or \
            (op in ("IMAD.U32", "IMAD.SHL.U32") and "0x10000" in args) or \
            (base == "LOP3" and "0xffff0000" in args):
        return "cvt"  # bf16 -> fp32 is a 16-bit shift (or a mask of the high half)
    if op.startswith("HFMA2.MMA") and args.replace(" ", "").startswith(tuple(f"R{i},-RZ,RZ" for i in range(256))):
        return "int"  # constant materialisation (a move), not arithmetic
    if base in ("FFMA", "FFMA2", "FADD", "FMUL", "FMUL2", "FADD2", "HFMA2", "HADD2", "HMUL2", "FMNMX", "DFMA",
                "DADD", "DMUL"):
        return "fp"
    if base in ("BRA", "BRX", "JMP", "JMX", "BSSY", "BSYNC", "EXIT", "RET", "CALL", "WARPSYNC", "ENDCOLLECTIVE",
                "NOP", "BAR", "YIELD", "BPT", "MEMBAR", "ERRBAR", "CCTL", "DEPBAR", "KILL"):
        return "br"
    return "int"


def pipe_of(ins: Instr) -> str | None:
    """Execution pipe for the rough pipe model (sm_90 sub-partition), or None (no modelled pipe limit)."""
    base, op = ins.base, ins.op
    if base in ("LDG", "STG", "LD", "ST", "LDS", "STS", "LDL", "STL", "SHFL", "LDSM", "ATOM", "ATOMG", "RED"):
        return "lsu"
    if base in ("F2F", "I2F", "F2I", "I2FP", "F2IP", "FRND", "MUFU", "POPC", "FLO", "BREV"):
        return "xu"
    if base in ("IMAD", "IMUL", "IDP", "IMADSP"):
        return "imad"
    if op.startswith("HFMA2.MMA"):
        return None
    if base in ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "FFMA2", "FADD2", "FMUL2"):
        return "fma"
    if base.startswith("U") or base in ("S2UR", "R2UR", "LDC", "S2R", "CS2R", "BRA", "BSSY", "BSYNC", "EXIT",
                                        "WARPSYNC", "ENDCOLLECTIVE", "NOP", "BAR", "BRX", "JMP", "CALL", "RET"):
        return None
    return "alu"  # IADD3, LOP3, SHF, PRMT, ISETP, SEL, LEA, MOV, VIADD, FSEL, FSETP, P2R, ...


def pipe_cycles(counts: dict) -> float:
    """Cycles of one scheduler for ``counts`` (pipe -> warp instructions, plus "issue" -> all)."""
    alu, fma, imad = counts.get("alu", 0.0), counts.get("fma", 0.0), counts.get("imad", 0.0)
    return max(counts.get("issue", 0.0), 2.0 * alu, fma + imad, 2.0 * imad, 8.0 * counts.get("xu", 0.0),
               4.0 * counts.get("lsu", 0.0))


def is_weight_load(ins: Instr) -> bool:
    """A streamed 16-byte weight load (``__ldcs`` -> ``LDG.E.EF.128``; any non-constant 128-bit global load)."""
    return ins.base == "LDG" and ".128" in ins.op and (".EF" in ins.op or ".CONSTANT" not in ins.op)


def is_hidden_load(ins: Instr) -> bool:
    """A 16-byte load of a hidden-state row (``__ldg`` -> ``LDG.E.128.CONSTANT``): one per row and weight load."""
    return ins.base == "LDG" and ".128" in ins.op and ".CONSTANT" in ins.op and ".EF" not in ins.op


# ---------------------------------------------------------------------------------------------------------------
# Loop structure and the structured walk
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Loop:
    head: int  # index of the first instruction
    tail: int  # index of the backward branch

    def contains(self, other: "Loop") -> bool:
        return self.head <= other.head and other.tail <= self.tail and (self.head, self.tail) != (other.head,
                                                                                               other.tail)


def find_loops(instrs: list) -> list:
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for i, ins in enumerate(instrs):
        t = ins.target
        if t is not None and t <= ins.addr and t in index and ".DIV" not in ins.op and t != ins.addr:
            loops.append(Loop(index[t], i))
    return loops


def streaming_loops(instrs: list) -> list:
    """Innermost loops that hold weight loads, in address order."""
    with_loads = [lp for lp in find_loops(instrs)
                  if any(is_weight_load(instrs[k]) for k in range(lp.head, lp.tail + 1))]
    inner = [lp for lp in with_loads if not any(lp.contains(o) for o in with_loads)]
    return sorted(inner, key=lambda lp: lp.head)


def outer_loop(instrs: list, inner: list):
    """The grid-stride loop: the innermost loop that contains every streaming loop."""
    cands = [lp for lp in find_loops(instrs) if all(lp.contains(s) for s in inner)]
    return min(cands, key=lambda lp: lp.tail - lp.head) if cands else None


class Walker:
    """Issued-instruction counts of a straight-line region with forward branches, for a given M.

    ``markers``: instruction index -> row index; a forward-branch arm that holds markers runs iff M > the row of
    its first marker. Other arms: if-then runs; an if/else whose condition is not a row's counts its smaller
    arm (``arms="min"``: the benchmark's calls, no vocabulary map and a scalar alpha, take the arm without the
    map lookup / alpha load) or its larger one (``arms="max"``). ``skip``: index ranges (loops) replaced by
    nothing (their cost is added by the caller)."""

    def __init__(self, instrs: list, markers: dict, skip: dict | None = None, arms: str = "min"):
        self.instrs = instrs
        self.arms = arms
        self.index = {ins.addr: i for i, ins in enumerate(instrs)}
        self.markers = markers
        self.skip = skip or {}

    def _first_row(self, lo: int, hi: int):
        for k in range(lo, hi):
            if k in self.markers:
                return self.markers[k]
            if k in self.skip:
                return None
        return None

    def walk(self, lo: int, hi: int, M: int) -> tuple:
        """``(counts, arm_counts)``: Counters keyed by instruction index -> issue weight; ``arm_counts`` is the
        part issued inside arms that hold markers (the per-16-B-block work of a streaming loop)."""
        total, inarm = Counter(), Counter()
        self._walk(lo, hi, M, 1.0, False, total, inarm)
        return total, inarm

    def _walk(self, lo, hi, M, w, in_marked, total, inarm):
        i = lo
        while i < hi:
            if i in self.skip:
                i = self.skip[i] + 1
                continue
            ins = self.instrs[i]
            total[i] += w
            if in_marked:
                inarm[i] += w
            t = ins.target
            if t is None or ".DIV" in ins.op or t <= ins.addr:
                i += 1
                continue
            j = self.index.get(t, hi)
            j = min(j, hi)
            if not ins.conditional:  # unconditional forward jump: skip the dead range
                i = j if j > i else i + 1
                continue
            # conditional forward branch: the fall-through arm [i+1, j) runs when it is not taken
            then_lo, then_hi = i + 1, j
            else_rng = None
            last = self.instrs[j - 1] if j - 1 > i else None
            if last is not None and last.target is not None and not last.conditional and ".DIV" not in last.op \
                    and last.target > self.instrs[j - 1].addr and j < hi:
                k = min(self.index.get(last.target, hi), hi)
                if k > j:
                    else_rng = (j, k)
            row = self._first_row(then_lo, then_hi)
            if else_rng is None:
                if row is None:
                    self._walk(then_lo, then_hi, M, w, in_marked, total, inarm)
                elif M > row:
                    self._walk(then_lo, then_hi, M, w, True, total, inarm)
                i = j
                continue
            # if/else
            row_else = self._first_row(*else_rng)
            if row is not None and row_else is None:
                arm = (then_lo, then_hi) if M > row else else_rng
            elif row is None and row_else is not None:
                arm = else_rng if M > row_else else (then_lo, then_hi)
            else:  # no row condition: the smaller (or larger) arm
                pick = min if self.arms == "min" else max
                arm = pick(((then_lo, then_hi), else_rng), key=lambda r: self._size(*r, M))
            marked = in_marked or self._first_row(*arm) is not None
            self._walk(arm[0], arm[1], M, w, marked, total, inarm)
            i = else_rng[1]

    def _size(self, lo, hi, M):
        t, _ = Counter(), Counter()
        self._walk(lo, hi, M, 1.0, False, t, _)
        return sum(t.values())


# ---------------------------------------------------------------------------------------------------------------
# Per-kernel analysis
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoopCost:
    """One streaming loop at one M: per iteration ``fixed`` (loop control, weight loads, guards) and ``block``
    (the work of one 16-byte-load block: the rows' hidden loads, unpacking and FMAs), by class and by pipe."""
    loads_per_iter: int
    fixed: Counter
    block: Counter
    fixed_pipe: Counter
    block_pipe: Counter

    def per_row(self, n16: int) -> tuple:
        """``(class counts, pipe counts)`` issued by one warp over a weight row of ``n16`` 16-byte vectors."""
        iters = math.ceil(n16 / (32 * self.loads_per_iter))
        blocks = math.ceil(n16 / 32)
        cls, pipe = Counter(), Counter()
        for c, v in self.fixed.items():
            cls[c] += iters * v
        for c, v in self.block.items():
            cls[c] += blocks * v
        for c, v in self.fixed_pipe.items():
            pipe[c] += iters * v
        for c, v in self.block_pipe.items():
            pipe[c] += blocks * v
        return cls, pipe


@dataclasses.dataclass
class KernelModel:
    name: str
    dtype: str
    base_t: str
    out_t: str
    rows: int
    base_mode: int
    n_instr: int
    loops: list  # [(Loop, hidden loads, weight loads)]
    warnings: list
    _instrs: list = dataclasses.field(repr=False, default=None)
    regs: int | None = None  # from cuobjdump --dump-resource-usage, when a binary was dumped
    local_bytes: int | None = None
    arms: str = "min"  # Walker policy for if/else arms that are not row conditions
    _outer: Loop = dataclasses.field(repr=False, default=None)

    # --- counts --------------------------------------------------------------------------------------------
    def loop_cost(self, li: int, M: int) -> LoopCost:
        lp = self.loops[li][0]
        ins = self._instrs
        hidden = [k for k in range(lp.head, lp.tail + 1) if is_hidden_load(ins[k])]
        markers = {k: n % self.rows for n, k in enumerate(hidden)}
        total, inarm = Walker(ins, markers, arms=self.arms).walk(lp.head, lp.tail + 1, M)
        loads = sum(1 for k in range(lp.head, lp.tail + 1) if is_weight_load(ins[k]))
        fixed, block, fpipe, bpipe = Counter(), Counter(), Counter(), Counter()
        for k, wt in total.items():
            a = inarm.get(k, 0.0)
            c, p = classify(ins[k]), pipe_of(ins[k])
            if wt - a:
                fixed[c] += wt - a
                fpipe["issue"] += wt - a
                if p:
                    fpipe[p] += wt - a
            if a:
                block[c] += a / loads
                bpipe["issue"] += a / loads
                if p:
                    bpipe[p] += a / loads
        return LoopCost(loads, fixed, block, fpipe, bpipe)

    def epilogue(self, M: int) -> tuple:
        """Class and pipe counts per vocabulary id outside the streaming loops (map lookup, reductions, stores)."""
        ins, outer = self._instrs, self._outer
        if outer is None:
            return Counter(), Counter()
        markers = {}
        shfl = [k for k in range(outer.head, outer.tail + 1) if ins[k].base == "SHFL"
                and not any(lp.head <= k <= lp.tail for lp, _, _ in self.loops)]
        stg = [k for k in range(outer.head, outer.tail + 1) if ins[k].base == "STG"]
        per_row_shfl = max(1, len(shfl) // self.rows) if shfl else 1
        for n, k in enumerate(shfl):
            markers[k] = min(n // per_row_shfl, self.rows - 1)
        for n, k in enumerate(stg):
            markers[k] = n % self.rows
        skip = {lp.head: lp.tail for lp, _, _ in self.loops}
        total, _ = Walker(ins, markers, skip, arms=self.arms).walk(outer.head, outer.tail + 1, M)
        cls, pipe = Counter(), Counter()
        for k, wt in total.items():
            cls[classify(ins[k])] += wt
            pipe["issue"] += wt
            p = pipe_of(ins[k])
            if p:
                pipe[p] += wt
        return cls, pipe

    def per_load(self, M: int) -> Counter:
        """Class counts per 16-byte weight load of one full streaming-loop iteration (all blocks active)."""
        out = Counter()
        for li in range(len(self.loops)):
            lc = self.loop_cost(li, M)
            for c, v in lc.fixed.items():
                out[c] += v / lc.loads_per_iter
            for c, v in lc.block.items():
                out[c] += v
        n = len(self.loops)
        return Counter({c: v / n for c, v in out.items()})

    def per_vocab(self, M: int, shape: dict) -> dict:
        """Issued warp instructions per vocabulary id (class and pipe counts) and the weight bytes it streams."""
        esz = DTYPE_BYTES[self.dtype]
        heads = [("value", shape["Hv"] * esz // 16, shape["Vv"] / shape["Vb"])]
        if self.base_mode == 2:
            heads.append(("base", shape["Hb"] * esz // 16, 1.0))
        cls, pipe = self.epilogue(M)
        epi = sum(cls.values())
        for li, (name, n16, frac) in enumerate(heads[:len(self.loops)]):
            c, p = self.loop_cost(li, M).per_row(n16)
            for k, v in c.items():
                cls[k] += frac * v
            for k, v in p.items():
                pipe[k] += frac * v
        wbytes = sum(n16 * 16 * frac for _, n16, frac in heads)
        return dict(cls=cls, pipe=pipe, weight_bytes=wbytes, epi=epi)


def analyze(funcs: list) -> list:
    models = []
    for f in funcs:
        key = parse_kernel_name(f.name)
        if key is None:
            continue
        dtype, base_t, out_t, rows, mode = key
        warnings = []
        inner = streaming_loops(f.instrs)
        loops = []
        for lp in inner:
            hid = sum(1 for k in range(lp.head, lp.tail + 1) if is_hidden_load(f.instrs[k]))
            wl = sum(1 for k in range(lp.head, lp.tail + 1) if is_weight_load(f.instrs[k]))
            if hid != wl * rows:
                warnings.append(f"loop at {f.instrs[lp.head].addr:#x}: {hid} hidden loads for {wl} weight loads x "
                                f"{rows} rows")
            loops.append((lp, hid, wl))
        if len(loops) != (2 if mode == 2 else 1):
            warnings.append(f"found {len(loops)} streaming loops (BASE_MODE {mode} expects {2 if mode == 2 else 1})")
        outer = outer_loop(f.instrs, inner) if inner else None
        if outer is None:
            warnings.append("no grid-stride loop around the streaming loops: epilogue not counted")
        models.append(KernelModel(f.name, dtype, base_t, out_t, rows, mode, len(f.instrs), loops, warnings,
                                  _instrs=f.instrs, _outer=outer))
    order = {"bfloat16": 0, "float16": 1, "float32": 2}
    models.sort(key=lambda m: (order.get(m.dtype, 9), m.base_mode, m.base_t != "float32", m.rows))
    return models


# ---------------------------------------------------------------------------------------------------------------
# The time model
# ---------------------------------------------------------------------------------------------------------------
def issue_rate(clock_ghz: float) -> float:
    """Warp instructions per second the whole GPU can issue."""
    return SMS * SCHEDULERS_PER_SM * clock_ghz * 1e9


def memory_bytes(shape: dict, dtype: str, base_mode: int, M: int, base_bytes: int = 4, out_bytes: int = 4) -> float:
    """Bytes that must move (the benchmark's floor): weights, hidden rows, base logits (BASE_MODE 1), logits out."""
    e = DTYPE_BYTES[dtype]
    b = shape["Vv"] * shape["Hv"] * e + M * shape["Hv"] * e + M * shape["Vb"] * out_bytes
    if base_mode == 2:
        b += shape["Vb"] * shape["Hb"] * e + M * shape["Hb"] * e
    else:
        b += M * shape["Vb"] * base_bytes
    return float(b)


def predict(model: KernelModel, M: int, shape: dict, clock_ghz: float, bw_gbs: float) -> dict:
    pv = model.per_vocab(M, shape)
    instr = sum(pv["cls"].values())
    t_issue = shape["Vb"] * instr / issue_rate(clock_ghz)
    t_pipe = shape["Vb"] * pipe_cycles(pv["pipe"]) / issue_rate(clock_ghz)
    base_bytes = DTYPE_BYTES[model.base_t] if model.base_mode == 1 else 0
    out_bytes = DTYPE_BYTES[model.out_t]
    nbytes = memory_bytes(shape, model.dtype, model.base_mode, M, base_bytes, out_bytes)
    t_mem = nbytes / (bw_gbs * 1e9)
    loads = pv["weight_bytes"] / WARP_LOAD_BYTES
    return dict(instr_per_vocab=instr, epi=pv["epi"], per_load=instr / loads, cls_per_load={c: v / loads for c, v in
                                                                             pv["cls"].items()},
                t_issue=t_issue, t_pipe=t_pipe, t_mem=t_mem, bytes=nbytes, ratio=t_issue / t_mem,
                pipe_ratio=t_pipe / t_mem, alu_busy=2.0 * pv["pipe"].get("alu", 0.0) / max(instr, 1e-9))


def crossover_m(models_by_rows: dict, shape: dict, clock_ghz: float, bw_gbs: float, m_max: int = 16):
    """First M (1..m_max, the dispatched instantiation) whose issue time exceeds its memory time, or None."""
    for M in range(1, m_max + 1):
        r = rows_for_m(M, sorted(models_by_rows))
        if r is None:
            return None
        if predict(models_by_rows[r], M, shape, clock_ghz, bw_gbs)["ratio"] > 1.0:
            return M
    return None


def instantiation_crossover(model: KernelModel, shape: dict, clock_ghz: float, bw_gbs: float):
    """M (within 1..ROWS, the rows this instantiation can serve) at which its issue time reaches its memory
    time, interpolated linearly between the integer M around the crossing; None if it stays memory-bound."""
    prev = None
    for M in range(1, model.rows + 1):
        r = predict(model, M, shape, clock_ghz, bw_gbs)["ratio"]
        if r > 1.0:
            if prev is None:
                return 1.0
            return (M - 1) + (1.0 - prev) / (r - prev)
        prev = r
    return None


def rows_for_m(M: int, rows_available: list):
    """The launcher's choice: the smallest instantiated ROWS >= M (csrc ``dispatch_rows`` / ``for_rows``)."""
    for r in sorted(rows_available):
        if r >= M:
            return r
    return None


_RET_ROWS = (re.compile(r"integral_constant<\s*int\s*,\s*(\w+)\s*>"),
             re.compile(r"launch<[^;]*?,\s*(\w+)\s*,\s*BASE_MODE\s*>"))


def dispatch_from_source(cu_text: str):
    """``[(max M, ROWS), ..., (None, ROWS)]``: the ``if (M <= X) return ...<ROWS>...;`` chain that picks the
    instantiation (``dispatch_rows`` / ``for_rows``), or None if no such chain is recognised."""
    consts = {k: int(v) for k, v in re.findall(r"constexpr\s+int\s+(\w+)\s*=\s*(\d+)\s*;", cu_text)}

    def value(tok):
        return int(tok) if tok.isdigit() else consts.get(tok)

    def rows_of(expr):
        for rx in _RET_ROWS:
            m = rx.search(expr)
            if m:
                return value(m.group(1))
        return None

    chain = list(re.finditer(r"if\s*\(\s*M\s*<=\s*(\w+)\s*\)\s*return\s+([^;]*);", cu_text))
    out = []
    for m in chain:
        lim, rows = value(m.group(1)), rows_of(m.group(2))
        if lim is None or rows is None:
            continue
        if out and lim <= out[-1][0]:  # a second chain (another function): keep the first
            break
        out.append((lim, rows))
    if not out:
        return None
    last = next(m for m in chain if value(m.group(1)) == out[-1][0])
    tail = re.match(r"\s*return\s+([^;]*);", cu_text[last.end():])
    if tail and rows_of(tail.group(1)) is not None:
        out.append((None, rows_of(tail.group(1))))
    return out


def read_source(cu: str) -> str:
    """The .cu with the project headers it includes (``#include "x.cuh"``, one level, next to it)."""
    text = open(cu).read()
    for inc in re.findall(r'#include\s+"([^"]+)"', text):
        path = os.path.join(os.path.dirname(os.path.abspath(cu)), inc)
        if os.path.exists(path):
            text += "\n" + open(path).read()
    return text


# ---------------------------------------------------------------------------------------------------------------
# Measured numbers
# ---------------------------------------------------------------------------------------------------------------
def read_measured(path: str) -> tuple:
    """``({(M, base): x_floor}, bandwidth GB/s or None)`` of the CUDA kernel ("ivl cuda op", identity map)."""
    if not path or not os.path.exists(path):
        return {}, None
    with open(path) as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    out, bw = {}, None
    for r in rows:
        if r.get("map", "identity") != "identity":
            continue
        try:
            M = int(r["M"])
        except (KeyError, ValueError):
            continue
        if r.get("impl") == "ivl cuda op" and r.get("x_floor"):
            out[(M, r["base"])] = float(r["x_floor"])
        if r.get("impl") in ("memory floor", "floor") and r.get("GBps"):
            bw = float(r["GBps"])
    return out, bw


# ---------------------------------------------------------------------------------------------------------------
# Tools and compilation
# ---------------------------------------------------------------------------------------------------------------
def find_tool(name: str, cuda_home: str) -> str | None:
    cand = os.path.join(cuda_home, "bin", name)
    if os.path.exists(cand):
        return cand
    found = shutil.which(name)
    if found:
        return found
    if name in ("cuobjdump", "nvdisasm"):  # Triton ships both (triton/backends/nvidia/bin)
        try:
            import importlib.util

            spec = importlib.util.find_spec("triton")
            if spec and spec.submodule_search_locations:
                for root in spec.submodule_search_locations:
                    cand = os.path.join(root, "backends", "nvidia", "bin", name)
                    if os.path.exists(cand):
                        return cand
        except Exception:
            pass
    return None


def extension_nvcc_flags(setup_py: str) -> list:
    """The ``nvcc`` list of ``extra_compile_args`` in setup.py (read, not executed)."""
    default = ["-O3", "--use_fast_math", "-lineinfo", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    try:
        tree = ast.parse(open(setup_py).read())
    except Exception:
        return default
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "nvcc" and isinstance(v, ast.List):
                    vals = [e.value for e in v.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                    if vals:
                        return vals
    return default


def _extra_include_dirs(cuda_home: str) -> list:
    """CUDA library headers that torch's headers include (cuSPARSE, cuBLAS) when the toolkit has only the
    compiler: the nvidia pip wheels carry them (the same search as setup.py)."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    for root in getattr(nvidia, "__path__", []):
        for sub in sorted(os.listdir(root)):
            inc = os.path.join(root, sub, "include")
            if os.path.exists(os.path.join(inc, "cusparse.h")):
                return [inc]
    return []


def compile_cubin(cu: str, arch: str, out_dir: str, cuda_home: str, nvcc: str, std: str) -> tuple:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
        import torch.utils.cpp_extension as cpp
    except ImportError as exc:
        raise ToolMissing(f"torch is needed for the extension's include paths: {exc}")
    try:
        incs = cpp.include_paths(device_type="cuda")
    except TypeError:
        incs = cpp.include_paths(cuda=True)
    incs = list(incs) + _extra_include_dirs(cuda_home) + [os.path.dirname(os.path.abspath(cu))]
    flags = list(getattr(cpp, "COMMON_NVCC_FLAGS", []))
    flags += extension_nvcc_flags(os.path.join(REPO, "setup.py"))
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    cubin = os.path.join(out_dir, "guided_logits.cubin")
    cmd = [nvcc, "-cubin", f"-arch={arch}", f"-std={std}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", *flags,
           *[f"-I{p}" for p in incs], "-o", cubin, cu]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed ({r.returncode}):\n{' '.join(cmd)}\n{r.stderr[-4000:]}")
    return cubin, time.time() - t0, cmd


_RES_RE = re.compile(r"Function\s+(\S+?):\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict:
    """``{mangled name: (registers, local bytes)}`` from ``cuobjdump --dump-resource-usage``."""
    return {m.group(1): (int(m.group(2)), int(m.group(5))) for m in _RES_RE.finditer(text)}


def resident_warps(regs: int, threads_per_block: int = 256, max_warps: int = 64, max_blocks: int = 32,
                   regfile: int = 65536, alloc_unit: int = 256) -> int:
    """Warps per SM that fit (sm_90: 64 K registers, allocated per warp in units of 256, 64 warps, 32 blocks)."""
    per_warp = -(-regs * 32 // alloc_unit) * alloc_unit
    wpb = threads_per_block // 32
    blocks = min(max_blocks, max_warps // wpb, (regfile // per_warp) // wpb)
    return blocks * wpb


def dump_sass(cuobjdump: str, binary: str, arch: str) -> str:
    # -arch picks one architecture's cubin out of a fat binary (a bare cubin is dumped whole)
    r = subprocess.run([cuobjdump, "-arch", arch, "--dump-sass", binary], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def _table(headers: list, rows: list) -> str:
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(str(c).rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(headers), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def report(models: list, shape: dict, clock: float, bw_meas: float, bw_peak: float, measured: dict,
           dispatch, header: list) -> str:
    out = list(header)
    rate = issue_rate(clock)
    out.append("")
    out.append(f"Machine model: H100 SXM, {SMS} SMs x {SCHEDULERS_PER_SM} schedulers x 1 warp instruction/cycle at "
               f"{clock:.3f} GHz = {rate / 1e9:.0f} G warp-instr/s; HBM {bw_peak / 1e3:.2f} TB/s peak, "
               f"{bw_meas / 1e3:.3f} TB/s measured (the benchmark's floor).")
    for bw, what in ((bw_peak, "peak"), (bw_meas, "measured")):
        budget = rate / (bw * 1e9 / WARP_LOAD_BYTES)
        out.append(f"  issue budget at {what} bandwidth: {budget:.1f} warp instructions per 512-B warp load "
                   f"(16 B per lane) before issue time exceeds memory time")
    out.append(f"Workload (bench_guided_logits 'qwen'): Vb={shape['Vb']} Hb={shape['Hb']} Vv={shape['Vv']} "
               f"Hv={shape['Hv']}; BASE_MODE 1 = base logits given (value head only), 2 = base hidden + weight "
               "(both heads streamed, counts weighed by bytes: 16-B vectors per row = H x elem / 16).")
    if dispatch:
        out.append("Dispatch (csrc: the M -> ROWS chain): " + ", ".join(
            f"M <= {m} -> ROWS {r}" if m is not None else f"else ROWS {r}" for m, r in dispatch))
    warn = [(m, w) for m in models for w in m.warnings]
    for m, w in warn:
        out.append(f"WARNING {m.dtype} ROWS={m.rows} BASE_MODE={m.base_mode}: {w}")

    # Table 1: per instantiation, at M = ROWS.
    out.append("")
    out += [
        "Table 1. Per instantiation, at M = ROWS (every row active).",
        "  per 16-B load: warp instructions issued per warp-wide 16-byte weight load in one full streaming-loop",
        "    iteration (loop control, the weight load, ROWS x (hidden-row load + unpack + 8 or 4 FMAs)), by class;",
        "    BASE_MODE 2: mean of its two loops (value, base). +per row: its growth per extra active row.",
        "  per load, qwen: everything a warp issues per vocabulary id (both loops with their partly idle blocks,",
        "    reductions, stores) / (weight bytes / 512), value and base rows weighed by their bytes.",
        "  ratio = issue time / memory time (@peak 3.35 TB/s, @meas = the benchmark's bandwidth);",
        "    x_floor = max(1, ratio@meas); M* = M (1..ROWS) where this instantiation's issue time reaches its memory",
        "    time at the measured bandwidth (interpolated), '-' = memory-bound up to ROWS.",
        "  REG, warps/SM: ptxas registers per thread and the resident warps per SM they allow (256-thread blocks).",
    ]
    hdr = ["dtype", "base/out", "ROWS", "MODE", "REG", "warps/SM", "per 16-B load"]
    hdr += [CLASS_TITLES[c] for c in CLASSES] + [
        "+per row", "per load, qwen", "ratio@peak", "ratio@meas", "x_floor", "issue-bound", "M*"]
    rows = []
    for m in models:
        pl = m.per_load(m.rows)
        pl1 = m.per_load(1)
        tot = sum(pl.values())
        slope = (tot - sum(pl1.values())) / (m.rows - 1) if m.rows > 1 else None
        pk = predict(m, m.rows, shape, clock, bw_peak)
        ms = predict(m, m.rows, shape, clock, bw_meas)
        mstar = instantiation_crossover(m, shape, clock, bw_meas)
        rows.append([m.dtype, f"{short(m.base_t) if m.base_mode == 1 else '-'}/{short(m.out_t)}", m.rows,
                     m.base_mode, "-" if m.regs is None else m.regs,
                     "-" if m.regs is None else resident_warps(m.regs), f"{tot:.1f}"]
                    + [f"{pl.get(c, 0.0):.1f}" for c in CLASSES] + [
            _fmt(slope, 1), f"{ms['per_load']:.1f}", f"{pk['ratio']:.2f}", f"{ms['ratio']:.2f}",
            f"{max(1.0, ms['ratio']):.2f}", "yes" if ms["ratio"] > 1 else "no",
            "-" if mstar is None else f"{mstar:.2f}"])
    out.append(_table(hdr, rows))

    # Table 2: per M, the dispatched instantiation, against the measurement.
    for mode, base_t, label, bench_base in ((2, None, "base hidden + weight (BASE_MODE 2)", "hidden"),
                                            (1, "float32", "base logits given, float32 (BASE_MODE 1)", "logits")):
        for dtype in ("bfloat16",):
            cand = {m.rows: m for m in models if m.dtype == dtype and m.base_mode == mode
                    and (base_t is None or m.base_t == base_t)}
            if not cand:
                continue
            out.append("")
            out += [f"Table 2{'a' if mode == 2 else 'b'}. {dtype}, {label}, by M (the instantiation dispatch_rows "
                    "picks): model vs measured x_floor.",
                    "  instr/vocab id: warp instructions a warp issues per vocabulary id; epi: the share outside the "
                    "streaming loops (map, reductions, stores);",
                    "  per 16-B load: the same per 512 B of weights; T_issue = Vb x instr / issue rate; T_mem = the "
                    "benchmark's bytes / measured bandwidth;",
                    f"  model = max(1, T_issue / T_mem) at {clock:.3f} GHz and at the board's {CLOCK_MAX_GHZ:.2f} GHz "
                    "(nvidia-smi clocks.max.sm); pipe = max(1, pipe-model time / T_mem) at the first clock;",
                    "  ALU = ALU-pipe cycles (16 lanes: 2 per warp instruction) as a share of the issue cycles;",
                    "  measured = 'ivl cuda op' x_floor (bench-decode, H100, CUDA graph); meas/model at the first "
                    "clock."]
            hdr = ["M", "ROWS", "instr/vocab id", "epi", "per 16-B load", "T_issue ms", "T_mem ms", "ratio@peak",
                   f"model @{clock:.3f}", f"model @{CLOCK_MAX_GHZ:.2f}", "pipe", "ALU", "measured", "meas/model",
                   "issue-bound"]
            rows = []
            for M in range(1, 17):
                r = rows_for_m(M, sorted(cand))
                if r is None:
                    continue
                p = predict(cand[r], M, shape, clock, bw_meas)
                pk = predict(cand[r], M, shape, clock, bw_peak)
                p2 = predict(cand[r], M, shape, CLOCK_MAX_GHZ, bw_meas)
                meas = measured.get((M, bench_base))
                xm = max(1.0, p["ratio"])
                rows.append([M, r, f"{p['instr_per_vocab']:.0f}", f"{100 * p['epi'] / p['instr_per_vocab']:.0f}%",
                             f"{p['per_load']:.1f}", f"{p['t_issue'] * 1e3:.3f}",
                             f"{p['t_mem'] * 1e3:.3f}", f"{pk['ratio']:.2f}", f"{xm:.2f}",
                             f"{max(1.0, p2['ratio']):.2f}", f"{max(1.0, p['pipe_ratio']):.2f}",
                             f"{100 * p['alu_busy']:.0f}%",
                             _fmt(meas), _fmt(meas / xm if meas else None),
                             "yes" if p["ratio"] > 1 else "no"])
            out.append(_table(hdr, rows))
            for bw, what in ((bw_peak, "peak"), (bw_meas, "measured")):
                mc = crossover_m(cand, shape, clock, bw)
                out.append(f"  first issue-bound M ({what} {bw / 1e3:.2f} TB/s, {clock:.3f} GHz): "
                           f"{mc if mc is not None else 'none up to 16'}")
            mc = crossover_m(cand, shape, CLOCK_MAX_GHZ, bw_meas)
            out.append(f"  first issue-bound M (measured bandwidth, {CLOCK_MAX_GHZ:.2f} GHz): "
                       f"{mc if mc is not None else 'none up to 16'}")
    return "\n".join(out)


def short(t: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(t, t)


def _rel(path: str) -> str:
    ap = os.path.abspath(path)
    return os.path.relpath(ap, REPO) if ap.startswith(REPO + os.sep) else path


def _source_state() -> str:
    """git HEAD of the repository and whether csrc/ differs from it (the SASS comes from the working tree)."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "csrc"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except Exception:
        return "working tree (git unavailable)"
    if not head:
        return "working tree (not a git checkout)"
    return f"commit {head}" + (", csrc/ with uncommitted changes" if dirty else ", csrc/ as committed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cu", default=CU_FILE, help="CUDA source to compile (default csrc/guided_logits.cu)")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--std", default="c++20", help="C++ standard for nvcc (torch >= 2.10 headers need c++20)")
    p.add_argument("--binary", default=None, help="dump this cubin / .so instead of compiling")
    p.add_argument("--sass", default=None, help="read this saved cuobjdump --dump-sass text instead")
    p.add_argument("--keep", default=None, help="keep the cubin and SASS dump in this folder")
    p.add_argument("--measured", default=DEFAULT_CSV, help="bench_guided_logits CSV with the measured x_floor")
    p.add_argument("--clock-ghz", type=float, default=CLOCK_GHZ)
    p.add_argument("--bw-peak-gbs", type=float, default=HBM_PEAK_GBS)
    p.add_argument("--bw-gbs", type=float, default=None, help="measured bandwidth (default: the CSV's floor, "
                                                              "else 3000)")
    p.add_argument("--arms", choices=["min", "max"], default="min",
                   help="if/else arms that are not row conditions (map / alpha tensor): count the smaller arm (the "
                        "benchmark's identity map and scalar alpha) or the larger")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.out and os.path.lexists(args.out) and not args.overwrite:
        p.error(f"--out {args.out} exists: not replaced (pass --overwrite)")

    t0 = time.time()
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    header = [f"# sass_model.py: issue-slot model of csrc/guided_logits.cu on {args.arch}",
              f"# date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; source: {_source_state()}"]
    resources = {}
    if args.sass:
        text = open(args.sass).read()
        header.append(f"# SASS read from {args.sass}")
    else:
        cuobjdump = find_tool("cuobjdump", cuda_home)
        if cuobjdump is None:
            print(f"sass_model: cuobjdump not found ({cuda_home}/bin, PATH, triton/backends/nvidia/bin); "
                  "install the CUDA toolkit or pass --sass DUMP", file=sys.stderr)
            return 2
        work = args.keep or tempfile.mkdtemp(prefix="sass_model_")
        os.makedirs(work, exist_ok=True)
        if args.binary:
            binary = args.binary
            header.append(f"# binary: {binary}")
        else:
            nvcc = find_tool("nvcc", cuda_home)
            if nvcc is None:
                print(f"sass_model: nvcc not found ({cuda_home}/bin or PATH); set CUDA_HOME or pass --binary/--sass",
                      file=sys.stderr)
                return 2
            try:
                binary, secs, cmd = compile_cubin(args.cu, args.arch, work, cuda_home, nvcc, args.std)
            except ToolMissing as exc:
                print(f"sass_model: {exc}", file=sys.stderr)
                return 2
            ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            header.append(f"# nvcc: {ver[-1] if ver else '?'} ({nvcc}); compile {secs:.1f} s")
            header.append("# " + " ".join(c for c in cmd if not c.startswith("-I")) + "  (+ torch/CUDA include dirs)")
        header.append(f"# cuobjdump: {_rel(cuobjdump)}")
        text = dump_sass(cuobjdump, binary, args.arch)
        res = subprocess.run([cuobjdump, "-arch", args.arch, "--dump-resource-usage", binary], capture_output=True,
                             text=True)
        resources = parse_resource_usage(res.stdout) if res.returncode == 0 else {}
        if args.keep:
            with open(os.path.join(work, "guided_logits.sass"), "w") as fh:
                fh.write(text)
        else:
            shutil.rmtree(work, ignore_errors=True)
    models = analyze(parse_sass(text))
    for m in models:
        m.arms = args.arms
        if m.name in resources:
            m.regs, m.local_bytes = resources[m.name]
    if not models:
        print("sass_model: no guided_logits_decode_kernel instantiation in the SASS", file=sys.stderr)
        return 1
    measured, bw_csv = read_measured(args.measured)
    bw_meas = args.bw_gbs or bw_csv or HBM_MEASURED_GBS
    if measured:
        header.append(f"# measured: {os.path.relpath(args.measured, REPO)} (bandwidth {bw_meas:.1f} GB/s)")
    dispatch = None
    if os.path.exists(args.cu):
        dispatch = dispatch_from_source(read_source(args.cu))
        rows_seen = sorted({m.rows for m in models})
        if dispatch:  # check the "next instantiation" rule against the source
            for M in range(1, 17):
                src = next((r for lim, r in dispatch if lim is None or M <= lim), None)
                if src is not None and src != rows_for_m(M, rows_seen):
                    header.append(f"# WARNING: the source sends M={M} to ROWS={src}, the model assumes "
                                  f"{rows_for_m(M, rows_seen)}")
    text_out = report(models, QWEN, args.clock_ghz, bw_meas, args.bw_peak_gbs, measured, dispatch, header)
    text_out += f"\n\n# {len(models)} instantiations analysed in {time.time() - t0:.1f} s\n"
    print(text_out)
    if args.out:
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(text_out)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
