"""Ahead-of-time compilation of the fused head's launches for a real GPU target, on any machine.

Triton compiles for `GPUTarget("cuda", 90, 32)` (H100) or `("cuda", 80, 32)` (A100) without a
GPU; ptxas (shipped in triton/backends/nvidia/bin) then reports registers and spills. The
launches come from `kernels.head_plan.plan_forward` / `plan_backward` — what the launcher runs —
so what is compiled here is what the engine launches, not a hand-written list.

    python -m kernels.aot            # table: kernel × dtype × arch → registers, spills, shared, MMA
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace

import torch

from kernels import head_plan as hp

# Shared memory an SM can give one CTA (opt-in maximum): sm_90 227 KiB, sm_80 163 KiB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.int64: "i64", torch.int32: "i32"}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    mma: str  # "wgmma", "mma" or "" (no tensor-core instruction in the PTX)
    ffma: int  # fma.rn.f32 count in the PTX


def _specialize(value) -> tuple[str, bool]:
    """(Triton type, divisible by 16) exactly as the JIT specializes a runtime argument:
    tensors by dtype and 16-byte alignment, ints by width and divisibility by 16, an int equal
    to 1 becomes a constant ("constexpr")."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        return kind, key == "D"
    except ImportError:  # older Triton: the same rules, spelled out
        if isinstance(value, torch.Tensor):
            return "*" + _TRITON_TYPES[value.dtype], True
        if isinstance(value, bool):
            return "u1", False
        if isinstance(value, int):
            if value == 1:
                return "constexpr", False
            return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
        return "fp32", False


def signature(launch: hp.Launch) -> tuple[dict, dict, dict]:
    """Triton signature (name → type), constexprs and attrs (divisibility) of one launch,
    specialized from its runtime arguments as the JIT would."""
    names = launch.kernel.arg_names
    const = dict(launch.constexprs)
    runtime = [n for n in names if n not in const]
    if len(runtime) != len(launch.args):
        raise ValueError(f"{launch.name}: {len(launch.args)} runtime arguments for parameters {runtime}")
    sig, attrs = {}, {}
    for name, value in zip(runtime, launch.args):
        if isinstance(value, torch.Tensor) and value.dtype not in _TRITON_TYPES:
            raise TypeError(f"{launch.name}.{name}: unsupported dtype {value.dtype}")
        kind, div16 = _specialize(value)
        sig[name] = kind
        if kind == "constexpr":
            const[name] = value
        elif div16:
            attrs[name] = True
    for name in launch.constexprs:
        sig[name] = "constexpr"
    return {n: sig[n] for n in names}, const, attrs


def cache_key(launch: hp.Launch, arch: int, debug: bool = False) -> tuple:
    sig, const, attrs = signature(launch)
    return (launch.name, arch, tuple(sig.items()), tuple(sorted(const.items())), tuple(sorted(attrs)),
            launch.num_warps, launch.num_stages, debug)


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile(key: tuple) -> Compiled:
    """Compile one specialization (key from `cache_key`) and measure it with ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, arch, sig, const, div16, warps, stages, debug = key
    sig = dict(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if n in div16}
    src = ASTSource(fn=getattr(_jit_kernels(), name), signature=sig, constexprs=dict(const), attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    if debug:
        opts.update(hp.DEBUG_OPTIONS)
    cc = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    ptx = cc.asm["ptx"]
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as ptx_file:
            ptx_file.write(ptx)
        out = subprocess.run([_bin("ptxas"), "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {name} sm_{arch}: {out.stderr[-2000:]}")
    log = out.stderr + out.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    mma = "wgmma" if re.search(r"\bwgmma\.", ptx) else ("mma" if re.search(r"\bmma\.sync", ptx) else "")
    return Compiled(
        kernel=name, arch=arch, registers=regs,
        spill_stores=int(spill.group(1)) if spill else 0, spill_loads=int(spill.group(2)) if spill else 0,
        stack=int(stack.group(1)) if stack else 0, shared=int(cc.metadata.shared), mma=mma,
        ffma=len(re.findall(r"\bfma\.rn\.f32", ptx)),
    )


@functools.lru_cache(maxsize=1)
def _jit_kernels():
    """kernels/fused_head_triton.py decorated as compilable JITFunctions (never interpreted)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "fused_head_triton.py")
    spec = importlib.util.spec_from_file_location("kernels._fused_head_triton_aot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RESULTS: dict = {}  # cache_key → Compiled, for the whole process


def _interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def compile_launches(launches, arch: int, debug: bool = False) -> list[Compiled]:
    """Compile launches for sm_`arch`, each distinct specialization once per process.

    With TRITON_INTERPRET=1 (the CPU test session) Triton's compiler does not work in this
    process (interpreter state leaks into code generation), so the missing specializations
    are compiled in one child process without it; results come back as JSON."""
    keys = [cache_key(launch, arch, debug) for launch in launches]
    missing = [k for k in dict.fromkeys(keys) if k not in _RESULTS]
    if missing:
        results = _compile_in_child(missing) if _interpreting() else [_compile(k) for k in missing]
        _RESULTS.update(zip(missing, results))
    return [_RESULTS[k] for k in keys]


def compile_launch(launch: hp.Launch, arch: int, debug: bool = False) -> Compiled:
    """Compile one launch for sm_`arch` (cached per specialization within the process)."""
    return compile_launches([launch], arch, debug)[0]


def _compile_in_child(keys: list[tuple]) -> list[Compiled]:
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, "-m", "kernels.aot", "--compile-json"], input=json.dumps(keys),
                          capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compile child failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return [Compiled(**d) for d in json.loads(done.stdout.splitlines()[-1])]


