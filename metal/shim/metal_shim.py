"""Run Metal kernel bodies written for ``mx.fast.metal_kernel`` on the CPU.

The body is wrapped in the signature MLX generates (``write_signature`` in
MLX's ``mlx/backend/common/metal_kernel.cpp``, checked against MLX v0.32.1;
see :func:`generate_source`) and compiled by clang as C++ for OpenCL against
``metal_shim.h``: Metal's ``device``, ``threadgroup``, ``constant`` and
``thread`` address spaces become OpenCL's ``__global``, ``__local``,
``__constant`` and ``__private``, so mixing them fails to compile as in MSL,
and nothing of libc or the C++ standard library is visible. A syntax pass over
the kernel's own declarations adds what that language accepts and MSL does not
(pointers and references without an address space, ``double``, ``virtual``,
``new``, ``goto``; see :data:`REJECTED` and metal/README.md). The kernel is
linked with the fiber runtime (``metal_shim_runtime.cpp``, ordinary C++) into a
shared library (cached by source hash) and executed grid-wide: each
threadgroup's threads run as cooperative fibers, so threadgroup memory,
barriers and SIMD collectives behave as on the GPU. The supported Metal subset
is documented in ``metal/README.md``.

Two front ends share one call description:

- :func:`metal_kernel` mirrors ``mx.fast.metal_kernel``: same constructor
  arguments, the returned object is called with ``inputs=[...]`` (mx arrays or
  Python scalars), ``template``, ``grid``, ``threadgroup``, ``output_shapes``,
  ``output_dtypes``, ``init_value`` and returns a list of mx arrays. Code that
  takes the kernel factory as a parameter runs the identical body on a Mac
  (``mx.fast.metal_kernel``) and here.
- :func:`run_metal_body` is the NumPy-level runner:
  ``run_metal_body(source, {name: array}, [(name, shape, dtype)], grid,
  threadgroup, template)`` -> ``{name: np.ndarray}``.

Differences from a GPU run that matter when comparing numbers: math functions
come from libm (Metal's ``exp``/``log`` may differ by a few ulp, ``fast::``
more), no floating-point contraction into FMA, and ``simd_sum`` adds in the
xor-butterfly order (1, 2, 4, 8, 16), the order mlx-lm's kernels assume.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

SHIM_DIR = Path(__file__).resolve().parent
HEADER = SHIM_DIR / "metal_shim.h"
HEADERS = [HEADER, SHIM_DIR / "metal_shim_simdgroup_matrix.h", SHIM_DIR / "metal_shim_runtime.h"]
RUNTIME = SHIM_DIR / "metal_shim_runtime.cpp"

CXX = os.environ.get("QNEXT_METAL_SHIM_CXX", "clang++")
COMMON_FLAGS = ["-O2", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffp-contract=off"]
# The kernel: C++ for OpenCL 2021 without libc/C++ headers, program-scope variables
# only in the constant address space (as MSL), IEEE division and square root.
KERNEL_FLAGS = [
    "-x",
    "clcpp",
    "-cl-std=clc++2021",
    "-cl-no-stdinc",
    "-nostdinc",
    "-Xclang",
    "-cl-ext=-__opencl_c_program_scope_global_variables,-__opencl_c_device_enqueue",
    "-cl-fp32-correctly-rounded-divide-sqrt",
    "-Wno-unknown-pragmas",
    "-Wno-unused-variable",
    "-Wno-unused-but-set-variable",
    "-Wno-keyword-macro",
]
RUNTIME_FLAGS = ["-std=c++17", "-fno-fast-math"]
# Kept for the cache key and for callers that print the compile command.
CXXFLAGS = COMMON_FLAGS + KERNEL_FLAGS

# What C++ for OpenCL accepts and MSL does not, turned into errors for kernel code
# (the body and its header): word -> the identifier it becomes, which names the reason
# in the compiler's message. Exceptions, RTTI, default new/delete, thread_local,
# the standard library and non-constant program-scope variables fail on their own.
REJECTED = {
    "double": "metal_has_no_double",
    "virtual": "metal_has_no_virtual_functions",
    "new": "metal_has_no_new",
    "goto": "metal_has_no_goto",
}


class ShimError(RuntimeError):
    """Compilation or execution of a kernel body failed (message says which)."""


# dtype name -> (MLX type string used in signatures/templates, numpy storage dtype)
_DTYPES: Dict[str, Tuple[str, Any]] = {
    "bool": ("bool", np.bool_),
    "uint8": ("uint8_t", np.uint8),
    "uint16": ("uint16_t", np.uint16),
    "uint32": ("uint32_t", np.uint32),
    "uint64": ("uint64_t", np.uint64),
    "int8": ("int8_t", np.int8),
    "int16": ("int16_t", np.int16),
    "int32": ("int32_t", np.int32),
    "int64": ("int64_t", np.int64),
    "float16": ("float16_t", np.float16),
    "bfloat16": ("bfloat16_t", np.uint16),  # stored as raw bits
    "float32": ("float", np.float32),
}

# Attribute name -> (Metal type, C++ expression over `a`, a metal_shim::Attrs).
# Same names and order as MLX's metal_attributes table: an attribute becomes a
# kernel parameter only when its name occurs in the body.
_ATTRIBUTES: List[Tuple[str, str, str]] = [
    ("dispatch_quadgroups_per_threadgroup", "uint", "(a.dtptg[0] * a.dtptg[1] * a.dtptg[2] + 3) / 4"),
    ("dispatch_simdgroups_per_threadgroup", "uint", "a.dsg_count"),
    ("dispatch_threads_per_threadgroup", "uint3", "uint3(a.dtptg[0], a.dtptg[1], a.dtptg[2])"),
    ("grid_origin", "uint3", "uint3(0u, 0u, 0u)"),
    ("grid_size", "uint3", "uint3(a.tpgrid[0], a.tpgrid[1], a.tpgrid[2])"),
    ("quadgroup_index_in_threadgroup", "uint", "a.index_in_tg / 4"),
    ("quadgroups_per_threadgroup", "uint", "(a.tptg_n[0] * a.tptg_n[1] * a.tptg_n[2] + 3) / 4"),
    ("simdgroup_index_in_threadgroup", "uint", "a.sg_index"),
    ("simdgroups_per_threadgroup", "uint", "a.sg_count"),
    ("thread_execution_width", "uint", "32u"),
    ("thread_index_in_quadgroup", "uint", "a.index_in_tg % 4"),
    ("thread_index_in_simdgroup", "uint", "a.lane"),
    ("thread_index_in_threadgroup", "uint", "a.index_in_tg"),
    ("thread_position_in_grid", "uint3", "uint3(a.tpg[0], a.tpg[1], a.tpg[2])"),
    ("thread_position_in_threadgroup", "uint3", "uint3(a.tptg[0], a.tptg[1], a.tptg[2])"),
    ("threadgroup_position_in_grid", "uint3", "uint3(a.tgpig[0], a.tgpig[1], a.tgpig[2])"),
    ("threadgroups_per_grid", "uint3", "uint3(a.tgpg[0], a.tgpg[1], a.tgpg[2])"),
    ("threads_per_grid", "uint3", "uint3(a.tpgrid[0], a.tpgrid[1], a.tpgrid[2])"),
    ("threads_per_simdgroup", "uint", "32u"),
    ("threads_per_threadgroup", "uint3", "uint3(a.tptg_n[0], a.tptg_n[1], a.tptg_n[2])"),
]


def have_compiler() -> bool:
    """True when the compiler the shim needs (``clang++``, or $QNEXT_METAL_SHIM_CXX: a clang) is on PATH."""
    return shutil.which(CXX) is not None


def dtype_name(dtype: Any) -> str:
    """Normalise an mx.Dtype, NumPy dtype/type or name (``"bfloat16"``) to a name of ``_DTYPES``."""
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__name__ == "Dtype":  # mlx.core.Dtype, without importing mlx
        name = str(dtype).rsplit(".", 1)[-1]
        name = "bool" if name == "bool_" else name
    else:
        name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ShimError(f"metal shim: unsupported dtype {dtype!r}")
    return name


# ---------------------------------------------------------------------------
# Source translation
# ---------------------------------------------------------------------------

_INCLUDE_METAL = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>[ \t]*$", re.M)
# A threadgroup declaration in the body: `threadgroup T name[...][...];`, `threadgroup T a, b[4];`
# (no * or & before a name: pointer types keep `threadgroup`, the __local qualifier).
_TG_DECL = re.compile(
    r"\bthreadgroup\s+((?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    r"([A-Za-z_]\w*(?:\s*\[[^\]]*\])*(?:\s*,\s*[A-Za-z_]\w*(?:\s*\[[^\]]*\])*)*)\s*;"
)
_HALF_LITERAL = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)[hH]\b")
# Unsuffixed floating literals are float in Metal (there is no double).
_FLOAT_LITERAL = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)(?![\w.])")
# Inputs with fewer elements are passed in the constant address space (MLX's
# max_constant_array_size in mlx/backend/common/metal_kernel.cpp).
MAX_CONSTANT_ARRAY_SIZE = 8


def _threadgroup_declarations(code: str) -> str:
    """Each ``threadgroup T name[dims];`` of the body -> a ``__local`` reference to the
    runtime's block for that declaration (one per declaration, shared by the threads of
    the threadgroup), on the same source line."""
    site = 0

    def one(m: re.Match) -> str:
        nonlocal site
        ctype = m.group(1).strip()
        out = []
        for decl in re.split(r",(?![^\[]*\])", m.group(2)):
            name, dims = re.match(r"\s*([A-Za-z_]\w*)\s*(.*)", decl, re.S).groups()
            dims = " ".join(dims.split())
            out.append(
                f"threadgroup {ctype} (&{name}){dims} = *(threadgroup {ctype} (*){dims})"
                f"(__SIZE_TYPE__)mtlshim_threadgroup_memory({site}, sizeof({ctype} {dims}));"
            )
            site += 1
        return " ".join(out)

    return _TG_DECL.sub(one, code)


def translate(code: str, body: bool = False) -> str:
    """Rewrite the few Metal constructs that are not also C++ for OpenCL (see metal/README.md);
    ``body``: the kernel body, where threadgroup declarations are allowed."""
    code = _INCLUDE_METAL.sub("", code)
    if body:
        code = _threadgroup_declarations(code)
    code = _HALF_LITERAL.sub(r"half(\1f)", code)
    code = _FLOAT_LITERAL.sub(r"\1f", code)
    return code


def _template_arg(value: Any) -> Tuple[str, str]:
    """(C++ template parameter kind, value as MLX's write_template prints it)."""
    if isinstance(value, bool):
        return "bool", "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return "int", str(int(value))
    return "typename", _DTYPES[dtype_name(value)][0]


def input_address_space(ndim: int, size: int) -> str:
    """``"constant"`` or ``"device"``: where MLX passes an input of ``size`` elements (0-d
    arrays, by reference, and arrays of fewer than 8 elements are ``constant``)."""
    return "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"


def generate_source(
    name: str,
    inputs: Sequence[Tuple[str, str, int, int]],
    output_names: Sequence[str],
    output_dtypes: Sequence[str],
    source: str,
    header: str = "",
    template: Sequence[Tuple[str, Any]] = (),
    atomic_outputs: bool = False,
) -> str:
    """The translation unit for one kernel instantiation.

    The kernel function's signature is the one MLX writes (``write_signature`` in
    ``mlx/backend/common/metal_kernel.cpp``, MLX v0.32.1): per input ``const constant
    T& name`` for 0-d arrays, ``const constant T* name`` for arrays of fewer than 8
    elements, else ``const device T* name``; then ``const constant int* name_shape``,
    ``const constant int64_t* name_strides``, ``const constant int& name_ndim`` when
    the body mentions them; outputs as ``device T* name`` (``device atomic<T>*``);
    template arguments as ``int``, ``bool`` or ``typename`` parameters; the
    attributes the body mentions, with MLX's types. The name is MLX's
    (``custom_kernel_<name>_<template hash>`` plus a dtype suffix per input and output).

    Args:
        inputs: ``(name, dtype name, ndim, size)`` per input, in order.
        output_names, output_dtypes: the outputs.
        template: ``[(name, bool | int | dtype)]`` as given to the MLX call.
    Returns:
        Source defining ``extern "C" int mtlshim_run(...)``.
    """
    targs = [(n, *_template_arg(v)) for n, v in template]
    tdef = ""
    func = f"custom_kernel_{name}"
    if targs:
        tdef = "<" + ", ".join(v for _, _, v in targs) + ">"
        func += "_" + re.sub(r"<|>|(, )", "_", tdef)[:-1]  # MLX's make_template_hash
    for _, dt, ndim, size in inputs:
        func += "_" + _DTYPES[dt][0] + ("s" if ndim == 0 else "c" if size < MAX_CONSTANT_ARRAY_SIZE else "")
    for dt in output_dtypes:
        func += "_" + _DTYPES[dt][0]
    params: List[str] = []
    args: List[str] = []
    slot = 0
    for in_name, dt, ndim, size in inputs:
        ctype = _DTYPES[dt][0]
        space = input_address_space(ndim, size)
        ref = "&" if ndim == 0 else "*"
        params.append(f"const {space} {ctype}{ref} {in_name}")
        # b[] holds generic pointers; an integer round trip reaches the constant space.
        cast = f"(const {space} {ctype}*)(__SIZE_TYPE__)b[{slot}]"
        args.append(f"*{cast}" if ndim == 0 else cast)
        slot += 1
        if ndim > 0:
            for suffix, ptype, ctype2, deref in (
                ("_shape", "const constant int*", "int", ""),
                ("_strides", "const constant int64_t*", "int64_t", ""),
                ("_ndim", "const constant int&", "int", "*"),
            ):
                if in_name + suffix in source:
                    params.append(f"{ptype} {in_name}{suffix}")
                    args.append(f"{deref}(const constant {ctype2}*)(__SIZE_TYPE__)b[{slot}]")
                    slot += 1
    for out_name, dt in zip(output_names, output_dtypes):
        ctype = _DTYPES[dt][0]
        if atomic_outputs:
            ctype = f"atomic<{ctype}>"
        params.append(f"device {ctype}* {out_name}")
        args.append(f"(device {ctype}*)b[{slot}]")
        slot += 1
    for attr, atype, expr in _ATTRIBUTES:
        if attr in source:
            params.append(f"{atype} {attr}")
            args.append(expr)
    template_line = ""
    if targs:
        template_line = "template <" + ", ".join(f"{k} {n}" for n, k, _ in targs) + ">\n"
    sig = ",\n    ".join(params)
    call_args = ",\n      ".join(args)
    rejected = "".join(f"#define {word} {ident}\n" for word, ident in REJECTED.items())
    return (
        f"// Generated by metal_shim.py for kernel '{name}'\n"
        f'#include "metal_shim.h"\n'
        f"{rejected}"
        f"namespace metal {{\n"
        f"namespace {USER_NAMESPACE} {{\n"
        f'#line 1 "{name}.header"\n'
        f"{translate(header)}\n"
        f'#line 1 "{name}.signature"\n'
        f"{template_line}void {func}(\n    {sig}) {{\n"
        f'#line 1 "{name}.metal"\n'
        f"{translate(source, body=True)}\n"
        f"}}\n"
        f"}}  // namespace {USER_NAMESPACE}\n"
        f'#line 1 "{name}.launch"\n'
        f"static void mtlshim_body(const metal_shim::Attrs* ap, void* ctx) {{\n"
        f"  const metal_shim::Attrs& a = *ap;\n"
        f"  void** b = (void**)ctx;\n"
        f"  {USER_NAMESPACE}::{func}{tdef}(\n      {call_args});\n"
        f"}}\n"
        f"}}  // namespace metal\n"
        f'extern "C" __attribute__((visibility("default"))) int mtlshim_run(\n'
        f"    void** bufs, const unsigned* grid, const unsigned* tg, unsigned long stack_bytes, unsigned order,\n"
        f"    char* err, int errlen) {{\n"
        f"  return mtlshim_launch(grid, tg, stack_bytes, order, metal::mtlshim_body, bufs, err, errlen);\n"
        f"}}\n"
    )


# The kernel's own declarations (its header and body) live in this namespace, so the
# address-space check reads exactly them (clang's -ast-dump-filter).
USER_NAMESPACE = "mtlshim_user"

# ---------------------------------------------------------------------------
# The checks on the kernel's own declarations (clang's AST dump of USER_NAMESPACE):
# pointers and references must say where they point, and no function may recurse.
# ---------------------------------------------------------------------------

_AST_LINE = re.compile(r"^(?P<indent>[ |`-]*)(?P<kind>[A-Za-z]+)(?: (?P<id>0x[0-9a-f]+))?")
_AST_LOC = re.compile(r"(?:<|\s)(?:(?P<file>[\w.\-/]+\.(?:metal|header|signature)):(?P<fline>\d+)|line:(?P<line>\d+))")
_AST_TYPE = re.compile(r"'([^']*)'")
_AST_PREV = re.compile(r" prev (0x[0-9a-f]+)")
_AST_CALLEE = re.compile(
    r"(?:DeclRefExpr .* (?:Function|CXXMethod) (0x[0-9a-f]+) '"
    r"|MemberExpr .*'<bound member function type>' (?:\.|->)\w+ (0x[0-9a-f]+))"
)
_AST_MARKERS = {
    *("line", "col", "used", "referenced", "cinit", "callinit", "listinit"),
    *("inline", "static", "constexpr", "prev"),
}
_FUNCTION_DECLS = ("FunctionDecl", "CXXMethodDecl", "CXXConstructorDecl", "CXXConversionDecl")


def _decl_name(text: str, end: int) -> str:
    words = re.findall(r"[A-Za-z_]\w*", re.sub(r"0x[0-9a-f]+", "", text[end:].split("'", 1)[0]))
    words = [w for w in words if w not in _AST_MARKERS]
    return words[-1] if words else "?"


def check_declarations(ast_dump: str) -> List[str]:
    """What MSL rejects in a kernel's own code and C++ for OpenCL accepts, from the text
    of ``clang -Xclang -ast-dump -Xclang -ast-dump-filter=mtlshim_user``:

    - a pointer or reference type without an address space (clang's ``__generic``):
      MSL requires one ("pointer type must have explicit address space qualifier");
    - a function that calls itself, directly or through others: Metal has no recursion.

    Returns one ``"<file>:<line>: error: ..."`` line per finding (implicit
    declarations, e.g. copy constructors, are skipped).
    """
    found = []
    file, line = "?", "?"
    skip_below = None  # depth of an implicit declaration whose subtree is skipped
    functions: Dict[str, Tuple[str, str]] = {}  # canonical id -> (name, "file:line")
    canon: Dict[str, str] = {}
    calls: Dict[str, set] = {}
    stack: List[Tuple[int, str]] = []  # enclosing function declarations (depth, canonical id)
    for text in ast_dump.splitlines():
        m = _AST_LINE.match(text)
        if not m:
            continue
        for loc in _AST_LOC.finditer(text.split("'", 1)[0]):
            if loc.group("file"):
                file, line = loc.group("file"), loc.group("fline")
            else:
                line = loc.group("line")
        depth = len(m.group("indent"))
        if skip_below is not None:
            if depth > skip_below:
                continue
            skip_below = None
        while stack and stack[-1][0] >= depth:
            stack.pop()
        kind = m.group("kind")
        if kind.endswith("Decl") and " implicit " in text:
            skip_below = depth
            continue
        if kind in _FUNCTION_DECLS and m.group("id"):
            prev = _AST_PREV.search(text)
            cid = canon.get(prev.group(1), prev.group(1)) if prev else m.group("id")
            canon[m.group("id")] = cid
            functions.setdefault(cid, (_decl_name(text, m.end()), f"{file}:{line}"))
            stack.append((depth, cid))
        callee = _AST_CALLEE.search(text)
        if callee and stack:
            target = callee.group(1) or callee.group(2)
            calls.setdefault(stack[-1][1], set()).add(canon.get(target, target))
        if kind not in ("VarDecl", "ParmVarDecl", "FieldDecl") + _FUNCTION_DECLS:
            continue
        types = _AST_TYPE.findall(text)
        if not types:
            continue
        qual = types[0]
        if kind in _FUNCTION_DECLS:
            qual = qual.split("(", 1)[0]  # the return type only (methods end in "__generic")
        if re.search(r"__generic[^*&]*[*&]", qual):
            shown = re.sub(r"\s*__private$", "", qual.replace("__generic ", "").strip())
            found.append(
                f"{file}:{line}: error: '{_decl_name(text, m.end())}' has type '{shown}': a pointer or reference "
                "needs an address space (device, constant, threadgroup or thread), as in Metal"
            )
    # Recursion: a function that reaches itself in the call graph of the kernel's code.
    for start, (name, where) in functions.items():
        seen, todo = set(), list(calls.get(start, ()))
        while todo:
            f = todo.pop()
            if f == start:
                found.append(f"{where}: error: '{name}' calls itself (directly or via others): Metal has no recursion")
                break
            if f not in seen:
                seen.add(f)
                todo.extend(calls.get(f, ()))
    return found


# ---------------------------------------------------------------------------
# Compilation (cached by hash) and launch
# ---------------------------------------------------------------------------

_LIBS: Dict[str, ctypes.CDLL] = {}
# ctypes releases the GIL during the launch; the runtime state is per OS thread,
# but keep one launch at a time so timings and error reports stay simple.
_LAUNCH_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where compiled kernels are kept: $QNEXT_METAL_SHIM_CACHE or <tmp>/qnext_metal_shim."""
    d = os.environ.get("QNEXT_METAL_SHIM_CACHE") or os.path.join(tempfile.gettempdir(), "qnext_metal_shim")
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


def _run(cmd: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _runtime_object() -> Path:
    """The fiber runtime compiled once per source and compiler (cached)."""
    h = hashlib.sha256()
    for f in (RUNTIME, SHIM_DIR / "metal_shim_runtime.h"):
        h.update(f.read_bytes())
    h.update(" ".join([CXX] + COMMON_FLAGS + RUNTIME_FLAGS).encode())
    out = cache_dir() / f"rt_{h.hexdigest()[:24]}.o"
    if not out.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            obj = Path(tmp) / "rt.o"
            proc = _run([CXX, *COMMON_FLAGS, *RUNTIME_FLAGS, "-I", str(SHIM_DIR), "-c", str(RUNTIME), "-o", str(obj)])
            if proc.returncode != 0:
                raise ShimError("metal shim: the runtime failed to compile:\n" + proc.stderr[-6000:])
            os.replace(obj, out)
    return out


def check_source(cpp: str) -> None:
    """Compile ``cpp`` for syntax only and apply :func:`check_declarations`; raises
    :class:`ShimError` ("compilation failed") with the compiler's messages."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        src = Path(tmp) / "kernel.clcpp"
        src.write_text(cpp)
        proc = _run(
            [CXX, *KERNEL_FLAGS, "-I", str(SHIM_DIR), "-fsyntax-only", "-Xclang", "-ast-dump"]
            + ["-Xclang", f"-ast-dump-filter={USER_NAMESPACE}", str(src)]
        )
    if proc.returncode != 0:
        raise ShimError("metal shim: compilation failed:\n" + proc.stderr[-6000:])
    bad = check_declarations(proc.stdout)
    if bad:
        raise ShimError("metal shim: compilation failed:\n" + "\n".join(bad))


def compile_source(cpp: str) -> ctypes.CDLL:
    """Check, compile and link (or reuse) the shared library for a generated translation unit."""
    h = hashlib.sha256()
    h.update(cpp.encode())
    for hdr in HEADERS + [RUNTIME, Path(__file__)]:  # this file: the checks a library passed
        if hdr.exists():
            h.update(hdr.read_bytes())
    h.update(" ".join([CXX] + COMMON_FLAGS + KERNEL_FLAGS + RUNTIME_FLAGS).encode())
    key = h.hexdigest()[:24]
    if key in _LIBS:
        return _LIBS[key]
    if not have_compiler():
        raise ShimError(f"metal shim: C++ compiler {CXX!r} not found")
    out = cache_dir() / f"k_{key}.so"
    if not out.exists():
        check_source(cpp)
        runtime = _runtime_object()
        # Build in a private folder, then rename: concurrent runs never load a half-written library.
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src = Path(tmp) / "kernel.clcpp"
            src.write_text(cpp)
            obj = Path(tmp) / "kernel.o"
            lib = Path(tmp) / "kernel.so"
            proc = _run([CXX, *COMMON_FLAGS, *KERNEL_FLAGS, "-I", str(SHIM_DIR), "-c", str(src), "-o", str(obj)])
            if proc.returncode == 0:
                proc = _run([CXX, "-shared", str(obj), str(runtime), "-o", str(lib), "-lm"])
            if proc.returncode != 0:
                raise ShimError("metal shim: compilation failed:\n" + proc.stderr[-6000:])
            os.replace(lib, out)
    dll = ctypes.CDLL(str(out))
    dll.mtlshim_run.restype = ctypes.c_int
    dll.mtlshim_run.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.c_ulong,
        ctypes.c_uint,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    _LIBS[key] = dll
    return dll


def _as_input(value: Any) -> Tuple[np.ndarray, str]:
    """(NumPy storage array, dtype name) of one input: NumPy array, mx array, Python scalar,
    or ``(array, dtype name)`` for arrays whose storage needs a tag (bfloat16 bits as uint16)."""
    if isinstance(value, tuple):
        arr, dt = value
        return np.asarray(arr), dtype_name(dt)
    if isinstance(value, bool):
        return np.array(value, dtype=np.bool_), "bool"
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.ndarray):
        return np.array(value, dtype=np.int32), "int32"
    if isinstance(value, float):
        return np.array(value, dtype=np.float32), "float32"
    if type(value).__name__ == "array" and type(value).__module__.startswith("mlx"):
        import mlx.core as mx

        dt = dtype_name(value.dtype)
        if dt == "bfloat16":
            return np.array(value.view(mx.uint16)), dt
        return np.array(value), dt
    arr = np.asarray(value)
    return arr, dtype_name(arr.dtype)


