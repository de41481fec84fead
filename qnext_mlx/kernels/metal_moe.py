"""Gather MoE kernel for decode, kept only where it beats ``mx.gather_qmm``.

For 1..``MAX_DECODE_T`` tokens, ``metal/moe_decode.metal``
computes what :class:`qnext_mlx.model.qwen3_next.SparseMoeBlock` computes
after routing, for affine-quantized experts (4 or 8 bits, group size 32, 64 or
128) and activations in float32, float16 or bfloat16 (float32 accumulation)::

    y[t] = sum_j score[t, j] * down_e(silu(gate_e x_t) * up_e x_t)          e = inds[t, j]
           + sigmoid(shared_expert_gate x_t) * shared_down(silu(shared_gate x_t) * shared_up x_t)

in two launches of one kernel body: gate/up + SwiGLU of every (token, slot)
and the shared expert into ``h`` ``[T, k*I + SI + 1]`` float32 (the last
element is the shared gate), then down + score-weighted sum + shared expert,
without storing per-expert outputs.

The reference (:func:`moe_decode_reference`) is the block's own decode path:
mlx-lm's ``SwitchGLU`` (``mx.gather_qmm``), the score-weighted sum and the
shared expert (:func:`moe_combine`, which the block itself calls).

On Metal the op ``moe_decode`` (:mod:`qnext_mlx.kernels.candidates`) has two
candidates: ``qnext`` (this kernel) and ``mlx-lm`` (mlx-lm's ``SwitchGLU`` with
``mx.gather_qmm``, the weighted sum and the shared expert: what mlx-lm runs, and
the reference). The first call with a new configuration (dtypes, quantisation,
top-k, sizes, token count ``T``) verifies the kernel on the real inputs against
the reference evaluated in float32 and times both; the kernel is used only if it
matched and was faster. Off Metal the kernel is never used. Tests run the body on
Linux through the shim's ``metal_kernel``, as ``kernel_factory`` or standing in
for ``mx.fast.metal_kernel``.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.qwen3_next import Qwen3NextMLP
from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU

from . import candidates, registry
from .moe import switch_glu_lanes

__all__ = [
    "KERNEL_NAME",
    "MoeSpec",
    "moe_combine",
    "moe_decode",
    "moe_decode_call",
    "moe_decode_reference",
    "moe_spec",
    "quant_string",
    "run_moe_decode_kernel",
    "quantize_moe_block",
    "small_block",
    "small_routing",
    "MOE_DECODE",
    "MODEL_QUANT",
]

KERNEL_NAME = "moe_decode"
MOE_INPUTS = [
    "x",
    "inds",
    "scores",
    "hin",
    "gate_w",
    "gate_s",
    "gate_b",
    "up_w",
    "up_s",
    "up_b",
    "down_w",
    "down_s",
    "down_b",
    "sgate_w",
    "sgate_s",
    "sgate_b",
    "sup_w",
    "sup_s",
    "sup_b",
    "sdown_w",
    "sdown_s",
    "sdown_b",
    "egate_w",
    "egate_s",
    "egate_b",
]
MOE_OUTPUTS = ["out"]
# Rows per simdgroup and simdgroups per threadgroup (as MLX's qmv kernels: 4 rows, 2 simdgroups).
RPS = 4
NSG = 2
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


class MoeSpec(NamedTuple):
    """Static shapes and quantisation of a block the kernel supports."""

    hidden: int  # H
    inter: int  # I, routed experts' intermediate size
    shared_inter: int  # SI, shared expert's intermediate size
    num_experts: int  # E
    top_k: int  # k
    # (bits, group size) of: routed gate/up, routed down, shared gate/up, shared down, shared_expert_gate
    quant: Tuple[Tuple[int, int], ...]


def _affine(m: nn.Module) -> Optional[Tuple[int, int]]:
    """``(bits, group_size)`` of an affine-quantized linear the kernel reads, else None."""
    if "scales" not in m or m.get("biases") is None or "bias" in m:
        return None
    if getattr(m, "mode", "affine") != "affine" or getattr(m, "global_scale", None) is not None:
        return None
    bits, gs = getattr(m, "bits", None), getattr(m, "group_size", None)
    if bits not in SUPPORTED_BITS or gs not in SUPPORTED_GROUP_SIZES:
        return None
    return bits, gs


def _parts(block: nn.Module) -> Tuple[nn.Module, ...]:
    sw, se = block.switch_mlp, block.shared_expert
    return (sw.gate_proj, sw.up_proj, sw.down_proj, se.gate_proj, se.up_proj, se.down_proj, block.shared_expert_gate)


def _make_spec(block: nn.Module, parts: Tuple[nn.Module, ...]) -> Optional[MoeSpec]:
    if not isinstance(getattr(block.switch_mlp, "activation", None), SwiGLU):
        return None
    q = [_affine(p) for p in parts]
    if any(v is None for v in q) or q[0] != q[1] or q[3] != q[4]:
        return None
    gate, up, down, sgate, sup, sdown, egate = parts
    E, I = gate["weight"].shape[:2]
    H = gate["scales"].shape[-1] * q[0][1]
    SI = sgate["weight"].shape[0]
    k = getattr(block, "top_k", None)
    if not isinstance(k, int) or not 1 <= k <= E:
        return None

    def shape_ok(p: nn.Module, qv: Tuple[int, int], lead: Tuple[int, ...], out: int, inp: int) -> bool:
        bits, gs = qv
        return (
            inp % gs == 0
            and tuple(p["weight"].shape) == (*lead, out, inp * bits // 32)
            and tuple(p["scales"].shape) == (*lead, out, inp // gs)
            and tuple(p["biases"].shape) == (*lead, out, inp // gs)
        )

    ok = (
        shape_ok(gate, q[0], (E,), I, H)
        and shape_ok(up, q[1], (E,), I, H)
        and shape_ok(down, q[2], (E,), H, I)
        and shape_ok(sgate, q[3], (), SI, H)
        and shape_ok(sup, q[4], (), SI, H)
        and shape_ok(sdown, q[5], (), H, SI)
        and shape_ok(egate, q[6], (), 1, H)
        and H % RPS == 0
        and I % RPS == 0
        and SI % RPS == 0
    )
    if not ok:
        return None
    return MoeSpec(H, I, SI, E, k, (q[0], q[2], q[3], q[5], q[6]))


def moe_spec(block: nn.Module) -> Optional[MoeSpec]:
    """The kernel's view of ``block`` (a ``SparseMoeBlock``), or None when it does not apply
    (experts or shared expert not affine-quantized with 4/8 bits and group size 32/64/128,
    linear biases, another activation, odd shapes).

    Cached on the block, keyed by its submodules (``nn.quantize`` replaces them), so
    the per-token cost is a few attribute reads.
    """
    parts = _parts(block)
    key = tuple(id(p) for p in parts)
    cached = block.__dict__.get("_qnext_moe_spec")
    if cached is not None and cached[0] == key:
        return cached[1]
    spec = _make_spec(block, parts)
    # object.__setattr__: nn.Module would store a tuple as a child parameter tree.
    object.__setattr__(block, "_qnext_moe_spec", (key, spec))
    return spec


def _weights(block: nn.Module) -> List[mx.array]:
    """The 21 quantized arrays in MOE_INPUTS order (weight, scales, biases per linear)."""
    sw, se = block.switch_mlp, block.shared_expert
    arrays = []
    for p in (sw.gate_proj, sw.up_proj, sw.down_proj, se.gate_proj, se.up_proj, se.down_proj, block.shared_expert_gate):
        arrays += [p["weight"], p["scales"], p["biases"]]
    return arrays


def _out_dtype(block: nn.Module, x: mx.array) -> Any:
    """The reference's output dtype: the routed sum is cast to x's dtype; the shared
    expert's products promote x with their scales' dtypes."""
    se = block.shared_expert
    return mx.result_type(
        x.dtype,
        se.gate_proj["scales"].dtype,
        se.up_proj["scales"].dtype,
        se.down_proj["scales"].dtype,
        block.shared_expert_gate["scales"].dtype,
    )


_DUMMY: List[mx.array] = []


def moe_decode_call(
    spec: MoeSpec,
    weights: List[mx.array],
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    stage: int,
    hin: Optional[mx.array] = None,
    out_dtype: Any = mx.float32,
) -> dict:
    """Call description of one stage of the kernel (keyword arguments for the kernel object).

    Args:
        spec: :func:`moe_spec` of the block; ``weights``: :func:`_weights` of it.
        x: ``[T, H]``; inds: ``[T, k]`` uint32; scores: ``[T, k]`` float32.
        stage: 0 (gate/up + SwiGLU, output ``h`` ``[T, k*I + SI + 1]`` float32) or
            1 (down + weighted sum + shared, output ``[T, H]`` in ``out_dtype``; needs ``hin`` = h).
    """
    T = x.shape[0]
    H, I, SI, k = spec.hidden, spec.inter, spec.shared_inter, spec.top_k
    (rb, rg), (db, dg), (sb, sg), (sdb, sdg), (eb, eg) = spec.quant
    if hin is None:
        if not _DUMMY:
            _DUMMY.append(mx.zeros((1,), mx.float32))
        hin = _DUMMY[0]
    template = [
        ("OutT", out_dtype if stage == 1 else mx.float32),
        ("Stage", stage),
        ("HID", H),
        ("INTER", I),
        ("SINTER", SI),
        ("TOPK", k),
        ("RPS", RPS),
        ("RB", rb),
        ("RG", rg),
        ("DB", db),
        ("DG", dg),
        ("SB", sb),
        ("SG", sg),
        ("SDB", sdb),
        ("SDG", sdg),
        ("EB", eb),
        ("EG", eg),
    ]
    if stage == 0:
        grid = (32, -(-max(I, SI) // RPS), T * (k + 1))
        out_shape, dtype = (T, k * I + SI + 1), mx.float32
    else:
        grid = (32, H // RPS, T)
        out_shape, dtype = (T, H), out_dtype
    return dict(
        inputs=[x, inds, scores, hin, *weights],
        template=template,
        grid=grid,
        threadgroup=(32, NSG, 1),
        output_shapes=[out_shape],
        output_dtypes=[dtype],
    )


def run_moe_decode_kernel(
    factory: registry.KernelFactory, block: nn.Module, x: mx.array, inds: mx.array, scores: mx.array
) -> mx.array:
    """The routed experts, weighted sum and shared expert through the kernel (no checks, no fallback).

    Args:
        factory: ``mx.fast.metal_kernel`` or the shim's ``metal_kernel``.
        block: a ``SparseMoeBlock`` with :func:`moe_spec` not None.
        x: ``[..., H]`` activations (1..MAX_DECODE_T tokens in all).
        inds: ``[..., k]`` expert ids; scores: ``[..., k]`` routing weights.
    Returns:
        ``[..., H]`` in the reference's dtype (see :func:`moe_decode_reference`).
    """
    spec = moe_spec(block)
    if spec is None:
        raise ValueError("run_moe_decode_kernel: the block is not supported by the kernel (see moe_spec)")
    lead = x.shape[:-1]
    H, k = spec.hidden, spec.top_k
    x2 = x.reshape(-1, H)
    inds2 = inds.reshape(-1, k).astype(mx.uint32)
    scores2 = scores.reshape(-1, k).astype(mx.float32)
    weights = _weights(block)
    kernel = registry.kernel_object(factory, "moe_decode.metal", "qnext_moe_decode", MOE_INPUTS, MOE_OUTPUTS)
    (h,) = kernel(**moe_decode_call(spec, weights, x2, inds2, scores2, 0))
    (y,) = kernel(**moe_decode_call(spec, weights, x2, inds2, scores2, 1, h, _out_dtype(block, x)))
    return y.reshape(*lead, H)


def moe_combine(block: nn.Module, x: mx.array, y: mx.array, scores: mx.array) -> mx.array:
    """Score-weighted sum of the routed experts' outputs plus the gated shared expert.

    Args:
        x: ``[..., H]`` the block's input; y: ``[..., k, H]`` expert outputs per slot;
        scores: ``[..., k]`` routing weights.
    Returns:
        ``[..., H]``.
    """
    y = (y * scores[..., None].astype(y.dtype)).sum(axis=-2).astype(x.dtype)
    shared = mx.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return y + shared


def moe_decode_reference(block: nn.Module, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
    """What ``SparseMoeBlock`` computes for decode after routing, for quantized experts:
    ``SwitchGLU`` (``mx.gather_qmm``) then :func:`moe_combine`. Shapes as in
    :func:`run_moe_decode_kernel`."""
    return moe_combine(block, x, switch_glu_lanes(block.switch_mlp, x, inds), scores)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def quant_string(quant: Tuple[Tuple[int, int], ...]) -> str:
    """``((4, 64), ...)`` -> ``"4/64,..."`` (bits/group size per weight group, as in :class:`MoeSpec`)."""
    return ",".join(f"{b}/{g}" for b, g in quant)


def _parse_quant(text: str) -> Tuple[Tuple[int, int], ...]:
    return tuple((int(b), int(g)) for b, g in (q.split("/") for q in text.split(",")))


# ---------------------------------------------------------------------------
# Random blocks (tests, the doctor's sample problem)
# ---------------------------------------------------------------------------

# A 4-bit checkpoint as mlx-lm converts Qwen3-Next (shared_expert_gate at 8 bits).
MODEL_QUANT = ((4, 64), (4, 64), (4, 64), (4, 64), (8, 64))


def quantize_moe_block(
    block: nn.Module, quant: Tuple[Tuple[int, int], ...], scales_dtype: Any = mx.float32
) -> nn.Module:
    """Quantize a block with ``SparseMoeBlock``'s layout in place as ``quant`` (see
    :class:`MoeSpec`), scales in ``scales_dtype``; the router stays float (the kernel
    takes the routing as input). Returns ``block`` with its parameters evaluated."""
    block.set_dtype(scales_dtype)
    by_path = {
        "switch_mlp.gate_proj": quant[0],
        "switch_mlp.up_proj": quant[0],
        "switch_mlp.down_proj": quant[1],
        "shared_expert.gate_proj": quant[2],
        "shared_expert.up_proj": quant[2],
        "shared_expert.down_proj": quant[3],
        "shared_expert_gate": quant[4],
    }

    def predicate(path: str, m: nn.Module):
        q = by_path.get(path)
        return False if q is None else {"bits": q[0], "group_size": q[1]}

    nn.quantize(block, class_predicate=predicate)
    mx.eval(block.parameters())
    return block


def small_block(
    quant: Tuple[Tuple[int, int], ...],
    top_k: int,
    scales_dtype: Any = mx.float32,
    hidden: int = 256,
    inter: int = 128,
    shared_inter: int = 128,
    num_experts: int = 16,
    seed: int = 0,
) -> nn.Module:
    """A random block with ``SparseMoeBlock``'s parameters (``gate``, ``switch_mlp``,
    ``shared_expert``, ``shared_expert_gate``; mlx-lm's layers) and ``top_k``, quantized
    by :func:`quantize_moe_block`: what the kernel reads, for verification (it is not
    callable as a block; the model's ``SparseMoeBlock`` is)."""
    mx.random.seed(seed)
    block = nn.Module()
    block.gate = nn.Linear(hidden, num_experts, bias=False)
    block.switch_mlp = SwitchGLU(hidden, inter, num_experts)
    block.shared_expert = Qwen3NextMLP(hidden, shared_inter)
    block.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
    block.top_k = top_k
    return quantize_moe_block(block, quant, scales_dtype)


def small_routing(T: int, top_k: int, num_experts: int, seed: int = 0) -> Tuple[mx.array, mx.array]:
    """``(inds [1, T, k] uint32, scores [1, T, k] float32)``: distinct experts per token,
    with experts shared between tokens (token 1 overlaps token 0, token 2 repeats it reversed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for t in range(T):
        if t == 0:
            row = rng.choice(num_experts, top_k, replace=False)
        elif t % 2 == 0:
            row = rows[0][::-1]
        else:
            keep = rows[0][: (top_k + 1) // 2]
            rest = rng.choice([e for e in range(num_experts) if e not in keep], top_k - len(keep), replace=False)
            row = np.concatenate([keep[::-1], rest])
        rows.append(np.asarray(row))
    w = rng.uniform(0.1, 1.0, (T, top_k))
    inds = mx.array(np.stack(rows).astype(np.uint32))[None]
    scores = mx.array((w / w.sum(-1, keepdims=True)).astype(np.float32))[None]
    return inds, scores


# ---------------------------------------------------------------------------
# The op and its candidates
# ---------------------------------------------------------------------------


def _unsupported(block: nn.Module, x: mx.array, inds: mx.array, scores: mx.array) -> Optional[str]:
    T = x.size // x.shape[-1]
    if not 1 <= T <= registry.MAX_DECODE_T:
        return f"{T} tokens (the kernel takes 1..{registry.MAX_DECODE_T})"
    if x.dtype not in _DTYPES:
        return f"activations in {x.dtype}"
    spec = moe_spec(block)
    if spec is None:
        return "experts not affine-quantized with 4/8 bits and group size 32/64/128 (or linear biases, odd shapes)"
    if x.shape[-1] != spec.hidden or inds.shape[-1] != spec.top_k:
        return "inputs that do not match the block"
    return None


def _config(block: nn.Module, x: mx.array, inds: mx.array, scores: mx.array) -> Tuple[Tuple[str, Any], ...]:
    spec = moe_spec(block)
    sizes = (
        ()
        if spec is None
        else (
            ("quant", quant_string(spec.quant)),
            ("top_k", spec.top_k),
            ("H", spec.hidden),
            ("I", spec.inter),
            ("SI", spec.shared_inter),
            ("E", spec.num_experts),
        )
    )
    scales = block.switch_mlp.gate_proj.get("scales")
    return (
        ("dtype", _dtype_name(x.dtype)),
        ("scales", _dtype_name(scales.dtype) if scales is not None else "none"),
        *sizes,
        ("T", x.size // x.shape[-1]),
    )


def _verify(got: mx.array, ref: mx.array, block: nn.Module, x: mx.array, inds: mx.array, scores: mx.array):
    # Against the reference evaluated in float32 (same weights, the 16-bit inputs
    # upcast exactly): with 16-bit activations the reference itself rounds every
    # intermediate (gate/up outputs, SwiGLU, each expert's output, the 16-bit sum of
    # k weighted outputs) and lands 2-4e-2 (bfloat16) from its own float32
    # evaluation, while the kernel accumulates in float32 and rounds once; compared
    # with the 16-bit reference, a wrong kernel could hide in that noise.
    ref32 = moe_decode_reference(block, x.astype(mx.float32), inds, scores)
    # float32: summation order only; 16-bit: the output's rounding (2^-9 for
    # bfloat16) and the reference's float32 products.
    return registry.compare_outputs(["y"], [got], [ref32], 1e-4 if x.dtype == mx.float32 else 1e-2)


def _sample():
    """The model's MoE sizes (H=2048, I=SI=512, top-10, 4-bit; 16 experts rather than 512:
    a token reads only its 10), bfloat16, one decode token."""
    block = small_block(MODEL_QUANT, 10, mx.bfloat16, hidden=2048, inter=512, shared_inter=512, num_experts=16)
    x = mx.random.normal((1, 1, 2048), key=mx.random.key(1)).astype(mx.bfloat16)
    inds, scores = small_routing(1, 10, 16)
    return [((block, x, inds, scores), {})]


MOE_DECODE = candidates.register(
    candidates.Op(
        name=KERNEL_NAME,
        summary=f"routed experts + weighted sum + shared expert for 1..{registry.MAX_DECODE_T} tokens (quantized)",
        backend=candidates.METAL,
        candidates=(
            candidates.Candidate(
                "qnext",
                "metal/moe_decode.metal: gate/up + SwiGLU, then down + weighted sum + shared expert, two launches",
                lambda factory, *a: run_moe_decode_kernel(factory, *a),
                _unsupported,
            ),
            candidates.Candidate(
                "mlx-lm",
                "mlx-lm's SwitchGLU (mx.gather_qmm), weighted sum, shared expert: the model's own path",
                lambda factory, *a: moe_decode_reference(*a),
            ),
        ),
        reference="mlx-lm",
        config=_config,
        verify=_verify,
        samples=_sample,
    )
)


def moe_decode(
    block: nn.Module,
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    *,
    kernel_factory: Optional[registry.KernelFactory] = None,
) -> Optional[mx.array]:
    """The block's decode output through the kernel, or None where the caller must run the reference.

    Args:
        block: a ``SparseMoeBlock`` (``switch_mlp``, ``shared_expert``,
            ``shared_expert_gate``, ``top_k``).
        x: ``[..., H]`` the block's input; inds: ``[..., k]`` expert ids;
            scores: ``[..., k]`` routing weights (float32).
        kernel_factory: run the kernel through this factory, unchecked (tests);
            default: on Metal, the candidate chosen for this configuration
            (``moe_decode`` in :mod:`qnext_mlx.kernels.candidates`), elsewhere
            nothing (None is returned).
    Returns:
        ``[..., H]`` (as :func:`moe_decode_reference`), or None: off Metal, more
        than ``MAX_DECODE_T`` tokens, an unsupported block or dtype, or where the
        reference (``mlx-lm``) was chosen.
    """
    args = (block, x, inds, scores)
    if kernel_factory is None and not MOE_DECODE.backend.available():
        return None
    if _unsupported(*args) is not None:
        return None
    if kernel_factory is not None:
        return run_moe_decode_kernel(kernel_factory, *args)
    decision, out = candidates.decide(MOE_DECODE, *args)
    if decision.choice != "qnext":
        return None
    return out if out is not None else run_moe_decode_kernel(MOE_DECODE.backend.factory(), *args)
