"""What a weight import did: :class:`ConversionReport` and the error every conversion
raises on input it cannot use."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from scformer_jax.vocab import VocabularyMatch


class ConversionError(ValueError):
    """A checkpoint folder that cannot be converted as given; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class ShapeMismatch:
    """A checkpoint tensor whose shape does not fit our parameter (left at initialisation)."""

    source_key: str
    path: str
    source_shape: tuple[int, ...]
    expected_shape: tuple[int, ...]


@dataclasses.dataclass
class ConversionReport:
    """What a weight import did.

    Attributes:
      source: the folder read.
      attention_layout: "torch" (``self_attn.in_proj_weight``), "flash" (``self_attn.Wqkv``),
        "converted" (a folder written by this module) or None (no transformer layers).
      prefixes: the prefixes that selected what to load (empty: everything).
      loaded: (source key, our parameter path) of every parameter taken from the checkpoint.
      skipped: source keys left out because no prefix selects them.
      missing: our parameter paths the checkpoint has no tensor for (left at initialisation).
      unexpected: source keys with no place in our model.
      ignored: source keys that hold nothing the model computes with (BatchNorm's
        ``num_batches_tracked``).
      shape_mismatched: tensors that do not fit (left at initialisation).
      vocabulary: the dataset-to-checkpoint gene match, when a dataset was given.
      notes: behaviour differences and hints worth reading.
    """

    source: str
    attention_layout: str | None = None
    prefixes: tuple[str, ...] = ()
    loaded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    shape_mismatched: list[ShapeMismatch] = dataclasses.field(default_factory=list)
    vocabulary: VocabularyMatch | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["loaded"] = [list(pair) for pair in self.loaded]
        out["prefixes"] = list(self.prefixes)
        if self.vocabulary is not None:
            out["vocabulary"]["message"] = self.vocabulary.message
        return out

    def summary(self, max_items: int = 20) -> str:
        """A human-readable account, lists cut at `max_items` entries."""

        def listed(items: Sequence[str]) -> str:
            shown = ", ".join(items[:max_items])
            return shown + (
                f", ... ({len(items) - max_items} more)" if len(items) > max_items else ""
            )

        lines = [
            f"Weights from {self.source}"
            + (f" (attention layout: {self.attention_layout})" if self.attention_layout else "")
            + (f", prefixes {list(self.prefixes)}" if self.prefixes else "")
            + ":",
            f"  loaded: {len(self.loaded)} tensor(s)",
        ]
        if self.skipped:
            lines.append(f"  skipped by prefix ({len(self.skipped)}): {listed(self.skipped)}")
        if self.missing:
            lines.append(
                f"  missing from the checkpoint, left at initialisation "
                f"({len(self.missing)}): {listed(self.missing)}"
            )
        if self.unexpected:
            lines.append(
                f"  unexpected, not used ({len(self.unexpected)}): {listed(self.unexpected)}"
            )
        if self.ignored:
            lines.append(f"  ignored ({len(self.ignored)}): {listed(self.ignored)}")
        if self.shape_mismatched:
            lines.append(
                f"  shape mismatched, left at initialisation "
                f"({len(self.shape_mismatched)}): "
                + listed(
                    [
                        f"{m.source_key} {m.source_shape} -> {m.path} {m.expected_shape}"
                        for m in self.shape_mismatched
                    ]
                )
            )
        if self.vocabulary is not None:
            v = self.vocabulary
            lines.append(
                f"  vocabulary: {v.message}"
                + (
                    f"; not in it (embedding starts at zero): {listed(list(v.unmatched_genes))}"
                    if v.unmatched_genes
                    else ""
                )
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
