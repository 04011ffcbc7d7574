"""The scFormer perturbation model (``TransformerGenerator``) in Flax linen.

Pure functional: ``model.init`` returns a plain parameter pytree and ``model.apply`` is a
function of (params, batch arrays, rngs). Layer names follow the PyTorch original where a
name exists there, so that PyTorch checkpoints map onto these parameters one to one
(``scformer_jax.convert``).

Differences from the original, all deliberate:
* ``cell_emb_style='cls'`` prepends a real ``<cls>`` token (the original took the output of
  the first gene, since the perturbation input has no ``<cls>`` token);
  ``prepend_cls_token=False`` restores the original behaviour.
* ``avg-pool`` and ``w-pool`` ignore padding positions (the original averaged over them).
* Dense layers start from Flax's initialisers unless ``config.init == "torch"``
  (:func:`torch_style_params`: the original's initial distributions).
* ``input_batchnorm`` computes its training statistics over real tokens only (scGPT's
  BatchNorm1d also counted padding positions).

scGPT's perturbation models are options of the same module: the MLP and affine expression
decoders (``expr_decoder``), the BatchNorm after the embedding sum (``input_batchnorm``),
zero probabilities (``explicit_zero_prob``) and pre-norm layers (``pre_norm``). The
BatchNorm's running statistics are Flax's ``batch_stats`` collection; outside the model they
travel in the weights tree under the top-level key ``batch_stats`` (:data:`BATCH_STATS`, a
name no module uses), so checkpoints, conversion and prediction carry them with the
parameters; :func:`model_variables` splits them out for ``apply`` and the train step writes
their updates back (the optimiser's update of them is overwritten).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from scformer_jax import attention as attn_lib
from scformer_jax.batch import FLAG_CHANNEL, VALUE_CHANNEL, check_inputs
from scformer_jax.config import ModelConfig

# PyTorch's LayerNorm epsilon (Flax's default is 1e-6); kept for checkpoint parity.
LN_EPS = 1e-5
# scGPT's BatchNorm1d(d_model, eps=6.1e-5) with PyTorch's default momentum.
BN_EPS = 6.1e-5
BN_MOMENTUM = 0.1
# The Flax collection of the BatchNorm's running statistics, and their key in the weights tree.
BATCH_STATS = "batch_stats"
# scGPT's decoder activations (torch.nn classes with default arguments).
ACTIVATIONS = {
    "ReLU": nn.relu,
    "LeakyReLU": nn.leaky_relu,
    "Softplus": nn.softplus,
    "Sigmoid": nn.sigmoid,
    "Tanh": jnp.tanh,
    "ELU": nn.elu,
    "GELU": functools.partial(nn.gelu, approximate=False),
    "SiLU": nn.silu,
}


def _uniform(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def _torch_linear_bias_init(fan_in: int):
    return _uniform(1.0 / max(fan_in, 1) ** 0.5)


class PaddedEmbedding(nn.Module):
    """An embedding whose padding id maps to zeros and receives no gradient (PyTorch's
    ``padding_idx``): the looked-up row is multiplied by 0, so its table row gets 0 gradient."""

    num_embeddings: int
    features: int
    padding_idx: int
    init_scale: float | None = None  # uniform(-s, s); None: N(0, 1) as nn.Embedding

    @nn.compact
    def __call__(self, ids):
        init = (
            _uniform(self.init_scale)
            if self.init_scale is not None
            else nn.initializers.normal(1.0)
        )

        def table_init(key, shape, dtype=jnp.float32):
            return init(key, shape, dtype).at[self.padding_idx].set(0.0)

        table = self.param("embedding", table_init, (self.num_embeddings, self.features))
        out = jnp.take(table, ids, axis=0)
        return out * (ids != self.padding_idx)[..., None].astype(out.dtype)


class Dropout(nn.Module):
    """Inverted dropout (as ``nn.Dropout``: zero with probability ``rate``, scale the rest by
    ``1 / (1 - rate)``, identity when ``deterministic``) with its mask drawn from the
    counter-based hash of :func:`scformer_jax.attention.dropout_keep_mask`, seeded from the
    ``"dropout"`` PRNG stream. ``jax.random.bernoulli`` (threefry) costs about 10 ns per
    element on a CPU, which at sequence 1536 was ~7% of a train step; the hash is ~30x cheaper.
    """

    rate: float

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        seeds = attn_lib.dropout_seeds(self.make_rng("dropout"))
        # One hash row per position of the leading axes, one column per feature.
        rows = jnp.arange(math.prod(x.shape[:-1]), dtype=jnp.uint32).reshape(x.shape[:-1])
        keep = attn_lib.dropout_keep_mask(seeds, rows, jnp.arange(x.shape[-1]), self.rate)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), 0.0).astype(x.dtype)


class ValueEncoder(nn.Module):
    """Expression value -> vector: clip at max_value, Dense(1->d), ReLU, Dense(d->d), LN,
    dropout."""

    d_model: int
    dropout: float
    max_value: float

    @nn.compact
    def __call__(self, values, *, deterministic: bool):
        x = jnp.minimum(values, self.max_value)[..., None]
        x = nn.relu(nn.Dense(self.d_model, name="linear1", bias_init=_torch_linear_bias_init(1))(x))
        x = nn.Dense(self.d_model, name="linear2", bias_init=_torch_linear_bias_init(self.d_model))(
            x
        )
        x = nn.LayerNorm(epsilon=LN_EPS, name="norm")(x)
        return Dropout(self.dropout)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    """Multi-head self-attention with PyTorch's fused in-projection layout (q, k, v rows)."""

    d_model: int
    nhead: int
    dropout: float
    implementation: str
    block_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_padding_mask, *, deterministic: bool):
        batch, length, _ = x.shape
        head_dim = self.d_model // self.nhead
        qkv = nn.Dense(
            3 * self.d_model,
            name="in_proj",
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.zeros,
        )(x)
        # (batch, length, 3 * d) -> three (batch, length, heads, head_dim)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3, self.nhead, head_dim), 3, axis=2)
        q, k, v = (t[:, :, 0] for t in (q, k, v))
        rate = 0.0 if deterministic else self.dropout
        dropout_rng = self.make_rng("dropout") if rate > 0.0 else None
        out = attn_lib.attention(
            q,
            k,
            v,
            key_padding_mask,
            implementation=self.implementation,
            block_size=self.block_size,
            dropout_rate=rate,
            dropout_rng=dropout_rng,
        )
        out = out.reshape(batch, length, self.d_model)
        return nn.Dense(
            self.d_model, name="out_proj", dtype=self.dtype, bias_init=nn.initializers.zeros
        )(out)


