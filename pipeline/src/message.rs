//! What flows on the channels between stages: Arrow record batches about one slide, plus the
//! few control messages the engine needs.

use crate::slide::SlideHandle;
use arrow::record_batch::RecordBatch;

/// One message on an edge of the DAG.
#[derive(Debug, Clone)]
pub enum Message {
    /// Rows about one slide. A slide's rows may come in several batches (a large slide's
    /// tiles are streamed, never held whole).
    Batch {
        slide: SlideHandle,
        batch: RecordBatch,
    },
    /// Every batch about this slide has been sent on this edge.
    SlideEnd { slide: SlideHandle },
    /// The slide failed upstream: drop whatever was gathered for it.
    SlideFailed { slide: SlideHandle },
    /// Sent by the engine to a cached stage: emit your cached output for this slide.
    Replay { slide: SlideHandle },
    /// An epoch of a training loop is complete (sent by stages that re-sample every epoch).
    EndOfEpoch { epoch: u64 },
}

/// A message tagged with the index of the consumer's input it arrives on.
pub type Envelope = (usize, Message);
