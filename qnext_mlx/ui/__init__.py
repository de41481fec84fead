"""Front ends people use directly.

| module | holds |
| --- | --- |
| ``terminal`` | the terminal chat (:class:`ChatREPL`) and how reasoning is shown in a terminal |
| ``desktop`` | the Tk desktop app's window: layout, actions, shortcuts, settings dialog |
| ``transcript`` | the conversation in a Tk text widget: markdown replies while they stream, thinking, actions |
| ``markdown`` | markdown -> tagged text runs (markdown-it-py), rendered block by block while streaming |
| ``picker`` | the model picker window |
| ``catalog`` | the models on disk (demo, Hugging Face cache, added folders): size, quantization, MTP head |
| ``store`` | the app's folder, settings, conversations (saved, searched) and markdown export |
| ``worker`` | the thread that owns the model: loads (cancelable) and replies |
"""
