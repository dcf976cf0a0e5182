#!/usr/bin/env python3
"""Cohort-scale feature import: tessera's `features` / `h5_features` next to pyarrow / h5py
reading the same files, in the same run; and peak RSS of import + two training epochs in
memory mode and with `sample.spill_to_disk`.

    pip install numpy pyarrow h5py
    cargo build --release
    python3 scripts/import-bench.py --slides 10000 --dir /tmp/tessera-import-bench

Writes (not to the repository: 1 GB at 10,000 slides) N slides x 200 tiles x 128-d float32
embeddings as pandas/polars users export them: one Parquet file written by pyarrow with 500
slides per row group (`embedding` a `list<float>` column); the same table with 50 rows per row
group (4 row groups per slide); a folder of 10 files; one file per slide for a `{slide_id}`
pattern; and one TRIDENT h5 per slide. For each, prints the seconds of the reference reader
(pyarrow `read_table` of everything, h5py reading every file's datasets) and of
`tessera run` with the source stage alone (wall clock of the process, so index, schema
probing and start-up are included). With `--memory`, runs features -> sample -> sparse_map ->
train (SparseConvMIL, 2 epochs, K = 100, `downsample: 1`: one cell per tile) under `/usr/bin/time -v` and prints peak RSS next to
the embeddings' bytes.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TILES = 200
DIM = 128
SLIDES_PER_GROUP = 500


def slide_ids(n):
    return [f"slide_{i:05d}" for i in range(n)]


def cohort_table(n, rng):
    ids = np.repeat(np.array(slide_ids(n), dtype=object), TILES)
    grid = np.arange(TILES)
    x = np.tile((grid % 20) * 256, n).astype(np.int64)
    y = np.tile((grid // 20) * 256, n).astype(np.int64)
    emb = rng.standard_normal((n * TILES, DIM), dtype=np.float32)
    values = pa.array(emb.reshape(-1))
    offsets = pa.array(np.arange(0, n * TILES * DIM + 1, DIM, dtype=np.int32))
    return pa.table({
        "slide_id": pa.array(ids, pa.string()),
        "x": x,
        "y": y,
        "tile_size": np.full(n * TILES, 256, dtype=np.int64),
        "embedding": pa.ListArray.from_arrays(offsets, values),
    }), emb


def write_cohort(root, n):
    rng = np.random.default_rng(15)
    table, emb = cohort_table(n, rng)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "cohort.parquet", row_group_size=SLIDES_PER_GROUP * TILES)
    pq.write_table(table, root / "cohort-small-groups.parquet", row_group_size=TILES // 4)
    folder = root / "folder"
    folder.mkdir(exist_ok=True)
    per = (n + 9) // 10
    for k in range(10):
        part = table.slice(k * per * TILES, per * TILES)
        if part.num_rows:
            pq.write_table(part, folder / f"part-{k:02d}.parquet",
                           row_group_size=SLIDES_PER_GROUP * TILES)
    per_slide = root / "per-slide"
    per_slide.mkdir(exist_ok=True)
    h5 = root / "h5"
    h5.mkdir(exist_ok=True)
    coords = np.stack([table["x"].to_numpy()[:TILES], table["y"].to_numpy()[:TILES]], axis=1)
    for i, sid in enumerate(slide_ids(n)):
        pq.write_table(table.slice(i * TILES, TILES), per_slide / f"{sid}.parquet")
        with h5py.File(h5 / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=emb[i * TILES:(i + 1) * TILES])
            c = f.create_dataset("coords", data=coords)
            c.attrs["patch_size_level0"] = 256
            c.attrs["patch_size"] = 256
    with open(root / "dataset.csv", "w") as f:
        f.write("slide_id,label\n")
        for i, sid in enumerate(slide_ids(n)):
            f.write(f"{sid},{'ab'[i % 2]}\n")


def reference_seconds(kind, path, n):
    t0 = time.perf_counter()
    if kind == "pattern":
        for sid in slide_ids(n):
            pq.read_table(path / f"{sid}.parquet")
    elif kind == "h5":
        for sid in slide_ids(n):
            with h5py.File(path / f"{sid}.h5", "r") as f:
                f["features"][()]
                f["coords"][()]
    else:
        pq.read_table(path)
    return time.perf_counter() - t0


def source_yaml(kind, path):
    if kind == "h5":
        return f"    kind: h5_features\n    params:\n      path: {path}\n"
    if kind == "pattern":
        return f"    kind: features\n    params:\n      path: {path}/{{slide_id}}.parquet\n"
    return f"    kind: features\n    params:\n      path: {path}\n"


def experiment(root, name, source, train, spill=False):
    text = (f"name: {name}\nseed: 0\ncache_dir: {root}/cache-{name}\nout_dir: {root}/out-{name}\n"
            f"dataset: {root}/dataset.csv\nstages:\n  features:\n{source}")
    if train:
        text += ("  sample:\n    kind: sample\n    inputs: [features]\n    params:\n"
                 f"      tiles_per_slide: 100\n      spill_to_disk: {'true' if spill else 'false'}\n"
                 "  sparse_map:\n    kind: sparse_map\n    inputs: [sample]\n    params:\n      downsample: 1\n"
                 "  train:\n    kind: train\n    inputs: [sparse_map]\n    params:\n"
                 "      pooling: sparseconvmil\n      epochs: 2\n")
    p = root / f"{name}.yaml"
    p.write_text(text)
    return p


def tessera_run(tessera, yaml, timed=False):
    cmd = [tessera, "run", str(yaml), "--quiet"]
    if timed:
        cmd = ["/usr/bin/time", "-v"] + cmd
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rss = None
    for line in r.stderr.splitlines():
        if "Maximum resident set size" in line:
            rss = int(line.split(":")[1]) * 1024
    return secs, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tessera-import-bench"))
    ap.add_argument("--tessera", default="target/release/tessera")
    ap.add_argument("--memory", action="store_true", help="also peak RSS of 2 training epochs")
    ap.add_argument("--keep", action="store_true", help="reuse the cohort files if present")
    ap.add_argument("--write-only", action="store_true", help="write the cohort files and stop")
    ap.add_argument("--skip-import", action="store_true", help="only the --memory runs")
    args = ap.parse_args()
    root = args.dir.resolve() / str(args.slides)
    if not (args.keep and (root / "dataset.csv").exists()):
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        write_cohort(root, args.slides)
        print(f"wrote {args.slides} slides to {root} in {time.perf_counter() - t0:.0f} s")
    if args.write_only:
        return
    emb_bytes = args.slides * TILES * DIM * 4
    layouts = [
        ("one file, 500 slides per row group", "file", root / "cohort.parquet"),
        ("one file, 4 row groups per slide", "file", root / "cohort-small-groups.parquet"),
        ("folder of 10 files", "folder", root / "folder"),
        ("{slide_id} pattern, file per slide", "pattern", root / "per-slide"),
        ("h5_features, folder of h5 files", "h5", root / "h5"),
    ]
    print(f"\n{args.slides} slides x {TILES} tiles x {DIM}-d ({emb_bytes / 2**30:.2f} GiB of float32)")
    print(f"| layout | reference s | tessera s | ratio |")
    print(f"|---|---:|---:|---:|")
    results = []
    for label, kind, path in [] if args.skip_import else layouts:
        ref = reference_seconds(kind, path, args.slides)
        name = f"import-{kind}-{path.name}"
        secs, _ = tessera_run(args.tessera, experiment(root, name, source_yaml(kind, path), False))
        ref_name = "h5py" if kind == "h5" else "pyarrow"
        print(f"| {label} | {ref:.2f} ({ref_name}) | {secs:.2f} | {secs / ref:.2f} |", flush=True)
        results.append(dict(layout=label, reference_s=ref, tessera_s=secs))
    if args.memory:
        print(f"\n| mode | peak RSS GiB | x embeddings | seconds |")
        print(f"|---|---:|---:|---:|")
        for spill in [False, True]:
            name = f"train-{'spill' if spill else 'memory'}"
            yaml = experiment(root, name, source_yaml("file", root / "cohort.parquet"), True, spill)
            secs, rss = tessera_run(args.tessera, yaml, timed=True)
            mode = "spill_to_disk" if spill else "memory"
            print(f"| {mode} | {rss / 2**30:.2f} | {rss / emb_bytes:.2f} | {secs:.0f} |", flush=True)
            results.append(dict(mode=mode, peak_rss=rss, seconds=secs))
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
