"""Hook points: where in the subject model activations are read, named once for every architecture.

A hook is a module path inside decoder layer L and a side, written as sparsify writes them:

    layers.12               residual stream after layer 12 (its output; the default)
    layers.12:input         residual stream before layer 12 (its input = layers.11's output)
    layers.12.mlp           what the MLP adds to the residual stream
    layers.12.self_attn     what attention adds to the residual stream
    layers.12.mlp:input     what the MLP reads
    layers.12.mlp.act       any other module inside the layer, by its own name (output, or :input)

`mlp` and `self_attn` are canonical: they resolve to whatever the architecture calls them
(`feed_forward`, `ffn`, `block_sparse_moe`, `fc1`/`fc2`; `attn`, `attention`,
`self_attention`), and their output
is what the block writes into the residual stream, as TransformerLens' hook_mlp_out and
hook_attn_out are. Where a module's own output is not that, the hook moves to the module that
is: Gemma 2/3 and OLMo 2 normalise each block's output (post_*_layernorm) before adding it;
Bloom's attention and MLP modules return their output with the residual already added, so the
hook reads their last projection. TransformerLens/SAELens names map onto these (TL_NAMES).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from explainer.errors import ExplainerError

MLP = "mlp"
ATTN = "self_attn"
# Names architectures give the two blocks, in the order they are tried.
ALIASES: dict[str, tuple[str, ...]] = {
    MLP: ("mlp", "feed_forward", "ffn", "block_sparse_moe"),
    ATTN: ("self_attn", "attn", "attention", "self_attention"),
}
# model_type -> canonical part -> module path (inside the layer) whose output the block adds to
# the residual stream, where that differs from the block module itself.
_WRITES: dict[str, dict[str, str]] = {
    **{t: {ATTN: "post_attention_layernorm", MLP: "post_feedforward_layernorm"}
       for t in ("gemma2", "gemma3", "gemma3_text", "olmo2")},
    "bloom": {ATTN: "self_attention.dense", MLP: "mlp.dense_4h_to_h"},
    "opt": {MLP: "fc2"},  # OPT has no MLP module: fc1 -> activation -> fc2 sit in the layer
}
# model_type -> canonical part -> module path whose input is what the block reads.
_READS: dict[str, dict[str, str]] = {"opt": {MLP: "fc1"}}

# TransformerLens / SAELens hook names -> (canonical part, side).
TL_NAMES: dict[str, tuple[str, str]] = {
    "hook_resid_post": ("", "output"),
    "hook_resid_pre": ("", "input"),
    "hook_mlp_out": (MLP, "output"),
    "hook_attn_out": (ATTN, "output"),
}
# Attention's per-head outputs before the output projection (Gemma Scope's att dictionaries);
# o_proj is the Llama/Gemma name, so elsewhere it resolves to an error listing that layer's modules.
_TL_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")
_TL = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")
_OURS = re.compile(r"^(?:layers|model\.layers|blocks|h|transformer\.h)\.(\d+)((?:\.[A-Za-z_]\w*)*)(?::(input|output))?$")
SYNTAX = ("layers.L (residual after layer L), layers.L:input (residual before it), layers.L.mlp, layers.L.self_attn, "
          "a module path inside the layer (layers.L.mlp.act, with :input for its input), or a TransformerLens name "
          f"(blocks.L.{', blocks.L.'.join(TL_NAMES)})")


@dataclass(frozen=True)
class Hook:
    """Decoder layer, module path inside it ('' = the layer itself) and side ('output' or 'input')."""

    layer: int
    path: str = ""
    side: str = "output"

    def __str__(self) -> str:
        return f"layers.{self.layer}" + (f".{self.path}" if self.path else "") + (":input" if self.side == "input" else "")

    @property
    def saelens_name(self) -> Optional[str]:
        """The TransformerLens name SAELens configs use (hook_name), or None where TL has none."""
        for tl, (part, side) in TL_NAMES.items():
            if (part, side) == (self.path, self.side):
                return f"blocks.{self.layer}.{tl}"
        if (self.path, self.side) == (f"{ATTN}.o_proj", "input"):
            return f"blocks.{self.layer}.attn.hook_z"
        return None

    @property
    def is_residual(self) -> bool:
        return self.path == ""


def _canonical(path: str) -> str:
    """A path whose first component is an architecture's name for a block, renamed to the canonical one."""
    if not path:
        return path
    first, _, rest = path.partition(".")
    for canon, names in ALIASES.items():
        if first in names:
            return canon + ("." + rest if rest else "")
    return path


