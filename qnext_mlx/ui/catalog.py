"""The models the desktop app can offer: the bundled demo model, Qwen3-Next models in
the Hugging Face cache, and folders the user added.

Each is described without loading its weights: its size (the safetensors files'
bytes), its quantization (``config.json``'s ``quantization`` / ``quantization_config``,
else the weights' dtype) and whether it has an MTP head (``mtp.*`` tensors, read from
the safetensors headers). Works without a display and never touches the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..checkpoint.paths import DEMO_MODEL_DIR
from ..checkpoint.reader import read_safetensors_header, weight_files
from ..errors import QnextError

__all__ = [
    "MODEL_TYPE",
    "ModelInfo",
    "describe_model",
    "format_size",
    "hf_cache_dir",
    "hf_repo_of",
    "list_models",
    "models_in_folder",
    "models_in_hf_cache",
]

MODEL_TYPE = "qwen3_next"  # config.json's model_type for Qwen3-Next, in both HF and MLX checkpoints
SOURCE_DEMO, SOURCE_HF, SOURCE_FOLDER = "bundled", "Hugging Face cache", "added folder"
_DTYPE_NAMES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
    "BF16": "bf16",
    "F16": "fp16",
    "F32": "fp32",
    "F8_E4M3": "fp8",
    "F8_E5M2": "fp8",
}


@dataclass
class ModelInfo:
    """One model the picker lists.

    ``model_arg`` is what to load (None: the bundled demo model; else a local folder);
    ``added``: the folder the user added that this model was found in (None for the
    demo model and the Hugging Face cache); ``error``: why it cannot be loaded
    (an incomplete download, a damaged file), else None.
    """

    name: str
    model_arg: Optional[str]
    source: str
    path: Path
    size_bytes: int = 0
    quantization: str = ""
    has_mtp: bool = False
    added: Optional[str] = None
    error: Optional[str] = None


def format_size(n: int) -> str:
    """Bytes as people read them on a Mac (decimal units): ``"41.8 GB"``, ``"5.1 MB"``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def hf_cache_dir(env: Optional[Dict[str, str]] = None) -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read now, not when huggingface_hub was imported)."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hf_repo_of(path) -> Optional[str]:
    """``"org/name"`` for a snapshot folder of the Hugging Face cache
    (``.../models--org--name/snapshots/<commit>``), else None."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return None


def _read_config(folder: Path) -> Optional[dict]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _quantization(config: dict, first_dtype: Optional[str]) -> str:
    q = config.get("quantization")
    if isinstance(q, dict):  # MLX: {"bits": 4, "group_size": 64, "<module>": {"bits": 8, ...} | False}
        mode = q.get("mode")
        bits = {q["bits"]} if isinstance(q.get("bits"), int) else set()
        bits |= {v["bits"] for v in q.values() if isinstance(v, dict) and isinstance(v.get("bits"), int)}
        kind = "" if mode in (None, "affine") else f"{mode} "
        if len(bits) > 1:
            return f"{kind}mixed {'/'.join(str(b) for b in sorted(bits))}-bit"
        if bits:
            return f"{kind}{bits.pop()}-bit"
        return kind.strip() or "quantized"
    qc = config.get("quantization_config")
    if isinstance(qc, dict):  # Hugging Face: {"quant_method": "fp8", ...} or {"bits": 4, "quant_method": "awq"}
        method = str(qc.get("quant_method") or "quantized")
        return f"{method} {qc['bits']}-bit" if isinstance(qc.get("bits"), int) else method
    dtype = config.get("torch_dtype") or config.get("dtype") or first_dtype
    return _DTYPE_NAMES.get(str(dtype), str(dtype) if dtype else "")


def describe_model(
    folder, name: str, source: str, model_arg: Optional[str], added: Optional[str] = None
) -> Optional[ModelInfo]:
    """A :class:`ModelInfo` for a model folder, or None when it is not a Qwen3-Next
    checkpoint (no ``config.json`` with ``model_type: qwen3_next``). Reads the config
    and the safetensors headers only."""
    folder = Path(folder)
    config = _read_config(folder)
    if config is None or config.get("model_type") != MODEL_TYPE:
        return None
    info = ModelInfo(name=name, model_arg=model_arg, source=source, path=folder, added=added)
    first_dtype = None
    try:
        files = weight_files(folder)
        for f in files:
            header = read_safetensors_header(f)
            info.size_bytes += f.stat().st_size
            info.has_mtp = info.has_mtp or any(k.startswith("mtp.") for k in header)
            if first_dtype is None and header:
                first_dtype = next(iter(header.values()))[0]
    except (QnextError, OSError) as e:
        info.error = str(e) if isinstance(e, QnextError) else f"cannot read {folder}: {e.strerror or e}"
    info.quantization = _quantization(config, first_dtype)
    return info


def models_in_hf_cache(cache_dir=None) -> List[ModelInfo]:
    """Qwen3-Next models in the Hugging Face cache, one per repo (the revision ``main``
    points at, else the newest), sorted by name."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache_dir = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    try:
        scanned = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError, ValueError):
        return []
    out = []
    for repo in scanned.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        snapshot = revisions[0].snapshot_path
        info = describe_model(snapshot, repo.repo_id, SOURCE_HF, str(snapshot))
        if info is not None:
            out.append(info)
    return sorted(out, key=lambda i: i.name.lower())


def models_in_folder(folder) -> List[ModelInfo]:
    """The Qwen3-Next models of a folder the user added: the folder itself when it is
    a model folder, else its subfolders that are."""
    folder = Path(folder).expanduser()
    info = describe_model(folder, folder.name, SOURCE_FOLDER, str(folder), added=str(folder))
    if info is not None:
        return [info]
    try:
        subs = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []
    found = (describe_model(p, p.name, SOURCE_FOLDER, str(p), added=str(folder)) for p in subs)
    return [i for i in found if i is not None]


def list_models(folders: Iterable[str] = (), cache_dir=None, include_demo: bool = True) -> List[ModelInfo]:
    """Everything the picker offers: the demo model, the Hugging Face cache, then the
    added folders (a model found twice is listed once)."""
    out: List[ModelInfo] = []
    if include_demo:
        demo = describe_model(DEMO_MODEL_DIR, "demo model", SOURCE_DEMO, None)
        if demo is not None:
            out.append(demo)
    out += models_in_hf_cache(cache_dir)
    for folder in folders:
        out += models_in_folder(folder)
    seen, unique = set(), []
    for info in out:
        key = os.path.realpath(info.path)
        if key not in seen:
            seen.add(key)
            unique.append(info)
    return unique
