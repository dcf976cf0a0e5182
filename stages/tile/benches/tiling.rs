//! Tiling throughput on a big pyramidal slide, side by side with openslide-python.
//!
//! `cargo bench -p tessera-tile --bench tiling` builds the 19980 x 20769 px, 8-level JPEG TIFF
//! with `/work/shared/data/make_big_slide.sh` (vips) into `target/tessera-bench/` when absent
//! (or uses `TESSERA_BENCH_SLIDE`), then prints a markdown table: every level-0 tile read
//! through the reader pool with the direct JPEG reader (`reader: auto`) and through OpenSlide
//! (`reader: openslide`), 256 and 512 px, 1 and 2 threads, as wall-clock tiles/s and as tiles
//! per user-CPU-second and per CPU-second (user + system), which stay meaningful when other
//! processes load the machine; then libjpeg-turbo vs zune-jpeg on the same tile streams, and
//! tissue detection. `TESSERA_BENCH_MAX_TILES` caps the tiles read per configuration.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tessera_tile::direct::DirectReader;
use tessera_tile::grid::grid_positions;
use tessera_tile::pool::{read_tiles_ordered, PoolOptions, TileRequest};
use tessera_tile::tissue::{detect_tissue, TissueParams};
use tessera_tile::turbo::JpegDecoder;
use tessera_tile::{ReaderMode, SlideReader, TileError};

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

/// (user, user + system) CPU seconds used by this process so far, from /proc: robust to
/// other processes sharing the machine, unlike wall time.
fn cpu_seconds() -> (f64, f64) {
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
    (ticks(11) / 100.0, (ticks(11) + ticks(12)) / 100.0)
}

/// Wall seconds, user CPU seconds and total CPU seconds of `work`.
fn measure(work: impl FnOnce()) -> (f64, f64, f64) {
    let start = Instant::now();
    let (user0, cpu0) = cpu_seconds();
    work();
    let (user1, cpu1) = cpu_seconds();
    (start.elapsed().as_secs_f64(), user1 - user0, cpu1 - cpu0)
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
    println!("| level-0 tiles | reader | threads | tiles | wall tiles/s | tiles / user-CPU-s | tiles / CPU-s | openslide-python (1 process, wall) | ratio wall | ratio per CPU-s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
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
        for mode in [ReaderMode::Openslide, ReaderMode::Auto] {
            for threads in [1usize, 2] {
                let mut count = 0usize;
                let (secs, user, cpu) = measure(|| {
                    read_tiles_ordered::<TileError>(
                        &slide,
                        &tiles,
                        px,
                        PoolOptions {
                            threads,
                            mode,
                            ..PoolOptions::default()
                        },
                        &mut |chunk| {
                            count += chunk.len();
                            std::hint::black_box(&chunk);
                            Ok(())
                        },
                    )
                    .expect("reading tiles");
                });
                let rate = count as f64 / secs;
                let per_cpu = count as f64 / cpu.max(1e-9);
                let name = match mode {
                    ReaderMode::Auto => "direct (auto)",
                    ReaderMode::Openslide => "openslide",
                };
                println!(
                    "| {px} px | {name} | {threads} | {count} | {rate:.0} | {:.0} | {per_cpu:.0} | {python:.0} | {:.2}x | {:.2}x |",
                    count as f64 / user.max(1e-9),
                    rate / python,
                    per_cpu / python
                );
            }
        }
    }
    println!();
    decoder_comparison(&slide, &reader, max_tiles);
    println!();
    println!("| measure | tessera (wall) | tessera per CPU-second | openslide-python / CLAM | ratio (wall) |");
    println!("|---|---|---|---|---|");
    // Raw OpenSlide reads of the same 256 px tiles (no conversion): the floor under tessera's
    // one-thread figure.
    {
        let raw = openslide_rs::OpenSlide::new(&slide).expect("opening the bench slide");
        let positions = grid_positions(reader.bounds(), 256, 256);
        let mut count = 0usize;
        let (secs, _, cpu) = measure(|| {
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
        });
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

/// libjpeg-turbo (what the direct reader uses) against zune-jpeg (pure Rust) on the same
/// spliced level-0 tile streams, decode only (streams read beforehand), one thread.
fn decoder_comparison(slide: &Path, reader: &SlideReader, max_tiles: usize) {
    let vendor = openslide_rs::OpenSlide::new(slide)
        .ok()
        .and_then(|s| s.property_value("openslide.vendor").ok())
        .unwrap_or_default();
    let direct = match DirectReader::open(slide, &vendor, reader.levels()) {
        Ok(d) => d,
        Err(e) => {
            println!("decoder comparison skipped: {e}");
            return;
        }
    };
    let Some((count, tw, th)) = direct.tile_grid(0) else {
        println!("decoder comparison skipped: level 0 is not read directly");
        return;
    };
    let streams: Vec<Vec<u8>> = (0..count.min(max_tiles).min(2000))
        .filter_map(|i| {
            let mut s = Vec::new();
            direct.tile_stream(0, i, &mut s).ok().map(|()| s)
        })
        .collect();
    let n = streams.len();
    let mut turbo = JpegDecoder::new().expect("TurboJPEG decompressor");
    let mut out = vec![0u8; (tw * th * 3) as usize];
    let mut reference = Vec::with_capacity(n);
    let (t_secs, _, t_cpu) = measure(|| {
        for s in &streams {
            turbo
                .decode_rgb(s, tw, th, &mut out, 0, tw as usize * 3)
                .expect("TurboJPEG decode");
            reference.push(out[..64 * 3].to_vec());
        }
    });
    let mut max_diff = 0u8;
    let (z_secs, _, z_cpu) = measure(|| {
        for (s, want) in streams.iter().zip(&reference) {
            let mut dec = zune_jpeg::JpegDecoder::new(zune_core::bytestream::ZCursor::new(s));
            dec.decode_into(&mut out).expect("zune-jpeg decode");
            for (a, b) in out[..64 * 3].iter().zip(want) {
                max_diff = max_diff.max(a.abs_diff(*b));
            }
        }
    });
    println!("Decoders on {n} level-0 tile streams ({tw} x {th} px), decode only, 1 thread:\n");
    println!("| decoder | wall tiles/s | tiles / CPU-s |");
    println!("|---|---|---|");
    println!(
        "| libjpeg-turbo (TurboJPEG, accurate IDCT, fancy upsampling) | {:.0} | {:.0} |",
        n as f64 / t_secs,
        n as f64 / t_cpu.max(1e-9)
    );
    println!(
        "| zune-jpeg 0.5 | {:.0} | {:.0} |",
        n as f64 / z_secs,
        n as f64 / z_cpu.max(1e-9)
    );
    println!("\nzune-jpeg vs libjpeg-turbo, first row of each tile: max abs diff {max_diff}");
}
