"""The training loop, shared by pretraining and (later) fine-tuning.

One optimizer step = `accum` micro-batches per rank, so that
    micro_batch x seq_len x world_size x accum = global_batch_tokens.
Per step: set the scheduled lr, forward/backward each micro-batch under autocast (gradients
all-reduced only on the last), clip the gradient norm, refuse non-finite loss or norm, AdamW step.
Every `eval_every` steps: val loss, bits per byte and a short sample; every `checkpoint_every`
steps: an atomic checkpoint. SIGTERM finishes the current step, saves, then exits.

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
from typing import Any

import torch

from llmpipe.errors import UserError
from llmpipe.io import clean_stale_temps
from llmpipe.model import GPT, ModelConfig
from llmpipe.model.flops import detect_peak_flops, mfu
from llmpipe.train import checkpoint as ckpt
from llmpipe.train import distributed as ddist
from llmpipe.train.data import TokenWindows, TrainBatches, val_batches
from llmpipe.train.schedule import Schedule

log = logging.getLogger("llmpipe.train")


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256
    micro_batch: int = 8
    global_batch_tokens: int = 8 * 256
    max_steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    decay_frac: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
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
class Sampler:
    """How to show a sample at each eval without importing the tokenizer here."""
    prompt_ids: list[int]
    decode: Callable[[list[int]], str]
    eos_id: int | None = None


class NonFiniteError(UserError):
    """Loss or gradient norm is nan/inf: the step was not applied (usually the lr is too high)."""


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, train: TokenWindows, val: TokenWindows,
                 out_dir: Path, tokenizer_ref: dict[str, Any], bytes_per_token: float, tracker: Any = None,
                 world: ddist.World = ddist.World(), sampler: Sampler | None = None,
                 data_ref: dict[str, Any] | None = None):
        """`data_ref` identifies the training data (e.g. {"dir", "sha256"} of the token shards); with the
        window count it goes into every checkpoint, and resuming on other data is refused."""
        self.model_cfg, self.cfg, self.world, self.tracker, self.sampler = model_cfg, cfg, world, tracker, sampler
        self.out_dir, self.ckpt_dir = Path(out_dir), Path(out_dir) / "checkpoints"
        self.tokenizer_ref, self.bytes_per_token = tokenizer_ref, bytes_per_token
        self.data_ref = {**(data_ref or {}), "num_windows": train.num_windows}
        self.device = world.device
        self.accum = cfg.accum_steps(world.world_size)
        self.batches = TrainBatches(train, cfg.micro_batch, cfg.seed, self.accum, world.rank)
        self.val = val_batches(val, cfg.eval_batches, cfg.micro_batch, world.rank, world.world_size)
        self.schedule = Schedule(cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)

        torch.manual_seed(cfg.seed)  # same init on every rank
        self.model = GPT(model_cfg).to(self.device)  # the plain module: state dicts, eval, sampling
        self.aliases = ckpt.tied_aliases(self.model)
        self.net = ddist.wrap(self.model, cfg.distributed, world, compile=cfg.compile)  # what trains
        self.opt = torch.optim.AdamW(self.model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     fused=self.device.type == "cuda")
        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.peak_flops = detect_peak_flops(self.device)
        self.step, self.tokens_seen, self.best_val, self.train_time = 0, 0, math.inf, 0.0
        self.last: dict[str, float] = {}  # latest train/val metrics
        self._stop = False

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        lr = self.schedule.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for m, (x, y) in enumerate(self.batches.micro_batches(self.step)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)  # (B, T) each
            with ddist.grad_sync(self.net, enabled=m == self.accum - 1):
                with self.autocast():
                    _, loss = self.net(x, y)
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        loss = ddist.all_reduce(loss_sum / self.accum).item()
        grad_norm = ddist.clip_grad_norm(self.model.parameters(), self.cfg.grad_clip).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            raise NonFiniteError(f"step {self.step + 1}: loss {loss}, grad norm {grad_norm}; the update was not applied. "
                                 f"Last checkpoint: {latest or 'none yet'} (resume from it with a lower lr).")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.cfg.global_batch_tokens
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}

    # -- eval and samples --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.val:
            with self.autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total += loss.float()
        self.model.train()
        val_loss = ddist.all_reduce(total / len(self.val)).item()
        # nats/token -> bits/byte: / ln 2, x tokens per byte of the val text
        return {"val/loss": val_loss, "val/bpb": val_loss / math.log(2) / self.bytes_per_token}

    @torch.no_grad()
    def sample(self) -> str | None:
        """A short continuation of the prompt; every rank runs it (FSDP2 needs all of them for a forward)."""
        if self.sampler is None or self.cfg.sample_tokens == 0:
            return None
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + self.step)  # the same text on every rank, RNG state untouched
            idx = torch.tensor([self.sampler.prompt_ids], dtype=torch.long, device=self.device)
            with self.autocast():
                out = self.model.generate(idx, self.cfg.sample_tokens, temperature=self.cfg.sample_temperature,
                                          top_k=self.cfg.sample_top_k, eos_id=self.sampler.eos_id)
        self.model.train()
        return self.sampler.decode(out[0].tolist())

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, val_loss: float | None = None) -> None:
        """Checkpoint the current step (collective: every rank calls it; rank 0 writes)."""
        model_state = ddist.full_model_state(self.model)
        optim_state = ddist.full_optimizer_state(self.model, self.opt)
        if self.world.is_main:
            state = {"step": self.step, "optimizer": optim_state, "schedule": asdict(self.schedule),
                     "rng": ckpt.rng_state(), "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val,
                     "train_time_s": self.train_time,
                     "data": {"seed": self.cfg.seed, "step": self.step, "num_windows": self.batches.windows.num_windows},
                     "train_config": asdict(self.cfg)}
            meta = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": val_loss,
                    "train_loss": self.last.get("train/loss"), "saved_at": time.time(), "data": self.data_ref}
            path = ckpt.save_checkpoint(ckpt.step_dir(self.ckpt_dir, self.step), model_state, self.model_cfg,
                                        self.tokenizer_ref, meta, state, self.aliases)
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.keep_last)
            log.info("saved checkpoint %s", path)
        ddist.barrier()

    def save_final(self) -> Path:
        """Weights, config and tokenizer reference only: what later stages load."""
        model_state = ddist.full_model_state(self.model)
        final = self.out_dir / "final"
        if self.world.is_main:
            meta = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": self.last.get("val/loss"),
                    "train_loss": self.last.get("train/loss"), "saved_at": time.time(), "data": self.data_ref}
            ckpt.save_checkpoint(final, model_state, self.model_cfg, self.tokenizer_ref, meta, None, self.aliases)
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
        ddist.load_model_state(self.model, weights)
        ddist.load_optimizer_state(self.model, self.opt, state.get("optimizer", {}))
        for group, fresh in zip(self.opt.param_groups, self.model.param_groups(self.cfg.weight_decay)):
            # the saved groups carry the old hyperparameters: this run's config decides them
            group.update(weight_decay=fresh["weight_decay"], betas=(self.cfg.beta1, self.cfg.beta2))
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
        return {"train_loss": self.last.get("train/loss", math.nan), "val_loss": self.last["val/loss"],
                "val_bpb": self.last["val/bpb"], "tokens_seen": self.tokens_seen, "steps": self.step,
                "tokens_per_s": self.tokens_seen / self.train_time if self.train_time else math.nan,
                "params": self.model.num_params()}

    def _speed(self, seconds: float) -> dict[str, float]:
        """Throughput of the step just taken (eval and checkpoint time excluded)."""
        self.train_time += seconds
        tok_s = self.cfg.global_batch_tokens / seconds
        metrics = {"train/tokens_per_s": tok_s, "train/tokens": self.tokens_seen, "train/memory_gb": _memory_gb(self.device)}
        if self.peak_flops:  # GPUs only: a CPU has no meaningful bf16 peak
            metrics["train/mfu"] = mfu(tok_s / self.world.world_size, self.model_cfg, self.cfg.seq_len, self.peak_flops)
        return metrics

    def _eval_and_sample(self) -> float:
        metrics = self.evaluate()
        self.last.update(metrics)
        self.best_val = min(self.best_val, metrics["val/loss"])
        self._log(metrics)
        text = self.sample()
        if text is not None and self.world.is_main:
            log.info("step %d val loss %.4f bpb %.4f | sample: %s", self.step, metrics["val/loss"],
                     metrics["val/bpb"], text.replace("\n", " / ")[:300])
            _append_jsonl(self.out_dir / "samples.jsonl", {"step": self.step, "text": text})
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
