"""Serving: conversations and the OpenAI-compatible HTTP server.

| module | holds |
| --- | --- |
| ``chat_session`` | prompts from messages, the prompt-cache pool, :class:`ChatEngine`, :class:`ChatSession` |
| ``reply`` | the reply parser: reasoning, answer text, tool calls |
| ``protocol`` | the OpenAI wire format: pydantic request and response models, checks across fields |
| ``structured`` | ``response_format`` and forced ``tool_choice`` as grammars for the engine |
| ``responses`` | the Responses API: input items, output items and events, the response store |
| ``worker`` | the model thread that runs the batch engine; the state handlers share |
| ``http`` | the HTTP server (FastAPI on uvicorn): routes, SSE, the API key, body limits |
| ``metrics`` | ``GET /metrics`` in Prometheus' text format |
"""
