"""The first-use selection of qnext_mlx.kernels.candidates, on a Mac faked with the Metal shim.

tests/metal_helpers.py makes Metal "available", puts the shim in place of
mx.fast.metal_kernel and builds mlx-lm's own gated-delta kernels through it, so
the DeltaNet ops run every candidate for real: our kernels (metal/*.metal),
mlx-lm's ops around its kernel, and the MLX reference. A fixed timer decides
which is "fastest"; the assertions are on what was chosen, what ran, what was
written to the disk cache and read back, and on the numbers (against the
reference, and against each sequence run alone for padded batches).
"""

from __future__ import annotations

import json
import logging
from unittest import mock

import mlx.core as mx
import pytest
from metal_helpers import fake_mac, fixed_timer, ms, prefer

from qnext_mlx.errors import QnextError
from qnext_mlx.kernels import candidates
from qnext_mlx.kernels import metal_gdn as km
from qnext_mlx.kernels.registry import max_rel_err

pytestmark = pytest.mark.skipif(not ms.have_compiler(), reason=f"{ms.CXX} not found (scripts/install-test-deps.sh)")


@pytest.fixture(autouse=True)
def _clean():
    candidates.forget()
    yield
    candidates.forget()
    candidates.redo(False)


def _mixer(B=1, T=1, Hk=2, Hv=4, Dk=32, Dv=32, dtype=mx.float32, seed=0, states=False, lengths=None):
    return km.mixer_problem(B, T, Hk, Hv, Dk, Dv, dtype, seed=seed, return_all_states=states, lengths=lengths)


def _run(args, kw):
    out = km.gated_delta_decode(*args, **kw)
    mx.eval(out)
    return out


def _close(got, ref, tol=2e-6):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert max_rel_err(g, r) < tol


def _only_decision(op):
    (d,) = [d for d in candidates.decisions() if d.op == op]
    return d, {t.candidate: t for t in d.trials}


@pytest.mark.parametrize("fastest", ["qnext", "mlx-lm", "reference"])
def test_picks_the_fastest_verified_candidate(fastest):
    args, kw = _mixer(B=2, T=1, seed=1)
    ref = km.gated_delta_decode_reference(*args, **kw)
    calls = []
    with fake_mac(timer=prefer(fastest, calls)):
        out = _run(args, kw)
        again = _run(args, kw)
        d, trials = _only_decision("gdn_decode")
    assert d.choice == fastest and d.how == "measured"
    assert sorted(calls) == ["mlx-lm", "qnext", "reference"]  # each timed once, then the decision holds
    assert {t.status for n, t in trials.items() if n != fastest} == {"slower"}
    assert trials["qnext"].max_error < 1e-5 and trials["mlx-lm"].max_error < 1e-5
    _close(out, ref)
    for a, b in zip(out, again):
        assert mx.array_equal(a, b).item()
    assert "dtype=float32 weights=float32 B=2 T=1 Hk=2 Hv=4 Dk=32 Dv=32 K=4 states=False mask=False" == d.config


def test_skips_a_broken_candidate_and_one_that_fails(caplog):
    def broken(**k):  # our decode kernel, off by one in y
        kernel = ms.metal_kernel(**k)
        if k["name"] != "qnext_gdn_decode":
            return kernel

        def call(**c):
            y, *rest = kernel(**c)
            return [y + 1.0, *rest]

        return call

    import mlx_lm.models.gated_delta as gd

    args, kw = _mixer(T=2, seed=2)
    ref = km.gated_delta_decode_reference(*args, **kw)
    calls = []
    with fake_mac(broken, timer=prefer("qnext", calls)), caplog.at_level(logging.WARNING, logger=candidates.__name__):
        with mock.patch.object(gd, "gated_delta_kernel", side_effect=RuntimeError("Metal compile error")):
            out = _run(args, kw)
        d, trials = _only_decision("gdn_decode")
    assert trials["qnext"].status == "mismatch" and trials["qnext"].max_error > 1e-2
    assert trials["mlx-lm"].status == "failed" and "Metal compile error" in trials["mlx-lm"].detail
    assert d.choice == "reference" and calls == ["reference"]
    for a, b in zip(out, ref):
        assert mx.array_equal(a, b).item()
    assert "disagrees with the reference" in caplog.text and "failed to run" in caplog.text


