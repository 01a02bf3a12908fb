"""PNG encoding, side by side: Pillow, worker/images.py's encoder with zlib (what it used before), and the
same encoder with ISA-L (what it uses), on 1024x1024 images.

    python bench/images.py --rounds 9 --json bench/results/images-cpu.json

Method: two images, both the stand-in engine's (worker/engine/standin.py): a smooth colour field with
grain (what bench/service.py uploads; grain is the hard case for deflate) and the same field without
grain (closer to a clean render). Each round encodes each image once with each encoder, in turn; medians
over the rounds, in ms per image, with the file's size. Every output is decoded once and compared with the
pixels first. The encoders use this machine's cores as the worker does (ours: 4 deflate slices in threads).
"""

from __future__ import annotations

import io
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from worker import images
from worker.engine.standin import picture


def pillow(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG", compress_level=1)  # its fastest compressing level
    return buf.getvalue()


ENCODERS = {
    "pillow level 1": pillow,
    "ours, zlib level 3 (before)": lambda p: images.encode_png(p, {}, codec=zlib, level=3),
    "ours, ISA-L level 1 (now)": lambda p: images.encode_png(p, {}),
}


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--size", type=int, default=1024)
    args = p.parse_args()
    result = harness.start("images", args, __doc__)
    pictures = {"grain": picture(args.size, args.size, 0), "smooth": picture(args.size, args.size, 0, grain=0)}
    for name, encode in ENCODERS.items():  # correct before fast
        for kind, pixels in pictures.items():
            with Image.open(io.BytesIO(encode(pixels))) as im:
                assert np.array_equal(np.asarray(im), pixels), (name, kind)
    times: dict[tuple[str, str], list[float]] = {(n, k): [] for n in ENCODERS for k in pictures}
    sizes: dict[tuple[str, str], int] = {}
    for _ in range(args.rounds):
        for kind, pixels in pictures.items():
            for name, encode in ENCODERS.items():
                t0 = time.perf_counter()
                data = encode(pixels)
                times[(name, kind)].append(time.perf_counter() - t0)
                sizes[(name, kind)] = len(data)
    for kind in pictures:
        now = harness.Timing.of(times[("ours, ISA-L level 1 (now)", kind)]).median_s
        for name in ENCODERS:
            timing = harness.Timing.of(times[(name, kind)])
            ms, ratio, size = timing.median_s * 1000, timing.median_s / now, sizes[(name, kind)]
            row = {"image": kind, "encoder": name, "ms": round(ms, 2), "bytes": size, "times_isal": round(ratio, 2)}
            result.add(f"{kind} {name}", {**row, "timing": timing.to_json(5)})
            print(f"{kind:<7} {name:<28} {ms:7.1f} ms  {size:>9,} bytes  {ratio:5.2f}x ISA-L's time")


if __name__ == "__main__":
    main()