class EncoderLayer(nn.Module):
    """Transformer layer (PyTorch's ``TransformerEncoderLayer``, ReLU): post-LayerNorm, or
    scGPT's pre-norm scheme with ``config.pre_norm``."""

    config: ModelConfig
    implementation: str

    @nn.compact
    def __call__(self, x, key_padding_mask, deterministic: bool):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        drop = functools.partial(Dropout(c.dropout), deterministic=deterministic)
        attention = SelfAttention(
            c.embsize,
            c.nhead,
            c.attn_dropout_rate,
            self.implementation,
            c.attention_block_size_for(deterministic),
            dtype,
            name="self_attn",
        )
        norm1 = nn.LayerNorm(epsilon=LN_EPS, name="norm1")
        norm2 = nn.LayerNorm(epsilon=LN_EPS, name="norm2")

        def feed_forward(h):
            h = nn.Dense(
                c.d_hid, name="linear1", dtype=dtype, bias_init=_torch_linear_bias_init(c.embsize)
            )(h)
            return nn.Dense(
                c.embsize, name="linear2", dtype=dtype, bias_init=_torch_linear_bias_init(c.d_hid)
            )(drop(nn.relu(h)))

        if c.pre_norm:
            # scGPT's "pre" scheme replaces x by its normalised value before each residual.
            x = norm1(x)
            x = x + drop(attention(x, key_padding_mask, deterministic=deterministic))
            x = norm2(x)
            return (x + drop(feed_forward(x))).astype(jnp.float32)
        x = norm1(x + drop(attention(x, key_padding_mask, deterministic=deterministic)))
        return norm2(x + drop(feed_forward(x))).astype(jnp.float32)


