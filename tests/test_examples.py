"""Every example in examples/ runs at its smallest size (--smoke: the code of --quick, smaller still) and prints
what it claims: a broken model, backend or decoder fails here, so an example cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, out: Path) -> dict[str, str]:
    """Run examples/NAME.py --smoke on the CPU; the key=value pairs of its final RESULT line."""
    missing = [m for m in ("matplotlib", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        message = f"the examples need the [examples] extra (missing {', '.join(missing)})"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs the extra: missing it there must not skip every example silently
        pytest.skip(message)
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), f"{name}: the last line is not the RESULT line:\n{proc.stdout[-2000:]}"
    result = dict(item.split("=", 1) for item in last.split()[1:])
    assert result["example"] == name
    png = Path(result["png"])
    assert png.parent == out and png.is_file() and png.stat().st_size > 10_000, f"{name}: no figure at {png}"
    return result


def test_pi_nets_digits(tmp_path):
    r = run_example("pi_nets_digits", tmp_path)
    for model in ("ccp", "ncp"):
        # Chance is 0.1; the smoke run (12 Adam steps) reaches 0.5-0.6, the --quick run (60 steps) 0.91-0.92.
        assert float(r[f"{model}_acc_reference"]) > 0.35, r
        # Same weights, same batches: the fused curve is the reference's up to float32 rounding (about 1e-6 here).
        assert "triton" in [k.rsplit("_", 1)[1] for k in r if k.startswith(f"{model}_maxdiff_")], r
        for key in (k for k in r if k.startswith(f"{model}_maxdiff_")):
            assert float(r[key]) < 1e-4, (key, r[key])
            backend = key.rsplit("_", 1)[1]
            assert r[f"{model}_acc_{backend}"] == r[f"{model}_acc_reference"], r


def test_pnn_extrapolation(tmp_path):
    r = run_example("pnn_extrapolation", tmp_path)
    f = {k: float(v) for k, v in r.items() if k.endswith("_err") or k.endswith("_diff")}
    # Fig. 1: a chain without activation is a cubic polynomial, so it extrapolates the cubic; the ReLU PNN
    # extrapolates it better than the ReLU MLP, which goes on linearly.
    assert f["cubic_poly_extrap_err"] < 1e-2, f
    assert f["cubic_pnn_extrap_err"] < f["cubic_mlp_extrap_err"], f
    # Fig. 2 / Theorem 6: the ReLU PNN extrapolates x1^2 + x2^2 when trained in all directions, not from the
    # positive quadrant only.
    assert f["quad_pnn_all_extrap_err"] < 0.7 * f["quad_pnn_positive_extrap_err"], f
    assert f["quad_pnn_all_extrap_err"] < f["quad_mlp_all_extrap_err"], f
    # The fused kernels (Triton interpreter) give the trained chains' curves.
    assert all(f[k] < 1e-5 for k in f if k.endswith("_fused_diff")), f


def test_linear_attention_lm(tmp_path):
    r = run_example("linear_attention_lm", tmp_path)
    # Decoding token by token from the state (linear, on every backend) or the KV cache (softmax) gives the
    # logits of the full causal pass.
    assert {"decode_vs_full_linear_reference", "decode_vs_full_linear_triton", "decode_vs_full_softmax"} <= set(r)
    for key in (k for k in r if k.startswith("decode_vs_full_")):
        assert float(r[key]) < 1e-5, (key, r[key])
    # It learned something: uniform over the text's symbols is log2(88) = 6.5 bits per character.
    assert float(r["linear_val_bpc"]) < 5.0 and float(r["softmax_val_bpc"]) < 5.0, r
    # O(1) per token: from a context of 64 to one of 16384 tokens the linear model's (fastest) decoding step stays
    # the same; a decoder that re-read its context would take hundreds of times longer.
    assert float(r["decode_ms_linear_last"]) < 3 * float(r["decode_ms_linear_first"]), r


def test_lrnn_inr(tmp_path):
    r = run_example("lrnn_inr", tmp_path)
    # The same weights and pixels: the fused LRNN's loss curve is the reference's up to float32 rounding.
    assert "lrnn_maxdiff_triton" in r, r
    for key in (k for k in r if k.startswith("lrnn_maxdiff_")):
        assert float(r[key]) < 1e-4, (key, r[key])
    # Both networks learn the image: well above the PSNR of its mean gray level (about 10 dB; the smoke run's
    # 12 epochs reach about 16 dB for the LRNN and 26 dB for the SIREN).
    mean = float(r["mean_psnr"])
    assert float(r["lrnn_psnr"]) > mean + 2 and float(r["siren_psnr"]) > mean + 2, r
    # Same size within 5% (the SIREN's width is chosen to match).
    assert abs(int(r["siren_params"]) - int(r["lrnn_params"])) < 0.05 * int(r["lrnn_params"]), r
