//! Tiling throughput on a big pyramidal slide, side by side with openslide-python.
//!
//! `cargo bench -p tessera-tile --bench tiling` builds the 19980 x 20769 px, 8-level JPEG TIFF
//! with `/work/shared/data/make_big_slide.sh` (vips) into `target/tessera-bench/` when absent
//! (or uses `TESSERA_BENCH_SLIDE`), then prints a markdown table. `TESSERA_BENCH_MAX_TILES`
//! caps the tiles read per configuration.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tessera_tile::grid::grid_positions;
use tessera_tile::pool::{read_tiles_ordered, PoolOptions, TileRequest};
use tessera_tile::tissue::{detect_tissue, TissueParams};
use tessera_tile::{SlideReader, TileError};

/// openslide-python on the same machine and slide, one process (from the project brief).
const PYTHON_TILES_PER_S_256: f64 = 632.0;
const PYTHON_TILES_PER_S_512: f64 = 159.0;
const CLAM_TISSUE_MS: f64 = 24.0;

fn big_slide() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_BENCH_SLIDE") {
        return PathBuf::from(p);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target"));
    let dir = target.join("tessera-bench");
    let slide = dir.join("big.tif");
    if !slide.exists() {
        std::fs::create_dir_all(&dir).expect("creating the bench folder");
        let script = manifest.join("../../../shared/data/make_big_slide.sh");
        eprintln!("building {} with {}", slide.display(), script.display());
        let partial = dir.join("big.partial.tif");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&partial)
            .status()
            .expect("running make_big_slide.sh");
        assert!(status.success(), "make_big_slide.sh failed");
        std::fs::rename(&partial, &slide).expect("renaming the bench slide");
    }
    slide
}

/// CPU seconds used by this process so far (user + system), from /proc: robust to other
/// processes sharing the machine, unlike wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let slide = big_slide();
    let reader = SlideReader::open(&slide).expect("opening the bench slide");
    let (w, h) = reader.dimensions();
    let max_tiles: usize = std::env::var("TESSERA_BENCH_MAX_TILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    println!(
        "slide: {} ({w} x {h} px, {} levels)\n",
        slide.display(),
        reader.levels().len()
    );
    println!("| measure | tessera (wall) | tessera per CPU-second | openslide-python / CLAM | ratio (wall) |");
    println!("|---|---|---|---|---|");
    for (px, python) in [
        (256u32, PYTHON_TILES_PER_S_256),
        (512, PYTHON_TILES_PER_S_512),
    ] {
        let positions = grid_positions(reader.bounds(), u64::from(px), u64::from(px));
        let tiles: Vec<TileRequest> = positions
            .iter()
            .take(max_tiles)
            .map(|&(x, y)| TileRequest {
                x,
                y,
                size0: u64::from(px),
            })
            .collect();
        for threads in [1usize, 2] {
            let start = Instant::now();
            let cpu_start = cpu_seconds();
            let mut bytes = 0usize;
            let mut count = 0usize;
            read_tiles_ordered::<TileError>(
                &slide,
                &tiles,
                px,
                PoolOptions {
                    threads,
                    ..PoolOptions::default()
                },
                &mut |chunk| {
                    count += chunk.len();
                    bytes += chunk.iter().map(Vec::len).sum::<usize>();
                    Ok(())
                },
            )
            .expect("reading tiles");
            let secs = start.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu_start;
            let rate = count as f64 / secs;
            println!(
                "| level-0 {px} px tiles, {threads} thread(s), {count} tiles | {rate:.0} tiles/s, {:.0} MB/s | {:.0} tiles/CPU-s | {python:.0} tiles/s | {:.2}x |",
                bytes as f64 / secs / 1e6,
                count as f64 / cpu.max(1e-9),
                rate / python
            );
        }
    }
    // Raw OpenSlide reads of the same 256 px tiles (no conversion): the floor under tessera's
    // one-thread figure.
    {
        let raw = openslide_rs::OpenSlide::new(&slide).expect("opening the bench slide");
        let positions = grid_positions(reader.bounds(), 256, 256);
        let start = Instant::now();
        let cpu_start = cpu_seconds();
        let mut count = 0usize;
        for &(x, y) in positions.iter().take(max_tiles) {
            let region = openslide_rs::Region {
                address: openslide_rs::Address {
                    x: x as u32,
                    y: y as u32,
                },
                level: 0,
                size: openslide_rs::Size { w: 256, h: 256 },
            };
            std::hint::black_box(raw.read_region(&region).expect("reading a region"));
            count += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_start;
        println!(
            "| raw openslide_read_region, 256 px, 1 thread, ARGB kept, {count} tiles | {:.0} tiles/s | {:.0} tiles/CPU-s | - | - |",
            count as f64 / secs,
            count as f64 / cpu.max(1e-9)
        );
    }
    // Tissue detection on the 32x overview (the read is timed separately).
    let start = Instant::now();
    let overview = reader.read_overview(32.0).expect("reading the overview");
    let read_ms = start.elapsed().as_secs_f64() * 1e3;
    let params = TissueParams::default();
    let mut times = Vec::new();
    let mut coverage = 0.0;
    for _ in 0..7 {
        let start = Instant::now();
        let mask = detect_tissue(&overview.rgb, overview.width, overview.height, &params);
        times.push(start.elapsed().as_secs_f64() * 1e3);
        coverage = mask.coverage();
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "| tissue detection on the 32x overview ({} x {}, {:.0}% tissue), median of 7 | {median:.1} ms | - | {CLAM_TISSUE_MS:.0} ms | {:.2}x |",
        overview.width,
        overview.height,
        coverage * 100.0,
        CLAM_TISSUE_MS / median
    );
    println!("| reading that overview (level 5 + area resampling) | {read_ms:.1} ms | - | - | - |");
    println!(
        "\nload average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
