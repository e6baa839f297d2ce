"""Stage 4, finetune: LoRA (peft) on a causal LM with the loss on assistant tokens only. No Ray here.

Rows are chat conversations (`messages`); `encode_row(score_on="response")` renders them with the
tokenizer's chat template and marks the assistant-content tokens, which are the only ones the loss sees.
Ray Train's worker loop (`ray_jobs/finetune.py`) passes `rank`, `world_size` and `prepare` (its
`prepare_model`); called without them, `train` trains in this process. `method=full` trains every weight
instead of LoRA's, for a small target trained from scratch (`qgate compare` on the fact corpus).
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from qgate.data import iter_file_rows, list_input_files
from qgate.encoding import encode_row
from qgate.models import autocast_dtype
from qgate.stats import decoder_pass, pad

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """What a LoRA finetune needs beyond the model and the rows."""

    rank: int = 16  # LoRA rank r (the seeds use 128 on 7B models)
    alpha: float = 32.0  # lora_alpha; the update is scaled by alpha / rank (the seeds: alpha = 2 · rank)
    dropout: float = 0.05  # dropout on the LoRA input
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # Linear names adapted
    lr: float = 2e-4  # AdamW peak learning rate
    schedule: str = "constant"  # learning rate over the steps: constant | cosine | linear (transformers' schedulers)
    warmup_ratio: float = 0.0  # share of the steps over which the learning rate rises linearly from 0 to lr
    epochs: int = 1  # passes over the rows
    batch_size: int = 8  # rows per worker per step (global batch = batch_size × workers)
    max_length: int = 512  # tokens per row; longer rows are truncated
    seed: int = 0  # LoRA init and row order
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    autocast: str = "auto"  # matmul dtype: auto (bf16 on GPU, none on CPU) | bf16 | fp16 | none
    method: str = "lora"  # lora: LoRA weights only | full: every weight (a small or from-scratch target)


SETTING_KEYS = ("rank", "alpha", "dropout", "target_modules", "lr", "schedule", "warmup_ratio", "epochs",
                "batch_size", "max_length", "max_grad_norm", "method")
SCHEDULES = ("constant", "cosine", "linear")


def settings_of(config: DictConfig, seed: int | None = None) -> LoraSettings:
    """The run's `finetune` settings, with the run's seed unless `seed` is given."""
    section = config.finetune
    values = {key: section[key] for key in SETTING_KEYS}
    values["target_modules"] = list(values["target_modules"])
    return LoraSettings(**values, seed=config.seed if seed is None else seed, autocast=config.autocast)


# ---- rows to tensors -----------------------------------------------------------------------------


def load_rows(spec) -> tuple[list[dict], Counter]:
    """The good rows (`dataset`, `id`, `messages`) of an input spec, and counts of read and rejected rows."""
    rows, counts = [], Counter()
    for path in list_input_files(spec):
        for row in iter_file_rows(path):
            counts["read"] += 1
            if row["reason"]:
                counts[f"reject:{row['reason']}"] += 1
            else:
                rows.append({"dataset": row["dataset"], "id": row["id"], "messages": row["messages"]})
    return rows, counts


def encode_rows(tokenizer, rows: list[dict], max_length: int) -> tuple[list[dict], Counter]:
    """`{input_ids, loss_mask}` for each row that has an assistant token to learn from; drops by reason."""
    encoded, dropped = [], Counter()
    for row in rows:
        out = encode_row(tokenizer, {"reason": "", **row}, max_length, score_on="response", ifd=False)
        if out["reason"]:
            dropped[out["reason"]] += 1
            continue
        encoded.append({"input_ids": out["input_ids"], "loss_mask": out["score_mask"]})
    return encoded, dropped


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, loss_mask: [B, T]."""
    return {"input_ids": pad([i["input_ids"] for i in items], pad_id),
            "attention_mask": pad([[1] * len(i["input_ids"]) for i in items], 0),
            "loss_mask": pad([i["loss_mask"] for i in items], 0)}


