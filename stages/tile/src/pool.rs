//! Parallel tile reading for one slide: a few threads, each with its own OpenSlide handle,
//! decode chunks of consecutive tiles; the caller receives them in the original order. At
//! most a fixed window of chunks is in flight, so memory stays bounded however large the
//! slide is.

use crate::error::{TileError, TileResult};
use crate::reader::{ReaderMode, SlideReader};
use crossbeam_channel::{bounded, unbounded};
use std::collections::BTreeMap;
use std::path::Path;

/// One tile to read: level-0 top-left corner and level-0 side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileRequest {
    pub x: u64,
    pub y: u64,
    pub size0: u64,
}

/// How the pool splits and overlaps work.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Reading threads, each opening the slide once.
    pub threads: usize,
    /// Tiles per unit of work (consecutive tiles share TIFF tiles and the handle's cache).
    pub chunk: usize,
    /// Chunks in flight per thread: bounds the memory held ahead of the consumer.
    pub ahead: usize,
    /// Pixel decoder of every thread's reader.
    pub mode: ReaderMode,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            threads: 2,
            chunk: 8,
            ahead: 4,
            mode: ReaderMode::Auto,
        }
    }
}

/// Reads every tile of `tiles` as `out_px x out_px` RGB8 and passes them to `sink` in order,
/// one chunk (a run of consecutive tiles) per call. Stops at the first read error or sink
/// error, which it returns.
pub fn read_tiles_ordered<E: From<TileError>>(
    path: &Path,
    tiles: &[TileRequest],
    out_px: u32,
    options: PoolOptions,
    sink: &mut dyn FnMut(Vec<Vec<u8>>) -> Result<(), E>,
) -> Result<(), E> {
    if tiles.is_empty() {
        return Ok(());
    }
    let chunk = options.chunk.max(1);
    let chunks: Vec<&[TileRequest]> = tiles.chunks(chunk).collect();
    let threads = options.threads.clamp(1, chunks.len());
    let window = threads * options.ahead.max(1);
    let (job_tx, job_rx) = bounded::<usize>(window);
    let (done_tx, done_rx) = unbounded::<(usize, TileResult<Vec<Vec<u8>>>)>();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (job_rx, done_tx, chunks) = (job_rx.clone(), done_tx.clone(), &chunks);
            scope.spawn(move || {
                let reader = match SlideReader::open_with(path, options.mode) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = done_tx.send((usize::MAX, Err(e)));
                        return;
                    }
                };
                while let Ok(index) = job_rx.recv() {
                    let result = chunks[index]
                        .iter()
                        .map(|t| {
                            let mut out = Vec::new();
                            reader
                                .read_tile_into(t.x, t.y, t.size0, out_px, &mut out)
                                .map(|()| out)
                        })
                        .collect::<TileResult<Vec<_>>>();
                    if done_tx.send((index, result)).is_err() {
                        return;
                    }
                }
            });
        }
        drop((job_rx, done_tx));
        let mut next_job = 0;
        while next_job < chunks.len() && next_job < window {
            // Cannot block: at most `window` jobs are ever queued.
            let _ = job_tx.send(next_job);
            next_job += 1;
        }
        let mut ready: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
        let mut next_out = 0;
        let result = 'run: loop {
            if next_out == chunks.len() {
                break Ok(());
            }
            match done_rx.recv() {
                Ok((index, Ok(pixels))) => {
                    ready.insert(index, pixels);
                }
                Ok((_, Err(e))) => break Err(E::from(e)),
                Err(_) => {
                    break Err(E::from(TileError::Geometry {
                        path: path.to_path_buf(),
                        message: "tile reading threads stopped unexpectedly".into(),
                    }))
                }
            }
            while let Some(pixels) = ready.remove(&next_out) {
                if let Err(e) = sink(pixels) {
                    break 'run Err(e);
                }
                next_out += 1;
                if next_job < chunks.len() {
                    let _ = job_tx.send(next_job);
                    next_job += 1;
                }
            }
        };
        // Closing the job queue lets idle workers exit; the scope joins them.
        drop(job_tx);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::slide_path;

    #[test]
    fn tiles_arrive_in_order_and_match_single_reads() {
        let path = slide_path("CMU-1-Small-Region.svs");
        let reader = SlideReader::open(&path).unwrap();
        let tiles: Vec<TileRequest> = (0..13)
            .map(|i| TileRequest {
                x: (i % 5) * 300,
                y: (i / 5) * 400,
                size0: 256,
            })
            .collect();
        let options = PoolOptions {
            threads: 3,
            chunk: 2,
            ahead: 1,
            ..PoolOptions::default()
        };
        let mut got = Vec::new();
        read_tiles_ordered::<TileError>(&path, &tiles, 128, options, &mut |chunk| {
            got.extend(chunk);
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), 13);
        for (t, pixels) in tiles.iter().zip(&got) {
            assert_eq!(
                pixels,
                &reader.read_tile(t.x, t.y, t.size0, 128).unwrap(),
                "{t:?}"
            );
        }
    }

    #[test]
    fn sink_errors_stop_the_pool() {
        let path = slide_path("CMU-1-Small-Region.svs");
        let tiles: Vec<TileRequest> = (0..40)
            .map(|i| TileRequest {
                x: i * 10,
                y: 0,
                size0: 64,
            })
            .collect();
        let mut calls = 0;
        let err = read_tiles_ordered::<TileError>(
            &path,
            &tiles,
            64,
            PoolOptions {
                threads: 2,
                chunk: 1,
                ahead: 2,
                ..PoolOptions::default()
            },
            &mut |_| {
                calls += 1;
                if calls == 3 {
                    Err(TileError::NoPath {
                        slide_id: "stop".into(),
                    })
                } else {
                    Ok(())
                }
            },
        )
        .unwrap_err();
        assert_eq!(calls, 3);
        assert!(err.to_string().contains("stop"));
    }

    #[test]
    fn read_errors_name_the_slide() {
        let path = slide_path("unreadable.svs");
        let tiles = [TileRequest {
            x: 0,
            y: 0,
            size0: 16,
        }];
        let err =
            read_tiles_ordered::<TileError>(&path, &tiles, 16, PoolOptions::default(), &mut |_| {
                Ok(())
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("unreadable.svs"), "{err}");
    }
}
