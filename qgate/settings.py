"""Every setting of qgate, its type, its default (the measured recipe) and what it does: defined here once.

`qgate.config.load_config` builds the run's configuration from `Settings` (OmegaConf checks each value's type);
the library's own components take their defaults from the same classes (`GATE.mode`, `COLLECT.alphas`, ...), so
a component built without arguments gets the recipe a pipeline runs. Shipped recipes that differ
(`qgate/configs/seeds.yaml`, `demo.yaml`) are override files. `qgate config [section]` prints them all with
their help.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional


def setting(default, help: str = ""):
    """A field with its help text; a callable default (lists, dicts) is a default factory."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class EncodingSettings:
    max_length: int = setting(512, "tokens per sample; longer rows are truncated and flagged")
    score_on: str = setting("all", "all: every token, as the seeds do | response: assistant tokens only")


@dataclass
class GateSettings:
    mode: str = setting("probe", "probe: the gate only reads | modulate: FFN output scaled by good_ratio "
                                 "(BENCHMARKS.md)")
    init_mean: float = setting(0.0, "gate weights ~ N(init_mean, init_std); MoE: the trash-can router rows too")
    init_std: float = setting(0.02, "")
    bias: bool = setting(True, "gates have a bias (MoE: the trash cans, so ratio ≈ sigmoid(init_bias) at start)")
    init_bias: float = setting(3.0, "sigmoid(3) ≈ 0.95: gates start open")
    layers: Optional[List[int]] = setting(None, "null: every decoder layer; else a list of layer indices")
    contrast: Any = setting("auto", "the gate also reads x − x̃ on the final response (x̃: the token's FFN input "
                                    "without the prompt) | auto: on dense models, not on MoE trash cans | true | false")
    evidence: Any = setting("auto", "the contrast gate also adds the running mean over the response of a second "
                                    "projection of [x, x − x̃], so that weak per-token evidence adds up along the "
                                    "response | auto: wherever the contrast is on")
    summary: Any = setting("auto", "every token's gate also reads the row's last token, x_end · z, which has seen the "
                                   "whole row (a cut or off-topic answer shows there) | auto: wherever the contrast "
                                   "is on in probe mode")
    gain: Any = setting("auto", "on the final response's tokens the gate also reads how much the prompt helps "
                                "predict each token (NLL alone − NLL with the prompt, and its running mean): an "
                                "answer to another question is fluent, but its prompt does not help | auto: "
                                "wherever the contrast is on in probe mode | true | false")
    tent: Any = setting("auto", "gain gates also read how far the running mean gain sits from the clean warmup "
                                "rows' mean (kept in warmup, saved with the gates): a clean answer sits between "
                                "one the prompt explains nothing of and one it explains wholly | auto: wherever "
                                "gate.gain is on | true | false. Leave-kinds-out q +0.003 [−0.000, +0.006] over "
                                "seeds 5–7, the demo's grade up on 4 seeds (docs/experiments/generalisation.md)")
    surprise: Any = setting(False, "gain gates also read how far the running mean NLL of the response (with its "
                                   "prompt) sits from the clean warmup rows' mean: a loop or an echo is far easier "
                                   "than a real answer, noise far harder | true | false (auto: off). Leave-kinds-out "
                                   "q −0.010 [−0.027, +0.004] on seed 10, loops +0.030 (docs/experiments/"
                                   "generalisation.md): off")
    typical: Any = setting(False, "every token's gate also reads how far the whole response's mean state sits from "
                                  "the clean warmup rows' (a Gaussian fitted on them before warmup, saved with the "
                                  "gates): a read no corruption kind shapes | true | false (auto: off). "
                                  "Leave-kinds-out q −0.009 [−0.038, +0.022] on seed 12, loops +0.186, warmup "
                                  "kinds −0.049 (docs/experiments/generalisation.md): off")
    typical_quantile: float = setting(0.0, "typical gates read only the distance above this quantile of the clean "
                                           "warmup rows' own distances (0: the whole distance), so that the "
                                           "spread of typical rows moves no score. 0.9 on seed 13: "
                                           "left-out kinds −0.047 [−0.080, −0.014] (docs/experiments/"
                                           "generalisation.md)")
    halves: bool = setting(False, "keep the halves read with the gates: a Gaussian of how far a row's later half "
                                  "of tokens moves from its earlier half, fitted on the clean warmup rows "
                                  "(qgate/halves.py); collect writes each row's distance (`halves`), "
                                  "selection.score=q_halves blends it with q and the self-check measures the blend. "
                                  "Probe gates on dense models; L·H² float32 more in gates.safetensors (40 MB on "
                                  "SmolLM2-135M, 2 GB on a 7B model of H 4096). Leave-kinds-out q + halves − q "
                                  "+0.027 [+0.012, +0.042] untrained over seeds 12–15 "
                                  "(docs/experiments/generalisation.md)")
    # MoE models (OLMoE, Qwen3-MoE) get Select-MoE trash-can experts instead (qgate/moe.py): top_k extra router rows;
    # good_ratio = real-expert mass
    train_router: bool = setting(False, "MoE: warmup also trains the original router rows (the experts stay "
                                        "bit-identical)")
    trash_can_loss_beta: float = setting(5.0, "MoE: β of the Beta constraint −((α−1)·log r + (β−1)·log(1−r)), α = 1")
    constraint_loss_weight: float = setting(0.1, "MoE: w_constraint")
    trash_can_loss_on: str = setting("ratio", "MoE: r = ratio (real-expert mass, DESIGN.md) | trash (1 − ratio, "
                                              "as the seed code)")
    load_balancing_weight: Optional[float] = setting(None, "MoE: weight of the load-balancing loss; null: the "
                                                           "model's router_aux_loss_coef")