class InputBatchNorm(nn.Module):
    """BatchNorm over the features of (batch, length, d) tokens: PyTorch's BatchNorm1d on
    (batch, d, length), statistics over the real tokens (``keep``). Training normalises by
    the batch's mean and biased variance and, when ``batch_stats`` is mutable, moves the
    running mean and unbiased variance by ``momentum``; deterministic passes use the
    running statistics."""

    eps: float = BN_EPS
    momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x, keep, *, deterministic: bool):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable(BATCH_STATS, "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable(BATCH_STATS, "var", jnp.ones, (features,), jnp.float32)
        if deterministic:
            mean, var = running_mean.value, running_var.value
        else:
            weight = keep.astype(x.dtype)[..., None]
            n = jnp.maximum(weight.sum(), 1.0)
            mean = (x * weight).sum((0, 1)) / n
            var = (jnp.square(x - mean) * weight).sum((0, 1)) / n
            if self.is_mutable_collection(BATCH_STATS) and not self.is_initializing():
                m = self.momentum
                unbiased = jax.lax.stop_gradient(var * n / jnp.maximum(n - 1.0, 1.0))
                running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
                running_var.value = (1 - m) * running_var.value + m * unbiased
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class ExprMLP(nn.Module):
    """scGPT's ``ExprDecoder``: Dense(d), LeakyReLU, Dense(d), LeakyReLU, Dense(1) per token
    (``fc_0/2/4``, PyTorch's ``fc.0/2/4``) and, with ``explicit_zero_prob``, a second such
    MLP (``zero_logit_0/2/4``) whose sigmoid is the zero probability.

    Returns ((batch, length) values, (batch, length) zero probabilities or None).
    """

    d_model: int
    explicit_zero_prob: bool = False

    @nn.compact
    def __call__(self, x):
        def mlp(prefix):
            h = x
            for i in (0, 2):
                h = nn.leaky_relu(nn.Dense(self.d_model, name=f"{prefix}_{i}")(h))
            return nn.Dense(1, name=f"{prefix}_4")(h)[..., 0]

        pred = mlp("fc")
        return pred, (nn.sigmoid(mlp("zero_logit")) if self.explicit_zero_prob else None)


class AffineExprDecoder(nn.Module):
    """scGPT's ``AffineExprDecoder``: two :class:`ExprMLP` give a coefficient and a bias per
    token; the prediction is ``coefficient * value + bias`` on the token's control value.
    ``activation`` applies to both; ``adaptive_bias`` scales the bias by the cell's mean
    non-zero value over its real tokens (1 for a cell without one; scGPT divides by zero).
    Zero probabilities come from the coefficient decoder; the bias decoder's zero head
    exists (scGPT builds it) but is unused."""

    d_model: int
    explicit_zero_prob: bool = False
    activation: str | None = None
    adaptive_bias: bool = False

    @nn.compact
    def __call__(self, x, values, keep):
        coeff, zero_probs = ExprMLP(self.d_model, self.explicit_zero_prob, name="coeff_decoder")(x)
        # Built at initialisation only, so that checkpoints' unused tensors have a place.
        bias, _ = ExprMLP(
            self.d_model, self.explicit_zero_prob and self.is_initializing(), name="bias_decoder"
        )(x)
        if self.activation is not None:
            coeff, bias = ACTIVATIONS[self.activation](coeff), ACTIVATIONS[self.activation](bias)
        if self.adaptive_bias:
            real = keep.astype(values.dtype)
            nonzero = jnp.sum((values != 0) * real, axis=1, keepdims=True)
            bias = bias * jnp.sum(values * real, axis=1, keepdims=True) / jnp.maximum(nonzero, 1)
        return coeff * values + bias, zero_probs


class ClsDecoder(nn.Module):
    """[Dense, ReLU, LayerNorm] x (nlayers - 1), then Dense to n_cls."""

    d_model: int
    n_cls: int
    nlayers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.nlayers - 1):
            x = nn.LayerNorm(epsilon=LN_EPS, name=f"norm_{i}")(
                nn.relu(nn.Dense(self.d_model, name=f"dense_{i}")(x))
            )
        return nn.Dense(self.n_cls, name="out_layer")(x)


