"""Interactive chat: a session that keeps the history, and the terminal loop of `llmpipe chat`.

Every turn is rendered with the tokenizer's own chat template (`Tokenizer.apply_chat_template`:
`<|role|> content <|end|>` per message, then `<|assistant|>`), and the reply ends at the model's
`<|end|>` (or eos), a stop string, or max_new_tokens.

History that no longer fits the context is dropped from the oldest exchange on (a system message,
if any, stays), so a long conversation keeps going; a single message too long for the context is a
UserError. Ctrl-C during a reply stops it and DROPS the partial reply together with the message that
asked for it: the history stays what it was before that turn, so the next message continues from
the last complete exchange (a half reply in the history would teach the model to trail off).
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace
from typing import Callable, TextIO

from llmpipe.errors import UserError
from llmpipe.serve.engine import Completion, Engine
from llmpipe.serve.sampling import SamplingParams

COMMANDS = "/reset clears the history, /exit quits (or Ctrl-D); Ctrl-C stops a reply"


class ChatSession:
    def __init__(self, engine: Engine, params: SamplingParams = SamplingParams(), system: str | None = None,
                 stop: list[str] | tuple[str, ...] = ()):
        self.engine, self.params, self.stop = engine, params, list(stop)
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict[str, str]] = []  # user and assistant messages, oldest first

    def reset(self) -> int:
        """Forget the conversation; returns how many messages were dropped."""
        dropped, self.history = len(self.history), []
        return dropped

    def send(self, text: str, on_delta: Callable[[str], None] | None = None) -> Completion:
        """The assistant's reply to `text`, streamed to on_delta; history grows only once it completes
        (KeyboardInterrupt or an error leave it unchanged)."""
        turn = {"role": "user", "content": text}
        history, ids = self._fit([*self.history, turn])
        params = replace(self.params, max_new_tokens=min(self.params.max_new_tokens,
                                                         self.engine.max_seq_len - len(ids)))
        tok = self.engine.tokenizer
        [reply] = self.engine.generate([ids], params, stop=self.stop, end_ids=[tok.end_of_turn_id],
                                       on_delta=None if on_delta is None else lambda row, delta: on_delta(delta))
        self.history = [*history, {"role": "assistant", "content": reply.text}]
        return reply

    def _fit(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[int]]:
        """(the messages kept, the prompt ids): drop the oldest exchanges until the prompt leaves room
        for a reply of a useful length (a quarter of the context, or max_new_tokens if smaller)."""
        tok, context = self.engine.tokenizer, self.engine.max_seq_len
        room = min(self.params.max_new_tokens, max(context // 4, 1))
        while True:
            ids = tok.apply_chat_template([*self.system, *messages], add_generation_prompt=True)
            if len(ids) + room <= context:
                return messages, ids
            if len(messages) == 1:
                raise UserError(f"this message is {len(ids)} tokens with the chat template; the model's context is "
                                f"{context} tokens and a reply needs {room}: send a shorter message")
            messages = messages[2:] if len(messages) > 2 else messages[-1:]  # one user+assistant exchange


def run_chat(session: ChatSession, banner: str, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The terminal loop: read a line, stream the reply, until /exit or end of input."""
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write(f"{banner}\n{COMMANDS}\n")
    if threading.current_thread() is threading.main_thread():
        # a process can inherit SIGINT ignored (started in the background by a shell: `cmd &`) or
        # blocked (its parent's signal mask), and Python then never raises KeyboardInterrupt: Ctrl-C
        # must stop a reply whoever started the chat
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:  # at the prompt, like a shell: a fresh line
            write("\n")
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return
        if command == "/reset":
            write(f"(history cleared: {session.reset()} messages)\n")
            continue
        if command.startswith("/"):
            write(f"unknown command {command.split()[0]}: {COMMANDS}\n")
            continue
        _reply(session, line, write)


def _reply(session: ChatSession, line: str, write: Callable[[str], None]) -> None:
    write("bot> ")
    try:
        session.send(line, on_delta=write)
        write("\n")
    except KeyboardInterrupt:
        write("\n(reply stopped; it and your message were left out of the history)\n")
    except UserError as exc:
        write(f"\nError: {exc}\n")


__all__ = ["ChatSession", "run_chat"]
