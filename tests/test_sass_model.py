"""benchmarks/sass_model.py: SASS parsing, instruction counting and the issue-slot arithmetic on a tiny
hand-written kernel in ``cuobjdump --dump-sass`` format; plus one end-to-end run of the real script (nvcc +
cuobjdump, about 20 s on 2 cores), skipped without the tools or with ``IVL_SKIP_SASS_MODEL=1``."""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "sass_model.py")


def _load():
    spec = importlib.util.spec_from_file_location("sass_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sass_model"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


sm = _load()

# A ROWS = 2, BASE_MODE 1 bf16 instantiation shaped like the real one: a grid-stride loop (0x40 .. 0x480) with
# a map / no-map if/else (then: 3 instructions, else: 1), a streaming loop (0xc0 .. 0x360) of 2 weight loads
# (LDG.E.EF.128) per iteration, each 16-B block guarded by a branch and holding one branch-guarded block per row
# (hidden load + PRMT/IMAD.U32/SHF unpack + FFMA; row 1 also an IADD3), then one SHFL reduction and one store
# per row, each behind a row branch.
#   streaming loop, per iteration: 13 fixed (2 ISETP, 2 LDG.EF, 2 BSSY, 2 BRA, 2 BSYNC, VIADD, ISETP, BRA)
#   per 16-B block: 2 ISETP + 2 row guards (BRA) + row 0 (5) + row 1 (6) = 15 at M = 2, 9 at M = 1
#   outside the loop: 5 before it (smaller arm) + 18 after it at M = 2 (14 at M = 1)
SASS = """\
		Function : _ZN11ivl_kernels27guided_logits_decode_kernelI13__nv_bfloat16ffLi2ELi1EEEvPKT_lS4_lPKvbbPKT0_lS4_lS4_lPKfffPT1_lillii
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                  LDC R1, c[0x0][0x28] ;                                  /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0010*/                  S2R R0, SR_TID.X ;                                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0020*/                  ISETP.GE.U32.AND P0, PT, R0, UR4, PT ;                  /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0030*/              @P0 EXIT ;                                                  /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0040*/                  LDC R5, c[0x0][0x290] ;                                 /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0050*/                  IMAD.WIDE.U32 R2, R0, 0x10, RZ ;                        /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0060*/             @!P6 BRA 0xa0 ;                                              /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0070*/                  LDG.E.CONSTANT R4, desc[UR6][R2.64] ;                   /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0080*/                  IMAD.MOV.U32 R4, RZ, RZ, R4 ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0090*/                  BRA 0xb0 ;                                              /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*00a0*/                  SEL R4, R0, 0xffffffff, !P0 ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*00b0*/                  IMAD.MOV.U32 R6, RZ, RZ, R0 ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*00c0*/                  ISETP.GE.AND P1, PT, R6, UR4, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*00d0*/                  ISETP.GE.AND P2, PT, R7, UR4, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*00e0*/             @!P1 LDG.E.EF.128 R8, desc[UR6][R2.64] ;                     /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*00f0*/             @!P2 LDG.E.EF.128 R12, desc[UR6][R2.64+0x200] ;              /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0100*/                  BSSY B1, 0x210 ;                                        /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0110*/              @P1 BRA 0x210 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0120*/                  ISETP.GE.AND P3, PT, R5, 0x1, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0130*/                  ISETP.GE.AND P4, PT, R5, 0x2, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0140*/             @!P3 BRA 0x1a0 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0150*/                  LDG.E.128.CONSTANT R16, desc[UR6][R20.64] ;             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0160*/                  PRMT R24, R8, 0x7632, R24 ;                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0170*/                  IMAD.U32 R25, R8, 0x10000, RZ ;                         /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0180*/                  SHF.L.U32 R26, R16, 0x10, RZ ;                          /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0190*/                  FFMA.FTZ R30, R25, R26, R30 ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*01a0*/             @!P4 BRA 0x210 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*01b0*/                  IADD3 R22, P5, R20, UR8, RZ ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*01c0*/                  LDG.E.128.CONSTANT R16, desc[UR6][R22.64] ;             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*01d0*/                  PRMT R24, R8, 0x7632, R24 ;                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*01e0*/                  IMAD.U32 R25, R8, 0x10000, RZ ;                         /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*01f0*/                  SHF.L.U32 R26, R16, 0x10, RZ ;                          /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0200*/                  FFMA.FTZ R31, R25, R26, R31 ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0210*/                  BSYNC B1 ;                                              /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0220*/                  BSSY B1, 0x330 ;                                        /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0230*/              @P2 BRA 0x330 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0240*/                  ISETP.GE.AND P3, PT, R5, 0x1, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0250*/                  ISETP.GE.AND P4, PT, R5, 0x2, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0260*/             @!P3 BRA 0x2c0 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0270*/                  LDG.E.128.CONSTANT R16, desc[UR6][R20.64+0x200] ;       /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0280*/                  PRMT R24, R12, 0x7632, R24 ;                            /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0290*/                  IMAD.U32 R25, R12, 0x10000, RZ ;                        /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*02a0*/                  SHF.L.U32 R26, R16, 0x10, RZ ;                          /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*02b0*/                  FFMA.FTZ R30, R25, R26, R30 ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*02c0*/             @!P4 BRA 0x330 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*02d0*/                  IADD3 R22, P5, R20, UR8, RZ ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*02e0*/                  LDG.E.128.CONSTANT R16, desc[UR6][R22.64+0x200] ;       /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*02f0*/                  PRMT R24, R12, 0x7632, R24 ;                            /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0300*/                  IMAD.U32 R25, R12, 0x10000, RZ ;                        /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0310*/                  SHF.L.U32 R26, R16, 0x10, RZ ;                          /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0320*/                  FFMA.FTZ R31, R25, R26, R31 ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0330*/                  BSYNC B1 ;                                              /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0340*/                  VIADD R6, R6, 0x40 ;                                    /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0350*/                  ISETP.GE.AND P0, PT, R6, UR4, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0360*/             @!P0 BRA 0xc0 ;                                              /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0370*/                  ISETP.GE.AND P0, PT, R5, 0x1, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0380*/             @!P0 BRA 0x3b0 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0390*/                  SHFL.BFLY PT, R3, R30, 0x10, 0x1f ;                     /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*03a0*/                  FADD.FTZ R30, R30, R3 ;                                 /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*03b0*/                  ISETP.GE.AND P0, PT, R5, 0x2, PT ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*03c0*/             @!P0 BRA 0x3f0 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*03d0*/                  SHFL.BFLY PT, R3, R31, 0x10, 0x1f ;                     /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*03e0*/                  FADD.FTZ R31, R31, R3 ;                                 /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*03f0*/                  ISETP.NE.OR P0, PT, R0, RZ, !P3 ;                       /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0400*/              @P0 BRA 0x420 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0410*/                  STG.E desc[UR6][R2.64], R30 ;                           /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0420*/                  ISETP.NE.OR P0, PT, R0, 0x1, !P4 ;                      /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0430*/              @P0 BRA 0x460 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0440*/                  IMAD.WIDE R10, R4, 0x4, R2 ;                            /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0450*/                  STG.E desc[UR6][R10.64], R31 ;                          /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0460*/                  IADD3 R0, R0, 0x100, RZ ;                               /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0470*/                  ISETP.GE.U32.AND P0, PT, R0, UR4, PT ;                  /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0480*/             @!P0 BRA 0x40 ;                                              /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*0490*/                  EXIT ;                                                  /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
        /*04a0*/                  BRA 0x4a0 ;                                             /* 0x000fe20000000f00 */
                                                                                          /* 0x000fc00000000000 */
		..........
"""

SHAPE = dict(Vb=1000, Vv=1000, Hv=512, Hb=0)  # bf16: 64 vectors of 16 B per row = one iteration, two blocks


@pytest.fixture(scope="module")
def model():
    funcs = sm.parse_sass(SASS)
    assert len(funcs) == 1 and len(funcs[0].instrs) == 75
    (m,) = sm.analyze(funcs)
    return m


def test_parse_kernel_name():
    name = "_ZN11ivl_kernels27guided_logits_decode_kernelI13__nv_bfloat16S1_fLi16ELi2EEEvPKT_lS4_lPKvbbPKT0_lS4_"
    assert sm.parse_kernel_name(name) == ("bfloat16", "bfloat16", "float32", 16, 2)
    assert sm.parse_kernel_name("_ZN11ivl_kernels27guided_logits_decode_kernelI6__halfffLi4ELi1EEEvPKT_") == (
        "float16", "float32", "float32", 4, 1)
    assert sm.parse_kernel_name("_ZN11ivl_kernels27guided_logits_decode_kernelIfffLi1ELi1EEEvPKT_") == (
        "float32", "float32", "float32", 1, 1)
    assert sm.parse_kernel_name("_Z6otherPf") is None


def test_classify():
    def c(line):
        (f,) = sm.parse_sass("Function : k\n        /*0000*/ " + line + " ;")
        return sm.classify(f.instrs[0])

    assert c("FFMA.FTZ R1, R2, R3, R4") == "fp"
    assert c("HFMA2 R1, R2, R3, R4") == "fp"
    assert c("HFMA2.MMA R28, -RZ, RZ, 0, 1.8e-06") == "int"  # a constant move
    assert c("PRMT R1, R2, 0x7632, R1") == "cvt"
    assert c("IMAD.U32 R1, R2, 0x10000, RZ") == "cvt"
    assert c("SHF.L.U32 R1, R2, 0x10, RZ") == "cvt"
    assert c("HADD2.F32 R1, -RZ, R2.H0_H0") == "cvt"
    assert c("SHF.R.S32.HI R1, RZ, 0x1f, R2") == "int"
    assert c("@!P0 LDG.E.EF.128 R8, desc[UR6][R2.64]") == "mem"
    assert c("SHFL.BFLY PT, R3, R31, 0x10, 0x1f") == "shfl"
    assert c("IMAD.WIDE R2, R3, 0x10, R4") == "int"
    assert c("BSSY B0, 0xf80") == "br"


def test_structure(model):
    m = model
    assert (m.dtype, m.base_t, m.out_t, m.rows, m.base_mode) == ("bfloat16", "float32", "float32", 2, 1)
    assert m.warnings == []
    ((lp, hidden, weight),) = m.loops
    assert (m._instrs[lp.head].addr, m._instrs[lp.tail].addr) == (0xC0, 0x360)
    assert (hidden, weight) == (4, 2)
    assert (m._instrs[m._outer.head].addr, m._instrs[m._outer.tail].addr) == (0x40, 0x480)


def test_counts_per_load(model):
    # M = 2: fixed 13 / 2 loads + one block of 15
    assert model.per_load(2) == {"fp": 2, "cvt": 6, "mem": 3, "int": 5, "br": 5.5}
    assert sum(model.per_load(2).values()) == 21.5
    # M = 1: row 1's block is skipped, its guard still issues: 13 / 2 + 9
    assert model.per_load(1) == {"fp": 1, "cvt": 3, "mem": 2, "int": 4, "br": 5.5}
    lc = model.loop_cost(0, 2)
    assert sum(lc.fixed.values()) == 13 and sum(lc.block.values()) == 15


def test_counts_per_vocab_id(model):
    epi2, _ = model.epilogue(2)
    assert epi2 == {"int": 11, "br": 6, "shfl": 2, "fp": 2, "mem": 2}
    assert sum(model.epilogue(1)[0].values()) == 19  # one reduction and one store skipped (4 instructions each)
    pv = model.per_vocab(2, SHAPE)
    assert sum(pv["cls"].values()) == 13 + 2 * 15 + 23 and pv["weight_bytes"] == 1024
    assert sum(model.per_vocab(1, SHAPE)["cls"].values()) == 13 + 2 * 9 + 19
    # 80 vectors: a warp runs 2 iterations and issues 3 blocks (the third with half its lanes idle)
    shape = dict(SHAPE, Hv=640)
    assert sum(model.per_vocab(2, shape)["cls"].values()) == 2 * 13 + 3 * 15 + 23
    model.arms = "max"  # the larger arm of the map if/else: 2 more
    try:
        assert sum(model.epilogue(2)[0].values()) == 25
    finally:
        model.arms = "min"


def test_issue_model_arithmetic(model):
    clock, bw = 1.755, 3000.0
    p = sm.predict(model, 2, SHAPE, clock, bw)
    rate = 132 * 4 * clock * 1e9
    assert p["t_issue"] == pytest.approx(1000 * 66 / rate)
    nbytes = 1000 * 512 * 2 + 2 * 512 * 2 + 2 * 1000 * 4 + 2 * 1000 * 4  # weights, hidden, logits out, base in
    assert p["bytes"] == nbytes
    assert p["t_mem"] == pytest.approx(nbytes / (bw * 1e9))
    assert p["ratio"] == pytest.approx(p["t_issue"] / p["t_mem"])
    assert p["per_load"] == pytest.approx(66 / 2)
    # a bandwidth at which 58 instructions per vocabulary id take exactly the memory time at M = 2:
    # M = 1 (50 instructions) stays memory-bound, M = 2 (66) is issue-bound
    bw_mid = nbytes / (1000 * 58 / rate) / 1e9
    assert sm.predict(model, 1, SHAPE, clock, bw_mid)["ratio"] < 1 < sm.predict(model, 2, SHAPE, clock, bw_mid)["ratio"]
    assert sm.crossover_m({2: model}, SHAPE, clock, bw_mid) == 2
    mstar = sm.instantiation_crossover(model, SHAPE, clock, bw_mid)
    assert 1 < mstar < 2
    assert sm.crossover_m({2: model}, SHAPE, clock, bw_mid / 100) is None  # slow memory: never issue-bound
    # the H100 budget: 132 x 4 x 1.755 GHz against 3.35 TB/s / 512 B per warp load
    assert rate / (3350e9 / 512) == pytest.approx(141.6, abs=0.05)


def test_dispatch_and_rows():
    src = """
constexpr int kMaxRows = 16;
template <typename scalar_t, typename base_t, typename out_t, int BASE_MODE>
void dispatch_rows(const Launch& p) {
  const int64_t M = p.vh.size(0);
  if (M <= 1) return launch<scalar_t, base_t, out_t, 1, BASE_MODE>(p);
  if (M <= 2) return launch<scalar_t, base_t, out_t, 2, BASE_MODE>(p);
  if (M <= 4) return launch<scalar_t, base_t, out_t, 4, BASE_MODE>(p);
  if (M <= 8) return launch<scalar_t, base_t, out_t, 8, BASE_MODE>(p);
  return launch<scalar_t, base_t, out_t, kMaxRows, BASE_MODE>(p);
}
"""
    assert sm.dispatch_from_source(src) == [(1, 1), (2, 2), (4, 4), (8, 8), (None, 16)]
    src2 = """
constexpr int kMaxRows = 16;
template <typename F>
inline void for_rows(int64_t M, F&& f) {
  if (M <= 1) return f(std::integral_constant<int, 1>{});
  if (M <= 2) return f(std::integral_constant<int, 2>{});
  if (M <= 4) return f(std::integral_constant<int, 4>{});
  if (M <= 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, kMaxRows>{});
}
"""
    assert sm.dispatch_from_source(src2) == [(1, 1), (2, 2), (4, 4), (8, 8), (None, 16)]
    assert sm.dispatch_from_source("void f() {}") is None
    assert [sm.rows_for_m(M, [1, 2, 4, 8, 16]) for M in (1, 2, 3, 5, 9, 16, 17)] == [1, 2, 4, 8, 16, 16, None]


def test_resources():
    text = ("Resource usage:\n Function _ZN11ivl_kernels27guided_logits_decode_kernelIfffLi1ELi1EEEvPKT_:"
            "REG:54 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:688 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    name = "_ZN11ivl_kernels27guided_logits_decode_kernelIfffLi1ELi1EEEvPKT_"
    assert sm.parse_resource_usage(text) == {name: (54, 0)}
    assert [sm.resident_warps(r) for r in (40, 56, 87, 96)] == [48, 32, 16, 16]


def test_read_measured():
    meas, bw = sm.read_measured(sm.DEFAULT_CSV)
    if not meas:
        pytest.skip("the H100 CSV is not in this checkout")
    assert meas[(1, "hidden")] == pytest.approx(0.973, abs=1e-3)
    assert meas[(8, "logits")] == pytest.approx(3.167, abs=1e-3)
    assert bw == pytest.approx(2999.8, abs=0.1)


def test_missing_tools_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(sm, "find_tool", lambda name, cuda_home: None)
    assert sm.main([]) == 2
    assert "cuobjdump not found" in capsys.readouterr().err


def test_from_saved_dump(tmp_path):
    dump = tmp_path / "k.sass"
    dump.write_text(SASS)
    out = tmp_path / "report.txt"
    assert sm.main(["--sass", str(dump), "--out", str(out), "--measured", ""]) == 0
    text = out.read_text()
    assert "Table 1" in text and "bfloat16" in text


def _have_tools():
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return sm.find_tool("nvcc", cuda_home) and sm.find_tool("cuobjdump", cuda_home)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IVL_SKIP_SASS_MODEL", "0") not in ("", "0"), reason="IVL_SKIP_SASS_MODEL set")
@pytest.mark.skipif(not _have_tools(), reason="needs nvcc and cuobjdump")
def test_end_to_end(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "sass_model.txt"
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "Table 1" in text and "Table 2a" in text
    assert "guided_logits_decode_kernel" not in text  # every instantiation was recognised and tabulated
