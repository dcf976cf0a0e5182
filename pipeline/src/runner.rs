//! Runs a checked graph: plans per slide what each stage computes or replays, starts one
//! thread per stage worker, connects them with bounded channels, feeds the sources and
//! replays, and gathers the run report. Memory stays bounded by the channel capacities,
//! whatever the number of slides.

use crate::cache::{content_key, file_identity, Cache, KeyParts, TOOL_VERSION};
use crate::claim::{claim_path, ClaimInfo, ClaimSet};
use crate::config::ErrorPolicy;
use crate::context::{Edge, RunShared, StageCache, StageContext, StageShared};
use crate::error::StageError;
use crate::graph::Graph;
use crate::message::{Envelope, Message};
use crate::plan::{decide_with, Demand, Plan, SlideState};
use crate::report::{ErrorRecord, RunReport, RunStatus, ShardReport, StageReport, StageStats};
use crate::shard::Shard;
use crate::slide::SlideHandle;
use crate::stage::{BuildContext, DeviceSpec, Stage};
use arrow::datatypes::Schema;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(50);

/// Everything about a run besides the graph.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub name: String,
    pub seed: u64,
    pub device: DeviceSpec,
    pub cache_dir: PathBuf,
    pub out_dir: PathBuf,
    pub base_dir: PathBuf,
    pub slides: Vec<SlideHandle>,
    /// What the experiment predicts; given to every stage's [`BuildContext`].
    pub task: crate::task::Task,
    pub channel_capacity: usize,
    /// Set from outside (Ctrl-C) to stop the run cleanly.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Draw progress bars on stderr (only where it is a terminal).
    pub progress: bool,
    /// Run only this shard's slides, and only the per-slide cached stages (and what feeds
    /// them), filling the shared cache for a later full run.
    pub shard: Option<Shard>,
    /// A claim on a cache entry that its holder stopped refreshing this long is taken over.
    pub claim_ttl: Duration,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("stage `{stage}`: {source}")]
    Build { stage: String, source: StageError },
    #[error("output folder {path}: {source}")]
    OutDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
}

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

