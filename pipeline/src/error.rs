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
    /// Any other error, with what the stage was doing when it happened.
    #[error("{context}: {source}")]
    Other {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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