class MVCDecoder(nn.Module):
    """Masked value prediction from the cell embedding, queried by gene embeddings."""

    d_model: int
    style: str
    explicit_zero_prob: bool = False

    @nn.compact
    def __call__(self, cell_emb, gene_embs):
        """cell_emb (batch, d), gene_embs (batch, length, d) -> ((batch, length) values,
        (batch, length) zero probabilities or None).

        Zero probabilities (``W_zero_logit``) exist for the inner-product styles only, as in
        scGPT (whose query styles raise with ``explicit_zero_prob``)."""
        if self.style.endswith("detach"):
            gene_embs = jax.lax.stop_gradient(gene_embs)
        if self.style in ("inner product", "inner product, detach"):
            query = nn.sigmoid(nn.Dense(self.d_model, name="gene2query")(gene_embs))
            projected = nn.Dense(self.d_model, use_bias=False, name="W")(query)
            pred = jnp.einsum("bld,bd->bl", projected, cell_emb)
            if not self.explicit_zero_prob:
                return pred, None
            zero_logits = jnp.einsum(
                "bld,bd->bl", nn.Dense(self.d_model, name="W_zero_logit")(query), cell_emb
            )
            return pred, nn.sigmoid(zero_logits)
        prelu = nn.PReLU(negative_slope_init=0.25, name="hidden_activation")
        if self.style == "concat query":
            query = nn.sigmoid(nn.Dense(64, name="gene2query")(gene_embs))
            cell = jnp.broadcast_to(cell_emb[:, None, :], query.shape[:2] + cell_emb.shape[-1:])
            h = prelu(nn.Dense(64, name="fc1")(jnp.concatenate([cell, query], axis=-1)))
        else:  # "sum query"
            query = nn.sigmoid(nn.Dense(self.d_model, name="gene2query")(gene_embs))
            h = prelu(nn.Dense(64, name="fc1")(cell_emb[:, None, :] + query))
        return nn.Dense(1, name="fc2")(h)[..., 0], None


