"""The package as users install it: console scripts, and a wheel that carries the Metal sources and the demo model."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
ENTRY_MODULES = ("generate", "convert", "server", "chat", "app", "plan", "doctor")


def test_every_command_has_a_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"qnext_mlx.{m}": f"qnext_mlx.{m}:main" for m in ENTRY_MODULES}
    for m in ENTRY_MODULES:
        assert callable(importlib.import_module(f"qnext_mlx.{m}").main)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel ``pip`` builds from this checkout (with this environment's setuptools: no download)."""
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the files git tracks (or would): the checkout stays clean, and a
    # file the build needs but git does not carry would fail here as in a fresh clone.
    src = tmp_path_factory.mktemp("source")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (path,) = out.glob("qnext_mlx-*.whl")
    return path


def test_the_wheel_carries_the_metal_sources_and_the_demo_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    metal = {p.name for p in (ROOT / "metal").glob("*.metal")}
    assert metal and {f"qnext_mlx/metal_src/{m}" for m in metal} <= names
    demo = {p.name for p in (ROOT / "qnext_mlx" / "demo_model").iterdir() if p.is_file()}
    assert {f"qnext_mlx/demo_model/{d}" for d in demo} <= names
    assert not any("shim" in n or n.startswith(("tests/", "scripts/", "examples/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"qnext_mlx.{m} = qnext_mlx.{m}:main" in text for m in ENTRY_MODULES)


def test_installed_not_editable_it_finds_its_kernels_and_demo_model(wheel, tmp_path):
    """``pip install`` of the wheel into a fresh venv: the generate command runs on the demo model
    from another folder, and the Metal sources are read from the installed package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    probe = (
        "import qnext_mlx, sys; from qnext_mlx.kernels.registry import kernel_source_dir, load_kernel_source;"
        "print(qnext_mlx.__file__); print(kernel_source_dir()); print(len(load_kernel_source('gdn_decode.metal')[1]))"
    )
    where = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert where.returncode == 0, where.stderr
    package, sources, body = where.stdout.split()
    assert str(venv) in package and sources.startswith(str(venv)) and sources.endswith("metal_src")
    assert int(body) > 100
    gen = subprocess.run(
        [str(venv / "bin" / "qnext_mlx.generate"), "--prompt", "In the beginning", "--max-tokens", "8", "--temp", "0"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() and "demo model" in gen.stderr
