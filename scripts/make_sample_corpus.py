"""Builds configs/sample_corpus/ (images + LICENSES.md) from photographs that
packages ship, offline. Needs Python 3 and Pillow only.

Get and extract the sources first (the versions below are the ones the bundled
corpus was made from; the licences in LICENSES.md are quoted from them):

  mkdir src && cd src
  pip download --no-deps --only-binary=:all: scikit-image==0.26.0 scikit-learn==1.9.1 scipy==1.11.4
  for w in *.whl; do unzip -q -o "$w" 'skimage/data/*' 'sklearn/datasets/images/*' 'scipy/misc/*' -d wheels; done
  apt-get download opencv-doc=4.6.0+dfsg-12     # Debian bookworm
  dpkg-deb -x opencv-doc_*.deb opencv-doc

  (unzip warns about the patterns a given wheel lacks; that is expected.)

Usage:
  python scripts/make_sample_corpus.py --wheels src/wheels --opencv-doc src/opencv-doc \
      --out configs/sample_corpus

  --wheels      folder the three wheels were unzipped into (holds skimage/,
                sklearn/, scipy/)
  --opencv-doc  root the opencv-doc .deb was extracted into with dpkg-deb -x
                (holds usr/share/doc/opencv-doc/)

Each image is converted to RGB, downscaled so that its longer side is at most
256 px (aspect ratio kept, Lanczos) and saved as JPEG quality 85. LICENSES.md is
rewritten from the table below plus the licence texts quoted from the opencv-doc
package's copyright file.
"""
import argparse
import bz2
import sys
from pathlib import Path

from PIL import Image

MAX_SIDE = 256
QUALITY = 85

SKIMAGE = "scikit-image 0.26.0 (PyPI wheel)"
SKLEARN = "scikit-learn 1.9.1 (PyPI wheel)"
SCIPY = "scipy 1.11.4 (PyPI wheel)"
OPENCV = "opencv-doc 4.6.0+dfsg-12 (Debian)"
OPENCV_DOC = "usr/share/doc/opencv-doc"
OPENCV_LICENCE = "Apache-2.0 AND BSD-3-Clause, OpenCV authors (debian/copyright `Files: *`; see below)"

