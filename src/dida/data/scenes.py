"""Procedural street scenes for the built-in synthetic domain-adaptation benchmark.

`render_scene` draws one street-like scene (sky, facades, road in perspective, sidewalks, trees,
poles with signs and lights, cars, persons, rare bicycles) as a label map and an RGB image. The
geometry is drawn from the same distribution in both domains; only the appearance differs:
`"source"` is flat, saturated, sharp and clean (GTA-like), `"target"` has a consistent per-class
colour shift, textured surfaces, a random exposure and colour cast, blur and sensor noise
(Cityscapes-like). So a model trained on the source loses accuracy on the target, while shapes and
context stay informative enough for self-training to recover much of the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DOMAINS: tuple[str, ...] = ("source", "target")
# degrees; inside the ±0.2 · 360° hue range of the methods' colour jitter, far outside the source
TARGET_HUE_SHIFT = 40.0

ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEGETATION, SKY, PERSON, CAR, BICYCLE = (
    0, 1, 2, 5, 6, 7, 8, 10, 11, 13, 18,
)  # fmt: skip
# trainIds the generator draws; all others never appear
SCENE_CLASSES: tuple[int, ...] = (
    ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEGETATION, SKY, PERSON, CAR, BICYCLE,
)  # fmt: skip


@dataclass(frozen=True)
class Material:
    """A surface kind: its trainId and the HSV range its colour is drawn from."""

    train_id: int
    hue: tuple[float, float]  # degrees, range may wrap past 360
    sat: tuple[float, float]  # 0..1
    val: tuple[float, float]  # 0..1


# Both domains draw colours from the same per-class tables; the target then goes through a global
# photometric change (`_domain_shift`, lighting, blur, noise, texture) in `_shade`.
_MATERIALS: dict[str, Material] = {
    "sky": Material(SKY, (200, 215), (0.55, 0.8), (0.85, 1.0)),
    "road": Material(ROAD, (250, 275), (0.15, 0.3), (0.35, 0.5)),
    "marking": Material(ROAD, (50, 60), (0.0, 0.1), (0.85, 1.0)),
    "sidewalk": Material(SIDEWALK, (300, 320), (0.3, 0.5), (0.7, 0.85)),
    "facade": Material(BUILDING, (10, 40), (0.3, 0.6), (0.5, 0.8)),
    "window": Material(BUILDING, (190, 210), (0.3, 0.5), (0.3, 0.5)),
    "foliage": Material(VEGETATION, (95, 125), (0.7, 0.9), (0.45, 0.7)),
    "trunk": Material(VEGETATION, (25, 35), (0.6, 0.8), (0.3, 0.4)),
    "pole": Material(POLE, (0, 360), (0.0, 0.05), (0.55, 0.7)),
    "sign": Material(SIGN, (50, 60), (0.9, 1.0), (0.85, 1.0)),
    "light": Material(LIGHT, (30, 42), (0.85, 1.0), (0.8, 0.95)),
    "car": Material(CAR, (0, 360), (0.7, 1.0), (0.5, 0.9)),
    "glass": Material(CAR, (200, 220), (0.3, 0.5), (0.2, 0.35)),
    "tyre": Material(CAR, (0, 360), (0.0, 0.1), (0.05, 0.15)),
    "skin": Material(PERSON, (15, 30), (0.4, 0.6), (0.7, 0.9)),
    "cloth": Material(PERSON, (330, 360), (0.8, 1.0), (0.6, 0.9)),
    "bike": Material(BICYCLE, (150, 170), (0.8, 1.0), (0.5, 0.8)),
}

# per-class texture amplitudes (fine grain, coarse blotches) as a fraction of the colour
_TEXTURE: dict[str, dict[int, tuple[float, float]]] = {
    "source": {ROAD: (0.02, 0.05), SIDEWALK: (0.02, 0.05), BUILDING: (0.02, 0.06),
               VEGETATION: (0.05, 0.08), SKY: (0.0, 0.03)},
    "target": {ROAD: (0.08, 0.1), SIDEWALK: (0.06, 0.08), BUILDING: (0.05, 0.12),
               VEGETATION: (0.08, 0.1), SKY: (0.02, 0.06), CAR: (0.03, 0.05)},
}  # fmt: skip


class _Canvas:
    """An instance-id map plus the material of every instance; drawing order is painter's order."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.height, self.width, self.rng = height, width, rng
        self.ids = np.zeros((height, width), dtype=np.uint16)
        self.train_ids: list[int] = []
        self.colours: list[np.ndarray] = []

    def part(self, material: str) -> int:
        """Register one part with a freshly drawn colour of `material`; returns its instance id."""
        mat = _MATERIALS[material]
        h = self.rng.uniform(*mat.hue) % 360.0
        s, v = self.rng.uniform(*mat.sat), self.rng.uniform(*mat.val)
        self.train_ids.append(mat.train_id)
        self.colours.append(_hsv_to_rgb(h, s, v))
        return len(self.train_ids) - 1

    def _pid(self, material: str | int) -> int:
        """A new part of `material` (a name), or the existing part id `material` (an int)."""
        return self.part(material) if isinstance(material, str) else material

    def poly(self, material: str | int, pts: np.ndarray) -> int:
        pid = self._pid(material)
        cv2.fillPoly(self.ids, [np.round(pts).astype(np.int32)], pid)
        return pid

    def rect(self, material: str | int, x0: float, y0: float, x1: float, y1: float) -> int:
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        return self.poly(material, pts)

    def ellipse(self, material: str | int, cx: float, cy: float, rx: float, ry: float) -> int:
        pid = self._pid(material)
        axes = (max(1, round(rx)), max(1, round(ry)))
        cv2.ellipse(self.ids, (round(cx), round(cy)), axes, 0, 0, 360, pid, -1)
        return pid

    def line(self, material: str | int, p0, p1, thickness: float) -> int:
        pid = self._pid(material)
        p0i, p1i = (round(p0[0]), round(p0[1])), (round(p1[0]), round(p1[1]))
        cv2.line(self.ids, p0i, p1i, pid, max(1, round(thickness)))
        return pid


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    c = v * s
    x = c * (1 - abs((h / 60.0) % 2 - 1))
    m = v - c
    sector = int(h // 60) % 6
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][sector]
    return (np.array(rgb, dtype=np.float32) + m) * 255.0


