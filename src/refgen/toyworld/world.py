"""The toy world: procedurally drawn people in simple scenes, with captions.

Why it looks the way it does: every identity attribute has to be readable by a small CNN at 64x64
(the recognizer must reach >= 95% joint identity accuracy, or the benchmark measures noise), so the
attributes are big blocks of clearly separated colour and shape, never 1-pixel details. Eye colour
is left out on purpose: at 64 px an eye is one pixel.

Everything is a pure function of an integer seed (`random.Random(seed)`, PIL drawing, numpy with
fixed operations), so the same seed gives the same pixels on any machine.

Vocabulary
    identity  the attributes fixed for a person (skin, hair colour and style, face shape, glasses,
              shirt colour and pattern), see `ATTRIBUTES`
    state     what changes between photos of the same person (expression, arm pose), see `STATES`
    jitter    per-image noise: position, scale, lighting, small colour shifts, background details
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# vocabulary: value name -> RGB (colours) or just names (shapes). Order is the label order the
# recognizer uses, so append only.

SKIN = {"pale": (250, 222, 196), "tan": (222, 170, 118), "brown": (150, 98, 58), "dark": (84, 54, 36)}
HAIR_COLOR = {"black": (28, 28, 30), "brown": (118, 66, 28), "blonde": (240, 206, 88), "red": (208, 62, 28),
              "grey": (172, 172, 178)}
HAIR_STYLE = ("short", "long", "bun")
FACE_SHAPE = ("round", "square", "long")
GLASSES = ("none", "glasses", "sunglasses")
SHIRT_COLOR = {"red": (214, 40, 44), "green": (36, 160, 64), "blue": (40, 80, 214), "yellow": (238, 212, 40),
               "purple": (138, 50, 172)}
SHIRT_PATTERN = ("plain", "striped", "dotted")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skin": tuple(SKIN),
    "hair_color": tuple(HAIR_COLOR),
    "hair_style": HAIR_STYLE,
    "face_shape": FACE_SHAPE,
    "glasses": GLASSES,
    "shirt_color": tuple(SHIRT_COLOR),
    "shirt_pattern": SHIRT_PATTERN,
}
STATES: dict[str, tuple[str, ...]] = {
    "expression": ("neutral", "smiling", "surprised"),
    "pose": ("arms_down", "waving"),
}
SCENES: tuple[str, ...] = ("studio", "beach", "forest", "city", "sunset")

TROUSERS = (44, 48, 70)
MIN_SIZE = 32


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class IdentityAttributes:
    skin: str
    hair_color: str
    hair_style: str
    face_shape: str
    glasses: str
    shirt_color: str
    shirt_pattern: str

    def __post_init__(self):
        for k, allowed in ATTRIBUTES.items():
            _check(k, getattr(self, k), allowed)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IdentityAttributes:
        missing = [k for k in ATTRIBUTES if k not in d]
        if missing:
            raise ValueError(f"identity dict lacks attributes {missing}; got keys {sorted(d)}")
        return cls(**{k: d[k] for k in ATTRIBUTES})


@dataclass(frozen=True)
class State:
    expression: str = "neutral"
    pose: str = "arms_down"

    def __post_init__(self):
        for k, allowed in STATES.items():
            _check(k, getattr(self, k), allowed)


@dataclass(frozen=True)
class Person:
    identity: IdentityAttributes
    state: State
    x: float          # horizontal centre, fraction of the width
    scale: float      # body height, fraction of the image height
    color_seed: int   # per-image colour jitter of this person's paint


@dataclass(frozen=True)
class Scene:
    background: str
    people: tuple[Person, ...]      # always sorted left to right
    brightness: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    detail_seed: int = 0            # clouds, trees, windows: background jitter

    def __post_init__(self):
        _check("background", self.background, SCENES)
        if not 1 <= len(self.people) <= 2:
            raise ValueError(f"a scene holds 1 or 2 people, got {len(self.people)}")
        xs = [p.x for p in self.people]
        if xs != sorted(xs):
            raise ValueError(f"people must be ordered left to right, got x={xs}")

    def to_dict(self) -> dict:
        return {"background": self.background, "brightness": self.brightness, "tint": list(self.tint),
                "detail_seed": self.detail_seed,
                "people": [{"identity": p.identity.to_dict(), "state": dataclasses.asdict(p.state), "x": p.x,
                            "scale": p.scale, "color_seed": p.color_seed} for p in self.people]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        people = tuple(Person(IdentityAttributes.from_dict(p["identity"]), State(**p["state"]), p["x"], p["scale"],
                              p["color_seed"]) for p in d["people"])
        return cls(d["background"], people, d["brightness"], tuple(d["tint"]), d["detail_seed"])


# ---------------------------------------------------------------------------------------------
# sampling


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts; Python's hash() is salted per process, so no hash()."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def sample_identity(rng: random.Random) -> IdentityAttributes:
    return IdentityAttributes(**{k: rng.choice(v) for k, v in ATTRIBUTES.items()})


def identity_from_seed(seed: int) -> IdentityAttributes:
    """The identity called `seed_<seed>`: attributes are a pure function of the id."""
    return sample_identity(random.Random(derive_seed("identity", seed)))


def sample_state(rng: random.Random) -> State:
    return State(**{k: rng.choice(v) for k, v in STATES.items()})


def sample_scene(rng: random.Random, identities: list[IdentityAttributes] | None = None, *, n_people: int | None = None,
                 background: str | None = None, states: list[State] | None = None) -> Scene:
    """A scene with the given identities (or random ones) in the order given, left to right."""
    if identities is not None:
        n_people = len(identities)
    if n_people is None:
        n_people = 1 if rng.random() < 0.5 else 2
    if not 1 <= n_people <= 2:
        raise ValueError(f"n_people must be 1 or 2, got {n_people}")
    if identities is None:
        identities = [sample_identity(rng) for _ in range(n_people)]
    if states is None:
        states = [sample_state(rng) for _ in range(n_people)]
    if background is None:
        background = rng.choice(SCENES)
    if n_people == 1:
        xs = [rng.uniform(0.30, 0.70)]
        scales = [rng.uniform(0.74, 0.86)]
    else:
        # the two bodies never overlap, so both are fully visible and the order is unambiguous
        xs = [rng.uniform(0.24, 0.34), rng.uniform(0.66, 0.76)]
        scales = [rng.uniform(0.68, 0.80), rng.uniform(0.68, 0.80)]
    people = tuple(Person(i, s, x, sc, rng.getrandbits(31)) for i, s, x, sc in zip(identities, states, xs, scales))
    tint = tuple(rng.uniform(0.93, 1.07) for _ in range(3))
    return Scene(background, people, rng.uniform(0.85, 1.12), tint, rng.getrandbits(31))


def scene_from_seed(seed: int) -> Scene:
    return sample_scene(random.Random(derive_seed("scene", seed)))


# ---------------------------------------------------------------------------------------------
# drawing. Coordinates are in canvas pixels of a supersampled canvas (SS x the output size); the
# result is box-filtered down, which gives anti-aliased edges without any randomness.

SS = 4


def _jit(rgb, rng: random.Random, amount: int = 10) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)


def _draw_background(d: ImageDraw.ImageDraw, C: int, scene: Scene) -> None:
    rng = random.Random(scene.detail_seed)
    bg = scene.background
    if bg == "studio":
        top, bot = _jit((206, 206, 212), rng, 12), _jit((150, 150, 158), rng, 12)
        for y in range(C):
            t = y / (C - 1)
            d.line([(0, y), (C, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bot)))
    elif bg == "beach":
        horizon, shore = int(C * rng.uniform(0.40, 0.48)), int(C * rng.uniform(0.58, 0.64))
        d.rectangle([0, 0, C, horizon], fill=_jit((120, 190, 240), rng))
        d.rectangle([0, horizon, C, shore], fill=_jit((30, 110, 170), rng))
        d.rectangle([0, shore, C, C], fill=_jit((232, 212, 150), rng))
        for _ in range(rng.randint(1, 3)):
            cx, cy, r = rng.uniform(0, C), rng.uniform(0.05, 0.25) * C, rng.uniform(0.05, 0.09) * C
            d.ellipse([cx - 2 * r, cy - r, cx + 2 * r, cy + r], fill=(248, 248, 252))
    elif bg == "forest":
        d.rectangle([0, 0, C, C], fill=_jit((150, 200, 150), rng))
        for _ in range(rng.randint(5, 8)):
            cx, w = rng.uniform(0, C), rng.uniform(0.04, 0.07) * C
            d.rectangle([cx - w / 2, 0.25 * C, cx + w / 2, 0.8 * C], fill=_jit((96, 64, 36), rng))
            r = rng.uniform(0.12, 0.18) * C
            d.ellipse([cx - r, 0.25 * C - r, cx + r, 0.25 * C + r], fill=_jit((30, 100, 40), rng))
        d.rectangle([0, 0.78 * C, C, C], fill=_jit((70, 130, 50), rng))
    elif bg == "city":
        d.rectangle([0, 0, C, C], fill=_jit((150, 190, 225), rng))
        x = -rng.uniform(0, 0.1) * C
        while x < C:
            w, h = rng.uniform(0.14, 0.24) * C, rng.uniform(0.35, 0.7) * C
            col = _jit((96, 100, 112), rng, 20)
            d.rectangle([x, C - h, x + w, C], fill=col)
            for wy in np.arange(C - h + 0.04 * C, 0.8 * C, 0.08 * C):
                for wx in np.arange(x + 0.03 * C, x + w - 0.05 * C, 0.07 * C):
                    d.rectangle([wx, wy, wx + 0.03 * C, wy + 0.035 * C], fill=(232, 222, 140))
            x += w + rng.uniform(0.0, 0.04) * C
        d.rectangle([0, 0.82 * C, C, C], fill=_jit((74, 74, 80), rng))
    elif bg == "sunset":
        top, bot = _jit((70, 40, 110), rng, 12), _jit((250, 140, 60), rng, 12)
        for y in range(C):
            t = min(1.0, y / (0.7 * C))
            d.line([(0, y), (C, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bot)))
        sx, r = rng.uniform(0.2, 0.8) * C, 0.1 * C
        d.ellipse([sx - r, 0.62 * C - r, sx + r, 0.62 * C + r], fill=(255, 214, 90))
        d.rectangle([0, 0.7 * C, C, C], fill=_jit((60, 36, 50), rng))


def _face_geometry(shape: str, cx: float, hy: float, r: float) -> tuple[list[float], str]:
    """(bounding box, drawing kind) of the face. Widths at 64 px (r is about 7 px): round 2r, square
    2.4r, long 1.3r; heights: round and square 2r, long 2.6r."""
    if shape == "round":
        return [cx - r, hy - r, cx + r, hy + r], "ellipse"
    if shape == "square":
        return [cx - 1.2 * r, hy - r, cx + 1.2 * r, hy + r], "box"
    return [cx - 0.65 * r, hy - 1.15 * r, cx + 0.65 * r, hy + 1.45 * r], "ellipse"


def _draw_face_shape(d: ImageDraw.ImageDraw, kind: str, box: list[float], fill) -> None:
    if kind == "box":
        d.rounded_rectangle(box, radius=0.06 * (box[2] - box[0]), fill=fill)
    else:
        d.ellipse(box, fill=fill)


def _draw_clipped(d: ImageDraw.ImageDraw, kind: str, box: list[float], fill, y_max: float) -> None:
    """The part of the shape (ellipse or box) above the line y = y_max."""
    x0, y0, x1, y1 = box
    if kind == "box":
        d.rounded_rectangle([x0, y0, x1, y_max], radius=0.06 * (x1 - x0), fill=fill)
        return
    # ellipse above a horizontal line: a chord between the two points where the line crosses it
    b = (y1 - y0) / 2  # vertical semi-axis
    cy = (y0 + y1) / 2
    t = max(-1.0, min(1.0, (y_max - cy) / b))
    ang = np.degrees(np.arcsin(t))      # PIL angles: 0 = 3 o'clock, clockwise (y down)
    d.chord(box, 180 - ang, 360 + ang, fill=fill)


@dataclass(frozen=True)
class _Body:
    """Where one person's parts go on the C x C canvas, and their colours (jittered per person)."""
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    H: float                            # body height
    cx: float                           # body centre x
    foot: float
    r: float                            # head radius
    hy: float                           # head centre y
    neck: float
    torso_b: float                      # torso bottom
    tw: float                           # torso half width
    arm_w: float
    face_box: list[float]
    face_kind: str
    fw: float                           # face half width


