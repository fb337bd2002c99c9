"""The LLM side: the OpenAI-compatible client with its one retry policy, cache and ledger
(client, http, wire), the pass runner (pool, passes), the Batch API (batch*) and the local
llama.cpp endpoint (serve)."""

# The package's entry points; everything else is imported from its defining module.
from explainer.llm.client import LLMClient

__all__ = ["LLMClient"]
