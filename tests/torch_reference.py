"""PyTorch reference of the original scFormer ``TransformerGenerator``.

This is our own re-implementation of the architecture in bowang-lab/scFormer
(``scformer/model/generation_model.py``), used for two things:

* the oracle of the tests: random-weight checkpoints written in scGPT's folder layout
  (``best_model.pt``, ``args.json``, ``vocab.json``) and the reference outputs our JAX
  model must reproduce (``tests/test_convert.py``), itself checked against NumPy in
  ``tests/test_torch_reference.py``;
* the speed/memory baseline of ``bench/``: the original's train step and eval forward,
  timed by ``bench/torch_bench.py`` in a process of its own.

It imports nothing from ``scformer_jax`` (an independent oracle, and the benchmark's
process holds only PyTorch).

scGPT's perturbation model (``scgpt/model/generation_model.py``) in its two versions is an
option of the same class: up to January 2024 ``input_batchnorm=True`` with
``expr_decoder="mlp"`` (``bn``, ``decoder.fc.*``), since then ``expr_decoder="affine"``
(``decoder.coeff_decoder.*``, ``decoder.bias_decoder.*``); either with ``explicit_zero_prob``
(``zero_logit`` heads, ``mvc_decoder.W_zero_logit``) and, in the flash layout, ``pre_norm``.

The ``state_dict`` keys are those of the original (``encoder.embedding.weight``,
``value_encoder.linear1.weight``, ``pert_encoder.weight``,
``transformer_encoder.layers.0.self_attn.in_proj_weight``, ``decoder.weight``,
``cls_decoder._decoder.0.weight``, ``mvc_decoder.W.weight``, ...). With
``attention_layout="flash"`` the encoder layers instead follow scGPT's
``FlashTransformerEncoderLayer`` (``self_attn.Wqkv.weight``/``bias`` and
``self_attn.out_proj.*``), computed here with plain torch.

The original's behaviours are kept on purpose, flaws included:

* ``cell_emb_style="cls"`` takes the output at position 0 (the perturbation input has no
  ``<cls>`` token, so that is the first gene);
* ``"avg-pool"`` averages over every position, padding included;
* ``"w-pool"`` weights positions by the raw input values, then L2-normalises;
* ``init_weights`` draws the whole gene-embedding table uniformly, so the ``<pad>`` row is
  not zero even though ``padding_idx`` is set;
* the CCE objective re-encodes the batch and takes the second cell embedding without
  weights (so ``"w-pool"`` with ``CCE=True`` raises, as in the original).

Behaviour at padding positions (parity tests compare real positions only):

* ``nn.TransformerEncoder`` in eval mode under ``torch.no_grad()`` (how the original
  predicts) takes PyTorch's fused fast path, which returns exact zeros at padding
  positions of the encoder output; in training mode, or with the fast path off, those
  positions hold ordinary (meaningless) values. Only ``"avg-pool"`` cell embeddings see
  the difference. ``reference_forward(..., fastpath=False)`` turns the fast path off.
* The flash layout, like flash_attn's ``FlashMHA``, gives padding queries a zero attention
  context; the rest of the layer (``out_proj`` bias, residual, feed-forward, norms) still
  runs on them.

Outputs at real positions are the same in all of these cases.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# The original's special tokens (scformer_jax.data.dataset.SPECIAL_TOKENS must equal them).
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")
MVC_DECODER_STYLES = ("inner product", "inner product, detach", "concat query", "sum query")
ATTENTION_LAYOUTS = ("torch", "flash")
EXPR_DECODERS = ("linear", "mlp", "affine")

CHECKPOINT_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"

# The two encoder-layer layouts differ only in the names of the fused input projection;
# both store it as (3 * d_model, d_model) with rows [q; k; v], heads contiguous inside each
# (flash_attn reshapes the output as "(three h d)", nn.MultiheadAttention chunks q, k, v
# and then views each as (h, d)), so converting is a rename.
_TORCH_TO_FLASH_SUFFIX = {
    "self_attn.in_proj_weight": "self_attn.Wqkv.weight",
    "self_attn.in_proj_bias": "self_attn.Wqkv.bias",
}
_FLASH_TO_TORCH_SUFFIX = {v: k for k, v in _TORCH_TO_FLASH_SUFFIX.items()}


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, gene_ids: Tensor) -> Tensor:
        """Args: gene_ids: (batch, seq_len) int. Returns: (batch, seq_len, d_model)."""
        return self.enc_norm(self.embedding(gene_ids))


class ValueEncoding(nn.Module):
    """Continuous expression value -> vector (clip, Linear, ReLU, Linear, LayerNorm, dropout)."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: float = 512):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, values: Tensor) -> Tensor:
        """Args: values: (batch, seq_len) float. Returns: (batch, seq_len, d_model)."""
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class Similarity(nn.Module):
    """Cosine similarity divided by a temperature."""

    def __init__(self, temp: float):
        super().__init__()
        self.temp = temp
        self.cos = nn.CosineSimilarity(dim=-1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.cos(x, y) / self.temp


class ClsDecoder(nn.Module):
    """(Linear, activation, LayerNorm) x (nlayers - 1), then a Linear to n_cls logits."""

    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3, activation=nn.ReLU):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.append(nn.Linear(d_model, d_model))
            self._decoder.append(activation())
            self._decoder.append(nn.LayerNorm(d_model))
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, cell_emb: Tensor) -> Tensor:
        """Args: cell_emb: (batch, d_model). Returns: (batch, n_cls)."""
        x = cell_emb
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class MVCDecoder(nn.Module):
    """Predicts each gene's value from the cell embedding and a query made from the gene's
    own token embedding (no value information), in one of four styles."""

    def __init__(
        self,
        d_model: int,
        arch_style: str = "inner product",
        query_activation=nn.Sigmoid,
        hidden_activation=nn.PReLU,
        explicit_zero_prob: bool = False,
    ):
        super().__init__()
        self.explicit_zero_prob = explicit_zero_prob
        if arch_style in ("inner product", "inner product, detach"):
            self.gene2query = nn.Linear(d_model, d_model)
            self.query_activation = query_activation()
            self.W = nn.Linear(d_model, d_model, bias=False)
            if explicit_zero_prob:
                # scGPT's gene-wise zero logits: the same inner product through its own matrix.
                self.W_zero_logit = nn.Linear(d_model, d_model)
        elif arch_style == "concat query":
            # The original hard-codes a 64-wide query and hidden layer here.
            self.gene2query = nn.Linear(d_model, 64)
            self.query_activation = query_activation()
            self.fc1 = nn.Linear(d_model + 64, 64)
            self.hidden_activation = hidden_activation()
            self.fc2 = nn.Linear(64, 1)
        elif arch_style == "sum query":
            self.gene2query = nn.Linear(d_model, d_model)
            self.query_activation = query_activation()
            self.fc1 = nn.Linear(d_model, 64)
            self.hidden_activation = hidden_activation()
            self.fc2 = nn.Linear(64, 1)
        else:
            raise ValueError(
                f"Unknown mvc_decoder_style {arch_style!r}; use one of {MVC_DECODER_STYLES}."
            )
        self.arch_style = arch_style
        self.do_detach = arch_style.endswith("detach")

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> Tensor:
        """Args:
            cell_emb: (batch, d_model).
            gene_embs: (batch, seq_len, d_model), the normalised gene token embeddings.

        Returns:
            ((batch, seq_len) predicted values, (batch, seq_len) zero probabilities or None).
            The query styles have no zero head (scGPT raises for them).
        """
        if self.do_detach:
            gene_embs = gene_embs.detach()
        query_vecs = self.query_activation(self.gene2query(gene_embs))
        if self.arch_style in ("inner product", "inner product, detach"):
            # (batch, seq_len, d) @ (batch, d, 1) -> (batch, seq_len)
            pred = torch.bmm(self.W(query_vecs), cell_emb.unsqueeze(2)).squeeze(2)
            if not self.explicit_zero_prob:
                return pred, None
            logits = torch.bmm(self.W_zero_logit(query_vecs), cell_emb.unsqueeze(2)).squeeze(2)
            return pred, torch.sigmoid(logits)
        if self.arch_style == "concat query":
            expanded = cell_emb.unsqueeze(1).expand(-1, gene_embs.shape[1], -1)
            hidden = self.hidden_activation(self.fc1(torch.cat([expanded, query_vecs], dim=2)))
            return self.fc2(hidden).squeeze(2), None
        hidden = self.hidden_activation(self.fc1(cell_emb.unsqueeze(1) + query_vecs))
        return self.fc2(hidden).squeeze(2), None


