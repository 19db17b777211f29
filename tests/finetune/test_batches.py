"""SFT and DPO micro-batches: label layout, loss only on assistant tokens, exact and complete epochs, packing."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.finetune.batches import (IGNORE, TokenPair, SftBatches, SftExample, DpoBatches, collate_dpo, collate_sft,
                                      dpo_reference_batches, dpo_val_batches, read_pairs, read_sft_examples,
                                      sft_val_batches, shift_targets)
from llmpipe.model import GPT, ModelConfig

V = 512
SYS, USER, ASSIST, END = 1, 2, 3, 4  # role and end_of_turn ids of a toy chat template


def conversation(rng: np.random.Generator, turns: int, marker: int, system: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`<|system|> s <|end|>` then `<|user|> u <|end|> <|assistant|> a <|end|>` x turns; mask on a + <|end|>.
    The first content token is `marker`, so a batch row tells which example it came from."""
    ids, mask = [], []

    def message(role: int, learn: bool) -> None:
        content = rng.integers(16, V, size=int(rng.integers(1, 6))).tolist()
        ids.extend([role, *content, END])
        mask.extend([False] + [learn] * (len(content) + 1))

    if system:
        message(SYS, False)
    for _ in range(turns):
        message(USER, False)
        message(ASSIST, True)
    ids[1] = marker
    return np.array(ids, dtype=np.int64), np.array(mask, dtype=bool)


def examples(n: int, seed: int = 0, max_turns: int = 4) -> list[SftExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids, mask = conversation(rng, int(rng.integers(1, max_turns + 1)), marker=1000 + i, system=i % 2 == 0)
        out.append(SftExample(f"ex{i}", ids, mask))
    return out


def markers(batch: dict) -> list[int]:
    """The example index of every conversation in a batch (each starts `<role> marker`)."""
    idx = batch["idx"]
    starts = torch.ones_like(idx, dtype=torch.bool)
    if "segments" in batch:
        seg = batch["segments"]
        starts = (seg != 0) & torch.cat([torch.ones_like(seg[:, :1], dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], 1)
    else:
        starts[:, 1:] = False
    return [int(idx[b, t + 1]) - 1000 for b, t in starts.nonzero().tolist()]


def test_targets_are_the_next_token_exactly_where_the_next_token_is_learned():
    e = examples(1)[0]
    batch = collate_sft([e], [[0]], packed=False)
    idx, targets = batch["idx"][0].numpy(), batch["targets"][0].numpy()
    assert np.array_equal(idx, e.ids[:-1])  # the closing end_of_turn predicts nothing: not an input
    for t in range(len(idx)):
        assert targets[t] == (e.ids[t + 1] if e.mask[t + 1] else IGNORE), t
    # the <|assistant|> role token is input, never a target; the assistant's <|end|> is a target
    assistant = np.flatnonzero(e.ids == ASSIST)
    assert (targets[assistant - 1] == IGNORE).all() and (targets[assistant] != IGNORE).all()
    assert targets[-1] == END


def _loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, targets)[1]


def test_changing_a_user_or_system_label_changes_nothing_and_an_assistant_label_does():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V + 1000, n_layer=1, n_head=2, d_model=32, max_seq_len=128)).eval()
    e = examples(1, max_turns=3)[0]
    idx = torch.from_numpy(e.ids[:-1])[None]
    base = _loss(model, idx, torch.from_numpy(shift_targets(e.ids, e.mask))[None])
    # every system/user token (role tokens, content, their <|end|>, the <|assistant|> token) relabelled
    relabelled = e.ids.copy()
    relabelled[~e.mask] = (relabelled[~e.mask] + 7) % V
    assert not np.array_equal(relabelled, e.ids)
    assert _loss(model, idx, torch.from_numpy(shift_targets(relabelled, e.mask))[None]) == base
    # the pipeline builds its targets with exactly this rule
    assert torch.equal(collate_sft([e], [[0]], False)["targets"][0], torch.from_numpy(shift_targets(e.ids, e.mask)))
    one = e.ids.copy()
    first_answer = int(np.flatnonzero(e.mask)[0])
    one[first_answer] = (one[first_answer] + 7) % V
    assert _loss(model, idx, torch.from_numpy(shift_targets(one, e.mask))[None]) != base


@pytest.mark.parametrize("mode", ["bucket", "pack"])
def test_same_seed_and_step_give_identical_batches_in_any_order(mode):
    data = examples(60)
    a = SftBatches(data, micro_batch=4, seq_len=96, accum=2, seed=3, mode=mode)
    b = SftBatches(data, micro_batch=4, seq_len=96, accum=2, seed=3, mode=mode)
    late = b.micro_batches(9)  # a resumed run starts mid-way, in a later epoch
    for step in range(10):
        for x, y in zip(a.micro_batches(step), b.micro_batches(step)):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(x["idx"], y["idx"]) for x, y in zip(a.micro_batches(9), late))
    other = SftBatches(data, micro_batch=4, seq_len=96, accum=2, seed=4, mode=mode)
    assert markers(other.micro_batches(0)[0]) != markers(a.micro_batches(0)[0])


