//! The `tessera` binary: the CLI (tessera-cli) with the built-in stages.

/// mimalloc instead of glibc's malloc: glibc hands the large buffers candle frees every
/// training step back to the OS and page-faults them in again on the next step (see
/// BENCHMARKS.md, "Training"); mimalloc keeps them for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tessera_cli::main(tessera_stages::builtin_registry())
}
