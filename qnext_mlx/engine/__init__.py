"""The engine: from a prompt and a cache to a stream of tokens and text.

| module | holds |
| --- | --- |
| ``primitives`` | all-or-nothing forward passes, chunked prefill, mlx-lm's generation stream |
| ``sampling`` | sampling settings, penalties, the distribution the sampler draws from |
| ``decode`` | the decode loop (:func:`generate_tokens`), pipelined one step ahead |
| ``speculative`` | MTP speculative decoding: drafts, one verify pass, exact rollback |
| ``text`` | prompt formatting, stop strings, the think filter |
| ``stream`` | :func:`stream_generate` / :func:`generate`: reuse, detokenization, stats |
| ``plan`` | the memory planner |
"""

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