/// Stages a per-slide pass runs: the cached stages whose entries have keys, and everything
/// upstream of them.
fn per_slide_stages(graph: &Graph, plan: &Plan) -> Vec<bool> {
    let mut runs: Vec<bool> = graph
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| s.cache && plan.keys[i].iter().any(Option::is_some))
        .collect();
    for &i in graph.order.iter().rev() {
        if runs[i] {
            for &j in &graph.stages[i].inputs {
                runs[j] = true;
            }
        }
    }
    runs
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
            Pass::Full => make_plan(graph, settings, cache, build_ctx, None)?,
            Pass::PerSlide { members, .. } => {
                let wanted: Vec<bool> = members
                    .iter()
                    .zip(&deferred)
                    .map(|(m, d)| *m && !*d)
                    .collect();
                make_plan(graph, settings, cache, build_ctx, Some(&wanted))?
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
        Pass::PerSlide { .. } => per_slide_stages(graph, &plan),
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
                stats: StageStats::default(),
                errors: Mutex::new(Vec::new()),
                warnings: Mutex::new(Vec::new()),
                details: Mutex::new(serde_json::Map::new()),
                progress: bar,
                cache: s
                    .cache
                    .then(|| stage_cache(graph, i, &cache, &plan, claims.clone())),
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

fn write_report(settings: &RunSettings, report: &RunReport) -> Result<(), RunError> {
    let path = settings.out_dir.join("run.json");
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    std::fs::write(&path, json).map_err(|source| RunError::Report { path, source })
}

/// What stage `stage`'s worker `worker` is told about the run.
fn build_context(
    graph: &Graph,
    settings: &RunSettings,
    slides: &Arc<[SlideHandle]>,
    stage: usize,
    worker: usize,
) -> BuildContext {
    BuildContext {
        stage_name: graph.stages[stage].name.clone(),
        seed: settings.seed,
        device: settings.device.clone(),
        out_dir: settings.out_dir.clone(),
        cache_dir: settings.cache_dir.clone(),
        base_dir: settings.base_dir.clone(),
        slides: slides.clone(),
        task: settings.task,
        workers: graph.stages[stage].workers,
        worker,
    }
}

/// The cache keys of an experiment's plan, per stage (graph index) and slide, `None` where a
/// key cannot be known before running.
fn experiment_keys(
    graph: &Graph,
    exp: &crate::config::Experiment,
) -> Result<Vec<Vec<Option<String>>>, RunError> {
    let settings = RunSettings::for_experiment(exp, None, false);
    let slides: Arc<[SlideHandle]> = settings.slides.clone().into();
    let build_ctx =
        |stage: usize, worker: usize| build_context(graph, &settings, &slides, stage, worker);
    let plan = make_plan(
        graph,
        &settings,
        &Cache::new(&settings.cache_dir),
        &build_ctx,
        None,
    )?;
    Ok(plan.keys)
}

/// Every cache key an experiment would use (for `cache gc --keep`).
pub fn plan_keys(graph: &Graph, exp: &crate::config::Experiment) -> Result<Vec<String>, RunError> {
    Ok(experiment_keys(graph, exp)?
        .into_iter()
        .flatten()
        .flatten()
        .collect())
}

/// The cache key of each slide's output of stage `stage` (graph index) in this experiment,
/// `None` where it cannot be known (for `tessera export`).
pub fn stage_keys(
    graph: &Graph,
    exp: &crate::config::Experiment,
    stage: usize,
) -> Result<Vec<Option<String>>, RunError> {
    Ok(experiment_keys(graph, exp)?
        .into_iter()
        .nth(stage)
        .unwrap_or_default())
}

/// The cache entries a run would write: (kind, key) of every slide of every stage with
/// `cache: true` whose entry is not in the cache yet. Sweeps use it so that two points run
/// side by side never compute the same entry.
pub fn missing_cache_entries(
    graph: &Graph,
    exp: &crate::config::Experiment,
) -> Result<Vec<(String, String)>, RunError> {
    let settings = RunSettings::for_experiment(exp, None, false);
    let slides: Arc<[SlideHandle]> = settings.slides.clone().into();
    let build_ctx =
        |stage: usize, worker: usize| build_context(graph, &settings, &slides, stage, worker);
    let cache = Cache::new(&settings.cache_dir);
    let plan = make_plan(graph, &settings, &cache, &build_ctx, None)?;
    let mut out = Vec::new();
    for (i, keys) in plan.keys.iter().enumerate() {
        let s = &graph.stages[i];
        if !s.cache {
            continue;
        }
        for key in keys.iter().flatten() {
            if !cache.is_valid(&s.kind, key) {
                out.push((s.kind.clone(), key.clone()));
            }
        }
    }
    Ok(out)
}

impl RunSettings {
    /// The settings of a loaded experiment.
    pub fn for_experiment(
        exp: &crate::config::Experiment,
        interrupt: Option<Arc<AtomicBool>>,
        progress: bool,
    ) -> RunSettings {
        RunSettings {
            name: exp.config.name.clone(),
            seed: exp.config.seed,
            device: exp.device.clone(),
            cache_dir: exp.cache_dir.clone(),
            out_dir: exp.out_dir.clone(),
            base_dir: exp.base_dir.clone(),
            slides: exp.slides.clone(),
            task: exp.config.task,
            channel_capacity: exp.config.channel_capacity,
            interrupt,
            progress,
            shard: None,
            claim_ttl: std::time::Duration::from_secs(exp.config.claim_ttl_s),
        }
    }
}

/// Works out every cache key and what each stage does for each slide. With `per_slide`, only
/// the cache entries of those slides are wanted (a shard); otherwise the sinks' outputs.
fn make_plan(
    graph: &Graph,
    settings: &RunSettings,
    cache: &Cache,
    build_ctx: &dyn Fn(usize, usize) -> BuildContext,
    per_slide: Option<&[bool]>,
) -> Result<Plan, RunError> {
    let n = settings.slides.len();
    let needs_identity = graph.stages.iter().any(|s| s.source);
    let identities: Vec<String> = settings
        .slides
        .iter()
        .map(|slide| match (&slide.path, needs_identity) {
            (Some(p), true) => file_identity(p).unwrap_or_else(|e| format!("unreadable: {e}")),
            _ => String::new(),
        })
        .collect();
    let mut keys: Vec<Vec<Option<String>>> = vec![vec![None; n]; graph.stages.len()];
    for &i in &graph.order {
        let s = &graph.stages[i];
        if !s.stage.cacheable() {
            continue;
        }
        let salt = s
            .stage
            .cache_salt(&build_ctx(i, 0))
            .map_err(|source| RunError::Build {
                stage: s.name.clone(),
                source,
            })?;
        let params = serde_json::to_string(&s.stage.key_params()).unwrap_or_default();
        for (slide_index, slide) in settings.slides.iter().enumerate() {
            let input_keys: Option<Vec<String>> = s
                .inputs
                .iter()
                .map(|&j| keys[j][slide_index].clone())
                .collect();
            let Some(input_keys) = input_keys else {
                continue;
            };
            if identities[slide_index].starts_with("unreadable") && s.source {
                continue;
            }
            keys[i][slide_index] = Some(content_key(&KeyParts {
                kind: &s.kind,
                version: &s.version,
                params: &params,
                salt: &salt,
                slide_id: &slide.id,
                slide_identity: if s.source {
                    &identities[slide_index]
                } else {
                    ""
                },
                input_keys: &input_keys,
            }));
        }
    }
    let consumers: Vec<Vec<usize>> = graph
        .consumers
        .iter()
        .map(|c| c.iter().map(|&(s, _)| s).collect())
        .collect();
    let cache_enabled: Vec<bool> = graph.stages.iter().map(|s| s.cache).collect();
    let demand = |stage: usize, slide: usize| match per_slide {
        None if consumers[stage].is_empty() => Demand::Output,
        None => Demand::None,
        Some(members) if members[slide] && cache_enabled[stage] && keys[stage][slide].is_some() => {
            Demand::Cached
        }
        Some(_) => Demand::None,
    };
    let states = decide_with(
        &graph.order,
        &consumers,
        &cache_enabled,
        n,
        demand,
        |stage, slide| {
            keys[stage][slide]
                .as_deref()
                .is_some_and(|k| cache.is_valid(&graph.stages[stage].kind, k))
        },
    );
    Ok(Plan { states, keys })
}

fn stage_cache(
    graph: &Graph,
    i: usize,
    cache: &Cache,
    plan: &Plan,
    claims: Arc<ClaimSet>,
) -> StageCache {
    let s = &graph.stages[i];
    let uncached = s.stage.uncached_columns();
    let fields: Vec<_> = s
        .output_schema
        .fields()
        .iter()
        .filter(|f| !uncached.contains(f.name()))
        .cloned()
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("tessera.stage".to_string(), s.name.clone());
    metadata.insert("tessera.kind".to_string(), s.kind.clone());
    metadata.insert("tessera.version".to_string(), s.version.clone());
    metadata.insert(
        "tessera.params".to_string(),
        serde_json::to_string(&s.stage.canonical_params()).unwrap_or_default(),
    );
    StageCache {
        cache: cache.clone(),
        kind: s.kind.clone(),
        keys: plan.keys[i].clone(),
        schema: Arc::new(Schema::new(fields)),
        uncached,
        metadata,
        claims,
    }
}

/// Sends each slide to the sources that compute it and to the cached stages that replay it.
fn feed(
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
            if !send_or_stop(&senders[i], (0, message), stop) && stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// Sends, waiting while the channel is full; false when the receiver is gone or the run stops.
fn send_or_stop(sender: &Sender<Envelope>, mut envelope: Envelope, stop: &AtomicBool) -> bool {
    loop {
        match sender.send_timeout(envelope, POLL) {
            Ok(()) => return true,
            Err(SendTimeoutError::Timeout(back)) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                envelope = back;
            }
            Err(SendTimeoutError::Disconnected(_)) => return false,
        }
    }
}

/// Routes a multi-worker stage's inbox: all messages about one slide go to the same worker;
/// a new slide goes to the least busy worker.
fn dispatch(
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
        if !send_or_stop(&workers[worker], envelope, &stop) && stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// One worker: takes messages until its inbox closes (or it closes it), calling the stage.
fn worker_loop(
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
