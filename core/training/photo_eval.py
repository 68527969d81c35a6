"""Real photographs that ship inside installed packages, with plain English labels.

Two sets of 16 images x 16 labels, for the zero-shot image tower:

- ``HELD_OUT``: the user-level check (cat, coffee, rocket, motorcycle, ...), whole
  photographs from scikit-image's ``skimage/data`` (public domain / CC0, see its
  README.txt) and scikit-learn's ``load_sample_images`` (china, flower). Nothing
  was tuned on these.
- ``CALIBRATION``: what the zero-shot choices (templates, synonyms, temperatures)
  were tuned on: the remaining ``skimage/data`` photographs plus crops of held-out
  photographs that show something else (the flag, the shuttle and the helmet
  beside the astronaut, the tripod under the camera, a roof, two coins, petals).
  The crops share source files with the held-out set, a leak that is stated here
  rather than hidden; the set has its own labels and none in common with the
  held-out one ("a coin" is close to "coins", though).

Pure data: no model code, nothing downloaded.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Photo:
    source: str  # "skimage:<file>" or "sklearn:<file>"
    label: str  # the right answer among the set's labels
    box: tuple[int, int, int, int] | None = None  # crop (left, top, right, bottom), pixels


HELD_OUT = (
    Photo("skimage:astronaut.png", "an astronaut"),
    Photo("skimage:chelsea.png", "a cat"),
    Photo("skimage:coffee.png", "a cup of coffee"),
    Photo("skimage:rocket.jpg", "a rocket"),
    Photo("skimage:motorcycle_left.png", "a motorcycle"),
    Photo("skimage:hubble_deep_field.jpg", "galaxies in deep space"),
    Photo("skimage:moon.png", "the moon"),
    Photo("skimage:coins.png", "coins"),
    Photo("skimage:camera.png", "a man with a camera"),
    Photo("skimage:page.png", "a page of text"),
    Photo("skimage:horse.png", "a horse"),
    Photo("sklearn:china.jpg", "a temple"),
    Photo("sklearn:flower.jpg", "a flower"),
    Photo("skimage:brick.png", "a brick wall"),
    Photo("skimage:grass.png", "grass"),
    Photo("skimage:retina.jpg", "an eye"),
)

CALIBRATION = (
    Photo("skimage:gravel.png", "gravel"),
    Photo("skimage:ihc.png", "stained tissue under a microscope"),
    Photo("skimage:cell.png", "a cell"),
    Photo("skimage:logo.png", "a logo"),
    Photo("skimage:text.png", "handwriting"),
    Photo("skimage:color.png", "a colour wheel"),
    Photo("skimage:clock_motion.png", "a clock"),
    Photo("skimage:microaneurysms.png", "blood vessels"),
    Photo("skimage:lfw_subset.npy", "a face"),
    Photo("skimage:astronaut.png", "a flag", (0, 0, 130, 260)),
    Photo("skimage:astronaut.png", "a space shuttle", (380, 0, 512, 230)),
    Photo("skimage:camera.png", "a tripod", (260, 300, 420, 512)),
    Photo("skimage:astronaut.png", "a helmet", (370, 330, 512, 512)),
    Photo("sklearn:china.jpg", "a roof", (0, 0, 640, 200)),
    Photo("skimage:coins.png", "a coin", (10, 10, 110, 110)),
    Photo("sklearn:flower.jpg", "petals", (0, 0, 320, 427)),
)


def _package_dir(module: str) -> str:
    mod = __import__(module, fromlist=["__file__"])
    return os.path.dirname(mod.__file__)


def load_photo(p: Photo) -> Image.Image:
    """The photograph as an RGB PIL image (grey ones repeated over three channels)."""
    kind, name = p.source.split(":", 1)
    if kind == "skimage":
        path = os.path.join(_package_dir("skimage.data"), name)
        if name.endswith(".npy"):  # 200 faces of 25x25 in [0, 1]: take the first
            face = np.load(path)[0]
            img = Image.fromarray((face * 255).astype(np.uint8)).resize((100, 100))
        else:
            img = Image.open(path)
    else:
        img = Image.open(os.path.join(_package_dir("sklearn.datasets"), "images", name))
    img = img.convert("RGB")
    return img.crop(p.box) if p.box else img


def photo_bytes(p: Photo, fmt: str = "PNG") -> bytes:
    """As a producer would send it: encoded bytes."""
    buf = io.BytesIO()
    load_photo(p).save(buf, format=fmt)
    return buf.getvalue()


def labels_of(photos: tuple[Photo, ...]) -> list[str]:
    return [p.label for p in photos]