@dataclass
class LossSettings:
    """Warmup loss = CE on originals + quality_loss_weight · quality_loss + negatives_weight · negatives_loss."""

    quality_loss_type: str = setting("linear", "linear | beta_moment_matching | mean_variance_regularization "
                                               "(`sigmoid` is the seeds' name for linear)")
    quality_loss_weight: float = setting(0.0, "the seeds' unsupervised loss; alone it carries no signal "
                                              "(BENCHMARKS.md)")
    sample_wise_averaging: bool = setting(True, "mean per sample, then over samples; else over all tokens")
    beta_target_mean: float = setting(0.5, "beta_moment_matching: target mean of good_ratio")
    beta_target_var: float = setting(0.05, "beta_moment_matching: target variance of good_ratio")
    w_mean: float = setting(1.0, "beta_moment_matching: weight of the mean term")
    w_var: float = setting(1.0, "beta_moment_matching: weight of the variance term")
    lambda_var: float = setting(0.1, "mean_variance_regularization: weight of the variance bonus")
    negatives_weight: float = setting(1.0, "BCE on originals vs corrupted copies; 0 = the seeds' unsupervised "
                                           "losses only")
    negatives_alpha: float = setting(0.0, "α of the token weights in the negatives loss; 0 = plain mean over tokens")


@dataclass
class WarmupSettings:
    workers: int = setting(1, "Ray Train workers (DDP)")
    cpus_per_worker: int = setting(1, "CPU-only runs: cores per train worker (torch uses as many threads)")
    steps: int = setting(150, "of batch_size originals (+ copies): the 1,200 originals of the benchmark's 300 steps "
                              "of 4 (BENCHMARKS.md)")
    batch_size: int = setting(8, "originals per worker per step; with negatives each batch also holds their "
                                 "corrupted copies")
    lr: float = setting(1.0e-2, "AdamW on the gates")
    weight_decay: float = setting(0.0, "")
    warmup_fraction: float = setting(0.3, "share of the corpus (seeded sample) the gates warm up on, as the seeds do")
    max_rows: int = setting(2000, "at most this many rows read for warmup")
    negative_kinds: List[str] = setting(
        lambda: ["response_swap", "word_shuffle", "char_noise", "truncate", "repetition_loop", "fluent_wrong",
                 "refusal_boilerplate", "instruction_echo"],
        "corruption kinds of the warmup negatives (qgate/corruption.py), kinds real corpora hold; the self-check "
        "holds out the rest of `selfcheck.kinds`")
    compose_share: float = setting(0.0, "share of the warmup copies that carry a second kind on top of their "
                                        "first (qgate.corruption.compose_copies); 0.5 left q on kinds warmup "
                                        "never used where it was (BENCHMARKS.md, leave kinds out)")
    own_answers: float = setting(0.0, "share of the warmup originals whose corrupted copy is the model's own "
                                      "low-temperature answer to their prompt instead (qgate.model_negatives: the "
                                      "high-gain side of gate.tent), made before training (by a GPU task on GPU "
                                      "runs); 0: off")
    report_every: int = setting(10, "steps between loss reports")
    checkpoint_every: int = setting(25, "steps between checkpoints (a resumed warmup starts from the newest)")
    max_failures: int = setting(2, "worker failures survived (Ray Train FailureConfig)")
    keep_checkpoints: int = setting(2, "newest checkpoints kept in out/warmup (Ray Train CheckpointConfig.num_to_keep)")


