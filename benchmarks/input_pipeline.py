"""Images/s of the A2D2 input pipeline (decode, resize, flip, batch) on generated data.

  python -m benchmarks.input_pipeline [--out bench_input.json] [--batches 20]

Two cases: the synthetic demo (120x192 frames -> 96x160) and the paper's setting
(frames at A2D2's native 1208x1920 -> 912x912). Frames are generated once under --cache;
TFDS shards are written once. Reports the median rate over timed batches after warm-up.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from data_pipelines import a2d2, synthetic

CASES = {
    "demo": dict(frame_size=(120, 192), image_size=(96, 160), num_train=64),
    "paper": dict(frame_size=(1208, 1920), image_size=(912, 912), num_train=24),
}


def measure(case: dict, cache: Path, batch_size: int, batches: int, warmup: int = 3) -> dict:
  """Streams `all_train` and returns images/s (median over single-batch timings)."""
  root = synthetic.generate(cache / f"raw_{case['frame_size'][0]}", num_train=case["num_train"],
                            num_val=1, num_test=1, image_size=case["frame_size"], seed=0)
  stream = a2d2.dataset(root, "all_train", image_size=case["image_size"],
                        batch_size=batch_size, train=True, seed=0,
                        split_dir=root / "splits", tfds_dir=cache / "tfds")
  iterator = stream.as_numpy_iterator()
  for _ in range(warmup):
    next(iterator)
  rates = []
  for _ in range(batches):
    start = time.perf_counter()
    next(iterator)
    rates.append(batch_size / (time.perf_counter() - start))
  return {"images_per_sec": statistics.median(rates), "min": min(rates), "max": max(rates)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="write the rows as JSON here")
  parser.add_argument("--batches", type=int, default=20, help="timed batches per case")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "moe_jax_bench"),
                      help="where generated frames and TFDS shards are kept between runs")
  args = parser.parse_args()
  rows = []
  for name, case in CASES.items():
    result = measure(case, Path(args.cache), args.batch_size, args.batches)
    rows.append({"case": name, "frame_size": case["frame_size"],
                 "image_size": case["image_size"], "batch_size": args.batch_size,
                 "cpu_count": os.cpu_count(), **result})
  print("\n| case | frames | output | batch | images/s (median) | min–max |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['case']} | {r['frame_size'][0]}x{r['frame_size'][1]} | "
          f"{r['image_size'][0]}x{r['image_size'][1]} | {r['batch_size']} | "
          f"{r['images_per_sec']:.1f} | {r['min']:.1f}–{r['max']:.1f} |")
  if args.out:
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
  main()
