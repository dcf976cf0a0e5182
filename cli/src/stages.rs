//! `tessera stages`: what the registry offers.

use anyhow::bail;
use tessera_pipeline::{did_you_mean, Registry};

/// `tessera stages [KIND]`: the registered kinds, or one kind's parameters and defaults.
pub fn print_stages(registry: &Registry, kind: Option<&str>) -> anyhow::Result<()> {
    let Some(kind) = kind else {
        for k in registry.kinds() {
            println!("{:<14} v{:<4} {}", k.kind(), k.version(), k.about());
        }
        println!("\n`tessera stages KIND` shows a kind's parameters.");
        return Ok(());
    };
    let Some(k) = registry.get(kind) else {
        let hint = did_you_mean(kind, registry.names())
            .map(|m| format!(" (did you mean `{m}`?)"))
            .unwrap_or_default();
        bail!(
            "unknown stage kind `{kind}`{hint}; known: {}",
            registry.names().join(", ")
        );
    };
    println!(
        "{} (version {}): {}\n\nparameters:",
        k.kind(),
        k.version(),
        k.about()
    );
    let schema = k.params_schema();
    let defaults = k.default_params();
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, prop) in props {
            let ty = prop
                .get("type")
                .map(|t| t.to_string().replace('"', ""))
                .or_else(|| {
                    prop.get("$ref")
                        .and_then(|r| r.as_str())
                        .map(|r| r.rsplit('/').next().unwrap_or(r).to_string())
                })
                .unwrap_or_else(|| "value".into());
            let default = defaults
                .get(name)
                .map(|d| d.to_string())
                .unwrap_or_default();
            let about = prop
                .get("description")
                .and_then(|d| d.as_str())
                .unwrap_or("")
                .replace('\n', " ");
            println!("  {name:<22} {ty:<18} default {default:<14} {about}");
        }
    }
    let notes = k.notes();
    if !notes.is_empty() {
        println!("\n{}", notes.trim_end());
    }
    Ok(())
}