@dataclass
class CollectSettings:
    actors: Any = setting("auto", "scoring actors, one GPU each when GPUs are used; auto: one per GPU of the cluster "
                                  "then, else 2")
    cpus_per_actor: float = setting(1.0, "CPU-only runs: cores per scoring actor")
    batch_rows: int = setting(64, "rows per scoring batch; a corpus too small to give each actor two is cut "
                                  "finer")
    max_batch_tokens: int = setting(8192, "padded tokens per forward pass")
    alphas: List[float] = setting(lambda: [0.0, 0.5, 1.0, 2.0], "α of the token weights S is kept for "
                                                                  "(selection.alpha picks one)")
    eps: float = setting(1.0e-8, "ε of the token weights")
    ifd: bool = setting(True, "second pass: response loss without the instruction")
    raw: bool = setting(False, "keep per-token gate logits and NLL (float16) to re-select for any α later")
    shard_rows: int = setting(20000, "at most this many rows per stats shard (a write task holds them)")
    shard_bytes: int = setting(268435456, "and at most about this many bytes (256 MiB) per shard")
    max_rows: Optional[int] = setting(None, "at most this many new rows in one attempt (smoke runs; the next run "
                                            "resumes)")


@dataclass
class SelectionSettings:
    percentage: float = setting(0.3, "share of the rows kept: k = ceil(percentage · N)")
    alpha: float = setting(0.0, "must be one of collect.alphas unless the stats are raw; 0 = the α the gates warm "
                                "up with")
    eps: float = setting(1.0e-8, "ε of the per-layer mapping R = (S − a) / (b − a + ε)")
    tau: float = setting(0.0, "τ of the per-layer mapping (DESIGN.md)")
    strategy: str = setting("top_k", "top_k | cluster_round_robin | similarity_filter (k-means on each row's "
                                     "features)")
    n_clusters: int = setting(8, "k-means clusters of the diversity strategies (fit on a seeded sample of ≤ 200k "
                                 "rows)")
    features: str = setting("gates", "what the diversity strategies compare: gates (each row's standardised S) | "
                                     "text (tf-idf of what the row says: near-duplicate rows are near) | response "
                                     "(the same of its final answer alone: one answer under any question is near) | "
                                     "prompt_response (its prompt and its answer apart: a row is near a kept row "
                                     "when either is; every question gets its best answer before any gets two)")
    similarity_threshold: Optional[float] = setting(None, "similarity_filter: skip a row whose cosine to a kept row "
                                                          "of its cluster is above; null: 0.95 on gates, 0.8 on text "
                                                          "features")
    demote_shared_answers: Any = setting("auto", "a row whose final answer another row gives at a better score falls "
                                                "by the gap before a diversity strategy's walk "
                                                "(qgate/shared_answers.py) | auto: with a diversity strategy")
    pool: Any = setting("auto", "similarity_filter: only the best pool · k rows are candidates (null: all), so "
                                "coverage costs at most that much of the score order | auto: all with "
                                "prompt_response, else 1.5")
    direction: str = setting("auto", "auto: as the self-check finds | higher | lower")
    score: str = setting("auto", "sorted on: q | q_ifd (mean percentile rank of q and of −IFD) | q_halves (the "
                                 "same with the halves distance, gate.halves) | auto: as the self-check finds")
    runs: Optional[List[str]] = setting(None, "more stats directories to select over together (batch selection)")
    report_samples: int = setting(10, "best and worst rows shown in report.html")


