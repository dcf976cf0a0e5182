#!/usr/bin/env python3
"""Makes the DICOM WSI test slide from CMU-1-Small-Region.svs.

The committed fixture `examples/dicom/CMU-1-crop/` was written by this script; run it again
only to rebuild it (same input, same output bytes):

    python3 -m venv /tmp/dicom-venv && /tmp/dicom-venv/bin/pip install wsidicomizer==0.26.1 tifffile==2026.3.3
    /tmp/dicom-venv/bin/python scripts/make-dicom-slide.py

Two steps, both lossless for level 0:

1. Crop: a small Aperio SVS is written whose JPEG tiles are the SVS's own tile bitstreams,
   copied byte for byte: tiles (2, 4) to (5, 7) of the 240 px grid, level-0 pixels
   x 480..1380, y 960..1860 of the source (900 x 900 px, so the last tile column and row are
   partial, as at a real slide's edge), with the same JPEG tables and Aperio metadata (mpp
   0.499, 20x). 4 x 4 tiles, because wsidicomizer builds each added level from 2 x 2 tiles
   of the one above and writes short frames (which OpenSlide rightly refuses) where a level
   has an odd tile count.
2. Convert: wsidicomizer (opentile source) wraps those JPEG tiles into a DICOM VL Whole Slide
   Microscopy series without re-encoding (TILED_FULL, JPEG baseline transfer syntax), and adds
   the missing dyadic levels (2x, 4x: re-encoded JPEG, so a pyramid to choose levels from).
   368 KB in all.

So level 0 of the DICOM decodes to exactly the pixels of the SVS region it came from;
`stages/tile/src/dicom.rs`'s tests compare them pixel for pixel. UIDs come from a seeded
generator and dates are fixed, so rerunning reproduces the files.
"""

from __future__ import annotations

import argparse
import ctypes.util
import hashlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SVS = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
DEFAULT_OUT = ROOT / "examples" / "dicom" / "CMU-1-crop"

# The crop, in tiles of the source's 240 px grid, and its exact size in pixels.
TILE_COL, TILE_ROW, WIDTH, HEIGHT = 2, 4, 900, 900


def fail(message: str) -> None:
    print(f"make-dicom-slide: {message}", file=sys.stderr)
    sys.exit(1)


