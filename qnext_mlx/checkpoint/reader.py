"""Reading checkpoints: Hugging Face (sharded safetensors, per-expert tensors,
``mtp.*``) and MLX (mlx-lm / qnext-mlx conversions, possibly quantized).

Weights are memory-mapped lazily with ``mx.load``: nothing is read from disk
before it is used, so a checkpoint larger than RAM can be opened.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import load as load_tokenizer

from ..errors import CheckpointError, ModelNotFoundError
from ..kernels.linear import use_fast_linears
from ..model import Model, ModelConfig
from ..model.qwen3_next import SHIFTED_NORMS
from .paths import resolve_model_path
from .sharded import check_same_everywhere, init_group, materialize, shard_checkpoint

# safetensors dtype name -> bytes per element
ST_DTYPE_SIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# A model folder's tokenizer: at least one of these (transformers 5 builds an empty
# tokenizer from a folder without any, instead of failing).
TOKENIZER_FILE_PATTERNS = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def read_safetensors_header(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Parse and check a safetensors file's header without reading tensor data.

    Returns ``{name: (dtype, shape)}``. Raises :class:`CheckpointError` for a
    truncated file, a corrupt header, or tensor extents that run past the end.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path.name}: corrupt or truncated safetensors header")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header")
    data_size = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            count = 1
            for s in shape:
                count *= int(s)
            nbytes = count * ST_DTYPE_SIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: corrupt header entry for tensor {name!r}") from None
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path.name}: tensor {name!r} has inconsistent size in the header")
        if end > data_size:
            raise CheckpointError(
                f"{path.name}: truncated (tensor {name!r} ends at byte {end} of {data_size}); "
                "re-download or re-convert it"
            )
        out[name] = (dtype, shape)
    return out


def weight_files(model_path: Path) -> List[Path]:
    """The safetensors shards of a model folder, from its index when present."""
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is corrupt (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_path / f).exists()]
        if missing:
            raise CheckpointError(
                f"{model_path}: shard(s) listed in model.safetensors.index.json are missing: {', '.join(missing)}"
            )
        return [model_path / f for f in files]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors weight files in {model_path}")
    return files


def load_weights_lazy(model_path: Path) -> Dict[str, mx.array]:
    """All tensors of a model folder as lazy (memory-mapped) MLX arrays, headers checked first."""
    weights: Dict[str, mx.array] = {}
    for path in weight_files(model_path):
        read_safetensors_header(path)
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:  # MLX raises RuntimeError/ValueError for unreadable files
            raise CheckpointError(f"{path.name}: cannot be read as safetensors ({e})") from None
    return weights


def _infer_mtp_layers(weights: Iterable[str]) -> int:
    idx = {int(k.split(".")[2]) for k in weights if k.startswith("mtp.layers.")}
    return max(idx) + 1 if idx else (1 if any(k.startswith("mtp.") for k in weights) else 0)


def open_checkpoint(model_path: Path, mtp: bool = True) -> Tuple[ModelConfig, Model, Dict[str, mx.array]]:
    """Read a local model folder without loading any tensor data.

    Returns ``(config, model, weights)``: the parsed config, a freshly built
    :class:`Model` (random, unevaluated parameters; not quantized yet) and every
    checkpoint tensor as a lazy array already mapped onto the model's layout by
    :meth:`Model.sanitize`. ``mtp=False`` builds the model without its MTP head
    and leaves the ``mtp.*`` tensors out. Shared by :func:`load_model` and the
    streaming converter, which evaluates the lazy tensors a few at a time.
    """
    config = ModelConfig.from_file(model_path)
    weights = load_weights_lazy(model_path)
    if not mtp:
        config.num_mtp_layers = 0
    elif config.num_mtp_layers is None or not any(k.startswith("mtp.") for k in weights):
        # mlx-lm conversions keep num_nextn_predict_layers in config.json but drop mtp.* tensors
        config.num_mtp_layers = _infer_mtp_layers(weights)
    model = Model(config)
    return config, model, model.sanitize(weights)


def _quantize(model: Model, config: ModelConfig, weights: Dict[str, mx.array]) -> None:
    """Turn layers into quantized ones where the checkpoint holds quantized tensors."""
    q = config.quantization

    def predicate(path: str, module) -> Any:
        if path in q:  # per-module override written by mlx-lm / our converter
            return q[path]
        if not hasattr(module, "to_quantized"):
            return False
        return f"{path}.scales" in weights

    nn.quantize(
        model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"), class_predicate=predicate
    )


def check_weights(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """Raise one :class:`CheckpointError` listing missing, unexpected and misshaped tensors."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(expected) & set(weights)
        if tuple(expected[k].shape) != tuple(weights[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if names:
                more = f" ... and {len(names) - 10} more" if len(names) > 10 else ""
                parts.append(f"{label}: {', '.join(names[:10])}{more}")
        raise CheckpointError("checkpoint does not match config.json; " + "; ".join(parts))


def _fit_experts_to_backend(model: Model) -> None:
    """MLX's CPU GatherMM is float32-only: keep unquantized expert weights in float32 there."""
    if mx.default_device() != mx.cpu:
        return
    for _, module in model.named_modules():
        if hasattr(module, "switch_mlp"):
            for proj in (module.switch_mlp.gate_proj, module.switch_mlp.up_proj, module.switch_mlp.down_proj):
                if "scales" not in proj and proj.weight.dtype != mx.float32:
                    proj.weight = proj.weight.astype(mx.float32)


def load_model(
    path: str | os.PathLike,
    dtype: Optional[mx.Dtype] = None,
    lazy: bool = True,
    parallel: Optional[str] = None,
    group=None,
) -> Model:
    """Load a Qwen3-Next checkpoint (Hugging Face or MLX layout) from a local folder.

    Args:
        path: model folder with ``config.json`` and safetensors shards.
        dtype: cast floating-point weights to this dtype (default: as stored).
        lazy: leave weights memory-mapped until first use (default) instead of
            reading them all now.
        parallel: ``"tensor"`` or ``"pipeline"``: load only this rank's share of
            ``group`` (default: the group ``mlx.launch`` set up); see
            :mod:`qnext_mlx.model.parallel`. The share is read at once (``lazy`` is ignored).
        group: the ``mx.distributed`` group for ``parallel``.
    Returns:
        The :class:`qnext_mlx.model.Model` with weights loaded; ``model(ids)``
        gives logits ``[B, L, vocab]``, the same on every rank under ``parallel``
        (``model.parallel`` says where this rank sits; None for one process).
    """
    model_path = resolve_model_path(path)
    config, model, weights = open_checkpoint(model_path)
    layout = None
    if parallel is not None:
        group = init_group(group)
        check_same_everywhere(group, model_path)
        model, weights, layout = shard_checkpoint(config, model, weights, parallel, group)
    if config.quantization is not None:
        _quantize(model, config, weights)
    check_weights(model, weights)
    # packed quantized weights are integers; shifted norm weights stay float32 (see RMSNorm)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(SHIFTED_NORMS) else v
            for k, v in weights.items()
        }
    if layout is not None:
        materialize(weights)
    model.load_weights(list(weights.items()), strict=False)
    model.parallel = layout
    _fit_experts_to_backend(model)
    use_fast_linears(model)  # prefill-sized matmuls as plain GEMMs on the CPU (kernels/linear.py)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


def load(
    path_or_repo: str | os.PathLike,
    dtype: Optional[mx.Dtype] = None,
    lazy: bool = True,
    parallel: Optional[str] = None,
    group=None,
):
    """Load ``(model, tokenizer)`` from a local folder or a Hugging Face repo id.

    The tokenizer is mlx-lm's ``TokenizerWrapper`` (streaming detokenizer,
    chat template, EOS ids from ``generation_config.json`` when present).
    ``parallel`` and ``group``: as :func:`load_model` (tensor or pipeline parallel).
    Raises :class:`ModelNotFoundError` (before reading any weights) when the
    folder has no tokenizer files; :func:`load_model` loads the model alone.
    """
    model_path = resolve_model_path(path_or_repo)
    check_tokenizer_files(model_path)
    model = load_model(model_path, dtype=dtype, lazy=lazy, parallel=parallel, group=group)
    eos = _generation_eos_ids(model_path)
    try:
        tokenizer = load_tokenizer(model_path, eos_token_ids=eos)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {model_path}: {e}") from None
    return model, tokenizer


def check_tokenizer_files(model_path: Path) -> None:
    """Raise :class:`ModelNotFoundError` (one line) when ``model_path`` holds none of
    :data:`TOKENIZER_FILE_PATTERNS`."""
    if not any(next(Path(model_path).glob(p), None) for p in TOKENIZER_FILE_PATTERNS):
        raise ModelNotFoundError(
            f"{model_path} has no tokenizer files ({', '.join(TOKENIZER_FILE_PATTERNS)}); "
            f"add the model's tokenizer files"
        )


def _generation_eos_ids(model_path: Path) -> Optional[List[int]]:
    gen = model_path / "generation_config.json"
    if not gen.exists():
        return None
    try:
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if eos is None:
        return None
    return [eos] if isinstance(eos, int) else list(eos)
