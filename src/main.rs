//! The `tessera` binary: the engine's CLI with the built-in stages.

fn main() -> std::process::ExitCode {
    tessera_pipeline::cli::main(tessera_stages::builtin_registry())
}
