"""The engine: from a prompt and a cache to a stream of tokens and text.

| module | holds |
| --- | --- |
| ``batch`` | the continuous-batching engine: one step loop over every request |
| ``batch_cache`` | the running sequences' states stacked on the batch axis |
| ``prefix_cache`` | snapshots reused across requests and conversation turns |
| ``primitives`` | all-or-nothing forward passes, chunked prefill, mlx-lm's generation stream |
| ``sampling`` | sampling settings, penalties, logit bias, the distribution the sampler draws from |
| ``constraint`` | structured outputs: an llguidance grammar as a per-sequence token mask |
| ``decode`` | the one-sequence decode loop (:func:`generate_tokens`), pipelined one step ahead |
| ``speculative`` | MTP speculative decoding: drafts, one verify pass, exact rollback, the default rule |
| ``mtp_trial`` | the timed trial that decides the MTP default on a GPU backend |
| ``text`` | prompt formatting, stop strings, the think filter |
| ``stream`` | :func:`stream_generate` / :func:`generate` (one prompt); :func:`batch_generate` / :func:`stream_batch` |
| ``plan`` | the memory planner |
"""

from . import mtp_trial  # noqa: F401  (registers the MTP trial with kernels.candidates)
from .batch import BatchEngine, GenerationRequest, SamplingParams
from .decode import generate_tokens
from .stream import GenerationResponse, batch_generate, generate, stream_batch, stream_generate

__all__ = [
    "BatchEngine",
    "GenerationRequest",
    "GenerationResponse",
    "SamplingParams",
    "batch_generate",
    "generate",
    "generate_tokens",
    "stream_batch",
    "stream_generate",
]
