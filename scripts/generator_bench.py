#!/usr/bin/env python3
"""Seconds per image of mirgen's image generators against diffusers, same
folders, same settings, same machine, one run (issue: generator benchmark).

    python scripts/generator_bench.py [--images N] [DIR:STEPS:GUIDANCE ...]

Default: the four tiny fixture pipelines of workers/tests/fixtures/generators
(random weights: the timings show per-architecture overhead, not real cost).
Runs `cargo run --example generator_bench` (mirgen, in process) and then
diffusers' DiffusionPipeline on each folder at the resolution mirgen used,
and prints a markdown table. Needs torch + diffusers + transformers (CPU
wheels from PyPI are enough); on a GPU machine build mirgen with
`--features cuda` and pass full-size checkpoint folders.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "workers", "tests", "fixtures", "generators")
DEFAULT = [f"{FIX}/sd-turbo:2:0", f"{FIX}/sdxl-turbo:2:0", f"{FIX}/sd3:2:3.5", f"{FIX}/flux:2:3.5"]
PROMPT = "a photo of a red cat on the moon"


def main():
    args = sys.argv[1:]
    images = 3
    if args[:1] == ["--images"]:
        images, args = int(args[1]), args[2:]
    specs = args or DEFAULT
    cmd = ["cargo", "run", "-q", "-p", "mirgen-workers", "--example", "generator_bench", "--",
           "--images", str(images), *specs]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    ours = [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    import torch
    from diffusers import DiffusionPipeline

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {images} images each after a warm-up\n")
    print("| pipeline | resolution | steps | guidance | mirgen s/image | diffusers s/image | diffusers / mirgen |")
    print("|---|---|---|---|---|---|---|")
    for r in ours:
        pipe = DiffusionPipeline.from_pretrained(r["dir"], torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def draw(seed):
            pipe(PROMPT, num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                 height=r["height"], width=r["width"],
                 generator=torch.Generator().manual_seed(seed))

        draw(0)
        t = time.perf_counter()
        for seed in range(1, images + 1):
            draw(seed)
        theirs = (time.perf_counter() - t) / images
        print(f"| {r['architecture']} | {r['width']}x{r['height']} | {r['steps']} | {r['guidance']} | "
              f"{r['seconds_per_image']:.4f} | {theirs:.4f} | {theirs / r['seconds_per_image']:.2f} |")


if __name__ == "__main__":
    main()
