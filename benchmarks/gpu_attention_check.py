"""cuDNN attention of packed rows on the GPU: numerics against XLA's mask path, and speed.

    python benchmarks/gpu_attention_check.py            # GPU session: well under 60 s
    python benchmarks/gpu_attention_check.py --smoke    # anywhere: tiny sizes (CPU: XLA only)

A tiny Llama-like decoder (bf16 compute, fp32 params, 8 query / 2 kv heads) on a packed batch
(B rows of T tokens, 2-6 sequences per row, one row full, the others padded), and the same
sequences one per row. Hidden states and parameter gradients of a linear loss on the real
tokens, for
  cudnn_packed  the packed rows through cuDNN's packed layout (ModelConfig.max_segments_per_row)
  cudnn_padded  the one-per-row batch with padded_rows=True (lengths to cuDNN's flash kernel)
  xla_packing   XLA's mask path on the packed rows against the same on the one-per-row batch
each against XLA's mask path in bf16 on the same tokens. PASS: within 4x (+1e-6) of bf16's own
error there (XLA bf16 against XLA fp32 on the packed rows), and, for cuDNN, its lowering calls
cuDNN's flash kernel without a bias. Forward+backward times (median of --iters) of cudnn_packed,
cudnn_bias (the [B, 1, T, S] mask, which cuDNN runs as a dense bias: the fallback, forced with
max_segments_per_row=None) and xla on the packed batch, and of cudnn_padded on its own batch.
The last line printed is one JSON object with everything; the exit status is 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpo_jax import attention  # noqa: E402
from dpo_jax import model as M  # noqa: E402

MAX_SEGMENTS = 8  # the packed path's bound; rows here hold at most 6 sequences

SIZES = {
    "gpu": dict(rows=4, row_length=1024, hidden=512, mlp=1408, heads=8, kv_heads=2, vocab=1024,
                layers=2, segments=(2, 6)),
    "smoke": dict(rows=2, row_length=64, hidden=64, mlp=128, heads=4, kv_heads=2, vocab=128,
                  layers=1, segments=(2, 4)),
}  # fmt: skip


def make_config(size: str) -> M.ModelConfig:
    """XLA's mask path in bf16; dataclasses.replace gives the others."""
    s = SIZES[size]
    return M.ModelConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_layers=s["layers"],
        num_heads=s["heads"],
        num_kv_heads=s["kv_heads"],
        dtype="bfloat16",
        param_dtype="float32",
        attention_impl="xla",
        max_segments_per_row=MAX_SEGMENTS,
    )


