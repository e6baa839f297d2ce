"""The prompt contrast that contrast gates read: each response token's FFN input with and without its prompt.

A row's final response also runs alone (the IFD encoding, `encode_row(..., ifd=True)`). `response_pairs` lines its
tokens up with the same tokens in the full row; `reference_pass` runs the alone batch with every gate open, keeps
each gated layer's FFN input x̃ and scatters it onto the full batch's positions, so that the next forward pass
of the full rows reads x − x̃ there (`GateSet.reference`, which also gives summary gates each row's end). The
alone pass's NLL is IFD's denominator too, and with the full pass's NLL it gives gain gates the prompt's gain
(`prompt_gain`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qgate.gate import LayerReference, PromptGain
from qgate.stats import decoder_pass, pad, token_nll


def final_run(mask: list[int]) -> list[int]:
    """Positions of the last run of 1s in `mask` (the final response's tokens in a full row)."""
    end = max((i for i, m in enumerate(mask) if m), default=-1)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return list(range(start, end + 1)) if end >= 0 else []


def response_pairs(row: dict) -> list[tuple[int, int]]:
    """(position in the full row, position alone) of the final response's tokens that both encodings hold.

    The pairs stop at the first token that differs (a response cut by truncation, or a last response turn
    that truncation removed from the full row), so a token is only ever compared with itself.
    """
    alone_ids = row.get("ifd_input_ids") or []
    alone = [i for i, m in enumerate(row.get("ifd_score_mask") or []) if m]
    pairs = []
    for full_at, alone_at in zip(final_run(row.get("response_mask") or []), alone):
        if row["input_ids"][full_at] != alone_ids[alone_at]:
            break
        pairs.append((full_at, alone_at))
    return pairs


def may_read_contrast(setting) -> bool:
    """Whether a `gate.contrast` setting can give contrast gates (auto does on dense models): rows then need
    their response alone."""
    return setting in (True, "auto")


def has_alone(row: dict) -> bool:
    return bool(row.get("ifd_input_ids"))


def alone_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The rows' responses alone, padded, with their pairs to the full batch.

    alone_ids, alone_attention, alone_mask [B', T'] (rows with an alone encoding, in order) and
    pairs [K, 4] = (row in the full batch, position there, row in the alone batch, position there).
    """
    with_alone = [i for i, r in enumerate(rows) if has_alone(r)]
    if not with_alone:
        raise ValueError("contrast gates and IFD need rows encoded with their response alone "
                         "(encode_row(..., ifd=True)); no row of this batch has one")
    alone = [rows[i] for i in with_alone]
    pairs = [(full_row, full_at, alone_row, alone_at)
             for alone_row, full_row in enumerate(with_alone)
             for full_at, alone_at in response_pairs(rows[full_row])]
    return {
        "alone_ids": pad([r["ifd_input_ids"] for r in alone], pad_id),
        "alone_attention": pad([[1] * len(r["ifd_input_ids"]) for r in alone], 0),
        "alone_mask": pad([r["ifd_score_mask"] for r in alone], 0),
        "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 4),
    }


def reference_pass(model, alone: dict[str, torch.Tensor], full_attention: torch.Tensor,
                   with_nll: bool = True) -> torch.Tensor | None:
    """Runs the alone batch with every gate open and sets the gates' reference for the next pass of the full rows
    (right-padded, `full_attention` [B, T]). -> NLL of the alone batch [B', T'], or None without `with_nll`

    No gradient flows through this pass: the gates train on the full rows' pass that reads the reference.
    """
    gates = model.qgate_gates
    gates.capture = True
    try:
        with torch.no_grad(), gates.forced(1.0):
            if with_nll:
                nll = token_nll(model, alone["alone_ids"], alone["alone_attention"])  # [B', T']
            else:  # the gates capture x̃ all the same
                decoder_pass(model, alone["alone_ids"], alone["alone_attention"])
                nll = None
        captured = list(gates.captured)  # per gated layer [B', T', H]
    finally:
        gates.capture = False
        gates.clear()
    device = captured[0].device
    full_row, full_at, alone_row, alone_at = alone["pairs"].to(device).unbind(1)  # [K] each
    full_shape = tuple(full_attention.shape)
    known = torch.zeros(full_shape, device=device)  # [B, T]
    known[full_row, full_at] = 1.0
    last = full_attention.to(device).sum(1).long() - 1  # [B]
    references = []
    for x in captured:
        reference = x.new_zeros(*full_shape, x.shape[-1])  # [B, T, H]
        reference[full_row, full_at] = x[alone_row, alone_at]
        references.append(LayerReference(reference, known, last))
    gates.reference = references
    return nll


@contextlib.contextmanager
def contrasted(model, alone: dict[str, torch.Tensor], full_attention: torch.Tensor,
               with_nll: bool = True) -> Iterator[torch.Tensor | None]:
    """Within the block the gates read the prompt contrast of `alone`; yields the alone pass's NLL [B', T']
    (None without `with_nll`)."""
    gates = model.qgate_gates
    try:
        yield reference_pass(model, alone, full_attention, with_nll)
    finally:
        gates.reference = None


def prompt_gain(full_nll: torch.Tensor, alone_nll: torch.Tensor, pairs: torch.Tensor) -> PromptGain:
    """NLL alone − NLL with the prompt on each paired response token, for gain gates.

    full_nll [B, T], alone_nll [B', T'], pairs [K, 4] as `alone_batch` gives them.
    """
    full_row, full_at, alone_row, alone_at = pairs.to(full_nll.device).unbind(1)  # [K] each
    values = torch.zeros_like(full_nll, dtype=torch.float32)  # [B, T]
    known = torch.zeros_like(values)
    values[full_row, full_at] = (alone_nll[alone_row, alone_at] - full_nll[full_row, full_at]).detach().float()
    known[full_row, full_at] = 1.0
    nll = torch.zeros_like(values)
    nll[full_row, full_at] = full_nll[full_row, full_at].detach().float()
    return PromptGain(values, known, nll)
