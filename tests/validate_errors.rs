//! `tessera validate` rejects each class of broken experiment before anything runs, with a
//! non-zero exit and a message naming the culprit and pointing at its line in the YAML.

mod common;

use common::{cmu1, validate, write_dataset, write_yaml, Ran};
use tempfile::TempDir;

/// A valid tile -> embed experiment; each test breaks one thing in it.
const GOOD: &str = "\
name: broken
dataset: dataset.csv
stages:
  tile:
    kind: tile
    params:
      tile_size: 224
      mpp: 2.0
  embed:
    kind: embed
    inputs: [tile]
    params:
      weights: random
";

/// Validates `yaml` (in a folder holding a one-slide dataset).
fn check(yaml: &str) -> Ran {
    let dir = TempDir::new().unwrap();
    write_dataset(dir.path(), &[("cmu", &cmu1(), "tumor", "train")]);
    validate(&write_yaml(dir.path(), "exp.yaml", yaml))
}

/// 1-based line of the first line of `yaml` containing `needle`.
fn line_of(yaml: &str, needle: &str) -> usize {
    yaml.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in yaml"))
        + 1
}

/// The run was refused and stderr holds every fragment, and `exp.yaml:LINE:`.
fn assert_rejected(r: &Ran, line: usize, fragments: &[&str]) {
    assert!(
        !r.ok() && r.code.is_some(),
        "validate accepted a broken experiment: {r:?}"
    );
    let at = format!("exp.yaml:{line}:");
    assert!(r.stderr.contains(&at), "message lacks `{at}`: {r:?}");
    for f in fragments {
        assert!(r.stderr.contains(f), "message lacks `{f}`: {r:?}");
    }
}

#[test]
fn the_good_experiment_validates() {
    let r = check(GOOD);
    assert!(r.ok(), "{r:?}");
    assert!(r.stdout.contains("tile -> embed"), "{r:?}");
}

#[test]
fn unknown_stage_kind_lists_known_kinds_and_suggests_the_closest() {
    let yaml = GOOD.replace("kind: embed", "kind: embedd");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "kind: embedd"),
        &[
            "stage `embed`",
            "unknown stage kind `embedd`",
            "did you mean `embed`?",
            "known kinds:",
            "tile",
            "sparse_map",
        ],
    );
}

#[test]
fn unknown_parameter_suggests_the_closest() {
    let yaml = GOOD.replace("tile_size: 224", "tile_sise: 224");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "tile_sise"),
        &[
            "stage `tile`",
            "unknown parameter `tile_sise`",
            "did you mean `tile_size`?",
        ],
    );
}

#[test]
fn unknown_stage_field_suggests_the_closest() {
    let yaml = GOOD.replace("    kind: embed\n", "    kind: embed\n    cahce: true\n");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "cahce"),
        &["stages.embed.cahce", "did you mean `cache`?"],
    );
}

#[test]
fn mistyped_parameter_names_the_field_and_the_expected_type() {
    let yaml = GOOD.replace("tile_size: 224", "tile_size: \"big\"");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "tile_size"),
        &["stage `tile`", "parameter `tile_size`", "\"big\""],
    );

    let yaml = GOOD.replace("    kind: tile\n", "    kind: tile\n    workers: many\n");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "workers"),
        &["stages.tile.workers", "\"many\""],
    );
}

#[test]
fn out_of_range_parameter_names_the_field() {
    let yaml = GOOD.replace("mpp: 2.0", "mpp: -1.0");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "mpp"),
        &["stage `tile`", "parameter `mpp`", "-1"],
    );
}

#[test]
fn missing_input_is_named_with_a_suggestion() {
    let yaml = GOOD.replace("inputs: [tile]", "inputs: [tiles]");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "inputs: [tiles]"),
        &[
            "stage `embed`",
            "input `tiles` is not a stage",
            "did you mean `tile`?",
        ],
    );
}

#[test]
fn a_stage_without_its_required_input_is_rejected() {
    let yaml = GOOD.replace("    inputs: [tile]\n", "");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "  embed:"),
        &["stage `embed`", "takes 1 input(s), 0 given"],
    );
}