def make_batches(size: str, seed: int = 0):
    """The packed rows and the same sequences one per row, each [tokens, positions, segment
    ids] of [rows, T] (garbage tokens under the padding); for each, the (rows, cols) of its real
    tokens, in one order for both; and the number of sequences in each packed row."""
    s = SIZES[size]
    b, t, (low, high) = s["rows"], s["row_length"], s["segments"]
    rng = np.random.default_rng(seed)
    spans = []  # (row, start, length) of each sequence
    for row in range(b):
        count = int(rng.integers(low, high + 1))
        used = t if row == 0 else int(rng.integers(t * 6 // 10, t + 1))  # row 0 is full
        cuts = np.sort(rng.choice(np.arange(1, used), size=count - 1, replace=False))
        bounds = [0, *cuts.tolist(), used]
        spans += [(row, a, z - a) for a, z in zip(bounds[:-1], bounds[1:], strict=True)]

    def blank(rows):
        zeros = lambda: np.zeros((rows, t), np.int32)
        return [rng.integers(0, s["vocab"], size=(rows, t)).astype(np.int32), zeros(), zeros()]

    def place(batch, index, row, start, tokens, segment):
        end = start + len(tokens)
        batch[0][row, start:end] = tokens
        batch[1][row, start:end] = np.arange(len(tokens))  # positions restart per sequence
        batch[2][row, start:end] = segment
        index[0].extend([row] * len(tokens))
        index[1].extend(range(start, end))

    # One more row in each that stays all padding: training has them (filler pairs of the
    # last eval batch, spare packed rows), and a kernel must take a zero-length row.
    packed, padded = blank(b + 1), blank(len(spans) + 1)
    packed_index, padded_index = ([], []), ([], [])
    for j, (row, start, length) in enumerate(spans):
        tokens = packed[0][row, start : start + length].copy()
        segment = [r for r, _, _ in spans[: j + 1]].count(row)  # 1, 2, ... along the row
        place(packed, packed_index, row, start, tokens, segment)
        place(padded, padded_index, j, 0, tokens, 1)
    as_arrays = lambda index: tuple(np.asarray(x) for x in index)
    counts = [[r for r, _, _ in spans].count(row) for row in range(b + 1)]
    return packed, padded, as_arrays(packed_index), as_arrays(padded_index), counts


def loss_fn(config, batch, index, proj, padded_rows=False):
    """params -> (mean of h . proj over the real tokens, their hidden states [tokens, D])."""
    tokens, positions, segments = batch

    def loss(params):
        h = M.hidden_states(config, params, tokens, positions, segments, padded_rows=padded_rows)
        h_real = h[index].astype(jnp.float32)
        return jnp.mean(h_real @ proj), h_real

    return jax.value_and_grad(loss, has_aux=True)


def run(config, batch, index, proj, params, padded_rows=False):
    """(hidden [tokens, D], grads, jitted fn, cuDNN custom calls in its lowering)."""
    fn = jax.jit(loss_fn(config, batch, index, proj, padded_rows))
    calls = sorted(set(re.findall(r"__cudnn\$\w+", fn.lower(params).as_text())))
    (_, hidden), grads = fn(params)
    return np.asarray(hidden), jax.tree.map(np.asarray, grads), fn, calls


def diffs(hidden, grads, ref_hidden, ref_grads):
    """(max |hidden - ref|, max over params of max |grad - ref|, and of that / max |ref|)."""
    grad_abs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.abs(a - b).max()), grads, ref_grads)
    )
    grad_rel = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30)), grads, ref_grads
        )
    )
    return float(np.abs(hidden - ref_hidden).max()), max(grad_abs), max(grad_rel)


def check(name, got, ref, noise):
    hidden_diff, grad_diff, grad_rel = diffs(*got, *ref)
    hidden_tol, grad_tol = 4 * noise[0] + 1e-6, 4 * noise[2] + 1e-6
    ok = hidden_diff <= hidden_tol and grad_rel <= grad_tol
    print(
        f"{name}: {'PASS' if ok else 'FAIL'}  hidden max|diff| {hidden_diff:.3g} "
        f"(tol {hidden_tol:.3g})  grad max|diff| {grad_diff:.3g}, relative {grad_rel:.3g} "
        f"(tol {grad_tol:.3g})"
    )
    return dict(
        status="PASS" if ok else "FAIL",
        hidden_max_abs_diff=hidden_diff,
        hidden_tol=hidden_tol,
        grad_max_abs_diff=grad_diff,
        grad_max_rel_diff=grad_rel,
        grad_rel_tol=grad_tol,
    )


