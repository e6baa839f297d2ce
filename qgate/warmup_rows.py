"""The rows warmup trains on, with no Ray: a seeded sample of the corpus read within a bounded budget, encoded with
one corrupted copy each, and cut into per-worker shards of neighbours in length. `ray_jobs/warmup.py` trains on
them with Ray Train.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import random
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from qgate.contrast import may_read_contrast
from qgate.data import iter_file_rows, list_input_files, read_jsonl, write_jsonl
from qgate.encoding import encode_row

log = logging.getLogger("qgate.warmup")

WARMUP_ROWS = "warmup_rows.jsonl"  # beside the gates: (dataset, id) of every row they warmed up on; the self-check


def sample_rows(config: DictConfig, counts: Counter) -> list[dict]:
    """The seeded `warmup_fraction` of the good rows (at most `max_rows`), in a seeded order.

    Keeps the rows of smallest seeded hash among those read, so the sample does not depend on file order. Reading
    stops once `max_rows / warmup_fraction` good rows are read (the fraction then asks for `max_rows` or more), so
    its time does not grow with the corpus: a corpus up to that size is read whole and sampled exactly; a larger one
    is read file by file in a seeded order, and its sample comes from the files read first, the last of them from
    its head (a bias towards those files; `warmup_rows.jsonl` beside the gates lists the rows).
    """
    heap, n_good = [], 0
    limit = float("inf") if config.warmup.max_rows is None else config.warmup.max_rows
    enough = limit / max(config.warmup.warmup_fraction, 1e-9)
    files = sorted(list_input_files(config.data), key=lambda path: _seeded(config.seed, path))
    for path in files:
        counts["files_read"] += 1
        for row in iter_file_rows(path):
            counts["read"] += 1
            if row["reason"]:
                counts[f"reject:{row['reason']}"] += 1
                continue
            n_good += 1
            item = (-_sample_key(config.seed, row), n_good, row)  # a max-heap on the key
            if len(heap) < limit:
                heapq.heappush(heap, item)
            elif item[0] > heap[0][0]:
                heapq.heapreplace(heap, item)
            if n_good >= enough:
                break
        if n_good >= enough:
            break
    k = min(len(heap), max(1, round(config.warmup.warmup_fraction * n_good)))
    counts.update(good=n_good, sampled=k)
    return [row for _, _, row in sorted(heap, key=lambda item: (-item[0], item[1]))[:k]]


OwnAnswers = Callable[[list[dict]], list[dict]]  # rows -> their `qgate.model_negatives.answer_own` copies


def warmup_items(config: DictConfig, tokenizer, own_answers: OwnAnswers | None = None
                 ) -> tuple[list[dict], list[dict], Counter]:
    """The sampled rows, their encoded items (`encode_items`) and the counts of both; raises when no item is left."""
    counts = Counter()
    log.info("sampling warmup rows from %s", config.data)
    rows = sample_rows(config, counts)
    items = encode_items(config, tokenizer, rows, counts, own_answers)
    log.info("warmup rows: %s", dict(sorted(counts.items())))
    if not items:
        raise ValueError(f"no rows to warm up on in {config.data}: {dict(counts)}")
    return rows, items, counts


def write_warmup_rows(gates_dir: Path, rows: list[dict]) -> None:
    """(dataset, id) of every row warmed up on, beside the gates (`WARMUP_ROWS`)."""
    write_jsonl(str(gates_dir / WARMUP_ROWS), [{"dataset": r["dataset"], "id": r["id"]} for r in rows])


def read_warmup_rows(gates_dir: str | Path) -> set[tuple[str, str]] | None:
    """(dataset, id) of every row the gates in `gates_dir` warmed up on; None when the gates do not say."""
    path = Path(gates_dir) / WARMUP_ROWS
    return {(r["dataset"], r["id"]) for r in read_jsonl(str(path))} if path.exists() else None


def _seeded(seed: int, text: str) -> bytes:
    return hashlib.sha1(f"{seed}\0{text}".encode()).digest()


def _sample_key(seed: int, row: dict) -> int:
    digest = hashlib.sha1(f"{seed}\0{row['dataset']}\0{row['id']}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def encode_items(config: DictConfig, tokenizer, rows: list[dict], counts: Counter,
                 own_answers: OwnAnswers | None = None) -> list[dict]:
    """Encoded originals (is_clean=1), each with its encoded corrupted copies (is_clean=0) under `negatives`; a
    `warmup.compose_share` of the copies carry two kinds; a seeded `warmup.own_answers` share of the originals get
    the model's own answer to their prompt as their copy instead (made by `own_answers`, by default the model loaded
    in this process; an original whose answer comes out empty or as its own response keeps its registered copy).

    With negatives on, an original whose copy cannot be made or encoded is left out (`no_negative`), so every
    batch holds as many copies as originals and the loss averages the same way on any number of workers.
    """
    encoded = [_encoded(config, tokenizer, row, counts) for row in rows]
    kept = [(row, enc) for row, enc in zip(rows, encoded) if enc is not None]
    if config.loss.negatives_weight <= 0:
        return [{**enc, "negatives": []} for _, enc in kept]
    from qgate.corruption import compose_copies, corrupt_samples

    indexed = [{**row, "id": str(i)} for i, (row, _) in enumerate(kept)]  # ids may repeat across datasets
    kinds, by_source = list(config.warmup.negative_kinds), {}
    copies = corrupt_samples(indexed, kinds, config.seed)
    if config.warmup.compose_share > 0:
        copies = compose_copies(copies, kinds, config.seed, float(config.warmup.compose_share), pool=indexed)
    if config.warmup.own_answers > 0:
        copies = with_own_answers(config, indexed, copies, own_answers, counts)
    for copy in copies:
        enc = _encoded(config, tokenizer, {**copy, "reason": ""}, counts, clean=0.0, prefix="negative_reject:")
        if enc is not None:
            by_source.setdefault(int(copy["source_id"]), []).append(enc)
    items = [{**enc, "negatives": by_source[i]} for i, (_, enc) in enumerate(kept) if i in by_source]
    counts["no_negative"] += len(kept) - len(items)
    return items


def with_own_answers(config: DictConfig, rows: list[dict], copies: list[dict], own_answers: OwnAnswers | None,
                     counts: Counter) -> list[dict]:
    """`copies` with those of a seeded `warmup.own_answers` share of `rows` replaced by the rows' own answers."""
    share = float(config.warmup.own_answers)
    if not 0 < share <= 1:
        raise ValueError(f"warmup.own_answers is a share of the warmup rows, in (0, 1]; got {share}")
    chosen = random.Random(f"{config.seed}/own").sample(rows, round(share * len(rows)))
    if own_answers is None:
        from qgate.model_negatives import load_and_answer_own

        log.info("warmup.own_answers: the model answers %d rows' prompts in this process", len(chosen))
        own_answers = partial(load_and_answer_own, model=config.model, dtype=config.dtype,
                              trust_remote_code=config.trust_remote_code, seed=config.seed)
    own = {copy["source_id"]: copy for copy in own_answers(chosen)}
    counts["own_answers"] += len(own)
    counts["own_answer_failed"] += len(chosen) - len(own)
    replaced = [copy for copy in copies if copy["source_id"] not in own]
    return replaced + list(own.values())