@dataclass
class _Street:
    """Perspective frame: horizon row, vanishing column, road/sidewalk edges at the bottom row."""

    horizon: float
    vp_x: float
    road_l: float
    road_r: float
    walk_l: float
    walk_r: float
    bottom: float

    def x_at(self, edge: float, y: float) -> float:
        """Column of the line from the vanishing point to bottom column `edge`, at row `y`."""
        return self.vp_x + (edge - self.vp_x) * self.depth(y)

    def depth(self, y: float) -> float:
        """Perspective scale in (0, 1]: 1 at the bottom row, 0 at the horizon."""
        return (y - self.horizon) / (self.bottom - self.horizon)


def _layout(rng: np.random.Generator, h: int, w: int) -> _Street:
    horizon = h * rng.uniform(0.36, 0.5)
    vp_x = w * rng.uniform(0.35, 0.65)
    half = w * rng.uniform(0.35, 0.6)
    shift = w * rng.uniform(-0.15, 0.15)
    road_l, road_r = vp_x - half + shift, vp_x + half + shift
    walk = w * rng.uniform(0.3, 0.6)
    return _Street(horizon, vp_x, road_l, road_r, road_l - walk, road_r + walk, float(h))


def _draw_ground(cv: _Canvas, st: _Street) -> None:
    h, y0 = st.bottom, st.horizon
    vp = (st.vp_x, y0)
    far = 10.0  # extend the sidewalk edges well past the image so the wedge covers the corners
    left = (st.vp_x + (st.walk_l - st.vp_x) * far, y0 + (h - y0) * far)
    right = (st.vp_x + (st.walk_r - st.vp_x) * far, y0 + (h - y0) * far)
    cv.poly("sidewalk", np.array([vp, left, right]))
    cv.poly("road", np.array([vp, (st.road_l, h), (st.road_r, h)]))
    mark = cv.part("marking")
    mid = 0.5 * (st.road_l + st.road_r)
    for ta, tb in ((0.08, 0.14), (0.22, 0.33), (0.45, 0.62), (0.8, 1.05)):
        ya, yb = y0 + ta * (h - y0), y0 + tb * (h - y0)
        hw_a, hw_b = 0.012 * cv.width * ta, 0.012 * cv.width * tb
        xa, xb = st.x_at(mid, ya), st.x_at(mid, yb)
        cv.poly(
            mark, np.array([(xa - hw_a, ya), (xa + hw_a, ya), (xb + hw_b, yb), (xb - hw_b, yb)])
        )


