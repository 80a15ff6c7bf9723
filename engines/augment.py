"""Training-time augmentations that span lab-to-lab variation (stain, lamp, optics, camera, scale).

A model trained on PBC alone collapses on other microscopes (docs/background.md §4); these ops make
the training crops look like they came from other labs. Each op is a small numpy/cv2 function on one
uint8 BGR crop, ``op(image, rng, strength) -> image``; :class:`Pipeline` applies each with its own
probability, driven by a seeded ``numpy.random.Generator`` so a run is reproducible. The named set
``robust`` (:data:`PIPELINES`) is what ``python -m engines.baseline train --augment robust`` uses,
on top of the baseline's flips/shift/brightness jitter. Parameters are documented in docs/robustness.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

Op = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]

# Ruifrok & Johnston (2001) stain vectors in RGB optical density, as in skimage.color.rgb_from_hed:
# haematoxylin, eosin, DAB. Rows are normalised to unit length below. MGG/Wright stains are not H&E,
# but their two dyes (azure/methylene blue and eosin) separate along similar directions.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def _u(rng: np.random.Generator, half_width: float) -> float:
    """Uniform in [-half_width, half_width]."""
    return float(rng.uniform(-half_width, half_width))


def _to_u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def border_colour(image: np.ndarray) -> np.ndarray:
    """Median BGR of the crop's outer ring: the plasma/background around the cell, used to pad."""
    ring = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(ring, axis=0)


# ----------------------------------------------------------------------------------------- colour
def stain_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Tellez-style H&E(-DAB) jitter: to optical density, project on the Ruifrok-Johnston stains,
    scale each stain by 1±0.15·s and shift it by ±0.02·s, back to RGB. Stain amount and hue vary
    between labs and slides; zero stain (white background) stays nearly white because the shift is
    small in optical density (0.02 OD is ~5 grey levels)."""
    rgb = image[..., ::-1].astype(np.float64)
    od = -np.log(np.maximum(rgb, 1.0) / 255.0)
    conc = od.reshape(-1, 3) @ _HED_FROM_RGB
    alpha = 1.0 + rng.uniform(-0.15, 0.15, 3) * strength
    beta = rng.uniform(-0.02, 0.02, 3) * strength
    conc = conc * alpha + beta
    out = 255.0 * np.exp(-(conc @ _RGB_FROM_HED))
    return _to_u8(out.reshape(image.shape)[..., ::-1])


def hue_saturation(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Hue shift up to ±10° and saturation ×(1±0.3·s): stains from other vendors or batches."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + _u(rng, 5.0 * strength), 180.0)  # OpenCV hue is 0-180
    hsv[..., 1] = hsv[..., 1] * (1.0 + _u(rng, 0.3 * strength))
    hsv = np.clip(hsv, 0, [179.999, 255, 255]).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def white_balance(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Per-channel gains 1±0.12·s: lamp colour temperature and camera white balance (e.g. the tecom
    set's yellowish background)."""
    gains = 1.0 + rng.uniform(-0.12, 0.12, 3) * strength
    return _to_u8(image.astype(np.float32) * gains.astype(np.float32))


def gamma(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Gamma in [e^-0.35s, e^0.35s] (about 0.7-1.4): camera tone curves and exposure."""
    g = math.exp(_u(rng, 0.35 * strength))
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g, 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut)


def illumination_gradient(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A linear brightness ramp 1±0.15·s across the crop in a random direction: uneven Köhler
    illumination or a field near the edge of the view."""
    h, w = image.shape[:2]
    angle = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.0, 0.15 * strength)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx - (w - 1) / 2) * math.cos(angle) + (yy - (h - 1) / 2) * math.sin(angle)) / (max(h, w) / 2)
    return _to_u8(image.astype(np.float32) * (1.0 + amp * ramp)[..., None])


def desaturate(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Blend towards grey by 0.5-1·s: a camera in monochrome or a very pale stain. Teaches that shape
    and texture, not hue alone, name a cell."""
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    amount = min(1.0, rng.uniform(0.5, 1.0) * strength)
    return _to_u8(image.astype(np.float32) * (1.0 - amount) + grey.astype(np.float32) * amount)


# ---------------------------------------------------------------------------------------- context
def isolate(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Hide the neighbours outside a random central disc (radius 0.30-0.45 of the crop) with the plasma
    colour (``edge.classifier.hide_context``): other labs' crops (e.g. a white cell alone on plasma)
    lack PBC's ring of red cells, so the class must come from the centred cell, not its neighbours."""
    from edge.classifier import hide_context

    return hide_context(image[None], rng.uniform(0.30, 0.45) / max(strength, 1e-6))[0]


# ----------------------------------------------------------------------------------------- optics
def defocus(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Gaussian blur, sigma 0.3-1.2·s px at 64 px (0.2-0.7 µm): focus drift and weaker objectives."""
    sigma = rng.uniform(0.3, max(0.31, 1.2 * strength))
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def motion_blur(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A line kernel 2-4·s px long at a random angle: a stage moving during the exposure."""
    length = max(2, round(rng.uniform(2.0, 2.0 + 2.0 * strength)))
    size = length | 1
    kernel = np.zeros((size, size), np.float32)
    kernel[size // 2, (size - length) // 2:(size - length) // 2 + length] = 1.0
    rot = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), rng.uniform(0, 180), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (size, size))
    kernel /= max(float(kernel.sum()), 1e-6)
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)


