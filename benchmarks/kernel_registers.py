"""Registers, spills and blocks per SM of the fused multi-exit loss kernel at sm_90a -- without a GPU.

Every launch candidate of ``imta_fast.kernels.multi_exit_kd.candidate_configs`` for the cases below is
compiled ahead of time for sm_90a (H100/H200) with Triton's bundled toolchain (``ASTSource`` +
``GPUTarget("cuda", 90, 32)``, the constexprs and integer specialisations a real launch on contiguous
inputs would get), then Triton's bundled ``ptxas -v -arch=sm_90a`` reports registers and spill bytes of
the PTX.  Blocks per SM follow CUDA's occupancy rules for sm_90: 65536 registers in 4 sub-partitions,
registers allocated per warp in units of 256, at most 64 warps, 2048 threads and 32 blocks per SM, and
228 KB of shared memory (1 KB reserved per block).

    python -m benchmarks.kernel_registers                  # markdown table on stdout
    python -m benchmarks.kernel_registers --json out.json  # and the records as JSON

Runs without ``TRITON_INTERPRET`` (Triton's own jit helpers must be compiled, not interpreted): when it
is set to 1 the script re-executes itself without it.  Prints one line ``SKIP <reason>`` and exits 0 when
this Triton's AOT API or ptxas is not available (tests skip on it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

K = 5
# (B, C, dtype, teacher): the training shapes of issue #9 (C = 1000 at B = 256 and 8192, both dtypes, with
# and without a teacher), plus C = 100 (rows packed into a tile), C = 4096 (the widest row kept in
# registers, 16 warps) and C = 21841 (chunked rows)
CASES = ([(B, 1000, dt, t) for dt in ("bf16", "fp32") for t in (True, False) for B in (256, 8192)]
         + [(B, 100, "bf16", True) for B in (256, 8192)] + [(8192, 4096, "bf16", True)]
         + [(B, 21841, "bf16", True) for B in (256, 8192)])
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}

# sm_90 (H100 / H200) occupancy limits
REGS_PER_SM, SUB_PARTITIONS, REG_UNIT_PER_WARP = 65536, 4, 256
MAX_WARPS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 64, 2048, 32
SMEM_PER_SM, SMEM_RESERVED_PER_BLOCK = 228 * 1024, 1024


def blocks_per_sm(regs: int, num_warps: int, shared_bytes: int) -> int:
    """Resident blocks per SM for this register count, block size and dynamic shared memory (sm_90)."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_UNIT_PER_WARP) * REG_UNIT_PER_WARP
    warps_by_regs = (REGS_PER_SM // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS
    limits = [min(warps_by_regs, MAX_WARPS_PER_SM) // num_warps, MAX_THREADS_PER_SM // (32 * num_warps),
              MAX_BLOCKS_PER_SM, SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_BLOCK)]
    return max(0, min(limits))


