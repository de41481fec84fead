"""The engine: from a prompt and a cache to a stream of tokens and text.

| module | holds |
| --- | --- |
| ``primitives`` | all-or-nothing forward passes, chunked prefill, mlx-lm's generation stream |
| ``sampling`` | sampling settings, penalties, the distribution the sampler draws from |
| ``decode`` | the decode loop (:func:`generate_tokens`), pipelined one step ahead |
| ``speculative`` | MTP speculative decoding: drafts, one verify pass, exact rollback, the default rule |
| ``mtp_trial`` | the timed trial that decides the MTP default on a GPU backend |
| ``text`` | prompt formatting, stop strings, the think filter |
| ``stream`` | :func:`stream_generate` / :func:`generate`: reuse, detokenization, stats |
| ``plan`` | the memory planner |
"""

from . import mtp_trial  # noqa: F401  (registers the MTP trial with kernels.candidates)
from .decode import generate_tokens
from .stream import GenerationResponse, generate, stream_generate

__all__ = ["GenerationResponse", "generate", "generate_tokens", "stream_generate"]
