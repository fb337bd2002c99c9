"""Prompt templates (plain text files in prompts/) and the shared way examples are shown.

A template is a text file of sections, each opened by a line `=== system ===`,
`=== user ===` or `=== assistant ===`; each section becomes one chat message. `{name}`
is a placeholder filled at render time; write `{{` and `}}` for literal braces. Lines
before the first section are notes for the template's reader and are not sent.

The template's name and the sha256 of its file are stored with every result it
produced, so changing a prompt never silently mixes old and new explanations.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from explainer.errors import ExplainerError


def _prompts_dir() -> Path:
    """prompts/ beside the package in a checkout (pip install -e); share/explainer/prompts in a wheel."""
    beside = Path(__file__).resolve().parent.parent / "prompts"
    if beside.is_dir():
        return beside
    return Path(sys.prefix) / "share" / "explainer" / "prompts"


PROMPTS_DIR = _prompts_dir()
ROLES = ("system", "user", "assistant")
_SECTION = re.compile(r"^===\s*(\w+)\s*===\s*$")


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    sha256: str
    sections: tuple[tuple[str, str], ...]  # (role, text) in file order
    fields: frozenset[str]

    def require(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise ExplainerError(
                f"template {self.path} has no {{{missing[0]}}} placeholder, which this stage needs; "
                f"add it to the file (it uses: {', '.join(sorted(self.fields)) or 'none'})"
            )

    def worked_answers(self) -> tuple[str, ...]:
        """The assistant turns written into the file: the worked examples' answers, which a
        model that copies one instead of answering must not get credit for."""
        out = []
        for role, text in self.sections:
            parts = list(string.Formatter().parse(text))
            if role == "assistant" and all(name is None for _, name, _, _ in parts):
                out.append("".join(literal for literal, _, _, _ in parts))  # {{ and }} as the model saw them
        return tuple(out)

    def render(self, **values: Any) -> list[dict[str, str]]:
        unknown = sorted(self.fields - values.keys())
        if unknown:
            raise ExplainerError(
                f"template {self.path} uses {{{unknown[0]}}}, which this stage does not provide; "
                f"use only: {', '.join('{' + k + '}' for k in sorted(values))}"
            )
        return [{"role": role, "content": text.format_map(values)} for role, text in self.sections]


def resolve(name_or_path: str) -> Path:
    """A bare name means prompts/<name>.txt; anything with a slash or .txt is a path."""
    if "/" in name_or_path or "\\" in name_or_path or name_or_path.endswith(".txt"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ExplainerError(f"template file {path} not found (pass an existing .txt file to --template)")
        return path
    path = PROMPTS_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))) or "none"
        raise ExplainerError(f"no template named {name_or_path!r} (built in: {names}); or pass a path to a .txt file")
    return path


def load(name_or_path: str) -> Template:
    path = resolve(name_or_path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ExplainerError(f"template {path} is not UTF-8 text") from None
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            role = m.group(1).lower()
            if role not in ROLES:
                raise ExplainerError(f"template {path}: unknown section '=== {m.group(1)} ===' (use system, user, assistant)")
            sections.append((role, []))
        elif sections:
            sections[-1][1].append(line)
    if not sections:
        raise ExplainerError(f"template {path} has no '=== user ===' section (see prompts/explain.txt for the format)")
    parts = tuple((role, "\n".join(lines).strip("\n")) for role, lines in sections)
    fields: set[str] = set()
    for _, body in parts:
        try:
            for _, name, _spec, _conv in string.Formatter().parse(body):
                if name is None:
                    continue
                if not name.isidentifier():
                    raise ValueError(f"{{{name}}} is not a plain placeholder name")
                fields.add(name)
        except ValueError as e:
            raise ExplainerError(f"template {path}: {e} (write {{{{ and }}}} for literal braces)") from None
    name = path.stem if path.parent == PROMPTS_DIR else str(path)
    return Template(name, path, hashlib.sha256(raw).hexdigest(), parts, frozenset(fields))


def render(name_or_path: str, required: Sequence[str] = (), **values: Any) -> tuple[list[dict[str, str]], str, str]:
    """(messages, template name, template sha256)."""
    tpl = load(name_or_path)
    tpl.require(required)
    return tpl.render(**values), tpl.name, tpl.sha256


# --- showing tokens and activations ------------------------------------------------------

_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def discretize(acts: Sequence[float], max_act: float) -> list[int]:
    """0-9 relative to `max_act` (Bills et al. 2023 use 0-10; "10" is two tokens in most
    tokenizers). Any positive activation is at least 1, so a marked token never reads 0."""
    if max_act <= 0:
        return [0] * len(acts)
    k = 9 / max_act
    return [max(1, min(9, round(k * a))) if a > 0 else 0 for a in acts]


def shown(token: str) -> str:
    """A token on one line: newlines and tabs written as escapes."""
    return token.translate(_ESCAPES)


def marked_text(tokens: Sequence[str], levels: Sequence[int]) -> str:
    """The excerpt on one line, firing tokens wrapped in << >>; a leading space stays outside the marks."""
    out = []
    for tok, level in zip(tokens, levels):
        if level > 0:
            body = tok.lstrip(" ")
            tok = f"{tok[: len(tok) - len(body)]}<<{body}>>" if body else f"<<{tok}>>"
        out.append(tok)
    return "".join(out).translate(_ESCAPES)  # once per excerpt: per token it was the hot spot


def firing_list(tokens: Sequence[str], levels: Sequence[int]) -> str:
    """`"villain" 7, "a" 2`: each firing token and its 0-9 activation, in text order."""
    return ", ".join(f"{_quoted(t.strip() or t)} {lv}" for t, lv in zip(tokens, levels) if lv > 0)


def token_list(tokens: Sequence[str]) -> str:
    """`" the", "\\n"`: tokens as JSON strings (leading spaces kept: they are part of the token)."""
    return ", ".join(_quoted(t) for t in tokens) or "(none)"


_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _quoted(token: str) -> str:
    """JSON string syntax; the plain case skips json.dumps, the hot spot of prompt rendering."""
    return json.dumps(token, ensure_ascii=False) if _NEEDS_ESCAPE.search(token) else f'"{token}"'
