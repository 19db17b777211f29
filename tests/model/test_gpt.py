import math

import pytest
import torch
import torch.nn.functional as F

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig

V = 97


def small(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32)
    return ModelConfig(**{**base, **overrides})


def test_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(small())
    idx, targets = torch.randint(0, V, (2, 3, 17))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 17, V) and loss.shape == ()
    assert abs(loss.item() - math.log(V)) < 0.3  # small init: near-uniform predictions
    logits, loss = model(idx)
    assert loss is None


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_future_tokens_never_change_past_logits(backend):
    torch.manual_seed(0)
    model = GPT(small(attn_backend=backend)).eval()
    idx = torch.randint(0, V, (2, 20))
    changed = idx.clone()
    changed[:, 11:] = (changed[:, 11:] + 1) % V
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11], b[:, 11])  # the changed position itself does see the change


def test_backends_give_the_same_model_output():
    torch.manual_seed(0)
    ref = GPT(small(attn_backend="math"))
    other = GPT(small(attn_backend="sdpa"))
    other.load_state_dict(ref.state_dict())
    idx = torch.randint(0, V, (2, 23))
    torch.testing.assert_close(ref(idx, idx)[1], other(idx, idx)[1])


def test_tied_embeddings_share_storage():
    tied, untied = GPT(small()), GPT(small(tie_embeddings=False))
    assert tied.lm_head.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * 64
    # a step on the tied model moves the one shared matrix through both uses
    tied(torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 5)))[1].backward()
    assert tied.lm_head.weight.grad is tied.tok_embeddings.weight.grad


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_on_and_off_train(qk_norm):
    torch.manual_seed(0)
    model = GPT(small(qk_norm=qk_norm))
    names = [n for n, _ in model.named_parameters()]
    assert any("q_norm" in n for n in names) == qk_norm
    assert model.num_params() == model.config.num_params()
    idx = torch.randint(0, V, (2, 9))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_ignore_index_masks_targets():
    torch.manual_seed(0)
    model = GPT(small())
    idx = torch.randint(0, V, (2, 10))
    targets = idx.clone()
    targets[:, :6] = -100  # e.g. prompt tokens in fine-tuning
    logits, loss = model(idx, targets)
    by_hand = F.cross_entropy(logits[:, 6:].reshape(-1, V), idx[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, by_hand)


@pytest.mark.parametrize("tie", [True, False])
def test_param_groups_cover_each_parameter_once(tie):
    model = GPT(small(tie_embeddings=tie, qk_norm=True))
    decay, no_decay = model.param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"][1:])
    assert any(p is model.tok_embeddings.weight for p in no_decay["params"])
    assert any(p is model.lm_head.weight for p in decay["params"]) == (not tie)
    torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)  # accepted as is


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V, n_layer=8, n_head=4, d_model=256))
    wq, wo = model.layers[0].attn.wq.weight, model.layers[0].attn.wo.weight
    assert abs(wq.std().item() - 0.02) < 0.002
    assert abs(wo.std().item() - 0.02 / math.sqrt(16)) < 0.0005


def test_meta_init_then_materialise():
    cfg = small()
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = GPT(cfg)
    torch.testing.assert_close(model.rope_cos, fresh.rope_cos)
    assert torch.isfinite(model(torch.randint(0, V, (1, 8)))[0]).all()


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(small(n_layer=2, d_model=64, max_seq_len=16))
    idx = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    for _ in range(100):  # about a second on one core
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()  # from ln(97) = 4.6


def test_generate():
    torch.manual_seed(0)
    model = GPT(small(max_seq_len=8)).eval()
    prompt = torch.randint(0, V, (2, 3))
    out = model.generate(prompt, max_new_tokens=12, temperature=0)  # beyond max_seq_len: crops the context
    assert out.shape == (2, 15) and torch.equal(out[:, :3], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=12, temperature=0))  # greedy is deterministic
    sampled = model.generate(prompt, max_new_tokens=5, temperature=0.8, top_k=1)
    assert torch.equal(sampled, out[:, :8])  # top_k=1 is greedy
    eos = int(out[0, 3])  # the first token row 0 generates: stop right there
    stopped = model.generate(prompt[:1], max_new_tokens=12, temperature=0, eos_id=eos)
    assert stopped.shape == (1, 4) and stopped[0, -1] == eos


