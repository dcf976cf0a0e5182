//! The threads of a running stage: the feeder that starts sources and replays slide by slide,
//! the dispatcher that routes a multi-worker stage's inbox, and each worker's loop, which
//! calls the stage on every message and applies the error policy.

use crate::config::ErrorPolicy;
use crate::context::StageContext;
use crate::error::StageError;
use crate::graph::Graph;
use crate::message::{send_or_stop, Envelope, Message, Sent, POLL};
use crate::plan::{Plan, SlideState};
use crate::report::ErrorRecord;
use crate::slide::SlideHandle;
use crate::stage::Stage;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Sends each slide to the sources that compute it and to the cached stages that replay it.
pub(crate) fn feed(
    graph: &Graph,
    plan: &Plan,
    slides: &[SlideHandle],
    senders: &[Sender<Envelope>],
    stop: &AtomicBool,
) {
    for slide in slides {
        for &i in &graph.order {
            let message = match plan.state(i, slide.index) {
                SlideState::Compute if graph.stages[i].source => Message::SlideEnd {
                    slide: slide.clone(),
                },
                SlideState::Replay => Message::Replay {
                    slide: slide.clone(),
                },
                _ => continue,
            };
            if send_or_stop(&senders[i], (0, message), stop) != Sent::Delivered
                && stop.load(Ordering::Relaxed)
            {
                return;
            }
        }
    }
}

/// Routes a multi-worker stage's inbox: all messages about one slide go to the same worker;
/// a new slide goes to the least busy worker.
pub(crate) fn dispatch(
    inbox: Receiver<Envelope>,
    workers: Vec<Sender<Envelope>>,
    n_inputs: usize,
    stop: Arc<AtomicBool>,
) {
    let mut assigned: HashMap<usize, (usize, usize)> = HashMap::new();
    let mut next = 0usize;
    let mut least_busy = |workers: &[Sender<Envelope>]| {
        let min = workers.iter().map(Sender::len).min().unwrap_or(0);
        let candidates: Vec<usize> = (0..workers.len())
            .filter(|&w| workers[w].len() == min)
            .collect();
        next += 1;
        candidates[next % candidates.len()]
    };
    loop {
        let envelope = match inbox.recv_timeout(POLL) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Relaxed) => return,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let worker = match &envelope.1 {
            Message::Batch { slide, .. }
            | Message::SlideEnd { slide }
            | Message::SlideFailed { slide } => {
                let w = match assigned.get(&slide.index) {
                    Some(&(w, _)) => w,
                    None => {
                        let w = least_busy(&workers);
                        assigned.insert(slide.index, (w, 0));
                        w
                    }
                };
                match &envelope.1 {
                    Message::SlideEnd { .. } => {
                        if let Some(entry) = assigned.get_mut(&slide.index) {
                            entry.1 += 1;
                            if entry.1 >= n_inputs {
                                assigned.remove(&slide.index);
                            }
                        }
                    }
                    Message::SlideFailed { .. } => {
                        assigned.remove(&slide.index);
                    }
                    _ => {}
                }
                w
            }
            Message::Replay { .. } => least_busy(&workers),
            Message::EndOfEpoch { .. } => 0,
        };
        if send_or_stop(&workers[worker], envelope, &stop) != Sent::Delivered
            && stop.load(Ordering::Relaxed)
        {
            return;
        }
    }
}

/// One worker: takes messages until its inbox closes (or it closes it), calling the stage.
pub(crate) fn worker_loop(
    mut stage: Box<dyn Stage>,
    mut ctx: StageContext,
    inbox: Receiver<Envelope>,
    policy: ErrorPolicy,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
) {
    let mut failed_slides: HashSet<usize> = HashSet::new();
    let mut inbox = Some(inbox);
    let mut quiet_stop = false;
    while let Some(rx) = inbox.as_ref() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let (input, message) = match rx.recv_timeout(POLL) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let t0 = Instant::now();
        // A failure on a slide's last message must not swallow its next appearance (epochs).
        let last_of_slide = matches!(message, Message::SlideEnd { .. } | Message::Replay { .. });
        let (slide, result) = match message {
            Message::Batch { slide, batch } => {
                if failed_slides.contains(&slide.index) {
                    continue;
                }
                ctx.shared.stats.add_rows_in(batch.num_rows());
                let r = stage.on_batch(&mut ctx, input, &slide, batch);
                (Some(slide), r)
            }
            Message::SlideEnd { slide } => {
                if failed_slides.remove(&slide.index) {
                    continue;
                }
                ctx.shared.stats.add_item_in();
                let r = stage.on_slide_end(&mut ctx, input, &slide);
                (Some(slide), r)
            }
            Message::SlideFailed { slide } => {
                stage.on_slide_failed(&mut ctx, &slide);
                ctx.abort_slide(&slide);
                continue;
            }
            Message::Replay { slide } => {
                ctx.shared.stats.add_item_in();
                let r = replay(&mut *stage, &mut ctx, &slide);
                (Some(slide), r)
            }
            Message::EndOfEpoch { epoch } => (None, stage.on_epoch_end(&mut ctx, epoch)),
        };
        ctx.shared.stats.add_busy(t0.elapsed());
        if let Err(err) = result {
            if err.is_stopped() {
                quiet_stop = true;
                break;
            }
            record_error(&ctx, slide.as_ref(), &err);
            match slide {
                Some(slide) if policy == ErrorPolicy::Skip => {
                    if !last_of_slide {
                        failed_slides.insert(slide.index);
                    }
                    stage.on_slide_failed(&mut ctx, &slide);
                    ctx.abort_slide(&slide);
                }
                _ => {
                    failed.store(true, Ordering::Relaxed);
                    stop.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
        if ctx.inputs_closed {
            inbox = None;
        }
    }
    drop(inbox);
    if quiet_stop || stop.load(Ordering::Relaxed) {
        return;
    }
    let t0 = Instant::now();
    let result = stage.finish(&mut ctx);
    ctx.shared.stats.add_busy(t0.elapsed());
    if let Err(err) = result {
        if !err.is_stopped() {
            record_error(&ctx, None, &err);
            failed.store(true, Ordering::Relaxed);
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Emits a slide's cached output through the stage's `replay` (a cache hit).
fn replay(
    stage: &mut dyn Stage,
    ctx: &mut StageContext,
    slide: &SlideHandle,
) -> Result<(), StageError> {
    let cache = ctx
        .shared
        .cache
        .as_ref()
        .ok_or_else(|| StageError::msg("replay without a cache"))?;
    let key = cache.keys[slide.index]
        .clone()
        .ok_or_else(|| StageError::msg("replay without a cache key"))?;
    let kind = cache.kind.clone();
    let batches = cache.cache.read(&kind, &key).map_err(|e| {
        StageError::msg(format!(
            "{e}; the corrupt cache entry was removed: run again to recompute it"
        ))
    })?;
    ctx.shared.stats.add_cache_hit();
    stage.replay(ctx, slide, batches)
}

/// Lists a stage's error in run.json and logs it.
fn record_error(ctx: &StageContext, slide: Option<&SlideHandle>, err: &StageError) {
    let record = ErrorRecord {
        stage: ctx.shared.name.clone(),
        slide: slide.map(|s| s.id.clone()),
        message: err.to_string(),
        alert: false,
    };
    tracing::error!(stage = %record.stage, slide = record.slide.as_deref().unwrap_or("-"), "{}", record.message);
    if let Ok(mut e) = ctx.shared.errors.lock() {
        e.push(record);
    }
}
