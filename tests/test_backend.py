"""Backend selection (_backend.py): auto, the environment override, and errors that say why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from utils import HAS_CUDA

import hadamard_kernels as hk
from hadamard_kernels import _backend

CPU = torch.device("cpu")


def test_auto_picks_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    assert _backend.resolve("poly_chain", None, CPU, torch.float32) == "reference"


def test_env_override(monkeypatch):
    monkeypatch.setenv(_backend.ENV_BACKEND, "reference")
    assert _backend.resolve("poly_chain", None, CPU, torch.float32) == "reference"
    monkeypatch.setenv(_backend.ENV_BACKEND, "fastest")
    with pytest.raises(ValueError, match=_backend.ENV_BACKEND):
        _backend.resolve("poly_chain", None, CPU, torch.float32)


def test_argument_beats_env(monkeypatch):
    monkeypatch.setenv(_backend.ENV_BACKEND, "cuda")
    assert _backend.resolve("poly_chain", "reference", CPU, torch.float32) == "reference"


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("poly_chain", "tpu", CPU, torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="checks the messages on a machine without a GPU")
def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match="cuda.*not available"):
        _backend.resolve("poly_chain", "cuda", CPU, torch.float32)


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = _backend.unavailable_reason("triton", CPU, torch.float32)
    assert why is not None and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.unavailable_reason("triton", CPU, torch.float32) is None
    assert "bfloat16" in _backend.unavailable_reason("triton", CPU, torch.bfloat16)


def test_env_choice_of_unavailable_backend_is_runtime_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(_backend.ENV_BACKEND, "triton")
    with pytest.raises(RuntimeError, match=f"from {_backend.ENV_BACKEND}"):
        hk.poly_chain(torch.randn(2, 3), torch.randn(1, 2, 3))


def test_available_backends_lists_all():
    found = hk.available_backends("cpu")
    assert set(found) == set(_backend.BACKENDS) and found["reference"] is None


def test_cli_info_and_check():
    info = subprocess.run([sys.executable, "-m", "hadamard_kernels", "info"], capture_output=True, text=True,
                          check=True)
    assert "backends for cpu tensors" in info.stdout
    check = subprocess.run([sys.executable, "-m", "hadamard_kernels", "check", "--device", "cpu"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all checks passed" in check.stdout and "FAIL" not in check.stdout


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which ops already warned that auto ran the reference on CUDA tensors."""
    monkeypatch.setattr(_backend, "_WARNED", set())


def test_auto_skips_a_backend_that_does_not_support_the_call(monkeypatch, fresh_warnings):
    """A kernel's size limit moves auto to the next backend (resolved for a CUDA device; nothing runs)."""
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    cuda_device = torch.device("cuda")
    first = _backend.resolve("poly_ncp", None, cuda_device, torch.float32)
    with pytest.warns(UserWarning, match="runs the reference"):  # when the next backend is the reference
        assert _backend.resolve("poly_ncp", None, cuda_device, torch.float32, supports=lambda n: n != first) != first
        assert _backend.resolve("poly_ncp", None, cuda_device, torch.float32, supports=lambda n: False) == "reference"
    # Asked for by name, the backend is returned and raises NotImplementedError itself.
    assert _backend.resolve("poly_ncp", "reference", CPU, torch.float32, supports=lambda n: False) == "reference"


def test_triton_runs_wherever_it_is_expected():
    """Under TRITON_INTERPRET=1 (CPU CI) or on a GPU the Triton backend must import: a broken install would
    otherwise drop every Triton test from the parametrization without a failure."""
    if os.environ.get("TRITON_INTERPRET") == "1" or HAS_CUDA:
        assert _backend.triton_import_error() is None, _backend.triton_import_error()