def _draw_facades(cv: _Canvas, st: _Street, side: int) -> None:
    """Facades on one side (-1 left, +1 right) from the image border towards the vanishing point."""
    rng, w = cv.rng, cv.width
    edge = st.walk_l if side < 0 else st.walk_r
    far = st.vp_x + side * w * rng.uniform(0.03, 0.1)
    x = 0.0 if side < 0 else float(w)
    while (x - far) * side > 0:
        span = w * rng.uniform(0.12, 0.35)
        x_next = x - side * span
        if (x_next - far) * side < 0:
            x_next = far
        gap = rng.random() < 0.15
        rise = rng.uniform(0.6, 2.2)
        if not gap:
            xs = np.array([x, x_next])
            ground = st.horizon + (xs - st.vp_x) / (edge - st.vp_x) * (st.bottom - st.horizon)
            top = st.horizon - (ground - st.horizon) * rise - cv.height * rng.uniform(0.0, 0.08)
            cv.poly("facade", np.array([(xs[0], ground[0]), (xs[1], ground[1]),
                                        (xs[1], top[1]), (xs[0], top[0])]))  # fmt: skip
            _draw_windows(cv, xs, ground, top)
        x = x_next


def _draw_windows(cv: _Canvas, xs: np.ndarray, ground: np.ndarray, top: np.ndarray) -> None:
    rng = cv.rng
    if abs(xs[1] - xs[0]) < 12 or rng.random() < 0.2:
        return
    win = cv.part("window")
    cols, rows = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    for i in range(cols):
        u0, u1 = (i + 0.25) / cols, (i + 0.75) / cols
        xa, xb = xs[0] + (xs[1] - xs[0]) * u0, xs[0] + (xs[1] - xs[0]) * u1
        ga, gb = ground[0] + (ground[1] - ground[0]) * u0, ground[0] + (ground[1] - ground[0]) * u1
        ta, tb = top[0] + (top[1] - top[0]) * u0, top[0] + (top[1] - top[0]) * u1
        for j in range(rows):
            v0, v1 = (j + 0.3) / (rows + 0.5), (j + 0.75) / (rows + 0.5)
            pts = [(xa, ta + (ga - ta) * v0), (xb, tb + (gb - tb) * v0),
                   (xb, tb + (gb - tb) * v1), (xa, ta + (ga - ta) * v1)]  # fmt: skip
            cv.poly(win, np.array(pts))


def _draw_tree(cv: _Canvas, x: float, y: float, s: float) -> None:
    rng, h = cv.rng, cv.height
    height = h * 0.9 * s * rng.uniform(0.8, 1.2)
    cv.rect("trunk", x - 0.012 * h * s, y - height * 0.6, x + 0.012 * h * s, y)
    crown = cv.part("foliage")
    for _ in range(int(rng.integers(3, 6))):
        cx = x + rng.normal(0, 0.08) * height
        cy = y - height * rng.uniform(0.6, 0.9)
        r = height * rng.uniform(0.15, 0.28)
        cv.ellipse(crown, cx, cy, r, r * rng.uniform(0.8, 1.1))


