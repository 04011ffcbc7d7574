"""GEARS condition names ("ctrl", "A+ctrl", "ctrl+A", "A+B"): the one parser.

Kept free of heavy imports so that the split code (NumPy only) can use it. The control
label ``"ctrl"`` (:data:`CONTROL`) is defined here and imported everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterable

CONTROL = "ctrl"


class DataFormatError(ValueError):
    """Input data that cannot be used as given; the message names the problem and the fix."""


def parse_condition(condition: str) -> tuple[str, ...]:
    """The perturbed genes of a GEARS condition string.

    Args:
      condition: ``"ctrl"``, ``"A+ctrl"``, ``"ctrl+A"`` or ``"A+B"``.

    Returns:
      The gene names, without ``ctrl``: ``()``, ``("A",)`` or ``("A", "B")``.

    Raises:
      DataFormatError: for anything else (empty parts, three genes, ``"A"`` without
        ``+ctrl``, ``"ctrl+ctrl"``, a gene twice, white space, a gene name containing
        ``ctrl``: GEARS finds singles by that substring and would take such a double for a
        single).
    """
    if not isinstance(condition, str):
        raise DataFormatError(
            f"Condition {condition!r} is not a string; obs['condition'] must hold strings such "
            "as 'ctrl', 'A+ctrl' or 'A+B'."
        )
    if condition == CONTROL:
        return ()
    parts = condition.split("+")
    problem = None
    if len(parts) != 2:
        problem = f"it has {len(parts) - 1} '+' signs, expected exactly one"
    elif any(not p or p != p.strip() or " " in p for p in parts):
        problem = "it has an empty or space-padded gene name"
    elif parts == [CONTROL, CONTROL]:
        problem = "it perturbs no gene; control cells are 'ctrl'"
    elif parts[0] == parts[1]:
        problem = "it names the same gene twice"
    else:
        odd = [p for p in parts if CONTROL in p and p != CONTROL]
        if odd:
            problem = (
                f"gene name {odd[0]!r} contains 'ctrl', which GEARS takes as the control "
                "marker; rename the gene"
            )
    if problem is not None:
        raise DataFormatError(
            f"Malformed condition {condition!r}: {problem}. Expected 'ctrl', 'A+ctrl' (single "
            "perturbation of gene A) or 'A+B' (double)."
        )
    return tuple(p for p in parts if p != CONTROL)


def condition_genes(condition: str) -> tuple[str, ...]:
    """Like :func:`parse_condition`, but also accepts a bare gene ``"A"`` for ``"A+ctrl"``."""
    if isinstance(condition, str) and condition != CONTROL and "+" not in condition and condition:
        condition = f"{condition}+{CONTROL}"
    return parse_condition(condition)


def unique_conditions(conditions: Iterable) -> list[str]:
    """Distinct conditions as strings, in order of first appearance (how GEARS lists them)."""
    return list(dict.fromkeys(str(c) for c in conditions))
