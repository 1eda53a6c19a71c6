"""HOPE (self-modifying Titans + Continuum Memory System) and Transformer++ on text that ships with Python.

    from deepopt.hope import HopeConfig, LanguageModel
    model = LanguageModel(HopeConfig(d_model=64, n_layers=2))
    logits, loss = model(tokens, targets)

The CLI is ``deepopt hope train|eval|continual|niah`` (``deepopt.hope.cli``).
"""

from .data import DOMAINS, BPETokenizer, ByteTokenizer, Corpus, Tokenizer, load_corpus, load_tokenizer
from .model import (
           VARIANTS,
           CMSLevel,
           HopeConfig,
           LanguageModel,
           SelfModifyingTitans,
           matched_transformer,
           n_params,
)
from .train import Trainer, load_model, model_config

__all__ = ["DOMAINS", "VARIANTS", "BPETokenizer", "ByteTokenizer", "CMSLevel", "Corpus", "HopeConfig", "LanguageModel",
           "SelfModifyingTitans", "Tokenizer", "Trainer", "load_corpus", "load_model", "load_tokenizer",
           "matched_transformer", "model_config", "n_params"]
