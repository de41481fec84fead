"""Linear layers that run prefill-sized inputs at the speed of MLX's CPU GEMM.

Why this exists (measured on the CPU backend of MLX 0.32, x86-64, one thread):

- float32 ``a @ b`` goes to the reference BLAS that MLX links on Linux and
  runs at about 6 GFLOP/s when ``b`` is a plain row-major matrix, but at about
  2.4 GFLOP/s when ``b`` is a transposed view (``x @ w.T``, what ``nn.Linear``
  does): the reference loop then streams the whole weight once per output row.
- ``mx.quantized_matmul`` (``nn.QuantizedLinear``) and ``mx.gather_qmm`` run
  at about 2.2 GFLOP/s with float32 inputs and 0.1-0.3 GFLOP/s with bfloat16
  ones; ``mx.dequantize`` costs about 1.5 ns per weight and a transposing copy
  about 3 ns per element.

So for inputs with many rows (prefill) it pays to dequantize the weight once
per call, copy it to ``[in, out]`` (row-major) and run a plain GEMM: the same
maths (the product with ``scale * q + bias``), about 2.5x faster with float32
activations and 10x+ with bfloat16 ones. Rows below ``MIN_DENSE_ROWS``
(decode, speculative verification) keep the quantized kernel, which is the
faster one there. Both paths spread their work over the CPU lanes (one MLX
CPU stream, i.e. one thread, per core; see :func:`cpu_lanes`): tiles of the
dense weight, or slices of the output features of the quantized product. On
other devices (Metal) MLX's quantized kernels are the fast path and nothing
changes.

:func:`use_fast_linears` swaps a model's ``nn.Linear`` / ``nn.QuantizedLinear``
layers for the subclasses below (same parameters, same names), which
:func:`qnext_mlx.load_model` does for every model it loads.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .lanes import cpu_lanes, lane_contexts

__all__ = [
    "FastLinear",
    "FastQuantizedLinear",
    "dense_matmul",
    "dequantized",
    "cpu_compute_dtype",
    "split_quantized_matmul",
    "use_dense_path",
    "use_fast_linears",
]

# Rows (tokens) from which the dense path wins: below it the dequantize +
# transpose of the weight (~5-10 ns per weight in tiles) costs more than the
# faster GEMM saves (~0.55 ns per weight and row, float32). Measured crossover
# 16-24 rows at the DeltaNet projections' shapes.
MIN_DENSE_ROWS = 32

# Weights are dequantized and transposed in tiles of at most this many
# elements (2 MiB of float32): a tile stays in cache between its dequantize,
# its transposing copy and its GEMM (measured 15-30% faster than 16 MiB tiles
# for 64 rows), and a wide layer (the LM head) never holds a float copy of itself.
_TILE_ELEMENTS = 1 << 19


def use_dense_path(rows: int) -> bool:
    """True where the dequantize-and-GEMM path beats the quantized kernels."""
    return rows >= MIN_DENSE_ROWS and mx.default_device() == mx.cpu


def dequantized(
    weight: mx.array,
    scales: mx.array,
    biases: Optional[mx.array],
    group_size: int,
    bits: int,
    mode: str = "affine",
    dtype=None,
) -> mx.array:
    """Float weight ``[..., out, in]`` of a quantized one (``mx.dequantize``), in ``dtype``
    (default: the scales' dtype, as ``mx.quantized_matmul`` computes)."""
    w = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode)
    return w if dtype is None or w.dtype == dtype else w.astype(dtype)