def _body(C: int, p: Person) -> _Body:
    rng = random.Random(p.color_seed)
    ident = p.identity
    skin = _jit(SKIN[ident.skin], rng, 8)
    hair = _jit(HAIR_COLOR[ident.hair_color], rng, 8)
    shirt = _jit(SHIRT_COLOR[ident.shirt_color], rng, 8)
    H = p.scale * C
    cx, foot = p.x * C, 0.97 * C
    top = foot - H
    r = 0.145 * H                       # big, so face/hair/glasses survive 64 px
    hy = top + 0.06 * H + r             # room above for the bun
    neck = hy + r
    # face silhouette: the three shapes differ by several output pixels in width and height
    # (round: circle of radius r; square: wide box with hard corners; long: tall narrow oval)
    face_box, face_kind = _face_geometry(ident.face_shape, cx, hy, r)
    return _Body(skin, hair, shirt, H, cx, foot, r, hy, neck, torso_b=neck + 0.40 * H, tw=0.22 * H,
                 arm_w=0.075 * H, face_box=face_box, face_kind=face_kind, fw=(face_box[2] - face_box[0]) / 2)


def _draw_legs(d: ImageDraw.ImageDraw, b: _Body) -> None:
    leg_w = 0.09 * b.H
    for s in (-1, 1):
        lx = b.cx + s * 0.55 * leg_w
        d.rectangle([lx - leg_w / 2, b.torso_b - 0.02 * b.H, lx + leg_w / 2, b.foot], fill=TROUSERS)