class ResponseLoss(nn.Module):
    """Summed NLL of the masked tokens and their count, as one module so DDP can wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = masked_nll(self.model, input_ids, attention_mask, loss_mask)  # [B], [B]
        return sums.sum(), counts.sum()


def masked_nll(model: nn.Module, input_ids, attention_mask, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed NLL of the tokens `loss_mask` marks and their count: [B, T] -> [B], [B] float32.

    The LM head runs on the marked positions only (the answer is a small share of a chat row's tokens).
    """
    hidden = decoder_pass(model, input_ids, attention_mask)[:, :-1]  # [B, T-1, H]
    marked = loss_mask[:, 1:].bool()  # [B, T-1]: token t+1 is predicted from position t
    logits = model.get_output_embeddings()(hidden[marked]).float()  # [M, V]
    nll = F.cross_entropy(logits, input_ids[:, 1:][marked], reduction="none")  # [M]
    rows = marked.nonzero()[:, 0]  # [M]
    sums = torch.zeros(input_ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)  # [B]
    return sums, marked.sum(1).to(nll.dtype)


# ---- LoRA ----------------------------------------------------------------------------------------


def add_lora(model: nn.Module, settings: LoraSettings):
    """`model` as a PeftModel with fresh LoRA weights (seeded); only the LoRA weights train."""
    from peft import LoraConfig, get_peft_model

    targets = present_targets(model, settings.target_modules)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        return get_peft_model(model, config)


def present_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The target names that some Linear of `model` has; raises when none does."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = [t for t in targets if t in names]
    if not found:
        raise ValueError(f"none of the LoRA target modules {targets} is a Linear of this model; "
                         f"its Linear names: {sorted(names)}")
    return found


