"""Losses under jax.jit against NumPy written here, independently of the library."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scformer_jax import losses

RNG = np.random.default_rng(0)


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


@pytest.fixture
def masked_case():
    pred = RNG.normal(size=(3, 5)).astype(np.float32)
    target = RNG.uniform(0.1, 2.0, size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    return pred, target, mask


def test_masked_mse_matches_numpy(masked_case):
    pred, target, mask = masked_case
    expected = np.mean(
        [(p - t) ** 2 for p, t, m in zip(pred.ravel(), target.ravel(), mask.ravel()) if m]
    )
    got = jax.jit(losses.masked_mse_loss)(pred, target, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_masked_mse_ignores_values_at_padding(masked_case):
    pred, target, mask = masked_case
    pred2 = np.where(mask, pred, 1e6).astype(np.float32)
    target2 = np.where(mask, target, -7.0).astype(np.float32)
    np.testing.assert_allclose(
        losses.masked_mse_loss(pred, target, mask),
        losses.masked_mse_loss(pred2, target2, mask),
        rtol=1e-6,
    )


def test_masked_relative_error_matches_numpy(masked_case):
    pred, target, mask = masked_case
    sel = mask.ravel()
    expected = np.mean(
        np.abs(pred.ravel()[sel] - target.ravel()[sel]) / (target.ravel()[sel] + 1e-6)
    )
    got = jax.jit(losses.masked_relative_error)(pred, target, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("fn", [losses.masked_mse_loss, losses.masked_relative_error])
def test_empty_mask_gives_zero_and_finite_grad(fn, masked_case):
    pred, target, _ = masked_case
    empty = np.zeros_like(pred, bool)
    value, grad = jax.jit(jax.value_and_grad(fn))(pred, target, empty)
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad)) and np.all(grad == 0)


def test_relative_error_target_minus_epsilon_outside_mask_is_finite():
    pred = np.ones((1, 2), np.float32)
    target = np.array([[1.0, -1e-6]], np.float32)
    mask = np.array([[True, False]])
    value, grad = jax.value_and_grad(losses.masked_relative_error)(pred, target, mask)
    assert float(value) == pytest.approx(0.0, abs=1e-5)
    assert np.all(np.isfinite(grad))


def test_classification_loss_matches_numpy():
    logits = RNG.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 2])
    weights = np.array([1, 1, 1, 0], np.float32)
    logp = np_log_softmax(logits.astype(np.float64))
    expected = -np.mean([logp[i, labels[i]] for i in range(3)])
    got = jax.jit(lambda x, y, w: losses.classification_loss(x, y, weights=w))(
        logits, labels, weights
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(losses.classification_loss(logits, labels, weights=np.zeros(4))) == 0.0


def np_cce(a, b, temperature):
    sim = np_cos(a.astype(np.float64), b.astype(np.float64)) / temperature
    logp = np_log_softmax(sim)
    return -np.mean(np.diag(logp))


def test_cce_matches_numpy():
    a = RNG.normal(size=(6, 8)).astype(np.float32)
    b = (a + 0.3 * RNG.normal(size=(6, 8))).astype(np.float32)
    got = jax.jit(lambda x, y: losses.contrastive_cell_embedding_loss(x, y, temperature=0.5))(a, b)
    np.testing.assert_allclose(got, np_cce(a, b, 0.5), rtol=1e-5)


def test_cce_weight_zero_rows_are_neither_queries_nor_keys():
    a = RNG.normal(size=(5, 4)).astype(np.float32)
    b = RNG.normal(size=(5, 4)).astype(np.float32)
    w = np.array([1, 1, 1, 0, 0], np.float32)
    got = losses.contrastive_cell_embedding_loss(a, b, temperature=0.5, weights=w)
    np.testing.assert_allclose(got, np_cce(a[:3], b[:3], 0.5), rtol=1e-5)


def test_cce_gathered_across_devices_equals_global_batch():
    n_dev = jax.local_device_count()
    a = RNG.normal(size=(2 * n_dev, 4)).astype(np.float32)
    b = RNG.normal(size=(2 * n_dev, 4)).astype(np.float32)

    def per_device(x, y):
        num, den = losses.contrastive_cell_embedding_terms(x, y, temperature=0.5, axis_name="batch")
        return jax.lax.psum(num, "batch") / jax.lax.psum(den, "batch")

    got = jax.pmap(per_device, axis_name="batch")(a.reshape(n_dev, 2, 4), b.reshape(n_dev, 2, 4))
    np.testing.assert_allclose(got, np.full(n_dev, np_cce(a, b, 0.5)), rtol=1e-5)


def np_ecs(emb, threshold):
    cos = np_cos(emb.astype(np.float64), emb.astype(np.float64))
    np.fill_diagonal(cos, 0.0)
    cos = np.maximum(cos, 0.0)
    return np.mean(1.0 - (cos - threshold) ** 2)


def test_ecs_matches_numpy():
    emb = RNG.normal(size=(7, 5)).astype(np.float32)
    emb[1] = emb[0] * 2  # one highly similar pair
    got = jax.jit(lambda e: losses.elastic_cell_similarity_loss(e, ecs_threshold=0.85))(emb)
    np.testing.assert_allclose(got, np_ecs(emb, 0.85), rtol=1e-5)


def test_ecs_argument_is_named_ecs_threshold():
    emb = RNG.normal(size=(3, 4)).astype(np.float32)
    with pytest.raises(TypeError):
        losses.elastic_cell_similarity_loss(emb, esc_threshold=0.5)
    a = losses.elastic_cell_similarity_loss(emb, ecs_threshold=0.1)
    b = losses.elastic_cell_similarity_loss(emb, ecs_threshold=0.9)
    assert float(a) != float(b)


def test_ecs_padding_rows_left_out():
    emb = RNG.normal(size=(5, 4)).astype(np.float32)
    w = np.array([1, 1, 1, 1, 0], np.float32)
    got = losses.elastic_cell_similarity_loss(emb, ecs_threshold=0.3, weights=w)
    np.testing.assert_allclose(got, np_ecs(emb[:4], 0.3), rtol=1e-5)


def test_gradients_finite_for_all_losses():
    emb = RNG.normal(size=(4, 3)).astype(np.float32)
    emb[2] = 0.0  # a zero embedding must not give NaN gradients

    def total(e):
        return (
            losses.contrastive_cell_embedding_loss(e, e + 0.1)
            + losses.elastic_cell_similarity_loss(e)
            + losses.classification_loss(e, jnp.array([0, 1, 2, 0]))
        )

    grad = jax.grad(total)(emb)
    assert np.all(np.isfinite(grad))


def test_combine_losses_uses_named_weights():
    terms = {"mse": jnp.float32(2.0), "cce": jnp.float32(3.0)}
    got = losses.combine_losses(terms, {"mse": 1.0, "cce": 10.0, "ecs": 10.0})
    assert float(got) == pytest.approx(32.0)
    with pytest.raises(KeyError, match="cce"):
        losses.combine_losses(terms, {"mse": 1.0})