class ExprDecoder(nn.Module):
    """scGPT's MLP expression decoder: (Linear, LeakyReLU) x 2 then Linear to one value per
    token, and with ``explicit_zero_prob`` a second such MLP whose sigmoid is the zero
    probability."""

    def __init__(self, d_model: int, explicit_zero_prob: bool = False):
        super().__init__()

        def mlp() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(d_model, d_model),
                nn.LeakyReLU(),
                nn.Linear(d_model, d_model),
                nn.LeakyReLU(),
                nn.Linear(d_model, 1),
            )

        self.fc = mlp()
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.zero_logit = mlp()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args: x: (batch, seq_len, d_model). Returns: "pred" (and "zero_probs"), each
        (batch, seq_len)."""
        out = {"pred": self.fc(x).squeeze(-1)}
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(x).squeeze(-1))
        return out


class AffineExprDecoder(nn.Module):
    """scGPT's affine decoder: coefficient and bias from two ``ExprDecoder``s, prediction
    ``coefficient * value + bias``; optional activation on both (a torch.nn class name) and
    the bias scaled by each cell's mean non-zero input value (``adaptive_bias``)."""

    def __init__(
        self,
        d_model: int,
        explicit_zero_prob: bool = False,
        activation: str | None = None,
        adaptive_bias: bool = False,
    ):
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_model, explicit_zero_prob)
        self.bias_decoder = ExprDecoder(d_model, explicit_zero_prob)
        self.explicit_zero_prob = explicit_zero_prob
        self.adaptive_bias = adaptive_bias
        self.activation = getattr(nn, activation)() if activation is not None else None

    def forward(self, x: Tensor, values: Tensor) -> dict[str, Tensor]:
        """Args: x (batch, seq_len, d_model), values (batch, seq_len)."""
        coeff = self.coeff_decoder(x)["pred"]
        bias = self.bias_decoder(x)["pred"]
        if self.activation is not None:
            coeff, bias = self.activation(coeff), self.activation(bias)
        if self.adaptive_bias:
            nonzero_mean = values.sum(dim=1, keepdim=True) / (values != 0).sum(dim=1, keepdim=True)
            bias = bias * nonzero_mean
        out = {"pred": coeff * values + bias}
        if self.explicit_zero_prob:
            out["zero_probs"] = self.coeff_decoder(x)["zero_probs"]
        return out


