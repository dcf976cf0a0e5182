//! The stage registry: stage kinds by name. Built-in stages register themselves exactly as a
//! user's crate registers its own.

use crate::error::StageResult;
use crate::schema::InputSpec;
use crate::stage::{BuildContext, ParamIssue, Stage, StageKind};
use arrow::datatypes::SchemaRef;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

/// A stage kind without its parameter type, as the engine holds it.
pub trait DynKind: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> &'static str;
    fn about(&self) -> &'static str;
    /// [`StageKind::notes`].
    fn notes(&self) -> String;
    /// JSON Schema of the parameters (for `tessera stages` and the experiment's JSON Schema).
    fn params_schema(&self) -> serde_json::Value;
    /// The parameters' defaults, as JSON.
    fn default_params(&self) -> serde_json::Value;
    /// Parses parameters; errors name the field path.
    fn configure(&self, params: serde_json::Value) -> Result<Arc<dyn ConfiguredStage>, ParamIssue>;
}

/// A stage kind with its parameters parsed: what the engine needs to plan and build it.
pub trait ConfiguredStage: Send + Sync {
    /// Parameters with defaults filled in, as canonical JSON (sorted keys): part of cache keys.
    fn canonical_params(&self) -> serde_json::Value;
    /// The parameters that identify the output: `canonical_params` less the kind's
    /// [`StageKind::key_neutral_params`]. Part of cache keys.
    fn key_params(&self) -> serde_json::Value {
        self.canonical_params()
    }
    fn input_spec(&self) -> InputSpec;
    /// The output schema, with relative paths in parameters resolved against `base_dir`.
    fn output_schema(
        &self,
        inputs: &[SchemaRef],
        base_dir: &std::path::Path,
    ) -> StageResult<SchemaRef>;
    fn cache_salt(&self, ctx: &BuildContext) -> StageResult<String>;
    fn uncached_columns(&self) -> Vec<String>;
    fn parallel(&self) -> bool;
    fn cacheable(&self) -> bool;
    /// See [`StageKind::endless`].
    fn endless(&self) -> bool {
        false
    }
    /// See [`StageKind::closes_inputs`].
    fn closes_inputs(&self) -> bool {
        false
    }
    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>>;
}

struct Kind<K>(PhantomData<fn() -> K>);

struct Configured<K>(K);

impl<K: StageKind> DynKind for Kind<K> {
    fn kind(&self) -> &'static str {
        K::KIND
    }
    fn version(&self) -> &'static str {
        K::VERSION
    }
    fn about(&self) -> &'static str {
        K::ABOUT
    }
    fn notes(&self) -> String {
        K::notes()
    }
    fn params_schema(&self) -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(K)).unwrap_or_default()
    }
    fn default_params(&self) -> serde_json::Value {
        serde_json::to_value(K::default()).unwrap_or_default()
    }
    fn configure(&self, params: serde_json::Value) -> Result<Arc<dyn ConfiguredStage>, ParamIssue> {
        let params = if params.is_null() {
            serde_json::json!({})
        } else {
            params
        };
        let parsed: K = serde_path_to_error::deserialize(params).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            ParamIssue::new(field, e.into_inner().to_string())
        })?;
        parsed.validate()?;
        Ok(Arc::new(Configured(parsed)))
    }
}

impl<K: StageKind> ConfiguredStage for Configured<K> {
    fn canonical_params(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap_or_default()
    }
    fn key_params(&self) -> serde_json::Value {
        let mut v = self.canonical_params();
        if let Some(map) = v.as_object_mut() {
            for name in K::key_neutral_params() {
                map.remove(*name);
            }
        }
        v
    }
    fn input_spec(&self) -> InputSpec {
        self.0.input_spec()
    }
    fn output_schema(
        &self,
        inputs: &[SchemaRef],
        base_dir: &std::path::Path,
    ) -> StageResult<SchemaRef> {
        self.0.output_schema_at(inputs, base_dir)
    }
    fn cache_salt(&self, ctx: &BuildContext) -> StageResult<String> {
        self.0.cache_salt(ctx)
    }
    fn uncached_columns(&self) -> Vec<String> {
        self.0.uncached_columns()
    }
    fn parallel(&self) -> bool {
        self.0.parallel()
    }
    fn cacheable(&self) -> bool {
        self.0.cacheable()
    }
    fn endless(&self) -> bool {
        self.0.endless()
    }
    fn closes_inputs(&self) -> bool {
        self.0.closes_inputs()
    }
    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        self.0.build(ctx)
    }
}

/// Wraps already-typed parameters as a configured stage (tests, programs building graphs).
pub fn configure_typed<K: StageKind>(params: K) -> Arc<dyn ConfiguredStage> {
    Arc::new(Configured(params))
}

/// Writes one slide's cached rows in another tool's file layout into a folder, returning the
/// file written (`tessera export`); the error names the file.
pub type SlideExporter = fn(
    dir: &std::path::Path,
    slide_id: &str,
    batches: &[arrow::record_batch::RecordBatch],
) -> Result<std::path::PathBuf, String>;

/// Stage kinds by name, the per-slide file layouts `tessera export` can write, and the native
/// libraries the stages run on.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn DynKind>>,
    exporters: BTreeMap<&'static str, SlideExporter>,
    libraries: BTreeMap<&'static str, String>,
}

impl Registry {
    /// An empty registry (add built-ins with `tessera_stages::register_builtins`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a stage kind, replacing one of the same name.
    pub fn register<K: StageKind>(&mut self) -> &mut Self {
        self.kinds.insert(K::KIND, Arc::new(Kind::<K>(PhantomData)));
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn DynKind>> {
        self.kinds.get(kind)
    }

    /// Registered kinds, sorted by name.
    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn DynKind>> {
        self.kinds.values()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    /// Adds a per-slide file layout for `tessera export --h5`-style outputs (e.g. `trident`),
    /// kept out of the engine so that it needs no file-format libraries.
    pub fn register_exporter(&mut self, name: &'static str, f: SlideExporter) -> &mut Self {
        self.exporters.insert(name, f);
        self
    }

    /// The exporter registered as `name`.
    pub fn exporter(&self, name: &str) -> Option<SlideExporter> {
        self.exporters.get(name).copied()
    }

    /// Records the version of a native library the stages run on (e.g. OpenSlide, whose
    /// version decides which slide formats open), for `tessera --version`.
    pub fn note_library(&mut self, name: &'static str, version: impl Into<String>) -> &mut Self {
        self.libraries.insert(name, version.into());
        self
    }

    /// The noted libraries as `NAME VERSION`, sorted by name.
    pub fn libraries(&self) -> Vec<String> {
        self.libraries
            .iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect()
    }
}

/// The closest candidate to `word`, if close enough to be a plausible typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