def _draw_arms(d: ImageDraw.ImageDraw, b: _Body, pose: str) -> None:
    H = b.H
    for s in (-1, 1):
        sx, sy = b.cx + s * (b.tw - 0.3 * b.arm_w), b.neck + 0.05 * H
        if pose == "waving" and s == 1:
            ex, ey = sx + 0.16 * H, sy - 0.26 * H
        else:
            ex, ey = sx + s * 0.07 * H, sy + 0.36 * H
        d.line([(sx, sy), (ex, ey)], fill=b.shirt, width=int(b.arm_w))
        d.ellipse([ex - 0.045 * H, ey - 0.045 * H, ex + 0.045 * H, ey + 0.045 * H], fill=b.skin)


def _draw_torso(d: ImageDraw.ImageDraw, b: _Body, pattern: str) -> None:
    H = b.H
    box = [b.cx - b.tw, b.neck - 0.02 * H, b.cx + b.tw, b.torso_b]
    d.rounded_rectangle(box, radius=0.06 * H, fill=b.shirt)
    patt = (250, 250, 250)
    if pattern == "striped":
        period = 0.095 * H
        y = box[1] + 0.5 * period
        while y + 0.45 * period <= box[3]:
            d.rectangle([box[0] + 0.02 * H, y, box[2] - 0.02 * H, y + 0.45 * period], fill=patt)
            y += period
    elif pattern == "dotted":
        step, dr = 0.11 * H, 0.028 * H
        for iy, y in enumerate(np.arange(box[1] + 0.6 * step, box[3] - 0.3 * step, step)):
            off = 0.5 * step * (iy % 2)
            for x in np.arange(box[0] + 0.5 * step + off, box[2] - 0.3 * step, step):
                d.ellipse([x - dr, y - dr, x + dr, y + dr], fill=patt)