class FusedQKVSelfAttention(nn.Module):
    """Self-attention with flash_attn ``FlashMHA``'s parameters, in plain torch.

    ``Wqkv`` maps d_model to 3 * d_model laid out as (three, heads, head_dim): rows
    [0, d) are the queries, [d, 2d) the keys, [2d, 3d) the values, each split into heads
    of ``head_dim`` consecutive rows.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, attention_dropout: float = 0.0, bias: bool = True
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; "
                "choose a head count that divides the embedding size."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attention_dropout = attention_dropout
        # nn.TransformerEncoder reads this off its first layer's self_attn.
        self.batch_first = True
        self.Wqkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None):
        """Args:
            x: (batch, seq_len, embed_dim).
            key_padding_mask: (batch, seq_len) bool, True at REAL tokens (flash_attn's
                convention, the opposite of nn.MultiheadAttention's), or None.

        Returns:
            ((batch, seq_len, embed_dim) output, None), like FlashMHA.
        """
        batch, seq_len, _ = x.shape
        qkv = self.Wqkv(x).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        queries, keys, values = qkv.unbind(dim=2)  # each (batch, seq_len, heads, head_dim)
        scores = torch.einsum("bqhd,bkhd->bhqk", queries, keys) / math.sqrt(self.head_dim)
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = F.dropout(probs, p=self.attention_dropout, training=self.training)
        context = torch.einsum("bhqk,bkhd->bqhd", probs, values)
        if key_padding_mask is not None:
            # flash_attn drops padding tokens before its kernel and scatters the result back
            # into zeros; masked_fill also clears NaNs from rows with no real key.
            context = context.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
        return self.out_proj(context.reshape(batch, seq_len, self.embed_dim)), None


class FlashLayoutEncoderLayer(nn.Module):
    """scGPT's ``FlashTransformerEncoderLayer`` (post- or pre-LN) on ``FusedQKVSelfAttention``."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        norm_scheme: str = "post",
    ):
        super().__init__()
        if norm_scheme not in ("pre", "post"):
            raise ValueError(f"norm_scheme must be 'pre' or 'post', got {norm_scheme!r}.")
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}.")
        self.self_attn = FusedQKVSelfAttention(d_model, nhead, attention_dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = F.relu if activation == "relu" else F.gelu
        self.norm_scheme = norm_scheme

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """Args:
            src: (batch, seq_len, d_model).
            src_mask: must be None (no attention-mask support, as in scGPT).
            src_key_padding_mask: (batch, seq_len), True (or -inf, as nn.TransformerEncoder
                passes it) at padding positions.

        Returns:
            (batch, seq_len, d_model).
        """
        if src_mask is not None:
            raise ValueError("FlashLayoutEncoderLayer does not support src_mask.")
        keep_mask = None
        if src_key_padding_mask is not None:
            is_padding = src_key_padding_mask.bool()
            if is_padding.any():
                keep_mask = ~is_padding
        if self.norm_scheme == "pre":
            src = self.norm1(src)
            src = src + self.dropout1(self.self_attn(src, key_padding_mask=keep_mask)[0])
            src = self.norm2(src)
            return src + self.dropout2(self._feed_forward(src))
        src = src + self.dropout1(self.self_attn(src, key_padding_mask=keep_mask)[0])
        src = self.norm1(src)
        src = src + self.dropout2(self._feed_forward(src))
        return self.norm2(src)


class TransformerGenerator(nn.Module):
    """The scFormer perturbation model: gene + value + perturbation-flag embeddings, a
    post-LN transformer encoder and an expression decoder (plus CLS/MVC/CCE/ECS heads).

    Args mirror the original's constructor; ``attention_layout`` picks
    ``nn.TransformerEncoderLayer`` ("torch") or scGPT's flash layer layout ("flash").
    """

    def __init__(
        self,
        ntoken: int,
        d_model: int,
        nhead: int,
        d_hid: int,
        nlayers: int,
        nlayers_cls: int,
        n_cls: int,
        vocab: Mapping[str, int],
        dropout: float = 0.5,
        pad_token: str = "<pad>",
        pad_value: float = 0,
        pert_pad_id: int = 2,
        do_mvc: bool = False,
        cell_emb_style: str = "cls",
        mvc_decoder_style: str = "inner product",
        ecs_threshold: float = 0.3,
        attention_layout: str = "torch",
        expr_decoder: str = "linear",
        explicit_zero_prob: bool = False,
        decoder_activation: str | None = None,
        decoder_adaptive_bias: bool = False,
        input_batchnorm: bool = False,
        pre_norm: bool = False,
    ):
        super().__init__()
        if expr_decoder not in EXPR_DECODERS:
            raise ValueError(f"Unknown expr_decoder {expr_decoder!r}; use one of {EXPR_DECODERS}.")
        if explicit_zero_prob and expr_decoder == "linear":
            raise ValueError("explicit_zero_prob needs expr_decoder 'mlp' or 'affine'.")
        if pre_norm and attention_layout != "flash":
            raise ValueError("pre_norm exists only in scGPT's flash layer: use layout 'flash'.")
        if cell_emb_style not in CELL_EMB_STYLES:
            raise ValueError(
                f"Unknown cell_emb_style {cell_emb_style!r}; use one of {CELL_EMB_STYLES}."
            )
        if attention_layout not in ATTENTION_LAYOUTS:
            raise ValueError(
                f"Unknown attention_layout {attention_layout!r}; use one of {ATTENTION_LAYOUTS}."
            )
        if pad_token not in vocab:
            raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary; add it.")
        self.model_type = "Transformer"
        self.d_model = d_model
        self.pad_token_id = vocab[pad_token]
        self.pad_value = pad_value
        self.pert_pad_id = pert_pad_id
        self.ecs_threshold = ecs_threshold
        self.cell_emb_style = cell_emb_style
        self.attention_layout = attention_layout
        self.expr_decoder = expr_decoder
        self.explicit_zero_prob = explicit_zero_prob

        self.encoder = GeneEncoder(ntoken, d_model, padding_idx=self.pad_token_id)
        self.value_encoder = ValueEncoding(d_model, dropout)
        self.pert_encoder = nn.Embedding(3, d_model, padding_idx=pert_pad_id)
        if input_batchnorm:
            # scGPT up to January 2024: BatchNorm over the summed embeddings.
            self.bn = nn.BatchNorm1d(d_model, eps=6.1e-5)
        if attention_layout == "torch":
            layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, batch_first=True)
            self.transformer_encoder = nn.TransformerEncoder(layer, nlayers)
        else:
            layer = FlashLayoutEncoderLayer(
                d_model, nhead, d_hid, dropout, norm_scheme="pre" if pre_norm else "post"
            )
            # Nested tensors only apply to nn.TransformerEncoderLayer; saying so up front
            # silences PyTorch's warning about it.
            self.transformer_encoder = nn.TransformerEncoder(
                layer, nlayers, enable_nested_tensor=False
            )
        if expr_decoder == "linear":
            self.decoder = nn.Linear(d_model, 1)
        elif expr_decoder == "mlp":
            self.decoder = ExprDecoder(d_model, explicit_zero_prob)
        else:
            self.decoder = AffineExprDecoder(
                d_model, explicit_zero_prob, decoder_activation, decoder_adaptive_bias
            )
        self.cls_decoder = ClsDecoder(d_model, n_cls, nlayers=nlayers_cls)
        if do_mvc:
            self.mvc_decoder = MVCDecoder(
                d_model, arch_style=mvc_decoder_style, explicit_zero_prob=explicit_zero_prob
            )
        self.sim = Similarity(temp=0.5)
        self.criterion_cce = nn.CrossEntropyLoss()
        self.init_weights()

    def init_weights(self) -> None:
        init_range = 0.1
        self.encoder.embedding.weight.data.uniform_(-init_range, init_range)
        if self.expr_decoder == "linear":
            self.decoder.bias.data.zero_()
            self.decoder.weight.data.uniform_(-init_range, init_range)

    def _encode(
        self, gene_ids: Tensor, values: Tensor, pert_flags: Tensor, src_key_padding_mask: Tensor
    ) -> Tensor:
        """Returns the encoder output, (batch, seq_len, d_model)."""
        gene_embs = self.encoder(gene_ids)
        # The MVC decoder reads these: the only place the raw gene embeddings exist.
        self.cur_gene_token_embs = gene_embs
        total = gene_embs + self.value_encoder(values) + self.pert_encoder(pert_flags)
        if hasattr(self, "bn"):
            total = self.bn(total.permute(0, 2, 1)).permute(0, 2, 1)
        return self.transformer_encoder(total, src_key_padding_mask=src_key_padding_mask)

    def _get_cell_emb_from_layer(
        self, layer_output: Tensor, weights: Tensor | None = None
    ) -> Tensor:
        """Args:
            layer_output: (batch, seq_len, d_model).
            weights: (batch, seq_len), needed for "w-pool".

        Returns:
            (batch, d_model).
        """
        if self.cell_emb_style == "cls":
            return layer_output[:, 0, :]
        if self.cell_emb_style == "avg-pool":
            return torch.mean(layer_output, dim=1)
        if weights is None:
            raise ValueError("weights is required when cell_emb_style is w-pool")
        if weights.dim() != 2:
            raise ValueError("weights should be 2D")
        cell_emb = torch.sum(layer_output * weights.unsqueeze(2), dim=1)
        return F.normalize(cell_emb, p=2, dim=1)

    def forward(
        self,
        src: Tensor,
        values: Tensor,
        input_pert_flags: Tensor,
        src_key_padding_mask: Tensor,
        CLS: bool = False,
        CCE: bool = False,
        MVC: bool = False,
        ECS: bool = False,
        do_sample: bool = False,
    ) -> dict[str, Tensor]:
        """Args:
            src: (batch, seq_len) gene token ids.
            values: (batch, seq_len) control expression values.
            input_pert_flags: (batch, seq_len) 0/1 flags, ``pert_pad_id`` at padding.
            src_key_padding_mask: (batch, seq_len) bool, True at padding.
            CLS, CCE, MVC, ECS: which extra objectives to compute.
            do_sample: with zero probabilities, multiply the predictions by a
                Bernoulli(zero_probs) draw (scGPT forces this in eval mode; off here so
                that outputs are deterministic unless asked).

        Returns:
            Dict with "mlm_output" (batch, seq_len) and "cell_emb" (batch, d_model) always
            ("cell_emb" is our addition, computed exactly as the original uses it), plus
            "cls_output" (batch, n_cls), "loss_cce" (), "mvc_output" (batch, seq_len),
            "loss_ecs" () when asked for.
        """
        transformer_output = self._encode(src, values, input_pert_flags, src_key_padding_mask)
        if self.expr_decoder == "linear":
            decoded = {"pred": self.decoder(transformer_output).squeeze(-1)}
        elif self.expr_decoder == "mlp":
            decoded = self.decoder(transformer_output)
        else:
            decoded = self.decoder(transformer_output, values)
        output = {
            "mlm_output": self._sampled(decoded["pred"], decoded.get("zero_probs"), do_sample)
        }
        if "zero_probs" in decoded:
            output["mlm_zero_probs"] = decoded["zero_probs"]
        cell_emb = self._get_cell_emb_from_layer(transformer_output, values)
        output["cell_emb"] = cell_emb
        if CLS:
            output["cls_output"] = self.cls_decoder(cell_emb)
        if CCE:
            cell1 = cell_emb
            transformer_output2 = self._encode(src, values, input_pert_flags, src_key_padding_mask)
            cell2 = self._get_cell_emb_from_layer(transformer_output2)
            if dist.is_available() and dist.is_initialized() and self.training:
                world = dist.get_world_size()
                cls1_list = [torch.zeros_like(cell1) for _ in range(world)]
                cls2_list = [torch.zeros_like(cell2) for _ in range(world)]
                dist.all_gather(tensor_list=cls1_list, tensor=cell1.contiguous())
                dist.all_gather(tensor_list=cls2_list, tensor=cell2.contiguous())
                # all_gather returns no gradient; put this rank's own tensors back.
                cls1_list[dist.get_rank()] = cell1
                cls2_list[dist.get_rank()] = cell2
                cell1 = torch.cat(cls1_list, dim=0)
                cell2 = torch.cat(cls2_list, dim=0)
            cos_sim = self.sim(cell1.unsqueeze(1), cell2.unsqueeze(0))  # (batch, batch)
            labels = torch.arange(cos_sim.size(0), device=cell1.device)
            output["loss_cce"] = self.criterion_cce(cos_sim, labels)
        if MVC:
            pred, zero_probs = self.mvc_decoder(cell_emb, self.cur_gene_token_embs)
            output["mvc_output"] = self._sampled(pred, zero_probs, do_sample)
            if zero_probs is not None:
                output["mvc_zero_probs"] = zero_probs
        if ECS:
            # Normalise then matmul, rather than F.cosine_similarity, which can exceed 1.
            normed = F.normalize(cell_emb, p=2, dim=1)
            cos_sim = torch.mm(normed, normed.t())
            eye = torch.eye(cos_sim.size(0), dtype=torch.bool, device=cos_sim.device)
            cos_sim = F.relu(cos_sim.masked_fill(eye, 0.0))
            output["loss_ecs"] = torch.mean(1 - (cos_sim - self.ecs_threshold) ** 2)
        return output

    @staticmethod
    def _sampled(pred: Tensor, zero_probs: Tensor | None, do_sample: bool) -> Tensor:
        if not do_sample or zero_probs is None:
            return pred
        return torch.distributions.Bernoulli(probs=zero_probs).sample() * pred