def test_per_token_states_exclude_mlx_lm():
    # Speculative verification needs every token's state; mlx-lm's kernel has none.
    args, kw = _mixer(T=3, seed=3, states=True)
    ref = km.gated_delta_decode_reference(*args, **kw)
    with fake_mac(timer=prefer("mlx-lm")):
        out = _run(args, kw)
        d, trials = _only_decision("gdn_decode")
    assert trials["mlx-lm"].status == "unsupported" and "per-token states" in trials["mlx-lm"].detail
    assert d.choice == "qnext" or d.choice == "reference"  # the faster of the two eligible
    assert len(out) == 4
    _close(out, ref)


def test_disk_cache_on_the_second_start_and_redo(tmp_path):
    args, kw = _mixer(T=1, seed=4)
    with fake_mac(timer=prefer("mlx-lm"), cache=tmp_path):
        _run(args, kw)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("kernels-") and files[0].suffix == ".json"
    data = json.loads(files[0].read_text())
    assert data["machine"] == candidates.machine()
    assert set(data["machine"]) == {"chip", "os", "mlx", "qnext_mlx"} and data["machine"]["mlx"] == mx.__version__
    (key,) = data["decisions"]
    assert key.startswith("metal/gdn_decode/") and data["decisions"][key]["choice"] == "mlx-lm"

    def no_timing(fn, name):
        raise AssertionError("timed again on the second start")

    with fake_mac(timer=no_timing, cache=tmp_path):  # a new process: nothing in memory
        out = _run(args, kw)
        d, _ = _only_decision("gdn_decode")
    assert d.choice == "mlx-lm" and d.how == "disk cache"
    _close(out, km.gated_delta_decode_reference(*args, **kw), 1e-5)
    # Another MLX version is another machine key: measured again, in another file.
    calls = []
    with (
        fake_mac(timer=prefer("qnext", calls), cache=tmp_path),
        mock.patch.object(candidates.mx, "__version__", "9.9.9"),
    ):
        _run(args, kw)
        assert _only_decision("gdn_decode")[0].choice == "qnext"
    assert calls and len(list(tmp_path.iterdir())) == 2
    # The redo option measures again and rewrites the file.
    calls = []
    with (
        fake_mac(timer=prefer("reference", calls), cache=tmp_path),
        mock.patch.dict("os.environ", {"QNEXT_KERNELS_REDO": "1"}),
    ):
        _run(args, kw)
        assert _only_decision("gdn_decode")[0].choice == "reference"
    assert sorted(calls) == ["mlx-lm", "qnext", "reference"]
    data = json.loads(files[0].read_text())
    assert data["decisions"][key]["choice"] == "reference"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("forced", ["qnext", "mlx-lm", "reference"])
def test_override_forces_a_candidate(forced, monkeypatch):
    monkeypatch.setenv("QNEXT_KERNELS", forced)
    args, kw = _mixer(T=2, seed=5)
    with fake_mac(timer=lambda fn, name: pytest.fail("timed under an override")) as cache:
        out = _run(args, kw)
        d, _ = _only_decision("gdn_decode")
        cap_args, cap_kw = _mixer(T=2, seed=5, states=True)
        _run(cap_args, cap_kw)
        cap = [x for x in candidates.decisions() if "states=True" in x.config][0]
        assert not list(cache.iterdir())  # forced choices are not cached
    assert d.choice == forced and d.how == f"forced by QNEXT_KERNELS={forced}"
    _close(out, km.gated_delta_decode_reference(*args, **kw), 1e-5)
    if forced == "mlx-lm":  # cannot serve per-token states: the reference, and it says why
        assert cap.choice == "reference" and "cannot run here" in cap.how and "per-token states" in cap.how
    else:
        assert cap.choice == forced


def test_bad_override_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("QNEXT_KERNELS", "fastest")
    args, kw = _mixer()
    with (
        fake_mac(),
        pytest.raises(QnextError, match="QNEXT_KERNELS='fastest': expected one of qnext, mlx-lm, reference"),
    ):
        _run(args, kw)


def _alone(args, kw, row, n):
    """Sequence ``row`` run alone, without its padding (its last ``n`` positions)."""
    x, w, cs, a, b, A_log, dt_bias, state = args
    one = (x[row : row + 1, -n:], w, cs[row : row + 1], a[row : row + 1, -n:], b[row : row + 1, -n:], A_log, dt_bias)
    kw1 = {k: v for k, v in kw.items() if k != "mask"}
    return km.gated_delta_decode_reference(*one, state[row : row + 1], **kw1)