def test_cli_bench_lists_cases():
    out = subprocess.run([sys.executable, "-m", "hadamard_kernels", "bench", "--list"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "poly_chain" in out.stdout and "poly_ncp" in out.stdout


# ---------------------------------------------------------------- auto on a CUDA tensor no fused kernel supports
def test_auto_warns_once_per_op_when_a_cuda_call_runs_the_reference(monkeypatch, fresh_warnings):
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    cuda_device = torch.device("cuda")
    with pytest.warns(UserWarning, match=r"poly_ncp: no fused kernel .*triton: its kernel does not support"):
        assert _backend.resolve("poly_ncp", None, cuda_device, torch.float32, supports=lambda n: False) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning for the same op would raise here
        assert _backend.resolve("poly_ncp", None, cuda_device, torch.float32, supports=lambda n: False) == "reference"
        # Asked for by name, or CPU tensors (where auto always means the reference): no warning.
        assert _backend.resolve("poly_chain", "reference", cuda_device, torch.float32) == "reference"
        assert _backend.resolve("poly_chain", None, CPU, torch.float32, supports=lambda n: False) == "reference"
    # Another op warns on its own; the reason names the backend's own sentence (float64 is no GPU dtype).
    with pytest.warns(UserWarning, match=r"poly_chain: .*triton: the triton backend supports float32"):
        _backend.resolve("poly_chain", None, cuda_device, torch.float64)


# ---------------------------------------------------------------- triton's dependencies
def test_missing_numpy_is_named_with_its_fix(monkeypatch):
    """triton without numpy (a plain install before numpy was a dependency): say so, not 'pip install triton'."""
    exc = ModuleNotFoundError("No module named 'numpy'", name="numpy")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.describe_triton_import_error(exc) == "the Triton interpreter needs numpy (pip install numpy)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "pip install numpy" in _backend.describe_triton_import_error(exc)
    other = ModuleNotFoundError("No module named 'triton'", name="triton")
    assert "pip install triton" in _backend.describe_triton_import_error(other)


def test_numpy_is_a_runtime_dependency():
    """The Triton interpreter (how a CPU machine runs the triton backend, and `check` with it) imports numpy, so a
    plain `pip install .` must bring it."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert any(re.match(r"numpy\b", d) for d in dependencies), dependencies


# ---------------------------------------------------------------- the CUDA runtime linked into _C vs the driver
@pytest.mark.parametrize(("driver", "runtime", "expected"), [
    (13000, 13000, None),
    (13020, 13000, None),      # newer driver
    (13000, 13010, None),      # older minor version of the same major: CUDA's minor version compatibility
    (14000, 13000, None),
    (12040, 13000, r"driver supports CUDA 12\.4 but .* built with CUDA 13\.0"),
    (0, 13000, "no NVIDIA driver"),
])
def test_driver_problem(driver, runtime, expected):
    problem = _backend.driver_problem(driver, runtime)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and re.search(expected, problem), problem


class FakeExtension:
    """hadamard_kernels._C as an old driver shows it: cudaGetDeviceCount fails."""

    __file__ = "_C.so"

    def __init__(self, driver=12040, runtime=13000, count=0, error="cudaErrorInsufficientDriver: CUDA driver version "
                 "is insufficient for CUDA runtime version"):
        self.info = (driver, runtime, count, error)
        self.calls = 0

    def cuda_runtime_info(self):
        self.calls += 1
        return self.info


@pytest.fixture
def fake_extension(monkeypatch):
    def install(ext):
        monkeypatch.setattr(_backend, "cuda_extension", lambda: (ext, None))
        _backend.cuda_runtime_problem.cache_clear()
        return ext
    yield install
    _backend.cuda_runtime_problem.cache_clear()


def test_old_driver_makes_the_cuda_backend_unavailable(monkeypatch, fake_extension, fresh_warnings):
    ext = fake_extension(FakeExtension())
    cuda_device = torch.device("cuda")
    why = _backend.unavailable_reason("cuda", cuda_device, torch.float16)
    assert why is not None and "CUDA 12.4" in why and "CUDA 13.0" in why
    with pytest.raises(RuntimeError, match="driver supports CUDA 12.4"):
        _backend.resolve("poly_chain", "cuda", cuda_device, torch.float16)
    # Auto passes over it (here with cuda first in the table) instead of crashing at the launch.
    monkeypatch.setattr(_backend, "AUTO_PREFERENCE", {"poly_chain": ("cuda",)})
    with pytest.warns(UserWarning, match="driver supports CUDA 12.4"):
        assert _backend.resolve("poly_chain", None, cuda_device, torch.float16) == "reference"
    assert ext.calls == 1, "the runtime is asked once per process"
    # CPU tensors never ask the CUDA runtime.
    fake_extension(ext := FakeExtension())
    _backend.unavailable_reason("cuda", CPU, torch.float32)
    assert ext.calls == 0


def test_no_gpu_for_the_extension_runtime(fake_extension):
    """A new enough driver whose runtime still sees no device (cudaGetDeviceCount's error) is reported, not raised."""
    fake_extension(FakeExtension(driver=13000, error="cudaErrorNoDevice: no CUDA-capable device is detected"))
    why = _backend.unavailable_reason("cuda", torch.device("cuda"), torch.float32)
    assert why is not None and "cudaErrorNoDevice" in why
    fake_extension(FakeExtension(driver=13000, count=1, error=None))
    assert _backend.unavailable_reason("cuda", torch.device("cuda"), torch.float32) is None


def test_stale_extension_is_reported(fake_extension):
    """An _C built before cuda_runtime_info existed makes the backend unavailable with a rebuild hint."""
    fake_extension(object())
    assert "rebuild" in _backend.unavailable_reason("cuda", torch.device("cuda"), torch.float32)


def test_cli_info_reports_an_old_driver(fake_extension, capsys):
    from hadamard_kernels.__main__ import info

    fake_extension(FakeExtension())
    assert info() == 0
    out = capsys.readouterr().out
    assert "CUDA runtime 13.0" in out and "NVIDIA driver: CUDA 12.4" in out
    assert "the cuda backend cannot run here: the NVIDIA driver supports CUDA 12.4" in out


def test_a_cuda_call_runs_its_backend_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device (and the CUDA launchers use its stream): select hands back the
    backend with its functions run under torch.cuda.device(the tensors' device), so tensors on cuda:1 are computed
    on cuda:1 whatever device is current. CPU calls get the module itself."""
    import contextlib
    import types

    from hadamard_kernels.ops._library import BackendModules

    current = []

    @contextlib.contextmanager
    def device(d):
        current.append(torch.device(d))
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_backend, "resolve", lambda *args, **kwargs: "triton")
    backend = types.SimpleNamespace(forward=lambda x: (x, list(current)), CHUNK=64)
    modules = BackendModules("poly_chain", "hadamard_kernels.ops.poly_chain")
    monkeypatch.setattr(modules, "module", lambda name: backend)
    on_gpu1 = modules.select(None, types.SimpleNamespace(device=torch.device("cuda", 1), dtype=torch.float32))
    assert on_gpu1.forward(3) == (3, [torch.device("cuda", 1)]) and current == []
    assert on_gpu1.CHUNK == 64
    assert modules.select(None, torch.zeros(1)) is backend