def make_vocab(
    gene_names: Sequence[str], special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> dict[str, int]:
    """Gene -> token id as the original builds it: genes in order, special tokens after.

    Args:
        gene_names: (n_genes,) unique gene names.
        special_tokens: tokens appended after the genes (``<pad>``, ``<cls>``, ``<eoc>``).

    Returns:
        Dict of n_genes + len(special_tokens) entries.
    """
    tokens = list(gene_names) + [t for t in special_tokens if t not in set(gene_names)]
    if len(set(tokens)) != len(tokens):
        raise ValueError("gene_names contains duplicates; give each gene once.")
    return {token: index for index, token in enumerate(tokens)}


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Seeds torch's global RNG inside the block without disturbing the caller's stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_parameters(model: nn.Module, *, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Adds N(0, scale^2) noise to every parameter, in place.

    Default initialisation leaves many parameters at exact constants (LayerNorm weights 1,
    attention biases 0, the decoder bias 0), which would hide a swapped or dropped tensor in
    a weight-import test; after this every tensor is distinct.

    Args:
        model: any module.
        seed: seed of the noise.
        scale: noise standard deviation.

    Returns:
        The same module.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def build_reference_model(
    *,
    vocab: Mapping[str, int] | None = None,
    n_genes: int = 32,
    d_model: int = 64,
    nhead: int = 4,
    d_hid: int = 64,
    nlayers: int = 4,
    nlayers_cls: int = 3,
    n_cls: int = 1,
    dropout: float = 0.2,
    pad_token: str = "<pad>",
    pad_value: float = 0,
    pert_pad_id: int = 2,
    do_mvc: bool = False,
    cell_emb_style: str = "cls",
    mvc_decoder_style: str = "inner product",
    ecs_threshold: float = 0.3,
    attention_layout: str = "torch",
    expr_decoder: str = "linear",
    explicit_zero_prob: bool = False,
    decoder_activation: str | None = None,
    decoder_adaptive_bias: bool = False,
    input_batchnorm: bool = False,
    pre_norm: bool = False,
    seed: int | None = 0,
    randomize_all: bool = False,
) -> TransformerGenerator:
    """Builds the original model (defaults: the seed script's sizes) in eval mode.

    Args:
        vocab: gene/token -> id; by default ``make_vocab`` of ``n_genes`` names
            "GENE0000", ... (genes first, then ``<pad>``, ``<cls>``, ``<eoc>``).
        n_genes: number of genes when ``vocab`` is None.
        d_model .. ecs_threshold: the original constructor's arguments.
        attention_layout: "torch" (nn.MultiheadAttention keys) or "flash" (``Wqkv`` keys).
        expr_decoder .. pre_norm: scGPT's variants: "mlp" with ``input_batchnorm`` is scGPT
            up to January 2024, "affine" without it scGPT since.
        seed: seed of the initialisation (None: torch's global RNG as it stands).
        randomize_all: also perturb every parameter (see ``randomize_parameters``) and give
            the BatchNorm running statistics values away from their 0 / 1 start.

    Returns:
        The model, with ``model.vocab`` (dict) and ``model.config`` (constructor arguments,
        JSON-serialisable) attached.
    """
    if vocab is None:
        vocab = make_vocab([f"GENE{i:04d}" for i in range(n_genes)])
    vocab = dict(vocab)
    ids = sorted(vocab.values())
    if ids != list(range(len(vocab))):
        raise ValueError("vocab ids must be exactly 0..len(vocab)-1, each once.")
    config = dict(
        ntoken=len(vocab),
        d_model=d_model,
        nhead=nhead,
        d_hid=d_hid,
        nlayers=nlayers,
        nlayers_cls=nlayers_cls,
        n_cls=n_cls,
        dropout=dropout,
        pad_token=pad_token,
        pad_value=pad_value,
        pert_pad_id=pert_pad_id,
        do_mvc=do_mvc,
        cell_emb_style=cell_emb_style,
        mvc_decoder_style=mvc_decoder_style,
        ecs_threshold=ecs_threshold,
        attention_layout=attention_layout,
        expr_decoder=expr_decoder,
        explicit_zero_prob=explicit_zero_prob,
        decoder_activation=decoder_activation,
        decoder_adaptive_bias=decoder_adaptive_bias,
        input_batchnorm=input_batchnorm,
        pre_norm=pre_norm,
    )
    with _seeded(seed):
        model = TransformerGenerator(vocab=vocab, **config)
    if randomize_all:
        randomize_parameters(model, seed=0 if seed is None else seed + 1)
        if input_batchnorm:
            generator = torch.Generator().manual_seed(0 if seed is None else seed + 2)
            with torch.no_grad():
                model.bn.running_mean.copy_(0.5 * torch.randn(d_model, generator=generator))
                model.bn.running_var.copy_(0.5 + 1.5 * torch.rand(d_model, generator=generator))
                model.bn.num_batches_tracked.fill_(7)
    model.vocab = vocab
    model.config = config
    return model.eval()


def convert_attention_layout(state_dict: Mapping[str, Tensor], to: str) -> dict[str, Tensor]:
    """Renames the encoder layers' fused q/k/v projection between the two layouts.

    Args:
        state_dict: a ``TransformerGenerator`` state dict in either layout.
        to: "flash" (``self_attn.Wqkv.*``) or "torch" (``self_attn.in_proj_*``).

    Returns:
        A new state dict (tensors cloned) in the requested layout.
    """
    if to not in ATTENTION_LAYOUTS:
        raise ValueError(f"to must be one of {ATTENTION_LAYOUTS}, got {to!r}.")
    renames = _TORCH_TO_FLASH_SUFFIX if to == "flash" else _FLASH_TO_TORCH_SUFFIX
    converted = {}
    for key, tensor in state_dict.items():
        for old, new in renames.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        converted[key] = tensor.detach().clone()
    return converted


def detect_attention_layout(state_dict: Mapping[str, Any]) -> str:
    """Returns "flash" or "torch" from the encoder-layer key names of a state dict."""
    has_flash = any(".self_attn.Wqkv." in key for key in state_dict)
    has_torch = any(".self_attn.in_proj_weight" in key for key in state_dict)
    if has_flash == has_torch:
        raise ValueError(
            "Cannot tell the attention layout: expected transformer_encoder.layers.*."
            "self_attn.in_proj_weight (nn.MultiheadAttention) or self_attn.Wqkv.weight "
            "(flash), found " + ("both." if has_flash else "neither.")
        )
    return "flash" if has_flash else "torch"


def scgpt_args(model: TransformerGenerator) -> dict[str, Any]:
    """The model's ``args.json`` in scGPT's naming (``vars(args)`` of its scripts).

    scGPT's loaders read embsize, nheads, d_hid, nlayers, n_layers_cls (and pad_token,
    pad_value); the remaining keys record this model's scFormer-specific settings.
    """
    config = model.config
    return {
        "embsize": config["d_model"],
        "nheads": config["nhead"],
        "d_hid": config["d_hid"],
        "nlayers": config["nlayers"],
        "n_layers_cls": config["nlayers_cls"],
        "n_cls": config["n_cls"],
        "dropout": config["dropout"],
        "pad_token": config["pad_token"],
        "pad_value": config["pad_value"],
        "mask_value": -1,  # scGPT writes it; this model does not mask values.
        "pert_pad_id": config["pert_pad_id"],
        "input_emb_style": "continuous",
        "cell_emb_style": config["cell_emb_style"],
        "mvc_decoder_style": config["mvc_decoder_style"],
        "MVC": config["do_mvc"],
        "ecs_threshold": config["ecs_threshold"],
        "fast_transformer": config["attention_layout"] == "flash",
        "fast_transformer_backend": "flash",
        "pre_norm": config["pre_norm"],
        "explicit_zero_prob": config["explicit_zero_prob"],
        "decoder_activation": config["decoder_activation"],
        "decoder_adaptive_bias": config["decoder_adaptive_bias"],
        "special_tokens": list(SPECIAL_TOKENS),
    }


def save_reference_checkpoint(
    model: TransformerGenerator,
    folder: str | os.PathLike,
    extra_args: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``best_model.pt`` (state dict), ``args.json`` and ``vocab.json`` as scGPT does.

    Every file is first written to a temporary name in ``folder`` and renamed only once all
    three serialised, so a failure leaves no partial checkpoint.

    Args:
        model: a model from ``build_reference_model`` (needs ``.vocab`` and ``.config``).
        folder: created if missing.
        extra_args: more keys for ``args.json`` (override the defaults).

    Returns:
        The folder's path.
    """
    if not hasattr(model, "vocab") or not hasattr(model, "config"):
        raise ValueError(
            "model has no .vocab/.config; build it with build_reference_model or "
            "load_reference_checkpoint."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = scgpt_args(model)
    args.update(extra_args or {})
    writers = {
        CHECKPOINT_FILE: lambda path: torch.save(model.state_dict(), path),
        ARGS_FILE: lambda path: path.write_text(json.dumps(args, indent=2)),
        VOCAB_FILE: lambda path: path.write_text(json.dumps(model.vocab, indent=2)),
    }
    staged = []
    try:
        for name, write in writers.items():
            handle, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            os.close(handle)
            staged.append((Path(tmp), folder / name))
            write(Path(tmp))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return folder


def load_reference_checkpoint(folder: str | os.PathLike) -> TransformerGenerator:
    """Rebuilds a ``TransformerGenerator`` from a folder written by
    ``save_reference_checkpoint`` (or an scGPT-style folder of this architecture).

    The attention layout, MVC head and number of classes are read from the state dict;
    sizes from ``args.json``; the vocabulary from ``vocab.json``.

    Returns:
        The model in eval mode, weights loaded strictly.
    """
    folder = Path(folder)
    missing = [n for n in (CHECKPOINT_FILE, ARGS_FILE, VOCAB_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}; a checkpoint folder needs "
            f"{CHECKPOINT_FILE}, {ARGS_FILE} and {VOCAB_FILE}."
        )
    state_dict = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    args = json.loads((folder / ARGS_FILE).read_text())
    vocab = json.loads((folder / VOCAB_FILE).read_text())
    needed = ("embsize", "nheads", "d_hid", "nlayers")
    absent = [k for k in needed if k not in args]
    if absent:
        raise KeyError(f"{folder / ARGS_FILE} lacks {absent}; scGPT's args.json has them.")
    embedding_rows = state_dict["encoder.embedding.weight"].shape[0]
    if embedding_rows != len(vocab):
        raise ValueError(
            f"vocab.json has {len(vocab)} tokens but the gene embedding has "
            f"{embedding_rows} rows; use the vocab.json saved with this checkpoint."
        )
    do_mvc = any(key.startswith("mvc_decoder.") for key in state_dict)
    model = build_reference_model(
        vocab=vocab,
        d_model=args["embsize"],
        nhead=args["nheads"],
        d_hid=args["d_hid"],
        nlayers=args["nlayers"],
        nlayers_cls=args.get("n_layers_cls", 3),
        n_cls=state_dict["cls_decoder.out_layer.weight"].shape[0],
        dropout=args.get("dropout", 0.2),
        pad_token=args.get("pad_token", "<pad>"),
        pad_value=args.get("pad_value", 0),
        pert_pad_id=args.get("pert_pad_id", 2),
        do_mvc=do_mvc,
        cell_emb_style=args.get("cell_emb_style", "cls"),
        mvc_decoder_style=args.get("mvc_decoder_style", "inner product"),
        ecs_threshold=args.get("ecs_threshold", 0.3),
        attention_layout=detect_attention_layout(state_dict),
        expr_decoder="affine"
        if "decoder.coeff_decoder.fc.0.weight" in state_dict
        else "mlp"
        if "decoder.fc.0.weight" in state_dict
        else "linear",
        explicit_zero_prob=any(".zero_logit." in key for key in state_dict),
        decoder_activation=args.get("decoder_activation"),
        decoder_adaptive_bias=args.get("decoder_adaptive_bias", False),
        input_batchnorm="bn.weight" in state_dict,
        pre_norm=args.get("pre_norm", False),
        seed=None,
    )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _as_array(name: str, array: Any, kinds: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, seq_len), got shape {array.shape}.")
    if array.dtype.kind not in kinds:
        raise TypeError(f"{name} has dtype {array.dtype}; expected kind(s) {kinds!r}.")
    return array


def reference_forward(
    model: TransformerGenerator,
    gene_ids: Any,
    values: Any,
    pert_flags: Any,
    padding_mask: Any,
    *,
    fastpath: bool = True,
) -> dict[str, np.ndarray]:
    """Runs the model in eval mode without gradients, as the original predicts.

    Args:
        model: a ``TransformerGenerator``.
        gene_ids: (batch, seq_len) int token ids.
        values: (batch, seq_len) float control values (``pad_value`` at padding).
        pert_flags: (batch, seq_len) int in {0, 1, pert_pad_id}.
        padding_mask: (batch, seq_len) bool, True at padding positions.
        fastpath: keep PyTorch's fused eval fast path (as the original ran); False turns it
            off for this call. Only values at padding positions depend on it.

    Returns:
        float32 arrays: "mlm_output" (batch, seq_len), "cell_emb" (batch, d_model),
        "transformer_output" (batch, seq_len, d_model) and, when the model has an MVC head,
        "mvc_output" (batch, seq_len); with zero probabilities "mlm_zero_probs" (and
        "mvc_zero_probs"), unsampled predictions.
    """
    gene_ids = _as_array("gene_ids", gene_ids, "iu")
    values = _as_array("values", values, "fiu")
    pert_flags = _as_array("pert_flags", pert_flags, "iu")
    padding_mask = _as_array("padding_mask", padding_mask, "b")
    shapes = {a.shape for a in (gene_ids, values, pert_flags, padding_mask)}
    if len(shapes) != 1:
        raise ValueError(
            "gene_ids, values, pert_flags and padding_mask must share one (batch, seq_len) "
            f"shape, got {gene_ids.shape}, {values.shape}, {pert_flags.shape}, "
            f"{padding_mask.shape}."
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("values contain NaN or inf; clean the expression matrix first.")
    ntoken = model.encoder.embedding.num_embeddings
    if gene_ids.size and (gene_ids.min() < 0 or gene_ids.max() >= ntoken):
        raise ValueError(f"gene_ids must lie in [0, {ntoken}); map unknown genes to <pad>.")
    allowed_flags = (0, 1, model.pert_pad_id)
    if not np.all(np.isin(pert_flags, allowed_flags)):
        raise ValueError(f"pert_flags must be in {allowed_flags} (pad id {model.pert_pad_id}).")

    was_training = model.training
    was_fastpath = torch.backends.mha.get_fastpath_enabled()
    captured = {}
    hook = model.transformer_encoder.register_forward_hook(
        lambda module, inputs, out: captured.setdefault("transformer_output", out)
    )
    model.eval()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The fast path converts padded batches to (prototype) nested tensors and warns.
            warnings.filterwarnings("ignore", message=".*nested tensors.*")
            output = model(
                torch.as_tensor(gene_ids, dtype=torch.long),
                torch.as_tensor(values, dtype=torch.float32),
                torch.as_tensor(pert_flags, dtype=torch.long),
                src_key_padding_mask=torch.as_tensor(padding_mask, dtype=torch.bool),
                MVC=hasattr(model, "mvc_decoder"),
            )
    finally:
        hook.remove()
        torch.backends.mha.set_fastpath_enabled(was_fastpath)
        model.train(was_training)
    transformer_output = captured["transformer_output"]
    result = {
        "mlm_output": output["mlm_output"].numpy().astype(np.float32),
        "cell_emb": output["cell_emb"].numpy().astype(np.float32),
        "transformer_output": transformer_output.numpy().astype(np.float32),
    }
    for key in ("mvc_output", "mlm_zero_probs", "mvc_zero_probs"):
        if key in output:
            result[key] = output[key].numpy().astype(np.float32)
    return result