def _draw_long_hair_locks(d: ImageDraw.ImageDraw, b: _Body) -> None:
    """Two locks falling in front of the shoulders down to the chest."""
    r, lw = b.r, 0.42 * b.r
    for sgn in (-1, 1):
        x_in, x_out = b.cx + sgn * (b.fw - 0.05 * r), b.cx + sgn * (b.fw + 0.42 * r)
        d.rectangle([min(x_in, x_out), b.hy, max(x_in, x_out), b.neck + 0.2 * b.H], fill=b.hair)
        d.ellipse([min(x_in, x_out), b.neck + 0.2 * b.H - lw / 2, max(x_in, x_out), b.neck + 0.2 * b.H + lw / 2],
                  fill=b.hair)


def _draw_head(d: ImageDraw.ImageDraw, b: _Body, hair_style: str) -> None:
    """Neck, face, and the hair on top of the head (all styles): a cap that follows the face outline, covering
    only its top, so the silhouette of the face stays visible; a big bun sits clearly above the head."""
    cx, r, face_box = b.cx, b.r, b.face_box
    d.rectangle([cx - 0.35 * r, b.hy + 0.6 * r, cx + 0.35 * r, b.neck + 0.1 * r], fill=b.skin)
    _draw_face_shape(d, b.face_kind, face_box, b.skin)
    cap_bottom = face_box[1] + 0.55 * r
    m = 0.1 * r
    cap_box = [face_box[0] - m, face_box[1] - m, face_box[2] + m, face_box[3] + m]
    _draw_clipped(d, b.face_kind, cap_box, b.hair, cap_bottom)
    if hair_style == "bun":
        br = 0.62 * r
        by = face_box[1] - 0.75 * br
        d.ellipse([cx - br, by - br, cx + br, by + br], fill=b.hair)