def parse_hook(text: str) -> Hook:
    """`layers.12.mlp`, `layers.12:input`, `blocks.12.hook_mlp_out`, ... as a Hook; else one error line."""
    s = str(text).strip()
    m = _TL_Z.match(s)
    if m:
        return Hook(int(m.group(1)), f"{ATTN}.o_proj", "input")
    m = _TL.match(s)
    if m:
        if m.group(2) not in TL_NAMES:
            raise ExplainerError(f"hook {text!r}: TransformerLens hook {m.group(2)} is not supported; "
                                 f"use one of {', '.join(TL_NAMES)} (or {SYNTAX})")
        part, side = TL_NAMES[m.group(2)]
        return Hook(int(m.group(1)), part, side)
    m = _OURS.match(s)
    if not m:
        raise ExplainerError(f"hook {text!r} is not a hook name; use {SYNTAX}")
    return Hook(int(m.group(1)), _canonical(m.group(2).lstrip(".")), m.group(3) or "output")


def layer_of(hook: str, layer: Any) -> int:
    """The layer `hook` reads; `layer`, when given too, must name the same one (one error saying which wins)."""
    point = parse_hook(hook)
    if layer is not None and str(layer).strip() != str(point.layer):
        raise ExplainerError(f"--hook {hook} reads layer {point.layer} but --layer (model.layer) is {layer}; --hook "
                             f"wins over --layer, so drop --layer (from the flags and the config) or give "
                             f"--layer {point.layer}")
    return point.layer


def _child_names(module: Any) -> list[str]:
    return [name for name, _ in module.named_children()]


def _walk(root: Any, parts: Sequence[str], hook: Hook, where: str) -> Any:
    obj = root
    for i, part in enumerate(parts):
        child = getattr(obj, part, None)
        if not hasattr(child, "register_forward_hook"):
            inside = ".".join(parts[:i]) or "the layer"
            raise ExplainerError(
                f"hook {hook} does not resolve on {where}: {inside} has no module {part!r} "
                f"(its modules: {', '.join(_child_names(obj)) or 'none'})")
        obj = child
    return obj


def locate(layers: Sequence[Any], model_type: str, hook: Hook, model_name: str = "the model") -> tuple[Any, str]:
    """(module, side) that `hook` names in this model's decoder layers; an error lists the choices."""
    n = len(layers)
    where = f"{model_name} ({model_type})"
    if not 0 <= hook.layer < n:
        raise ExplainerError(f"hook {hook}: layer {hook.layer} out of range: {where} has {n} layers "
                             f"(use layers.0 .. layers.{n - 1}, or --layer 0..{n - 1})")
    layer = layers[hook.layer]
    if not hook.path:
        return layer, hook.side
    parts = hook.path.split(".")
    if len(parts) == 1:
        moved = (_READS if hook.side == "input" else _WRITES).get(model_type, {}).get(parts[0])
        if moved:
            return _walk(layer, moved.split("."), hook, where), hook.side
    names = ALIASES.get(parts[0], (parts[0],))
    first = next((name for name in names if hasattr(getattr(layer, name, None), "register_forward_hook")), None)
    if first is None:
        children = _child_names(layer)
        blocks = [c for c in ALIASES if any(a in children for a in ALIASES[c])] + (
            [MLP] if model_type in _WRITES and MLP in _WRITES[model_type] else [])
        raise ExplainerError(
            f"hook {hook} does not resolve on {where}: its layers (0..{n - 1}) hold no {parts[0]!r} module; "
            f"valid: layers.L, layers.L:input, {', '.join(f'layers.L.{b}' for b in dict.fromkeys(blocks))}, "
            f"or a module of the layer: {', '.join(children)}")
    return _walk(layer, [first, *parts[1:]], hook, where), hook.side


def dictionary_hook(cfg: dict[str, Any]) -> Optional[Hook]:
    """The hook a loaded dictionary's config records: our `hook`, SAELens `hook_name` (TL or our
    form), the location other formats' loaders store as `hook`, else `hook_layer` (the residual)."""
    for key in ("hook", "hook_name"):
        value = cfg.get(key)
        if isinstance(value, str) and value:
            try:
                return parse_hook(value)
            except ExplainerError:
                return None  # a name we cannot map: its layer alone would claim the wrong stream
    layer = cfg.get("hook_layer")
    if isinstance(layer, int) and not isinstance(layer, bool):
        return Hook(layer)
    return None
