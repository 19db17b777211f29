"""`llmpipe generate` and `llmpipe chat` as a user runs them: real processes on a model trained a few
steps; chat through a pseudo-terminal, with a real SIGINT during a reply."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def llmpipe(project: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMPIPE_PROJECT": str(project)}
    return subprocess.run([sys.executable, "-m", "llmpipe.cli", *args], cwd=project, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


class Terminal:
    """A process on a pseudo-terminal: what it prints is read back with expect()."""

    def __init__(self, project: Path, *args: str):
        self.master, slave = os.openpty()
        env = {**os.environ, "LLMPIPE_PROJECT": str(project), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "llmpipe.cli", *args], cwd=project, env=env,
                                     stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen = ""  # everything printed so far
        self.closed = False  # the process has closed its end: nothing more will come
        self.read_to = 0  # expect() searches from here

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern, re.S).search(self.seen, self.read_to)
            if found:
                self.read_to = found.end()
                return found
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise AssertionError(f"{pattern!r} never came; the terminal showed:\n{self.seen}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode("utf-8", errors="replace")
                except OSError:  # EIO: every process holding the terminal has exited
                    self.closed = True

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        os.close(self.master)


def _signal_masks(pid: int) -> str:
    """SigBlk/SigIgn/SigCgt of a process (hex bit masks; SIGINT is bit 1, value 0x2)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_generate_streams_one_prompt_and_batches_several(served_project):
    one = llmpipe(served_project, "generate", "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "12")
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() and "finish=length prompt_tokens=" in one.stderr and "completion_tokens=12" in one.stderr
    again = llmpipe(served_project, "generate", "--prompts-file", "-", "--temperature", "0", "--max-new-tokens", "12",
                    stdin="To be\nhello there\n")
    assert again.returncode == 0, again.stderr
    blocks = re.split(r"--- \d/2: .*\n", again.stdout)
    assert again.stdout.startswith("--- 1/2: To be\n") and "--- 2/2: hello there\n" in again.stdout
    assert blocks[1] == one.stdout  # in a batch, the same greedy text as alone


def test_generate_with_a_draft_model_gives_the_same_greedy_text(served_project):
    args = ("generate", "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "12")
    plain, drafted = llmpipe(served_project, *args), llmpipe(served_project, *args, "--draft", "pretrain")
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and plain.stdout.strip()
    assert "draft_acceptance=1.00" in drafted.stderr and "draft_acceptance" not in plain.stderr


def test_generate_refuses_what_a_user_can_fix_with_an_error_line(served_project, tmp_path):
    too_long = llmpipe(served_project, "generate", "--prompt", "hi", "--max-new-tokens", "5000")
    assert too_long.returncode == 1 and "Error: prompt 1 of 1:" in too_long.stderr
    assert "max_new_tokens 5000 exceed the model's max_seq_len 2048" in too_long.stderr
    assert "Traceback" not in too_long.stderr
    nothing = llmpipe(served_project, "generate")
    assert nothing.returncode == 1 and "Error: no prompt: give --prompt" in nothing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dvc.yaml").write_text("stages: {}\n")
    untrained = llmpipe(empty, "generate", "--prompt", "hi")
    assert untrained.returncode == 1 and "no trained model yet" in untrained.stderr


def test_chat_streams_replies_keeps_the_session_through_ctrl_c_and_exits_cleanly(served_project):
    # a model trained on text without special tokens rarely ends a reply itself: a reply runs long,
    # long enough (seconds) that the interrupt lands inside it even when this process is slow to read
    term = Terminal(served_project, "chat", "--temperature", "0.8", "--top-k", "20", "--seed", "1",
                    "--max-new-tokens", "1500")
    try:
        term.expect(r"/reset clears the history.*\n")
        term.expect(r"you> ")
        term.send("hello")
        reply = term.expect(r"bot> (.+?)\r?\nyou> ").group(1)
        assert reply.strip()
        term.send("tell me a long story")
        term.expect(r"bot> .")  # the reply is streaming
        signals = _signal_masks(term.proc.pid)  # read before the signal, shown if it is not acted on
        os.kill(term.proc.pid, signal.SIGINT)
        try:
            term.expect(r"\(reply stopped; it and your message were left out of the history\)\r?\nyou> ")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe chat process's signal masks before SIGINT: {signals}") from None
        assert term.proc.poll() is None
        term.send("/reset")  # the first exchange survived the interrupt; the stopped one did not
        term.expect(r"\(history cleared: 2 messages\)\r?\nyou> ")
        term.send("hello")  # after a reset, the same message gets the same (seeded) reply
        assert term.expect(r"bot> (.+?)\r?\nyou> ").group(1) == reply
        term.send("/exit")
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()
