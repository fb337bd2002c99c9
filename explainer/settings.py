"""Every default and its help text, in one pydantic model with a section per stage.

Sources, lowest to highest: field defaults, `--config explainer.toml`, environment
variables (secrets only: OPENAI_API_KEY, OPENAI_BASE_URL), flags the user typed.
The CLI builds its flags from these fields, so a default's description is its --help.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from explainer.errors import ExplainerError



def cache_dir() -> Path:
    """Where explainer keeps what it derives from packages (dequantized models, the builtin corpus)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "explainer"

class Section(BaseModel):
    # A typo in a TOML key or --set must fail loudly, not silently keep the default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Section):
    name: str = Field(
        "smollm2",
        description="subject model: a built-in name (smollm2, gemma3-270m), a Hugging Face id or a local directory",
    )
    layer: int = Field(
        15,
        description="hook the residual stream at the output of this decoder layer (0-based; SmolLM2 has 30)",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the subject model's forward pass"
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1, ...")
    batch_size: int = Field(8, ge=1, description="contexts per forward pass")


class CorpusSettings(Section):
    source: str = Field(
        "builtin",
        description=(
            "text to run the model on: builtin (Shakespeare plays + Python docstrings), a .txt/.md file, "
            "a folder of .txt/.md, a .jsonl or .parquet file, or hf:PATH for a datasets dataset saved to disk"
        ),
    )
    text_field: str = Field("text", description="field holding the text in JSONL, Parquet and datasets sources")
    ctx_len: int = Field(64, ge=4, description="tokens per context window (64 as in Gao et al. 2024)")
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="fraction of documents reserved for the validation split (agent selection)"
    )
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="fraction of documents reserved for the held-out split (final scores only)"
    )
    split_seed: int = Field(0, description="seed of the document-level split; keep it fixed across runs")
    dedup_span: int = Field(
        16, ge=0, description="drop validation/held-out contexts sharing a span of this many tokens with a train "
        "context (near-duplicates, e.g. docstrings copied across stdlib modules); 0 keeps them"
    )


class TrainSettings(Section):
    out: Path = Field(Path("runs/sae"), description="folder for the trained dictionary (SAELens layout)")
    n_latents: int = Field(4096, ge=2, description="dictionary width (number of latents)")
    k: int = Field(32, ge=1, description="active latents per token (TopK)")
    tokens: int = Field(400_000, ge=1, description="training tokens to stream from the subject model (sized so `explainer run` takes ~10 min on 2 CPU cores)")
    batch_tokens: int = Field(
        4096, ge=1, description="tokens per optimizer step (rounded to whole contexts of ctx_len tokens)"
    )
    lr: Optional[float] = Field(
        None, description="Adam learning rate; default 2e-4 / sqrt(n_latents / 16384) as in Gao et al."
    )
    adam_eps: float = Field(6.25e-10, description="Adam epsilon (Gao et al. 2024)")
    auxk_coef: float = Field(1 / 32, ge=0, description="weight of the AuxK loss on dead latents")
    k_aux: Optional[int] = Field(None, ge=1, description="latents in the AuxK reconstruction; default d_model / 2")
    dead_tokens: int = Field(
        100_000,
        ge=1,
        description="a latent not fired for this many tokens counts as dead (10M in the paper; scaled to short runs)",
    )
    multi_topk: bool = Field(False, description="add the Multi-TopK loss (4k latents, weight 1/8)")
    decoder: Literal["sparse", "dense"] = Field(
        "sparse", description="sparse decodes only the k active rows; dense is the reference path"
    )
    autocast: Literal["none", "bfloat16"] = Field(
        "none", description="run the SAE step's dense encoder matmul (nearly all its FLOPs) in this dtype"
    )
    median_samples: int = Field(8192, ge=1, description="activations used for the geometric-median b_pre init")
    eval_tokens: int = Field(16_384, ge=0, description="held-out tokens for the FVU, L0 and dead-latent metrics")
    ce_tokens: int = Field(
        4096, ge=0, description="held-out tokens (a prefix of the eval tokens) for the CE-increase metric (3 full-model passes)"
    )
    shuffle_steps: int = Field(
        8, ge=1, description="optimizer steps whose activations are pooled and shuffled together (decorrelates batches)"
    )
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    seed: int = Field(0, description="seed for init and data order")


