"""Unsupervised site adaptation (engines/experiments/selftrain.py, colourmatch.py, adapt_methods.py): behaviour on tiny
synthetic crops and a tiny network, no shared data needed."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="adaptation trains with torch (the [train] extra)")

from edge.modelmeta import ModelMetadata  # noqa: E402
from engines.adapt import predict_probs, runs_at  # noqa: E402
from engines.baseline import BaselineCNN  # noqa: E402
from engines.experiments import colourmatch, selftrain  # noqa: E402
from engines.experiments.adapt_methods import METHODS, adapt_with_method  # noqa: E402
from engines.experiments.adapt_methods import MethodConfig as AdaptConfig  # noqa: E402

CLASSES = ["a", "b", "c", "d"]
META = ModelMetadata(name="tiny", version="0", classes=CLASSES, input_size=16, mean=[0.5, 0.5, 0.5],
                     std=[0.25, 0.25, 0.25], um_per_px=1.0, field_um=16.0)


def tiny_model(seed: int = 0) -> BaselineCNN:
    torch.manual_seed(seed)
    return BaselineCNN(len(CLASSES), stem=4, widths=(8, 8)).eval()


def site_crops(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Crops in four colour groups (a learnable structure), with noise."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 4, n)
    colours = np.array([[40, 40, 200], [40, 200, 40], [200, 40, 40], [180, 180, 180]])
    crops = colours[groups][:, None, None, :] + rng.normal(0, 25, (n, 16, 16, 3))
    return np.clip(crops, 0, 255).astype(np.uint8), groups


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def marginal_entropy(model: torch.nn.Module, crops: np.ndarray) -> float:
    mean = torch.from_numpy(predict_probs(model, crops, META)).mean(0)
    return float(-(mean * torch.log(mean + 1e-8)).sum())


def test_information_maximisation_objective_prefers_confident_diverse_predictions_to_a_collapse() -> None:
    confident = torch.eye(4) * 20  # four confident cells, one per class
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 20  # four confident cells, all in one class
    im_diverse, *_ = selftrain.im_loss(confident, 1.0)
    im_collapsed, *_ = selftrain.im_loss(collapsed, 1.0)
    assert im_diverse < im_collapsed - 1.0
    tent_diverse, *_ = selftrain.im_loss(confident, 0.0)
    tent_collapsed, *_ = selftrain.im_loss(collapsed, 0.0)
    assert tent_diverse == pytest.approx(tent_collapsed.item(), abs=1e-6)  # entropy alone cannot tell them apart


def test_diversity_term_keeps_predictions_spread_where_entropy_minimisation_collapses_them() -> None:
    crops, _ = site_crops()
    cfg = AdaptConfig(layers="none", unsupervised="im", im_params="features", im_epochs=8, im_lr=0.05, batch_size=16)
    results = {}
    for diversity in (0.0, 1.0):
        model = tiny_model()
        with torch.no_grad():
            model.head.bias[0] += 1.0  # a model leaning towards one class, as on a foreign stain
        start = marginal_entropy(model, crops)
        selftrain.information_maximisation(model, crops, META, replace(cfg, im_diversity=diversity),
                                           log=lambda *_: None)
        results[diversity] = marginal_entropy(model, crops)
    assert results[0.0] < 0.5 * start  # TENT's objective: everything drifts into the favoured class
    assert results[1.0] > start - 0.05  # SHOT-IM: the spread over classes is kept


def weights_before_and_after_im(im_params: str) -> tuple[torch.nn.Module, dict, dict]:
    """Two epochs of information maximisation over a tiny model with one parameter scope."""
    crops, _ = site_crops(32)
    model = tiny_model()
    before = state(model)
    cfg = AdaptConfig(layers="none", unsupervised="im", im_params=im_params, im_epochs=2, batch_size=16)
    selftrain.information_maximisation(model, crops, META, cfg, log=lambda *_: None)
    return model, before, state(model)


def test_batchnorm_scope_moves_only_batchnorm_scales_and_shifts() -> None:
    model, before, after = weights_before_and_after_im("bn")
    bn_affine = {name for name, module in model.named_modules()
                 if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for name in (f"{name}.weight",
                                                                                           f"{name}.bias")}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= bn_affine


def test_feature_scope_leaves_the_classifier_head_frozen() -> None:
    _, before, after = weights_before_and_after_im("features")
    assert torch.equal(before["head.weight"], after["head.weight"])
    assert torch.equal(before["head.bias"], after["head.bias"])
    assert not torch.equal(before["stem.0.weight"], after["stem.0.weight"])
    assert torch.equal(before["stem.1.running_mean"], after["stem.1.running_mean"])  # statistics stay as estimated


def test_self_training_keeps_only_the_most_confident_share_of_each_predicted_class() -> None:
    probs = np.array([[0.90, 0.10], [0.80, 0.20], [0.70, 0.30], [0.60, 0.40],  # class 0, by falling confidence
                      [0.45, 0.55], [0.20, 0.80]])  # class 1
    kept = selftrain.select_confident(probs, 0.5)
    assert kept.tolist() == [0, 1, 5]  # top half of class 0 (2 of 4), top half of class 1 (1 of 2)


def test_self_training_keeps_at_least_one_cell_of_every_predicted_class() -> None:
    probs = np.array([[0.9, 0.1, 0.0]] * 20 + [[0.1, 0.5, 0.4]])
    kept = selftrain.select_confident(probs, 0.1)
    assert 20 in kept.tolist() and len(kept) == 3


def test_reviewer_labels_win_over_pseudo_labels() -> None:
    crops, _ = site_crops(20)
    labelled, labels = crops[:3], np.array([3, 3, 3])
    pool = selftrain.without_labelled(crops, labelled)  # the experiment's pool contains the labelled cells
    assert len(pool) == 17
    train, targets = selftrain.pseudo_labelled_set(tiny_model(), pool, labelled, labels, META, 1.0)
    assert len(train) == 20 and len(targets) == 20
    for crop, label in zip(labelled, labels, strict=True):
        matches = [t for c, t in zip(train, targets, strict=True) if np.array_equal(c, crop)]
        assert matches == [label]


@pytest.mark.parametrize("method", ["bn+im+replay", "bn+st+replay"])
def test_unsupervised_adaptation_is_reproducible_for_a_seed(method: str) -> None:
    crops, groups = site_crops(48)
    replay = site_crops(16, seed=1)
    cfg = replace(METHODS[method], im_epochs=2, epochs=3, batch_size=16)
    runs = []
    for seed in (0, 0, 1):
        model = adapt_with_method(tiny_model(), META, crops, crops[:0], groups[:0], replace(cfg, seed=seed),
                            replay, log=lambda *_: None)
        runs.append(state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_unsupervised_methods_train_without_any_labels() -> None:
    crops, groups = site_crops(48)
    bn_only = adapt_with_method(tiny_model(), META, crops, crops[:0], groups[:0], METHODS["bn"], log=lambda *_: None)
    for method in ("bn+im", "bn+st+replay"):
        cfg = replace(METHODS[method], im_epochs=2, epochs=3, batch_size=16)
        model = adapt_with_method(tiny_model(), META, crops, crops[:0], groups[:0], cfg, site_crops(16, 1),
                            log=lambda *_: None)
        assert not torch.equal(model.stem[1].weight, bn_only.stem[1].weight), method


def test_experiment_measures_unsupervised_methods_at_zero_labels_only_where_they_can_use_them() -> None:
    assert runs_at(METHODS["bn"], 0) and not runs_at(METHODS["bn"], 20)
    assert runs_at(METHODS["bn+im+replay"], 0) and not runs_at(METHODS["bn+im+replay"], 20)
    assert runs_at(METHODS["bn+st+replay"], 0) and runs_at(METHODS["bn+st+replay"], 50)
    assert not runs_at(METHODS["bn+all+replay"], 0) and runs_at(METHODS["bn+all+replay"], 50)


def test_existing_methods_do_not_train_on_unlabelled_crops() -> None:
    for name in ("none", "bn", "head", "bn+head", "bn+all", "all+replay", "bn+all+replay", "mixbn+all+replay"):
        assert not METHODS[name].uses_unlabelled_training and not METHODS[name].colour_match, name


def test_unknown_unsupervised_method_is_refused() -> None:
    crops, groups = site_crops(32)
    with pytest.raises(ValueError, match="unsupervised"):
        adapt_with_method(tiny_model(), META, crops, crops[:0], groups[:0], AdaptConfig(unsupervised="magic"))


def test_colour_matching_moves_site_lab_statistics_onto_the_reference() -> None:
    site, _ = site_crops(32)
    reference = np.clip(site.astype(int) // 2 + 90, 0, 255).astype(np.uint8)  # paler, lower contrast
    target = colourmatch.lab_stats(reference)
    matched = colourmatch.match(site, colourmatch.lab_stats(site), target)
    assert matched.dtype == np.uint8 and matched.shape == site.shape
    after = colourmatch.lab_stats(matched)
    assert np.allclose(after.mean, target.mean, atol=2.0)
    assert np.allclose(after.std, target.std, rtol=0.1, atol=1.0)


def test_colour_matching_a_site_onto_itself_changes_almost_nothing() -> None:
    site, _ = site_crops(16)
    stats = colourmatch.lab_stats(site)
    same = colourmatch.match(site, stats, stats)
    assert np.abs(same.astype(int) - site.astype(int)).max() <= 2


def test_diverging_information_maximisation_is_refused_not_saved() -> None:
    crops, _ = site_crops(32)
    cfg = AdaptConfig(layers="none", unsupervised="im", im_params="features", im_epochs=3, im_lr=1e6,
                      batch_size=16)
    with pytest.raises(ValueError, match="diverged"):
        selftrain.information_maximisation(copy.deepcopy(tiny_model()), crops, META, cfg, log=lambda *_: None)


def test_teacher_filter_keeps_the_confident_half_of_each_class_and_the_agreeing_cells() -> None:
    from engines.experiments.teacher_filter import confident_half, pseudo_labels

    teacher = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.7, 0.3]])
    cnn = np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.9, 0.1], [0.6, 0.4]])
    assert confident_half(teacher.argmax(1), teacher.max(1)).tolist() == [0, 2]  # class 0: 0.9 of 3; class 1: 0.8
    index, labels = pseudo_labels("agree", teacher, cnn)
    assert index.tolist() == [0, 2, 4] and labels.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="unknown filter"):
        pseudo_labels("vote", teacher, cnn)
