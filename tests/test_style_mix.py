"""Feature-style mixing (engines.style_mix): in training it moves the labelled crops' per-channel feature
statistics towards donors' (other microscopes' cells when given) and leaves the donors alone; at inference it
is the identity, so a model trained with it exports the same graph and weights layout as one without."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _features(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=gen) * (1 + shift) + shift


def test_inference_mode_is_the_identity() -> None:
    from engines.style_mix import StyleMix

    layer = StyleMix(p=1.0).eval()
    x = _features(5, 0)
    assert torch.equal(layer(x), x)


def test_labelled_rows_take_the_foreign_donors_style_and_donor_rows_are_untouched() -> None:
    from engines.style_mix import StyleMix

    labelled, donors = _features(6, 1), _features(3, 2, shift=5.0)  # donors: a very different "microscope"
    layer = StyleMix(p=1.0, alpha=0.1).train()
    layer.labelled, layer.rng = 6, np.random.default_rng(0)
    out = layer(torch.cat([labelled, donors]))
    assert torch.equal(out[6:], donors)
    own, moved = labelled.mean(dim=(2, 3)), out[:6].mean(dim=(2, 3))
    donor_means = donors.mean(dim=(2, 3))
    # every labelled row's channel means now lie between its own and some donor's (a convex mix)
    for row in range(6):
        between = [bool((((moved[row] - own[row]) * (donor_means[d] - moved[row])) >= -1e-4).all())
                   for d in range(3)]
        assert any(between)
    assert (moved - own).abs().max() > 1.0  # and at least some moved a long way (alpha 0.1: mostly swaps)


def test_pbc_donors_shuffle_within_the_batch_and_are_repeatable_from_the_seed() -> None:
    from engines.style_mix import StyleMix

    x = _features(8, 3)
    first, second = StyleMix(p=1.0).train(), StyleMix(p=1.0).train()
    first.rng, second.rng = np.random.default_rng(5), np.random.default_rng(5)
    a, b = first(x), second(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, x)
    # content (the normalised pattern) is kept: each row's spatial correlation with its input is high
    for row in range(8):
        assert float(torch.corrcoef(torch.stack([a[row].flatten(), x[row].flatten()]))[0, 1]) > 0.5


def test_a_style_model_has_the_plain_weights_layout_and_exports_the_plain_graph(tmp_path) -> None:
    from engines import export
    from engines.baseline import BaselineCNN
    from engines.style_mix import style_layers

    torch.manual_seed(0)
    styled = BaselineCNN(8, 8, (8, 16, 16, 16), style="foreign")
    plain = BaselineCNN(8, 8, (8, 16, 16, 16))
    assert len(style_layers(styled)) == 3
    assert styled.state_dict().keys() == plain.state_dict().keys()  # what `cytoedge adapt` loads
    plain.load_state_dict(styled.state_dict())
    meta = export.make_metadata(name="style", version="0", classes=[f"c{i}" for i in range(8)], input_size=64,
                                mean=[0.5] * 3, std=[0.25] * 3, field_um=36.0, kind="baseline")
    paths = [export.export_onnx(m, tmp_path / f"{name}.onnx", meta) for name, m in (("s", styled), ("p", plain))]
    import onnx

    ops = [[node.op_type for node in onnx.load(str(p)).graph.node] for p in paths]
    assert ops[0] == ops[1]


def test_training_with_foreign_donors_needs_the_cells_file() -> None:
    from engines.baseline import TrainConfig, foreign_pool

    with pytest.raises(ValueError, match="needs foreign_cells"):
        foreign_pool(TrainConfig(style="foreign"))
    assert foreign_pool(TrainConfig()) is None


def test_foreign_donors_are_train_frame_cells_without_the_left_out_source(tmp_path) -> None:
    from engines.baseline import TrainConfig, foreign_pool

    crops = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1) * np.ones((6, 4, 4, 3), np.uint8)
    path = tmp_path / "cells.npz"
    np.savez(path, crops=crops, source=np.array(["a", "a", "b", "b", "c", "c"]),
             split=np.array(["train", "val", "train", "train", "train", "test"]), frame=np.arange(6))
    donors = foreign_pool(TrainConfig(style="foreign", foreign_cells=str(path), foreign_exclude=("b",)))
    assert sorted(int(c[0, 0, 0]) for c in donors) == [0, 4]
    with pytest.raises(ValueError, match="no foreign train-frame cells"):
        foreign_pool(TrainConfig(style="foreign", foreign_cells=str(path), foreign_exclude=("a", "b", "c")))


def test_consistency_targets_keep_only_confident_calls_and_leave_the_model_training() -> None:
    from types import SimpleNamespace

    from engines.baseline import BaselineCNN, consistency_targets

    torch.manual_seed(0)
    model = BaselineCNN(8, 8, (8, 16, 16, 16)).train()
    cells = np.random.default_rng(0).integers(0, 255, (10, 64, 64, 3), dtype=np.uint8)
    data = SimpleNamespace(mean=[0.5] * 3, std=[0.25] * 3)
    label, keep = consistency_targets(model, cells, data, torch.Generator().manual_seed(0), threshold=0.0)
    assert model.training and label.shape == (10,) and bool((keep == 1).all())
    _, none_kept = consistency_targets(model, cells, data, torch.Generator().manual_seed(0), threshold=1.01)
    assert float(none_kept.sum()) == 0.0


def test_consistency_runs_get_their_own_checkpoint_key() -> None:
    from types import SimpleNamespace

    from engines.baseline import TrainConfig, run_key

    data = SimpleNamespace(split_summary={"sha256": "abc"}, labels={"train": [0] * 5, "val": [0] * 2})
    plain = run_key(TrainConfig(), data)
    fix = run_key(TrainConfig(consistency=1.0, foreign_cells="/somewhere/white64.npz"), data)
    moved = run_key(TrainConfig(consistency=1.0, foreign_cells="elsewhere/white64.npz"), data)
    assert fix != plain and fix == moved  # where the cells file lies is not part of the run
