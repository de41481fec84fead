"""Convert a Hugging Face Qwen3-Next checkpoint to the MLX layout, optionally quantized.

    python -m qnext_mlx.convert --hf-path Qwen/Qwen3-Next-80B-A3B-Instruct --mlx-path qwen3-next-4bit --q-bits 4

The command line is :mod:`qnext_mlx.convert`; this module is the conversion itself.

The conversion streams: every checkpoint tensor is opened lazily (``mx.load``
reads nothing until a tensor is evaluated), the whole output is planned as lazy
arrays first (experts stacked into ``switch_mlp``, norms shifted, conv1d
transposed by :meth:`Model.sanitize`, then cast and ``mx.quantize``-d), checked
against the model's module tree, and only then evaluated and appended to the
output shards one tensor at a time (each shard's header is written first, from
the lazy shapes). Peak memory is one output tensor and what it is computed from
(for the 80B model: one projection of one layer's 512 experts, ~1 GB in bf16,
twice while they are stacked) on top of the interpreter, whatever the size of
the model or of the shards.

The output folder is what :func:`qnext_mlx.load` reads: ``config.json`` (with a
``quantization`` section and per-module overrides, as mlx-lm writes them),
sharded safetensors and their index, the tokenizer files and
``generation_config.json`` of the source, and a short ``README.md`` model card.
It is written into a temporary folder next to the destination and renamed into
place at the end, so a failed or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import secrets
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import CheckpointError, ConfigError, ConversionError
from ..model.qwen3_next import SHIFTED_NORMS
from ..model.rope import apply_rope_options
from ..version import __version__
from .paths import MODEL_FILE_PATTERNS, resolve_model_path
from .quant_recipes import GROUP_SIZES, QUANT_BITS, RECIPES, make_recipe
from .reader import check_weights, open_checkpoint

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Files of the source folder that are copied (a model folder's files, its license) and not
# copied: the weights and config are rewritten, the model card replaced (it describes the source).
_COPIED = tuple(MODEL_FILE_PATTERNS) + ("LICENSE*", "NOTICE*")
_NOT_COPIED = ("config.json", "model.safetensors.index.json", "*.safetensors", "*.md")


@dataclass
class ConvertResult:
    """What :func:`convert` wrote."""

    path: Path
    num_tensors: int
    num_shards: int
    total_bytes: int
    bits_per_weight: float
    quantization: Optional[Dict[str, Any]]
    seconds: float
    peak_rss_bytes: int


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"5GB"``, ``"200MB"``, ``"1.5GiB"`` or ``1000000``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConversionError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes.

    Linux: ``VmHWM`` of /proc/self/status, which starts afresh at exec
    (``ru_maxrss`` keeps the peak of the forked parent's image); elsewhere
    ``ru_maxrss`` (bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


# ---------------------------------------------------------------- planning
def _order_key(name: str):
    """Output order: embeddings, layer by layer, final norm, head, then the MTP head."""
    parts = name.split(".")
    if name.startswith("model.embed_tokens."):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(parts[2]), name)
    if name.startswith("model.norm."):
        return (2, 0, name)
    if name.startswith("lm_head."):
        return (3, 0, name)
    if name.startswith("mtp.layers."):
        return (5, int(parts[2]), name)
    if name.startswith("mtp."):
        return (4, 0, name)
    return (6, 0, name)


def plan_conversion(
    model: nn.Module,
    weights: Dict[str, mx.array],
    bits: Optional[int] = None,
    group_size: int = 64,
    recipe: str = "default",
    dtype: Optional[mx.Dtype] = None,
):
    """The output tensors as lazy arrays, in write order; nothing is evaluated.

    Args:
        model: the unquantized :class:`Model` the weights belong to (its module
            tree decides which paths are quantizable); it is quantized in place
            (structure only) to check the plan against it.
        weights: sanitized lazy checkpoint tensors (``open_checkpoint``); consumed.
        bits: quantize with this many bits (None: keep floating point).
        group_size, recipe: see :mod:`qnext_mlx.quant_recipes`.
        dtype: cast floating-point tensors to this dtype before quantizing.
    Returns:
        ``(tensors, quantization, num_params)``: ``{name: lazy array}`` ordered
        for writing, the config's ``quantization`` section (None when not
        quantized) and the number of weights before quantization.
    """
    decisions: Dict[str, Dict[str, int]] = {}
    quantization = None
    if bits is not None:
        rule = make_recipe(recipe, model, bits, group_size)
        for path, module in model.named_modules():
            params = rule(path, module)
            if params is not None and f"{path}.weight" in weights:
                decisions[path] = params
        quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
        # per-module overrides, keyed by module path as mlx-lm writes them
        for path in sorted(decisions, key=_order_key):
            if decisions[path] != {"group_size": group_size, "bits": bits}:
                quantization[path] = dict(decisions[path])

    tensors: Dict[str, mx.array] = {}
    num_params = 0
    for name in sorted(weights, key=_order_key):
        arr = weights.pop(name)
        num_params += arr.size
        if dtype is not None and mx.issubdtype(arr.dtype, mx.floating) and not name.endswith(SHIFTED_NORMS):
            arr = arr.astype(dtype)  # shifted norm weights stay float32 (see models.qwen3_next.RMSNorm)
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and path in decisions:
            q = decisions[path]
            wq, scales, biases = mx.quantize(arr, group_size=q["group_size"], bits=q["bits"])
            tensors.update({f"{path}.weight": wq, f"{path}.scales": scales, f"{path}.biases": biases})
        else:
            tensors[name] = arr

    # The plan must be exactly what the loader will build: same names, same shapes.
    if decisions:
        nn.quantize(model, class_predicate=lambda p, m: decisions.get(p, False))
    check_weights(model, tensors)
    tensors = {k: tensors[k] for k in sorted(tensors, key=_order_key)}
    return tensors, quantization, num_params


def plan_shards(tensors: Dict[str, mx.array], max_bytes: int) -> List[List[str]]:
    """Split names into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: List[List[str]] = []
    size = 0
    for name, arr in tensors.items():
        if not shards or (size + arr.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += arr.nbytes
    return shards


def shard_file_names(n: int) -> List[str]:
    """``model.safetensors`` or ``model-00001-of-0000n.safetensors`` ..., as mlx-lm names them."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# safetensors' names for MLX dtypes (the ones a checkpoint can hold)
_SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.float32: "F32",
    mx.uint64: "U64",
    mx.int64: "I64",
}


def _raw_bytes(arr: mx.array) -> memoryview:
    """The row-major bytes of an evaluated, row-contiguous array."""
    if arr.dtype == mx.bfloat16:  # the buffer protocol has no bf16 format: reinterpret as uint16
        arr = arr.view(mx.uint16)
        mx.eval(arr)
    view = memoryview(arr)
    if not view.c_contiguous:
        view = memoryview(np.ascontiguousarray(view))
    return view.cast("B")


def write_safetensors(
    path: Path,
    tensors: Dict[str, mx.array],
    names: Sequence[str],
    on_tensor=None,
) -> int:
    """Write ``names`` from ``tensors`` (lazy arrays) to one safetensors file, one tensor at a time.

    The header only needs shapes and dtypes, which lazy arrays know, so it is
    written first; then each tensor is evaluated, appended and dropped (it is
    popped from ``tensors``). Memory holds one tensor and what it is computed
    from, however big the file. ``mx.save_safetensors`` would need them all at
    once. Returns the number of data bytes; ``on_tensor(name)`` runs after each.
    """
    header: Dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name in names:
        arr = tensors[name]
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header so that data starts 8-byte aligned
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in names:
                arr = mx.contiguous(tensors.pop(name))
                try:
                    mx.eval(arr)
                except Exception as e:  # a shard changed or became unreadable after its header was checked
                    raise CheckpointError(f"cannot read the source tensors of {name}: {e}") from None
                f.write(_raw_bytes(arr))
                del arr
                mx.clear_cache()  # hand freed buffers back instead of keeping them cached
                if on_tensor is not None:
                    on_tensor(name)
    except OSError as e:
        raise ConversionError(f"cannot write {path}: {e.strerror or e}") from None
    return offset


def write_shards(
    tensors: Dict[str, mx.array],
    shards: List[List[str]],
    folder: Path,
    progress: bool = True,
) -> Dict[str, Any]:
    """Evaluate and write the planned tensors, shard by shard, tensor by tensor; returns the index.

    ``tensors`` is consumed (see :func:`write_safetensors`): peak memory is one
    tensor and its inputs, whatever the shard size.
    """
    from tqdm import tqdm

    weight_map: Dict[str, str] = {}
    total = 0
    bar = tqdm(
        total=sum(len(s) for s in shards),
        unit="tensor",
        desc="converting",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )

    def advance(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    try:
        for file_name, shard in zip(shard_file_names(len(shards)), shards):
            total += write_safetensors(folder / file_name, tensors, shard, on_tensor=advance)
            weight_map.update({k: file_name for k in shard})
    finally:
        bar.close()
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


# ------------------------------------------------------------------ outputs
def output_config(
    source: Dict[str, Any],
    config,
    quantization: Optional[Dict[str, Any]],
    dtype: Optional[str],
    rope_changed: bool = False,
) -> Dict[str, Any]:
    """config.json of the output: the source's keys, plus quantization, dtype and MTP count
    (and ``config``'s RoPE scaling in both spellings when ``rope_changed``)."""
    out = dict(source)
    out.pop("quantization_config", None)
    out.pop("_name_or_path", None)
    if quantization is not None:
        out["quantization"] = quantization
        out["quantization_config"] = quantization  # mlx-lm writes both (Hugging Face tooling reads the 2nd)
    if dtype is not None:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    out["num_nextn_predict_layers"] = config.num_mtp_layers
    if "mtp_num_hidden_layers" in out:
        out["mtp_num_hidden_layers"] = config.num_mtp_layers
    if rope_changed:  # --rope-* / --max-context: replace the source's scaling, whichever key held it
        out["rope_scaling"] = config.rope_scaling
        if "rope_parameters" in out:
            out["rope_parameters"] = config.raw["rope_parameters"]
    # mlx-lm 0.32 reads only the top-level rope keys, not transformers 5's rope_parameters
    out.setdefault("rope_theta", config.rope_theta)
    out.setdefault("partial_rotary_factor", config.partial_rotary_factor)
    if config.rope_scaling and "rope_scaling" not in out:
        out["rope_scaling"] = config.rope_scaling
    return dict(sorted(out.items()))


def copy_side_files(src: Path, dst: Path) -> List[str]:
    """Copy the tokenizer, chat template, generation_config.json ... next to the weights."""
    copied = []
    for path in sorted(src.iterdir()):
        if not path.is_file():
            continue
        name = path.name
        wanted = any(fnmatch.fnmatch(name, p) for p in _COPIED)
        if wanted and not any(fnmatch.fnmatch(name, p) for p in _NOT_COPIED):
            shutil.copy2(path, dst / name)
            copied.append(name)
    return copied


def _describe_quantization(quantization: Optional[Dict[str, Any]], recipe: str, dtype: str) -> str:
    if quantization is None:
        return f"not quantized ({dtype})"
    overrides = {k: v for k, v in quantization.items() if isinstance(v, dict)}
    mix = sorted({(v["bits"], v["group_size"]) for v in overrides.values()})
    text = f"{quantization['bits']}-bit affine, group size {quantization['group_size']}, recipe `{recipe}`"
    if mix:
        text += "; " + ", ".join(
            f"{len([1 for v in overrides.values() if (v['bits'], v['group_size']) == m])} "
            f"module(s) at {m[0]} bits (group {m[1]})"
            for m in mix
        )
    return text + f"; float tensors in {dtype}"


def model_card(
    source: str,
    base_model: Optional[str],
    quantization,
    recipe: str,
    dtype: str,
    result_bytes: int,
    num_shards: int,
    bits_per_weight: float,
    num_mtp: int,
    repo: Optional[str],
) -> str:
    """A short README.md: where the weights come from, how they were converted, how to load them."""
    front = ["---", "library_name: mlx", "pipeline_tag: text-generation"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["tags:", "- mlx", "- qwen3_next", "- qnext-mlx", "---", ""]
    target = repo or "path/to/this/folder"
    lines = [
        f"# {repo or 'Qwen3-Next (MLX)'}",
        "",
        f"Converted from `{source}` to MLX with qnext-mlx {__version__} (`python -m qnext_mlx.convert`).",
        "",
        "| | |",
        "| --- | --- |",
        f"| weights | {_describe_quantization(quantization, recipe, dtype)} |",
        f"| bits per weight | {bits_per_weight:.2f} |",
        f"| size | {human_size(result_bytes)} in {num_shards} shard(s) |",
        f"| MTP head | {'kept (' + str(num_mtp) + ' layer(s))' if num_mtp else 'not included'} |",
        "",
        "## Use",
        "",
        "```python",
        "from qnext_mlx import load",
        "",
        f'model, tokenizer = load("{target}")',
        "```",
        "",
    ]
    if num_mtp:
        lines += ["mlx-lm has no MTP head: convert with `--drop-mtp` for a folder that mlx-lm loads too.", ""]
    return "\n".join(front + lines)


def upload(path: Path, repo: str) -> None:
    """Push a converted folder to the Hugging Face Hub (``huggingface_hub`` reads the token)."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=str(path), repo_id=repo, repo_type="model", commit_message="Upload MLX conversion (qnext-mlx)"
        )
    except Exception as e:  # auth, network, quota: one line with the way out
        raise ConversionError(
            f"the conversion in {path} is complete but uploading it to {repo} failed ({type(e).__name__}: {e}); "
            f"log in with `huggingface-cli login` and retry with `huggingface-cli upload {repo} {path}`"
        ) from None


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temporary folder to ``out``, replacing it only with ``force``."""
    if out.exists() or out.is_symlink():
        if not force:
            raise ConversionError(f"{out} already exists; pass --force to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / out.name)  # keep the old one until the new one is in place
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old / out.name, out)  # put the old one back
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def human_size(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as disk sizes are usually shown)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# -------------------------------------------------------------------- main
def convert(
    hf_path: str | os.PathLike,
    mlx_path: str | os.PathLike = "mlx_model",
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
    recipe: Optional[str] = None,
    drop_mtp: bool = False,
    upload_repo: Optional[str] = None,
    force: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    rope_args: Optional[argparse.Namespace] = None,
) -> ConvertResult:
    """Convert (and optionally quantize) a checkpoint into an MLX model folder, streaming.

    Args:
        hf_path: source folder or Hugging Face repo id (HF layout, or an
            unquantized MLX conversion).
        mlx_path: output folder; must not exist unless ``force``.
        q_bits: quantize to this many bits (2, 3, 4, 5, 6 or 8); None keeps
            floating point (a ``recipe`` alone means 4 bits).
        q_group_size: quantization group size (32, 64 or 128).
        dtype: floating-point dtype of the output (default: the config's
            ``dtype``/``torch_dtype``, else as stored).
        recipe: ``"default"`` or ``"mixed"`` (:mod:`qnext_mlx.quant_recipes`).
        drop_mtp: leave the MTP head (``mtp.*``) out.
        upload_repo: push the result to this Hugging Face repo.
        force: replace an existing ``mlx_path``.
        max_shard_size: output shard size (``"5GB"``, ``"200MB"`` or bytes);
            it does not change peak memory (tensors are written one by one).
        progress: progress bar and summary on stderr.
        rope_args: parsed long-context options (:func:`qnext_mlx.cli.add_rope_arguments`):
            the RoPE scaling written to the output's config.json.
    Returns:
        A :class:`ConvertResult`. Raises a :class:`QnextError` subclass (and
        leaves no output) when the input is missing, corrupt or inconsistent.
    """
    start = time.perf_counter()
    if recipe is not None and q_bits is None:
        q_bits = 4
    recipe = recipe or "default"
    if q_bits is not None and q_bits not in QUANT_BITS:
        raise ConversionError(f"q_bits must be one of {', '.join(map(str, QUANT_BITS))}, got {q_bits}")
    if q_group_size not in GROUP_SIZES:
        raise ConversionError(f"q_group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {q_group_size}")
    if recipe not in RECIPES:
        raise ConversionError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)

    out = Path(mlx_path).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it")
    src = resolve_model_path(hf_path)
    if out.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
        raise ConversionError(f"the output folder {out} holds the input {src}; choose another --mlx-path")
    base_model = None if Path(hf_path).expanduser().exists() else str(hf_path)

    config, model, weights = open_checkpoint(src, mtp=not drop_mtp)
    if config.quantization is not None:
        raise ConfigError(f"{src} is already quantized; convert from the unquantized (bf16) checkpoint")
    source_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    rope_changed = False
    if rope_args is not None:
        new_config = apply_rope_options(rope_args, config, log=lambda m: _log(progress, f"[convert] rope: {m}"))
        rope_changed, config = new_config is not config, new_config
    if dtype is None:
        stored = source_config.get("dtype", source_config.get("torch_dtype"))
        dtype = stored if stored in DTYPES else None
    mx_dtype = getattr(mx, dtype) if dtype else None

    tensors, quantization, num_params = plan_conversion(
        model, weights, bits=q_bits, group_size=q_group_size, recipe=recipe, dtype=mx_dtype
    )
    del weights, model  # the plan holds the only references to the lazy inputs
    shards = plan_shards(tensors, max_bytes)
    total_bytes = sum(a.nbytes for a in tensors.values())
    out_dtype = (
        dtype or str(next(a.dtype for a in tensors.values() if mx.issubdtype(a.dtype, mx.floating))).split(".")[-1]
    )
    _log(
        progress,
        f"[convert] {src} -> {out}: {len(tensors)} tensors, {human_size(total_bytes)} in {len(shards)} shard(s), "
        + _describe_quantization(quantization, recipe, out_dtype),
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total_bytes + 2**26:
        raise ConversionError(
            f"not enough disk space in {out.parent}: the output needs {human_size(total_bytes)}, "
            f"{human_size(free)} free"
        )
    # an ordinary folder (mkdir honours the umask; mkdtemp's would stay private) with a unique name
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    try:
        index = write_shards(tensors, shards, tmp, progress=progress)
        index["metadata"]["total_parameters"] = num_params
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4), encoding="utf-8")
        cfg_out = output_config(source_config, config, quantization, dtype, rope_changed)
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=4), encoding="utf-8")
        copy_side_files(src, tmp)
        bpw = total_bytes * 8 / max(num_params, 1)
        card = model_card(
            str(hf_path),
            base_model,
            quantization,
            recipe,
            out_dtype,
            total_bytes,
            len(shards),
            bpw,
            config.num_mtp_layers or 0,
            upload_repo,
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _publish(tmp, out, force)
    except BaseException as e:  # errors and Ctrl-C alike: leave no partial output
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConversionError(f"cannot write the output next to {out}: {e.strerror or e}") from None
        raise

    result = ConvertResult(
        path=out,
        num_tensors=len(index["weight_map"]),
        num_shards=len(shards),
        total_bytes=total_bytes,
        bits_per_weight=bpw,
        quantization=quantization,
        seconds=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes(),
    )
    _log(
        progress,
        f"[convert] wrote {out} ({human_size(total_bytes)}, {bpw:.2f} bits/weight) in "
        f"{result.seconds:.1f} s; peak memory (RSS) {human_size(result.peak_rss_bytes)}",
    )
    if upload_repo:
        _log(progress, f"[convert] uploading to {upload_repo}")
        upload(out, upload_repo)
    return result
