"""The Metal shim rejects what the Metal compiler rejects, and writes MLX's signature.

The shim compiles kernel bodies with clang as C++ for OpenCL (device, threadgroup,
constant and thread become distinct address spaces) plus its own checks
(metal_shim.check_declarations and REJECTED). Each body below is invalid Metal:
the shim must refuse to build it, with a message that says why. The bodies that
follow them are valid Metal that must still build and give exact results, and
the signature test pins the generated parameter list to MLX's write_signature.
Every shipped kernel and mlx-lm's kernels still run through the shim in
tests/test_metal_shim.py and tests/test_metal_moe.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "metal" / "shim"))

import metal_shim as ms  # noqa: E402

pytestmark = pytest.mark.skipif(
    not ms.have_compiler(),
    reason=f"{ms.CXX} not found: the Metal shim compiles kernel bodies with clang (scripts/install-test-deps.sh)",
)

X = np.arange(16, dtype=np.float32)  # 16 elements: a device input
S = np.arange(4, dtype=np.float32) + 1  # 4 elements: MLX passes it in the constant address space
H = (np.arange(4) + 0.5).astype(np.float16)


def _run(body, header=""):
    return ms.run_metal_body(
        body, {"x": X, "s": S, "h": H}, [("y", (2,), np.float32)], (1, 1, 1), (1, 1, 1), header=header
    )["y"]


# (body, header, what the message must say). The first four are the ones g++ used to accept.
INVALID = {
    "threadgroup array into a device pointer": (
        "threadgroup float buf[4]; buf[0] = x[0]; device float* p = buf; y[0] = p[0];",
        "",
        "cannot initialize a variable of type '__global float",
    ),
    "pointer without address space to device memory": (
        "const float* p = x; y[0] = p[0];",
        "",
        "'p' has type 'const float *'",
    ),
    "new": ("thread float* p = new float[4]; y[0] = p[0];", "", "metal_has_no_new"),
    "throw": ("if (x[0] < 0) { throw 1; } y[0] = x[0];", "", "cannot use 'throw' with exceptions disabled"),
    # and more of what MSL lacks
    "try/catch": ("try { y[0] = x[0]; } catch (...) {}", "", "cannot use 'try' with exceptions disabled"),
    "delete": ("thread float* p = nullptr; delete p; y[0] = 0;", "", "'default delete' is not supported"),
    "virtual function": (
        "struct B { virtual float g() { return 1; } }; B b; y[0] = b.g();",
        "",
        "metal_has_no_virtual_functions",
    ),
    "double": ("double d = x[0]; y[0] = d;", "", "metal_has_no_double"),
    "goto": ("goto end; end: y[0] = x[0];", "", "metal_has_no_goto"),
    "typeid": ("y[0] = sizeof(typeid(x));", "", "'typeid' is not supported"),
    "dynamic_cast": (
        "struct A { int a; }; struct B : A {}; A a; thread A* pa = &a; y[0] = dynamic_cast<thread B*>(pa) != nullptr;",
        "",
        "'dynamic_cast' is not supported",
    ),
    "thread_local": ("thread_local float q = 1; y[0] = q;", "", "'thread_local'"),
    "standard library header": ("#include <vector>\ny[0] = x[0];", "", "'vector' file not found"),
    "std:: names": ("y[0] = std::sqrt(x[0]);", "", "undeclared identifier 'std'"),
    "libc printf": ('printf("%f", x[0]); y[0] = x[0];', "", "undeclared identifier 'printf'"),
    "libc malloc": ("thread float* p = (thread float*)malloc(4); y[0] = p[0];", "", "undeclared identifier 'malloc'"),
    "pointer without address space to thread memory": (
        "float loc[2] = {1, 2}; float* p = loc; y[0] = p[1];",
        "",
        "'p' has type 'float *'",
    ),
    "reference without address space": ("const float& r = x[0]; y[0] = r;", "", "'r' has type 'const float &'"),
    "parameter without address space": (
        "y[0] = first(x);",
        "inline float first(const float* p) { return p[0]; }",
        "'p' has type 'const float *'",
    ),
    "cast between address spaces": (
        "threadgroup float buf[4]; buf[0] = 1; device float* p = (device float*)buf; y[0] = p[0];",
        "",
        "converts between mismatching address spaces",
    ),
    "small input (constant) used as device": (
        "const device float* p = s; y[0] = p[0];",
        "",
        "with an lvalue of type 'const __constant float *",
    ),
    "non-constant program-scope variable": (
        "y[0] = x[0] * g;",
        "float g = 2.0f;",
        "must reside in constant address space",
    ),
    "non-constant static local": ("static float q = 1; y[0] = q;", "", "must reside in constant address space"),
    "threadgroup declaration outside the kernel": (
        "y[0] = helper();",
        "inline float helper() { threadgroup float t[4]; t[0] = 1; return t[0]; }",
        "cannot be declared in local address space",
    ),
    "recursion": (
        "y[0] = fact(3);",
        "inline int fact(int n) { return n <= 1 ? 1 : n * fact(n - 1); }",
        "'fact' calls itself",
    ),
    "mutual recursion in templates": (
        "y[0] = odd(3);",
        "template <class T> T even(T n);\n"
        "template <class T> T odd(T n) { return n ? even(n - 1) : 0; }\n"
        "template <class T> T even(T n) { return n ? odd(n - 1) : 1; }",
        "calls itself",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_shim_rejects_what_metal_rejects(case):
    body, header, message = INVALID[case]
    with pytest.raises(ms.ShimError, match="compilation failed") as err:
        _run(body, header)
    assert message in str(err.value), str(err.value)


VALID = {
    # (body, expected y)
    "thread pointer": ("float loc[2] = {1, 2}; thread float* p = loc; y[0] = p[1]; y[1] = x[3];", [2, 3]),
    "deduced pointers": ("auto p = x + 1; auto q = s + 1; y[0] = p[0]; y[1] = q[0];", [1, 2]),
    "threadgroup pointer": (
        "threadgroup float buf[4]; threadgroup float* t = buf; t[0] = x[5]; y[0] = buf[0]; y[1] = t[0];",
        [5, 5],
    ),
    "constant pointer and reference": (
        "const constant float* c = s; const constant float& r = s[1]; y[0] = c[0]; y[1] = r;",
        [1, 2],
    ),
    "half read from constant memory": ("half a = h[0]; y[0] = a; y[1] = float(h[1]) + 1;", [0.5, 2.5]),
    "lambda and inheritance (both in MSL)": (
        "struct A { float a; }; struct B : A { float b; }; B v; v.a = 2; v.b = 3;"
        "auto f = [&](float t) { return t * v.a + v.b; }; y[0] = f(x[1]); y[1] = v.b;",
        [5, 3],
    ),
    "threadgroup scalar and two arrays in one declaration": (
        "threadgroup float total; threadgroup float a[2], b[3]; a[1] = 4; b[2] = 5; total = a[1] + b[2];"
        "y[0] = total; y[1] = b[2];",
        [9, 5],
    ),
}


@pytest.mark.parametrize("case", list(VALID))
def test_shim_accepts_valid_metal(case):
    body, expect = VALID[case]
    np.testing.assert_array_equal(_run(body), np.array(expect, np.float32))


def test_signature_matches_mlx_write_signature():
    # MLX v0.32.1, mlx/backend/common/metal_kernel.cpp, write_signature and metal_kernel():
    # arrays of fewer than max_constant_array_size = 8 elements are `const constant T*`,
    # 0-d ones `const constant T&`, the rest `const device T*`; name_shape follows its
    # array when the body mentions it; outputs `device T*`; attributes with MLX's types;
    # kernel name "custom_kernel_" + name + "_" + make_template_hash(write_template(...))
    # + per input "_" + type (+ "s" for 0-d, "c" for constant) + per output "_" + type.
    body = "uint3 p = thread_position_in_grid; y[p.x] = x[p.x] * s[0] + T + x_shape[0];"
    inputs = [("x", "float32", 1, 16), ("s", "float32", 1, 4), ("T", "int32", 0, 1)]
    cpp = ms.generate_source("k", inputs, ["y"], ["float32"], body, "", [("N", 3), ("Flag", True), ("InT", "bfloat16")])
    sig = cpp.split('#line 1 "k.signature"\n', 1)[1].split('#line 1 "k.metal"', 1)[0]
    template_line, rest = sig.split("\n", 1)
    assert template_line == "template <int N, bool Flag, typename InT>"
    name, params = re.match(r"void (\w+)\(\s*(.*)\) \{\s*$", rest, re.S).groups()
    assert name == "custom_kernel_k__3_1_bfloat16_t_float_floatc_int32_ts_float"
    expected = [  # MLX's lines without the [[buffer(i)]] / [[attribute]] annotations
        "const device float* x",
        "const constant int* x_shape",
        "const constant float* s",
        "const constant int32_t& T",
        "device float* y",
        "uint3 thread_position_in_grid",
    ]
    assert [p.strip() for p in params.split(",\n")] == expected
    # and it builds and runs: y = x * s[0] + T + x_shape[0] = x * 1 + 3 + 16
    out = ms.run_metal_body(body, {"x": X, "s": S, "T": 3}, [("y", (16,), np.float32)], (16, 1, 1), (16, 1, 1))
    np.testing.assert_array_equal(out["y"], X + 19)


def test_attribute_table_matches_mlx():
    # MLX v0.32.1, mlx/backend/common/metal_kernel.cpp, metal_kernel(): metal_attributes.
    mlx_attributes = [
        ("dispatch_quadgroups_per_threadgroup", "uint"),
        ("dispatch_simdgroups_per_threadgroup", "uint"),
        ("dispatch_threads_per_threadgroup", "uint3"),
        ("grid_origin", "uint3"),
        ("grid_size", "uint3"),
        ("quadgroup_index_in_threadgroup", "uint"),
        ("quadgroups_per_threadgroup", "uint"),
        ("simdgroup_index_in_threadgroup", "uint"),
        ("simdgroups_per_threadgroup", "uint"),
        ("thread_execution_width", "uint"),
        ("thread_index_in_quadgroup", "uint"),
        ("thread_index_in_simdgroup", "uint"),
        ("thread_index_in_threadgroup", "uint"),
        ("thread_position_in_grid", "uint3"),
        ("thread_position_in_threadgroup", "uint3"),
        ("threadgroup_position_in_grid", "uint3"),
        ("threadgroups_per_grid", "uint3"),
        ("threads_per_grid", "uint3"),
        ("threads_per_simdgroup", "uint"),
        ("threads_per_threadgroup", "uint3"),
    ]
    assert [(n, t) for n, t, _ in ms._ATTRIBUTES] == mlx_attributes


def test_input_address_space_follows_mlx():
    assert ms.input_address_space(0, 1) == "constant"
    assert [ms.input_address_space(1, n) for n in (1, 7, 8, 100)] == ["constant", "constant", "device", "device"]
