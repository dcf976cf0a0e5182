//! `tessera-custom`: the `tessera` command line with one more stage kind, `tile_filter`.
//! This is all a crate adding its own stages needs: a registry, then the CLI (tessera-cli).

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut registry = tessera_stages::builtin_registry();
    registry.register::<tessera_example_custom_stage::TileFilterParams>();
    tessera_cli::main(registry)
}
