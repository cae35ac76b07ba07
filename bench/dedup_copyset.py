"""A labelled copy-detection set built from real images on this machine, for bench_dedup.py.

Families: one original plus copies made with the edits of the issue (resize 0.3-0.8, JPEG q20-80, crops
keeping 60-90 % of the area, horizontal flip, grayscale, colour jitter, text overlay, borders, rotation up
to 10 degrees, blur), one to three edits per copy. Every edit type occurs in every family.

Originals come from two kinds of real image:
- photos (Debian's mate-backgrounds and ukui-wallpapers when installed, scikit-image's bundled photos):
  each photo is cut into a 2 x 2 grid of regions separated by gaps of 8 % of the photo, and each region
  is one family's original. Hard negatives, defined: two regions of one photo share the camera, light,
  colours and textures but not a single pixel, so an image of one region's family and an image of another
  region's family are NOT copies, though a global descriptor finds them alike.
- clipart (Debian's openclipart-png; openclipart-svg, when installed, screens out broken renders): one
  drawing per family.
Distractors: further clipart and Dungeon Crawl tiles (crawl-tiles-data), unedited singletons.
"""

from __future__ import annotations

import glob
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

EDITS = ("resize", "jpeg", "crop", "hflip", "grayscale", "jitter", "text", "border", "rotate", "blur")
WORDS = ("SALE", "copyright", "hello world", "meme", "lol", "2024", "photo by me", "wow", "watermark", "share")


@dataclass
class CopySet:
    root: Path
    family: dict[str, int] = field(default_factory=dict)  # relpath -> family id (-1: distractor)
    source: dict[int, str] = field(default_factory=dict)  # family id -> source photo/clipart path
    edits: dict[str, list[str]] = field(default_factory=dict)  # relpath -> edits applied


def photo_paths() -> list[str]:
    import skimage

    # Real photographs only: mate-backgrounds' nature set and scikit-image's photos. (Other wallpaper
    # packages hold smooth vector renders whose regions are blank gradients nobody could tell apart.)
    paths = sorted(glob.glob("/usr/share/backgrounds/mate/nature/*.jpg"))
    sk = Path(skimage.__file__).parent / "data"
    paths += [str(sk / n) for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                    "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg")]
    return [p for p in paths if Path(p).exists()]


def clipart_paths() -> list[str]:
    return sorted(glob.glob("/usr/share/openclipart/png/**/*.png", recursive=True))


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except (OSError, Image.DecompressionBombError):  # unreadable or absurdly large drawing
            continue
    return ImageFont.load_default(size=size)


def apply_edit(img: Image.Image, edit: str, rng: random.Random) -> Image.Image:
    w, h = img.size
    if edit == "resize":
        s = rng.uniform(0.3, 0.8)
        return img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.Resampling.BICUBIC)
    if edit == "jpeg":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=rng.randint(20, 80))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if edit == "crop":
        area = rng.uniform(0.6, 0.9)
        aspect = rng.uniform(0.8, 1.25)
        cw = min(w, round(w * np.sqrt(area * aspect)))
        ch = min(h, round(area * w * h / cw))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return img.crop((x, y, x + cw, y + ch))
    if edit == "hflip":
        return ImageOps.mirror(img)
    if edit == "grayscale":
        return ImageOps.grayscale(img).convert("RGB")
    if edit == "jitter":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.7))
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(-25, 25)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    if edit == "text":
        img = img.copy()
        d = ImageDraw.Draw(img)
        size = max(8, round(h * rng.uniform(0.06, 0.15)))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        d.text((rng.randint(0, max(1, w // 3)), rng.randint(0, max(1, h - size - 1))), rng.choice(WORDS),
               fill=colour, font=_font(size))
        return img
    if edit == "border":
        b = round(max(w, h) * rng.uniform(0.05, 0.2))
        return ImageOps.expand(img, border=b, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    if edit == "rotate":
        angle = rng.choice((-1, 1)) * rng.uniform(2, 10)
        return img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=rng.random() < 0.5,
                          fillcolor=(0, 0, 0))
    if edit == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0) * max(w, h) / 500))
    raise ValueError(edit)


def _photo_regions(path: str, side: int) -> list[Image.Image]:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    cols = 3 if w >= 1600 else 2  # large photos give 3 x 2 regions, others 2 x 2
    gx, gy = round(0.08 * w), round(0.08 * h)  # gaps: no pixel is shared between two regions
    rw, rh = (w - (cols - 1) * gx) // cols, (h - gy) // 2
    out = []
    for r in range(2):
        for c in range(cols):
            x, y = c * (rw + gx), r * (rh + gy)
            reg = img.crop((x, y, x + rw, y + rh))
            s = side / max(reg.size)
            out.append(reg.resize((round(reg.width * s), round(reg.height * s)), Image.Resampling.LANCZOS))
    return out


def _clipart(path: str, side: int) -> Image.Image:
    img = Image.open(path)
    img.load()
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    s = side / max(img.size)
    return img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.Resampling.LANCZOS)


