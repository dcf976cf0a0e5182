//! Progress in work items (tiles) next to a stage's per-slide bar: a slide of 20,000 tiles
//! takes minutes to embed, and a bar that counts slides shows `0/1` all along. Stages that
//! know how many items are coming add them to the run's plan (`tiles` does, per slide, once
//! it has found the tissue); every stage counting the same unit shows done / planned, its rate
//! and the time left for what is planned so far.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The unit of tiles, counted by `tiles` (which plans them) and `embed`.
pub const TILES: &str = "tiles";

/// Items planned in the run, per unit (shared by every stage).
#[derive(Default)]
pub(crate) struct PlannedItems(Mutex<HashMap<String, u64>>);

impl PlannedItems {
    pub fn add(&self, unit: &str, n: u64) -> u64 {
        let Ok(mut m) = self.0.lock() else { return 0 };
        let v = m.entry(unit.to_string()).or_default();
        *v += n;
        *v
    }

    pub fn get(&self, unit: &str) -> u64 {
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(unit).copied())
            .unwrap_or(0)
    }
}

/// Items one stage has done, and since when it counts.
#[derive(Default)]
pub(crate) struct DoneItems {
    done: AtomicU64,
    since: Mutex<Option<Instant>>,
}

impl DoneItems {
    /// Adds `n` and returns (done, seconds since the first count).
    pub fn add(&self, n: u64) -> (u64, f64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        (done, self.elapsed())
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Seconds since the stage first counted or planned (starting the clock now if not yet).
    pub fn elapsed(&self) -> f64 {
        let Ok(mut since) = self.since.lock() else {
            return 0.0;
        };
        since
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_secs_f64()
    }
}

/// `1234/5000 tiles · 45.2 tiles/s · ETA 1:21`
pub(crate) fn render(unit: &str, done: u64, planned: u64, secs: f64) -> String {
    let planned = planned.max(done);
    let mut s = format!("{done}/{planned} {unit}");
    if done > 0 && secs > 0.5 {
        let rate = done as f64 / secs;
        s += &format!(" · {rate:.1} {unit}/s");
        if planned > done {
            s += &format!(" · ETA {}", clock((planned - done) as f64 / rate));
        }
    }
    s
}

/// `h:mm:ss` or `m:ss`.
fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_rate_and_time_left() {
        assert_eq!(render("tiles", 0, 500, 0.0), "0/500 tiles");
        assert_eq!(
            render("tiles", 100, 500, 10.0),
            "100/500 tiles · 10.0 tiles/s · ETA 0:40"
        );
        assert_eq!(
            render("tiles", 500, 500, 10.0),
            "500/500 tiles · 50.0 tiles/s"
        );
        assert_eq!(clock(3725.0), "1:02:05");
        // Done ahead of a plan nobody made (no planning stage): planned follows done.
        assert_eq!(render("tiles", 7, 0, 0.1), "7/7 tiles");
        let p = PlannedItems::default();
        p.add("tiles", 3);
        assert_eq!(p.add("tiles", 4), 7);
        assert_eq!(p.get("tiles"), 7);
        assert_eq!(p.get("cells"), 0);
    }
}