def _draw_pole(cv: _Canvas, x: float, y: float, s: float) -> None:
    rng, h = cv.rng, cv.height
    height = h * 0.8 * s * rng.uniform(0.8, 1.1)
    top = y - height
    cv.line("pole", (x, y), (x, top), max(1.0, 0.02 * h * s))
    kind = rng.random()
    size = h * 0.13 * s
    if kind < 0.45:  # traffic sign: disc, triangle or plate
        shape = int(rng.integers(3))
        cy = top + size * 0.5
        if shape == 0:
            cv.ellipse("sign", x, cy, size * 0.5, size * 0.5)
        elif shape == 1:
            cv.poly(
                "sign", np.array([(x - size * 0.6, top), (x + size * 0.6, top), (x, top + size)])
            )
        else:
            cv.rect("sign", x - size * 0.6, top, x + size * 0.6, top + size * 0.8)
    elif kind < 0.75:  # traffic light: a box with three lamps
        box = cv.rect("light", x - size * 0.3, top, x + size * 0.3, top + size * 1.5)
        for k in range(3):
            cv.ellipse(box, x, top + size * (0.3 + 0.45 * k), size * 0.18, size * 0.18)


def _draw_car(cv: _Canvas, x: float, y: float, s: float) -> None:
    rng, w = cv.rng, cv.width
    cw = w * 0.28 * s * rng.uniform(0.8, 1.2)
    ch = cw * rng.uniform(0.35, 0.5)
    body = cv.rect("car", x - cw / 2, y - ch * 0.65, x + cw / 2, y - ch * 0.12)
    roof = np.array([(x - cw * 0.38, y - ch * 0.65), (x + cw * 0.38, y - ch * 0.65),
                     (x + cw * 0.28, y - ch), (x - cw * 0.28, y - ch)])  # fmt: skip
    cv.poly(body, roof)
    glass = cv.part("glass")
    cv.poly(
        glass,
        np.array(
            [
                (x - cw * 0.32, y - ch * 0.68),
                (x + cw * 0.32, y - ch * 0.68),
                (x + cw * 0.25, y - ch * 0.95),
                (x - cw * 0.25, y - ch * 0.95),
            ]
        ),
    )
    tyre = cv.part("tyre")
    for dx in (-0.3, 0.3):
        cv.ellipse(tyre, x + dx * cw, y - ch * 0.12, ch * 0.14, ch * 0.12)


def _draw_person(cv: _Canvas, x: float, y: float, s: float) -> None:
    rng, h = cv.rng, cv.height
    ph = h * 0.5 * s * rng.uniform(0.85, 1.15)
    cloth = cv.part("cloth")
    legs = cv.part("cloth")
    stride = ph * rng.uniform(0.0, 0.12)
    for dx in (-stride, stride):
        cv.line(legs, (x, y - ph * 0.45), (x + dx, y), max(1.0, ph * 0.07))
    cv.ellipse(cloth, x, y - ph * 0.62, ph * 0.11, ph * 0.2)
    cv.ellipse("skin", x, y - ph * 0.88, ph * 0.075, ph * 0.085)


def _draw_bicycle(cv: _Canvas, x: float, y: float, s: float) -> None:
    h = cv.height
    r = h * 0.1 * s
    bike = cv.part("bike")
    thick = max(1, round(0.25 * r))
    for dx in (-1.3 * r, 1.3 * r):
        cv2.circle(cv.ids, (round(x + dx), round(y - r)), max(1, round(r)), bike, thick)
    seat, bar = (x - 0.3 * r, y - 2.2 * r), (x + 1.0 * r, y - 2.4 * r)
    for p0, p1 in (
        ((x - 1.3 * r, y - r), seat),
        (seat, (x + 0.2 * r, y - r)),
        ((x + 0.2 * r, y - r), bar),
        (bar, (x + 1.3 * r, y - r)),
        (seat, bar),
    ):
        cv.line(bike, p0, p1, thick)