def parse_ptxas(log: str) -> Dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` output (one kernel)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return {"regs": int(regs.group(1)), "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2))}


def global_accesses(ptx: str) -> Dict[str, int]:
    """Counts of vector and of 16-bit scalar global loads/stores in the PTX: an aligned bf16 row should be
    read and written 8 or 4 elements at a time, never one (``st.global.b16``)."""
    return {"vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.", ptx)),
            "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[248]\.", ptx)),
            "scalar_b16_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", ptx)),
            "scalar_b16_stores": len(re.findall(r"st\.global(?:\.\w+)*\.b16\b", ptx))}


def _ptxas_path() -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


def compile_candidate(B: int, C: int, dtype: str, teacher: bool, cfg, *, k: int = K, sample_weights: bool = False,
                      soft_ce: bool = False, write_grad: bool = True):
    """AOT-compile the kernel for sm_90a as ``multi_exit_kd_forward`` would launch it on contiguous inputs
    with launch configuration ``cfg``; returns Triton's compiled kernel (``.asm['ptx']``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from imta_fast.kernels import multi_exit_kd as kd

    fn = JITFunction(kd._multi_exit_kd_kernel.fn)
    n_prog = cfg.programs(B, k)
    count_rows = B <= kd.COUNT_IN_KERNEL_MAX_B and B * n_prog <= kd.COUNT_IN_KERNEL_MAX_READS
    align = kd._row_alignment_cached((C, 1), (C, 1) if teacher else None, C, (B * C, C) if write_grad else (0, 0),
                                     ITEMSIZE[dtype])
    consts = dict(K=k, COUNT_ROWS=count_rows, COUNT_BLOCK=min(kd._next_pow2(B), 1024), HAS_TEACHER=teacher,
                  HAS_SW=sample_weights, SOFT_CE=soft_ce, WRITE_GRAD=write_grad, SINGLE_TILE=C <= cfg.block_c,
                  ALIGN=align, BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, EXIT_SPLIT=cfg.exit_split)
    ptrs = {"y_ptr": "*i64", "n_ptr": "*i64", "t_ptr": "*" + dtype, "s_ptr": "*fp32", "coef_ptr": "*fp32",
            "loss_ptr": "*fp32", "g_ptr": "*" + ("fp32" if dtype == "fp16" else dtype),
            **{f"z{i}": "*" + dtype for i in range(8)}}
    floats = ("inv_D", "inv_C", "T", "inv_T", "eps")
    # integer arguments as a launch on contiguous tensors passes them; Triton specialises 1 as a constant
    # and marks multiples of 16 as divisible by 16
    ints = dict(stride_zb=C, stride_zc=1, stride_y=1, ignore_index=-100, stride_tb=C if teacher else 0,
                stride_tc=1 if teacher else 0, stride_sb=k if sample_weights else 0, stride_sk=1 if sample_weights else 0,
                stride_gk=B * C if write_grad else 0, stride_gb=C if write_grad else 0, B=B, C=C)
    consts.update({n: 1 for n, v in ints.items() if v == 1})
    names = fn.arg_names
    idx = {n: i for i, n in enumerate(names)}
    sig = {n: ("constexpr" if n in consts else ptrs.get(n) or ("fp32" if n in floats else "i32")) for n in names}
    divisible = list(ptrs) + [n for n, v in ints.items() if v != 1 and v % 16 == 0]
    src = ASTSource(fn=fn, signature=sig, constexprs={(idx[n],): v for n, v in consts.items()},
                    attrs={(idx[n],): [["tt.divisibility", 16]] for n in divisible})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps))


def measure(cases=CASES, log=lambda m: None) -> List[dict]:
    """One record per (case, candidate): registers, spills, shared memory, blocks and warps per SM."""
    from imta_fast.kernels import multi_exit_kd as kd

    ptxas = _ptxas_path()
    if ptxas is None:
        raise FileNotFoundError("Triton's bundled ptxas (triton/backends/nvidia/bin/ptxas) is missing")
    records = []
    for B, C, dtype, teacher in cases:
        for i, cfg in enumerate(kd.candidate_configs(B, C, K)):
            compiled = compile_candidate(B, C, dtype, teacher, cfg)
            ptx = compiled.asm["ptx"]
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "k.ptx")
                with open(src, "w") as f:
                    f.write(ptx)
                out = subprocess.run([ptxas, "-v", "-arch=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                                     capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"ptxas failed for B={B} C={C} {dtype} {cfg}:\n{out.stderr[-2000:]}")
            rec = dict(B=B, C=C, K=K, dtype=dtype, teacher=teacher, config=str(cfg), heuristic=i == 0,
                       block_b=cfg.block_b, block_c=cfg.block_c, num_warps=cfg.num_warps, exit_split=cfg.exit_split,
                       shared_bytes=int(compiled.metadata.shared), **parse_ptxas(out.stderr), **global_accesses(ptx))
            rec["blocks_per_sm"] = blocks_per_sm(rec["regs"], cfg.num_warps, rec["shared_bytes"])
            rec["warps_per_sm"] = rec["blocks_per_sm"] * cfg.num_warps
            records.append(rec)
            log(f"B={B} C={C} {dtype} {'teacher' if teacher else 'CE only'} {cfg}: {rec['regs']} registers, "
                f"spills {rec['spill_stores']}/{rec['spill_loads']} B, {rec['blocks_per_sm']} blocks/SM")
    return records


def markdown(records: List[dict]) -> str:
    lines = ["| B | C | dtype | teacher | config (first: heuristic) | registers | spill st/ld (bytes) | blocks/SM "
             "| warps/SM | vector ld/st |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cfg = f"**{r['config']}**" if r["heuristic"] else r["config"]
        lines.append(f"| {r['B']} | {r['C']} | {r['dtype']} | {'yes' if r['teacher'] else 'no'} | {cfg} | {r['regs']} "
                     f"| {r['spill_stores']}/{r['spill_loads']} | {r['blocks_per_sm']} | {r['warps_per_sm']} "
                     f"| {r['vector_loads']}/{r['vector_stores']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the records here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-variant progress on stderr")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # must hold before Triton is imported
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "benchmarks.kernel_registers", *(argv or sys.argv[1:])], env=env)
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(f"SKIP Triton's AOT compile API is not available here: {exc}")
        return 0
    if _ptxas_path() is None:
        print("SKIP Triton's bundled ptxas is not available here")
        return 0
    try:
        records = measure(log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    except TypeError as exc:  # another Triton version's ASTSource / compile signature
        print(f"SKIP Triton's AOT compile API differs here: {exc}")
        return 0
    import triton

    print(f"Fused multi-exit kernel, K = {K}, sm_90a, Triton {triton.__version__} with its bundled ptxas "
          "(`ptxas -v -arch=sm_90a`), contiguous inputs, no sample weights, gradient written.\n")
    print(markdown(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90a", "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
