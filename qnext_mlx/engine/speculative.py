"""Speculative decoding with the model's own MTP head (multi-token prediction).

Qwen3-Next ships one extra decoder layer (``mtp.*``) that predicts token t+2 from
the final hidden state h_t and token t+1. Each decode *step* here:

1. **Drafts** K tokens (1..4) with the MTP head: the first from the pairs not yet
   in the MTP KV cache, the last of which is ``(h_{M-1}, y)`` (y: the sampled but
   not yet processed token); each further draft applies the MTP layer again to
   its own output hidden state and the previous draft (as vLLM and SGLang do).
2. **Verifies** them in one forward pass of the main model over ``[y, d_1..d_K]``
   (K+1 tokens), keeping every token's DeltaNet conv and recurrent state
   (``capture_steps``, see ``GatedDeltaNet.__call__``).
3. **Accepts** a prefix: greedy, the longest prefix that matches the argmax;
   sampling, the standard rule (accept d_i with probability min(1, p_i(d_i)/q_i(d_i)),
   on rejection sample from the residual ``max(p_i - q_i, 0)``, after K
   acceptances sample a bonus token from p_K), so the output is distributed
   exactly as plain sampling with the same settings and logits processors.
   Both p and q are the distributions mlx-lm's sampler draws from
   (:func:`~qnext_mlx.engine.sampling.sampling_distribution`).
4. **Rolls back** the rejected tail without recomputation: DeltaNet layers take
   the per-token states of the verify pass, attention layers trim their KV, the
   MTP KV cache drops the entries built on draft hidden states.

MTP cache convention (as vLLM and :meth:`Model.mtp_forward`): the pair
``(h_i, t_{i+1})`` sits at MTP position i, h_i being the main model's final
normed hidden state. The MTP cache holds the pair of every position whose h_i
and t_{i+1} have both been seen: the prompt's pairs are fed during prefill
(checkpoints included), those of accepted tokens at the start of the next step.
A cache resumed at offset c whose MTP part lags (a prompt cache made without
MTP, or the end of a previous reply, whose last pair needed the then unknown
next token) gets the missing pairs with a stand-in hidden state (the first one
computed in this run). That only changes draft quality, never the output.

What is exact: the main model's caches after a partially accepted step hold
the same arrays as after feeding the accepted tokens through the model in the
verify pass (slices of its per-token states, trimmed KV); on MLX's CPU backend
a forward pass over K+1 tokens gives bit-identical per-row results to K+1
single-token passes, so greedy MTP output equals plain greedy output token for
token and the caches equal a plain token-by-token run (``tests/test_speculative.py``).
On a GPU the batched matmuls may round differently from single-row ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from ..kernels import candidates
from .primitives import StopCheck, eval_cache, forward, generation_stream, prefill
from .sampling import LogitsProcessor, sampling_distribution

MAX_DRAFT_TOKENS = 4
# Drafts per step when not asked (see scripts/bench_mtp.py for the measurements).
DEFAULT_NUM_DRAFT_TOKENS = 2


# ------------------------------------------------------------------ defaults
def mtp_available(model) -> bool:
    """True when ``model`` has an MTP head."""
    return bool(getattr(model, "has_mtp", False))


# Whether MTP decoding is on by default, per device type (see mtp_default): True, False,
# or None: decided on the machine by a short timed trial (qnext_mlx.engine.mtp_trial).
MTP_BY_DEFAULT = {"gpu": None, "cpu": False}
# The name of the trial's op in qnext_mlx.kernels.candidates (registered by mtp_trial).
MTP_TRIAL_OP = "mtp_default"


def mtp_default(model, device=None) -> bool:
    """Whether generation uses MTP drafts when not told: the model has an MTP head
    and speculative decoding is faster on the backend (``device``, default MLX's
    default device), per :data:`MTP_BY_DEFAULT`.

    - CPU backend: off, by measurement (``scripts/bench_mtp.py``,
      ``scripts/results/bench-mtp-demo.json``): on the demo model (greedy, 256 tokens)
      MTP runs at 0.97x, 0.90x and 0.80x plain decoding for K = 1, 2, 3 by wall clock
      (1.02x, 0.99x, 0.90x by CPU seconds) although 78%, 67% and 56% of the drafts are
      accepted: there a forward pass costs in proportion to its tokens (the matmuls, the
      token-by-token DeltaNet recurrence), so verifying K+1 tokens is not much cheaper
      than decoding them, and the MTP layer comes on top.
    - GPU (Metal, CUDA): measured on the user's machine, once per model shape and
      machine: the first call times plain and MTP greedy decoding of the same short
      prompt (:mod:`qnext_mlx.engine.mtp_trial`; each path warmed up first) and keeps
      the faster; the decision is cached on disk with the kernel decisions
      (:mod:`qnext_mlx.kernels.candidates`; ``python -m qnext_mlx.doctor`` shows it).
      Asked about a GPU while MLX's default device is not one, it says off.
    """
    if not mtp_available(model):
        return False
    device = device or mx.default_device()
    kind = device.type if isinstance(device, mx.Device) else device  # a Device or a DeviceType
    rule = MTP_BY_DEFAULT.get("gpu" if kind == mx.DeviceType.gpu else "cpu", False)
    if rule is not None:
        return bool(rule)
    trial = candidates.registered().get(MTP_TRIAL_OP)
    if trial is None or not trial.backend.available():
        return False
    decision, _ = candidates.decide(trial, model)
    return decision.choice == "mtp"


# ------------------------------------------------------------------- sampling
@dataclass
class SpeculativeStats:
    """Counters of one speculative generation.

    ``steps``: verify passes with at least one draft; ``drafted`` / ``accepted``:
    draft tokens proposed / accepted; ``from_draft``: whether the token yielded
    last was an accepted draft.
    """

    num_draft_tokens: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    from_draft: bool = False

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / proposed drafts (0 before any)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verify pass: accepted drafts + the token the
        verification adds (vLLM's "mean acceptance length"); 1 = no gain."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


@dataclass
class MTPDecoding:
    """Settings of a speculative generation: drafts per step and the sampling
    settings (which must be known as numbers, not as a sampler function, to build
    the distributions). ``temp == 0`` is greedy. ``stats`` is filled while decoding.
    """

    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    def __post_init__(self):
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be in 1..{MAX_DRAFT_TOKENS}, got {self.num_draft_tokens}")


def accept_drafts(
    target: mx.array, draft: Optional[mx.array], drafts: mx.array, greedy: bool
) -> Tuple[mx.array, mx.array]:
    """Speculative acceptance on the device (any leading batch axes ``...``).

    Args:
        target: ``[..., K+1, vocab]``: greedy, the target log-probabilities; sampling,
            the target distributions p_0..p_K (p_i is the distribution of the token
            after ``i`` drafts).
        draft: ``[..., K, vocab]`` the distributions q_1..q_K the drafts were drawn
            from (None when greedy).
        drafts: ``[..., K]`` the draft tokens d_1..d_K.
    Returns:
        ``(n, tokens)``: ``n [...]`` the number of accepted drafts, and
        ``tokens [..., K+1]`` where ``tokens[n]`` is the token that follows them: the
        target's argmax (greedy), else a draw from the residual
        ``max(p_n - q_{n+1}, 0)`` after a rejection or from p_K after K acceptances.
    """
    k = drafts.shape[-1]
    batch = target.shape[:-2]
    if greedy:
        tokens = mx.argmax(target, axis=-1)
        match = tokens[..., :k] == drafts
    elif k == 0:
        return mx.zeros(batch, dtype=mx.int32), mx.random.categorical(mx.log(target))
    else:
        idx = drafts[..., None]
        p_d = mx.take_along_axis(target[..., :k, :], idx, axis=-1)[..., 0]
        q_d = mx.take_along_axis(draft, idx, axis=-1)[..., 0]
        u = mx.random.uniform(shape=q_d.shape)
        match = u * q_d < p_d  # u < p/q, with q(d) > 0 as d was drawn from q
        residual = mx.maximum(target[..., :k, :] - draft, 0.0)
        # p == q to the last bit leaves no residual, and a rejection is then impossible
        # up to rounding: fall back to p itself
        residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, target[..., :k, :])
        rows = mx.concatenate([residual, target[..., k:, :]], axis=-2)
        tokens = mx.random.categorical(mx.log(rows))
    if k == 0:
        return mx.zeros(batch, dtype=mx.int32), tokens
    return mx.cumprod(match.astype(mx.int32), axis=-1).sum(axis=-1), tokens


# ------------------------------------------------------------------ MTP cache
def _mtp_offset(cache) -> int:
    return cache.mtp[0].offset


class _MTPFeed:
    """Keeps the MTP KV cache holding the pairs ``(h_i, t_{i+1})`` of the processed tokens.

    ``hidden`` holds the main model's hidden states of the positions from the MTP
    cache's offset on (``gap`` stand-in positions first, see the module doc).
    """

    def __init__(self, model, cache, known: List[int], step_size: int):
        self.model, self.cache, self.known, self.step_size = model, cache, known, step_size
        m, c = _mtp_offset(cache), cache.offset
        if m > c:  # e.g. a KV-only cache trimmed for reuse
            for x in cache.mtp:
                x.trim(m - c)
        self.gap = c - min(m, c)
        self.hidden: List[mx.array] = []

    @property
    def offset(self) -> int:
        return _mtp_offset(self.cache)

    def pending(self) -> int:
        """Positions whose hidden state is known but whose pair is not in the MTP cache."""
        return self.gap + sum(h.shape[1] for h in self.hidden)

    def add(self, h: mx.array) -> None:
        """Hidden states ``[1, n, hidden]`` of the next n processed positions."""
        self.hidden.append(h)

    def drop_last(self, n: int) -> None:
        """Forget the hidden states of the last ``n`` positions (rolled back)."""
        if n <= 0:
            return
        h = mx.concatenate(self.hidden, axis=1) if len(self.hidden) > 1 else self.hidden[0]
        keep = h.shape[1] - n
        self.hidden = [h[:, :keep]] if keep > 0 else []

    def _take(self, n: int) -> mx.array:
        h = mx.concatenate(self.hidden, axis=1) if len(self.hidden) > 1 else self.hidden[0]
        if self.gap:
            stand_in = mx.broadcast_to(h[:, :1], (h.shape[0], self.gap, h.shape[2]))
            h = mx.concatenate([stand_in, h], axis=1)
            self.gap = 0
        self.hidden = [h[:, n:]] if h.shape[1] > n else []
        return h[:, :n]

    def run(self, n: int) -> Optional[Tuple[mx.array, mx.array]]:
        """Feed the next ``n`` pending pairs (their next tokens must be in ``known``)
        into the MTP cache; returns the MTP ``(logits, hidden)`` of the last one
        (``[1, 1, vocab]``, ``[1, 1, hidden]``), or None for ``n == 0``."""
        if n <= 0:
            return None
        start = self.offset
        if start + n >= len(self.known):
            raise ValueError("an MTP pair needs the token that follows it")
        h = self._take(n)
        offsets = [c.offset for c in self.cache.mtp]
        try:
            out = None
            for s in range(0, n, self.step_size):
                e = min(n, s + self.step_size)
                ids = mx.array(self.known[start + 1 + s : start + 1 + e], dtype=mx.int32)[None]
                out = self.model.mtp_forward(h[:, s:e], ids, cache=self.cache.mtp, return_hidden=True)
        except BaseException:  # leave the MTP cache as it was
            for c, o in zip(self.cache.mtp, offsets):
                c.trim(c.offset - o)
            raise
        logits, hidden = out
        return logits[:, -1:], hidden[:, -1:]

    def trim(self, n: int) -> None:
        """Drop the last ``n`` MTP cache entries (those built on draft hidden states)."""
        if n > 0:
            for c in self.cache.mtp:
                c.trim(n)


# -------------------------------------------------------------- state capture
def _capture_on(cache) -> List[ArraysCache]:
    layers = [c for c in cache if isinstance(c, ArraysCache)]
    for c in layers:
        c.capture_steps = True
    return layers


def _capture_off(layers: Sequence[ArraysCache]) -> List[Tuple[ArraysCache, Tuple[mx.array, mx.array]]]:
    out = []
    for c in layers:
        c.capture_steps = False
        steps = c.__dict__.pop("steps", None)
        if steps is not None:
            out.append((c, steps))
    return out


def verify_forward(model, cache, ids: mx.array):
    """``model(ids [1, T], cache)`` keeping every token's DeltaNet state.

    Returns ``(logits [1, T, vocab], hidden [1, T, hidden], captured)``; ``captured``
    is what :func:`rollback` takes. Nothing is evaluated.
    """
    layers = _capture_on(cache)
    try:
        logits, hidden = model(ids, cache=cache, return_hidden=True)
    finally:
        captured = _capture_off(layers)
    return logits, hidden, captured


def rollback(cache, captured, base: int, keep: int) -> None:
    """Put ``cache`` in the state after the first ``keep`` tokens of a verify pass
    that started at offset ``base``.

    Args:
        captured: ``[(layer cache, (conv_in [B, K-1+T, C], states [B, T, Hv, Dv, Dk]))]``
            from the verify pass (the DeltaNet layers).
        keep: 1..T tokens to keep.
    """
    for c, (conv_in, states) in captured:
        width = conv_in.shape[1] - states.shape[1]  # conv kernel - 1
        c[0] = conv_in[:, keep : keep + width]
        c[1] = states[:, keep - 1]
    cache.trim_kv(cache.offset - (base + keep))


# ------------------------------------------------------------------ decoding
def speculative_generate_tokens(
    model,
    cache,
    prompt: Sequence[int],
    *,
    decoding: MTPDecoding,
    max_tokens: int,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prefill_step_size: int = 2048,
    progress: Optional[bool] = None,
    checkpoint_at: Sequence[int] = (),
    should_stop: Optional[StopCheck] = None,
    keep_last_unfed: bool = False,
) -> Iterator[Tuple[int, mx.array]]:
    """The MTP counterpart of :func:`qnext_mlx.engine.decode.generate_tokens` (same
    contract): yields ``(token, logprobs [vocab])`` for up to ``max_tokens`` tokens.

    The cache must hold a prefix of ``prompt``; the rest is prefilled (MTP head
    included), with checkpoints as in ``generate_tokens``. When the loop ends (or is
    closed) the cache holds exactly prompt + the yielded tokens. ``logprobs`` are
    the target model's normalised log-probabilities after the logits processors,
    as in plain decoding. ``decoding.stats`` counts drafts and acceptances.
    ``should_stop`` fires between prefill chunks as there: nothing is yielded and
    the cache (MTP part included: each chunk's pairs are fed with it) holds the
    prompt prefix processed so far.

    ``keep_last_unfed``: when the caller closes the generator, leave the last yielded
    token out of the cache (it then holds prompt + the yielded tokens but the last),
    so that a caller taking the sequence over (the batch engine) feeds it itself.
    """
    if not mtp_available(model):
        raise ValueError("this model has no MTP head (no mtp.* tensors); decode without MTP")
    prompt = list(prompt)
    if cache.offset >= len(prompt):
        raise ValueError(f"the cache already holds {cache.offset} tokens of a {len(prompt)}-token prompt")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    K = decoding.num_draft_tokens
    greedy = decoding.temp == 0
    stats = decoding.stats
    stats.num_draft_tokens = K
    processors = list(logits_processors or [])
    stream = generation_stream
    known = list(prompt)  # every token fed to the model or sampled
    feed = _MTPFeed(model, cache, known, prefill_step_size)
    history = mx.array(prompt, dtype=mx.int32) if processors else None

    def logprobs_of(logits: mx.array, hist: Optional[mx.array]) -> mx.array:
        """``[1, vocab]`` logits -> processed, normalised log-probabilities ``[1, vocab]``."""
        for processor in processors:
            logits = processor(hist, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def distribution(lp: mx.array) -> mx.array:
        return sampling_distribution(lp, decoding.temp, decoding.top_p, decoding.top_k, decoding.min_p)

    def sample(lp: mx.array) -> Tuple[mx.array, Optional[mx.array]]:
        """Token ``[1]`` (and its distribution ``[1, vocab]`` when sampling)."""
        if greedy:
            return mx.argmax(lp, axis=-1).astype(mx.int32), None
        q = distribution(lp)
        return mx.random.categorical(mx.log(q)).astype(mx.int32), q

    def on_prefill_hidden(h: mx.array) -> None:
        feed.add(h)
        feed.run(feed.pending())  # every prompt position but the last has its next token

    # ------------------------------------------------------------ prefill
    with mx.stream(stream):
        for stop in sorted(set(checkpoint_at)) + [len(prompt) - 1]:
            if cache.offset < stop <= len(prompt) - 1:
                if not prefill(
                    model,
                    cache,
                    prompt[cache.offset : stop],
                    prefill_step_size,
                    progress,
                    on_hidden=on_prefill_hidden,
                    should_stop=should_stop,
                ):
                    return
                cache.keep_checkpoint()
        logits, h = forward(model, cache, mx.array([prompt[-1:]], dtype=mx.int32), return_hidden=True)
        feed.add(h)
        lp = logprobs_of(logits[:, -1], history)
        y_arr, _ = sample(lp)
        mx.eval(y_arr, lp)
    y: Optional[int] = y_arr.item()  # sampled, not yet fed to the model
    known.append(y)
    if processors:
        history = mx.concatenate([history, mx.array([y], dtype=mx.int32)])

    n = 0  # tokens yielded
    last = None  # (captured states, base offset, kept tokens, tokens emitted) of the last step
    in_step = 0  # tokens of the last step yielded so far

    def finish(feed_last: bool = True) -> None:
        """Bring the cache to exactly prompt + yielded tokens (closed in the middle
        of a step: roll back the accepted drafts not yielded; the last yielded token
        is fed), or with ``feed_last=False`` to prompt + the yielded tokens but the last,
        and give the MTP cache the pairs whose next token is known."""
        nonlocal y
        with mx.stream(stream):
            if last is not None and in_step < last[3]:
                captured, base, kept, n_out = last
                del known[len(known) - (n_out - in_step) :]
                y = None  # a pending token is the step's last one, not yielded
                keep = in_step + 1 if feed_last else in_step  # tokens of the verify pass that stay
                if keep < kept:
                    rollback(cache, captured, base, keep)
                    feed.drop_last(kept - keep)
            elif not feed_last and y is None and last is not None:
                # the last yielded token went through the verify pass: take it out again
                captured, base, kept, _ = last
                rollback(cache, captured, base, kept - 1)
                feed.drop_last(1)
            if y is not None and feed_last:
                _, h_last = forward(model, cache, mx.array([[y]], dtype=mx.int32), return_hidden=True)
                feed.add(h_last)
            y = None
            feed.run(min(feed.pending(), len(known) - 1 - feed.offset))
            eval_cache(cache)

    try:
        stats.from_draft = False
        yield known[-1], lp.squeeze(0)
        n = 1
        while n < max_tokens:
            remaining = max_tokens - n
            k = min(K, remaining - 1)  # no draft beyond max_tokens
            base = cache.offset
            snap = cache.snapshot()
            try:
                with mx.stream(stream):
                    drafts: List[mx.array] = []
                    draft_q: List[mx.array] = []
                    hists = [history]  # history for the verify rows 0..k
                    if k:
                        d_logits, g = feed.run(feed.pending())  # ends with the pair (h_{M-1}, y)
                        for i in range(k):
                            if i:
                                d_logits, g = model.mtp_forward(
                                    g, drafts[-1][None], cache=cache.mtp, return_hidden=True
                                )
                            d, q = sample(logprobs_of(d_logits[:, -1], hists[-1]))
                            drafts.append(d)
                            draft_q.append(q)
                            if processors:
                                hists.append(mx.concatenate([hists[-1], d]))
                        # the device computes the drafts while the verify graph is built
                        mx.async_eval(drafts)
                    ids = mx.concatenate([mx.array([y], dtype=mx.int32)] + drafts)[None]
                    logits, hidden, captured = verify_forward(model, cache, ids)
                    if processors:
                        lps = mx.concatenate([logprobs_of(logits[:, i], hists[i]) for i in range(k + 1)])
                    else:
                        lps = logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)
                    d_arr = mx.concatenate(drafts) if k else mx.zeros((0,), dtype=mx.int32)
                    if greedy:
                        n_acc, out = accept_drafts(lps, None, d_arr, True)
                    else:
                        q = mx.concatenate(draft_q) if k else None
                        n_acc, out = accept_drafts(distribution(lps), q, d_arr, False)
                    mx.eval(n_acc, out, d_arr, lps)
            except BaseException:
                cache.restore(snap)
                raise
            del snap
            j = n_acc.item()
            emitted = d_arr[:j].tolist() + [out[j].item()]
            n_out = min(len(emitted), remaining)
            kept = min(n_out, j) + 1  # tokens of the verify pass that stay in the cache: y + drafts
            with mx.stream(stream):
                if kept < k + 1:
                    rollback(cache, captured, base, kept)
                if k:
                    feed.trim(k - 1)  # MTP entries built on draft hidden states
                feed.add(hidden[:, :kept])
            if k:
                stats.steps += 1
                stats.drafted += k
                stats.accepted += j
            y = emitted[j] if n_out == j + 1 else None
            known.extend(emitted[:n_out])
            if processors:
                history = mx.concatenate([history, mx.array(emitted[:n_out], dtype=mx.int32)])
            last = (captured, base, kept, n_out)
            for i in range(n_out):
                in_step = i + 1
                stats.from_draft = i < j
                n += 1
                yield emitted[i], lps[i]
            if n % 256 < n_out:
                mx.clear_cache()
        finish()
    except GeneratorExit:
        finish(feed_last=not keep_last_unfed)
        raise