def _encoded(config: DictConfig, tokenizer, row: dict, counts: Counter, clean: float = 1.0,
             prefix: str = "reject:") -> dict | None:
    contrast = may_read_contrast(config.gate.contrast)  # contrast gates also read each response alone
    out = encode_row(tokenizer, row, config.encoding.max_length, config.encoding.score_on, ifd=contrast)
    if out["reason"]:
        counts[prefix + out["reason"]] += 1
        return None
    kept = ENCODED + (CONTRAST_ENCODED if contrast else ())
    return {**{key: out[key] for key in kept}, "is_clean": clean}


ENCODED = ("input_ids", "score_mask")
CONTRAST_ENCODED = ("response_mask", "ifd_input_ids", "ifd_score_mask")


def shard_items(items: list[dict], batch_size: int, workers: int) -> list[list[dict]]:
    """Rank-strided shards of the items ordered by length, cycled up to a whole number of global batches.

    A global batch is then a run of neighbours in length, padded to little more than its rows (random batches of
    the demo's rows spend about a third of a forward pass on padding); `step_block` still shuffles the batches.
    """
    global_batch = batch_size * workers
    n = -(-len(items) // global_batch) * global_batch
    items = sorted(items, key=longest_sequence)
    padded = [items[i % len(items)] for i in range(n)]
    return [padded[rank::workers] for rank in range(workers)]


def longest_sequence(item: dict) -> int:
    """Tokens of the longest sequence a step pads this item's rows to: the original or one of its copies."""
    return max(len(row["input_ids"]) for row in [item, *item["negatives"]])