def _draw_objects(cv: _Canvas, st: _Street) -> None:
    """Trees, poles, cars, persons and bicycles, far to near so nearer ones occlude."""
    rng = cv.rng
    jobs: list[tuple[float, int, float]] = []  # (row, kind, column)

    def walk_point(side: int, t: float) -> tuple[float, float]:
        y = st.horizon + t * (st.bottom - st.horizon)
        road = st.x_at(st.road_l if side < 0 else st.road_r, y)
        outer = st.x_at(st.walk_l if side < 0 else st.walk_r, y)
        u = rng.uniform(0.4, 0.6)  # fraction of the way from road edge to sidewalk outer edge
        return road + (outer - road) * u, y

    counts = {0: rng.integers(1, 5), 1: rng.integers(1, 5), 3: rng.integers(0, 4)}
    for kind, n in counts.items():
        for _ in range(int(n)):
            x, y = walk_point(int(rng.choice((-1, 1))), rng.uniform(0.08, 1.0))
            jobs.append((y, kind, x))
    for _ in range(int(rng.integers(0, 4))):  # cars on the road
        y = st.horizon + rng.uniform(0.1, 1.05) * (st.bottom - st.horizon)
        lo, hi = st.x_at(st.road_l, y), st.x_at(st.road_r, y)
        jobs.append((y, 2, rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo))))
    if rng.random() < 0.35:  # bicycles are rare
        x, y = walk_point(int(rng.choice((-1, 1))), rng.uniform(0.3, 1.0))
        jobs.append((y, 4, x))
    draw = (_draw_tree, _draw_pole, _draw_car, _draw_person, _draw_bicycle)
    for y, kind, x in sorted(jobs):
        draw[kind](cv, x, y, max(st.depth(y), 0.05))


def render_labels(rng: np.random.Generator, height: int, width: int, domain: str) -> _Canvas:
    """Draw the scene geometry; the returned canvas holds instance ids, trainIds and colours."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    cv = _Canvas(height, width, rng)
    cv.part("sky")
    st = _layout(rng, height, width)
    _draw_facades(cv, st, -1)
    _draw_facades(cv, st, +1)
    _draw_ground(cv, st)
    _draw_objects(cv, st)
    return cv


def _noise_field(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise with blobs about `cell` pixels wide."""
    small = rng.standard_normal((max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _domain_shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The target's global colour change: a consistent hue rotation, duller colours, a cast."""
    hsv = cv2.cvtColor(np.clip(img / 255.0, 0, 1).astype(np.float32), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + TARGET_HUE_SHIFT + rng.uniform(-8, 8)) % 360.0
    hsv[..., 1] *= rng.uniform(0.55, 0.75)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    return rgb * rng.uniform(0.9, 1.1, size=3).astype(np.float32)


def _shade(cv: _Canvas, labels: np.ndarray, domain: str) -> np.ndarray:
    """Colour the instance map, add per-class texture, lighting, blur and noise; float32 RGB."""
    rng, h, w = cv.rng, cv.height, cv.width
    colours = np.stack(cv.colours)  # [P, 3]
    img = colours[cv.ids]  # [H, W, 3]
    fine_amp, coarse_amp = np.zeros(256, np.float32), np.zeros(256, np.float32)
    for cls, (fa, ca) in _TEXTURE[domain].items():
        fine_amp[cls], coarse_amp[cls] = fa, ca
    fine = rng.standard_normal((h, w)).astype(np.float32)
    coarse = _noise_field(rng, h, w, cell=max(4, w // 24))
    tex = 1.0 + fine_amp[labels] * fine + coarse_amp[labels] * coarse
    img *= tex[..., None]
    rows = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]  # [H, 1, 1]
    if domain == "source":
        img *= 1.0 + 0.1 * (rows - 0.5) * rng.uniform(-1, 1)
        return img
    img = _domain_shift(img, rng)
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.75, 0.9) + mean
    img *= rng.uniform(0.85, 1.1) * (1.0 - 0.2 * rows * rng.uniform(0, 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2.0
    img *= (1.0 - 0.15 * r2)[..., None]
    sigma = rng.uniform(0.4, 0.9)
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0.0, rng.uniform(2.0, 5.0), size=img.shape).astype(np.float32)
    return img


def render_scene(
    rng: np.random.Generator, height: int, width: int, domain: str
) -> tuple[np.ndarray, np.ndarray]:
    """Render one street scene of `domain` ("source" or "target").

    Returns:
        `(image_rgb, train_ids)`: uint8 `[H, W, 3]` RGB and uint8 `[H, W]` Cityscapes trainIds drawn
        from `SCENE_CLASSES` (255 = ignore, unused by the generator but valid in the format).
    """
    cv = render_labels(rng, height, width, domain)
    labels = np.asarray(cv.train_ids, dtype=np.uint8)[cv.ids]
    image = np.clip(_shade(cv, labels, domain), 0, 255).astype(np.uint8)
    return image, labels
