"""Front ends people use directly.

| module | holds |
| --- | --- |
| ``terminal`` | the terminal chat (:class:`ChatREPL`) and how reasoning is shown in a terminal |
| ``desktop`` | the Tk desktop app: window, conversation store, generation thread |
| ``markdown`` | markdown -> tagged text runs (markdown-it-py), rendered block by block while streaming |
| ``catalog`` | the models on disk (demo, Hugging Face cache, added folders): size, quantization, MTP head |
"""