@dataclass
class SelfcheckSettings:
    """On rows warmup never saw, corrupted by kinds warmup never used (ray_jobs/selfcheck.py)."""

    enabled: bool = setting(True, "run the self-check in `qgate pipeline`")
    rows: int = setting(300, "originals sampled from the user's rows (each gets one corrupted copy); 56: about "
                             "±0.08 on the verdict")
    kinds: List[str] = setting(
        lambda: ["truncate", "repetition_loop", "gibberish", "refusal_boilerplate", "scraped_residue", "fluent_wrong",
                 "response_swap", "word_shuffle", "char_noise", "instruction_echo", "language_mix", "wrong_format",
                 "falsified", "topic_drift", "evasive"],
        "corruption kinds of the copies; minus warmup's: the held-out kinds, format (gibberish, scraped_residue, "
        "language_mix, wrong_format) and content (falsified, topic_drift, evasive) by default")
    warmup_share: float = setting(0.25, "share of the copies made with warmup's own kinds, reported apart from the "
                                        "verdict")
    min_auroc: float = setting(0.7, "the verdict's threshold, on the held-out kinds")
    min_rows: int = setting(40, "fewer originals or held-out copies than this: no verdict")
    strict: bool = setting(True, "stop the run when the verdict's whole 95% interval lies below min_auroc")


@dataclass
class ServeSettings:
    """`qgate serve out=RUN_DIR`: score new samples over HTTP against the run's corpus."""

    host: str = setting("127.0.0.1", "0.0.0.0 to listen on every interface (then a token is required, or "
                                     "allow_open)")
    token_file: Optional[str] = setting(None, "a file holding the bearer token (read on each replica's node); else "
                                              "$QGATE_API_TOKEN")
    allow_open: bool = setting(False, "true: serve a non-loopback host without a token (anyone who reaches it can "
                                      "score)")
    body_timeout_s: float = setting(10.0, "a request body not complete within this many seconds is 408 (slow "
                                          "clients)")
    port: int = setting(8000, "HTTP port")
    route_prefix: str = setting("/", "the app's path on the server")
    max_batch_size: int = setting(16, "requests scored in one forward pass (@serve.batch); 1 turns batching off")
    batch_wait_timeout_s: float = setting(0.01, "how long the first request of a batch waits for others")
    max_ongoing_requests: Optional[int] = setting(None, "per replica; null: 2 × max_batch_size (below "
                                                        "max_batch_size batches never fill)")
    max_queued_requests: int = setting(64, "requests waiting for a replica; beyond that the answer is 503, not a "
                                           "hang (-1: no cap)")
    min_replicas: int = setting(1, "autoscaling bounds")
    max_replicas: int = setting(1, "")
    target_ongoing_requests: Optional[float] = setting(None, "autoscaling target per replica; null: max_batch_size")
    autoscaling: Dict[str, Any] = setting(
        lambda: {"upscale_delay_s": 30.0, "downscale_delay_s": 600.0},
        "any field of Ray Serve's AutoscalingConfig (look_back_period_s, upscaling_factor, ...); upscale_delay_s: "
        "load above the target this long adds a replica; downscale_delay_s: below it this long removes one (a "
        "replica holds the model: keep it warm)")
    num_cpus: float = setting(1.0, "per replica; a replica also takes one GPU when use_gpu says so")
    max_samples: int = setting(64, "samples per request; more is 413")
    max_chars: int = setting(100000, "characters of text per request, all strings together; more is 413; bodies "
                                     "over 8 bytes per character + 64 KiB are cut off with 413 while they stream in")


