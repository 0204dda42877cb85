"""LiT alignment pieces: the CLIP loss against a loop, training on separable features, heads, the feature cache."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.alignment import (
    AlignmentHeads,
    TrainSettings,
    cached_features,
    clip_loss,
    embed,
    make_optimizer,
    precision_at_k,
    train_epoch,
    zero_shot_accuracy,
)
from common.image_forward import LinearHead
from common.errors import ConfigError


def _loop_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Textbook symmetric InfoNCE, one pair at a time."""
    n, total = len(image), 0.0
    for i in range(n):
        row = [scale * float(image[i] @ text[j]) for j in range(n)]
        col = [scale * float(image[j] @ text[i]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_loss_equals_a_plain_loop(seed):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    scale = 3.0 + seed
    got = float(clip_loss(image, text, torch.tensor(scale, dtype=torch.float64)))
    assert got == pytest.approx(_loop_clip_loss(image, text, scale), rel=1e-10)


def test_clip_loss_is_low_for_matched_pairs_and_high_for_shuffled_ones():
    x = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert float(clip_loss(x, x, torch.tensor(50.0))) < 0.05
    assert float(clip_loss(x, x.roll(1, 0), torch.tensor(50.0))) > 5.0


def _separable(n_per_class: int, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray]:
    """Image and text features in unrelated random spaces whose only link is a shared class."""
    rng = np.random.default_rng(seed)
    img_centres, txt_centres = rng.normal(size=(classes, 32)), rng.normal(size=(classes, 16))
    labels = np.repeat(np.arange(classes), n_per_class)
    visual = img_centres[labels] + 0.3 * rng.normal(size=(len(labels), 32))
    text = txt_centres[labels] + 0.3 * rng.normal(size=(len(labels), 16))
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    return unit(visual), unit(text), labels, unit(txt_centres)


def test_training_on_separable_pairs_makes_text_find_the_right_images():
    visual, text, labels, class_texts = _separable(64)
    heads = AlignmentHeads(32, 16, seed=0)
    before = zero_shot_accuracy(embed(heads, visual=visual), embed(heads, text=class_texts), labels)
    settings = TrainSettings(batch_size=32, lr=1e-2, text_identity_weight=0.0)
    optimizer = make_optimizer(heads, settings)
    v, t = torch.from_numpy(visual), torch.from_numpy(text)
    losses = [train_epoch(heads, optimizer, v, t, settings, torch.Generator().manual_seed(e)) for e in range(30)]
    after = zero_shot_accuracy(embed(heads, visual=visual), embed(heads, text=class_texts), labels)
    assert before < 0.6  # random heads: about chance (0.25)
    assert after >= 0.95
    assert precision_at_k(embed(heads, visual=visual), labels) >= 0.95
    assert losses[-1] < losses[0]


def test_text_identity_pull_keeps_the_text_projection_near_identity():
    visual, text, _, _ = _separable(64)
    v, t = torch.from_numpy(visual), torch.from_numpy(text)
    drift = {}
    for weight in (0.0, 10.0):
        heads = AlignmentHeads(32, 16, seed=0)
        settings = TrainSettings(batch_size=32, lr=1e-2, text_identity_weight=weight)
        optimizer = make_optimizer(heads, settings)
        for e in range(10):
            train_epoch(heads, optimizer, v, t, settings, torch.Generator().manual_seed(e))
        drift[weight] = float(heads.text_identity_penalty().detach())
    assert drift[10.0] < 0.2 * drift[0.0]


def test_new_heads_leave_texts_unchanged_and_match_the_encoders_linear_head():
    heads = AlignmentHeads(12, 6, seed=3)
    text = F.normalize(torch.randn(5, 6), dim=-1)
    np.testing.assert_allclose(embed(heads, text=text.numpy()), text.numpy(), atol=1e-6)
    exported = heads.export()
    served = LinearHead(exported["image_head.weight"], exported["image_head.bias"])
    visual = torch.randn(5, 12) * 7  # the served head reads raw pooled features; training read unit vectors
    np.testing.assert_allclose(served(visual).numpy(), embed(heads, visual=F.normalize(visual, dim=-1).numpy()),
                               atol=1e-6)


def test_precision_at_k_equals_a_loop():
    rng = np.random.default_rng(0)
    v, labels = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    expected = []
    for i in range(30):
        others = sorted((j for j in range(30) if j != i), key=lambda j: -float(unit[i] @ unit[j]))[:5]
        expected.append(np.mean([labels[j] == labels[i] for j in others]))
    assert precision_at_k(v, labels, k=5) == pytest.approx(float(np.mean(expected)))


def test_features_are_computed_once_per_content(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    calls = []

    def compute():
        calls.append(1)
        return {"visual": np.full((3, 2), len(calls), np.float32)}

    first = cached_features(tmp_path, "enc@1", images, ["a", "b", "c"], compute)
    again = cached_features(tmp_path, "enc@1", images, ["a", "b", "c"], compute)
    other = cached_features(tmp_path, "enc@1", images, ["a", "b", "d"], compute)
    assert len(calls) == 2
    np.testing.assert_array_equal(first["visual"], again["visual"])
    assert other["visual"][0, 0] == 2.0


@pytest.mark.parametrize("kwargs, echoed", [({"batch_size": 1}, "1"), ({"lr": 0.0}, "0.0"),
                                            ({"text_identity_weight": -1.0}, "-1.0")])
def test_train_settings_echo_the_bad_value(kwargs, echoed):
    with pytest.raises(ConfigError, match=echoed):
        TrainSettings(**kwargs)