def _key_from_json(k: list) -> tuple:
    name, arch, sig, const, div16, warps, stages, debug = k
    return (name, arch, tuple(tuple(x) for x in sig), tuple(tuple(x) for x in const), tuple(div16), warps,
            stages, debug)


def meta_inputs(B: int, D: int, K: int, features_dtype, weight_dtype, bias: bool):
    """Shape/dtype-only inputs (device 'meta'): plan_forward allocates and reads nothing real."""
    meta = torch.device("meta")
    f = torch.empty(B, D, dtype=features_dtype, device=meta)
    w = torch.empty(K, D, dtype=weight_dtype, device=meta)
    c = torch.empty(K, D, dtype=weight_dtype, device=meta)
    y = torch.empty(B, dtype=torch.int64, device=meta)
    b = torch.empty(K, dtype=weight_dtype, device=meta) if bias else None
    return hp.HeadInputs(f, w, c, y, b)


# (features dtype, weight dtype, tf32) of every precision the engine runs.
DTYPES = {
    "fp32": (torch.float32, torch.float32, False),
    "tf32": (torch.float32, torch.float32, True),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
    "fp16": (torch.float16, torch.float16, False),
    "amp_bf16": (torch.bfloat16, torch.float32, False),
    "amp_fp16": (torch.float16, torch.float32, False),
}
GEMM_KERNELS = ("_logits_kernel", "_dz_kernel", "_grad_features_kernel", "_grad_weight_kernel")


def launches_for(B, D, K, dtype: str, flags: hp.HeadFlags, bias: bool):
    """Every launch of one forward and its backward (`plan_forward` + `plan_backward`) at this shape."""
    fdt, wdt, tf32 = DTYPES[dtype]
    flags = replace(flags, tf32=int(tf32))
    inputs = meta_inputs(B, D, K, fdt, wdt, bias)
    fwd = hp.plan_forward(inputs, flags, interpret=False)
    g = torch.empty((), dtype=torch.float32, device="meta")  # grad_output, as autograd passes it
    bwd = hp.plan_backward(g, inputs, fwd.saved, flags, interpret=False)
    return fwd.launches + bwd.launches


def main() -> None:
    """Table of the engine's default method (eo_uc, B=512, d=2048, K=8142), without and with the
    per-class stats epilogue, every precision and arch."""
    variants = {"eo_uc": hp.HeadFlags(1.0, 1.0, True, 0.0, False),
                "eo_uc+stats": hp.HeadFlags(1.0, 1.0, True, 0.0, False, stats=True)}
    print("| kernel | variant | dtype | arch | registers | spills (st/ld B) | shared KiB | tensor cores |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in DTYPES:
        for arch in (90, 80):
            for variant, flags in variants.items():
                launches = launches_for(512, 2048, 8142, dtype, flags, bias=False)
                for launch, c in zip(launches, compile_launches(launches, arch)):
                    if variant != "eo_uc" and launch.name != "_rows_kernel":
                        continue  # only the stats epilogue differs
                    print(f"| {c.kernel} | {variant} | {dtype} | sm_{arch} | {c.registers} | "
                          f"{c.spill_stores}/{c.spill_loads} | {c.shared / 1024:.1f} | {c.mma or '-'} |")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--compile-json"]:  # child of compile_launches: keys (JSON) in, results (JSON) out
        keys = [_key_from_json(k) for k in json.loads(sys.stdin.read())]
        workers = min(len(keys), os.cpu_count() or 1)
        if workers > 1:  # compiling is CPU-bound (MLIR passes, ptxas): one process per core
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_compile, keys))
        else:
            results = [_compile(k) for k in keys]
        print(json.dumps([r.__dict__ for r in results]))
    else:
        main()