def _draw_eyes(d: ImageDraw.ImageDraw, b: _Body, glasses: str) -> None:
    cx, r = b.cx, b.r
    ey, ex = b.hy + 0.05 * r, 0.42 * r
    if glasses == "sunglasses":
        d.rounded_rectangle([cx - 0.95 * r, ey - 0.28 * r, cx + 0.95 * r, ey + 0.3 * r], radius=0.12 * r,
                            fill=(12, 12, 14))
        return
    for s in (-1, 1):
        er = 0.11 * r
        d.ellipse([cx + s * ex - er, ey - er, cx + s * ex + er, ey + er], fill=(20, 20, 24))
    if glasses == "glasses":
        gr, gw = 0.34 * r, max(1, int(0.16 * r))
        for s in (-1, 1):
            d.ellipse([cx + s * ex - gr, ey - gr, cx + s * ex + gr, ey + gr], outline=(20, 20, 26), width=gw)
        d.line([(cx - ex + gr, ey), (cx + ex - gr, ey)], fill=(20, 20, 26), width=gw)


def _draw_mouth(d: ImageDraw.ImageDraw, b: _Body, expression: str) -> None:
    cx, r = b.cx, b.r
    my, mw = b.hy + 0.55 * r, 0.35 * r
    mouth = (120, 30, 40)
    if expression == "neutral":
        d.line([(cx - mw, my), (cx + mw, my)], fill=mouth, width=max(1, int(0.1 * r)))
    elif expression == "smiling":
        d.arc([cx - mw, my - 0.35 * r, cx + mw, my + 0.15 * r], 20, 160, fill=mouth, width=max(1, int(0.12 * r)))
    else:
        d.ellipse([cx - 0.16 * r, my - 0.2 * r, cx + 0.16 * r, my + 0.2 * r], fill=mouth)