class SampleSettings(Section):
    n_top: int = Field(20, ge=0, description="top-activating examples per latent per split")
    n_quantile: int = Field(20, ge=0, description="quantile-stratified activating examples per latent per split")
    n_quantile_bins: int = Field(5, ge=1, description="activation quantile bins the quantile examples are spread over")
    n_nonactivating: int = Field(20, ge=0, description="examples where the latent is zero on every token, per split")
    n_random: int = Field(10, ge=0, description="uniformly random contexts per split (shared by all latents)")
    n_reservoir: int = Field(
        40, ge=0,
        description="activating contexts kept per latent per split as a uniform sample (with their activations); "
        "quantile examples and activation quantiles come from it; at least n_quantile",
    )
    nonactivating_pool: int = Field(
        400, ge=0,
        description="contexts per split kept as a uniform sample shared by all latents; each latent's "
        "non-activating examples come from it (half sharing tokens with its top examples), the random ones too",
    )
    acts_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of the per-token activations held for kept examples while sampling (memory)"
    )
    tokens: int = Field(200_000, ge=1, description="corpus tokens (all splits) to run through model + dictionary")
    checkpoint_every: int = Field(256, ge=1, description="batches between resumable checkpoints (a kill loses at most this many)")
    shard: str = Field("0/1", description="process shard i of N (i/N) of the contexts; merge shards with `explainer merge`")
    parquet: str = Field(
        "", description="folder to write the sampled contexts to as Parquet (one file per checkpoint) instead of DB "
        "rows, for very large runs; the DB then keeps only the contexts examples use, DuckDB reads the rest in place "
        "with read_parquet('DIR/contexts/*/*.parquet'); shards share one folder and `explainer merge DIR` combines them",
    )
    force_layer: bool = Field(
        False, description="sample even though the dictionary's config names another layer than --layer"
    )
    latents: str = Field(
        "all", description="latents to keep statistics and examples for: all, ids and ranges like 0-9999,12000, "
        "or random:N (a fixed random draw); memory scales with their number, so a subset fits a huge dictionary",
    )
    max_active: int = Field(
        256, ge=1, description="ReLU and JumpReLU dictionaries (no fixed k): active latents kept per token; a token "
        "with more is an error naming the count, never a silent cut",
    )