class TransformerGenerator(nn.Module):
    """scFormer's perturbation model.

    Call with the two-channel batch arrays (see :mod:`scformer_jax.batch`). Returns a dict:
    ``mlm_output`` (batch, seq_len) predicted expression of every input token,
    ``cell_emb`` (batch, embsize), and when asked ``cls_output`` (batch, n_cls) and
    ``mvc_output`` (batch, seq_len); with ``explicit_zero_prob`` also ``mlm_zero_probs``
    (and ``mvc_zero_probs`` for the inner-product MVC styles), (batch, seq_len).

    Variables: ``params``, and ``batch_stats`` with ``input_batchnorm`` (pass it mutable in
    training to update the running statistics). RNG streams: ``dropout`` in training,
    ``sample`` for ``sample_zero_prob`` in deterministic passes.
    """

    config: ModelConfig

    def _layers(self, length: int):
        c = self.config
        impl = attn_lib.resolve_implementation(
            c.attention, length, attention_dropout=c.attn_dropout_rate
        )
        layer_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if c.remat else EncoderLayer
        return [layer_cls(c, impl, name=f"layers_{i}") for i in range(c.nlayers)]

    @nn.compact
    def __call__(
        self,
        gene_ids,
        inputs,
        padding_mask,
        *,
        deterministic: bool = True,
        compute_cls: bool = False,
        compute_mvc: bool = False,
    ):
        """Args:
        gene_ids: int (batch, seq_len) token ids.
        inputs: float (batch, seq_len, 2): control expression and perturbation flag.
        padding_mask: bool (batch, seq_len), True at padding.
        deterministic: no dropout when True (evaluation).
        compute_cls / compute_mvc: also run the classification / MVC decoders.
        """
        check_inputs(gene_ids, inputs, padding_mask)
        c = self.config
        if c.ntoken <= max(c.pad_token_id, c.cls_token_id):
            raise ValueError(
                f"model.ntoken ({c.ntoken}) must exceed the special token ids (pad "
                f"{c.pad_token_id}, cls {c.cls_token_id}); set it from the dataset's vocabulary."
            )
        values = inputs[..., VALUE_CHANNEL].astype(jnp.float32)
        flags = inputs[..., FLAG_CHANNEL].astype(jnp.int32)
        if c.uses_cls_token:
            batch = gene_ids.shape[0]
            gene_ids = jnp.concatenate(
                [jnp.full((batch, 1), c.cls_token_id, gene_ids.dtype), gene_ids], axis=1
            )
            values = jnp.concatenate([jnp.full((batch, 1), c.pad_value, values.dtype), values], 1)
            flags = jnp.concatenate([jnp.full((batch, 1), c.pert_pad_id, flags.dtype), flags], 1)
            padding_mask = jnp.concatenate([jnp.zeros((batch, 1), bool), padding_mask], 1)

        gene_embs = PaddedEmbedding(
            c.ntoken, c.embsize, c.pad_token_id, init_scale=0.1, name="encoder"
        )(gene_ids)
        gene_embs = nn.LayerNorm(epsilon=LN_EPS, name="encoder_norm")(gene_embs)
        values_emb = ValueEncoder(c.embsize, c.dropout, c.max_value, name="value_encoder")(
            values, deterministic=deterministic
        )
        x = (
            gene_embs
            + values_emb
            + PaddedEmbedding(3, c.embsize, c.pert_pad_id, name="pert_encoder")(flags)
        )
        if c.input_batchnorm:
            x = InputBatchNorm(name="bn")(x, ~padding_mask, deterministic=deterministic)
        for layer in self._layers(x.shape[1]):
            x = layer(x, padding_mask, deterministic)

        cell_emb = self._cell_embedding(x, values, padding_mask)
        if c.uses_cls_token:
            x, gene_embs, values = x[:, 1:], gene_embs[:, 1:], values[:, 1:]
            padding_mask = padding_mask[:, 1:]
        mlm_output, zero_probs = self._decode(x, values, ~padding_mask)
        mlm_output = self._sampled(mlm_output, zero_probs, deterministic)
        if c.output_baseline == "control_input":
            mlm_output = mlm_output + values
        elif c.output_baseline == "gene_mean":
            # Initialised to zeros; training sets the measured genes' rows to the control mean.
            baseline = self.param("gene_baseline", nn.initializers.zeros, (c.ntoken,))
            ids = gene_ids[:, 1:] if c.uses_cls_token else gene_ids
            mlm_output = mlm_output + jnp.take(baseline, ids)
        out = {"mlm_output": mlm_output, "cell_emb": cell_emb}
        if zero_probs is not None:
            out["mlm_zero_probs"] = zero_probs
        if compute_cls:
            out["cls_output"] = ClsDecoder(c.embsize, c.n_cls, c.nlayers_cls, name="cls_decoder")(
                cell_emb
            )
        if compute_mvc:
            mvc_output, mvc_zero_probs = MVCDecoder(
                c.embsize, c.mvc_decoder_style, c.explicit_zero_prob, name="mvc_decoder"
            )(cell_emb, gene_embs)
            out["mvc_output"] = self._sampled(mvc_output, mvc_zero_probs, deterministic)
            if mvc_zero_probs is not None:
                out["mvc_zero_probs"] = mvc_zero_probs
        return out

    def _decode(self, x, values, keep):
        """Per-token expression and zero probabilities (None without explicit_zero_prob)."""
        c = self.config
        if c.expr_decoder == "mlp":
            return ExprMLP(c.embsize, c.explicit_zero_prob, name="decoder")(x)
        if c.expr_decoder == "affine":
            return AffineExprDecoder(
                c.embsize,
                c.explicit_zero_prob,
                c.decoder_activation,
                c.decoder_adaptive_bias,
                name="decoder",
            )(x, values, keep)
        decoder = nn.Dense(
            1, kernel_init=_uniform(0.1), bias_init=nn.initializers.zeros, name="decoder"
        )
        return decoder(x)[..., 0], None

    def _sampled(self, pred, zero_probs, deterministic):
        """scGPT's eval-time draw (``sample_zero_prob``): the value where Bernoulli(zero_probs)
        gives 1, else 0 (scGPT trains ``zero_probs`` as the chance of a non-zero value)."""
        if not (self.config.sample_zero_prob and deterministic) or zero_probs is None:
            return pred
        return pred * jax.random.bernoulli(self.make_rng("sample"), zero_probs).astype(pred.dtype)

    def _cell_embedding(self, x, values, padding_mask):
        style = self.config.cell_emb_style
        if style == "cls":
            return x[:, 0]
        keep = (~padding_mask).astype(x.dtype)[..., None]
        if style == "avg-pool":
            return (x * keep).sum(1) / jnp.maximum(keep.sum(1), 1.0)
        # w-pool: expression-weighted sum, L2-normalised (as the original).
        pooled = (x * (values[..., None] * keep)).sum(1)
        sq = jnp.sum(pooled * pooled, axis=-1, keepdims=True)
        return pooled * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def init_params(config: ModelConfig, rng, *, seq_len: int = 8):
    """Initial parameters (a plain pytree), with every decoder present; with
    ``input_batchnorm`` the tree also holds the initial running statistics under
    ``batch_stats`` (see :func:`model_variables`).

    ``config.init`` picks the initialisers: ``"flax"`` the modules' own (mostly Flax's
    defaults), ``"torch"`` the distributions the PyTorch original starts from
    (:func:`torch_style_params`).
    """
    model = TransformerGenerator(config)
    gene_ids = jnp.full(
        (1, seq_len),
        config.pad_token_id + 1
        if config.pad_token_id + 1 != config.cls_token_id
        else config.cls_token_id + 1,
        jnp.int32,
    )
    gene_ids = gene_ids % config.ntoken
    inputs = jnp.zeros((1, seq_len, 2), jnp.float32)
    padding_mask = jnp.zeros((1, seq_len), bool)
    variables = model.init(
        {"params": rng, "dropout": rng, "sample": rng},
        gene_ids,
        inputs,
        padding_mask,
        deterministic=True,
        compute_cls=True,
        compute_mvc=True,
    )
    params = variables["params"]
    if config.init == "torch":
        params = torch_style_params(params, jax.random.fold_in(rng, 1))
    if BATCH_STATS in variables:
        params = {**params, BATCH_STATS: variables[BATCH_STATS]}
    return params


