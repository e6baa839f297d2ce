"""Per-sample statistics from one forward pass of a gated model: token NLL, gate logits, S per α, baselines.

`Scorer.score(rows)` is the one scoring routine behind collect (Ray Data actors), serve (HTTP) and the
self-check, so they cannot drift apart. Rows come from `qgate.encoding.encode_row`.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from qgate.gate import GateSet
from qgate.losses import sample_gate_scores
from qgate.settings import COLLECT

STATS_VERSION = 1

log = logging.getLogger("qgate.stats")


def micro_batches(lengths: list[int], max_batch_tokens: int, max_batch_size: int = 64) -> list[list[int]]:
    """Indices grouped longest first so that (rows × longest row) stays under `max_batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (longest * (len(current) + 1) > max_batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [value] * (longest - len(s)) for s in sequences], dtype=torch.long)  # [B, T]


def decoder_pass(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder alone, without the LM head (what gates read, at a fifth less compute). -> [B, T, H]"""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """NLL of each token given the ones before it; position 0 gets 0. [B, T] -> [B, T] float32.

    The LM head runs on chunks of positions so the [B, T, V] logits never exist at once.
    """
    hidden = decoder_pass(model, input_ids, attention_mask)[:, :-1]  # [B, T-1, H]
    targets = input_ids[:, 1:]  # [B, T-1]
    head = model.get_output_embeddings()
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    pieces = [F.cross_entropy(head(flat_h[i:i + chunk]).float(), flat_t[i:i + chunk], reduction="none")
              for i in range(0, flat_t.numel(), chunk)]
    nll = torch.cat(pieces).view_as(targets)
    return F.pad(nll, (1, 0))  # [B, T]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)  # [B]


def layer_scores_batch(gate_logits: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor,
                       alphas: list[float], eps: float) -> torch.Tensor:
    """S for each α, as `qgate.scoring.layer_scores` on the masked tokens. [B, L, T] -> [B, A, L] float64"""
    return torch.stack([sample_gate_scores(gate_logits, nll, mask, alpha, eps, torch.float64) for alpha in alphas],
                       dim=1)


class Scorer:
    """Scores encoded rows with a gated model. Plain class: Ray actors and the HTTP app wrap it."""

    def __init__(self, model, tokenizer, gates: GateSet, alphas=tuple(COLLECT.alphas), eps: float = COLLECT.eps,
                 max_batch_tokens: int = COLLECT.max_batch_tokens, ifd: bool = COLLECT.ifd, raw: bool = COLLECT.raw,
                 autocast_dtype: torch.dtype | None = None, halves_fitted: frozenset = frozenset()):
        self.model, self.gates, self.alphas, self.eps = model.eval(), gates, [float(a) for a in alphas], eps
        # (dataset, id) of the rows the halves read was fitted on: their distance is in-sample, smaller than any
        # other row's (measured on the demo: 0.7-1.0 against 2.6 and more), so they read null (the blend's neutral)
        self.halves_fitted = halves_fitted
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        self.max_batch_tokens, self.ifd, self.raw = max_batch_tokens, ifd, raw
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def _forward(self, ids: list[list[int]], masks: list[list[int]], alone: dict | None = None,
                 with_halves: bool = False):
        """(NLL [B, T], gate logits [B, L, T], score mask [B, T], NLL of the responses alone [B', T'] or None,
        halves distance [B] or None).

        With `alone` (contrast gates), the responses alone run first and the gates read the prompt contrast; with
        `with_halves` (gates that keep the halves read), the rows' pass also gives each row's halves distance.
        """
        from qgate.contrast import contrasted, prompt_gain
        from qgate.halves import read_mask, recorded

        input_ids = pad(ids, self.pad_id).to(self.device)  # [B, T]
        attention = pad([[1] * len(s) for s in ids], 0).to(self.device)  # [B, T]
        halves = recorded(self.model, read_mask(attention)) if with_halves else nullcontext([])
        with self._autocast():
            if alone is None:
                with halves as features:
                    nll, alone_nll = token_nll(self.model, input_ids, attention), None  # [B, T]
            else:
                alone = {k: v.to(self.device) for k, v in alone.items()}
                with contrasted(self.model, alone, attention) as alone_nll, halves as features:
                    nll = token_nll(self.model, input_ids, attention)  # [B, T]
        gain = prompt_gain(nll, alone_nll, alone["pairs"]) if self.gates.gain else None
        gate_logits = self.gates.logits(gain).float()  # [B, L, T]
        self.gates.clear()
        distance = self.gates.halves.distance(torch.stack(features, 1)) if with_halves else None  # [B]
        return nll, gate_logits, pad(masks, 0).to(self.device), alone_nll, distance

    def score(self, rows: list[dict]) -> list[dict]:
        """Per-row stats in input order; rows must carry `input_ids`, `score_mask`, `response_mask`.

        A row that cannot be scored gets `{"reason", "detail"}` instead of stats: its own reason when it comes
        rejected or without tokens, `scoring_error` when the forward pass fails on it alone (a failing batch is
        retried row by row), `non_finite_score` when its NLL or S is NaN or infinite (it would poison a, b, μ).
        """
        results: list[dict | None] = [None] * len(rows)
        todo = [i for i, r in enumerate(rows) if not r.get("reason") and r.get("input_ids")]
        for i in sorted(set(range(len(rows))) - set(todo)):
            results[i] = {"reason": rows[i].get("reason") or "nothing_to_score",
                          "detail": rows[i].get("detail") or "the row has no tokens"}
        for batch in micro_batches([len(rows[i]["input_ids"]) for i in todo], self.max_batch_tokens):
            indices = [todo[j] for j in batch]
            for index, stats in zip(indices, self._score_or_retry([rows[i] for i in indices])):
                results[index] = stats
        return results

    def _score_or_retry(self, rows: list[dict]) -> list[dict]:
        try:
            return [finite_or_reason(stats) for stats in self._score_batch(rows)]
        except Exception as err:  # noqa: BLE001 - one row's failure must not fail the batch
            self.gates.clear()
            if len(rows) == 1:
                return [{"reason": "scoring_error",
                         "detail": f"forward pass failed: {type(err).__name__}: {err}"[:500]}]
            log.warning("scoring a batch of %d rows failed (%s: %.200s); retrying row by row",
                        len(rows), type(err).__name__, err)
            return [stats for row in rows for stats in self._score_or_retry([row])]

    def _score_batch(self, rows: list[dict]) -> list[dict]:
        from qgate.contrast import alone_batch

        alone = alone_batch(rows, self.pad_id) if self.gates.contrast else None
        nll, gate_logits, score_mask, alone_nll, halves = self._forward(
            [r["input_ids"] for r in rows], [r["score_mask"] for r in rows], alone, self.gates.halves is not None)
        response_mask = pad([r["response_mask"] if sum(r.get("response_mask") or []) else r["score_mask"]
                             for r in rows], 0).to(self.device)
        S = layer_scores_batch(gate_logits, nll, score_mask, self.alphas, self.eps)  # [B, A, L]
        mean_nll = masked_mean(nll, score_mask)  # [B]
        response_nll = masked_mean(nll, response_mask)  # [B]
        ifd = self._ifd(rows, response_nll, alone_nll, alone) if self.ifd else [None] * len(rows)
        out = []
        for i, row in enumerate(rows):
            stats = {"n_scored": int(sum(row["score_mask"])), "alphas": self.alphas,
                     "S": S[i].float().cpu().numpy().tolist(), "mean_nll": float(mean_nll[i]),
                     "ppl": float(math.exp(min(float(mean_nll[i]), 80.0))), "response_nll": float(response_nll[i]),
                     "ifd": ifd[i], "halves": self._halves(row, halves, i)}
            if self.raw:
                stats.update(self._raw(gate_logits[i], nll[i], score_mask[i]))
            out.append(stats)
        return out

    def _halves(self, row: dict, halves: torch.Tensor | None, i: int) -> float | None:
        if halves is None or (row.get("dataset"), row.get("id")) in self.halves_fitted:
            return None
        return float(halves[i])

    def _ifd(self, rows: list[dict], conditioned_nll: torch.Tensor, alone_nll: torch.Tensor | None = None,
             alone: dict | None = None) -> list[float | None]:
        """IFD = response loss with the instruction / response loss alone (the contrast pass's, or a second pass)."""
        if not any(r.get("ifd_input_ids") for r in rows):
            return [None] * len(rows)
        if alone_nll is None:
            alone_rows = [r for r in rows if r.get("ifd_input_ids")]
            alone_nll, _, alone_mask, _, _ = self._forward([r["ifd_input_ids"] for r in alone_rows],
                                                        [r["ifd_score_mask"] for r in alone_rows])
        else:
            alone_mask = alone["alone_mask"].to(alone_nll.device)
        alone_mean = iter(masked_mean(alone_nll, alone_mask).tolist())
        out = []
        for i, r in enumerate(rows):
            alone_value = next(alone_mean) if r.get("ifd_input_ids") else None
            defined = alone_value is not None and any(r.get("response_mask") or [])  # no response tokens: no IFD
            out.append(float(conditioned_nll[i]) / max(alone_value, 1e-8) if defined else None)
        return out

    def _raw(self, gate_logits: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor) -> dict:
        keep = mask.bool()
        return {"raw_gate_logits": gate_logits[:, keep].cpu().numpy().astype(np.float16).tobytes(),  # [L, T_s]
                "raw_nll": nll[keep].cpu().numpy().astype(np.float16).tobytes()}  # [T_s]


def finite_or_reason(stats: dict) -> dict:
    """`stats` when its NLL and S are finite (a non-finite IFD or halves distance becomes None), else a
    `non_finite_score` reason."""
    values = [stats["mean_nll"], stats["response_nll"], *(v for per_alpha in stats["S"] for v in per_alpha)]
    if not all(math.isfinite(v) for v in values):
        return {"reason": "non_finite_score",
                "detail": f"NLL or S is not finite (mean NLL {stats['mean_nll']}, response NLL "
                          f"{stats['response_nll']}); the model overflows on this row"}
    for companion in ("ifd", "halves"):  # a score beside q that is NaN or infinite is unknown, not a reason
        if stats.get(companion) is not None and not math.isfinite(stats[companion]):
            stats[companion] = None
    return stats


def load_scorer(model: str, gates_dir: str, dtype: str = "float32", autocast: str = "auto", device: str = "cpu",
                trust_remote_code: bool = False, **scorer_args) -> Scorer:
    """The base model with its saved gates, in a Scorer: the one construction behind collect, the self-check and
    serve. `scorer_args`: alphas, eps, max_batch_tokens, ifd, raw; `qgate.config.scorer_config` gives them all
    from a run config."""
    from qgate.gate import build_gated_model
    from qgate.models import autocast_dtype

    net, tokenizer, gates = build_gated_model(model, gates_dir, dtype=dtype, device=device,
                                              trust_remote_code=trust_remote_code)
    return Scorer(net, tokenizer, gates, autocast_dtype=autocast_dtype(autocast, device),
                  halves_fitted=halves_fit_rows(gates, gates_dir), **scorer_args)


def halves_fit_rows(gates: GateSet, gates_dir: str) -> frozenset:
    """(dataset, id) of the rows the gates' halves read was fitted on: the warmup rows beside the gates."""
    from qgate.warmup_rows import read_warmup_rows

    return frozenset((read_warmup_rows(gates_dir) or set()) if gates.halves is not None else ())


def decode_raw(row: dict, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """(gate_logits [L, T_s], nll [T_s]) as float32 from a stats row written with raw=true."""
    nll = np.frombuffer(row["raw_nll"], dtype=np.float16).astype(np.float32)
    logits = np.frombuffer(row["raw_gate_logits"], dtype=np.float16).astype(np.float32)
    return logits.reshape(n_layers, nll.shape[0]), nll
