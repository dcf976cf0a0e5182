//! The training loop as plain functions over bags, testable without the engine: one epoch of
//! Adam steps over shuffled mini-batches of bags, validation, best/last checkpoints, early
//! stopping, resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use rand::seq::SliceRandom;

use super::checkpoint::{self, CheckpointFiles, CheckpointMeta};
use super::error::{CandleContext, TrainError};
use super::finetune::{EmbedderConfig, EmbedderSetup, FinetuneEmbedder, EMBEDDER_PREFIX};
use super::objective::{task_loss, Objective};
use super::optim::{Adam, AdamConfig};
use super::record::{AtChance, BestRecord, Collapse, EpochRecord, Monitor, NoSignal, TrainLog};
use super::schedule::{LrSchedule, Schedule};
use crate::metrics::{cross_entropy, ClassificationMetrics};
use crate::models::init::seeded_var_builder;
use crate::models::{
    build_model, AuxiliaryLoss, Bag, BagBatch, MilModel, ModelConfig, ParameterCounts, Split,
    TrainOutput,
};
use crate::placement::Placement;
use crate::seeding::stream_rng;

/// How to train (everything but the architecture).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Total number of epochs (a resumed run continues up to this number).
    pub epochs: usize,
    /// Bags per optimizer step.
    pub batch_size: usize,
    pub optimizer: AdamConfig,
    /// Weight the loss by inverse class frequency of the training bags.
    pub class_weighted: bool,
    pub monitor: Monitor,
    /// Stop after this many epochs without improvement of `monitor` (0: never).
    pub patience: usize,
    /// Experiment seed: parameter init and batch order.
    pub seed: u64,
    /// Learning-rate shape over training (`optimizer.lr` is its peak).
    pub schedule: LrSchedule,
    /// Epochs of linear warm-up (at most a quarter of `epochs`).
    pub warmup_epochs: usize,
    /// Largest global gradient norm (clipped above it); 0 disables clipping.
    pub grad_clip: f64,
}

impl TrainConfig {
    /// The schedule of the learning rate over this run.
    pub fn lr_schedule(&self) -> Schedule {
        Schedule {
            kind: self.schedule,
            lr: self.optimizer.lr,
            warmup_epochs: self.warmup_epochs.min(self.epochs / 4) as f64,
            epochs: self.epochs as f64,
        }
    }
}

/// What one finished epoch decided.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochOutcome {
    pub record: EpochRecord,
    /// Training is over (last epoch reached, or early stopping).
    pub done: bool,
}

/// Validation of a set of bags.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub auc: Option<f64>,
    pub balanced_accuracy: f64,
    /// Class probabilities per bag, in bag order (survival and regression: the raw outputs).
    pub probs: Vec<Vec<f32>>,
    /// Survival: Harrell's C-index of the predicted risks.
    pub c_index: Option<f64>,
    /// Regression: R^2 of the predictions.
    pub r2: Option<f64>,
}

/// A model, its parameters and optimizer, and where training stands.
pub struct Trainer {
    model_config: ModelConfig,
    config: TrainConfig,
    classes: Vec<String>,
    device: Device,
    vars: VarMap,
    model: Box<dyn MilModel>,
    optimizer: Adam,
    /// Next epoch to train (0-based).
    next_epoch: usize,
    best: Option<BestRecord>,
    /// Parameters of the best epoch of this run (copies).
    best_weights: Option<HashMap<String, Tensor>>,
    epochs_since_best: usize,
    stopped_early: bool,
    records: Vec<EpochRecord>,
    duplicate_sites: u64,
    checkpoint_dir: Option<PathBuf>,
    resumed_at: Option<usize>,
    /// Where a resumed run's best checkpoint lives, if the best epoch predates this run.
    resumed_best: Option<CheckpointFiles>,
    /// The trainable tile embedder of end-to-end training (bags then carry pixels).
    embedder: Option<FinetuneEmbedder>,
    /// What the outputs are trained for (classification unless [`Trainer::with_objective`]).
    objective: Objective,
    /// The sparse-map placement of the bags, stored in the checkpoints.
    placement: Option<Placement>,
}