def model_variables(params: Any) -> dict[str, Any]:
    """The Flax variables of a weights tree for ``TransformerGenerator.apply``: ``params``,
    and the running statistics (the tree's ``batch_stats`` entry) as their own collection."""
    if BATCH_STATS not in params:
        return {"params": params}
    rest = {k: v for k, v in params.items() if k != BATCH_STATS}
    return {"params": rest, BATCH_STATS: params[BATCH_STATS]}


# Dense parameters whose PyTorch init is not nn.Linear's default, kept as the module
# initialises them (which already matches the original): the fused attention in-projection
# (MultiheadAttention: xavier-uniform weight, zero bias), the attention out-projection's bias
# (zero) and the expression decoder (TransformerGenerator.init_weights: U(-0.1, 0.1) weight,
# zero bias). "layers" stands for every layers_i.
_TORCH_KEEP = {
    ("layers", "self_attn", "in_proj", "kernel"),
    ("layers", "self_attn", "in_proj", "bias"),
    ("layers", "self_attn", "out_proj", "bias"),
    ("decoder", "kernel"),
    ("decoder", "bias"),
}


def torch_style_params(params: Any, rng) -> Any:
    """``params`` re-drawn as the PyTorch original initialises its modules.

    * Dense kernels and biases: nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (its
      kaiming-uniform weight with a=sqrt(5) has exactly that bound), except the layers of
      ``_TORCH_KEEP``, whose module initialisers already equal the original's.
    * The gene embedding (``encoder``): uniform(-0.1, 0.1) over every row, the pad row
      included (``init_weights`` overwrites the zero row that ``padding_idx`` made; the pad
      row is never looked up here, see :class:`PaddedEmbedding`).
    * The perturbation-flag embedding: N(0, 1) with its pad row zero, as the module already
      starts. LayerNorm, PReLU and ``gene_baseline``: unchanged.
    * Every transformer layer ``layers_i`` is a copy of ``layers_0``: nn.TransformerEncoder
      deep-copies the one layer it is given, so the original's layers start equal (dropout
      makes them diverge).

    Args:
      params: a parameter pytree of :class:`TransformerGenerator`.
      rng: the key of the draws.

    Returns:
      A new pytree of the same structure, shapes and dtypes.
    """
    flat = traverse_util.flatten_dict(params)
    out = dict(flat)
    for i, path in enumerate(sorted(flat)):
        value = flat[path]
        key = jax.random.fold_in(rng, i)
        if path == ("encoder", "embedding"):
            out[path] = _uniform(0.1)(key, value.shape, value.dtype)
            continue
        if path[-1] not in ("kernel", "bias") or (path[:-1] + ("kernel",)) not in flat:
            continue  # not a Dense layer (LayerNorm's bias sits beside a scale)
        layer_agnostic = ("layers",) + path[1:] if path[0].startswith("layers_") else path
        if layer_agnostic in _TORCH_KEEP:
            continue
        fan_in = flat[path[:-1] + ("kernel",)].shape[0]
        out[path] = _uniform(1.0 / math.sqrt(fan_in))(key, value.shape, value.dtype)
    layers = sorted({p[0] for p in out if p[0].startswith("layers_")})
    for name in layers:
        for path in [p for p in out if p[0] == name]:
            out[path] = out[("layers_0",) + path[1:]]
    return traverse_util.unflatten_dict(out)
