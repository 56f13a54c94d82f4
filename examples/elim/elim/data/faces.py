"""Drawing one synthetic face: appearance record, per-image jitter and the renderer.

Faces are drawn with :mod:`PIL.ImageDraw` (ellipses, chords, polylines) at
``render_scale`` times the output size and box-averaged down, i.e. supersampling
antialiasing. Expression geometry follows the label: mouth curvature follows valence,
mouth and eye openness follow arousal, brows rise with arousal and furrow with negative
valence; each identity bends this through its resting offset and expressiveness gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

HAIR_STYLES = ("short", "long", "shaved", "fringe", "bun")
ACCESSORIES = ("none", "glasses", "hat_band", "earrings")


@dataclass(frozen=True)
class FaceAppearance:
    """Appearance and expression style of one identity (colours are RGB in 0..255).

    ``skin``, ``hair``, ``background`` and ``brightness`` come from the four appearance
    factors that are confounded with the VA centre for training identities.
    """

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    background: tuple[int, int, int]
    brightness: float
    light_angle: float
    face_scale: float
    face_aspect: float
    eye_spacing: float
    eye_size: float
    mouth_width: float
    iris: tuple[int, int, int]
    hair_style: str
    accessory: str
    accessory_colour: tuple[int, int, int]
    age: int
    neutral_offset: tuple[float, float]
    expressiveness: float


@dataclass(frozen=True)
class Jitter:
    """Per-image nuisance: translation ``(dx, dy)`` as image fractions, scale, rotation."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    rotate_deg: float = 0.0
    brightness: float = 1.0


def _expression(appearance: FaceAppearance, valence: float, arousal: float):
    """Identity-specific effective expression: resting offset plus scaled label."""
    gain = appearance.expressiveness
    v = float(np.clip(appearance.neutral_offset[0] + gain * valence, -1.0, 1.0))
    a = float(np.clip(appearance.neutral_offset[1] + gain * arousal, -1.0, 1.0))
    return v, a


