"""ChatSession: the tokenizer's chat template, history that grows only with complete replies, and the
oldest exchanges dropped when the context fills."""

from __future__ import annotations

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.serve.chat import ChatSession
from llmpipe.serve.engine import Engine
from llmpipe.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=64, n_head=4, n_kv_head=4,
                      max_seq_len=128, init_std=0.1)
    return Engine(GPT(cfg).eval(), tokenizer)


def test_a_reply_continues_the_chat_template_and_joins_the_history(engine, tokenizer):
    session = ChatSession(engine, SamplingParams(temperature=0, max_new_tokens=8), system="be brief")
    deltas: list[str] = []
    reply = session.send("hello", on_delta=deltas.append)
    template = tokenizer.apply_chat_template([{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hello"}], add_generation_prompt=True)
    [plain] = engine.generate([template], SamplingParams(temperature=0, max_new_tokens=8),
                              end_ids=[tokenizer.end_of_turn_id])
    assert reply.token_ids == plain.token_ids and reply.prompt_tokens == len(template)
    assert "".join(deltas) == reply.text
    assert session.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply.text}]
    assert session.reset() == 2 and session.history == []


def test_an_interrupted_reply_leaves_the_history_as_it_was(engine):
    session = ChatSession(engine, SamplingParams(temperature=1.0, seed=0, max_new_tokens=8))
    session.send("hello")
    before = list(session.history)
    probe = ChatSession(engine, session.params)
    probe.history = list(before)
    assert probe.send("and now?").text  # the same turn uninterrupted streams some text

    def interrupt(delta):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.send("and now?", on_delta=interrupt)
    assert session.history == before


def test_the_oldest_exchanges_are_dropped_when_the_context_fills(engine, tokenizer):
    session = ChatSession(engine, SamplingParams(temperature=0, max_new_tokens=8), system="sys")
    for k in range(12):
        reply = session.send(f"message number {k}")
        assert reply.prompt_tokens + 8 <= engine.max_seq_len  # every turn fits with room for a reply
    assert session.history[-2]["content"] == "message number 11"
    assert 0 < len(session.history) < 24 and session.history[0]["role"] == "user"
    with pytest.raises(UserError, match="send a shorter message"):
        session.send("word " * 200)