def _draw_person(d: ImageDraw.ImageDraw, C: int, p: Person) -> None:
    """Back to front: legs, long hair's mane, arms (under the shirt at the shoulder), torso, long hair's locks,
    head, eyes, mouth."""
    ident, b = p.identity, _body(C, p)
    _draw_legs(d, b)
    if ident.hair_style == "long":  # a mane behind the head, wider than any face, down to the shoulders
        d.rounded_rectangle([b.cx - b.fw - 0.42 * b.r, b.hy - 1.12 * b.r, b.cx + b.fw + 0.42 * b.r,
                             b.neck + 0.3 * b.r], radius=0.5 * b.r, fill=b.hair)
    _draw_arms(d, b, p.state.pose)
    _draw_torso(d, b, ident.shirt_pattern)
    if ident.hair_style == "long":
        _draw_long_hair_locks(d, b)
    _draw_head(d, b, ident.hair_style)
    _draw_eyes(d, b, ident.glasses)
    _draw_mouth(d, b, p.state.expression)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """RGB image of `scene`, `size` x `size` pixels. Same scene -> same pixels."""
    return _render(scene, size, scene.people)


def person_masks(scene: Scene, size: int = 64) -> np.ndarray:
    """(n_people, size, size) bool: the pixels of `render(scene, size)` that change when that person is left out,
    i.e. where the person is drawn (their anti-aliased edge included). People never overlap, so the masks are
    disjoint up to the edge pixels where two bodies come close."""
    full = np.asarray(render(scene, size), dtype=np.int16)
    return np.stack([np.abs(full - np.asarray(_render(scene, size, scene.people[:k] + scene.people[k + 1:]),
                                              dtype=np.int16)).max(-1) > 0 for k in range(len(scene.people))])


def _render(scene: Scene, size: int, people: tuple[Person, ...]) -> Image.Image:
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} px, got {size}")
    C = size * SS
    img = Image.new("RGB", (C, C))
    d = ImageDraw.Draw(img)
    _draw_background(d, C, scene)
    for p in people:
        _draw_person(d, C, p)
    img = img.reduce(SS)  # box filter: exact, deterministic anti-aliasing
    a = np.asarray(img, dtype=np.float32) * (scene.brightness * np.asarray(scene.tint, dtype=np.float32))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# captions

ARTICLE_NOUNS = ("person", "person", "man", "woman", "someone")  # generic words; gender is not drawn
SCENE_PHRASES = {
    "studio": ("in a studio", "against a plain studio backdrop", "in a photo studio"),
    "beach": ("on a beach", "at the beach", "by the sea"),
    "forest": ("in a forest", "among the trees", "in the woods"),
    "city": ("in the city", "on a city street", "in front of buildings"),
    "sunset": ("at sunset", "under a sunset sky", "in the evening light"),
}
OPENERS = ("a photo of", "an image of", "a picture of", "a drawing of", "")
EXPRESSION_WORDS = {"neutral": "", "smiling": "smiling", "surprised": "looking surprised"}
POSE_WORDS = {"arms_down": "", "waving": "waving"}
DESCRIBE_KEYS = ("hair", "face_shape", "glasses", "shirt", "skin")  # hair = colour + style, shirt = colour + pattern


def describe_person(ident: IdentityAttributes, state: State | None, rng: random.Random, *, n_attrs: int | None = None,
                    noun: str = "person") -> str:
    """'a person with long blonde hair and glasses, wearing a red striped shirt'. n_attrs attributes
    (random subset, 0 = just 'a person') so the model learns every attribute on its own and the
    bare phrase, where an identity will later be injected."""
    keys = list(DESCRIBE_KEYS)
    if n_attrs is None:
        n_attrs = rng.randint(0, len(keys))
    chosen = set(rng.sample(keys, min(n_attrs, len(keys))))
    withs, wearing = [], []
    if "skin" in chosen:
        withs.append(f"{ident.skin} skin")
    if "hair" in chosen:
        style = {"short": "short", "long": "long", "bun": "tied in a bun"}[ident.hair_style]
        withs.append(f"{style} {ident.hair_color} hair" if ident.hair_style != "bun"
                     else f"{ident.hair_color} hair {style}")
    if "face_shape" in chosen:
        withs.append(f"a {ident.face_shape} face")
    if "glasses" in chosen:
        withs.append({"none": "no glasses", "glasses": "glasses", "sunglasses": "sunglasses"}[ident.glasses])
    if "shirt" in chosen:
        patt = "" if ident.shirt_pattern == "plain" else f"{ident.shirt_pattern} "
        wearing.append(f"a {ident.shirt_color} {patt}shirt")
    rng.shuffle(withs)
    s = noun if noun == "someone" else f"a {noun}"
    if withs:
        s += " with " + (withs[0] if len(withs) == 1 else ", ".join(withs[:-1]) + " and " + withs[-1])
    if wearing:
        s += (", wearing " if withs else " wearing ") + wearing[0]
    if state is not None:
        extra = [w for w in (EXPRESSION_WORDS[state.expression], POSE_WORDS[state.pose]) if w and rng.random() < 0.5]
        if extra:
            s += ", " + " and ".join(extra)
    return s