# (output name, source package, path inside the extracted source, licence/credit)
IMAGES = [
    # scikit-image: licences as the docstrings in skimage/data/_fetchers.py state them.
    ("astronaut.jpg", SKIMAGE, "skimage/data/astronaut.png",
     "Astronaut Eileen Collins, NASA Great Images database; \"No known copyright restrictions, released "
     "into the public domain.\""),
    ("brick.jpg", SKIMAGE, "skimage/data/brick.png",
     "CC0Textures, Bricks25 (perspective-corrected, cropped by scikit-image); CC0"),
    ("camera.jpg", SKIMAGE, "skimage/data/camera.png",
     "Lav Varshney (photographer); \"No copyright restrictions. CC0\""),
    ("cell.jpg", SKIMAGE, "skimage/data/cell.png",
     "Quantitative phase image, Müller et al., Optics Express 26(8) 2018; \"CC0, dedicated "
     "to the public domain\""),
    ("chelsea.jpg", SKIMAGE, "skimage/data/chelsea.png",
     "Stefan van der Walt (photographer); \"No copyright restrictions. CC0\""),
    ("clock_motion.jpg", SKIMAGE, "skimage/data/clock_motion.png",
     "Stefan van der Walt (photographer); \"Released into the public domain\""),
    ("coffee.jpg", SKIMAGE, "skimage/data/coffee.png",
     "Rachel Michetti (photographer), courtesy of Pikolo Espresso Bar; \"No copyright "
     "restrictions. CC0\""),
    ("coins.jpg", SKIMAGE, "skimage/data/coins.png",
     "Greek coins from Pompeii, Brooklyn Museum Collection; \"No known copyright restrictions.\""),
    ("grass.jpg", SKIMAGE, "skimage/data/grass.png",
     "linolafett on DeviantArt (\"Grass-01\", cropped and converted to grey by scikit-image); CC0"),
    ("gravel.jpg", SKIMAGE, "skimage/data/gravel.png",
     "CC0Textures, Gravel04 (rescaled, cropped and converted to grey by scikit-image); CC0"),
    ("hubble_deep_field.jpg", SKIMAGE, "skimage/data/hubble_deep_field.jpg",
     "NASA, HubbleSite; \"may be freely used in the public domain\""),
    ("ihc.jpg", SKIMAGE, "skimage/data/ihc.png",
     "Immunohistochemistry sample, Center for Microscopy And Molecular Imaging (CMMI); "
     "\"No known copyright restrictions.\""),
    ("retina.jpg", SKIMAGE, "skimage/data/retina.jpg",
     "Mikael Häggström (2014), via Wikimedia Commons; CC0 1.0 Universal"),
    ("rocket.jpg", SKIMAGE, "skimage/data/rocket.jpg",
     "SpaceX (DSCOVR launch on Falcon 9); \"released in the public domain\""),
    # scikit-learn: sklearn/datasets/images/README.txt (quoted as it stands).
    ("china.jpg", SKLEARN, "sklearn/datasets/images/china.jpg",
     "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/); \"Some rights reserved by "
     "danielbuechele\", https://www.flickr.com/photos/danielbuechele/6061409035/; retrieved "
     "2011 by Robert Layton. Downscaled and re-encoded here."),
    ("flower.jpg", SKLEARN, "sklearn/datasets/images/flower.jpg",
     "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/); the README credits "
     "\"danielbuechele\" but links the photo to https://www.flickr.com/photos/vultilion/6056698931/ "
     "(user vultilion); retrieved 2011 by Robert Layton. Downscaled and re-encoded here."),
    # scipy: docstring of scipy.misc.face in scipy/misc/_common.py.
    ("raccoon.jpg", SCIPY, "scipy/misc/face.dat",
     "\"raccoon-procyon-lotor.jpg at http://www.public-domain-image.com\" (public domain "
     "image site, as the scipy.misc.face docstring states)"),
    # Debian opencv-doc (OpenCV's samples/data and contrib sample folders).
    ("fruits.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/fruits.jpg", OPENCV_LICENCE),
    ("baboon.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/baboon.jpg", OPENCV_LICENCE),
    ("home.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/home.jpg", OPENCV_LICENCE),
    ("building.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/building.jpg", OPENCV_LICENCE),
    ("squirrel.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/squirrel_cls.jpg", OPENCV_LICENCE),
    ("leuven.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/leuvenA.jpg", OPENCV_LICENCE),
    ("aloe.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/aloeL.jpg", OPENCV_LICENCE),
    ("butterfly.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/butterfly.jpg", OPENCV_LICENCE),
    ("apple.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/apple.jpg", OPENCV_LICENCE),
    ("orange.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/orange.jpg", OPENCV_LICENCE),
    ("aero.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/aero1.jpg", OPENCV_LICENCE),
    ("basketball.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/basketball1.png", OPENCV_LICENCE),
    ("rubber_whale.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/rubberwhale1.png", OPENCV_LICENCE),
    ("dog.jpg", OPENCV, f"{OPENCV_DOC}/examples/data/chicky_512.png", OPENCV_LICENCE),
    ("plant.jpg", OPENCV, f"{OPENCV_DOC}/examples/alphamat/input_images/plant.jpg", OPENCV_LICENCE),
]


def open_source(path: Path) -> Image.Image:
    if path.name == "face.dat":  # scipy.misc.face: bz2-compressed raw RGB, 768 x 1024
        return Image.frombytes("RGB", (1024, 768), bz2.decompress(path.read_bytes()))
    return Image.open(path)


def convert(src: Path, dst: Path) -> None:
    img = open_source(src).convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    img.save(dst, "JPEG", quality=QUALITY)


def debian_paragraphs(copyright_file: Path) -> list[str]:
    return [p for p in copyright_file.read_text().split("\n\n") if p.strip()]


