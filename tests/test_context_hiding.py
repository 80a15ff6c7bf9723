"""A model may declare that it names the centred cell without its neighbours (``context_radius``): the
runtime's preprocessing then paints the surroundings with the plasma colour, exactly as in training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge.classifier import hide_context, preprocess
from edge.errors import ModelError
from edge.modelmeta import ModelMetadata, parse_metadata

PLASMA = (200, 220, 250)


def crop_with_neighbours() -> np.ndarray:
    image = np.full((64, 64, 3), PLASMA, np.uint8)
    image[:10, :10] = (120, 90, 160)  # a red cell in the corner
    image[26:38, 26:38] = (120, 40, 60)  # the white cell's nucleus
    return image


def test_hide_context_keeps_the_centred_cell_and_paints_neighbours_with_plasma() -> None:
    out = hide_context(crop_with_neighbours()[None], 0.4)[0]
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    assert (out[26:38, 26:38] == (120, 40, 60)).all()
    assert np.abs(out[:6, :6].astype(int) - PLASMA).max() <= 1


def test_hide_context_of_an_empty_batch_is_empty() -> None:
    assert hide_context(np.zeros((0, 64, 64, 3), np.uint8), 0.4).shape == (0, 64, 64, 3)


def metadata(**changes: object) -> ModelMetadata:
    base = ModelMetadata(name="m", version="1", classes=["a", "b"], input_size=64, mean=[0.5] * 3, std=[0.2] * 3,
                         um_per_px=0.5625, field_um=36.0)
    return dataclasses.replace(base, **changes)


def test_preprocessing_hides_the_context_only_for_models_that_declare_it() -> None:
    crops = crop_with_neighbours()[None]
    plain = preprocess(crops, metadata())
    hidden = preprocess(crops, metadata(context_radius=0.4))
    assert np.array_equal(plain[:, :, 26:38, 26:38], hidden[:, :, 26:38, 26:38])
    assert not np.array_equal(plain[:, :, :6, :6], hidden[:, :, :6, :6])
    assert np.allclose(hidden[:, :, :6, :6], preprocess(np.full_like(crops, PLASMA), metadata())[:, :, :6, :6],
                       atol=0.03)


@pytest.mark.parametrize("radius", [-0.1, 0.9, "wide", True])
def test_a_model_with_a_nonsense_context_radius_is_refused(radius: object) -> None:
    with pytest.raises(ModelError, match="context_radius"):
        parse_metadata(metadata(context_radius=radius).to_json())  # type: ignore[arg-type]
