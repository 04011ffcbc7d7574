"""Gene vocabularies: matching a dataset's tokens to a checkpoint's by name and moving the
gene embedding onto the dataset's token order.

A dataset's vocabulary is built by :class:`~scformer_jax.data.dataset.PerturbData` (genes,
unmeasured perturbed genes, then :data:`~scformer_jax.data.dataset.SPECIAL_TOKENS`); a
converted PyTorch checkpoint keeps its own in ``vocab.json``. A dataset gene that the
checkpoint does not know keeps a token of its own whose embedding row starts at zero, the
vector the model embeds ``<pad>`` to.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from scformer_jax.config import ModelConfig
from scformer_jax.data.dataset import PAD_TOKEN, SPECIAL_TOKENS, PerturbData

VOCAB_FILE = "vocab.json"


class VocabularyError(ValueError):
    """A ``vocab.json`` that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class VocabularyMatch:
    """How a dataset's tokens map onto a checkpoint's vocabulary, by name.

    Attributes:
      n_genes: the dataset's gene tokens (measured genes and unmeasured perturbed genes).
      n_matched: how many of them the checkpoint's vocabulary holds.
      unmatched_genes: the others, in token order (their embedding rows start at zero).
      special_tokens: the dataset's special tokens found in the checkpoint's vocabulary.
    """

    n_genes: int
    n_matched: int
    unmatched_genes: tuple[str, ...]
    special_tokens: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"match {self.n_matched}/{self.n_genes} genes in vocabulary"


def check_vocab(vocab: Any, path: str | Path) -> dict[str, int]:
    """`vocab` (parsed ``vocab.json``) as token name -> id, or a :class:`VocabularyError`."""
    if not isinstance(vocab, Mapping) or not vocab:
        raise VocabularyError(f"{path} must be a JSON object of token name -> id.")
    ids = list(vocab.values())
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise VocabularyError(f"{path}: token ids must be non-negative integers.")
    if len(set(ids)) != len(ids):
        raise VocabularyError(f"{path}: several tokens share an id; each token needs its own.")
    return {str(k): int(v) for k, v in vocab.items()}


def read_vocab(path: str | Path) -> dict[str, int]:
    """Reads and checks a ``vocab.json`` (token name -> embedding row)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VocabularyError(f"Cannot read {path} (the gene vocabulary): {e}") from e
    return check_vocab(raw, path)


def match_vocabulary(
    token_names: Sequence[str], source_vocab: Mapping[str, int]
) -> VocabularyMatch:
    """Matches a dataset's tokens (in token-id order) to a checkpoint vocabulary by name."""
    genes = [t for t in token_names if t not in SPECIAL_TOKENS]
    unmatched = tuple(g for g in genes if g not in source_vocab)
    specials = tuple(t for t in token_names if t in SPECIAL_TOKENS and t in source_vocab)
    return VocabularyMatch(len(genes), len(genes) - len(unmatched), unmatched, specials)


def remap_embedding(
    table: np.ndarray,
    source_vocab: Mapping[str, int],
    token_names: Sequence[str],
    pad_token: str = PAD_TOKEN,
) -> np.ndarray:
    """Re-orders a gene embedding table into a dataset's token order, by token name.

    Args:
      table: (n_source_tokens, d) the checkpoint's gene embedding.
      source_vocab: the checkpoint's token name -> row.
      token_names: (n_tokens,) the dataset's token names in id order.
      pad_token: the padding token (its row is zero: our model never reads it).

    Returns:
      (n_tokens, d): the checkpoint row of each token found by name; zero for tokens the
      checkpoint does not know and for the pad token.
    """
    out = np.zeros((len(token_names), table.shape[1]), table.dtype)
    for token_id, name in enumerate(token_names):
        row = source_vocab.get(name)
        if row is not None and name != pad_token:
            out[token_id] = table[row]
    return out


def adapt_to_dataset(
    vocab: Mapping[str, int] | None, model_config: ModelConfig, params: Any, dataset: PerturbData
) -> tuple[ModelConfig, Any, VocabularyMatch | None]:
    """Moves parameters trained on vocabulary `vocab` onto `dataset`'s vocabulary.

    A no-op (returns the inputs and None) when `vocab` is None (a run trained on the
    dataset) or already is the dataset's.

    Args:
      vocab: the checkpoint's token name -> embedding row (a converted folder's
        ``vocab.json``), or None.
      model_config, params: as restored from the checkpoint.
      dataset: the data to predict on.

    Returns:
      (model config, params, vocabulary match or None).
    """
    if vocab is None:
        return model_config, params, None
    same = model_config.ntoken == dataset.n_tokens and all(
        vocab.get(name) == i for i, name in enumerate(dataset.token_names)
    )
    if same:
        return model_config, params, None
    pad_token = next((t for t, i in vocab.items() if i == model_config.pad_token_id), PAD_TOKEN)
    params = dict(params)
    encoder = dict(params["encoder"])
    encoder["embedding"] = remap_embedding(
        np.asarray(encoder["embedding"]), vocab, list(dataset.token_names), pad_token
    )
    params["encoder"] = encoder
    match = match_vocabulary(list(dataset.token_names), vocab)
    return model_config.with_vocab(dataset), params, match