def _informative(img: Image.Image) -> bool:
    # An almost blank drawing or region (a single line, a white square, clear sky) is no one's
    # copy-detection test case.
    return float(np.asarray(img.convert("L")).std()) > 20


def _thumb(img: Image.Image) -> np.ndarray:
    t = np.asarray(img.convert("L").resize((16, 16), Image.Resampling.BILINEAR), np.float32).reshape(-1)
    t -= t.mean()
    return t / (np.linalg.norm(t) + 1e-6)


_EXTERNAL_IMAGE = re.compile(rb'<image\b[^>]*?href="(?!data:)')


def _links_missing_image(path: str) -> bool:
    """True when the drawing's SVG (openclipart-svg, when installed) links an external bitmap.

    Those links are not shipped, so the PNG render shows a "Linked Image Not Found" placeholder: every
    such drawing shares that placeholder, i.e. they are genuine partial copies of each other.
    """
    svg = Path(path.replace("/openclipart/png/", "/openclipart/svg/")).with_suffix(".svg")
    try:
        return bool(_EXTERNAL_IMAGE.search(svg.read_bytes()))
    except OSError:
        return False


def _series(path: str) -> str:
    """The series of a drawing: its folder, cut to three levels below openclipart's png/ root."""
    parts = Path(path).parent.parts
    if "png" in parts:
        parts = parts[parts.index("png") + 1:]
    return "/".join(parts[:3])


class _Screen:
    """Rejects a source that is a recoloured variant of one already taken.

    openclipart holds the same drawing in several colours (pins, flags, buttons). Those are genuine
    copies of each other, so two of them in different families or as distractors would be mislabelled.
    A 16 x 16 grey thumbnail correlation above 0.9 marks them (this screen uses no part of the
    method under test).

    openclipart also keeps series in one folder tree (card decks under recreation/games/cards, an icon
    theme under computer/icons/<theme>) whose members share drawn elements (corner pips and frames, a
    document template): at most one drawing per series is taken (see _series).
    """

    def __init__(self) -> None:
        self.thumbs: list[np.ndarray] = []
        self.folders: set[str] = set()

    def accept(self, img: Image.Image, path: str | None = None) -> bool:
        if path is not None:
            folder = _series(path)
            if folder in self.folders or _links_missing_image(path):
                return False
        t = _thumb(img)
        if self.thumbs and float(np.max(np.stack(self.thumbs) @ t)) > 0.9:
            return False
        self.thumbs.append(t)
        if path is not None:
            self.folders.add(_series(path))
        return True


def build(root: Path, *, photos: int = 30, cliparts: int = 60, copies: int = 7, distractors: int = 100,
          side: int = 512, seed: int = 0) -> CopySet:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    cs = CopySet(root)
    originals: list[tuple[Image.Image, str]] = []
    screen = _Screen()
    for p in photo_paths()[:photos]:
        originals += [(reg, p) for reg in _photo_regions(p, side) if _informative(reg)]
    clip = clipart_paths()
    rng.shuffle(clip)
    used = 0
    pick = iter(clip)
    while used < cliparts:
        p = next(pick, None)
        if p is None:
            break
        try:
            img = _clipart(p, side)
        except (OSError, Image.DecompressionBombError):  # unreadable or absurdly large drawing
            continue
        if _informative(img) and screen.accept(img, p):
            originals.append((img, p))
            used += 1
    for fam, (orig, src) in enumerate(originals):
        cs.source[fam] = src
        name = f"f{fam:04d}_orig.png"
        orig.save(root / name)
        cs.family[name], cs.edits[name] = fam, []
        # every edit appears once as the first edit of some copy; further edits are random extras
        firsts = rng.sample(EDITS, k=min(copies, len(EDITS)))
        while len(firsts) < copies:
            firsts.append(rng.choice(EDITS))
        for c, first in enumerate(firsts):
            extra = rng.sample([e for e in EDITS if e != first], k=rng.choice((0, 1, 2)))
            img, applied = orig, []
            for e in [first] + extra:
                img = apply_edit(img, e, rng)
                applied.append(e)
            name = f"f{fam:04d}_c{c}.jpg"
            img.convert("RGB").save(root / name, quality=90)
            cs.family[name], cs.edits[name] = fam, applied
    extra = [p for p in pick][: distractors * 20]
    tiles = sorted(glob.glob("/usr/share/crawl/**/*.png", recursive=True))
    n = 0
    for p in extra + tiles:
        if n >= distractors:
            break
        try:
            img = _clipart(p, side if p in extra else 128)
        except (OSError, Image.DecompressionBombError):  # unreadable or absurdly large drawing
            continue
        if not _informative(img) or not screen.accept(img, p):
            continue
        name = f"d{n:04d}.png"
        img.save(root / name)
        cs.family[name], cs.edits[name] = -1, []
        n += 1
    (root.parent / (root.name + "_labels.json")).write_text(json.dumps(
        {"family": cs.family, "edits": cs.edits, "source": cs.source}, indent=0))
    return cs
