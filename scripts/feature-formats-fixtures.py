#!/usr/bin/env python3
"""Writes one small table of tile embeddings in the file layouts of TRIDENT, STAMP and
slideflow, as those tools write them, plus the table itself as tessera's embeddings Parquet:
`cargo test -p tessera-features --test formats` imports each and requires identical embeddings
and level-0 coordinates.

    pip install numpy h5py pyarrow torch
    python3 scripts/feature-formats-fixtures.py stages/features/tests/fixtures/formats

Two slides: `s40x` (0.25 um/px at level 0, a 40x scan) and `s20x` (0.5 um/px), both tiled
at 20x with 256 px tiles, i.e. 128 um tiles: 512 level-0 px on the 40x slide, 256 on the 20x
one. Neighbouring tiles of `s40x` sit 512 level-0 px apart: dividing those coordinates by the
20x patch size (256) would put them two cells apart (the known pitfall the test checks).
Embedding values are multiples of 1/16 in [-4, 4), exact in float16 (STAMP stores float16).
"""

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

DIM = 8
TILE_UM = 128.0
TILE_PX = 256  # at the 20x target magnification
SLIDES = {"s40x": 0.25, "s20x": 0.5}


def table(rng):
    """Per slide: level-0 top-left corners, level-0 tile size, embeddings."""
    out = {}
    for slide, mpp in SLIDES.items():
        size = int(round(TILE_UM / mpp))
        # A 3 x 2 block of neighbours plus one tile further away.
        cells = [(i, j) for j in range(2) for i in range(3)] + [(7, 4)]
        coords = np.array([[i * size + 1000, j * size + 2000] for i, j in cells], dtype=np.int64)
        feats = rng.integers(-64, 64, size=(len(cells), DIM)).astype(np.float32) / 16.0
        out[slide] = (coords, size, feats, mpp)
    return out


def write_reference(root, rows):
    slide_ids, xs, ys, sizes, embs = [], [], [], [], []
    for slide, (coords, size, feats, _) in rows.items():
        for (x, y), f in zip(coords, feats):
            slide_ids.append(slide)
            xs.append(int(x))
            ys.append(int(y))
            sizes.append(size)
            embs.append(f.tolist())
    t = pa.table({
        "slide_id": pa.array(slide_ids, pa.string()),
        "x": pa.array(xs, pa.int64()),
        "y": pa.array(ys, pa.int64()),
        "tile_size": pa.array(sizes, pa.int64()),
        "embedding": pa.array(embs, pa.list_(pa.float32(), DIM)),
    })
    pq.write_table(t, root / "reference.parquet")
    with open(root / "dataset.csv", "w") as f:
        f.write("slide_id,label,mpp\n")
        for slide, mpp in SLIDES.items():
            f.write(f"{slide},a,{mpp}\n")


def write_trident(root, rows):
    """TRIDENT: features [N, D] f32, coords [N, 2] int64 at level 0, attrs on coords."""
    d = root / "trident"
    d.mkdir(parents=True, exist_ok=True)
    for slide, (coords, size, feats, mpp) in rows.items():
        with h5py.File(d / f"{slide}.h5", "w") as f:
            f.create_dataset("features", data=feats)
            c = f.create_dataset("coords", data=coords)
            c.attrs["patch_size"] = TILE_PX
            c.attrs["patch_size_level0"] = size
            c.attrs["level0_magnification"] = int(round(10 / mpp))
            c.attrs["target_magnification"] = 20
            c.attrs["overlap"] = 0
            c.attrs["name"] = slide


def write_stamp(root, rows):
    """STAMP: feats [N, D] f16, coords [N, 2] float in micrometres, file attrs."""
    d = root / "stamp"
    d.mkdir(parents=True, exist_ok=True)
    for slide, (coords, size, feats, mpp) in rows.items():
        with h5py.File(d / f"{slide}.h5", "w") as f:
            f["coords"] = (coords.astype(np.float64) * mpp).astype(np.float32)
            f["feats"] = feats.astype(np.float16)
            f.attrs["stamp_version"] = "2.3.0"
            f.attrs["extractor"] = "fixture"
            f.attrs["unit"] = "um"
            f.attrs["tile_size_um"] = TILE_UM
            f.attrs["tile_size_px"] = TILE_PX
            f.attrs["code_hash"] = "00000000"
            f.attrs["feat_type"] = "tile"


def write_slideflow(root, rows):
    """slideflow: SLIDE.pt (torch.save of [N, D]), SLIDE.index.npz (arr_0: tile centres)."""
    d = root / "slideflow"
    d.mkdir(parents=True, exist_ok=True)
    for k, (slide, (coords, size, feats, mpp)) in enumerate(rows.items()):
        dtype = torch.float32 if k == 0 else torch.float16
        torch.save(torch.from_numpy(feats).to(dtype), d / f"{slide}.pt")
        centres = coords + size // 2
        np.savez(d / f"{slide}.index.npz", centres)
    with open(d / "bags_config.json", "w") as f:
        json.dump({"extractor": {"class": "fixture", "kwargs": {}}, "normalizer": None,
                   "num_features": DIM, "tile_px": TILE_PX, "tile_um": int(TILE_UM)}, f, indent=1)


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "stages/features/tests/fixtures/formats")
    root.mkdir(parents=True, exist_ok=True)
    rows = table(np.random.default_rng(15))
    write_reference(root, rows)
    write_trident(root, rows)
    write_stamp(root, rows)
    write_slideflow(root, rows)
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