def epoch_batches(n_items: int, settings: LoraSettings, epoch: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's item indices per step: a seeded order per epoch, cycled to whole global batches."""
    order = list(range(n_items))
    random.Random(f"{settings.seed}:{epoch}").shuffle(order)
    global_batch = settings.batch_size * world_size
    n = -(-n_items // global_batch) * global_batch
    order = [order[i % n_items] for i in range(n)]
    steps = [order[s:s + global_batch] for s in range(0, n, global_batch)]
    return [step[rank * settings.batch_size:(rank + 1) * settings.batch_size] for step in steps]


def train(model: nn.Module, tokenizer, rows: list[dict], settings: LoraSettings, rank: int = 0,
          world_size: int = 1, prepare: Callable[[nn.Module], nn.Module] | None = None,
          on_epoch: Callable[[dict], None] | None = None):
    """Finetune `model` on `rows`; returns the PeftModel (LoRA) or the model itself (full), in eval mode; save
    either with `save_pretrained`.

    Every rank must get the same rows: each takes its slice of every global batch. `prepare` wraps the
    loss module for distributed training (Ray Train's `prepare_model`: device placement and DDP).
    """
    items, dropped = encode_rows(tokenizer, rows, settings.max_length)
    if not items:
        raise ValueError(f"no row to finetune on: {len(rows)} rows, dropped {dict(dropped)}")
    if settings.method not in ("lora", "full"):
        raise ValueError(f"finetune method {settings.method!r}: lora | full")
    if settings.schedule not in SCHEDULES or not 0.0 <= settings.warmup_ratio < 1.0:
        raise ValueError(f"finetune schedule {settings.schedule!r} with warmup_ratio {settings.warmup_ratio}: "
                         f"one of {SCHEDULES}, warmup_ratio in [0, 1)")
    peft_model = add_lora(model, settings) if settings.method == "lora" else model.requires_grad_(True)
    objective = prepare(ResponseLoss(peft_model)) if prepare else ResponseLoss(peft_model)
    device = next(peft_model.parameters()).device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = learning_rate_schedule(optimizer, settings, len(items), world_size)
    autocast = autocast_dtype(settings.autocast, device.type)
    objective.train()
    for epoch in range(settings.epochs):
        losses = [_step(objective, optimizer, scheduler, params,
                        collate([items[i] for i in batch], tokenizer.pad_token_id), device, autocast,
                        settings.max_grad_norm)
                  for batch in epoch_batches(len(items), settings, epoch, rank, world_size)]
        if on_epoch:
            on_epoch({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "steps": len(losses),
                      "rows": len(items), "dropped": dict(dropped)})
    return peft_model.eval()


def learning_rate_schedule(optimizer, settings: LoraSettings, n_items: int, world_size: int):
    """transformers' scheduler of `settings.schedule` over every step of the run, warming up linearly first."""
    from transformers import get_scheduler

    steps = settings.epochs * -(-n_items // (settings.batch_size * world_size))
    name = "constant_with_warmup" if settings.schedule == "constant" else settings.schedule  # the same at 0 warmup
    return get_scheduler(name, optimizer, num_warmup_steps=round(settings.warmup_ratio * steps),
                         num_training_steps=steps)


def _step(objective, optimizer, scheduler, params, batch, device, autocast, max_grad_norm: float) -> float:
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        total, count = objective(**batch)
    loss = total / count.clamp_min(1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return loss.item()


# ---- evaluation ----------------------------------------------------------------------------------


def evaluate_model(model: nn.Module, tokenizer, heldout: list[dict], mc: list[dict] | None, max_length: int,
                   batch_size: int = 8, autocast: str = "none") -> dict:
    """The held-out response loss with its standard error over rows and, with `mc` items, multiple choice."""
    nll, count = response_nll(model, tokenizer, heldout, max_length, batch_size, autocast)
    if not count.sum():
        raise ValueError(f"no held-out row has an assistant token within {max_length} tokens")
    per_row = nll[count > 0] / count[count > 0]  # [rows]
    out = {"heldout_loss": float(nll.sum() / count.sum()),
           "heldout_se": float(per_row.std(ddof=1) / np.sqrt(len(per_row))) if len(per_row) > 1 else 0.0}
    if mc:
        out["mc"] = multiple_choice(model, tokenizer, mc, max_length, batch_size, autocast)
    return out


def heldout_loss(model: nn.Module, tokenizer, rows: list[dict], max_length: int, batch_size: int = 8,
                 autocast: str = "none") -> float:
    """Mean NLL per assistant token over all `rows` (the held-out response loss; lower is better)."""
    nll, count = response_nll(model, tokenizer, rows, max_length, batch_size, autocast)
    if not count.sum():
        raise ValueError(f"no held-out row has an assistant token within {max_length} tokens")
    return float(nll.sum() / count.sum())


def multiple_choice(model: nn.Module, tokenizer, items: list[dict], max_length: int, batch_size: int = 8,
                    autocast: str = "none") -> dict:
    """Accuracy on `{question, choices, label}` items, each choice scored as the answer turn of a chat: `acc` by
    summed log-likelihood, `acc_norm` by log-likelihood per character (lm-eval's two), and `correct` per item."""
    rows = [{"dataset": "mc", "id": f"{i}/{c}", "messages": [{"role": "user", "content": item["question"]},
                                                             {"role": "assistant", "content": choice}]}
            for i, item in enumerate(items) for c, choice in enumerate(item["choices"])]
    nll, _ = response_nll(model, tokenizer, rows, max_length, batch_size, autocast)
    out, start = {"acc": [], "acc_norm": []}, 0
    for item in items:
        n = len(item["choices"])
        chars = np.array([max(len(c), 1) for c in item["choices"]], dtype=np.float64)  # [n]
        out["acc"].append(int(np.argmin(nll[start:start + n])) == item["label"])
        out["acc_norm"].append(int(np.argmin(nll[start:start + n] / chars)) == item["label"])
        start += n
    return {"acc": float(np.mean(out["acc"])), "acc_norm": float(np.mean(out["acc_norm"])), "n": len(items),
            "correct": [int(c) for c in out["acc_norm"]]}


@torch.inference_mode()
def response_nll(model: nn.Module, tokenizer, rows: list[dict], max_length: int, batch_size: int = 8,
                 autocast: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each row's assistant tokens and their count, [N] each, in the order of `rows` (a row with
    no assistant token within `max_length` gets 0 and 0)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = autocast_dtype(autocast, device.type)
    nll, count = np.zeros(len(rows)), np.zeros(len(rows))
    encoded = [(i, encode_row(tokenizer, {"reason": "", **row}, max_length, score_on="response", ifd=False))
               for i, row in enumerate(rows)]
    items = sorted(((i, e) for i, e in encoded if not e["reason"]), key=lambda ie: len(ie[1]["input_ids"]))
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = collate([{"input_ids": e["input_ids"], "loss_mask": e["score_mask"]} for _, e in chunk],
                        tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            sums, counts = masked_nll(model, **batch)  # [B], [B]
        for (i, _), s, n in zip(chunk, sums.tolist(), counts.tolist()):
            nll[i], count[i] = s, n
    return nll, count


# ---- the run's outputs ---------------------------------------------------------------------------


def copy_adapter(source: Path, adapter_dir: Path) -> None:
    """Copy the saved adapter (or model) in `source` to `adapter_dir`, which is replaced whole."""
    partial = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    partial.rename(adapter_dir)


def heldout_line(metrics: dict) -> str:
    if "after" not in metrics:
        return ""
    return f"; held-out response loss {metrics['before']['heldout_loss']:.4f} -> {metrics['after']['heldout_loss']:.4f}"
