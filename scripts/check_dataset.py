"""Checks a mirgen output folder the way its users will read it.

Usage: python scripts/check_dataset.py OUTPUT_DIR

- pyarrow reads every data file listed in manifest.json;
- the `datasets` library loads the folder (README.md YAML configs) and
  decodes `target_image` and `synthetic_image` to PIL images;
- huggingface_hub parses the dataset card.
Prints "datasets: N rows" on success; exits non-zero on any failure.
"""
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq


def main(root: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    total = 0
    for f in manifest["data_files"]:
        table = pq.read_table(root / f)
        total += table.num_rows
        assert "huggingface" in {k.decode() for k in (table.schema.metadata or {})}, f"{f}: no HF features metadata"
    assert total == manifest["stats"]["rows"], (total, manifest["stats"]["rows"])
    print(f"pyarrow: {total} rows in {len(manifest['data_files'])} files")

    from datasets import load_dataset
    from PIL import Image

    ds = load_dataset(str(root), split="train")
    assert len(ds) == total, (len(ds), total)
    for column in ("target_image", "synthetic_image"):
        assert ds.features[column].__class__.__name__ == "Image", ds.features[column]
    ok = [row for row in ds if row["status"] == "ok"]
    assert ok, "no ok rows"
    for row in ok[:5]:
        for column in ("target_image", "synthetic_image"):
            assert isinstance(row[column], Image.Image), type(row[column])
            row[column].load()
    print(f"datasets: {len(ds)} rows, images decode to PIL")

    from huggingface_hub import DatasetCard

    card = DatasetCard.load(root / "README.md")
    assert card.data.to_dict().get("configs"), "card has no configs"
    print("huggingface_hub: card parses")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
