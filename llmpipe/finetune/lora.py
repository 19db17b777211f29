"""LoRA adapters on our GPT through peft.

peft wraps the plain `GPT` module directly: `LoraConfig(target_modules=[...])` names its linear
layers (wq, wk, wv, wo, w_gate, w_up, w_down). `task_type` stays unset: "CAUSAL_LM" makes peft call
`prepare_inputs_for_generation`, which only Hugging Face models have. The adapted model's forward
is GPT's forward, `with peft_model.disable_adapter():` gives the base model exactly (DPO's reference
without a second copy), and `merge_and_unload()` returns our GPT class with the original parameter
names and the tied embedding still tied, so a merged model saves as an ordinary checkpoint.

peft is imported inside the functions: the losses and batches of llmpipe.finetune import without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn

from llmpipe.errors import UserError
from llmpipe.io import atomic_path

if TYPE_CHECKING:
    from peft import PeftModel

    from llmpipe.model.gpt import GPT

ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes next to the adapter weights


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8  # rank of the update B @ A
    alpha: float = 16  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input only; the base path never drops
    target_modules: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            problems.append("target_modules is empty: name at least one linear layer, e.g. wq, wv")
        if problems:
            raise UserError("invalid LoRA settings: " + "; ".join(problems))


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers (what target_modules may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def _matches(target: str, module_name: str) -> bool:
    # peft's rule for a list of names: the full module name, or its dotted suffix
    return module_name == target or module_name.endswith("." + target)


def check_targets(model: nn.Module, target_modules: tuple[str, ...]) -> None:
    """Every target must name at least one linear layer; LoRA on a tied lm_head is refused."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in target_modules if not any(_matches(t, name) for name in linears)]
    if missing:
        raise UserError(f"LoRA target_modules {missing} name no linear layer of the model; "
                        f"its linear layers are: {', '.join(linear_layer_names(model))}")
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied and any(_matches(t, "lm_head") for t in target_modules):
        # merging would add the head's update to the shared tensor, changing the input embedding too,
        # so the merged model would no longer compute what the adapted one did
        raise UserError("LoRA target_modules names lm_head, which shares its weight with the token "
                        "embedding (tie_embeddings): drop lm_head from target_modules")


def apply_lora(model: GPT, settings: LoraSettings) -> PeftModel:
    """Wrap `model` (in place) with fresh LoRA adapters; only the adapters' parameters stay trainable.

    The adapters start as a zero update (B = 0), so the wrapped model first computes what `model` did."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, settings.target_modules)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules))
    return get_peft_model(model, config)


def merged(peft_model: PeftModel) -> GPT:
    """The base GPT with the adapters folded into its weights: original keys, tied embedding still tied.

    Consumes `peft_model` (peft merges in place and unwraps): use it last, e.g. for the final save."""
    return peft_model.merge_and_unload()


def save_adapter(peft_model: PeftModel, directory: Path | str) -> None:
    """Write the adapter alone (its weights and adapter_config.json) to `directory`, atomically."""
    with atomic_path(directory) as tmp:
        peft_model.save_pretrained(str(tmp))


def load_adapter(model: GPT, directory: Path | str, trainable: bool = False) -> PeftModel:
    """Wrap `model` (in place) with the adapter saved in `directory` by `save_adapter`."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise UserError(f"{directory} holds no LoRA adapter (no {ADAPTER_CONFIG}); "
                        f"point it at a directory written by save_adapter")
    return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)


ADAPTER_DIR = "adapter"  # the adapter-only save, next to final/ in the stage's output


@dataclass(frozen=True)
class LoraAdapter:
    """The Trainer's `Adapter` (llmpipe/train/loop.py) for LoRA: wrap with fresh adapters, and at the
    end save the adapter alone to out_dir/adapter and hand back the merged model for final/."""

    settings: LoraSettings = LoraSettings()

    def wrap(self, model: GPT) -> PeftModel:
        return apply_lora(model, self.settings)

    def export(self, module: PeftModel, out_dir: Path) -> GPT:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:  # one writer; every rank merges its own copy
            save_adapter(module, Path(out_dir) / ADAPTER_DIR)
        return merged(module)