@dataclass
class DemoSettings:
    """The demo corpus (`qgate demo`)."""

    rows: int = setting(1000, "demo corpus rows (real text from Python's documentation)")
    noise_fraction: float = setting(0.15, "share of rows replaced by corrupted copies; their labels are kept apart")
    max_words: Optional[int] = setting(None, "answers cut to their first sentences within this many words; null: "
                                             "as documented")


@dataclass
class FinetuneSettings:
    """`qgate finetune out=RUN_DIR`: LoRA on the selected rows (Ray Train, DDP)."""

    data: Optional[str] = setting(None, "rows to train on (any input the loader reads); null: "
                                        "out/selection/selected_data.jsonl")
    model: Optional[str] = setting(None, "the model to finetune; null: the top-level `model`")
    workers: int = setting(1, "Ray Train workers (one GPU each when GPUs are used)")
    cpus_per_worker: int = setting(1, "CPU-only runs: cores per train worker (torch uses as many threads)")
    rank: int = setting(16, "LoRA rank r (the seeds use 128 on 7B models)")
    alpha: float = setting(32.0, "lora_alpha; updates scaled by alpha / rank (the seeds: alpha = 2 · rank)")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    target_modules: List[str] = setting(
        lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "those the model lacks are skipped")
    lr: float = setting(2.0e-4, "AdamW's peak learning rate (the seeds: 2e-5 on 7B models)")
    schedule: str = setting("constant", "the learning rate over the steps: constant | cosine | linear (to 0 at the "
                                        "last step)")
    warmup_ratio: float = setting(0.0, "share of the steps over which the learning rate rises from 0 to lr")
    epochs: int = setting(1, "passes over the rows")
    batch_size: int = setting(8, "rows per worker per step")
    max_length: int = setting(512, "tokens per row; longer rows are truncated")
    max_grad_norm: float = setting(1.0, "gradient clipping; 0 turns it off")
    heldout: Optional[str] = setting(None, "optional held-out rows: their response loss before and after goes to "
                                           "out/finetune/metrics.json")
    max_failures: int = setting(1, "worker failures survived (the attempt restarts from scratch)")
    method: str = setting("lora", "lora: LoRA weights only | full: every weight (a small target trained "
                                  "from scratch, e.g. the fact corpus's model/)")


@dataclass
class EvaluateSettings:
    """`qgate evaluate out=RUN_DIR`: lm-eval on the base model and base + adapter."""

    base: Optional[str] = setting(None, "base model; null: finetune.model, else `model`")
    adapter: Optional[str] = setting(None, "peft adapter directory; null: out/finetune/adapter")
    tasks: List[str] = setting(lambda: ["python_docs_mc"], "lm-eval task names; local YAML tasks from qgate/tasks "
                                                           "and include_path")
    include_path: Optional[List[str]] = setting(None, "more directories of task YAML files")
    limit: Optional[float] = setting(None, "at most this many documents per task (smoke runs)")
    batch_size: int = setting(16, "lm-eval batch size")
    num_fewshot: Optional[int] = setting(None, "null: each task's default")
    apply_chat_template: bool = setting(False, "render prompts with the model's chat template")
    dtype: Optional[str] = setting(None, "weights of the evaluated model: float32 | bfloat16 | float16; null: the "
                                         "top-level `dtype`")


