"""Import PyTorch scGPT / scFormer checkpoints into scformer-jax.

A PyTorch checkpoint folder (``TORCH_DIR``) holds, as scGPT writes it:

* ``best_model.pt``: the model's ``state_dict`` (``torch.save(model.state_dict(), ...)``);
* ``args.json``: the run's settings (scGPT's names: ``embsize``, ``nheads``, ``d_hid``,
  ``nlayers``, ``n_layers_cls``, ``dropout``, ``pad_token``, ``pad_value``, and optionally
  ``pert_pad_id``, ``cell_emb_style``, ``mvc_decoder_style``, ``pre_norm``, ...);
* ``vocab.json``: token name -> row of the gene embedding (genes and ``<pad>``, ``<cls>``,
  ``<eoc>``).

Three ways in:

* ``python -m scformer_jax.convert TORCH_DIR OUT_DIR`` (or :func:`convert_checkpoint`) writes
  a folder that ``eval.py --workdir OUT_DIR``, :func:`scformer_jax.predict.load_predictor`
  and ``train.py`` (``train.load_model: OUT_DIR``) accept: ``config.yaml``, an orbax
  checkpoint under ``checkpoints/``, the checkpoint's ``vocab.json`` and
  ``conversion_report.json``.
* ``train.load_model: TORCH_DIR`` (or ``OUT_DIR``) with ``train.load_param_prefixes``
  fine-tunes from it (:func:`load_pretrained_params`), as scGPT's perturbation tutorial does
  with ``["encoder", "value_encoder", "transformer_encoder"]``.
* :func:`convert_params` returns ``(model_config, params, report)`` in memory (notebooks).

Every mapping returns a :class:`ConversionReport`: what was loaded, skipped by prefix,
missing from the checkpoint (left at initialisation), unexpected (no place in our model),
ignored (BatchNorm's ``num_batches_tracked``) and shape-mismatched (reported and left at
initialisation, never a crash).

Parameter mapping (PyTorch ``nn.Linear`` weight is ``(out, in)``; Flax ``Dense`` kernel is
``(in, out)``, so kernels are transposed; LayerNorm weight/bias are scale/bias): the gene
embedding and its norm (``encoder.embedding``, ``encoder.enc_norm``), the value encoder, the
perturbation-flag embedding, every transformer layer in both layouts found in these
checkpoints (``self_attn.in_proj_weight/bias`` of ``nn.MultiheadAttention``, and the fused
``self_attn.Wqkv`` of scGPT's flash-attention layer; both store the rows as q, k, v with the
heads contiguous, as our ``in_proj`` does), the feed-forward and norms, the expression
decoder in its three forms (scFormer's ``decoder`` Linear; scGPT's MLP ``decoder.fc.{0,2,4}``
and ``decoder.zero_logit.*``; scGPT's affine ``decoder.coeff_decoder.*`` and
``decoder.bias_decoder.*``), the BatchNorm ``bn`` (weight and bias as parameters, running
mean and variance as the running statistics under ``batch_stats``), the classification
decoder (``cls_decoder._decoder.{3i}`` Linear and ``{3i+2}`` LayerNorm) and the MVC decoder
(with ``W_zero_logit``).

Model version: the state dict's keys decide the decoder (linear / mlp / affine), the
BatchNorm and the zero-probability heads (:func:`~scformer_jax.convert.keys.
detect_architecture`); ``args.json`` gives what the tensors do not show (``pre_norm``,
``decoder_activation``, ``decoder_adaptive_bias``). The report's notes name the version.

Gene vocabulary: with a dataset, the gene embedding is re-ordered into the dataset's token
order by gene name ("match 4399/5060 genes in vocabulary"). A dataset gene that is not in
the checkpoint's vocabulary keeps its own token, and its embedding row starts at zero, the
vector our model embeds ``<pad>`` to. scGPT instead gives such genes the ``<pad>`` id; with a
token of their own their perturbation flag and expression still reach the model as a
distinct gene, and fine-tuning can learn an embedding for them (the ``<pad>`` row never
trains).

Converted configs reproduce the original: with ``cell_emb_style: cls`` they set
``prepend_cls_token: false`` (the original input has no ``<cls>`` token; the cell embedding
is the first gene's output). One deliberate difference remains: our ``avg-pool`` ignores
padding positions while the original averaged over them too, so that cell embedding equals
the original's on unpadded input only (``w-pool`` agrees when ``pad_value`` is 0).

``torch`` is an optional extra imported only inside :func:`read_state_dict`.

Modules: :mod:`.report` (the report and :class:`ConversionError`), :mod:`.keys` (PyTorch
keys -> our parameter paths and layouts), :mod:`.reading` (checkpoint folders -> tensors and
the model config), :mod:`.loading` (tensors -> our parameter tree), :mod:`.writing` (the
converted folder and the command line). Matching gene vocabularies is
:mod:`scformer_jax.vocab`'s.
"""

from scformer_jax.convert.keys import torch_key_to_path
from scformer_jax.convert.loading import (
    SCGPT_PREFIXES,
    convert_params,
    load_pretrained,
    load_pretrained_params,
)
from scformer_jax.convert.reading import (
    ARGS_FILE,
    CHECKPOINT_FILE,
    TORCH_INSTALL_HINT,
    model_config_from_args,
    read_source,
    read_state_dict,
)
from scformer_jax.convert.report import ConversionError, ConversionReport, ShapeMismatch
from scformer_jax.convert.writing import REPORT_FILE, convert_checkpoint, main, parse_args

__all__ = [
    "ARGS_FILE",
    "CHECKPOINT_FILE",
    "REPORT_FILE",
    "SCGPT_PREFIXES",
    "TORCH_INSTALL_HINT",
    "ConversionError",
    "ConversionReport",
    "ShapeMismatch",
    "convert_checkpoint",
    "convert_params",
    "load_pretrained",
    "load_pretrained_params",
    "main",
    "model_config_from_args",
    "parse_args",
    "read_source",
    "read_state_dict",
    "torch_key_to_path",
]
