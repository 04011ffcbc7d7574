"""Key mapping: PyTorch scGPT/scFormer state-dict keys -> our Flax parameter paths, and
tensors from PyTorch's layout into Flax's (``nn.Linear`` weights are ``(out, in)``, Flax
``Dense`` kernels ``(in, out)``; LayerNorm weight/bias are scale/bias)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from scformer_jax.convert.report import ConversionError
from scformer_jax.model import BATCH_STATS

# How the tensors of one PyTorch module become Flax parameters.
LINEAR, NORM, EMBED, PRELU, BATCHNORM = "linear", "norm", "embedding", "prelu", "batchnorm"
_PARAM_NAMES = {
    LINEAR: {"weight": "kernel", "bias": "bias"},
    NORM: {"weight": "scale", "bias": "bias"},
    EMBED: {"weight": "embedding"},
    PRELU: {"weight": "negative_slope"},
    BATCHNORM: {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"},
}
# BatchNorm's running statistics are not parameters: they sit under this key of the weights
# tree (scformer_jax.model.BATCH_STATS).
_RUNNING_STATS = ("mean", "var")
# Tensors with nothing to compute: BatchNorm's update counter (momentum is fixed, so the
# count never enters the computation).
IGNORED_SUFFIXES = (".num_batches_tracked",)
LAYER_PATTERN = r"transformer_encoder\.layers\.(\d+)"
# (PyTorch module path regex, function of the match -> (Flax module path, kind)).
_MODULE_RULES = [
    (r"encoder\.embedding", lambda m: (("encoder",), EMBED)),
    (r"encoder\.enc_norm", lambda m: (("encoder_norm",), NORM)),
    (r"value_encoder\.(linear1|linear2)", lambda m: (("value_encoder", m[1]), LINEAR)),
    (r"value_encoder\.norm", lambda m: (("value_encoder", "norm"), NORM)),
    (r"pert_encoder", lambda m: (("pert_encoder",), EMBED)),
    (
        LAYER_PATTERN + r"\.self_attn\.(in_proj|out_proj)",
        lambda m: ((f"layers_{m[1]}", "self_attn", m[2]), LINEAR),
    ),
    (LAYER_PATTERN + r"\.(linear1|linear2)", lambda m: ((f"layers_{m[1]}", m[2]), LINEAR)),
    (LAYER_PATTERN + r"\.(norm1|norm2)", lambda m: ((f"layers_{m[1]}", m[2]), NORM)),
    (r"bn", lambda m: (("bn",), BATCHNORM)),
    (r"decoder", lambda m: (("decoder",), LINEAR)),
    # scGPT's ExprDecoder (nn.Sequential: Linear at 0, 2, 4) and AffineExprDecoder.
    (r"decoder\.(fc|zero_logit)\.(\d+)", lambda m: (("decoder", f"{m[1]}_{m[2]}"), LINEAR)),
    (
        r"decoder\.(coeff_decoder|bias_decoder)\.(fc|zero_logit)\.(\d+)",
        lambda m: (("decoder", m[1], f"{m[2]}_{m[3]}"), LINEAR),
    ),
    # ClsDecoder's ModuleList repeats (Linear, ReLU, LayerNorm): index 3i is dense_i,
    # 3i + 2 is norm_i (ReLU has no parameters).
    (
        r"cls_decoder\._decoder\.(\d+)",
        lambda m: (
            (("cls_decoder", f"dense_{int(m[1]) // 3}"), LINEAR)
            if int(m[1]) % 3 == 0
            else (("cls_decoder", f"norm_{int(m[1]) // 3}"), NORM)
            if int(m[1]) % 3 == 2
            else None
        ),
    ),
    (r"cls_decoder\.out_layer", lambda m: (("cls_decoder", "out_layer"), LINEAR)),
    (
        r"mvc_decoder\.(gene2query|W|W_zero_logit|fc1|fc2)",
        lambda m: (("mvc_decoder", m[1]), LINEAR),
    ),
    (r"mvc_decoder\.hidden_activation", lambda m: (("mvc_decoder", "hidden_activation"), PRELU)),
]
_MODULE_RULES = [(re.compile(pattern), rule) for pattern, rule in _MODULE_RULES]


def torch_key_to_path(key: str) -> tuple[tuple[str, ...], str] | None:
    """Our parameter path and the mapping kind of a PyTorch state-dict key, or None.

    Example: ``transformer_encoder.layers.3.self_attn.Wqkv.weight`` ->
    ``(("layers_3", "self_attn", "in_proj", "kernel"), "linear")``.
    """
    # Both attention layouts name one (3 * d, d) projection; give them one module name.
    key = (
        key.replace(".self_attn.in_proj_weight", ".self_attn.in_proj.weight")
        .replace(".self_attn.in_proj_bias", ".self_attn.in_proj.bias")
        .replace(".self_attn.Wqkv.", ".self_attn.in_proj.")
    )
    if "." not in key:
        return None
    module, param = key.rsplit(".", 1)
    for pattern, rule in _MODULE_RULES:
        match = pattern.fullmatch(module)
        if match is None:
            continue
        target = rule(match)
        if target is None:
            return None
        path, kind = target
        name = _PARAM_NAMES[kind].get(param)
        if name is None:
            return None
        if kind == BATCHNORM and name in _RUNNING_STATS:
            path = (BATCH_STATS,) + path
        return path + (name,), kind
    return None


def is_ignored(key: str) -> bool:
    """True for state-dict entries that carry nothing the model computes with."""
    return key.endswith(IGNORED_SUFFIXES)


def detect_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The scGPT/scFormer variant a state dict holds, read off its keys.

    Returns:
      ``expr_decoder`` ("linear": ``decoder.weight``; "mlp": ``decoder.fc.*``, scGPT up to
      January 2024; "affine": ``decoder.coeff_decoder.*``, scGPT since), ``input_batchnorm``
      (``bn.*``) and ``explicit_zero_prob`` (``decoder...zero_logit.*`` or
      ``mvc_decoder.W_zero_logit.*``).
    """
    keys = list(state_dict)
    if any(k.startswith("decoder.coeff_decoder.") for k in keys):
        expr_decoder = "affine"
    elif any(k.startswith("decoder.fc.") for k in keys):
        expr_decoder = "mlp"
    else:
        expr_decoder = "linear"
    zero_heads = (".zero_logit.", "mvc_decoder.W_zero_logit.")
    return {
        "expr_decoder": expr_decoder,
        "input_batchnorm": any(k.startswith("bn.") for k in keys),
        "explicit_zero_prob": expr_decoder != "linear"
        and any(h in "." + k for k in keys for h in zero_heads),
    }


def to_flax_layout(value: np.ndarray, kind: str, path: tuple[str, ...]) -> np.ndarray:
    if kind == LINEAR and path[-1] == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    if kind == PRELU and value.size == 1:
        # nn.PReLU() holds one slope of shape (1,); Flax's PReLU a scalar.
        return value.reshape(())
    return value


def attention_layout(state_dict: Mapping[str, Any]) -> str | None:
    flash = any(".self_attn.Wqkv." in k for k in state_dict)
    torch_style = any(".self_attn.in_proj_" in k for k in state_dict)
    if flash and torch_style:
        raise ConversionError(
            "The state_dict mixes both attention layouts (self_attn.in_proj_weight and "
            "self_attn.Wqkv); it is not one model's state_dict."
        )
    return "flash" if flash else "torch" if torch_style else None


def infer_mvc_style(state_dict: Mapping[str, np.ndarray], embsize: int) -> str | None:
    if "mvc_decoder.W.weight" in state_dict:
        return "inner product"
    fc1 = state_dict.get("mvc_decoder.fc1.weight")
    if fc1 is not None:
        return "concat query" if fc1.shape[-1] == embsize + 64 else "sum query"
    return None