def launch(
    name: str,
    source: str,
    header: str,
    inputs: Sequence[Tuple[str, np.ndarray, str]],
    outputs: Sequence[Tuple[str, Sequence[int], str]],
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Sequence[Tuple[str, Any]] = (),
    init_value: Optional[float] = None,
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    order: int = 0,
    stack_kb: int = 64,
    verbose: bool = False,
) -> List[np.ndarray]:
    """Compile and run one kernel instantiation; returns the outputs' storage arrays.

    ``inputs``: ``(name, storage array, dtype name)``; ``outputs``:
    ``(name, shape, dtype name)``. Outputs start filled with ``init_value`` or,
    without one, with all-ones bytes (NaN for floats) so unwritten elements show.
    ``order`` picks the order threads start in each round (0 forward, 1
    reverse, other values a seeded shuffle): results must not depend on it.
    """
    if len(grid) != 3 or len(threadgroup) != 3:
        raise ShimError("metal shim: grid and threadgroup need three sizes")
    specs = []
    arrays = []
    for in_name, arr, dt in inputs:
        store = _DTYPES[dt][1]
        arr = np.asarray(arr)
        if arr.dtype != np.dtype(store):
            arr = arr.astype(store)
        if (ensure_row_contiguous or arr.ndim == 0) and not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        specs.append((in_name, dt, arr.ndim, arr.size))
        arrays.append(arr)
    out_names = [o[0] for o in outputs]
    out_dtypes = [o[2] for o in outputs]
    cpp = generate_source(name, specs, out_names, out_dtypes, source, header, template, atomic_outputs)
    if verbose:
        print(f"Generated source code for `{name}`:\n```\n{cpp}\n```")
    lib = compile_source(cpp)

    keep: List[np.ndarray] = []
    ptrs: List[int] = []
    for (in_name, dt, ndim, _), arr in zip(specs, arrays):
        if arr.size == 0 and ndim > 0:
            arr = np.zeros(1, dtype=arr.dtype)
        keep.append(arr)
        ptrs.append(arr.ctypes.data)
        if ndim > 0:
            if in_name + "_shape" in source:
                shp = np.array(arr.shape, dtype=np.int32)
                keep.append(shp)
                ptrs.append(shp.ctypes.data)
            if in_name + "_strides" in source:
                strd = np.array([s // arr.itemsize for s in arr.strides], dtype=np.int64)
                keep.append(strd)
                ptrs.append(strd.ctypes.data)
            if in_name + "_ndim" in source:
                nd = np.array(arr.ndim, dtype=np.int32)
                keep.append(nd)
                ptrs.append(nd.ctypes.data)
    results = []
    for _, shape, dt in outputs:
        store = np.dtype(_DTYPES[dt][1])
        out = np.empty(tuple(int(s) for s in shape), dtype=store)
        if init_value is None:
            out.view(np.uint8)[...] = 0xFF
        elif dt == "bfloat16":
            out[...] = _float_to_bf16_bits(np.full(out.shape, init_value, np.float32))
        else:
            out[...] = init_value
        results.append(out)
        buf = out if out.size else np.zeros(1, dtype=store)
        keep.append(buf)
        ptrs.append(buf.ctypes.data)
    bufs = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
    g = (ctypes.c_uint * 3)(*[int(x) for x in grid])
    t = (ctypes.c_uint * 3)(*[int(x) for x in threadgroup])
    err = ctypes.create_string_buffer(2048)
    with _LAUNCH_LOCK:
        rc = lib.mtlshim_run(bufs, g, t, stack_kb * 1024, order, err, len(err))
    if rc != 0:
        raise ShimError(f"{name}: {err.value.decode(errors='replace')}")
    return results


def _float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    r[nan] = 0x7FC0
    return r


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def run_metal_body(
    source: str,
    inputs: Dict[str, Any],
    outputs: Sequence[Tuple[str, Sequence[int], Any]],
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Sequence[Tuple[str, Any]] = (),
    *,
    header: str = "",
    name: str = "kernel",
    init_value: Optional[float] = None,
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    order: int = 0,
    stack_kb: int = 64,
    verbose: bool = False,
) -> Dict[str, np.ndarray]:
    """Run a kernel body on the CPU, NumPy in and out.

    Args:
        source: the kernel body, as given to ``mx.fast.metal_kernel``.
        inputs: ``{name: value}`` in signature order; a value is a NumPy array,
            an mx array, a Python scalar (int -> int32, float -> float32, as
            MLX converts them) or ``(uint16 array, "bfloat16")``.
        outputs: ``(name, shape, dtype)`` per output (dtype: mx/NumPy dtype or name).
        grid, threadgroup: thread counts, as for ``mx.fast.metal_kernel``.
        template: ``[(name, bool | int | dtype)]``.
    Returns:
        ``{name: array}``; bfloat16 outputs come back as float32 (exact).
    """
    ins = [(n, *_as_input(v)) for n, v in inputs.items()]
    outs = [(n, tuple(shape), dtype_name(dt)) for n, shape, dt in outputs]
    res = launch(
        name,
        source,
        header,
        ins,
        outs,
        grid,
        threadgroup,
        template,
        init_value,
        ensure_row_contiguous,
        atomic_outputs,
        order,
        stack_kb,
        verbose,
    )
    result = {}
    for (n, _, dt), arr in zip(outs, res):
        result[n] = bf16_bits_to_float(arr) if dt == "bfloat16" else arr
    return result


class ShimKernel:
    """Callable with the interface of the object ``mx.fast.metal_kernel`` returns."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        order: int = 0,
        stack_kb: int = 64,
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.order = order
        self.stack_kb = stack_kb

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ):
        import mlx.core as mx

        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} but got size {len(inputs)}."
            )
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(self.output_names):
            raise ValueError("[metal_kernel] output_shapes/output_dtypes must match output_names.")
        ins = [(n, *_as_input(v)) for n, v in zip(self.input_names, inputs)]
        outs = [(n, tuple(s), dtype_name(d)) for n, s, d in zip(self.output_names, output_shapes, output_dtypes)]
        res = launch(
            self.name,
            self.source,
            self.header,
            ins,
            outs,
            grid,
            threadgroup,
            template or (),
            init_value,
            self.ensure_row_contiguous,
            self.atomic_outputs,
            self.order,
            self.stack_kb,
            verbose,
        )
        arrays = []
        for (_, _, dt), arr in zip(outs, res):
            if dt == "bfloat16":
                arrays.append(mx.array(arr).view(mx.bfloat16))
            else:
                arrays.append(mx.array(arr))
        return arrays


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options: Any = None,
    *,
    order: int = 0,
    stack_kb: int = 64,
) -> ShimKernel:
    """Drop-in for ``mx.fast.metal_kernel`` that executes on the CPU through the shim.

    ``order`` and ``stack_kb`` are shim-only (thread start order, fiber stack size).
    ``compile_options`` is accepted and ignored.
    """
    return ShimKernel(
        name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs, order, stack_kb
    )