@pytest.mark.parametrize("mode", ["bucket", "pack"])
def test_each_epoch_uses_every_example_exactly_once(mode):
    data = examples(50)
    # a bucketing window smaller than the data, so micro-batches can mix differently each epoch
    src = SftBatches(data, micro_batch=3, seq_len=80, accum=1, seed=0, mode=mode, bucket_window=2)
    seen: dict[int, Counter] = {}
    groups: dict[int, set] = {}  # which examples share a micro-batch, per epoch
    for step in range(int(3 * src.steps_per_epoch()) + 10):
        epoch, batch = src.epoch_of(step), markers(src.micro_batches(step)[0])
        seen.setdefault(epoch, Counter()).update(batch)
        groups.setdefault(epoch, set()).add(frozenset(batch))
    assert len(seen) >= 3
    for epoch in range(3):  # complete epochs
        assert seen[epoch] == Counter(range(50)), epoch
    first = [m for s in range(3) for m in markers(src.micro_batches(s)[0])]
    assert first != list(range(len(first)))  # shuffled, not file order
    assert len(groups[0] & groups[1]) < len(groups[0]) / 2  # reshuffled each epoch, not just reordered


@pytest.mark.parametrize("mode", ["bucket", "pack"])
def test_ranks_together_see_what_one_process_with_more_accumulation_sees(mode):
    data = examples(40)
    one = SftBatches(data, micro_batch=2, seq_len=64, accum=4, seed=1, mode=mode)
    ranks = [SftBatches(data, micro_batch=2, seq_len=64, accum=2, seed=1, rank=r, world_size=2, mode=mode)
             for r in range(2)]
    for step in range(6):
        together = ranks[0].micro_batches(step) + ranks[1].micro_batches(step)
        assert all(torch.equal(x["idx"], y["idx"]) for x, y in zip(one.micro_batches(step), together))


def test_packing_never_splits_a_conversation_nor_exceeds_seq_len():
    data = examples(80, max_turns=6)  # up to 91 tokens each
    seq_len = 128
    src = SftBatches(data, micro_batch=4, seq_len=seq_len, accum=1, seed=0, mode="pack")
    rows = conversations = 0
    for step in range(int(src.steps_per_epoch())):
        batch = src.micro_batches(step)[0]
        assert batch["idx"].shape[1] <= seq_len
        for b in range(batch["idx"].shape[0]):
            seg, idx, targets = batch["segments"][b], batch["idx"][b], batch["targets"][b]
            used = int((seg != 0).sum())
            assert (seg[:used] != 0).all() and (seg[used:] == 0).all()  # padding only at the end
            assert (targets[seg == 0] == IGNORE).all()
            rows += 1
            for s in seg.unique().tolist():
                if s == 0:
                    continue
                where = (seg == s).nonzero()[:, 0]
                assert int(where[-1] - where[0]) + 1 == len(where)  # contiguous
                e = data[int(idx[where[0] + 1]) - 1000]
                assert torch.equal(idx[where], torch.from_numpy(e.ids[:-1]))  # whole conversation, in one row
                assert torch.equal(targets[where], torch.from_numpy(shift_targets(e.ids, e.mask)))
                conversations += 1
    assert conversations == 80 and rows < 80 / 2  # several conversations per row


def test_packed_and_bucketed_batches_give_the_same_loss_for_the_same_conversations():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V + 1000, n_layer=2, n_head=2, d_model=32, max_seq_len=128)).eval()
    data = examples(5)
    bucket = collate_sft(data, [[i] for i in range(5)], packed=False)
    pack = collate_sft(data, [[0, 1, 2], [3, 4]], packed=True)
    with torch.no_grad():
        a = model(bucket["idx"], bucket["targets"])[1]
        b = model(pack["idx"], pack["targets"], segments=pack["segments"])[1]
        leak = model(pack["idx"], pack["targets"])[1]  # packed rows without their segments
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert SftBatches.tokens(bucket) == SftBatches.tokens(pack) == sum(int(e.mask[1:].sum()) for e in data)
    assert abs(leak.item() - a.item()) > 1e-4