# ----------------------------------------------------------------------------------------- camera
def sensor_noise(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Shot-like plus read noise: sigma² = a·I + b with a up to 0.5·s and b up to (4·s)², per channel."""
    x = image.astype(np.float32)
    a = rng.uniform(0.0, 0.5 * strength)
    b = rng.uniform(0.0, 4.0 * strength) ** 2
    noise = rng.standard_normal(x.shape).astype(np.float32) * np.sqrt(a * x + b)
    return _to_u8(x + noise)


def jpeg(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Re-encode as JPEG at quality 95-60·s (down to 35): capture software and archives compress."""
    quality = int(rng.uniform(max(5.0, 95.0 - 60.0 * strength), 95.0))
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return image
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


# ------------------------------------------------------------------------------------------ scale
def zoom(image: np.ndarray, factor: float, fill: np.ndarray | None = None) -> np.ndarray:
    """Magnify by ``factor`` about the centre (>1 zooms in, the cell looks bigger); what comes in from
    outside the crop is the crop's background colour, as the runtime pads with the frame's."""
    h, w = image.shape[:2]
    colour = border_colour(image) if fill is None else fill
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 0.0, float(factor))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(image, matrix, (w, h), flags=interp, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=[float(v) for v in colour])


def scale_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Zoom by a log-uniform factor in [1/(1+0.25·s), 1+0.25·s]: the runtime's µm/px at a new
    microscope is a calibration, often off by 10-25%, and cells vary in size between patients."""
    limit = math.log(1.0 + 0.25 * strength)
    return zoom(image, math.exp(rng.uniform(-limit, limit)))


OPS: dict[str, Op] = {
    "scale": scale_jitter, "stain": stain_jitter, "hsv": hue_saturation, "white_balance": white_balance,
    "gamma": gamma, "illumination": illumination_gradient, "defocus": defocus, "motion_blur": motion_blur,
    "noise": sensor_noise, "jpeg": jpeg, "desaturate": desaturate, "isolate": isolate,
}


@dataclass(frozen=True)
class Step:
    """One op with the probability of applying it and its strength (1.0 = the documented ranges)."""

    op: str
    p: float
    strength: float = 1.0


@dataclass(frozen=True)
class Pipeline:
    """Ops in a fixed, physical order: geometry, stain, light, optics, sensor, compression."""

    steps: tuple[Step, ...]

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = image
        for step in self.steps:
            if rng.random() < step.p:
                out = OPS[step.op](out, rng, step.strength)
        return out

    def batch(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(N, H, W, 3) uint8 BGR -> a new array of the same shape and dtype."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        out = np.empty_like(images)
        for i in range(len(images)):
            out[i] = self(images[i], rng)
        return out

    def describe(self) -> str:
        return ", ".join(f"{s.op} p={s.p:g}" + (f" s={s.strength:g}" if s.strength != 1.0 else "") for s in self.steps)


PIPELINES: dict[str, Pipeline] = {
    "robust": Pipeline((
        Step("scale", 0.6),
        Step("stain", 0.8),
        Step("hsv", 0.5),
        Step("white_balance", 0.5),
        Step("gamma", 0.4),
        Step("illumination", 0.3),
        Step("defocus", 0.25),
        Step("motion_blur", 0.1),
        Step("noise", 0.3),
        Step("jpeg", 0.3),
    )),
}


def augment_batch(images: np.ndarray, name: str, seed: int | np.random.Generator) -> np.ndarray:
    """Apply the named set to a uint8 BGR batch; the same seed gives the same output."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return PIPELINES[name].batch(images, rng)


# After the ablation: colour carried the out-of-domain gain and the sensor ops bought nothing, so
# "strong" widens the colour ranges 2.5x (stain scale ±0.375, white balance ±0.30, hue ±12.5°), adds
# desaturation and drops noise/JPEG; "strong-isolate" also hides the neighbours of the centred cell.
_STRONG = (
    Step("scale", 0.6),
    Step("stain", 0.9, 2.5),
    Step("hsv", 0.7, 2.5),
    Step("white_balance", 0.7, 2.5),
    Step("gamma", 0.5, 1.5),
    Step("desaturate", 0.1),
    Step("illumination", 0.3),
    Step("defocus", 0.25),
    Step("motion_blur", 0.1),
)
PIPELINES["strong"] = Pipeline(_STRONG)
PIPELINES["strong-isolate"] = Pipeline((_STRONG[0], Step("isolate", 0.5), *_STRONG[1:]))

# The ablation of issue 9 (engines/experiments/ablate.py) asks what each kind of lab-to-lab variation buys, so the
# ops are grouped by the physical cause they mimic and "robust" is retrained with one group left out.
GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("stain", "hsv", "white_balance", "gamma"),
    "optics": ("illumination", "defocus", "motion_blur"),
    "sensor": ("noise", "jpeg"),
    "scale": ("scale",),
}


def without(pipeline: Pipeline, ops: tuple[str, ...]) -> Pipeline:
    """The same pipeline minus the named ops; the others keep their order, probability and strength."""
    return Pipeline(tuple(step for step in pipeline.steps if step.op not in ops))


PIPELINES.update({f"robust-no-{group}": without(PIPELINES["robust"], ops) for group, ops in GROUPS.items()})