@pytest.mark.parametrize("Hk,Hv", [(2, 2), (2, 4)])
def test_prefill_runs_the_chunked_kernel_with_ragged_lengths_and_initial_state(Hk, Hv):
    T, lengths = 40, [40, 23, 17]
    args, kw = _mixer(B=3, T=T, Hk=Hk, Hv=Hv, Dk=32, Dv=16, seed=6, lengths=lengths)
    ref = km.gated_delta_decode_reference(*args, **kw)
    built = []

    def recording(**k):
        built.append(k["name"])
        return ms.metal_kernel(**k)

    with fake_mac(recording, timer=prefer("qnext")):
        out = _run(args, kw)
        d, trials = _only_decision("gdn_prefill")
    assert d.choice == "qnext" and "qnext_gdn_prefill" in built
    assert "Tmax=64" in d.config and "mask=True" in d.config
    assert trials["mlx-lm"].status == "slower" and trials["mlx-lm"].max_error < 1e-4  # its masked kernel agrees
    _close(out, ref, 2e-6)
    # The padding convention: each sequence's real tokens give what they give alone,
    # and the padded positions give 0.
    y, conv_state, state = out
    for row, n in enumerate(lengths):
        y1, cs1, s1 = _alone(args, kw, row, n)
        assert max_rel_err(y[row : row + 1, T - n :], y1) < 2e-6
        assert max_rel_err(conv_state[row : row + 1], cs1) == 0.0
        assert max_rel_err(state[row : row + 1], s1) < 2e-6
        assert (y[row, : T - n] == 0).all().item()


def test_prefill_bf16_model_shapes_and_bucket():
    args, kw = _mixer(B=1, T=37, Hk=1, Hv=2, Dk=128, Dv=128, dtype=mx.bfloat16, seed=7)
    ref = km.gated_delta_decode_reference(*args, **kw)
    with fake_mac(timer=prefer("qnext")):
        out = _run(args, kw)
        d, trials = _only_decision("gdn_prefill")
        again = km.mixer_problem(1, 60, 1, 2, 128, 128, mx.bfloat16, seed=8)
        _run(*again)  # same bucket (Tmax=64): no new decision
        assert len(candidates.decisions()) == 1
    assert d.choice == "qnext" and trials["qnext"].max_error < 3e-2 and trials["mlx-lm"].max_error < 3e-2
    assert out[0].dtype == mx.bfloat16 and out[2].dtype == mx.float32
    assert max_rel_err(out[0], ref[0]) < 3e-2 and max_rel_err(out[2], ref[2]) < 1e-4


def test_masked_decode_is_reference_or_mlx_lm():
    # The fused decode kernel takes no mask: with one, mlx-lm's masked kernel or the reference.
    args, kw = _mixer(B=2, T=4, seed=9, lengths=[4, 2])
    with fake_mac(timer=prefer("qnext")):
        out = _run(args, kw)
        d, trials = _only_decision("gdn_decode")
    assert trials["qnext"].status == "unsupported" and "mask" in trials["qnext"].detail
    assert d.choice in ("mlx-lm", "reference")
    _close(out, km.gated_delta_decode_reference(*args, **kw), 1e-5)
    y1, _, s1 = _alone(args, kw, 1, 2)
    assert max_rel_err(out[0][1:, 2:], y1) < 1e-5 and max_rel_err(out[2][1:], s1) < 1e-5


def test_doctor_samples_are_the_model_shapes():
    (dec, _), (cap, cap_kw) = km.GDN_DECODE.samples()
    assert dec[0].shape == (1, 1, 2 * 16 * 128 + 32 * 128) and dec[0].dtype == mx.bfloat16
    assert cap[0].shape[1] == 3 and cap_kw["return_all_states"]
    ((pre, _),) = km.GDN_PREFILL.samples()
    assert pre[0].shape[1] == 512


def test_status_lists_every_op_with_candidates():
    st = candidates.status()
    assert {"gdn_decode", "gdn_prefill", "moe_decode"} <= set(st)
    for name in ("gdn_decode", "gdn_prefill"):
        assert [c["name"] for c in st[name]["candidates"]] == ["qnext", "mlx-lm", "reference"]
        assert st[name]["backend"] == "metal" and st[name]["available"] is False


def test_fixed_timer_runs_the_candidate():
    ran = []
    assert fixed_timer({"a": 5.0})(lambda: ran.append(1) or mx.zeros(1), "a") == 5.0 and ran == [1]
