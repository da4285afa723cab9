"""Builds configs/sample_corpus/ from images shipped in packages (offline).

Sources (extract them first):
  scikit-image wheel:  pip download --no-deps --only-binary=:all: scikit-image==0.26.0
                       unzip 'skimage/data/*' -> SKIMAGE_DATA
  Debian opencv-doc:   apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb X
                       -> OPENCV_EXAMPLES = X/usr/share/doc/opencv-doc/examples

Usage: python scripts/make_sample_corpus.py SKIMAGE_DATA OPENCV_EXAMPLES OUT_DIR
Each image is converted to RGB, downscaled so its longer side is <= 256 px
(aspect ratio kept) and saved as JPEG quality 85. Needs Pillow.
"""
import sys
from pathlib import Path

from PIL import Image

SKIMAGE = {
    "astronaut.jpg": ("astronaut.png", "NASA Great Images; public domain"),
    "brick.jpg": ("brick.png", "CC0Textures Bricks25; CC0"),
    "camera.jpg": ("camera.png", "Lav Varshney; CC0"),
    "cell.jpg": ("cell.png", "CC0 (public domain dedication)"),
    "chelsea.jpg": ("chelsea.png", "Stefan van der Walt; CC0"),
    "clock_motion.jpg": ("clock_motion.png", "Stefan van der Walt; public domain"),
    "coffee.jpg": ("coffee.png", "Rachel Michetti; CC0"),
    "coins.jpg": ("coins.png", "Brussels Museum of Art and History via scikit-image; no known copyright restrictions"),
    "grass.jpg": ("grass.png", "CC0Textures; CC0"),
    "gravel.jpg": ("gravel.png", "CC0Textures Gravel04; CC0"),
    "hubble_deep_field.jpg": ("hubble_deep_field.jpg", "NASA; public domain"),
    "ihc.jpg": ("ihc.png", "Immunohistochemistry sample via scikit-image; no known copyright restrictions"),
    "retina.jpg": ("retina.jpg", "Häggström, Mikael (2014); CC0 1.0"),
    "rocket.jpg": ("rocket.jpg", "SpaceX, DSCOVR launch; public domain"),
}

OPENCV = {
    "fruits.jpg": "data/fruits.jpg",
    "baboon.jpg": "data/baboon.jpg",
    "home.jpg": "data/home.jpg",
    "building.jpg": "data/building.jpg",
    "happy_fish.jpg": "data/HappyFish.jpg",
    "squirrel.jpg": "data/squirrel_cls.jpg",
    "leuven.jpg": "data/leuvenA.jpg",
    "aloe.jpg": "data/aloeL.jpg",
    "butterfly.jpg": "data/butterfly.jpg",
    "apple.jpg": "data/apple.jpg",
    "orange.jpg": "data/orange.jpg",
    "starry_night.jpg": "data/starry_night.jpg",
    "smarties.jpg": "data/smarties.png",
    "aero.jpg": "data/aero1.jpg",
    "basketball.jpg": "data/basketball1.png",
    "rubber_whale.jpg": "data/rubberwhale1.png",
    "plant.jpg": "alphamat/input_images/plant.jpg",
    "suzanne.jpg": "data/Blender_Suzanne1.jpg",
}


def convert(src: Path, dst: Path) -> None:
    img = Image.open(src).convert("RGB")
    img.thumbnail((256, 256), Image.Resampling.LANCZOS)
    img.save(dst, "JPEG", quality=85)


def main(skimage_data: Path, opencv_examples: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (src, licence) in SKIMAGE.items():
        convert(skimage_data / src, out / name)
        rows.append((name, "scikit-image 0.26.0 wheel", f"skimage/data/{src}", licence))
    for name, src in OPENCV.items():
        convert(opencv_examples / src, out / name)
        rows.append((name, "Debian opencv-doc 4.6.0+dfsg-12", f"examples/{src}",
                     "OpenCV samples; Apache-2.0 AND BSD-3-Clause per the package's debian/copyright (Files: *)"))
    lines = [
        "# Sample corpus licences",
        "",
        "Real photographs (and a few textures, a painting reproduction and a render) taken from",
        "packages that ship them, downscaled to at most 256 px on the longer side and re-encoded",
        "as JPEG (quality 85) by `scripts/make_sample_corpus.py`.",
        "",
        "| file | source package | original path | licence / credit |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    (out / "LICENSES.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