def render_face(
    appearance: FaceAppearance,
    valence: float,
    arousal: float,
    *,
    image_size: int = 64,
    render_scale: int = 4,
    jitter: Jitter | None = None,
    noise: float = 0.0,
    light_strength: float = 0.3,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Render one face with the expression of label ``(valence, arousal)``.

    Args:
        appearance: the identity's appearance and expression style.
        valence: in ``[-1, 1]``; drives mouth curvature and brow furrow.
        arousal: in ``[-1, 1]``; drives mouth opening, eye opening and brow height.
        image_size: output side length in pixels.
        render_scale: supersampling factor (drawn at ``image_size * render_scale``).
        jitter: per-image translation/scale/rotation/brightness; ``None`` = identity.
        noise: std of additive Gaussian pixel noise in ``[0, 1]`` units (needs ``rng``).
        light_strength: amplitude of the directional lighting gradient.
        rng: generator for the pixel noise.

    Returns:
        ``(image_size, image_size, 3)`` uint8 RGB array.

    Example:
        >>> from elim.data.synthetic import SyntheticConfig, sample_identities
        >>> face = sample_identities(SyntheticConfig(n_train_identities=1))[0].appearance
        >>> render_face(face, 0.5, -0.2, image_size=32).shape
        (32, 32, 3)
    """
    if not (-1.0 <= valence <= 1.0 and -1.0 <= arousal <= 1.0):
        raise ValueError(f"`valence` and `arousal` must lie in [-1, 1], got ({valence}, {arousal})")
    jitter = jitter or Jitter()
    side = image_size * render_scale
    image = Image.new("RGB", (side, side), appearance.background)
    draw = ImageDraw.Draw(image)
    frame = _Frame(appearance, jitter, side)
    v, a = _expression(appearance, valence, arousal)
    _draw_hair_back(draw, frame, appearance)
    _draw_head(draw, frame, appearance)
    _draw_eyes(draw, frame, appearance, a)
    _draw_brows(draw, frame, appearance, v, a)
    _draw_nose(draw, frame, appearance)
    _draw_mouth(draw, frame, appearance, v, a)
    _draw_accessory(draw, frame, appearance)
    if jitter.rotate_deg:
        # Nearest-neighbour is enough here: the box downsample below averages
        # render_scale**2 supersamples, which antialiases the rotated edges (and costs a
        # fiftieth of a bicubic rotation at this resolution).
        image = image.rotate(jitter.rotate_deg, fillcolor=appearance.background)
    image = image.reduce(render_scale)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    along = (
        math.cos(appearance.light_angle) * grid[None, :]
        + math.sin(appearance.light_angle) * grid[:, None]
    )
    shade = appearance.brightness * jitter.brightness * (1.0 + light_strength * along)
    pixels = pixels * shade[:, :, None]
    if noise > 0:
        if rng is None:
            raise ValueError("`rng` is required when `noise` > 0")
        pixels = pixels + rng.normal(0.0, noise, size=pixels.shape).astype(np.float32)
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class _Frame:
    """Maps face coordinates (``fx, fy`` in [-1, 1] across the face ellipse) to pixels."""

    def __init__(self, appearance: FaceAppearance, jitter: Jitter, side: int) -> None:
        self.side = side
        self.rx = 0.27 * appearance.face_scale * jitter.scale * side
        self.ry = self.rx * appearance.face_aspect
        self.cx = (0.5 + jitter.dx) * side
        self.cy = (0.53 + jitter.dy) * side

    def xy(self, fx: float, fy: float) -> tuple[float, float]:
        return self.cx + fx * self.rx, self.cy + fy * self.ry

    def box(self, fx: float, fy: float, half_w: float, half_h: float) -> list[float]:
        """Bounding box around a face point; half sizes are in units of ``rx``."""
        x, y = self.xy(fx, fy)
        return [
            x - half_w * self.rx,
            y - half_h * self.rx,
            x + half_w * self.rx,
            y + half_h * self.rx,
        ]

    def width(self, fraction: float) -> int:
        return max(1, round(fraction * self.rx))


def _darker(colour, factor: float) -> tuple[int, int, int]:
    return tuple(int(c * factor) for c in colour)


def _draw_hair_back(draw: ImageDraw.ImageDraw, f: _Frame, ap: FaceAppearance) -> None:
    if ap.hair_style == "long":
        draw.rounded_rectangle(
            [f.cx - 1.2 * f.rx, f.cy - 1.1 * f.ry, f.cx + 1.2 * f.rx, f.cy + 0.9 * f.ry],
            radius=f.rx,
            fill=ap.hair,
        )
    elif ap.hair_style == "bun":
        draw.ellipse(f.box(0.0, -1.12, 0.42, 0.42), fill=ap.hair)


def _draw_head(draw: ImageDraw.ImageDraw, f: _Frame, ap: FaceAppearance) -> None:
    # Neck and ears first, so that the face ellipse overlaps them.
    draw.rectangle(
        [f.cx - 0.45 * f.rx, f.cy + 0.6 * f.ry, f.cx + 0.45 * f.rx, f.side],
        fill=_darker(ap.skin, 0.9),
    )
    for side in (-1, 1):
        draw.ellipse(f.box(side * 0.98, -0.05, 0.14, 0.24), fill=_darker(ap.skin, 0.95))
    draw.ellipse([f.cx - f.rx, f.cy - f.ry, f.cx + f.rx, f.cy + f.ry], fill=ap.skin)
    if ap.hair_style != "shaved":
        top = [f.cx - 1.04 * f.rx, f.cy - 1.06 * f.ry, f.cx + 1.04 * f.rx, f.cy + 0.2 * f.ry]
        draw.chord(top, 180, 360, fill=ap.hair)
    if ap.hair_style == "fringe":
        draw.polygon(
            [f.xy(-0.95, -0.45), f.xy(0.6, -0.62), f.xy(0.9, -0.5), f.xy(0.2, -0.9)], fill=ap.hair
        )
    # Forehead wrinkles: one line per ~20 years past 25, a visible age cue.
    for k in range(max(0, (ap.age - 25) // 20)):
        y = -0.42 + 0.07 * k
        draw.arc(
            [*f.xy(-0.35, y - 0.05), *f.xy(0.35, y + 0.05)],
            200,
            340,
            fill=_darker(ap.skin, 0.78),
            width=f.width(0.025),
        )


def _draw_eyes(draw: ImageDraw.ImageDraw, f: _Frame, ap: FaceAppearance, a: float) -> None:
    openness = float(np.clip(0.55 + 0.45 * a, 0.04, 1.0))
    half_w = 0.15 * ap.eye_size
    half_h = 0.12 * ap.eye_size * openness
    for side in (-1, 1):
        fx = side * ap.eye_spacing
        draw.ellipse(
            f.box(fx, -0.12, half_w, half_h),
            fill=(245, 245, 240),
            outline=_darker(ap.skin, 0.55),
            width=f.width(0.02),
        )
        iris = min(0.075 * ap.eye_size, half_h)
        draw.ellipse(f.box(fx, -0.12, 0.075 * ap.eye_size, iris), fill=ap.iris)
        pupil = min(0.035 * ap.eye_size, half_h)
        draw.ellipse(f.box(fx, -0.12, 0.035 * ap.eye_size, pupil), fill=(10, 10, 10))


def _draw_brows(
    draw: ImageDraw.ImageDraw, f: _Frame, ap: FaceAppearance, v: float, a: float
) -> None:
    raise_ = 0.07 * a  # surprise and excitement lift the brows
    furrow = -0.06 * v  # negative valence pulls the inner ends down
    colour = _darker(ap.hair, 0.7) if ap.hair_style != "shaved" else _darker(ap.skin, 0.45)
    for side in (-1, 1):
        inner = f.xy(side * (ap.eye_spacing - 0.17), -0.34 - raise_ + furrow)
        outer = f.xy(side * (ap.eye_spacing + 0.19), -0.37 - raise_ - 0.5 * furrow)
        draw.line([inner, outer], fill=colour, width=f.width(0.07))


def _draw_nose(draw: ImageDraw.ImageDraw, f: _Frame, ap: FaceAppearance) -> None:
    shade = _darker(ap.skin, 0.75)
    draw.line(
        [f.xy(0.0, -0.02), f.xy(-0.06, 0.2), f.xy(0.04, 0.22)], fill=shade, width=f.width(0.04)
    )


def _draw_mouth(
    draw: ImageDraw.ImageDraw, f: _Frame, ap: FaceAppearance, v: float, a: float
) -> None:
    curve = 0.22 * v  # in units of rx; positive lowers the middle, i.e. corners up: a smile
    opening = 0.03 + 0.27 * (a + 1.0) / 2.0
    half = ap.mouth_width
    xs = np.linspace(-1.0, 1.0, 25)
    bulge = 1.0 - xs**2
    x_px = f.cx + xs * half * f.rx
    y_mid = f.cy + 0.47 * f.ry + curve * bulge * f.rx
    upper = list(zip(x_px, y_mid - 0.5 * opening * bulge * f.rx))
    lower = list(zip(x_px, y_mid + 0.5 * opening * bulge * f.rx))
    draw.polygon(upper + lower[::-1], fill=(70, 18, 24))
    lips = (170, 62, 70)
    draw.line(upper, fill=lips, width=f.width(0.06), joint="curve")
    draw.line(lower, fill=lips, width=f.width(0.07), joint="curve")


def _draw_accessory(draw: ImageDraw.ImageDraw, f: _Frame, ap: FaceAppearance) -> None:
    colour = ap.accessory_colour
    if ap.accessory == "glasses":
        for side in (-1, 1):
            draw.ellipse(
                f.box(side * ap.eye_spacing, -0.12, 0.25, 0.2), outline=colour, width=f.width(0.04)
            )
        draw.line(
            [f.xy(-ap.eye_spacing + 0.25, -0.14), f.xy(ap.eye_spacing - 0.25, -0.14)],
            fill=colour,
            width=f.width(0.04),
        )
    elif ap.accessory == "hat_band":
        draw.chord(
            [f.cx - 1.1 * f.rx, f.cy - 1.2 * f.ry, f.cx + 1.1 * f.rx, f.cy - 0.2 * f.ry],
            180,
            360,
            fill=colour,
        )
        draw.rectangle([*f.xy(-1.1, -0.74), *f.xy(1.1, -0.64)], fill=_darker(colour, 0.6))
    elif ap.accessory == "earrings":
        for side in (-1, 1):
            draw.ellipse(f.box(side * 0.98, 0.22, 0.07, 0.07), fill=colour)
