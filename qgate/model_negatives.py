"""Negatives the model makes itself: its own sampled answer to another row's prompt, set under this row's prompt
(`answer_elsewhere`), or to this row's own prompt (`answer_own`).

Copies made by the registered corruption kinds carry marks of their kind (a shuffle, a loop, residue), and gates
trained on them learn those marks. The model's own answer to a different question carries none: it is fluent, in the
model's style, on some topic, and it does not answer the prompt it stands under. What is left to learn is whether a
response answers its prompt. Its near-greedy answer to the row's own prompt is the other end: the response the
prompt explains best, which teaches the model nothing it would not say itself (an echo, a boilerplate reply).
"""

from __future__ import annotations

import random

import torch

from qgate.corruption import prompt_of, response_of, with_response

KIND = "model_answer_elsewhere"  # the `corruption` of these copies
OWN_KIND = "model_own_answer"


def answer_elsewhere(rows: list[dict], model, tokenizer, seed: int = 0, max_new_tokens: int = 48,
                     temperature: float = 0.8, batch_size: int = 16) -> list[dict]:
    """One copy per row (`source_id`, `corruption` set): its response replaced by the model's sampled answer to the
    prompt of another row (a seeded derangement, so no row answers its own prompt). Rows of one row get none."""
    if len(rows) < 2:
        return []
    order = random.Random(f"{seed}/elsewhere").sample(range(len(rows)), len(rows))
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # row -> whose prompt it answers
    answers = sampled_answers(model, tokenizer, [rows[other[i]]["messages"] for i in range(len(rows))], seed,
                              max_new_tokens, temperature, batch_size)
    return [{**row, "messages": with_response(row["messages"], answer), "source_id": row["id"], "corruption": KIND}
            for row, answer in zip(rows, answers) if answer.strip()]


def answer_own(rows: list[dict], model, tokenizer, seed: int = 0, max_new_tokens: int = 48,
               temperature: float = 0.3, batch_size: int = 16) -> list[dict]:
    """One copy per row (`source_id`, `corruption` set): its response replaced by the model's own low-temperature
    answer to the same prompt. Rows whose answer comes out empty or as their own response get none."""
    answers = sampled_answers(model, tokenizer, [row["messages"] for row in rows], seed, max_new_tokens, temperature,
                              batch_size)
    return [{**row, "messages": with_response(row["messages"], answer), "source_id": row["id"], "corruption": OWN_KIND}
            for row, answer in zip(rows, answers)
            if answer.strip() and answer != " ".join(response_of(row["messages"]).split())]


def load_and_answer_own(rows: list[dict], model: str, dtype: str = "float32", trust_remote_code: bool = False,
                        seed: int = 0) -> list[dict]:
    """`answer_own` by a freshly loaded `model` (on the GPU when there is one): the warmup driver's task for
    `warmup.own_answers`, which it runs where the scoring hardware is."""
    from qgate.models import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return answer_own(rows, loaded, tokenizer, seed)


@torch.inference_mode()
def sampled_answers(model, tokenizer, conversations: list[list[dict]], seed: int = 0, max_new_tokens: int = 48,
                    temperature: float = 0.8, batch_size: int = 16) -> list[str]:
    """The model's sampled answer to the last user turn of each conversation (a single-turn chat of that turn); the
    same conversations, seed and batch size give the same answers."""
    device = next(model.parameters()).device
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt_of(m)}], tokenize=True,
                                             add_generation_prompt=True) for m in conversations]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    answers: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = _left_padded(chunk, tokenizer.pad_token_id, device)  # [B, T] each
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)  # [B] new tokens
    return [" ".join(a.split()) for a in answers]


def _left_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, as batched generation needs: ids and attention mask [B, T_max]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)
