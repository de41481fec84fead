"""Serving: conversations and the OpenAI-compatible HTTP server.

| module | holds |
| --- | --- |
| ``chat_session`` | prompts from messages, the prompt-cache pool, :class:`ChatEngine`, :class:`ChatSession` |
| ``reply`` | the reply parser: reasoning, answer text, tool calls |
| ``protocol`` | the OpenAI wire format: request validation, response bodies |
| ``http`` | the HTTP server: the model worker thread, handlers, limits |
"""