# Two-person phrasings, each naming the people left to right (so "A and B" means A on the left). The
# model learns the order from every one of them, so prompts users actually write ("~ID~ and ~ID~ on a
# beach", "~ID~ next to ~ID~") draw two people in order, not one blended person.
PAIR_FORMS = (
    "two people {where}: on the left, {a}; on the right, {b}",
    "{a} on the left and {b} on the right, {where}",
    "{a} and {b} {where}",
    "{a} next to {b} {where}",
    "two people {where}, {a} and {b}",
)


def caption(scene: Scene, rng: random.Random, *, p_bare: float = 0.25, p_full: float = 0.0) -> str:
    """A caption for `scene`; people are always mentioned left to right.

    With probability p_bare a person is described with no attribute at all ('a person'): the
    placeholder-free phrasing identity injection builds on must map to 'any person'. Of the others, a
    share p_full is described with all 7 identity attributes (the full descriptions the caption
    ceiling is measured with); the rest with a random subset.
    """
    descs = []
    for p in scene.people:
        u = rng.random()
        n = 0 if u < p_bare else (len(DESCRIBE_KEYS) if u < p_bare + (1 - p_bare) * p_full else None)
        descs.append(describe_person(p.identity, p.state, rng, n_attrs=n, noun=rng.choice(ARTICLE_NOUNS)))
    where = rng.choice(SCENE_PHRASES[scene.background])
    opener = rng.choice(OPENERS)
    if len(descs) == 1:
        body = f"{descs[0]} {where}"
    else:
        body = rng.choice(PAIR_FORMS).format(a=descs[0], b=descs[1], where=where)
    text = f"{opener} {body}" if opener else body
    return text[0].upper() + text[1:] + "."


def full_description(ident: IdentityAttributes) -> str:
    """'a person with ..., wearing ...': all 7 identity attributes in words, in a fixed order, no state.
    The words a caption-ceiling prompt puts where an identity prompt has `~ID~`."""
    return describe_person(ident, None, random.Random(0), n_attrs=len(DESCRIBE_KEYS))


def sample(seed: int, size: int = 64) -> tuple[Image.Image, Scene, str]:
    """(image, scene, caption) for one training example; a pure function of (seed, size)."""
    scene = scene_from_seed(seed)
    return render(scene, size), scene, caption(scene, random.Random(derive_seed("caption", seed)))


def template_texts() -> list[str]:
    """Every word the captions can use, so a tokenizer trained on a caption sample never meets an
    unseen word (byte-level BPE would still encode it, only with more tokens)."""
    words = []
    for v in list(ATTRIBUTES.values()) + list(STATES.values()):
        words += list(v)
    for v in SCENE_PHRASES.values():
        words += list(v)
    words += list(OPENERS) + list(ARTICLE_NOUNS) + list(EXPRESSION_WORDS.values()) + list(POSE_WORDS.values())
    words += ["a person with", "skin", "hair", "tied in a bun", "face", "no glasses", "shirt", "wearing",
              "two people", "on the left", "on the right", "and"]
    return [w for w in words if w]


__all__ = ["ATTRIBUTES", "STATES", "SCENES", "IdentityAttributes", "State", "Person", "Scene", "derive_seed",
           "sample_identity", "identity_from_seed", "sample_state", "sample_scene", "scene_from_seed", "render",
           "describe_person", "caption", "sample", "template_texts"]
