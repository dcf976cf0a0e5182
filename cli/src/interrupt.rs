//! The one Ctrl-C handler of the command line: the first Ctrl-C asks the run (or sweep) to stop
//! cleanly, the second aborts the process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Installs the handler and returns the flag it raises; `stopping` says what stops (e.g.
/// `"stopping cleanly"`). Installing twice in one process keeps the first handler.
pub fn on_ctrl_c(stopping: &'static str) -> Arc<AtomicBool> {
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: {stopping} (Ctrl-C again to abort)");
    });
    interrupt
}
