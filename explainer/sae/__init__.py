"""The dictionary: the TopK SAE and its formats (model, files, sparse), its training
(train, evaluate, outliers, run_files, sizing, distributed)."""

# The package's entry points; everything else is imported from its defining module.
from explainer.sae.formats import load_dictionary
from explainer.sae.model import TopKSAE
from explainer.sae.train import run

__all__ = ["TopKSAE", "load_dictionary", "run"]
