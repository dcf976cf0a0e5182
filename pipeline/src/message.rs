//! What flows on the channels between stages: Arrow record batches about one slide, plus the
//! few control messages the engine needs; and the one way they are sent, which waits on a
//! full channel (backpressure) without missing the run's stop flag.

use crate::slide::SlideHandle;
use arrow::record_batch::RecordBatch;
use crossbeam_channel::{SendTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often a thread blocked on a channel (sending or receiving) looks at the stop flag.
pub(crate) const POLL: Duration = Duration::from_millis(50);

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

/// How [`send_or_stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    Delivered,
    /// The run is stopping (the flag was seen set while the channel was full).
    Stopped,
    /// The receiver is gone (the consumer closed its inputs or ended).
    Disconnected,
}

/// Sends, waiting while the channel is full, until it is delivered, the receiver is gone or
/// `stop` is set.
pub(crate) fn send_or_stop(
    sender: &Sender<Envelope>,
    mut envelope: Envelope,
    stop: &AtomicBool,
) -> Sent {
    loop {
        match sender.send_timeout(envelope, POLL) {
            Ok(()) => return Sent::Delivered,
            Err(SendTimeoutError::Timeout(back)) => {
                if stop.load(Ordering::Relaxed) {
                    return Sent::Stopped;
                }
                envelope = back;
            }
            Err(SendTimeoutError::Disconnected(_)) => return Sent::Disconnected,
        }
    }
}
