"""Learning without forgetting in site adaptation (engines/adapt.py, ``AdaptConfig.replay_distill``): the PBC
replay crops keep the starting model's posterior, not only its labels. Tiny network, synthetic crops."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="adaptation trains with torch (the [train] extra)")

from edge.modelmeta import ModelMetadata  # noqa: E402
from engines.adapt import METHODS, AdaptConfig, adapt_model, fine_tune, method_for, predict_probs  # noqa: E402
from engines.baseline import BaselineCNN  # noqa: E402
from engines.experiments.adapt_methods import MethodConfig  # noqa: E402

CLASSES = ["a", "b", "c", "d"]
META = ModelMetadata(name="tiny", version="0", classes=CLASSES, input_size=16, mean=[0.5, 0.5, 0.5],
                     std=[0.25, 0.25, 0.25], um_per_px=1.0, field_um=16.0)
HOME = np.array([[40, 40, 200], [40, 200, 40], [200, 40, 40], [180, 180, 180]])


def crops(colours: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops in one colour per class, with noise: a learnable 'microscope'."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, len(colours), n)
    images = colours[groups][:, None, None, :] + rng.normal(0, 25, (n, 16, 16, 3))
    return np.clip(images, 0, 255).astype(np.uint8), groups


def trained_home_model() -> BaselineCNN:
    """A tiny model that has learnt the home microscope (the role PBC plays for the shipped models)."""
    torch.manual_seed(0)
    model = BaselineCNN(len(CLASSES), stem=4, widths=(8, 8)).eval()
    images, labels = crops(HOME, 128, seed=1)
    home = AdaptConfig(batchnorm=False, l2sp=0.0, epochs=15, lr=3e-3)
    fine_tune(model, images, labels, META, home, log=lambda *_: None)
    return model


def drift_on_replay(cfg: AdaptConfig, labelled: int = 32) -> float:
    """Mean KL from the starting model's posterior to the site model's, on the home crops it replays."""
    start = trained_home_model()
    replay = crops(HOME, 64, seed=2)
    # A site whose colours mean other classes: fitting it, or its batch-norm statistics, pulls the home
    # crops' posteriors away.
    site_images, site_labels = crops(HOME[[1, 2, 3, 0]], 64, seed=3)
    adapted = adapt_model(copy.deepcopy(start), META, site_images[labelled:], site_images[:labelled],
                          site_labels[:labelled], cfg, replay, log=lambda *_: None)
    before = predict_probs(start, replay[0], META)
    after = predict_probs(adapted, replay[0], META)
    return float(np.mean(np.sum(before * (np.log(before + 1e-8) - np.log(after + 1e-8)), axis=1)))


def test_replay_distillation_keeps_the_starting_posterior_on_replay_crops_closer_than_replay_labels_alone() -> None:
    labels_only = AdaptConfig(batchnorm=False, layers="all", replay=True, epochs=20, l2sp=0.0, lr=3e-3)
    with_posterior = replace(labels_only, replay_distill=3.0)
    assert drift_on_replay(with_posterior) < 0.7 * drift_on_replay(labels_only)


def test_replay_distillation_without_replay_is_refused() -> None:
    with pytest.raises(ValueError, match="replay"):
        AdaptConfig(replay=False, replay_distill=1.0)


def test_cytoedge_adapt_fine_tunes_with_reviewed_cells_and_only_re_estimates_batch_norm_without() -> None:
    with_labels, without = method_for(50), method_for(0)
    assert with_labels == METHODS["bn+all+lwf"] and with_labels.layers == "all" and with_labels.replay_distill > 0
    assert without.batchnorm and without.layers == "none"


def test_without_site_labels_the_replay_posterior_undoes_what_batch_norm_re_estimation_does_to_the_home_crops() -> None:
    # (On tecom it undid the site's gain from re-estimation too: docs/robustness.md; experiment method only.)
    statistics_only = AdaptConfig(batchnorm=True, layers="none")
    with_posterior = MethodConfig(batchnorm=True, layers="all", replay=True, replay_distill=3.0, epochs=20, l2sp=0.0,
                                  lr=3e-3, zero_label_replay=True)
    assert drift_on_replay(with_posterior, labelled=0) < 0.5 * drift_on_replay(statistics_only, labelled=0)


def test_the_product_method_does_not_train_without_site_labels() -> None:
    # cytoedge adapt with frames only re-estimates batch norm (method_for(0)); its labelled method never
    # trains on the replay crops alone, which undid the site's gain on tecom.
    assert drift_on_replay(METHODS["bn+all+lwf"], labelled=0) == pytest.approx(
        drift_on_replay(AdaptConfig(batchnorm=True, layers="none"), labelled=0), abs=1e-6)