def dense_matmul(
    x: mx.array,
    weight: mx.array,
    scales: Optional[mx.array] = None,
    biases: Optional[mx.array] = None,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
) -> mx.array:
    """``x @ W.T`` as plain row-major GEMMs, for float or quantized ``W``.

    Args:
        x: ``[..., in]`` activations.
        weight: ``[out, in]`` float weight, or the packed quantized weight
            (then ``scales``/``biases`` as ``mx.quantize`` returns them).
    Returns:
        ``[..., out]`` in the promoted dtype of ``x`` and the (dequantized) weight.
    """
    out_dims = weight.shape[0]
    in_dims = x.shape[-1]
    lead = x.shape[:-1]
    # Row-major activations: MLX passes strided views to the BLAS as they are,
    # and strided reads slow its GEMM down as much as a transposed weight.
    x2 = mx.contiguous(x.reshape(-1, in_dims))
    lanes = cpu_lanes()
    tile = max(1, _TILE_ELEMENTS // in_dims)
    if lanes > 1 and out_dims >= 64 * lanes:
        tile = min(tile, -(-out_dims // lanes))  # at least one tile per lane
    if tile < out_dims:
        tile = max(64, -(-tile // 64) * 64)
    contexts = lane_contexts(lanes)
    parts = []
    for i, o0 in enumerate(range(0, out_dims, tile)):
        with contexts[i % len(contexts)]:
            w = weight[o0 : o0 + tile]
            if scales is not None:
                w = dequantized(
                    w,
                    scales[o0 : o0 + tile],
                    None if biases is None else biases[o0 : o0 + tile],
                    group_size,
                    bits,
                    mode,
                )
            # [in, tile] row-major: the fast (non-transposed B) case of the BLAS.
            parts.append(x2 @ mx.contiguous(w.T))
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    return y.reshape(*lead, out_dims)


# Output features from which a decode-sized quantized product is split over
# the CPU lanes (smaller ones are not worth the cross-stream hand-offs).
MIN_SPLIT_OUTPUTS = 1024


def cpu_compute_dtype(x: mx.array):
    """The dtype to run a quantized product of ``x`` in: float32 for 16-bit activations on
    the CPU device, where MLX's quantized kernels run about 11x faster in float32 (measured
    at 2048 x 2048, 4 bits: 3.5 ms vs 41 ms per row with bfloat16 activations); ``x.dtype``
    elsewhere (Metal's kernels are fast in 16 bits)."""
    if mx.default_device() == mx.cpu and x.dtype in (mx.bfloat16, mx.float16):
        return mx.float32
    return x.dtype


def split_quantized_matmul(
    x: mx.array,
    weight: mx.array,
    scales: mx.array,
    biases: Optional[mx.array],
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """``mx.quantized_matmul(x, W, transpose=True)`` with the output features
    split over the CPU lanes (decode: the kernel is compute-bound on the CPU
    and single-threaded), in :func:`cpu_compute_dtype` (the result in ``x``'s
    dtype). One plain call with one lane or a narrow ``W``."""
    compute = cpu_compute_dtype(x)
    xc = x if compute == x.dtype else x.astype(compute)
    lanes = cpu_lanes()
    out_dims = weight.shape[0]
    if lanes <= 1 or out_dims < MIN_SPLIT_OUTPUTS:
        y = mx.quantized_matmul(xc, weight, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
        return y if y.dtype == x.dtype or compute == x.dtype else y.astype(x.dtype)
    step = -(-out_dims // lanes)
    parts = []
    for ctx, o0 in zip(lane_contexts(lanes), range(0, out_dims, step)):
        with ctx:
            parts.append(
                mx.quantized_matmul(
                    xc,
                    weight[o0 : o0 + step],
                    scales[o0 : o0 + step],
                    None if biases is None else biases[o0 : o0 + step],
                    transpose=True,
                    group_size=group_size,
                    bits=bits,
                    mode=mode,
                )
            )
    y = mx.concatenate(parts, axis=-1)
    return y if compute == x.dtype else y.astype(x.dtype)


class FastLinear(nn.Linear):
    """``nn.Linear`` whose prefill-sized calls on the CPU use a row-major weight copy."""

    def __call__(self, x: mx.array) -> mx.array:
        if not use_dense_path(x.size // x.shape[-1]):
            return super().__call__(x)
        y = dense_matmul(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class FastQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose prefill-sized calls on the CPU dequantize then GEMM."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if self.mode == "affine" and use_dense_path(rows):
            y = dense_matmul(
                x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode
            )
        else:
            y = split_quantized_matmul(
                x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode
            )
        return y + self["bias"] if "bias" in self else y


def use_fast_linears(model: nn.Module) -> int:
    """Switch every ``nn.Linear`` / ``nn.QuantizedLinear`` in ``model`` to the fast subclass.

    The modules keep their parameters (only their class changes), so this can
    run before or after the weights are loaded. Returns how many were switched.
    """
    n = 0
    for _, module in model.named_modules():
        # Exact types only: leave other subclasses (LoRA, custom layers) alone.
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
            n += 1
        elif type(module) is nn.QuantizedLinear:
            module.__class__ = FastQuantizedLinear
            n += 1
    return n