@dataclass
class CompareSettings:
    """`qgate compare out=RUN_DIR compare.heldout=FILE`: which selection trains the best model?"""

    budget: float = setting(0.3, "share of the scored rows every subset gets")
    strategies: List[str] = setting(lambda: ["qgate", "random", "response_ppl", "ifd"],
                                    "qgate: by the run's score | random | lowest response PPL | lowest IFD | all | "
                                    "clean (the rows `labels` marks clean: the ceiling) | clean_random (as many "
                                    "random clean rows as the budget: a perfect filter) | clean_diverse (a perfect "
                                    "score through qgate_diverse's filter)")
    seeds: int = setting(3, "finetunes per strategy, seeds seed, seed+1, …")
    direction: str = setting("auto", "q direction: auto (as the run selected) | higher | lower")
    heldout: Optional[str] = setting(None, "held-out LESS rows for the response loss (required)")
    labels: Optional[str] = setting(None, "optional labels.jsonl of planted rows: the table then shows each subset's "
                                          "planted share")
    metric: str = setting("acc_norm", "the lm-eval metric in the table")
    mc: Optional[str] = setting(None, "optional multiple-choice items (JSONL of {question, choices, label}) scored "
                                      "in the finetune's worker, without lm-eval (the fact corpus's facts_mc.jsonl)")
    curve: List[float] = setting(lambda: [], "more budgets for a budget curve, e.g. [0.1,0.5]")
    curve_strategies: List[str] = setting(lambda: ["qgate", "random"], "the strategies run at every budget of "
                                                                       "`curve`")
    budget_min: Optional[float] = setting(None, "start no new finetune after this many minutes (a call finishes "
                                                "one at least); the same command again keeps the finished ones and "
                                                "runs the rest")
    keep_models: bool = setting(True, "keep every trained adapter (or model) under out/compare/adapters")


@dataclass
class GradeSettings:
    """`qgate grade out=RUN grade.labels=FILE`: the run's scores on rows the user labelled (qgate/grading.py)."""

    labels: Optional[str] = setting(None, "JSONL of {dataset, id, label}: label \"clean\" or the row's kind of noise")
    min_auroc: float = setting(0.7, "the verdict's threshold on the AUROC of the score sorted on")


@dataclass
class Settings:
    """Override any key on the command line: `qgate pipeline gate.mode=probe`. Short aliases: qgate/config.py."""

    recipe: Optional[str] = setting(None, "a shipped recipe file applied over these defaults: seeds (the design "
                                          "documents' recipe) | demo")
    model: str = setting("smollm2-135m-instruct", "tiny-qwen3 | tiny-llama | HF directory | hub id | path to a "
                                                  ".gguf file")
    data: Any = setting(None, "input rows: a file, directory, glob or comma-separated list (JSONL or Parquet, any "
                              "fsspec path)")
    out: Optional[str] = setting(None, "the run directory; every stage writes under it")
    gates: Optional[str] = setting(None, "a gates directory to score with; null: the run's own `out/gates` (written "
                                         "by warmup)")
    ray_address: Optional[str] = setting(None, "null: embedded local Ray (or the cluster of `ray job submit`); "
                                               "\"auto\"; ray://host:10001")
    seed: int = setting(0, "seeds sampling, corruption and the gates' init")
    dtype: str = setting("float32", "model weights: float32 | bfloat16 | float16")
    autocast: str = setting("auto", "matmul dtype of every forward pass: auto (bf16 on GPU; on CPU bf16 only where "
                                    "native: AVX512-BF16 or AMX) | bf16 | fp16 | none")
    use_gpu: Any = setting("auto", "auto: GPUs when the cluster has them")
    trust_remote_code: bool = setting(False, "let transformers run code shipped with the model")
    stages: List[str] = setting(lambda: ["warmup", "collect", "selfcheck", "select"],
                                "what `qgate pipeline` runs, in this order")
    progress: bool = setting(True, "progress bars (done / total, rate, ETA) on collect, self-check and select; false "
                                   "for CI logs")
    encoding: EncodingSettings = field(default_factory=EncodingSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    collect: CollectSettings = field(default_factory=CollectSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    selfcheck: SelfcheckSettings = field(default_factory=SelfcheckSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    demo: DemoSettings = field(default_factory=DemoSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)
    grade: GradeSettings = field(default_factory=GradeSettings)


# The defaults, for the library's own signatures.
ENCODING, GATE, LOSS, WARMUP = EncodingSettings(), GateSettings(), LossSettings(), WarmupSettings()
COLLECT, SELECTION, SELFCHECK = CollectSettings(), SelectionSettings(), SelfcheckSettings()


def help_lines(node=Settings, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) of every leaf setting under a settings class, in declaration order."""
    out = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        sub = f.default_factory if f.default_factory is not MISSING else None
        if sub is not None and is_dataclass(sub):
            out += help_lines(sub, f"{key}.")
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
            out.append((key, default, f.metadata.get("help", "")))
    return out