#[test]
fn a_cycle_names_the_stages_on_it() {
    let yaml = "\
name: cycle
dataset: dataset.csv
stages:
  tile:
    kind: tile
  a:
    kind: sample
    inputs: [c]
  b:
    kind: sparse_map
    inputs: [a]
  c:
    kind: augment
    inputs: [b]
";
    let r = check(yaml);
    assert!(!r.ok(), "{r:?}");
    assert!(r.stderr.contains("cycle"), "{r:?}");
    let cycle_line = r.stderr.lines().find(|l| l.contains("cycle")).unwrap();
    for s in ["a", "b", "c"] {
        assert!(
            cycle_line.contains(&format!("{s} ->")) || cycle_line.contains(&format!("-> {s}")),
            "{r:?}"
        );
    }
    assert!(
        !cycle_line.contains("tile"),
        "tile is not on the cycle: {r:?}"
    );
    // the line of one of the cycle's `inputs:`
    let lines: Vec<String> = ["inputs: [c]", "inputs: [a]", "inputs: [b]"]
        .iter()
        .map(|n| format!("exp.yaml:{}:", line_of(yaml, n)))
        .collect();
    assert!(
        lines.iter().any(|l| cycle_line.contains(l.as_str())),
        "{r:?}"
    );
}

#[test]
fn schema_mismatch_names_both_stages_and_the_column() {
    // the sparse map needs embeddings (or pixels, for end-to-end training); coordinate-only
    // tiles have neither
    let yaml = "\
name: mismatch
dataset: dataset.csv
stages:
  tile:
    kind: tile
    params:
      emit_pixels: false
  map:
    kind: sparse_map
    inputs: [tile]
";
    let r = check(yaml);
    assert_rejected(
        &r,
        line_of(yaml, "inputs: [tile]"),
        &["stage `map`", "`tile`", "`embedding`", "`pixels"],
    );

    // embedding needs pixels, which a coordinate-only tiling does not emit
    let yaml = GOOD.replace("mpp: 2.0", "mpp: 2.0\n      emit_pixels: false");
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "inputs: [tile]"),
        &["stage `embed`", "`tile`", "`pixels`"],
    );
}

#[test]
fn malformed_yaml_gives_the_line() {
    let yaml = GOOD.replace(
        "    params:\n      weights: random\n",
        "   params:\n      weights: random\n",
    );
    let r = check(&yaml);
    let bad_line = yaml.lines().position(|l| l == "   params:").unwrap() + 1;
    assert_rejected(&r, bad_line, &["not valid YAML"]);

    let yaml = "name: x\ndataset: dataset.csv\nstages:\n  tile:\n    kind: tile\n    params: {tile_size: 3\n  x: [1, 2\n";
    let r = check(yaml);
    assert!(!r.ok(), "{r:?}");
    assert!(
        r.stderr.contains("not valid YAML") && r.stderr.contains("exp.yaml:"),
        "{r:?}"
    );
}

#[test]
fn several_problems_are_reported_together() {
    let yaml = GOOD
        .replace("tile_size: 224", "tile_sise: 224")
        .replace("inputs: [tile]", "inputs: [tiles]");
    let r = check(&yaml);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("tile_sise") && r.stderr.contains("`tiles`"),
        "{r:?}"
    );
}

#[test]
fn endless_sampling_without_a_stopping_consumer_is_rejected() {
    let yaml = format!(
        "{GOOD}  sample:\n    kind: sample\n    inputs: [embed]\n    params:\n      tiles_per_slide: 4\n"
    );
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "tiles_per_slide") - 1, // its `params:`
        &["stage `sample`", "set a finite number of epochs"],
    );
    // A finite number of epochs ends on its own.
    let r = check(&format!("{yaml}      epochs: 2\n"));
    assert!(r.ok(), "{r:?}");
}

#[test]
fn a_typo_in_the_stopping_consumer_is_the_only_error() {
    // `train` stops the endless `sample`; a typo in train's parameters must be reported alone,
    // not followed by "none stops sample".
    let yaml = format!(
        "{GOOD}  sample:\n    kind: sample\n    inputs: [embed]\n    params:\n      tiles_per_slide: 4\n  \
         map:\n    kind: sparse_map\n    inputs: [sample]\n  \
         train:\n    kind: train\n    inputs: [map]\n    params:\n      pooling: gated_atention\n"
    );
    let r = check(&yaml);
    assert_rejected(
        &r,
        line_of(&yaml, "pooling: gated_atention"),
        &["stage `train`", "unknown variant `gated_atention`"],
    );
    assert!(!r.stderr.contains("finite number of epochs"), "{r:?}");
    // Fixed, the same experiment validates: `train` is the consumer that stops `sample`.
    let r = check(&yaml.replace("gated_atention", "gated_attention"));
    assert!(r.ok(), "{r:?}");
}

#[test]
fn a_missing_top_level_field_is_named_plainly() {
    let yaml = GOOD.replace("dataset: dataset.csv\n", "");
    let r = check(&yaml);
    assert!(!r.ok(), "{r:?}");
    assert!(r.stderr.contains("missing field `dataset`"), "{r:?}");
    assert!(!r.stderr.contains("`.`"), "{r:?}");
}