def median_ms(fn, params, iters):
    jax.block_until_ready(fn(params))  # compiled already; one more to settle
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(params))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def cudnn_info():
    """(cuDNN version or None, compute capability or None)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        version = fa.check_cudnn_version()
    except (ImportError, AttributeError, RuntimeError):
        version = None
    return version, getattr(jax.devices()[0], "compute_capability", None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU smoke test)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (10; smoke 2)")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "gpu"
    iters = args.iters or (2 if args.smoke else 10)
    start = time.perf_counter()

    cudnn_version, capability = cudnn_info()
    packed_api = attention.cudnn_packed_api()
    device = jax.devices()[0]
    print(
        f"device {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"cuDNN {cudnn_version}, compute capability {capability}"
    )
    if cudnn_version is None:
        print("cuDNN unavailable: checking the XLA path only")
    elif packed_api is None:
        print("cuDNN's packed layout unavailable here (needs cuDNN >= 9.6 and Hopper or later)")

    packed, padded, packed_idx, padded_idx, counts = make_batches(size)
    xla = make_config(size)
    proj = jnp.asarray(np.random.default_rng(1).normal(size=(xla.hidden_size,)), jnp.float32)
    params = jax.jit(lambda key: nn.meta.unbox(M.init_params(xla, key)))(jax.random.key(0))

    # XLA: the references, and bf16's own error against fp32.
    gold = run(dataclasses.replace(xla, dtype="float32"), packed, packed_idx, proj, params)
    ref_packed = run(xla, packed, packed_idx, proj, params)
    ref_padded = run(xla, padded, padded_idx, proj, params)
    noise = diffs(*ref_packed[:2], *gold[:2])
    print(f"bf16 error (XLA bf16 against fp32): hidden {noise[0]:.3g}, grad rel {noise[2]:.3g}")
    checks = {"xla_packing": check("xla_packing", ref_packed[:2], ref_padded[:2], noise)}
    timings = {"xla": median_ms(ref_packed[2], params, iters)}
    custom_calls = {}

    # cuDNN: each case on its own, so one that fails still leaves the others' numbers.
    cudnn = dataclasses.replace(xla, attention_impl="cudnn")
    cases = {
        "cudnn_packed": (cudnn, packed, packed_idx, False, ref_packed, packed_api is not None),
        "cudnn_padded": (cudnn, padded, padded_idx, True, ref_padded, cudnn_version is not None),
        "cudnn_bias": (
            dataclasses.replace(cudnn, max_segments_per_row=None),
            packed, packed_idx, False, None, cudnn_version is not None,
        ),
    }  # fmt: skip
    for name, (config, batch, index, padded_rows, ref, available) in cases.items():
        if not available:
            print(f"{name}: SKIP")
            checks[name] = dict(status="SKIP")
            continue
        try:
            got = run(config, batch, index, proj, params, padded_rows)
            custom_calls[name] = got[3]
            timings[name] = median_ms(got[2], params, iters)
        except Exception as e:  # report it, and go on to the other cases
            print(f"{name}: ERROR {type(e).__name__}: {e}")
            checks[name] = dict(status="FAIL", error=f"{type(e).__name__}: {e}"[:2000])
            continue
        if ref is not None:
            checks[name] = check(name, got[:2], ref[:2], noise)
            # The kernel it must have been: cuDNN's flash attention, no bias (no mask).
            if not got[3] or any("Bias" in call for call in got[3]):
                print(f"{name}: FAIL  cuDNN custom calls {got[3]}: not the flash kernel alone")
                checks[name]["status"] = "FAIL"

    b, t = packed[0].shape
    measured = ", ".join(f"{name} {ms:.2f}" for name, ms in timings.items())
    print(f"fwd+bwd ms (median of {iters}): {measured}")
    failed = [name for name, c in checks.items() if c["status"] == "FAIL"]
    result = dict(
        check="gpu_attention_check",
        size=size,
        device=device.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        cudnn=cudnn_version,
        compute_capability=capability,
        packed_api=packed_api is not None,
        native_gqa_offsets=None if packed_api is None else packed_api[1],
        shape=dict(
            rows=b,
            row_length=t,
            padded_rows=len(padded[0]),
            hidden=xla.hidden_size,
            heads=xla.num_heads,
            kv_heads=xla.num_kv_heads,
            layers=xla.num_layers,
            max_segments_per_row=MAX_SEGMENTS,
        ),
        segments_per_row=counts,
        bf16_error=dict(hidden=noise[0], grad_rel=noise[2]),
        checks=checks,
        custom_calls=custom_calls,
        timings_ms=timings,
        iters=iters,
        ok=not failed,
        seconds=round(time.perf_counter() - start, 1),
    )
    print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