def crop_svs(svs: Path, out: Path, col: int, row: int, width: int, height: int) -> None:
    """Writes `out`: an Aperio SVS of the source's tiles from (col, row), width x height px,
    with the JPEG tile bitstreams copied unchanged."""
    import tifffile

    with tifffile.TiffFile(svs) as tif:
        page = tif.pages[0]
        if page.compression != 7 or not page.is_tiled:
            fail(f"{svs}: level 0 is not JPEG-tiled (compression {page.compression})")
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        cols, rows = -(-width // tw), -(-height // th)
        if (col + cols) * tw > page.imagewidth + tw or (row + rows) * th > page.imagelength + th:
            fail(f"{svs}: the crop leaves the {page.imagewidth}x{page.imagelength} image")
        fh = tif.filehandle
        tiles = []
        for r in range(row, row + rows):
            for c in range(col, col + cols):
                index = r * across + c
                fh.seek(page.dataoffsets[index])
                tiles.append(fh.read(page.databytecounts[index]))
        tables = page.jpegtables
        description = page.description
    # Aperio's first line names the image size; the metadata after `|` is kept as it is.
    header, _, metadata = description.partition("|")
    first_line = header.split("\n")[0].rstrip("\r")
    x0, y0 = col * tw, row * th
    description = (
        f"{first_line}\r\n{width}x{height} [{x0},{y0} {width}x{height}] ({tw}x{th}) "
        f"JPEG/RGB Q=30|{metadata}"
    )
    if not re.search(r"MPP = [0-9.]+", description):
        fail(f"{svs}: no MPP in the Aperio description")
    with tifffile.TiffWriter(out) as writer:
        writer.write(
            iter(tiles),
            shape=(height, width, 3),
            dtype="uint8",
            tile=(th, tw),
            compression=7,
            photometric="rgb",
            subsampling=(2, 2),
            description=description,
            extratags=[(347, 7, len(tables), tables, True)],
            metadata=None,
        )
    # tifffile labels JPEG tiles YCbCr; Aperio labels them RGB (the streams carry no JFIF
    # marker, so readers decode them without a colour transform). Restore Aperio's label, or
    # every reader would convert colours the source never had.
    with tifffile.TiffFile(out, mode="r+b") as tif:
        tif.pages[0].tags["PhotometricInterpretation"].overwrite(2)


def convert(svs: Path, out: Path) -> None:
    """Converts `svs` to a DICOM WSI folder `out` with wsidicomizer, deterministically."""
    # opentile looks for libturbojpeg through ctypes' find_library("libturbojpeg"), which some
    # Python builds answer with an exception; give it the library by its usual name.
    import opentile.jpeg.jpeg as opentile_jpeg

    turbo = ctypes.util.find_library("turbojpeg")
    if turbo is None:
        fail("libturbojpeg not found (Debian: apt-get install libturbojpeg0)")
    opentile_jpeg.find_turbojpeg_path = lambda: Path(turbo)

    from pydicom.uid import generate_uid
    from wsidicomizer import WsiDicomizer

    counter = iter(range(1_000_000))

    def uid():
        return generate_uid(entropy_srcs=["tessera CMU-1-crop", str(next(counter))])

    def fixed_dates(dataset, _metadata):
        for tag, value in [("ContentDate", "20091229"), ("ContentTime", "095915")]:
            setattr(dataset, tag, value)
        return dataset

    WsiDicomizer.convert(
        svs,
        out,
        uid_generator=uid,
        add_missing_levels=True,
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
        metadata_post_processor=fixed_dates,
        workers=1,
    )


def fix_instance(src: Path, dst: Path, derived: bool) -> None:
    """Copies one instance, correcting what wsidicomizer 0.26.1 gets wrong for this source and
    fixing what changes from run to run.

    The levels it adds (`add_missing_levels`) are JPEG-encoded in YCbCr (JFIF streams) but
    inherit level 0's `PhotometricInterpretation` RGB and `ImageType` ORIGINAL, so readers
    would skip the colour transform (OpenSlide does: pink backgrounds) and see two original
    levels; they are relabelled YBR_FULL_422 and DERIVED/RESAMPLED. The content time and the
    ICC profile's creation date are the conversion's clock; they are set to the scan's.
    """
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(src)
    ds.ContentDate, ds.ContentTime = "20091229", "095915"
    for path in ds.get("OpticalPathSequence", []):
        if "ICCProfile" in path:
            path.ICCProfile = fixed_icc_date(bytes(path.ICCProfile))
    first = next(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    jfif = first[2:4] == b"\xff\xe0"
    if derived:
        if not jfif:
            fail(f"{src.name}: an added level is not a JFIF (YCbCr) JPEG; check the relabelling")
        ds.PhotometricInterpretation = "YBR_FULL_422"
        kind = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds.ImageType = kind
        for group in ds.get("SharedFunctionalGroupsSequence", []):
            for frame_type in group.get("WholeSlideMicroscopyImageFrameTypeSequence", []):
                frame_type.FrameType = kind
    elif jfif:
        fail(f"{src.name}: level 0 was re-encoded; its tiles should be the source's own")
    ds.save_as(dst, enforce_file_format=True)


def fixed_icc_date(icc: bytes) -> bytes:
    """The ICC profile with its header's creation date set to the scan date (its profile ID,
    an MD5 of the profile, recomputed when present)."""
    import hashlib as _hashlib
    import struct

    if len(icc) < 128:
        return icc
    out = bytearray(icc)
    out[24:36] = struct.pack(">6H", 2009, 12, 29, 9, 59, 15)
    if any(out[84:100]):
        masked = bytearray(out)
        masked[44:48] = b"\0" * 4
        masked[64:68] = b"\0" * 4
        masked[84:100] = b"\0" * 16
        out[84:100] = _hashlib.md5(masked).digest()
    return bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--svs", type=Path, default=DEFAULT_SVS, help="source Aperio SVS")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="DICOM folder to write")
    args = parser.parse_args()
    if not args.svs.is_file():
        fail(f"{args.svs}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        crop = Path(tmp) / "crop.svs"
        crop_svs(args.svs, crop, TILE_COL, TILE_ROW, WIDTH, HEIGHT)
        staging = Path(tmp) / "dicom"
        convert(crop, staging)
        files = sorted(staging.glob("*.dcm"))
        if not files:
            fail("wsidicomizer wrote no instance")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        # Short, stable names (level order), instead of the SOP instance UIDs.
        import pydicom

        levels = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            levels.append((-int(ds.TotalPixelMatrixColumns), f))
        for i, (_, f) in enumerate(sorted(levels)):
            fix_instance(f, args.out / f"level-{i}.dcm", derived=i > 0)
    total = 0
    for f in sorted(args.out.iterdir()):
        size = f.stat().st_size
        total += size
        digest = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        print(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}  {size} B  sha256 {digest}")
    print(f"{total} bytes; level 0 = source pixels x {TILE_COL * 240}..{TILE_COL * 240 + WIDTH}, "
          f"y {TILE_ROW * 240}..{TILE_ROW * 240 + HEIGHT}")


if __name__ == "__main__":
    main()
