"""Corrupted copies of good samples: negatives for warmup, the direction self-check, planted-noise benchmarks.

A corruption is a pure function `fn(messages, rng, pool) -> messages | None` that returns new messages whose
last assistant response is damaged (the prompt turns untouched), or None when it does not apply (too short,
nothing to swap with). `pool` holds other samples' messages; it may contain the sample itself, so every kind
that draws from it skips entries whose response equals the one being corrupted. Register your own with
`@register("name")`.

    from qgate.corruption import corrupt_samples, DEFAULT_WARMUP_KINDS
    negatives = corrupt_samples(rows, DEFAULT_WARMUP_KINDS, seed=0)

Warmup and benchmark take their kinds as arguments, so the kinds a model was shown (`DEFAULT_WARMUP_KINDS`)
and the kinds it was not (`DEFAULT_HELDOUT_KINDS`) can be reported apart.
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
from collections.abc import Callable, Sequence

from qgate.settings import SELFCHECK, WARMUP

Messages = list[dict]
Corruption = Callable[[Messages, random.Random, list[Messages]], "Messages | None"]

CORRUPTIONS: dict[str, Corruption] = {}
POOL_SCOPES: dict[str, str] = {}  # kind -> "corpus" (pool = every sample) or "dataset" (same dataset only)

DEFAULT_WARMUP_KINDS = tuple(WARMUP.negative_kinds)  # what warmup shows the gates
DEFAULT_HELDOUT_KINDS = tuple(k for k in SELFCHECK.kinds if k not in DEFAULT_WARMUP_KINDS)  # what it holds out

CHAR_NOISE_RATE = 0.15
SWAP_CANDIDATES = 16  # random pool entries drawn to find one with a different response
FLUENT_WRONG_CANDIDATES = 256  # pool entries compared by prompt overlap to find an on-topic wrong answer
NEAR_DUPLICATE = 0.5  # word overlap (Jaccard) above which another answer says the same thing: not wrong


def register(name: str, pool: str = "corpus") -> Callable[[Corruption], Corruption]:
    """Decorator adding a corruption under `name`; `pool="dataset"` restricts its pool to the same dataset."""
    if pool not in ("corpus", "dataset"):
        raise ValueError(f"pool must be 'corpus' or 'dataset', got {pool!r}")

    def add(fn: Corruption) -> Corruption:
        CORRUPTIONS[name] = fn
        POOL_SCOPES[name] = pool
        return fn

    return add


# ---- message helpers -----------------------------------------------------------------------------


def response_of(messages: Messages) -> str:
    """Content of the last assistant turn ("" when there is none)."""
    index = _last_assistant(messages)
    return "" if index is None else messages[index]["content"]


def prompt_of(messages: Messages) -> str:
    """Content of the last user turn before the last assistant turn ("" when there is none)."""
    end = _last_assistant(messages)
    users = [m["content"] for m in messages[:end] if m["role"] == "user"]
    return users[-1] if users else ""


def with_response(messages: Messages, text: str) -> Messages:
    """A copy of `messages` whose last assistant turn says `text`."""
    out = [dict(m) for m in messages]
    out[_last_assistant(out)]["content"] = text
    return out


def _last_assistant(messages: Messages) -> int | None:
    indices = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return indices[-1] if indices else None


def _others(messages: Messages, rng: random.Random, pool: list[Messages], k: int) -> list[Messages]:
    """Up to `k` random pool entries whose response differs from this one and is not empty."""
    own = response_of(messages)
    drawn = rng.sample(pool, k=min(k, len(pool)))
    return [m for m in drawn if _has_text(response_of(m)) and response_of(m) != own]


def _has_text(text: str) -> bool:
    return bool(text) and not text.isspace()  # isspace stops at the first other character: no copy of a long text


# ---- applying corruptions ------------------------------------------------------------------------


def apply_corruption(kind: str, messages: Messages, rng: random.Random,
                     pool: list[Messages]) -> Messages | None:
    """Run one registered kind; None when it does not apply, leaves the response unchanged or empty, or
    touches any turn but the last assistant one."""
    if _last_assistant(messages) is None:
        return None
    out = CORRUPTIONS[kind](messages, rng, pool)
    if out is None or response_of(out) == response_of(messages) or not response_of(out).strip():
        return None
    return out if _prompt_turns(out) == _prompt_turns(messages) else None


def _prompt_turns(messages: Messages) -> Messages:
    end = _last_assistant(messages)
    return messages[:end] + messages[end + 1:]


def corrupt_samples(samples: Sequence[dict], kinds: Sequence[str], seed: int, per_sample: int = 1,
                    pool: Sequence[dict] | None = None) -> list[dict]:
    """`per_sample` corrupted copies of each sample, kinds taken round-robin; deterministic for `seed`.

    Each copy is `{id: f"{id}~{kind}", dataset, messages, corruption: kind, source_id: id}`. When the turn's
    kind does not apply, the next kinds are tried in order; a sample where none applies gets fewer copies
    (possibly none), so no copy is ever identical to its original. One sample never gets the same kind
    twice, so at most `len(kinds)` copies each. `pool` (default: `samples`) supplies the responses that the
    swapping kinds draw from.
    """
    kinds = _checked_kinds(kinds)
    pools = _Pools(samples if pool is None else pool)
    out, turn = [], 0
    for sample in samples:
        used: set[str] = set()
        for _ in range(per_sample):
            start = turn % len(kinds)
            order = [k for k in kinds[start:] + kinds[:start] if k not in used]
            copy = _first_applicable(sample, order, seed, pools)
            if copy is None:
                break
            used.add(copy["corruption"])
            out.append(copy)
            turn += 1
    return out


def compose_copies(copies: Sequence[dict], kinds: Sequence[str], seed: int, share: float,
                   pool: Sequence[dict] | None = None) -> list[dict]:
    """`copies` (of `corrupt_samples`) where an evenly spread `share` of them carry a second kind on top of their
    first, another one than the first, taken round-robin: more varied negatives, with mixes of faults warmup never
    shows apart. A composed copy keeps its `source_id` and names both kinds in `corruption` ("a+b"). `pool`
    (default: `copies`) supplies the responses that the swapping kinds draw from."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    kinds, pool = _checked_kinds(kinds), copies if pool is None else pool
    chosen = [i for i in range(len(copies)) if int((i + 1) * share) > int(i * share)]
    out = list(copies)
    for n, i in enumerate(chosen):
        first, start = copies[i], n % len(kinds)
        order = [k for k in kinds[start:] + kinds[:start] if k != first["corruption"]]
        again = corrupt_samples([first], order, seed + 7 + n, pool=pool) if order else []
        if again:
            out[i] = {**again[0], "source_id": first["source_id"],  # its id: the first copy's id ~ second kind
                      "corruption": f"{first['corruption']}+{again[0]['corruption']}"}
    return out


