"""The one training loop: pretraining, SFT and DPO (each stage brings a Task: batches and a loss).

One optimizer step = `accum` micro-batches per rank, so that
    micro_batch x seq_len x world_size x accum = global_batch_tokens
(for chat data, where rows are padded or packed, that is the step's capacity in tokens).
Per step: set the scheduled lr, forward/backward each micro-batch under autocast (gradients
all-reduced only on the last), clip the gradient norm, refuse non-finite loss or norm, an optimizer
step (AdamW, or Muon + AdamW: llmpipe/train/optim.py) over the trainable parameters only.
Every `eval_every` steps: the task's val loss (and bits per
byte for text), a short sample per prompt; every `checkpoint_every` steps: an atomic checkpoint.
SIGTERM finishes the current step, saves, then exits.

A run starts from random weights or from a checkpoint's (`init_from`, a fresh optimizer; it then
evaluates and samples at step 0 too, so the logs show what it started from), and an `Adapter` (LoRA)
may wrap the model so that only its own parameters train.

The batches are a function of (seed, step, micro index) and the lr a function of the step, so a
resumed run is the same computation as an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from llmpipe.errors import UserError
from llmpipe.io import clean_stale_temps
from llmpipe.model import GPT, ModelConfig
from llmpipe.model.flops import detect_peak_flops, mfu
from llmpipe.train import checkpoint as ckpt
from llmpipe.train import distributed as ddist
from llmpipe.train import optim
from llmpipe.train.schedule import Schedule

if TYPE_CHECKING:
    from llmpipe.train.task import Batch, Task

log = logging.getLogger("llmpipe.train")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every training stage's config takes its defaults from here (the CPU demo's)."""
    seq_len: int = 256
    micro_batch: int = 4
    global_batch_tokens: int = 4 * 256
    max_steps: int = 800
    lr: float = 2e-3
    optimizer: str = "muon"  # muon (Muon for the blocks' matrices, AdamW at `lr` for the rest) | adamw
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"
    decay_frac: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 2
    log_every: int = 1
    compile: bool = False
    dtype: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp32
    distributed: str = "none"  # none | ddp | fsdp2
    seed: int = 1337
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 50

    def accum_steps(self, world_size: int) -> int:
        per_pass = self.micro_batch * self.seq_len * world_size
        if self.global_batch_tokens % per_pass:
            near = max(1, round(self.global_batch_tokens / per_pass)) * per_pass
            raise UserError(f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of micro_batch x "
                            f"seq_len x world_size = {self.micro_batch} x {self.seq_len} x {world_size} = {per_pass} "
                            f"(e.g. {near})")
        return self.global_batch_tokens // per_pass


