"""A checkpoint as a Hugging Face Llama directory, loaded with no custom code:

    transformers.AutoModelForCausalLM.from_pretrained(dir)   # LlamaForCausalLM
    transformers.AutoTokenizer.from_pretrained(dir)          # our ids (see hf_tokenizer.py)

The directory holds

    config.json              LlamaConfig fields (llmpipe.model.hf.hf_llama_config), bos/eos/pad ids, fp32
    model.safetensors        the weights under Llama's names, unchanged: our rotary is rotate-half like
                             Llama's, so q/k need no permutation; tied embeddings are stored once
                             (no lm_head.weight, tie_word_embeddings true)
    generation_config.json   generation stops at eos or at the chat's end of turn
    tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json

and deliberately no tokenizer.model (transformers would rebuild the tokenizer from it, with other ids).

Conventions a Hugging Face user should know: our models read a document as the tokens after an eos
(the tokenizer stage ends every document with one); the tokenizer adds nothing around the text, so
prepend `eos_token_id` to score or continue text as the start of a document, as our evaluation does
(llmpipe/evaluate/adapter.py). `bos_token_id` names the <|bos|> piece, which pretraining never shows.
`rope_theta` is written both the transformers 4 way (top level) and the transformers 5 way
(`rope_parameters`).

The directory is written under a temp name and renamed into place, so a crash never leaves half an
export where a reader looks. A QK-norm model is refused: Llama has no QK-norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmpipe.errors import UserError
from llmpipe.io import atomic_path
from llmpipe.model import ModelConfig
from llmpipe.model.hf import hf_llama_config, hf_llama_name, llama_incompatibilities
from llmpipe.package.hf_tokenizer import write_hf_tokenizer
from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer

CONFIG, WEIGHTS, GENERATION_CONFIG = "config.json", "model.safetensors", "generation_config.json"


def export_hf(checkpoint: Path, tokenizer: Tokenizer, out_dir: Path) -> Path:
    """Write the Hugging Face directory of `checkpoint` (a checkpoint or a stage output directory) to
    `out_dir`, replacing it; returns `out_dir`. `tokenizer` must be the one the checkpoint was trained with."""
    from safetensors.torch import save_file

    from llmpipe.train.checkpoint import (find_checkpoint, load_weights, read_model_config, read_tokenizer_ref,
                                          verify_checkpoint)

    checkpoint = find_checkpoint(checkpoint)
    verify_checkpoint(checkpoint)  # a corrupt file is refused by name, before anything is written
    cfg = read_model_config(checkpoint)
    _check_exportable(checkpoint, cfg, read_tokenizer_ref(checkpoint), tokenizer)
    tensors = hf_state_dict(load_weights(checkpoint), cfg, checkpoint)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / CONFIG, hf_config(cfg, tokenizer))
        _write_json(tmp / GENERATION_CONFIG, generation_config(tokenizer))
        write_hf_tokenizer(tokenizer, tmp, cfg.max_seq_len)
    return out_dir


def _check_exportable(checkpoint: Path, cfg: ModelConfig, ref: dict, tokenizer: Tokenizer) -> None:
    missing = llama_incompatibilities(cfg)
    if missing:
        raise UserError(f"{checkpoint}: the model uses {', '.join(missing)}, which Hugging Face Llama does not "
                        f"have; export a model trained without them (params.yaml pretrain section)")
    if ref.get("hash") != tokenizer.hash:
        raise UserError(f"{checkpoint} was trained with tokenizer {ref.get('hash')} (its tokenizer_ref.json), not "
                        f"{tokenizer.hash} ({tokenizer.model_file}): export it with the tokenizer it was trained with")


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, checkpoint: Path | str = "the checkpoint"
                  ) -> dict[str, torch.Tensor]:
    """Our full state dict -> LlamaForCausalLM's (a tied lm_head left out: transformers ties it back)."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        try:
            out[hf_llama_name(name)] = tensor.detach().to(torch.float32).contiguous()
        except ValueError:
            raise UserError(f"{checkpoint}: weight {name!r} has no Hugging Face Llama name (a quantized checkpoint?); "
                            f"export the unquantized checkpoint") from None
    return out


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """config.json: LlamaConfig's fields as transformers writes them."""
    fields = hf_llama_config(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **fields,
        "rope_parameters": {"rope_type": "default", "rope_theta": fields["rope_theta"]},
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    """generation_config.json: a reply ends at eos or at the end of a chat turn, as in our engine."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": [tokenizer.eos_id, tokenizer.end_of_turn_id],
            "pad_token_id": tokenizer.pad_id}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


__all__ = ["export_hf", "generation_config", "hf_config", "hf_state_dict"]