def test_too_long_input_is_refused():
    with pytest.raises(UserError, match="max_seq_len 32"):
        GPT(small())(torch.zeros(1, 33, dtype=torch.long))


def test_param_groups_leave_out_frozen_parameters():
    model = GPT(small(qk_norm=True))
    for name, p in model.named_parameters():  # LoRA-style: freeze the base, train only the attention output
        p.requires_grad_(name.endswith("attn.wo.weight") or name == "norm.weight")
    groups = model.param_groups(weight_decay=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 3  # two wo + the final norm
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    frozen = model.tok_embeddings.weight.detach().clone()
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model(torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9)))[1].backward()
    opt.step()
    assert sum(len(s) for s in opt.state_dict()["state"].values()) > 0
    assert len(opt.state_dict()["state"]) == 3  # optimizer state (and so the checkpoint) holds only what trains
    assert torch.equal(model.tok_embeddings.weight, frozen)



def _pack(lengths: list[int], T: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random conversations of `lengths` laid end to end in one row of T: (convs, idx (1, T), segments (1, T))."""
    convs = [torch.randint(0, V, (n,)) for n in lengths]
    idx = torch.zeros(1, T, dtype=torch.long)
    segments = torch.zeros(1, T, dtype=torch.long)  # 0: padding after the last conversation
    at = 0
    for i, conv in enumerate(convs, start=1):
        idx[0, at:at + len(conv)], segments[0, at:at + len(conv)] = conv, i
        at += len(conv)
    return convs, idx, segments


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_packed_row_gives_each_conversation_its_own_logits(backend):
    torch.manual_seed(0)
    model = GPT(small(attn_backend=backend)).eval()
    convs, idx, segments = _pack([7, 9, 5], T=26)
    with torch.no_grad():
        packed = model(idx, segments=segments)[0][0]  # (T, V)
        unmasked = model(idx)[0][0]  # plain causal: later conversations read the earlier ones
        for i, conv in enumerate(convs, start=1):
            alone = model(conv[None])[0][0]  # (n, V)
            torch.testing.assert_close(packed[segments[0] == i], alone, atol=1e-5, rtol=1e-5)
            if i > 1:
                assert not torch.allclose(unmasked[segments[0] == i], alone, atol=1e-3)
    assert torch.isfinite(packed[segments[0] == 0]).all()  # padding attends to padding: no all-masked row


def test_packed_loss_and_gradients_match_each_conversation_alone():
    torch.manual_seed(0)
    model = GPT(small())
    convs, idx, segments = _pack([6, 8], T=16)
    targets = torch.full_like(idx, -100)
    targets[0, :5], targets[0, 6:13] = convs[0][1:], convs[1][1:]  # next token within each conversation
    _, loss = model(idx, targets, segments=segments)
    loss.backward()
    packed_grad = model.layers[0].attn.wq.weight.grad.clone()
    model.zero_grad()
    total = sum(model(c[None, :-1], c[None, 1:])[1] * (len(c) - 1) for c in convs) / 12  # same token mean
    total.backward()
    torch.testing.assert_close(loss, total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_grad, model.layers[0].attn.wq.weight.grad, atol=1e-5, rtol=1e-4)


def test_segments_with_a_cache_are_refused():
    model = GPT(small())
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(UserError, match="segments"):
        model(idx, segments=torch.ones_like(idx), attention_mask=torch.ones_like(idx, dtype=torch.bool))
    with pytest.raises(UserError, match="shape of idx"):
        model(idx, segments=torch.ones(1, 3, dtype=torch.long))