def test_bucketing_pads_little():
    rng = np.random.default_rng(0)
    data = []
    for i in range(400):
        n = int(rng.integers(8, 200))
        mask = np.zeros(n, dtype=bool)
        mask[n // 2:] = True
        data.append(SftExample(f"e{i}", rng.integers(16, V, n), mask))
    src = SftBatches(data, micro_batch=8, seq_len=256, accum=1, seed=0, mode="bucket")
    padded = sum(src.micro_batches(step)[0]["idx"].numel() for step in range(int(src.steps_per_epoch())))
    real = sum(len(e.ids) - 1 for e in data)
    assert real / padded > 0.9  # unbucketed, random lengths 8..200 in rows of 8 waste about 40%


def test_a_conversation_longer_than_seq_len_is_refused_by_name():
    data = examples(3)
    with pytest.raises(UserError, match=r"ex\d.*max_tokens"):
        SftBatches(data, micro_batch=2, seq_len=8)
    with pytest.raises(UserError, match="mode"):
        SftBatches(data, micro_batch=2, seq_len=128, mode="padded")


def test_val_batches_are_fixed_and_cover_the_split():
    data = examples(21)
    for mode in ("bucket", "pack"):
        val = sft_val_batches(data, micro_batch=4, seq_len=96, mode=mode)
        again = sft_val_batches(data, micro_batch=4, seq_len=96, mode=mode)
        assert all(torch.equal(x["idx"], y["idx"]) for x, y in zip(val, again))
        assert sorted(m for b in val for m in markers(b)) == list(range(21))
    halves = [sft_val_batches(data, 4, 96, rank=r, world_size=2) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == 3  # 6 micro-batches, the same count on each rank


def pairs(n: int, seed: int = 0) -> list[TokenPair]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = np.array([USER, *rng.integers(16, V, int(rng.integers(2, 6))), END, ASSIST])
        chosen = np.array([*rng.integers(16, V, int(rng.integers(1, 5))), END])
        rejected = np.array([*rng.integers(16, V, int(rng.integers(1, 5))), END])
        out.append(TokenPair(f"p{i}", prompt, chosen, rejected))
    return out


def test_dpo_rows_are_prompt_plus_chosen_then_prompt_plus_rejected():
    data = pairs(3)
    ref = np.arange(6, dtype=np.float64).reshape(3, 2)
    batch = collate_dpo(data, [2, 0], ref)
    idx, targets = batch["idx"], batch["targets"]
    assert idx.shape[0] == 4
    for b, (i, side) in enumerate([(2, "chosen"), (0, "chosen"), (2, "rejected"), (0, "rejected")]):
        p = data[i]
        response = getattr(p, f"{side}_ids")
        full = np.concatenate([p.prompt_ids, response])
        n = len(full) - 1
        assert torch.equal(idx[b, :n], torch.from_numpy(full[:-1]))
        expected = np.full(idx.shape[1], IGNORE)
        expected[len(p.prompt_ids) - 1:n] = response  # the <|assistant|> position predicts the first response token
        assert torch.equal(targets[b], torch.from_numpy(expected)), b
    assert idx.shape[1] == max(len(data[i].prompt_ids) + len(r) - 1 for i in (0, 2)
                               for r in (data[i].chosen_ids, data[i].rejected_ids))
    assert batch["ref_logp"].tolist() == [4.0, 0.0, 5.0, 1.0]
    assert "ref_logp" not in collate_dpo(data, [0])


def test_dpo_batches_epochs_reference_and_val():
    data = pairs(10)
    src = DpoBatches(data, micro_batch=3, seq_len=32, accum=1, seed=0, ref_logp=np.zeros((10, 2)))
    again = DpoBatches(data, micro_batch=3, seq_len=32, accum=1, seed=0)
    seen = Counter()
    for step in range(4):  # ceil(10 / 3) micro-batches make one epoch
        batch = src.micro_batches(step)[0]
        assert torch.equal(batch["idx"], again.micro_batches(step)[0]["idx"]) and batch["ref_logp"].shape == (batch["idx"].shape[0],)
        B = batch["idx"].shape[0] // 2
        seen.update(int(batch["idx"][b, 1]) for b in range(B))
    assert seen == Counter(int(p.prompt_ids[1]) for p in data)
    cover = np.concatenate([i for i, _ in dpo_reference_batches(data, 4, 32)])
    assert cover.tolist() == list(range(10))
    assert len(dpo_val_batches(data, 4, 32)) == 3
    with pytest.raises(UserError, match=r"\(10, 2\)"):
        DpoBatches(data, 3, 32, ref_logp=np.zeros(10))
    with pytest.raises(UserError, match="p0.*max_tokens"):
        DpoBatches(data, 3, 4)


def test_readers_round_trip_the_chat_data_parquet(tmp_path):
    data = examples(4)
    sft = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [e.id for e in data],
                             "ids": pa.array([e.ids.tolist() for e in data], pa.list_(pa.int32())),
                             "mask": pa.array([e.mask.tolist() for e in data], pa.list_(pa.bool_()))}), sft)
    back = read_sft_examples(sft)
    assert [e.id for e in back] == [e.id for e in data]
    assert all(np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask) for a, b in zip(back, data))
    assert back[0].ids.dtype == np.int64 and back[0].mask.dtype == bool
    ps = pairs(3)
    dpo = tmp_path / "dpo.parquet"
    pq.write_table(pa.table({"id": [p.id for p in ps], **{
        c: pa.array([getattr(p, c).tolist() for p in ps], pa.list_(pa.int32()))
        for c in ("prompt_ids", "chosen_ids", "rejected_ids")}}), dpo)
    assert [(p.id, p.chosen_ids.tolist()) for p in read_pairs(dpo)] == [(p.id, p.chosen_ids.tolist()) for p in ps]
    pq.write_table(pa.table({"id": ["x"], "ids": [[1, 2]]}), tmp_path / "old.parquet")
    with pytest.raises(UserError, match="old.parquet.*'mask'.*chat_data"):
        read_sft_examples(tmp_path / "old.parquet")
    with pytest.raises(UserError, match="chat_data"):
        read_pairs(tmp_path / "missing.parquet")