class LLMSettings(Section):
    base_url: Optional[str] = Field(
        None,
        description="OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama); default https://api.openai.com/v1; env OPENAI_BASE_URL",
    )
    api_key: Optional[SecretStr] = Field(
        None,
        description="API key; read from OPENAI_API_KEY, never stored in the DB, logs or errors; not needed for 127.0.0.1/localhost",
    )
    model: str = Field("gpt-4o-mini", description="model name sent to the endpoint")
    temperature: float = Field(0.0, ge=0, description="sampling temperature")
    max_tokens: int = Field(300, ge=1, description="completion token limit per call")
    timeout: float = Field(60.0, gt=0, description="seconds before one request is abandoned and retried")
    concurrency: int = Field(16, ge=1, description="requests in flight at once")
    max_attempts: int = Field(
        5, ge=1, description="attempts per call (errors and rejected answers alike) before it is recorded as failed"
    )
    backoff: float = Field(1.0, ge=0, description="seconds before the first retry; doubles per attempt, with jitter")
    backoff_max: float = Field(30.0, ge=0, description="longest wait between two attempts, unless Retry-After asks for more")
    retry_after_max: float = Field(
        120.0, ge=0, description="longest Retry-After wait honoured; a server asking for more waits this long"
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
    batch_poll: float = Field(30.0, gt=0, description="with --batch: seconds between status checks of a running batch")
    batch_dir: str = Field(
        "", description="with --batch: exchange the batch files through this folder instead of the Batch API, for "
        "offline engines such as `vllm run-batch` (writes DIR/<batch>.input.jsonl, reads DIR/<batch>.output.jsonl)",
    )
    batch_price_factor: float = Field(
        0.5, ge=0, description="with --batch: fraction of price_in/price_out a batch request costs (OpenAI: 0.5)"
    )


class ExplainSettings(Section):
    explainer: Literal["llm", "ngram"] = Field("llm", description="llm asks the endpoint; ngram is the offline N2G baseline")
    template: str = Field("explain", description="prompt template name in prompts/ or a path to a .txt file")
    latents: str = Field("all", description="which latents: all, 3, 0-99, 1,5,9, or a SQL WHERE over latents")
    n_top: int = Field(10, ge=0, description="top train-split examples shown to the explainer")
    n_quantile: int = Field(10, ge=0, description="quantile train-split examples shown to the explainer")
    n_nonactivating: int = Field(4, ge=0, description="non-activating train-split contrast examples shown")
    max_chars: int = Field(300, ge=10, description="longest explanation accepted; longer answers are retried, then failed")


class ScoreSettings(Section):
    scorers: str = Field("simulation", description="comma list of scorers: simulation, detection, fuzzing")
    mode: Literal["json", "logprobs", "all_at_once"] = Field(
        "json",
        description=(
            "simulation mode: json (a chat model writes per-token predictions for several snippets per call), "
            "logprobs (expected digit from top_logprobs; one call per token, ~100x the calls of json) or "
            "all_at_once (expected digit at a slot after every token, read from the echoed prompt's logprobs on "
            "/v1/completions; one call per snippet; vLLM, llama.cpp)"
        ),
    )
    latents: str = Field("all", description="which latents: all, 3, 0-99, 1,5,9, or a SQL WHERE over latents")
    explanations: Optional[str] = Field(
        None, description="SQL WHERE over the explanations table choosing which ok explanations to score, e.g. \"explainer = 'llm'\""
    )
    split: Literal["heldout", "validation"] = Field(
        "heldout", description="split the scorers read (never train): heldout for final scores, validation for selection"
    )
    n_top: int = Field(5, ge=0, description="top examples per latent (simulation, detection and fuzzing positives)")
    n_quantile: int = Field(5, ge=0, description="quantile examples per latent, spread over the bins (as n_top)")
    n_random: int = Field(5, ge=0, description="random contexts per latent (simulation; detection negatives where the latent is 0)")
    n_nonactivating: int = Field(5, ge=0, description="non-activating examples per latent (detection negatives)")
    per_call: int = Field(5, ge=1, description="snippets per call in json simulation, detection and fuzzing")
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
    seed: int = Field(0, description="seed for snippet order, detection/fuzzing batches and moved fuzzing highlights")
    simulation_template: str = Field("simulate", description="json-mode simulator prompt: a name in prompts/ or a .txt path")
    logprobs_template: str = Field(
        "simulate_logprobs", description="logprobs-mode simulator prompt (must end with 'Activation:')"
    )
    all_at_once_template: str = Field(
        "simulate_all_at_once", description="all_at_once-mode simulator prompt (placeholders {explanation}, {rows})"
    )
    detection_template: str = Field("detection", description="detection prompt: a name in prompts/ or a .txt path")
    fuzzing_template: str = Field("fuzzing", description="fuzzing prompt: a name in prompts/ or a .txt path")


class AgentSettings(Section):
    """`explainer explain --agent`: propose k candidates, pick on validation, refine, report heldout."""

    explainer: Optional[Literal["llm", "ngram"]] = Field(
        None, description="llm asks the endpoint; ngram chooses among fitted pattern sets offline; none follows explain.explainer"
    )
    candidates: int = Field(4, ge=1, description="candidate explanations per latent (best-of-k), each scored on validation")
    templates: Optional[str] = Field(
        None, description="comma list of explainer templates the candidates cycle through; none uses explain.template"
    )
    temperature: float = Field(
        0.7, ge=0,
        description="sampling temperature of the candidates after the first per template (which uses llm.temperature)",
    )
    max_rounds: int = Field(2, ge=0, description="refinement rounds at most (0: best-of-k only)")
    min_improvement: float = Field(
        0.01, ge=0, description="stop refining when a round raises the validation score by less than this"
    )
    refine_template: str = Field("refine", description="refinement prompt: a name in prompts/ or a .txt path")
    n_false_positives: int = Field(5, ge=0, description="worst false positives (validation) shown to the refine step")
    n_false_negatives: int = Field(5, ge=0, description="worst false negatives (validation) shown to the refine step")
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

    def public_dict(self) -> dict[str, Any]:
        """Settings as JSON-able data with the API key left out, for storing with a run."""
        data = self.model_dump(mode="json")
        data["llm"].pop("api_key", None)
        return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_assignment(text: str) -> dict[str, Any]:
    """`train.lr=3e-4` -> {"train": {"lr": "3e-4"}}; pydantic coerces the string."""
    if "=" not in text:
        raise ExplainerError(f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. --set train.lr=3e-4")
    dotted, value = text.split("=", 1)
    keys = dotted.strip().split(".")
    out: dict[str, Any] = {}
    node = out
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def _valid_keys(loc: tuple) -> list[str]:
    """Field names allowed where an unknown key was found, so the error can suggest them."""
    model: Any = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            keys = _valid_keys(tuple(e["loc"]))
            parts.append(f"{where}: unknown setting" + (f" (valid here: {', '.join(keys)})" if keys else ""))
        else:
            parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def load_settings(path: Optional[Path] = None, overrides: Optional[dict[str, Any]] = None) -> Settings:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ExplainerError(f"config file {path} not found (pass an existing TOML file to --config)") from None
        except tomllib.TOMLDecodeError as e:
            raise ExplainerError(f"config file {path} is not valid TOML: {e}") from None
    env: dict[str, Any] = {}
    if os.environ.get("OPENAI_API_KEY"):
        env.setdefault("llm", {})["api_key"] = os.environ["OPENAI_API_KEY"]
    if os.environ.get("OPENAI_BASE_URL"):
        env.setdefault("llm", {})["base_url"] = os.environ["OPENAI_BASE_URL"]
    merged = deep_merge(deep_merge(data, env), overrides or {})
    try:
        return Settings.model_validate(merged)
    except ValidationError as e:
        src = f" (in {path} or flags)" if path else ""
        raise ExplainerError(f"invalid settings{src}: {one_line(e)}") from None