def _checked_kinds(kinds: Sequence[str]) -> list[str]:
    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in CORRUPTIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown corruption kinds {unknown} (registered: {sorted(CORRUPTIONS)})")
    return kinds


class _Pools:
    """Other samples' messages, whole corpus and per dataset."""

    def __init__(self, samples: Sequence[dict]):
        self.corpus = [s["messages"] for s in samples]
        self.by_dataset: dict[str, list[Messages]] = {}
        for s in samples:
            self.by_dataset.setdefault(s.get("dataset"), []).append(s["messages"])

    def for_kind(self, kind: str, dataset) -> list[Messages]:
        return self.by_dataset.get(dataset, []) if POOL_SCOPES[kind] == "dataset" else self.corpus


def _first_applicable(sample: dict, kinds: list[str], seed: int, pools: _Pools) -> dict | None:
    for kind in kinds:
        rng = random.Random(f"{seed}/{sample['id']}/{kind}")
        pool = pools.for_kind(kind, sample.get("dataset"))
        messages = apply_corruption(kind, sample["messages"], rng, pool)
        if messages is not None:
            return {"id": f"{sample['id']}~{kind}", "dataset": sample.get("dataset"), "messages": messages,
                    "corruption": kind, "source_id": sample["id"]}
    return None


# ---- the built-in kinds --------------------------------------------------------------------------


