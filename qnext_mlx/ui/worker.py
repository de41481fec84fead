"""The desktop app's generation thread: the one thread that owns the model.

The model never runs on the UI thread: the worker loads models and generates
replies, and the window polls its event queue, so it never freezes. It talks to
the model only through :class:`~qnext_mlx.serve.chat_session.ChatEngine` and
:class:`~qnext_mlx.serve.chat_session.ChatSession`. Works without a display.
"""

from __future__ import annotations

import gc
import queue
import threading
import weakref
from typing import Callable, Optional, Tuple

from ..errors import QnextError
from ..serve.chat_session import ChatEngine, ChatError, ChatSession, ReplyStats, end_mlx_thread
from .catalog import hf_repo_of

__all__ = ["GenerationWorker", "LoadEngine"]

# load_engine(model_arg) -> (engine, name); model_arg None: the bundled demo model
LoadEngine = Callable[[Optional[str]], Tuple[ChatEngine, str]]


class GenerationWorker(threading.Thread):
    """The thread that owns the model: it loads models and generates replies.

    Commands go in through :meth:`load` / :meth:`cancel_load` / :meth:`reply` /
    :meth:`stop_reply` / :meth:`shutdown` and run in order; what happens comes out on
    :attr:`events` as tuples, which the UI polls:

    ``("loading", name)``, ``("loaded", name, max_context)``, ``("load_error", message)``,
    ``("load_cancelled", name)``, ``("delta", conv_id, Delta)``, ``("done", conv_id, ReplyStats)``,
    ``("error", conv_id, message)``.

    ``load_engine(model_arg) -> (ChatEngine, name)`` builds the engine (on this thread:
    MLX arrays belong to the thread that made them). A load that fails or is
    cancelled keeps the model loaded before it.
    """

    def __init__(self, load_engine: LoadEngine):
        super().__init__(name="qnext-mlx-generation", daemon=True)
        self._load_engine = load_engine
        self._commands: "queue.Queue[tuple]" = queue.Queue()
        self.events: "queue.Queue[tuple]" = queue.Queue()
        self.engine: Optional[ChatEngine] = None
        self._cancel = threading.Event()
        self.generating = threading.Event()
        self._lock = threading.Lock()
        self._loads_requested = 0  # loads are numbered 1, 2, ... in the order asked
        self._loads_cancelled = 0  # loads numbered up to this one are cancelled
        self._served: "weakref.WeakSet[ChatSession]" = weakref.WeakSet()  # sessions given self.engine

    # ........................................................ commands
    def load(self, model: Optional[str]) -> int:
        """Load ``model`` (None: the bundled demo model) after the commands before it;
        returns the load's number."""
        with self._lock:
            self._loads_requested += 1
            n = self._loads_requested
        self._commands.put(("load", model, n))
        return n

    @property
    def loads_requested(self) -> int:
        """How many loads were asked for (the number of the last one)."""
        with self._lock:
            return self._loads_requested

    def cancel_load(self) -> None:
        """Cancel the loads asked for so far: one not started is skipped; the one
        running finishes on this thread, and its model is dropped (the previous one
        stays). Each ends with a ``load_cancelled`` event."""
        with self._lock:
            self._loads_cancelled = self._loads_requested

    def _cancelled(self, n: int) -> bool:
        with self._lock:
            return n <= self._loads_cancelled

    def reply(self, session: ChatSession, text: str, truncate_to: Optional[int] = None) -> None:
        """Generate ``session``'s reply to ``text`` (the session gets the engine and the turn).

        ``truncate_to``: first keep only the session's first ``truncate_to`` messages
        (edit a message, regenerate a reply). When nothing could be generated (the
        prompt does not fit, ...) the dropped messages are put back.
        """
        self.generating.set()
        self._commands.put(("reply", session, text, truncate_to))

    def stop_reply(self) -> None:
        self._cancel.set()

    def shutdown(self, timeout: Optional[float] = 30.0) -> None:
        self._cancel.set()
        self.cancel_load()
        self._commands.put(("quit",))
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    # ......................................................... thread
    def run(self) -> None:
        try:
            while True:
                cmd = self._commands.get()
                if cmd[0] == "quit":
                    return
                if cmd[0] == "load":
                    self._do_load(cmd[1], cmd[2])
                elif cmd[0] == "reply":
                    self._do_reply(cmd[1], cmd[2], cmd[3])
        finally:
            self.engine = None
            self._served = weakref.WeakSet()
            end_mlx_thread()

    def _do_load(self, model: Optional[str], n: int) -> None:
        name = (hf_repo_of(model) if model else None) or model or "demo model"
        if self._cancelled(n):
            self.events.put(("load_cancelled", name))
            return
        self.events.put(("loading", name))
        try:
            engine, loaded_name = self._load_engine(model)
        except QnextError as e:
            self.events.put(("load_error", str(e)))
            return
        except Exception as e:  # noqa: BLE001 - shown in the window, the app keeps running
            self.events.put(("load_error", f"{type(e).__name__}: {e}"))
            return
        if self._cancelled(n):  # cancelled while it loaded: keep the model we had
            del engine
            gc.collect()
            self.events.put(("load_cancelled", name))
            return
        # The previous model goes: no session may keep it alive.
        for session in list(self._served):
            session.engine = None
        self._served = weakref.WeakSet()
        self.engine = engine
        gc.collect()
        # a Hugging Face cache snapshot is named by its repo, not by its commit folder
        shown = (hf_repo_of(model) if model else None) or loaded_name
        self.events.put(("loaded", shown, engine.max_context))

    def _do_reply(self, session: ChatSession, text: str, truncate_to: Optional[int]) -> None:
        self._cancel.clear()
        dropped = None
        try:
            if self.engine is None:
                raise ChatError("no model is loaded (choose one with Models…)")
            session.engine = self.engine
            self._served.add(session)
            if truncate_to is not None:
                dropped = session.truncate(truncate_to)
            for item in session.send(text, cancel=self._cancel.is_set):
                if isinstance(item, ReplyStats):
                    self.events.put(("done", session.id, item))
                else:
                    self.events.put(("delta", session.id, item))
        except Exception as e:  # noqa: BLE001 - a reply failure must not end the worker
            if dropped is not None and len(session.messages) == truncate_to:
                session.messages.extend(dropped)  # nothing was generated: the conversation as it was
            self.events.put(("error", session.id, str(e) if isinstance(e, QnextError) else f"{type(e).__name__}: {e}"))
        finally:
            self.generating.clear()
