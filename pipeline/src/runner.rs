//! Runs a checked graph: the passes of a run (a full pass; per-slide passes for shards and for
//! what other processes leave), each claiming the cache entries it computes; and one pass's
//! wiring: build every worker, connect them with bounded channels, start their threads
//! ([`crate::worker`]), feed the sources and replays, and gather the run report. Memory stays
//! bounded by the channel capacities, whatever the number of slides.

use crate::cache::{Cache, TOOL_VERSION};
use crate::claim::{claim_path, ClaimInfo, ClaimSet};
use crate::context::{Edge, RunShared, StageCache, StageContext, StageShared};
use crate::error::StageError;
use crate::graph::Graph;
use crate::message::{Envelope, POLL};
use crate::plan::{Plan, SlideState};
use crate::report::{RunReport, RunStatus, ShardReport, StageReport, StageStats};
use crate::settings::{build_context, write_report, RunError, RunSettings};
use crate::shard::Shard;
use crate::slide::SlideHandle;
use crate::stage::{BuildContext, Stage};
use crate::worker::{dispatch, feed, worker_loop};
use crossbeam_channel::{bounded, Receiver, Sender};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Which run a pass makes.
enum Pass {
    /// Every stage, every slide.
    Full,
    /// The per-slide cached stages (and what feeds them) for the slides in `members`;
    /// slides another process is computing are deferred to it.
    PerSlide {
        shard: Option<Shard>,
        members: Vec<bool>,
    },
}

/// How a pass ended.
enum PassOutcome {
    Done(RunReport),
    /// A full pass found entries other live processes are computing: their claim files.
    Busy(Vec<(PathBuf, Option<ClaimInfo>)>),
}

