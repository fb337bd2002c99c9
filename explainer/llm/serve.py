"""The offline endpoint: llama.cpp's OpenAI-compatible server over the packaged SmolLM2 GGUF.

It is a working, honest offline path, not a quality one: a 135M model writes poor
explanations and simulates barely above chance. Real labels need a capable model behind
--base-url. `logits_all` is on because llama.cpp refuses any logprobs request without it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from explainer.errors import ExplainerError

WARNING = (
    "the local endpoint runs SmolLM2-135M: it writes poor explanations and simulates near chance; "
    "use --base-url with a capable model for real labels"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


def _gguf_path(model: str) -> str:
    from explainer import lm

    if model == "smollm2":
        folder, name = lm._smollm2_gguf()
    elif model == "gemma3-270m":
        folder, name = lm._gemma_gguf()
    elif Path(model).is_file():
        return str(Path(model))
    else:
        raise ExplainerError(f"--serve-model {model!r}: use smollm2, gemma3-270m or the path of a .gguf file")
    return str(Path(folder) / name)


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ExplainerError(f"the llama.cpp server exited with code {proc.returncode} before answering; "
                                 "run `python -m llama_cpp.server --help` to check the install")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                if r.status == 200:
                    return
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.3)
    raise ExplainerError(f"the llama.cpp server at {base_url} did not answer within {timeout:.0f} s")


@contextmanager
def local_server(model: str = "smollm2", port: Optional[int] = None, n_ctx: int = 4096,
                 log: Optional[Path] = None) -> Iterator[str]:
    """Start the server on 127.0.0.1, yield its base URL, stop it on exit."""
    if not server_available():
        raise ExplainerError(
            "the local endpoint needs llama-cpp-python's server: pip install -e '.[local]' "
            "(compiles from source, ~5 minutes on 2 cores)"
        )
    port = port or free_port()
    cfg = {
        "host": "127.0.0.1",
        "port": port,
        "models": [{"model": _gguf_path(model), "model_alias": model, "logits_all": True,
                    "n_ctx": n_ctx, "verbose": False}],
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "llama.json"
        cfg_path.write_text(json.dumps(cfg))
        out = open(log, "ab") if log else None
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file", str(cfg_path)],
                                stdout=out if out is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_ready(base_url, proc)
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out is not None:
                out.close()
