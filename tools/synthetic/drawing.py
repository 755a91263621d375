"""The pictures: identities with distinct looks, cameras, and each dataset's visual style.

Each identity has its own clothes (head/torso/legs colours, stripes or checks, bag, skirt), each
camera shifts brightness, tint and viewpoint, and each dataset has its own colour cast, contrast,
blur, noise and background, so a model trained on three datasets meets a new style on the fourth.
"""
from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Style:
    """A dataset's look: colour cast, contrast, blur radius, noise level, background."""

    cast: tuple[float, float, float]
    contrast: float
    blur: float
    noise: float
    background: str
    base: tuple[int, int, int]


STYLES = {
    "market1501": Style((1.06, 1.0, 0.9), 1.0, 0.0, 4.0, "pavement", (150, 145, 130)),
    "dukemtmc": Style((0.9, 1.02, 1.08), 0.85, 0.7, 3.0, "foliage", (100, 125, 100)),
    "msmt17v1": Style((1.0, 0.94, 1.12), 1.3, 0.0, 9.0, "tiles", (170, 160, 175)),
    "cuhk03": Style((0.95, 0.97, 0.95), 0.7, 1.1, 2.0, "plain", (80, 80, 90)),
    "cuhk_sysu": Style((1.1, 1.03, 0.94), 1.1, 0.4, 5.0, "street", (140, 150, 160)),
}


def _colour(rng, sat=(0.3, 1.0), val=(0.2, 1.0)) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val)), np.float32)


def make_look(rng) -> dict:
    """One identity's clothes and build."""
    return {
        "skin": _colour(rng, (0.2, 0.6), (0.35, 0.95)) * np.float32(0.3) + np.float32([150, 110, 90]) * 0.7,
        "hair": _colour(rng, (0.0, 0.6), (0.05, 0.5)),
        "torso": _colour(rng), "legs": _colour(rng), "shoes": _colour(rng, (0, 0.5), (0.05, 0.6)),
        "pattern": int(rng.integers(5)), "pat_colour": _colour(rng), "freq": float(rng.uniform(8, 20)),
        "sleeves": bool(rng.random() < 0.6), "skirt": bool(rng.random() < 0.2),
        "long_hair": bool(rng.random() < 0.3), "bag": int(rng.integers(-1, 2)), "bag_colour": _colour(rng),
        "width": float(rng.uniform(0.85, 1.2)),
    }


def make_camera(rng) -> dict:
    """A camera's brightness, tint, background shift and viewpoint (offset, zoom, mirror)."""
    return {"gain": float(rng.uniform(0.8, 1.2)), "tint": rng.uniform(0.9, 1.1, 3).astype(np.float32),
            "bg": rng.uniform(0.8, 1.2, 3).astype(np.float32), "dx": float(rng.uniform(-0.04, 0.04)),
            "zoom": float(rng.uniform(0.88, 1.0)), "flip": bool(rng.random() < 0.5)}


def draw_person(look: dict, h: int, w: int, dx: float, top: float, zoom: float, flip: bool):
    """The person's colours and mask on an h x w grid; body coordinates in units of its height."""
    y = ((np.arange(h, dtype=np.float32)[:, None] + 0.5) / h - top) / zoom
    x = (((np.arange(w, dtype=np.float32)[None, :] + 0.5) - w / 2) / h - dx) / zoom
    if flip:
        x = -x
    ax, wf = np.abs(x), look["width"]
    img = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), bool)

    def paint(region, colour):
        img[region] = colour
        mask[region] = True

    def band(y0, y1):
        return (y >= y0) & (y < y1)

    if look["skirt"]:
        paint(band(0.72, 0.93) & (ax > 0.015) & (ax < 0.05 * wf), look["skin"])
        paint(band(0.53, 0.72) & (ax < 0.08 * wf + (y - 0.53) * 0.25), look["legs"])
    else:
        paint(band(0.53, 0.93) & (ax > 0.012) & (ax < 0.07 * wf), look["legs"])
    paint(band(0.93, 0.985) & (ax > 0.008) & (ax < 0.075 * wf), look["shoes"])
    arms = band(0.2, 0.52) & (ax >= 0.088 * wf) & (ax < 0.118 * wf)
    paint(arms, look["skin"])
    paint(arms & (y < (0.5 if look["sleeves"] else 0.3)), look["torso"])
    torso = band(0.19, 0.55) & (ax < 0.088 * wf)
    paint(torso, look["torso"])
    stripes = {1: np.floor(y * look["freq"]) % 2 == 1, 2: np.floor(x * look["freq"] * 2) % 2 == 1,
               3: (np.floor(y * look["freq"]) + np.floor(x * look["freq"] * 2)) % 2 == 1,
               4: band(0.28, 0.4) & (ax < 0.035)}.get(look["pattern"])
    if stripes is not None:
        paint(torso & stripes, look["pat_colour"])
    head = ((y - 0.11) / 0.075) ** 2 + (x / 0.047) ** 2 < 1
    paint(head, look["skin"])
    paint(head & (y < 0.085), look["hair"])
    if look["long_hair"]:
        paint(band(0.08, 0.26) & (ax > 0.03) & (ax < 0.06), look["hair"])
    if look["bag"]:
        side = x * look["bag"]
        paint(band(0.33, 0.55) & (side > 0.1 * wf) & (side < 0.16 * wf), look["bag_colour"])
    img *= np.clip(1.1 - 0.4 * (x / (0.12 * wf)) ** 2, 0.6, 1.1)[..., None]  # round body shading
    return img, mask