/// Runs the graph to completion (or failure, or interruption) and writes `out_dir/run.json`.
///
/// Entries are claimed before they are computed, so that processes sharing the cache never
/// compute one twice at once. A shard run leaves entries claimed by others to them. A full run
/// that finds such claims first computes every per-slide entry nobody else is computing, then
/// waits for the others' claims to go (finished, or abandoned), then runs in full.
pub fn execute(graph: &Graph, settings: &RunSettings) -> Result<RunReport, RunError> {
    if let Some(shard) = settings.shard {
        let members = shard.members(&settings.slides);
        return match execute_pass(
            graph,
            settings,
            Pass::PerSlide {
                shard: Some(shard),
                members,
            },
        )? {
            PassOutcome::Done(report) => Ok(report),
            PassOutcome::Busy(_) => unreachable!("per-slide passes defer busy slides"),
        };
    }
    let started = Instant::now();
    let mut prefetched: Option<RunReport> = None;
    loop {
        let busy = match execute_pass(graph, settings, Pass::Full)? {
            PassOutcome::Done(mut report) => {
                if let Some(pre) = &prefetched {
                    // Entries computed before waiting were computed by this run too.
                    for s in &mut report.stages {
                        s.cache_misses += pre.stage(&s.name).map_or(0, |p| p.cache_misses);
                    }
                    report.seconds = started.elapsed().as_secs_f64();
                    write_report(settings, &report)?;
                }
                return Ok(report);
            }
            PassOutcome::Busy(busy) => busy,
        };
        if prefetched.is_none() {
            let members = vec![true; settings.slides.len()];
            let pass = Pass::PerSlide {
                shard: None,
                members,
            };
            if let PassOutcome::Done(report) = execute_pass(graph, settings, pass)? {
                if report.status != RunStatus::Ok {
                    return Ok(report);
                }
                prefetched = Some(report);
            }
        }
        let holders: HashSet<String> = busy
            .iter()
            .filter_map(|(_, h)| h.as_ref().map(ToString::to_string))
            .collect();
        tracing::info!(
            "waiting for {} cache entries that other processes are computing ({})",
            busy.len(),
            holders.into_iter().collect::<Vec<_>>().join(", ")
        );
        while busy.iter().any(|(path, _)| {
            path.exists() && !crate::claim::claim_file_is_stale(path, settings.claim_ttl)
        }) {
            if settings
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Relaxed))
            {
                let mut report = prefetched.take().unwrap_or_else(|| empty_report(settings));
                report.status = RunStatus::Cancelled;
                return Ok(report);
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
}

fn empty_report(settings: &RunSettings) -> RunReport {
    RunReport {
        name: settings.name.clone(),
        tool: TOOL_VERSION.to_string(),
        status: RunStatus::Ok,
        slides: settings.slides.len(),
        seconds: 0.0,
        stages: Vec::new(),
        errors: Vec::new(),
        shard: None,
    }
}

/// Claims every entry the plan computes, slide by slide and, within a slide, in topological
/// order, so that of two processes wanting a slide, whoever claims its first entry gets the
/// whole slide. A slide with an entry another process holds is given up entirely (its claims
/// released) and reported busy: (slide index, claim file, holder). The flag says that some
/// entry turned out complete once claimed (finished meanwhile): the plan is stale.
fn claim_computed(
    graph: &Graph,
    plan: &Plan,
    cache: &Cache,
    claims: &ClaimSet,
) -> (Vec<(usize, PathBuf, Option<ClaimInfo>)>, bool) {
    let mut busy = Vec::new();
    let mut done_meanwhile = false;
    let mut wanted = HashSet::new();
    let n = plan.states.first().map_or(0, Vec::len);
    for slide in 0..n {
        let mut taken = Vec::new();
        for &i in &graph.order {
            let s = &graph.stages[i];
            let Some(Some(key)) = plan.keys[i].get(slide) else {
                continue;
            };
            if !s.cache || plan.state(i, slide) != SlideState::Compute {
                continue;
            }
            let path = claim_path(&cache.entry_path(&s.kind, key));
            match claims.acquire(&path) {
                Ok(None) if cache.is_valid(&s.kind, key) => {
                    claims.release(&path);
                    done_meanwhile = true;
                }
                Ok(None) => taken.push(path),
                Ok(Some(holder)) => {
                    for p in taken.drain(..) {
                        claims.release(&p);
                    }
                    busy.push((slide, path, holder));
                    break;
                }
                Err(e) => {
                    tracing::warn!(claim = %path.display(), "cannot claim the cache entry ({e}); computing it unclaimed")
                }
            }
        }
        wanted.extend(taken);
    }
    claims.retain(|p| wanted.contains(p));
    (busy, done_meanwhile)
}

/// Plans a pass and claims what it computes, deferring (per-slide passes) or reporting (full
/// passes) what other processes are computing.
#[allow(clippy::type_complexity)]
fn plan_and_claim(
    graph: &Graph,
    settings: &RunSettings,
    cache: &Cache,
    build_ctx: &dyn Fn(usize, usize) -> BuildContext,
    pass: &Pass,
    claims: &ClaimSet,
) -> Result<Result<(Plan, Vec<bool>), Vec<(PathBuf, Option<ClaimInfo>)>>, RunError> {
    let n = settings.slides.len();
    let mut deferred = vec![false; n];
    loop {
        let plan = match pass {
            Pass::Full => Plan::make(graph, settings, cache, build_ctx, None)?,
            Pass::PerSlide { members, .. } => {
                let wanted: Vec<bool> = members
                    .iter()
                    .zip(&deferred)
                    .map(|(m, d)| *m && !*d)
                    .collect();
                Plan::make(graph, settings, cache, build_ctx, Some(&wanted))?
            }
        };
        let (busy, done_meanwhile) = claim_computed(graph, &plan, cache, claims);
        if busy.is_empty() && !done_meanwhile {
            return Ok(Ok((plan, deferred)));
        }
        if matches!(pass, Pass::Full) && !busy.is_empty() {
            claims.release_all();
            return Ok(Err(busy.into_iter().map(|(_, p, h)| (p, h)).collect()));
        }
        for (slide, path, holder) in busy {
            if !deferred[slide] {
                tracing::info!(slide = %settings.slides[slide].id, claim = %path.display(), holder = ?holder.map(|h| h.to_string()), "another process is computing this slide; leaving it to it");
            }
            deferred[slide] = true;
        }
    }
}

fn execute_pass(
    graph: &Graph,
    settings: &RunSettings,
    pass: Pass,
) -> Result<PassOutcome, RunError> {
    let started = Instant::now();
    std::fs::create_dir_all(&settings.out_dir).map_err(|source| RunError::OutDir {
        path: settings.out_dir.clone(),
        source,
    })?;
    let slides: Arc<[SlideHandle]> = settings.slides.clone().into();
    let cache = Cache::new(&settings.cache_dir);
    let build_ctx =
        |stage: usize, worker: usize| build_context(graph, settings, &slides, stage, worker);

    let claims = ClaimSet::new(settings.claim_ttl);
    let (plan, deferred) =
        match plan_and_claim(graph, settings, &cache, &build_ctx, &pass, &claims)? {
            Ok(x) => x,
            Err(busy) => return Ok(PassOutcome::Busy(busy)),
        };
    let _heartbeat = claims.heartbeat();
    let plan = Arc::new(plan);
    let runs: Vec<bool> = match &pass {
        Pass::Full => vec![true; graph.stages.len()],
        Pass::PerSlide { .. } => plan.per_slide_stages(graph),
    };
    let shard_report = match &pass {
        Pass::Full => None,
        Pass::PerSlide { shard, members } => Some(ShardReport {
            shard: shard.map(|s| s.to_string()),
            slides: slides
                .iter()
                .filter(|s| members[s.index])
                .map(|s| s.id.clone())
                .collect(),
            deferred: slides
                .iter()
                .filter(|s| deferred[s.index])
                .map(|s| s.id.clone())
                .collect(),
            stages_not_run: graph
                .order
                .iter()
                .filter(|&&i| !runs[i])
                .map(|&i| graph.stages[i].name.clone())
                .collect(),
        }),
    };

    // Build every worker before starting anything, so a bad model path fails fast.
    let mut built: Vec<Vec<Box<dyn Stage>>> = Vec::new();
    for (i, s) in graph.stages.iter().enumerate() {
        let mut workers = Vec::new();
        if !runs[i] {
            built.push(workers);
            continue;
        }
        for w in 0..s.workers {
            workers.push(
                s.stage
                    .build(&build_ctx(i, w))
                    .map_err(|source| RunError::Build {
                        stage: s.name.clone(),
                        source,
                    })?,
            );
        }
        built.push(workers);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let run = Arc::new(RunShared {
        cancel: stop.clone(),
        plan: plan.clone(),
        items: Default::default(),
    });
    let multi = MultiProgress::with_draw_target(if settings.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style =
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");

    // One inbox per stage.
    let inboxes: Vec<(Sender<Envelope>, Receiver<Envelope>)> = graph
        .stages
        .iter()
        .map(|_| bounded(settings.channel_capacity))
        .collect();
    let shared: Vec<Arc<StageShared>> = graph
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (compute, replay, _) = plan.counts(i);
            let bar = multi.add(ProgressBar::new((compute + replay) as u64));
            bar.set_style(style.clone());
            bar.set_prefix(s.name.clone());
            Arc::new(StageShared {
                index: i,
                name: s.name.clone(),
                output_schema: s.output_schema.clone(),
                stats: StageStats::default(),
                errors: Mutex::new(Vec::new()),
                warnings: Mutex::new(Vec::new()),
                details: Mutex::new(serde_json::Map::new()),
                progress: bar,
                cache: s
                    .cache
                    .then(|| StageCache::for_stage(graph, i, &cache, &plan, claims.clone())),
                items: Default::default(),
            })
        })
        .collect();

    let watcher = settings.interrupt.clone().map(|flag| {
        let stop = stop.clone();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let handle = thread::spawn(move || {
            while !done2.load(Ordering::Relaxed) {
                if flag.load(Ordering::Relaxed) {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                thread::sleep(POLL);
            }
        });
        (done, handle)
    });

    let mut handles = Vec::new();
    for (i, workers) in built.into_iter().enumerate() {
        let gs = &graph.stages[i];
        if workers.is_empty() {
            continue; // not part of this pass
        }
        let make_ctx = |w: usize| StageContext {
            shared: shared[i].clone(),
            run: run.clone(),
            outputs: graph.consumers[i]
                .iter()
                .map(|&(c, k)| Edge {
                    sender: inboxes[c].0.clone(),
                    input_index: k,
                    consumer: c,
                    alive: true,
                })
                .collect(),
            pending: HashMap::new(),
            build: build_ctx(i, w),
            inputs_closed: false,
        };
        let receivers: Vec<Receiver<Envelope>> = if workers.len() == 1 {
            vec![inboxes[i].1.clone()]
        } else {
            let (senders, receivers): (Vec<_>, Vec<_>) =
                (0..workers.len()).map(|_| bounded(2)).unzip();
            let inbox = inboxes[i].1.clone();
            let n_inputs = gs.inputs.len().max(1);
            let stop = stop.clone();
            handles.push(thread::spawn(move || {
                dispatch(inbox, senders, n_inputs, stop)
            }));
            receivers
        };
        for (w, (stage, rx)) in workers.into_iter().zip(receivers).enumerate() {
            let ctx = make_ctx(w);
            let policy = gs.on_error;
            let (worker_stop, worker_failed) = (stop.clone(), failed.clone());
            let name = format!("tessera-{}-{w}", gs.name);
            let spawned = thread::Builder::new().name(name).spawn(move || {
                worker_loop(stage, ctx, rx, policy, worker_stop, worker_failed);
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(RunError::Build {
                        stage: gs.name.clone(),
                        source: StageError::Io(e),
                    });
                }
            }
        }
    }

    // Feed sources and replays in dataset order, then close the feeder's ends.
    let feeder_senders: Vec<Sender<Envelope>> = inboxes.iter().map(|(s, _)| s.clone()).collect();
    drop(inboxes);
    feed(graph, &plan, &slides, &feeder_senders, &stop);
    drop(feeder_senders);

    for h in handles {
        let _ = h.join();
    }
    if let Some((done, handle)) = watcher {
        done.store(true, Ordering::Relaxed);
        let _ = handle.join();
    }
    let interrupted = settings
        .interrupt
        .as_ref()
        .is_some_and(|f| f.load(Ordering::Relaxed));
    let status = if failed.load(Ordering::Relaxed) {
        RunStatus::Failed
    } else if interrupted {
        RunStatus::Cancelled
    } else {
        RunStatus::Ok
    };
    claims.release_all();
    let mut stages = Vec::new();
    let mut all_errors = Vec::new();
    for &i in &graph.order {
        let s = &graph.stages[i];
        if !runs[i] {
            shared[i].progress.finish_and_clear();
            continue;
        }
        let sh = &shared[i];
        sh.progress.finish();
        let errors = sh.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let warnings = sh.warnings.lock().map(|e| e.clone()).unwrap_or_default();
        let details = sh.details.lock().map(|d| d.clone()).unwrap_or_default();
        all_errors.extend(errors.iter().cloned());
        let (_, _, skipped) = plan.counts(i);
        stages.push(StageReport::from_stats(
            &s.name,
            &s.kind,
            s.workers,
            s.cache,
            skipped as u64,
            &sh.stats,
            errors,
            warnings,
            details,
        ));
    }
    let report = RunReport {
        name: settings.name.clone(),
        tool: TOOL_VERSION.to_string(),
        status,
        slides: slides.len(),
        seconds: started.elapsed().as_secs_f64(),
        stages,
        errors: all_errors,
        shard: shard_report,
    };
    write_report(settings, &report)?;
    Ok(PassOutcome::Done(report))
}
