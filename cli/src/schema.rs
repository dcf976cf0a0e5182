//! `tessera schema`: the JSON Schema of experiment files, each stage kind's parameters
//! included (for editors' YAML language servers; `schemas/experiment.schema.json`).

use tessera_pipeline::Registry;

/// The JSON Schema of experiment files, with each stage kind's parameters.
pub fn experiment_json_schema(registry: &Registry) -> serde_json::Value {
    use serde_json::{json, Value};
    let mut root = serde_json::to_value(schemars::schema_for!(
        tessera_pipeline::config::ExperimentConfig
    ))
    .unwrap_or_default();
    let mut defs = root.get("$defs").cloned().unwrap_or_else(|| json!({}));
    let mut branches = Vec::new();
    for k in registry.kinds() {
        let mut params = k.params_schema();
        if let Some(Value::Object(inner)) = params.as_object_mut().and_then(|p| p.remove("$defs")) {
            if let Value::Object(d) = &mut defs {
                d.extend(inner);
            }
        }
        if let Some(p) = params.as_object_mut() {
            p.remove("$schema");
        }
        let name = format!("params_{}", k.kind());
        defs[&name] = params;
        branches.push(json!({
            "if": {"properties": {"kind": {"const": k.kind()}}},
            "then": {"properties": {"params": {"$ref": format!("#/$defs/{name}")}}}
        }));
    }
    if let Some(sc) = defs.get_mut("StageConfig") {
        sc["allOf"] = Value::Array(branches);
        sc["properties"]["kind"]["enum"] = json!(registry.names());
    }
    root["$defs"] = defs;
    root
}