def background(style: Style, cam: dict, h: int, w: int, rng) -> np.ndarray:
    base = np.float32(style.base) * cam["bg"]
    y = np.arange(h, dtype=np.float32)[:, None, None] / h
    x = np.arange(w, dtype=np.float32)[None, :, None] / w
    phase = rng.uniform(0, 2 * np.pi, 2).astype(np.float32)
    if style.background == "pavement":  # light above, paving lines below
        tex = 0.8 + 0.3 * y - 0.15 * ((np.floor(y * 9 + phase[0]) % 2) * (y > 0.6))
    elif style.background == "foliage":  # green blobs
        tex = 0.9 + 0.15 * np.sin(x * 11 + phase[0]) * np.sin(y * 7 + phase[1])
    elif style.background == "tiles":  # checkered floor and walls
        tex = 0.85 + 0.2 * ((np.floor(x * 4 + phase[0]) + np.floor(y * 8)) % 2)
    elif style.background == "street":  # sky, buildings, road
        blocks = 0.7 + 0.25 * np.sin(np.floor(x * 7 + phase[0]) * 2.3) ** 2
        tex = np.where(y < 0.25, 1.25, np.where(y < 0.6, blocks, 0.75 + 0.1 * y))
    else:  # plain, darker towards the floor
        tex = 1.0 - 0.3 * y
    return np.broadcast_to(base * tex, (h, w, 3)).astype(np.float32)


def finish(img: np.ndarray, style: Style, gain: float, tint: np.ndarray, rng) -> np.ndarray:
    """Camera gain/tint and dataset cast/contrast, then blur and sensor noise; uint8 out."""
    img = ((img - 128) * style.contrast + 128) * (gain * tint * np.float32(style.cast))
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if style.blur:
        out = out.filter(ImageFilter.GaussianBlur(style.blur))
    noisy = np.asarray(out, np.float32) + rng.normal(0, style.noise, img.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def photo(look: dict, cam: dict, style: Style, h: int, w: int, rng, mode: str = "normal") -> np.ndarray:
    """A person crop: tight (normal), loose (detected), badly framed (distractor) or a fragment
    (junk)."""
    jitter = {"normal": 0.01, "detected": 0.04, "distractor": 0.08, "junk": 0.15}[mode]
    dx = cam["dx"] + rng.normal(0, jitter)
    top = 0.02 + rng.normal(0, jitter)
    zoom = cam["zoom"] * (1 + rng.normal(0, jitter))
    if mode == "junk":
        top, zoom = -rng.uniform(0.3, 0.8), 2.0
    person, mask = draw_person(look, h, w, dx, top, zoom, cam["flip"])
    img = np.where(mask[..., None], person, background(style, cam, h, w, rng))
    return finish(img, style, cam["gain"], cam["tint"], rng)


def crop_size(rng, crop: tuple[int, int], spread: float) -> tuple[int, int]:
    """Crop size: fixed when spread is 0 (Market), else varying like Duke/MSMT17/CUHK03 boxes."""
    if not spread:
        return crop
    h = int(crop[0] * rng.uniform(1 - spread / 2, 1 + spread))
    return h, max(8, int(h * rng.uniform(0.36, 0.5)))


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()