def field(paragraph: str, name: str) -> str:
    """A field of a Debian copyright paragraph, continuation lines unindented."""
    out, on = [], False
    for line in paragraph.splitlines():
        if line.startswith(f"{name}:"):
            on = True
            out.append(line[len(name) + 1:].strip())
        elif on and line.startswith((" ", "\t")):
            out.append("" if line.strip() == "." else line.strip())
        else:
            on = False
    return "\n".join(out).strip()


def licence_text(paragraphs: list[str], name: str) -> str:
    for p in paragraphs:
        first = p.splitlines()[0]
        if first.lower() == f"license: {name.lower()}" and len(p.splitlines()) > 1:
            body = p.split("\n", 1)[1]
            return "\n".join("" if l.strip() == "." else l[1:] for l in body.splitlines())
    sys.exit(f"no stand-alone 'License: {name}' paragraph in the copyright file")


def licences_md(opencv_root: Path) -> str:
    paras = debian_paragraphs(opencv_root / OPENCV_DOC / "copyright")
    files_star = next(p for p in paras if p.startswith("Files: *\n"))
    lines = [
        "# Sample corpus: sources and licences",
        "",
        "Photographs taken from packages that ship them (a few are texture or microscopy",
        "photographs). Every file here was **modified**: converted to RGB, downscaled so that",
        f"its longer side is at most {MAX_SIDE} px (aspect ratio kept) and re-encoded as JPEG",
        f"(quality {QUALITY}) by `scripts/make_sample_corpus.py`, which documents how to fetch",
        "the packages and regenerate this folder and this file.",
        "",
        "The licence/credit column says what the source package states for that image:",
        "scikit-image images as the docstrings of the loaders in `skimage/data/_fetchers.py`",
        "state it; scikit-learn images as `sklearn/datasets/images/README.txt`; the scipy",
        "image as the `scipy.misc.face` docstring; opencv-doc images as",
        "`/usr/share/doc/opencv-doc/copyright`. Quoted phrases are the package's words.",
        "",
        "| file | source package | original path | licence / credit |",
        "|---|---|---|---|",
    ]
    for name, pkg, src, lic in IMAGES:
        lines.append(f"| {name} | {pkg} | `{src}` | {lic} |")
    lines += [
        "",
        "## OpenCV sample images (opencv-doc)",
        "",
        "Debian's copyright file for opencv-doc 4.6.0+dfsg-12 has no stanza of its own for",
        "OpenCV's sample images (`samples/data`, the contrib sample folders), so they fall",
        "under its `Files: *` stanza:",
        "",
        "```",
        "Copyright: " + field(files_star, "Copyright").replace("\n", "\n           "),
        "License: " + field(files_star, "License").splitlines()[0],
        "Comment: " + field(files_star, "Comment").replace("\n", "\n "),
        "```",
        "",
        "Debian strips the `lena` images from this package (`Files-Excluded`); they are not",
        "used here. Some of these samples are well-known test images of older or third-party",
        "origin (e.g. the Middlebury optical-flow/stereo frames aero, aloe, basketball,",
        "rubber_whale; the baboon/mandrill test image); the package states no other licence",
        "for them.",
        "",
        "### Apache-2.0 (as quoted in that copyright file)",
        "",
        "```",
        licence_text(paras, "Apache-2.0"),
        "```",
        "",
        "The full licence text: http://www.apache.org/licenses/LICENSE-2.0",
        "(on Debian systems: `/usr/share/common-licenses/Apache-2.0`).",
        "",
        "### BSD-3-Clause (as quoted in that copyright file)",
        "",
        "```",
        licence_text(paras, "BSD-3-Clause"),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, required=True)
    ap.add_argument("--opencv-doc", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name, pkg, src, _ in IMAGES:
        root = a.opencv_doc if pkg == OPENCV else a.wheels
        convert(root / src, a.out / name)
    (a.out / "LICENSES.md").write_text(licences_md(a.opencv_doc))
    total = sum((a.out / n).stat().st_size for n, *_ in IMAGES)
    print(f"{len(IMAGES)} images, {total} bytes, in {a.out}")


if __name__ == "__main__":
    main()
