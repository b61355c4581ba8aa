"""Peak RAM and time of opening big phone photos: `images.open_image` (decoded at most 2048 px a side) against a
full-size decode of the same file (`max_side=None`), each in a fresh process (VmHWM: that process's own peak).

CPU only. The photos are synthetic JPEGs of the sizes phones write (12, 48 and 200 MP, quality 90): smooth
colour with a bright face-sized square and fine noise, so the file has photo-like entropy.

    python3 benchmarks/bench_large_photo.py --out benchmarks/results/large_photo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {"12 MP (4032x3024)": (4032, 3024), "48 MP (8000x6000)": (8000, 6000), "200 MP (16320x12240)": (16320, 12240)}
MEASURE = """
import json, re, sys, time
from pathlib import Path
from instantid_colab.images import open_image

def peak_mib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024

open_image(sys.argv[2])  # lazy imports of the first open are not counted
before = peak_mib()
started = time.perf_counter()
image = open_image(sys.argv[1], max_side=None if sys.argv[3] == "full" else 2048)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_growth_mib": peak_mib() - before,
                  "size": image.size}))
"""


def write_photo(path: Path, size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    width, height = size
    small = np.random.default_rng(0).integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize(size, Image.BILINEAR)  # smooth colour at photo scale
    photo.paste((230, 200, 170), (width // 2 - width // 10, height // 2 - width // 10,
                                  width // 2 + width // 10, height // 2 + width // 10))
    photo.save(path, quality=90)


def measure(photo: Path, warmup: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(photo), str(warmup), mode], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        warmup = Path(folder, "warmup.jpg")
        Image.new("RGB", (256, 256)).save(warmup)
        for name, size in SIZES.items():
            photo = Path(folder, "photo.jpg")
            write_photo(photo, size)
            for mode in ("ours", "full"):
                rows.append({"photo": name, "file_mib": photo.stat().st_size / 2**20, "decode": mode,
                             **measure(photo, warmup, mode)})
    print("| photo | JPEG file MiB | decode | result size | seconds | peak RAM growth MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        decode = "open_image (at most 2048 px)" if row["decode"] == "ours" else "full size (max_side=None)"
        print(f"| {row['photo']} | {row['file_mib']:.1f} | {decode} | {row['size'][0]}x{row['size'][1]} | "
              f"{row['seconds']:.2f} | {row['peak_growth_mib']:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
