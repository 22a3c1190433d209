"""Compile the Triton kernels that the tests launch for real GPUs (sm_90, sm_80), on a machine without one.

The interpreter checks what a kernel computes, not that it compiles: tl.dot shape rules, layout conversions and
register allocation first meet the compiler on a GPU build. `recording()` notes every kernel launch made under the
interpreter (argument types, constexprs, warps, stages, and the autotuner's full config list, kept by
`_library.triton_autotune`); `compile_launches()` compiles each for a target in subprocesses without
TRITON_INTERPRET (there the @triton.jit functions are the compiler's, not the interpreter's) and reports ptxas'
registers and spill bytes.

Command line (what the subprocesses run): `python tests/triton_targets.py specs.json` prints one JSON result per
spec. `python tests/triton_targets.py --report [--arch 90] [--every-config]` prints registers, spill bytes, shared
memory and tensor-core instructions of each recorded launch in bfloat16 (default config, or every autotune config).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

_TORCH_TO_TRITON = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64",
                    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Launch:
    """One kernel specialisation: what triton.compile needs to build it."""
    module: str
    name: str
    signature: tuple  # ((argument, triton type), ...) of the runtime arguments
    constexprs: tuple  # ((argument, JSON-able value), ...); dtypes as "tl.bf16"
    divisible_by_16: tuple  # arguments specialised as multiples of 16 (16-byte aligned pointers, sizes)
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None  # a register cap per thread (ptxas .maxnreg), as triton.Config's
    configs: tuple = field(default=(), compare=False)  # the autotuner's list: ((kwargs, warps, stages, maxnreg), ...)

    @property
    def kernel(self) -> str:
        return f"{self.module}:{self.name}"

    def with_config(self, kwargs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None) -> Launch:
        constexprs = dict(self.constexprs)
        constexprs.update(kwargs)
        return Launch(self.module, self.name, self.signature, tuple(constexprs.items()), self.divisible_by_16,
                      num_warps, num_stages, maxnreg)

    def as_bf16(self) -> Launch:
        """The same launch with float16 tensors and dtype constexprs made bfloat16 (the interpreter cannot run a
        bf16 tl.dot, but a float16 run gives the launch a bf16 run would make)."""
        signature = tuple((n, "*bf16" if t == "*fp16" else t) for n, t in self.signature)
        constexprs = tuple((n, "tl.bf16" if v == "tl.fp16" else v) for n, v in self.constexprs)
        return Launch(self.module, self.name, signature, constexprs, self.divisible_by_16, self.num_warps,
                      self.num_stages, self.maxnreg, self.configs)

    def for_arch(self, arch: int) -> Launch:
        """The launch a GPU of sm_<arch> makes: a `WGMMA` constexpr (linear attention's, set by the launcher from the
        device; the CPU recording takes the sm_90 form) says whether the target has wgmma."""
        constexprs = tuple((n, arch >= 90 if n == "WGMMA" else v) for n, v in self.constexprs)
        return Launch(self.module, self.name, self.signature, constexprs, self.divisible_by_16, self.num_warps,
                      self.num_stages, self.maxnreg, self.configs)

    def every_config(self) -> list[Launch]:
        return [self.with_config(*c) for c in self.configs] if self.configs else [self]

    def default_config(self) -> Launch:
        """With the config a GPU runs when autotuning is off (the first), not the interpreter's smallest."""
        return self.with_config(*self.configs[0]) if self.configs else self


def _is_constexpr(parameter) -> bool:
    return "constexpr" in str(parameter.annotation)  # a string under `from __future__ import annotations`


def _encode(value):
    import triton.language as tl
    if isinstance(value, tl.dtype):
        return f"tl.{value}"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str) and not value.startswith("tl."):  # e.g. a dot's input precision
        return value
    raise TypeError(f"constexpr value {value!r} has no JSON form")