@dataclass(frozen=True)
class EvalPrompts:
    """How to show samples at each eval without importing the tokenizer here: one per prompt."""
    prompts: list[list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int | None = None  # ends a sample (chat: the end of the assistant's turn)


class Adapter(Protocol):
    """Wraps the model so that only its own parameters train (LoRA: llmpipe/finetune/lora.py)."""

    def wrap(self, model: GPT) -> torch.nn.Module:
        """Freeze `model` and return the module to train (it may modify `model` in place)."""
        ...

    def export(self, module: torch.nn.Module, out_dir: Path) -> GPT:
        """The plain model to save as final/ (e.g. adapters merged in); may write extra files to out_dir."""
        ...


class NonFiniteError(UserError):
    """Loss or gradient norm is nan/inf: the step was not applied (usually the lr is too high)."""


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, task: Task, out_dir: Path,
                 tokenizer_ref: dict[str, Any], tracker: Any = None, world: ddist.World = ddist.World(),
                 sampler: EvalPrompts | None = None, data_ref: dict[str, Any] | None = None,
                 init_from: Path | None = None, adapter: Adapter | None = None):
        """`data_ref` identifies the training data (e.g. {"dir", "sha256"} of the token shards); with the
        example count (and the starting weights' hash) it goes into every checkpoint, and resuming on
        other data is refused. `init_from`: a checkpoint whose weights the run starts from."""
        self.model_cfg, self.cfg, self.world, self.tracker, self.sampler = model_cfg, cfg, world, tracker, sampler
        self.out_dir, self.ckpt_dir = Path(out_dir), Path(out_dir) / "checkpoints"
        self.tokenizer_ref, self.task, self.adapter = tokenizer_ref, task, adapter
        self.data_ref = {**(data_ref or {}), "num_examples": task.train.num_examples}
        self.device = world.device
        self.accum = cfg.accum_steps(world.world_size)
        self.batches, self.val = task.train, task.val
        self.schedule = Schedule(cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)

        torch.manual_seed(cfg.seed)  # same init on every rank
        self.model = GPT(model_cfg).to(self.device)  # the plain model: eval, sampling, final weights
        if init_from is not None:
            self.data_ref["init"] = self._load_init(Path(init_from))
        # the module that trains: the model, or the model wrapped by the adapter (LoRA); its state dict
        # is what checkpoints hold, so a resume rebuilds the same wrapping first
        self.module = adapter.wrap(self.model) if adapter is not None else self.model
        self.aliases = ckpt.tied_aliases(self.module)
        self.trainable_params = sum(p.numel() for p in self.trainable)  # before final/ merges any adapter
        self.net = ddist.wrap(self.module, cfg.distributed, world, compile=cfg.compile)  # what runs forward/backward
        self.opt = optim.build(self.model, **self._optimizer_settings(), device=self.device)  # trainable params only
        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.peak_flops = detect_peak_flops(self.device)
        self.step, self.tokens_seen, self.best_val, self.train_time = 0, 0, math.inf, 0.0
        self.last: dict[str, float] = {}  # latest train/val metrics
        self._stop = False

    def _optimizer_settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"optimizer": cfg.optimizer, "lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2),
                "weight_decay": cfg.weight_decay, "muon_lr": cfg.muon_lr, "muon_momentum": cfg.muon_momentum}

    def _load_init(self, path: Path) -> str:
        """Load a checkpoint's weights as the starting point (every rank reads them); returns their sha256."""
        path = ckpt.find_checkpoint(path)
        ckpt.verify_checkpoint(path)
        ckpt.check_compatible(path, self.model_cfg, self.tokenizer_ref.get("hash"), action="start from")
        self.model.load_state_dict(ckpt.load_weights(path, self.device))
        return ckpt.weights_hash(path)

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        lr = self.schedule.lr_at(self.step)
        self.opt.scale_lr(lr / self.cfg.lr)  # every group (Muon's too) follows the one schedule
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for m, batch in enumerate(self.batches.micro_batches(self.step)):
            tokens += self.batches.tokens(batch)
            batch = self._to_device(batch)
            with ddist.grad_sync(self.net, enabled=m == self.accum - 1):
                with self.autocast():
                    loss, extra = self.task.loss(self.net, batch)
                (loss / self.accum).backward()
            _accumulate(sums, {"loss": loss.detach(), **extra})
        means = _reduced_means(sums, self.accum)
        loss = means.pop("loss")
        self.step_tokens = int(ddist.all_reduce(torch.tensor(float(tokens), device=self.device), "sum").item())
        grad_norm = ddist.clip_grad_norm(self.trainable, self.cfg.grad_clip).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            raise NonFiniteError(f"step {self.step + 1}: loss {loss}, grad norm {grad_norm}; the update was not applied. "
                                 f"Last checkpoint: {latest or 'none yet'} (resume from it with a lower lr).")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.step_tokens
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                **{f"train/{k}": v for k, v in means.items()}}

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- eval and samples --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.module.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in self.val:
            with self.autocast():
                loss, extra = self.task.loss(self.module, self._to_device(batch))
            _accumulate(sums, {"loss": loss.float(), **extra})
        self.module.train()
        metrics = {f"val/{k}": v for k, v in _reduced_means(sums, len(self.val)).items()}
        if self.task.bytes_per_token:  # nats/token -> bits/byte: / ln 2, x tokens per byte of the val text
            metrics["val/bpb"] = metrics["val/loss"] / math.log(2) / self.task.bytes_per_token
        return metrics

    @torch.no_grad()
    def sample(self) -> list[str]:
        """A short continuation of each prompt; every rank runs it (FSDP2 needs all of them for a forward)."""
        if self.sampler is None or self.cfg.sample_tokens == 0:
            return []
        self.model.eval()
        texts = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + self.step)  # the same text on every rank, RNG state untouched
            for prompt in self.sampler.prompts:
                idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
                with self.autocast():
                    out = self.model.generate(idx, self.cfg.sample_tokens, temperature=self.cfg.sample_temperature,
                                              top_k=self.cfg.sample_top_k, eos_id=self.sampler.eos_id)
                texts.append(self.sampler.decode(out[0].tolist()))
        self.model.train()
        return texts

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, val_loss: float | None = None) -> None:
        """Checkpoint the current step (collective: every rank calls it; rank 0 writes)."""
        model_state = ddist.full_model_state(self.module)
        optim_state = ddist.full_optimizer_state(self.module, self.opt.optimizers)
        if self.world.is_main:
            state = {"step": self.step, "optimizer": optim_state, "schedule": asdict(self.schedule),
                     "rng": ckpt.rng_state(), "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val,
                     "train_time_s": self.train_time,
                     "data": {"seed": self.cfg.seed, "step": self.step, "num_examples": self.batches.num_examples},
                     "train_config": asdict(self.cfg)}
            meta = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": val_loss,
                    "train_loss": self.last.get("train/loss"), "saved_at": time.time(), "data": self.data_ref}
            path = ckpt.save_checkpoint(ckpt.step_dir(self.ckpt_dir, self.step), model_state, self.model_cfg,
                                        self.tokenizer_ref, meta, state, self.aliases)
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.keep_last)
            log.info("saved checkpoint %s", path)
        ddist.barrier()

    def save_final(self) -> Path:
        """Weights, config and tokenizer reference only: what later stages load (a plain GPT, adapters merged)."""
        final = self.out_dir / "final"
        model = self.adapter.export(self.module, self.out_dir) if self.adapter is not None else self.model
        model_state = ddist.full_model_state(model)
        if self.world.is_main:
            meta = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": self.last.get("val/loss"),
                    "train_loss": self.last.get("train/loss"), "saved_at": time.time(), "data": self.data_ref}
            ckpt.save_checkpoint(final, model_state, self.model_cfg, self.tokenizer_ref, meta, None,
                                 ckpt.tied_aliases(model))
        ddist.barrier()
        return final

    def resume(self) -> int:
        """Load the newest intact checkpoint, if any (rank 0 reads; the helpers broadcast); returns its step."""
        info, weights, state = None, {}, {}
        if self.world.is_main:
            clean_stale_temps(self.ckpt_dir)  # half-written checkpoints of a killed run
            path = ckpt.newest_intact_checkpoint(self.ckpt_dir)  # corrupt newer ones: warned about, set aside
            if path is not None:
                try:
                    ckpt.check_compatible(path, self.model_cfg, self.tokenizer_ref.get("hash"), self.data_ref,
                                          start_over=self.out_dir)
                    weights, state = ckpt.load_weights(path), ckpt.load_trainer_state(path)
                    info = {"path": str(path), "step": state["step"], "tokens_seen": state["tokens_seen"],
                            "best_val": state["best_val_loss"], "train_time": state["train_time_s"],
                            "meta": ckpt.read_meta(path)}
                except UserError as exc:
                    info = {"error": str(exc)}
        info = ddist.broadcast_object(info)  # every rank raises or resumes together
        if info is None:
            return 0
        if "error" in info:
            raise UserError(info["error"])
        ddist.load_model_state(self.module, weights)
        ddist.load_optimizer_state(self.module, self.opt.optimizers, state.get("optimizer", {}))
        optim.reset_hyperparameters(self.opt, self.model, **self._optimizer_settings())
        if self.world.is_main:
            ckpt.set_rng_state(state["rng"])
        self.step, self.tokens_seen, self.best_val = info["step"], info["tokens_seen"], info["best_val"]
        self.train_time = info["train_time"]
        self.last = {"train/loss": info["meta"].get("train_loss") or math.nan}
        log.info("resumed from %s (step %d)", info["path"], self.step)
        return self.step

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        start = self.resume()
        if self.world.is_main:
            truncate_jsonl(self.out_dir / "metrics.jsonl", start)
            truncate_jsonl(self.out_dir / "samples.jsonl", start)
        bar = _progress(self.cfg.max_steps, start) if self.world.is_main else None
        previous_handler = self._catch_sigterm()
        evaluated_at = None
        if start == 0 and "init" in self.data_ref:  # where a run from given weights starts: the base's samples
            self._eval_and_sample()
            evaluated_at = 0
        try:
            while self.step < self.cfg.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                metrics.update(self._speed(time.perf_counter() - t0))
                self.last.update(metrics)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
                    self._log(metrics)
                val_loss = None
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps:
                    val_loss = self._eval_and_sample()
                    evaluated_at = self.step
                stop = self._stop_requested()
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.max_steps or stop:
                    self.save(val_loss)
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}", refresh=False)
                    bar.update(1)
                if stop:
                    self._exit_on_sigterm(previous_handler)
        finally:
            self._restore_sigterm(previous_handler)
            if bar is not None:
                bar.close()
        if evaluated_at != self.step:  # resumed at the end: report val metrics of the final weights
            self._eval_and_sample()
        self.save_final()
        val = {k.removeprefix("val/").replace("/", "_"): v for k, v in self.last.items() if k.startswith("val/")}
        return {"train_loss": self.last.get("train/loss", math.nan), **{f"val_{k}": v for k, v in val.items()},
                "tokens_seen": self.tokens_seen, "steps": self.step,
                "tokens_per_s": self.tokens_seen / self.train_time if self.train_time else math.nan,
                "params": self.model.num_params(), "trainable_params": self.trainable_params}

    def _speed(self, seconds: float) -> dict[str, float]:
        """Throughput of the step just taken (eval and checkpoint time excluded)."""
        self.train_time += seconds
        tok_s = self.step_tokens / seconds
        metrics = {"train/tokens_per_s": tok_s, "train/tokens": self.tokens_seen, "train/memory_gb": _memory_gb(self.device)}
        if self.peak_flops:  # GPUs only: a CPU has no meaningful bf16 peak
            metrics["train/mfu"] = mfu(tok_s / self.world.world_size, self.model_cfg, self.cfg.seq_len, self.peak_flops)
        return metrics

    def _eval_and_sample(self) -> float:
        metrics = self.evaluate()
        self.last.update(metrics)
        self.best_val = min(self.best_val, metrics["val/loss"])
        self._log(metrics)
        texts = self.sample()
        if self.world.is_main:
            shown = " ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items())
            log.info("step %d val %s%s", self.step, shown,
                     f" | sample: {texts[0].replace(chr(10), ' / ')[:300]}" if texts else "")
            for i, text in enumerate(texts):
                _append_jsonl(self.out_dir / "samples.jsonl", {"step": self.step, "prompt": i, "text": text})
        return metrics["val/loss"]

    def _log(self, metrics: dict[str, float]) -> None:
        if not self.world.is_main:
            return
        _append_jsonl(self.out_dir / "metrics.jsonl", {"step": self.step, **metrics})
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.step)

    # -- SIGTERM: finish the step, checkpoint, then let the previous handler act ----------------------
    def _catch_sigterm(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "_stop", True))

    def _stop_requested(self) -> bool:
        if not self.world.distributed:
            return self._stop
        # ranks may get the signal a step apart: agree, so all of them save the same step
        return bool(ddist.all_reduce(torch.tensor(float(self._stop), device=self.device), "max").item())

    def _restore_sigterm(self, previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    def _exit_on_sigterm(self, previous: Any) -> None:
        log.warning("SIGTERM: saved step %d, stopping", self.step)
        self._restore_sigterm(previous)
        signal.raise_signal(signal.SIGTERM)  # default: terminate; tracking's handler: raise Terminated
        raise SystemExit(128 + signal.SIGTERM)  # the previous handler ignored it: stop anyway


def _accumulate(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        sums[name] = sums.get(name, 0) + value.detach().float()


def _reduced_means(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Per-micro-batch means over this rank's `count` micro-batches, then over the ranks (one all-reduce)."""
    if not sums:
        return {}
    names = sorted(sums)
    values = ddist.all_reduce(torch.stack([sums[n] for n in names]) / count).tolist()
    return dict(zip(names, values))


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records after `step`: a resumed run logs those steps again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
            pass
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _progress(total: int, initial: int) -> Any:
    try:
        from tqdm import tqdm  # not on a bare GPU node; the log lines still say everything
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
