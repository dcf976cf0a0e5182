//! Errors a stage reports while it runs; the engine adds the stage name and the slide.

use std::fmt;

/// What went wrong inside a stage. Stages convert their own typed errors into this at the
/// boundary (`StageError::other`), so the engine can report any stage's failure uniformly.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A plain message, for conditions the stage itself detected (bad input, NaN loss, ...).
    #[error("{0}")]
    Message(String),
    /// The run is stopping (Ctrl-C, another stage failed, or every consumer is gone):
    /// not a failure of this stage, so it is never reported as one.
    #[error("stopped")]
    Stopped,
    /// Arrow failed on data the stage handled (a missing column, a bad cast).
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Reading or writing a file failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The stage emitted a batch its declared output schema does not allow: a bug in the
    /// stage, caught where it emits rather than downstream or in the cache.
    #[error("stage `{stage}` emitted a batch that {mismatch}")]
    Undeclared {
        stage: String,
        mismatch: crate::schema::EmitMismatch,
    },
    /// Any other error, with what the stage was doing when it happened.
    #[error("{context}: {source}")]
    Other {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// An error and its causes on one line, `outer: cause: ...`, leaving out each cause whose text
/// the line already holds: most errors here print their source inside their own message, so
/// anyhow's `{:#}` would repeat it once per level.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

impl StageError {
    /// A failure described by a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        StageError::Message(message.to_string())
    }

    /// Wraps a foreign error with what the stage was doing.
    pub fn other(
        context: impl fmt::Display,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StageError::Other {
            context: context.to_string(),
            source: source.into(),
        }
    }

    /// True for the engine's "stop now" signal, which is not a stage failure.
    pub fn is_stopped(&self) -> bool {
        matches!(self, StageError::Stopped)
    }
}

/// Result type of stage callbacks.
pub type StageResult<T = ()> = Result<T, StageError>;

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[test]
    fn error_chain_prints_each_cause_once() {
        let io = std::io::Error::other("disk full");
        let e = StageError::other("writing x.parquet", io);
        assert_eq!(error_chain(&e), "writing x.parquet: disk full");
        let wrapped = anyhow::Error::new(e).context("stage `embed`");
        assert_eq!(
            error_chain(wrapped.as_ref()),
            "stage `embed`: writing x.parquet: disk full"
        );
        assert_eq!(
            format!("{wrapped:#}"),
            "stage `embed`: writing x.parquet: disk full: disk full"
        );
    }
}