def _describe(fn, args, kwargs, configs) -> Launch:
    parameters = inspect.signature(fn).parameters
    bound = dict(zip(parameters, args))
    bound.update({k: v for k, v in kwargs.items() if k in parameters})
    signature, constexprs, divisible = [], {}, []
    for name, parameter in parameters.items():
        value = bound[name]
        if _is_constexpr(parameter) or value is None:
            constexprs[name] = _encode(value)
        elif isinstance(value, torch.Tensor):
            signature.append((name, "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]))
            if value.data_ptr() % 16 == 0:
                divisible.append(name)
        elif isinstance(value, bool):
            signature.append((name, "i1"))
        elif isinstance(value, int):
            signature.append((name, "i32" if -2**31 <= value < 2**31 else "i64"))
            if value % 16 == 0:
                divisible.append(name)
        elif isinstance(value, float):
            signature.append((name, "fp32"))
        else:
            raise TypeError(f"{fn.__name__}: argument {name} = {value!r} has no triton type here")
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    return Launch(fn.__module__, fn.__name__, tuple(signature), tuple(constexprs.items()), tuple(divisible),
                  options.get("num_warps", 4), options.get("num_stages", 3), options.get("maxnreg"), configs)


@contextlib.contextmanager
def recording():
    """Collects a Launch for every interpreted kernel launch inside the block (yields the list)."""
    from triton.runtime import autotuner, interpreter
    launches, tuners = [], []
    run, tuner_run = interpreter.InterpretedFunction.run, autotuner.Autotuner.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        configs = ()
        if tuners:
            configs = tuple((c.kwargs, c.num_warps, c.num_stages, c.maxnreg)
                            for c in getattr(tuners[-1], "all_configs", ()))
        launches.append(_describe(self.fn, args, kwargs, configs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def recording_tuner_run(self, *args, **kwargs):
        tuners.append(self)
        try:
            return tuner_run(self, *args, **kwargs)
        finally:
            tuners.pop()

    interpreter.InterpretedFunction.run = recording_run
    autotuner.Autotuner.run = recording_tuner_run
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run = run
        autotuner.Autotuner.run = tuner_run


# ---- compilation (in a process without TRITON_INTERPRET) ----

def _jit_function(launch: dict):
    from triton.runtime.jit import JITFunction
    obj = getattr(importlib.import_module(launch["module"]), launch["name"])
    while not isinstance(obj, JITFunction):  # an autotuned kernel: the Autotuner wraps the JITFunction
        obj = obj.fn
    return obj


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ptxas -v (triton bundles ptxas)."""
    import triton
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", str(source), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", out)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    spills = [int(stores) + int(loads) for stores, loads in spill]
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": sum(spills)}


def _compile(launch: dict, arch: int, usage: bool) -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    fn = _jit_function(launch)
    constexprs = {n: tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for n, v in launch["constexprs"]}
    signature = dict(launch["signature"]) | {n: "constexpr" for n in constexprs}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch["divisible_by_16"]}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"],
                                     **({"maxnreg": launch["maxnreg"]} if launch["maxnreg"] else {})})
    ptx = kernel.asm["ptx"]
    result = {"shared_bytes": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
              "mma_sync": ptx.count("mma.sync"), "cp_async": ptx.count("cp.async")}
    if usage:
        result.update(_ptxas_usage(ptx, arch))
    return result


def _main_compile(path: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    jobs = json.loads(Path(path).read_text())
    for job in jobs:
        try:
            result = {"ok": True, **_compile(job["launch"], job["arch"], job["usage"])}
        except Exception as error:  # reported per launch; the caller fails the test with the message
            result = {"ok": False, "error": f"{type(error).__name__}: {str(error)[-3000:]}"}
        print(json.dumps({"index": job["index"], **result}), flush=True)


def compile_launches(launches: list[Launch], arch: int, *, usage: bool = False, workers: int | None = None,
                     timeout: float = 1800) -> list[dict]:
    """Compiles each launch for sm_<arch> in `workers` subprocesses; one result dict per launch, in order."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(launches)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = [{"index": i, "arch": arch, "usage": usage, "launch": asdict(launch)} for i, launch in enumerate(launches)]

    def run(part):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(part, f)
        try:
            done = subprocess.run([sys.executable, __file__, f.name], capture_output=True, text=True, env=env,
                                  timeout=timeout, cwd=Path(__file__).resolve().parents[1])
        finally:
            os.unlink(f.name)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if len(lines) != len(part):
            raise RuntimeError(f"the compile subprocess stopped early:\n{done.stderr[-4000:]}")
        return lines

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(run, [jobs[w::workers] for w in range(workers)]))
    results = sorted((r for part in parts for r in part), key=lambda r: r["index"])
    return results


def selfcheck_launches(dtypes=("float16", "float32")) -> list[Launch]:
    """The launches of every op of `_selfcheck.CASES` on the triton backend, forward and backward, per dtype."""
    from hadamard_kernels import _selfcheck
    launches = []
    with recording() as recorded:
        for _, build in _selfcheck.CASES:
            for dtype in dtypes:
                inputs, call = build(torch.Generator().manual_seed(0))
                leaves = [t.to(getattr(torch, dtype)).requires_grad_() for t in inputs]
                out = call(*leaves, backend="triton")
                torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    launches.extend(recorded)
    return launches


def unique(launches):
    return list(dict.fromkeys(launches))


@contextlib.contextmanager
def _patched(module, **values):
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def _forward_backward(fn, *inputs):
    leaves = [t.requires_grad_() for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)


def paths_beyond_the_cases(dtype):
    """Launches of the paths the small self-check cases leave out, in `dtype` (float16 or float32)."""
    from hadamard_kernels import (
        causal_linear_attention,
        causal_linear_attention_step,
        lrnn_product,
        poly_chain,
        poly_gate,
        poly_ncp,
        poly_sa,
    )
    from hadamard_kernels.ops.linear_attention import triton as la_triton
    from hadamard_kernels.ops.poly_gate import triton as gate_triton
    from hadamard_kernels.ops.poly_ncp import triton as ncp_triton
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    with recording() as recorded:
        for head_dim in (128, 200):  # head dims 128 and 256 (200 pads to 256): the wide tile lists
            q, k, v = randn(1, 70, 1, head_dim), randn(1, 70, 1, head_dim), randn(1, 70, 1, head_dim) * 0.1
            _forward_backward(lambda q, k, v: causal_linear_attention(q, k, v, feature_map="relu", normalize=True,
                                                                      backend="triton"), q, k, v)
        # Aligned head dim 256 (the benchmark's widest, loads with cp.async): the passes closest to the register limit.
        q, k, v = randn(1, 64, 1, 256), randn(1, 64, 1, 256), randn(1, 64, 1, 256) * 0.1
        _forward_backward(lambda q, k, v: causal_linear_attention(q, k, v, feature_map="elu1", normalize=True,
                                                                  backend="triton"), q, k, v)
        # Sequences split into segments (what long T on few heads does on a GPU): segment sums and the scan.
        q, k, v = randn(1, 200, 2, 32), randn(1, 200, 2, 32), randn(1, 200, 2, 24)
        o, state, _ = la_triton.forward(q, k, v, None, None, "identity", False, 1.0, 1e-6, True, None, segment=1)
        la_triton.backward(torch.ones_like(o), torch.ones_like(state), None, q, k, v, None, None, "identity", False,
                           1.0, 1e-6, None, [True] * 5, segment=1)
        state = torch.zeros(1, 2, 32, 24, dtype=torch.float32)
        causal_linear_attention_step(q[:, :1], k[:, :1], v[:, :1], state, backend="triton")  # the decode kernel
        with _patched(ncp_triton, MAX_K=8):  # k past MAX_K: the per-degree (wide) kernels
            x, aw, sw = randn(9, 20), randn(3, 12, 20) * 0.2, randn(2, 12, 12) * 0.2
            _forward_backward(lambda *t: poly_ncp(*t, backend="triton"), x, aw, randn(3, 12), sw, randn(2, 12))
        for channels in (576, 40):  # MONet's hidden width (a [rows, 1024] tile), and C past MAX_C (wide kernels)
            with _patched(gate_triton, MAX_C=32 if channels == 40 else gate_triton.MAX_C):
                a, b = randn(1, 8, 8, channels), randn(1, 8, 8, channels)  # 8 x 8: 2 x 2 pixel tiles, as 28 x 28
                w = [randn(channels) for _ in range(4)]
                _forward_backward(lambda *t: poly_gate(*t, spatial_shift=True, backend="triton"), a, b, *w)
        # Sizes and strides that are multiples of 16, as in production: the compiler then vectorises loads and
        # pipelines them with cp.async, which changes register use (the self-check sizes are odd on purpose).
        x, w, bias = randn(32, 64), randn(3, 64, 64) * 0.1, randn(3, 64)
        _forward_backward(lambda *t: poly_chain(*t, backend="triton"), x, w, bias)
        x, aw, sw = randn(32, 64), randn(3, 32, 64) * 0.1, randn(2, 32, 32) * 0.1
        _forward_backward(lambda *t: poly_ncp(*t, backend="triton"), x, aw, randn(3, 32), sw, randn(2, 32))
        z, ws = randn(2, 32, 64), [randn(64, 64) * 0.1 for _ in range(3)]
        _forward_backward(lambda *t: poly_sa(*t, backend="triton"), z, *ws, randn(1), randn(1))
        x, w = randn(32, 16), randn(32 * 4, 16) * 0.2
        _forward_backward(lambda *t: lrnn_product(*t, rank=32, dbar=4, activation="sin", backend="triton"), x, w,
                          randn(32 * 4))
        q, k, v = randn(1, 64, 2, 64), randn(1, 64, 2, 64), randn(1, 64, 2, 64)
        _forward_backward(lambda *t: causal_linear_attention(*t, backend="triton"), q, k, v)
    return recorded


def recorded_launches(dtype: str) -> list[Launch]:
    """Every distinct launch of the self-check cases and of the paths beyond them, in dtype (float16 / float32)."""
    return unique(selfcheck_launches((dtype,)) + paths_beyond_the_cases(getattr(torch, dtype)))


def as_bf16(launches: list[Launch], every_config: bool = False) -> list[Launch]:
    """The bfloat16 forms of float16 launches, with the default config or every autotune config."""
    bf16 = [launch.as_bf16() for launch in launches]
    return unique(c for launch in bf16 for c in (launch.every_config() if every_config else [launch.default_config()]))


def _report(arch: int, every_config: bool) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    selected = [launch.for_arch(arch) for launch in as_bf16(recorded_launches("float16"), every_config)]
    results = compile_launches(selected, arch, usage=True)
    print("| kernel | constexprs | warps, stages | registers | spill bytes | smem | wgmma | cp.async |")
    print("|---|---|---|---|---|---|---|---|")
    for launch, r in zip(selected, results):
        constexprs = ", ".join(f"{k}={v}" for k, v in launch.constexprs if not str(v).startswith("tl."))
        row = f"| {launch.name} | {constexprs} | {launch.num_warps}, {launch.num_stages} | "
        if r["ok"]:
            row += f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['wgmma']} | {r['cp_async']} |"
        else:
            row += f"failed: {r['error'][:200]} |"
        print(row)


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        _report(int(sys.argv[sys.argv.index("--arch") + 1]) if "--arch" in sys.argv else 90,
                every_config="--every-config" in sys.argv)
    else:
        _main_compile(sys.argv[1])