@register("response_swap")
def response_swap(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response of another, random sample."""
    others = _others(messages, rng, pool, k=SWAP_CANDIDATES)
    return with_response(messages, response_of(others[0])) if others else None


@register("word_shuffle")
def word_shuffle(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response's words in random order."""
    words = response_of(messages).split()
    if len(set(words)) < 2:
        return None
    shuffled = list(words)
    while shuffled == words:
        rng.shuffle(shuffled)
    return with_response(messages, " ".join(shuffled))


@register("truncate")
def truncate(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response cut to 10-40% of its length, in the middle of a word."""
    text = response_of(messages)
    target = int(len(text) * rng.uniform(0.1, 0.4))
    cut = _nearest_mid_word(text, target) if len(text) >= 40 else None
    return None if cut is None else with_response(messages, text[:cut])


def _nearest_mid_word(text: str, target: int) -> int | None:
    """The position between two letters or digits nearest to `target` (the earlier one on a tie), else None.

    Scans outward from `target`, so a long text costs only the distance to the nearest word."""
    for distance in range(len(text)):
        for i in (target - distance, target + distance):
            if 1 <= i < len(text) and text[i - 1].isalnum() and text[i].isalnum():
                return i
    return None


@register("char_noise")
def char_noise(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """About 15% of the characters substituted, dropped or duplicated."""
    text = response_of(messages)
    if len(text) < 20:
        return None
    noisy = {i for i in range(len(text)) if rng.random() < CHAR_NOISE_RATE} or {rng.randrange(len(text))}
    out = [_char_edit(ch, rng) if i in noisy else ch for i, ch in enumerate(text)]
    return with_response(messages, "".join(out))


def _char_edit(ch: str, rng: random.Random) -> str:
    op = rng.choice(("substitute", "drop", "duplicate"))
    if op == "substitute":
        return rng.choice([c for c in string.ascii_lowercase if c != ch.lower()])
    return "" if op == "drop" else ch + ch


@register("repetition_loop")
def repetition_loop(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response up to a phrase of it, then that phrase over and over until 1.5x the original length."""
    text = response_of(messages)
    words = text.split()
    if len(words) < 6:
        return None
    size = rng.randint(3, min(8, len(words) // 2))
    start = rng.randrange(len(words) - size + 1)
    phrase, head = words[start:start + size], words[:start + size]
    # Repeats until the text reaches 1.5x the original, counted rather than re-joined: linear in the length.
    shortfall = 1.5 * len(text) - len(" ".join(head))
    repeats = max(0, math.ceil(shortfall / (len(" ".join(phrase)) + 1)))
    return with_response(messages, " ".join(head + phrase * repeats))


@register("gibberish")
def gibberish(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """Random letter strings of word-like length, in sentences as long as the response."""
    n_words = max(len(response_of(messages).split()), 5)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(n_words)]
    sentences, i = [], 0
    while i < n_words:
        size = rng.randint(6, 14)
        chunk = words[i:i + size]
        sentences.append(" ".join(chunk).capitalize() + ".")
        i += size
    return with_response(messages, " ".join(sentences))


REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    ("As an AI language model, I don't have personal opinions or the ability to browse the internet, "
     "so I cannot provide that information."),
    "I apologize, but I am unable to assist with this. If you have any other questions, feel free to ask!",
    "As an AI developed to be helpful and harmless, I must decline to answer this question.",
    ("I'm just an AI and I don't have access to that information. Please consult the official documentation "
     "or a qualified professional."),
    "Sorry, I cannot fulfill this request. It goes against my guidelines.",
    ("As a large language model, I cannot guarantee the accuracy of this information. "
     "Is there anything else I can help you with?"),
    "I understand your question, but I'm not able to provide an answer to it at this time.",
)


@register("refusal_boilerplate")
def refusal_boilerplate(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """One of several canned refusals or "As an AI language model..." texts."""
    options = [r for r in REFUSALS if r != response_of(messages)]
    return with_response(messages, rng.choice(options))


_RESIDUE_HEAD = (
    "Home | About | Blog | Products | Contact | Login",
    "Skip to main content\nMenu\nSearch",
    ("We use cookies to improve your experience. By continuing to browse, you agree to our Cookie Policy. "
     "[Accept all] [Manage preferences]"),
    '<div class="nav"><a href="/">Home</a> &raquo; <a href="/docs/">Docs</a> &raquo; Reference</div>',
)
_RESIDUE_MIDDLE = ("Advertisement", "Read more &raquo;", "[Click here to subscribe]", "<br/><br/>",
                   "Related posts: 10 tips you need to know", "&nbsp;&nbsp;&nbsp;")
_RESIDUE_TAIL = (
    "Share on Twitter | Share on Facebook | Pin it | Email",
    "Page 2 of 5   &laquo; Prev  1  2  3  4  5  Next &raquo;",
    "&copy; 2019 All rights reserved. | Privacy Policy | Terms of Use | Sitemap",
    "Posted by admin at 10:42 AM | 0 comments | Labels: python, tutorial",
)


@register("scraped_residue")
def scraped_residue(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response in HTML tags and entities, between navigation, cookie banners and share links."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", response_of(messages)) if s]
    if not sentences:
        return None
    body = []
    for sentence in sentences:
        body.append(f"<p>{_html_entities(sentence)}</p>")
        if rng.random() < 0.3:
            body.append(rng.choice(_RESIDUE_MIDDLE))
    head = rng.sample(_RESIDUE_HEAD, k=rng.randint(1, 2))
    tail = rng.sample(_RESIDUE_TAIL, k=rng.randint(1, 3))
    return with_response(messages, "\n".join(head + body + tail))


def _html_entities(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("'", "&#39;").replace("<", "&lt;")


@register("fluent_wrong", pool="dataset")
def fluent_wrong(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """A fluent wrong answer: the response to the most similar other question of the same dataset
    (answers repeating this one's words are skipped), else this response with numbers changed and
    opposites swapped."""
    other = _on_topic_answer(messages, rng, pool)
    if other is not None:
        return with_response(messages, other)
    response = response_of(messages)
    falsified = _falsify(response, rng)
    return with_response(messages, falsified) if falsified != response else None


def _on_topic_answer(messages: Messages, rng: random.Random, pool: list[Messages]) -> str | None:
    """The response to the pool's question sharing most words with this one's (answers repeating this
    one's words skipped), among `FLUENT_WRONG_CANDIDATES` drawn; None when none is left."""
    prompt, own_answer = prompt_of(messages), _word_set(response_of(messages))
    others = [m for m in _others(messages, rng, pool, k=FLUENT_WRONG_CANDIDATES)
              if prompt_of(m) != prompt and _jaccard(own_answer, _word_set(response_of(m))) < NEAR_DUPLICATE]
    if not others:
        return None
    own = _word_set(prompt)
    return response_of(max(others, key=lambda m: sum(map(len, own & _word_set(prompt_of(m))))))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


@functools.lru_cache(maxsize=4096)  # pool entries are compared with many samples: their word sets once each
def _word_set(text: str) -> frozenset[str]:
    """Lowercase words and identifier parts; shared long words (names) count more than short ones."""
    return frozenset(re.findall(r"[a-z0-9_]{2,}", text.lower()))


_OPPOSITES = {"true": "false", "always": "never", "before": "after", "first": "last", "more": "less",
              "larger": "smaller", "minimum": "maximum", "increase": "decrease", "success": "failure",
              "can": "cannot", "must": "must not", "does not": "does", "is not": "is", "enabled": "disabled"}
_OPPOSITE_PATTERN = re.compile(
    r"\b(" + "|".join(re.escape(w) for w in sorted({**_OPPOSITES, **{v: k for k, v in _OPPOSITES.items()}},
                                                   key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _falsify(text: str, rng: random.Random) -> str:
    """Numbers changed and one opposite swapped per sentence (`is` <-> `is not`, `True` <-> `False`, ...):
    two swaps in one sentence could cancel ("is true" -> "is not false"); else one verb negated."""
    flips = {**_OPPOSITES, **{v: k for k, v in _OPPOSITES.items()}}
    out = re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(1, 9)), text)
    sentences = re.split(r"(?<=[.!?])(\s+)", out)  # separators kept at odd indices
    for i, sentence in enumerate(sentences):
        matches = list(_OPPOSITE_PATTERN.finditer(sentence)) if i % 2 == 0 else []
        if matches:
            m = rng.choice(matches)
            sentences[i] = sentence[:m.start()] + _same_case(flips[m.group().lower()], m.group()) + sentence[m.end():]
    out = "".join(sentences)
    return out if out != text else re.sub(r"\b(are|returns|will|should)\b", r"\1 not", text, count=1)


def _same_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


_ECHO_TEMPLATES = ("{q}", "You are asking: {q}", "So the question is: {q} In other words, {q}",
                   "To restate the question: {q}", "{q} That is what you want to know.")


@register("instruction_echo")
def instruction_echo(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response only restates the question."""
    question = " ".join(prompt_of(messages).split())
    if len(question.split()) < 2:
        return None
    return with_response(messages, rng.choice(_ECHO_TEMPLATES).format(q=question))


_FOREIGN_WORDS = ("und", "der", "nicht", "aber", "el", "que", "pero", "también", "avec", "mais", "toujours",
                  "это", "который", "的", "是", "我们", "データ", "する", "그리고", "dan", "yang")


@register("language_mix")
def language_mix(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """About a third of the response's words replaced by words of other languages."""
    words = response_of(messages).split()
    if len(words) < 5:
        return None
    mixed = [rng.choice(_FOREIGN_WORDS) if rng.random() < 0.35 else w for w in words]
    return with_response(messages, " ".join(mixed))


@register("wrong_format")
def wrong_format(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response forced into a form nobody asked for: a JSON blob, one word per line, or shouting."""
    words = response_of(messages).split()
    if len(words) < 3:
        return None
    form = rng.choice(("json", "lines", "caps"))
    if form == "json":
        tokens = ", ".join(f'"{w}"' for w in words)
        return with_response(messages, '{"status": "ok", "tokens": [' + tokens + "]}")
    if form == "lines":
        return with_response(messages, "\n".join(f"- {w}" for w in words))
    return with_response(messages, re.sub(r"[^\w\s]", "", " ".join(words)).upper())


# ---- content kinds no warmup default uses: the self-check holds them out -------------------------


@register("falsified")
def falsified(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response's own words with its facts turned: numbers changed, opposites swapped, a verb negated."""
    response = response_of(messages)
    return with_response(messages, _falsify(response, rng))


@register("topic_drift", pool="dataset")
def topic_drift(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """The response's first half, then the second half of the answer to a similar question of the same
    dataset: it starts right and ends answering something else."""
    other = _on_topic_answer(messages, rng, pool)
    head, tail = _halves(response_of(messages)), _halves(other or "")
    if head is None or tail is None:
        return None
    return with_response(messages, f"{head[0]} {tail[1]}")


def _halves(text: str) -> tuple[str, str] | None:
    """(first half, second half) of a text, split between sentences when it has two or more, else
    between words; None when it has fewer than 4 words."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    parts = sentences if len(sentences) >= 2 else text.split()
    if len(text.split()) < 4 or len(parts) < 2:
        return None
    middle = (len(parts) + 1) // 2
    return " ".join(parts[:middle]), " ".join(parts[middle:])


_EVASIONS = (
    "Good question. When it comes to {topic}, the answer depends on your situation: there are several "
    "approaches, each with its own trade-offs, so weigh them carefully and choose what fits your needs.",
    "The question of {topic} has many aspects to consider. In general it depends on the context, and "
    "different people prefer different solutions, so experiment and see what works best for you.",
    "There is no single answer about {topic}. It varies from case to case, so keep your goals in mind, read "
    "the relevant material and decide based on your own requirements.",
    "That depends. The way {topic} behaves varies with how it is used, so the details matter. Consider "
    "your use case and the options available before you decide.",
)
_QUESTION_WORDS = frozenset({"what", "which", "when", "where", "does", "how", "why", "with", "that", "this",
                             "should", "would", "could", "there", "about", "from", "into", "have", "your"})


@register("evasive")
def evasive(messages: Messages, rng: random.Random, pool: list[Messages]) -> Messages | None:
    """A fluent reply that names the question's topic (its longest word) and never answers it."""
    words = [w.strip(".") for w in re.findall(r"[A-Za-z_][\w.]{3,}", prompt_of(messages))]
    words = [w for w in words if w.lower() not in _QUESTION_WORDS]
    topic = max(words, key=len) if words else "this"
    return with_response(messages, rng.choice(_EVASIONS).format(topic=topic))