impl Trainer {
    /// A freshly initialised model (seeded) with Adam over all its parameters.
    pub fn new(
        model_config: ModelConfig,
        config: TrainConfig,
        classes: Vec<String>,
        device: Device,
    ) -> Result<Self, TrainError> {
        Self::build(model_config, config, classes, device, None)
    }

    /// End-to-end training: like [`Trainer::new`], plus a trainable ResNet that embeds the
    /// bags' tile pixels in every step (its parameters are optimised with the model's).
    /// `model_config.input_dim` must be the embedder's width.
    pub fn new_finetuning(
        model_config: ModelConfig,
        config: TrainConfig,
        classes: Vec<String>,
        device: Device,
        embedder: &EmbedderSetup,
    ) -> Result<Self, TrainError> {
        Self::build(model_config, config, classes, device, Some(embedder))
    }

    fn build(
        model_config: ModelConfig,
        config: TrainConfig,
        classes: Vec<String>,
        device: Device,
        embedder: Option<&EmbedderSetup>,
    ) -> Result<Self, TrainError> {
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, config.seed, &device);
        let model = build_model(&model_config, &vb)
            .context(|| format!("building the {} model", model_config.pooling.name()))?;
        let embedder = embedder
            .map(|setup| FinetuneEmbedder::new(setup, vb.pp(EMBEDDER_PREFIX), &vars))
            .transpose()?;
        if let Some(e) = &embedder {
            if e.dim() != model_config.input_dim {
                return Err(TrainError::Embedder {
                    message: format!(
                        "the embedder gives {}-wide embeddings, the model expects {}",
                        e.dim(),
                        model_config.input_dim
                    ),
                });
            }
        }
        let named = crate::models::init::named_vars(&vars);
        let optimizer =
            Adam::new(named, config.optimizer).context(|| "creating the optimizer".into())?;
        Ok(Trainer {
            model_config,
            config,
            classes,
            device,
            vars,
            model,
            optimizer,
            next_epoch: 0,
            best: None,
            best_weights: None,
            epochs_since_best: 0,
            stopped_early: false,
            records: Vec::new(),
            duplicate_sites: 0,
            checkpoint_dir: None,
            resumed_at: None,
            resumed_best: None,
            embedder,
            objective: Objective::Classification,
            placement: None,
        })
    }

    /// A copy of parameter `name` (e.g. `embedder.conv1.weight`), if the model has one.
    pub fn parameter(&self, name: &str) -> Option<Tensor> {
        let data = self.vars.data().lock().ok()?;
        data.get(name).and_then(|v| v.as_tensor().copy().ok())
    }

    /// The fine-tuned embedder's configuration, in end-to-end training.
    pub fn embedder_config(&self) -> Option<&EmbedderConfig> {
        self.embedder.as_ref().map(FinetuneEmbedder::config)
    }

    /// The model's input for `bags`: their embeddings, or in end-to-end training the
    /// embedder's output on their pixels (`train`: batch-norm in training mode, gradients kept).
    fn batch(&self, bags: &[&Bag], train: bool) -> Result<BagBatch, TrainError> {
        match &self.embedder {
            None => Ok(BagBatch::from_bags(bags, &self.device)?),
            Some(embedder) => Ok(BagBatch::from_features(bags, embedder.embed(bags, train)?)?),
        }
    }

    /// Trains for `objective` (survival or regression) instead of classification; the
    /// model's width must be [`Objective::width`].
    pub fn with_objective(mut self, objective: Objective) -> Self {
        self.objective = objective;
        self
    }

    /// The validation quantity selecting the best epoch, `auto` resolved for the task.
    pub fn monitor(&self) -> Monitor {
        self.config.monitor.for_task(self.objective.task())
    }

    /// What the outputs are trained for.
    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// Records in the checkpoints where the bags' tiles were placed on the sparse map.
    pub fn with_placement(mut self, placement: Option<Placement>) -> Self {
        self.placement = placement;
        self
    }

    /// Saves `last` (every epoch) and `best` (when it improves) checkpoints into `dir`.
    pub fn with_checkpoints(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self
    }

    /// Continues from a checkpoint: its weights, optimizer state, epoch counter and best
    /// record. The architecture and classes must match this run's.
    pub fn resume(&mut self, path: &Path) -> Result<CheckpointMeta, TrainError> {
        let files = CheckpointFiles::locate(path)?;
        let meta = checkpoint::read_meta(&files)?;
        let mismatch = |message: String| TrainError::Resume {
            path: path.to_path_buf(),
            message,
        };
        let mut saved = meta.model.clone();
        saved.dropout = self.model_config.dropout;
        if saved != self.model_config {
            return Err(mismatch(format!(
                "the checkpoint's model {:?} differs from this experiment's {:?}",
                meta.model, self.model_config
            )));
        }
        if meta.embedder.as_ref() != self.embedder_config() {
            return Err(mismatch(format!(
                "the checkpoint's fine-tuned embedder {:?} differs from this experiment's {:?}",
                meta.embedder,
                self.embedder_config()
            )));
        }
        if meta.classes != self.classes {
            return Err(mismatch(format!(
                "the checkpoint's classes {:?} differ from the dataset's {:?}",
                meta.classes, self.classes
            )));
        }
        checkpoint::load_into(&files, &mut self.vars, Some(&mut self.optimizer))?;
        self.next_epoch = meta.epoch + 1;
        self.best = meta.best.clone();
        self.epochs_since_best = meta.epochs_since_best;
        self.resumed_at = Some(self.next_epoch);
        if let Some(best) = &meta.best {
            let best_files =
                CheckpointFiles::new(files.meta.parent().unwrap_or(Path::new(".")), "best");
            if let Ok(best_meta) = checkpoint::read_meta(&best_files) {
                if best_meta.epoch == best.epoch {
                    self.resumed_best = Some(best_files);
                }
            }
        }
        Ok(meta)
    }

    pub fn model(&self) -> &dyn MilModel {
        self.model.as_ref()
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The next epoch to train.
    pub fn next_epoch(&self) -> usize {
        self.next_epoch
    }

    /// True when the last epoch was trained or early stopping triggered.
    pub fn is_done(&self) -> bool {
        self.stopped_early || self.next_epoch >= self.config.epochs
    }

    pub fn stopped_early(&self) -> bool {
        self.stopped_early
    }

    pub fn records(&self) -> &[EpochRecord] {
        &self.records
    }

    pub fn best(&self) -> Option<&BestRecord> {
        self.best.as_ref()
    }

    /// Optimizer steps taken (including before a resume).
    pub fn steps(&self) -> u64 {
        self.optimizer.step_count()
    }

    /// Inverse-frequency class weights `n / (C * n_c)` of `bags` (0 for absent classes).
    pub fn class_weights(&self, bags: &[&Bag]) -> Vec<f32> {
        let c = self.classes.len();
        let mut counts = vec![0usize; c];
        for b in bags {
            if let Some(n) = counts.get_mut(b.label_index) {
                *n += 1;
            }
        }
        counts
            .iter()
            .map(|&n| {
                if n == 0 {
                    0.0
                } else {
                    bags.len() as f32 / (c * n) as f32
                }
            })
            .collect()
    }

    /// One optimizer step on `bags`; returns the (weighted) mean loss.
    pub fn step(
        &mut self,
        bags: &[&Bag],
        weights: Option<&[f32]>,
        epoch: usize,
        batch: usize,
    ) -> Result<f32, TrainError> {
        let input = self.batch(bags, true)?;
        self.duplicate_sites += input.duplicate_sites() as u64;
        let ctx = || format!("epoch {epoch}, batch {batch}");
        // Class labels for models whose auxiliary losses need them (CLAM's clustering); other
        // tasks carry no class.
        let labels: Vec<usize> = bags.iter().map(|b| b.label_index).collect();
        let classes = matches!(self.objective, Objective::Classification).then_some(&labels[..]);
        let output = self
            .model
            .forward_train(&input, classes)
            .context(|| format!("{}: forward pass", ctx()))?;
        let loss = total_loss(&self.objective, &output, bags, weights, &self.device)
            .context(|| format!("{}: loss", ctx()))?;
        let value = loss
            .to_scalar::<f32>()
            .context(|| format!("{}: loss", ctx()))?;
        if !value.is_finite() {
            let slides = bags
                .iter()
                .map(|b| b.slide_id.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(TrainError::NonFiniteLoss {
                epoch,
                batch,
                slides,
                value,
            });
        }
        let grads = loss
            .backward()
            .context(|| format!("{}: backward pass", ctx()))?;
        let scale = if self.config.grad_clip > 0.0 {
            let norm = self
                .optimizer
                .grad_norm(&grads)
                .context(|| format!("{}: gradient norm", ctx()))?;
            if !norm.is_finite() {
                return Err(TrainError::NonFiniteGradient {
                    epoch,
                    batch,
                    slides: bags
                        .iter()
                        .map(|b| b.slide_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    norm,
                });
            }
            (self.config.grad_clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.optimizer
            .step_scaled(&grads, scale)
            .context(|| format!("{}: optimizer step", ctx()))?;
        Ok(value)
    }

    /// Trains one epoch on the `train` bags of `bags` (shuffled by (seed, epoch)); returns the
    /// mean loss per bag.
    pub fn train_epoch(&mut self, bags: &[Bag]) -> Result<f64, TrainError> {
        let epoch = self.next_epoch;
        let mut train: Vec<&Bag> = bags.iter().filter(|b| b.split == Split::Train).collect();
        if train.is_empty() {
            return Err(TrainError::NoTrainingBags(epoch));
        }
        train.sort_by(|a, b| a.slide_id.cmp(&b.slide_id));
        train.shuffle(&mut stream_rng(
            self.config.seed,
            "train-order",
            Some(epoch as u64),
            "",
        ));
        let weights = self
            .config
            .class_weighted
            .then(|| self.class_weights(&train));
        let mut total = 0.0;
        let schedule = self.config.lr_schedule();
        let batches = train.len().div_ceil(self.config.batch_size.max(1));
        for (batch, chunk) in train.chunks(self.config.batch_size.max(1)).enumerate() {
            let t = epoch as f64 + (batch + 1) as f64 / batches as f64;
            self.optimizer.set_lr(schedule.lr_at(t));
            let loss = self.step(chunk, weights.as_deref(), epoch, batch)?;
            total += f64::from(loss) * chunk.len() as f64;
        }
        Ok(total / train.len() as f64)
    }

    /// Class probabilities of every bag (evaluation mode, no gradients); survival and
    /// regression: the raw outputs ([`Objective::score`] reads them).
    pub fn predict(&self, bags: &[&Bag]) -> Result<Vec<Vec<f32>>, TrainError> {
        self.forward_eval(bags, matches!(self.objective, Objective::Classification))
    }

    /// The outputs of every bag in evaluation mode, softmax-ed when `softmax`.
    fn forward_eval(&self, bags: &[&Bag], softmax: bool) -> Result<Vec<Vec<f32>>, TrainError> {
        let mut out = Vec::with_capacity(bags.len());
        for chunk in bags.chunks(self.config.batch_size.max(1)) {
            let input = self.batch(chunk, false)?;
            let what = || {
                format!(
                    "predicting slides {}",
                    chunk
                        .iter()
                        .map(|b| b.slide_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let logits = self.model.forward(&input, false).context(what)?.detach();
            let probs = if softmax {
                candle_nn::ops::softmax(&logits, D::Minus1).context(what)?
            } else {
                logits
            };
            out.extend(
                probs
                    .to_dtype(DType::F32)
                    .and_then(|p| p.to_vec2::<f32>())
                    .context(what)?,
            );
        }
        Ok(out)
    }

    /// Loss, AUC and balanced accuracy on `bags`; `None` when there are none.
    pub fn evaluate(&self, bags: &[&Bag]) -> Result<Option<Evaluation>, TrainError> {
        if bags.is_empty() {
            return Ok(None);
        }
        let probs = self.predict(bags)?;
        if !matches!(self.objective, Objective::Classification) {
            return self.evaluate_task(bags, probs).map(Some);
        }
        let labels: Vec<usize> = bags.iter().map(|b| b.label_index).collect();
        let c = self.classes.len();
        let flat: Vec<f32> = probs.iter().flatten().copied().collect();
        let predicted: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
        let metrics = ClassificationMetrics::compute(&labels, &predicted, &flat, c)?;
        Ok(Some(Evaluation {
            loss: cross_entropy(&labels, &flat, c),
            auc: metrics.auc,
            balanced_accuracy: metrics.balanced_accuracy,
            probs,
            c_index: None,
            r2: None,
        }))
    }

    /// Survival and regression validation: the task's loss over all of `bags` at once (one
    /// risk set for `cox`), Harrell's C-index or R^2.
    fn evaluate_task(
        &self,
        bags: &[&Bag],
        outputs: Vec<Vec<f32>>,
    ) -> Result<Evaluation, TrainError> {
        let what = || "validation loss".to_string();
        let width = outputs.first().map_or(0, Vec::len);
        let flat: Vec<f32> = outputs.iter().flatten().copied().collect();
        let tensor = Tensor::from_vec(flat, (bags.len(), width), &self.device).context(what)?;
        let loss = task_loss(&self.objective, &tensor, bags, None, &self.device)
            .and_then(|l| l.to_dtype(DType::F64)?.to_scalar::<f64>())
            .context(what)?;
        let scores: Vec<f64> = outputs
            .iter()
            .map(|o| self.objective.score(o).unwrap_or(f64::NAN))
            .collect();
        let (mut c_index, mut r2) = (None, None);
        match &self.objective {
            Objective::Survival { .. } => {
                let outcomes: Vec<tessera_stats::Outcome> = bags
                    .iter()
                    .map(|b| {
                        let (time, event) = self
                            .objective
                            .survival_target(&b.slide_id)
                            .unwrap_or((0.0, false));
                        tessera_stats::Outcome { time, event }
                    })
                    .collect();
                c_index = tessera_stats::harrell_c_index(&outcomes, &scores, None)
                    .ok()
                    .flatten();
            }
            Objective::Regression { .. } => {
                let truth: Vec<f64> = bags
                    .iter()
                    .map(|b| {
                        self.objective
                            .regression_target(&b.slide_id)
                            .unwrap_or(f64::NAN)
                    })
                    .collect();
                r2 = tessera_stats::RegressionMetrics::compute(&truth, &scores, None)
                    .ok()
                    .flatten()
                    .map(|m| m.r2);
            }
            Objective::Classification => {}
        }
        Ok(Evaluation {
            loss,
            auc: None,
            balanced_accuracy: f64::NAN,
            probs: outputs,
            c_index,
            r2,
        })
    }

    /// Trains epoch [`Trainer::next_epoch`] on `bags`' train split, validates on their `val`
    /// split, saves checkpoints and applies early stopping. On a non-finite loss it returns
    /// the error before anything is saved, so the previous checkpoints stay intact.
    pub fn run_epoch(&mut self, bags: &[Bag]) -> Result<EpochOutcome, TrainError> {
        let started = Instant::now();
        let epoch = self.next_epoch;
        let train_bags = bags.iter().filter(|b| b.split == Split::Train).count();
        let train_loss = self.train_epoch(bags)?;
        let val: Vec<&Bag> = bags.iter().filter(|b| b.split == Split::Val).collect();
        let evaluation = self.evaluate(&val)?;
        let constant_loss = self.constant_loss(bags);
        let mut record = EpochRecord {
            epoch,
            step: self.optimizer.step_count(),
            train_loss,
            constant_loss,
            lr: self.optimizer.config().lr,
            train_bags,
            val_loss: evaluation.as_ref().map(|e| e.loss),
            val_auc: evaluation.as_ref().and_then(|e| e.auc),
            val_balanced_accuracy: evaluation
                .as_ref()
                .map(|e| e.balanced_accuracy)
                .filter(|v| !v.is_nan()),
            val_c_index: evaluation.as_ref().and_then(|e| e.c_index),
            val_r2: evaluation.as_ref().and_then(|e| e.r2),
            val_bags: val.len(),
            seconds: 0.0,
            best: false,
        };
        let improved = if val.is_empty() {
            true
        } else {
            self.monitor().improves(&record, self.best.as_ref())
        };
        record.best = improved;
        if improved {
            self.best = Some(BestRecord {
                epoch,
                value: self.monitor().value(&record),
                loss: record.val_loss,
            });
            self.best_weights = Some(self.snapshot()?);
            self.epochs_since_best = 0;
        } else {
            self.epochs_since_best += 1;
        }
        self.next_epoch = epoch + 1;
        if self.config.patience > 0
            && self.epochs_since_best >= self.config.patience
            && self.next_epoch < self.config.epochs
        {
            self.stopped_early = true;
        }
        record.seconds = started.elapsed().as_secs_f64();
        self.save_checkpoints(&record, improved)?;
        self.records.push(record.clone());
        Ok(EpochOutcome {
            record,
            done: self.is_done(),
        })
    }

    fn snapshot(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let data = self.vars.data().lock().map_err(|_| TrainError::Candle {
            context: "copying the best parameters".into(),
            source: candle_core::Error::Msg("parameter store lock poisoned".into()),
        })?;
        data.iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    v.as_tensor()
                        .copy()
                        .context(|| format!("copying parameter `{k}`"))?,
                ))
            })
            .collect()
    }

    fn save_checkpoints(&self, record: &EpochRecord, improved: bool) -> Result<(), TrainError> {
        let Some(dir) = &self.checkpoint_dir else {
            return Ok(());
        };
        let meta = CheckpointMeta {
            format: checkpoint::FORMAT,
            epoch: record.epoch,
            step: record.step,
            model: self.model_config.clone(),
            classes: self.classes.clone(),
            optimizer: *self.optimizer.config(),
            metrics: record.clone(),
            best: self.best.clone(),
            epochs_since_best: self.epochs_since_best,
            embedder: self.embedder_config().cloned(),
            placement: self.placement,
        };
        if improved {
            checkpoint::save(dir, "best", &self.vars, &self.optimizer, &meta)?;
        }
        checkpoint::save(dir, "last", &self.vars, &self.optimizer, &meta)?;
        Ok(())
    }

    /// Puts the best epoch's parameters into the model (this run's copy, or the best
    /// checkpoint of the run resumed from); returns the epoch loaded, `None` when the current
    /// parameters are kept (no best recorded).
    pub fn load_best(&mut self) -> Result<Option<usize>, TrainError> {
        let Some(best) = self.best.clone() else {
            return Ok(None);
        };
        if let Some(weights) = &self.best_weights {
            let data = self.vars.data().lock().map_err(|_| TrainError::Candle {
                context: "restoring the best parameters".into(),
                source: candle_core::Error::Msg("parameter store lock poisoned".into()),
            })?;
            for (name, var) in data.iter() {
                if let Some(w) = weights.get(name) {
                    var.set(w)
                        .context(|| format!("restoring parameter `{name}`"))?;
                }
            }
            return Ok(Some(best.epoch));
        }
        if let Some(files) = self.resumed_best.clone() {
            checkpoint::load_into(&files, &mut self.vars, None)?;
            return Ok(Some(best.epoch));
        }
        Ok(None)
    }

    /// The training loss of the best constant predictor on `bags`' training split: the
    /// entropy of the class prior (`ln C'` over the `C'` classes present when the loss is
    /// class-weighted, since the weights make the prior uniform). A model whose loss stays
    /// there has learned nothing about the inputs.
    pub fn constant_loss(&self, bags: &[Bag]) -> Option<f64> {
        if !matches!(self.objective, Objective::Classification) {
            return self.objective.constant_loss(bags);
        }
        let mut counts = vec![0usize; self.classes.len()];
        for b in bags.iter().filter(|b| b.split == Split::Train) {
            if let Some(n) = counts.get_mut(b.label_index) {
                *n += 1;
            }
        }
        let total: usize = counts.iter().sum();
        if total == 0 {
            return None;
        }
        if self.config.class_weighted {
            let present = counts.iter().filter(|&&n| n > 0).count();
            return Some((present as f64).ln());
        }
        Some(
            counts
                .iter()
                .filter(|&&n| n > 0)
                .map(|&n| {
                    let p = n as f64 / total as f64;
                    -p * p.ln()
                })
                .sum(),
        )
    }

    /// Whether training collapsed: after at least [`COLLAPSE_MIN_EPOCHS`] epochs, the mean
    /// training loss of the last three stayed within [`COLLAPSE_TOLERANCE`] of the constant
    /// predictor's. (Predictions that are all one class are checked where they are made.)
    pub fn collapse(&self) -> Option<Collapse> {
        if self.records.len() < COLLAPSE_MIN_EPOCHS {
            return None;
        }
        let last = &self.records[self.records.len() - 3..];
        let constant = last.iter().rev().find_map(|r| r.constant_loss)?;
        if constant <= 0.0 {
            return None;
        }
        let mean = last.iter().map(|r| r.train_loss).sum::<f64>() / last.len() as f64;
        (mean >= (1.0 - COLLAPSE_TOLERANCE) * constant).then_some(Collapse {
            train_loss: mean,
            constant_loss: constant,
            epochs: self.records.len(),
            lr: self.config.optimizer.lr,
            constant_predictor: match &self.objective {
                Objective::Classification => None,
                Objective::Survival { .. } => Some(
                    "the training slides' own discrete hazards, the same for every slide".into(),
                ),
                Objective::Regression { .. } => Some("the training mean".into()),
            },
        })
    }

    /// Whether the selected (best) epoch's validation balanced accuracy is no better than
    /// chance: below `1/C + 2 sd` of a guessing model's balanced accuracy on `n` validation
    /// slides (binomial `sd = sqrt(p (1 - p) / n)`, `p = 1/C`). Judged only on at least
    /// [`CHANCE_MIN_VAL_BAGS`] validation slides, where that band is narrow enough to mean
    /// something. A model that fits its training slides but not this is not learning the label.
    pub fn at_chance(&self) -> Option<AtChance> {
        let best = self.best.as_ref()?;
        let record = self.records.iter().find(|r| r.epoch == best.epoch)?;
        let accuracy = record.val_balanced_accuracy?;
        if record.val_bags < CHANCE_MIN_VAL_BAGS {
            return None;
        }
        let p = 1.0 / self.classes.len().max(2) as f64;
        let bound = p + 2.0 * (p * (1.0 - p) / record.val_bags as f64).sqrt();
        (accuracy < bound).then_some(AtChance {
            val_balanced_accuracy: accuracy,
            chance: p,
            bound,
            val_bags: record.val_bags,
            epoch: best.epoch,
        })
    }

    /// Survival and regression's "learned nothing" check on the selected epoch (the
    /// classification one is [`Trainer::at_chance`]): survival, a validation C-index within
    /// the band of random risks (`0.5 + 2 sd`, Kendall's null variance
    /// `sd^2 = (2n + 5) / (18 n (n - 1))` on `n` slides; censoring only widens the true band, so
    /// this errs towards silence), judged on at least [`CHANCE_MIN_VAL_BAGS`] slides;
    /// regression, a validation loss no lower than predicting the training mean (`val` the
    /// validation bags), on at least [`REGRESSION_MIN_VAL_BAGS`].
    pub fn no_signal(&self, val: &[&Bag]) -> Option<NoSignal> {
        let best = self.best.as_ref()?;
        let record = self.records.iter().find(|r| r.epoch == best.epoch)?;
        match &self.objective {
            Objective::Classification => None,
            Objective::Survival { .. } => {
                let c = record.val_c_index?;
                let n = record.val_bags;
                if n < CHANCE_MIN_VAL_BAGS {
                    return None;
                }
                let n = n as f64;
                let sd = ((2.0 * n + 5.0) / (18.0 * n * (n - 1.0))).sqrt();
                let bound = 0.5 + 2.0 * sd;
                (c < bound).then(|| NoSignal {
                    metric: "val_c_index".into(),
                    value: c,
                    reference: 0.5,
                    bound,
                    val_bags: record.val_bags,
                    epoch: best.epoch,
                })
            }
            Objective::Regression { .. } => {
                if val.len() < REGRESSION_MIN_VAL_BAGS {
                    return None;
                }
                let loss = record.val_loss?;
                let mean = self.objective.mean_predictor_loss(val)?;
                (loss >= mean).then(|| NoSignal {
                    metric: "val_loss".into(),
                    value: loss,
                    reference: mean,
                    bound: mean,
                    val_bags: record.val_bags,
                    epoch: best.epoch,
                })
            }
        }
    }

    /// Trainable parameters by part (encoder, pooling, head, fine-tuned embedder).
    pub fn parameters(&self) -> ParameterCounts {
        ParameterCounts::of(&self.vars)
    }

    /// The run's log so far.
    pub fn log(&self, stage: &str) -> TrainLog {
        TrainLog {
            stage: stage.to_string(),
            pooling: self.model_config.pooling.name().to_string(),
            classes: self.classes.clone(),
            monitor: self.monitor(),
            epochs: self.records.clone(),
            best: self.best.clone(),
            stopped: if self.stopped_early {
                Some("early_stopping".into())
            } else if self.next_epoch >= self.config.epochs {
                Some("epochs".into())
            } else {
                None
            },
            resumed_at: self.resumed_at,
            duplicate_sites: self.duplicate_sites,
            parameters: self.parameters(),
            collapse: self.collapse(),
            at_chance: self.at_chance(),
            task: match self.objective {
                Objective::Classification => None,
                _ => Some(self.objective.task()),
            },
            no_signal: None,
        }
    }
}

/// Validation slides under which [`Trainer::at_chance`] does not judge.
pub const CHANCE_MIN_VAL_BAGS: usize = 20;

/// Validation slides under which [`Trainer::no_signal`] does not judge a regression.
pub const REGRESSION_MIN_VAL_BAGS: usize = 10;

/// Epochs before a flat training loss counts as a collapse.
pub const COLLAPSE_MIN_EPOCHS: usize = 3;
/// How close to the constant predictor's loss (relative) counts as learning nothing.
pub const COLLAPSE_TOLERANCE: f64 = 0.01;

/// Index of the largest value (the first on ties).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Cross-entropy of `logits [B, C]` against the bags' labels; with `weights` (per class) the
/// weighted mean `sum w_y nll / sum w_y`, as `torch.nn.CrossEntropyLoss(weight=...)`.
pub fn loss(
    logits: &Tensor,
    bags: &[&Bag],
    weights: Option<&[f32]>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let labels: Vec<u32> = bags.iter().map(|b| b.label_index as u32).collect();
    let n = labels.len();
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = Tensor::from_vec(labels.clone(), (n, 1), device)?;
    let nll = log_probs.gather(&targets, 1)?.squeeze(1)?.neg()?;
    match weights {
        None => nll.mean_all(),
        Some(w) => {
            let per_bag: Vec<f32> = labels
                .iter()
                .map(|&l| w.get(l as usize).copied().unwrap_or(0.0))
                .collect();
            let total: f32 = per_bag.iter().sum();
            let per_bag = Tensor::from_vec(per_bag, n, device)?.to_dtype(nll.dtype())?;
            (nll * per_bag)?.sum_all()? / f64::from(total.max(f32::MIN_POSITIVE))
        }
    }
}

/// The loss of one training forward pass: the task loss of the model's outputs, weighted,
/// plus its auxiliary terms (see [`TrainOutput`]).
pub fn total_loss(
    objective: &Objective,
    output: &TrainOutput,
    bags: &[&Bag],
    weights: Option<&[f32]>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let task = |outputs: &Tensor| task_loss(objective, outputs, bags, weights, device);
    let mut total = (task(&output.outputs)? * output.task_weight)?;
    for term in &output.auxiliary {
        let value = match term {
            AuxiliaryLoss::TaskOutputs { outputs, weight } => (task(outputs)? * *weight)?,
            AuxiliaryLoss::Value { loss, weight } => (loss * *weight)?,
        };
        total = (total + value)?;
    }
    Ok(total)
}

/// Writes `log` as pretty JSON to `path` (through a temporary file).
pub fn write_log(path: &Path, log: &TrainLog) -> Result<(), TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let json = serde_json::to_vec_pretty(log).map_err(|e| io(std::io::Error::other(e)))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Trains `trainer` until done on a fixed set of bags (every epoch sees the same bags):
/// the engine-free loop used by tests, benchmarks and the synthetic example.
pub fn fit(trainer: &mut Trainer, bags: &[Bag]) -> Result<Vec<EpochRecord>, TrainError> {
    let mut records = Vec::new();
    while !trainer.is_done() {
        records.push(trainer.run_epoch(bags)?.record);
    }
    Ok(records)
}
