//! The `sweep:` grid of an experiment and its expansion into points: the cartesian product of
//! the swept values in the order the YAML declares them (first key outermost), then the
//! `seeds:` repeats innermost, each point named by a readable, filesystem-safe folder name.

use schemars::JsonSchema;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};

/// `STAGE.PARAM` (the `--set` syntax) -> the values to try, in declaration order. Kept as a
/// list so that the grid, the folder names and the results table follow the YAML's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SweepGrid(pub Vec<(String, Vec<Value>)>);

impl SweepGrid {
    /// True when nothing is swept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The swept keys, in declaration order.
    pub fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

impl Serialize for SweepGrid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for SweepGrid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct GridVisitor;
        impl<'de> Visitor<'de> for GridVisitor {
            type Value = SweepGrid;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from STAGE.PARAM to a list of values")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<SweepGrid, E> {
                Ok(SweepGrid::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SweepGrid, A::Error> {
                let mut entries: Vec<(String, Vec<Value>)> = Vec::new();
                while let Some((key, values)) = map.next_entry::<String, Vec<Value>>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format!("`{key}` is swept twice")));
                    }
                    entries.push((key, values));
                }
                Ok(SweepGrid(entries))
            }
        }
        d.deserialize_any(GridVisitor)
    }
}

impl JsonSchema for SweepGrid {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SweepGrid".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A grid of runs: `STAGE.PARAM` (as for `--set`, e.g. `sparse_map.downsample`) -> the non-empty list of values to try. `tessera run` runs every combination into OUT/<point>/.",
            "type": "object",
            "propertyNames": {"pattern": "^[^.]+\\..+$"},
            "additionalProperties": {"type": "array", "minItems": 1}
        })
    }
}

/// One run of a sweep: a value for every swept key, and the seed when `seeds:` is given.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// Position in the grid's order (0 = the first point run).
    pub index: usize,
    /// The folder name under OUT, e.g. `downsample=8__tiles_per_slide=10__seed=0`.
    pub name: String,
    /// (swept key, value), in the grid's key order.
    pub params: Vec<(String, Value)>,
    /// The experiment seed of this repeat (`seeds:`), if any.
    pub seed: Option<u64>,
}

impl SweepPoint {
    /// The `--set` overrides that turn the base experiment into this point.
    pub fn sets(&self) -> Vec<String> {
        let mut sets: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap_or_default()))
            .collect();
        if let Some(seed) = self.seed {
            sets.push(format!("seed={seed}"));
        }
        sets
    }
}

/// How a value appears in folder names and tables: strings bare, numbers and booleans as
/// written, anything else as compact JSON.
pub fn display_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// Keeps letters, digits, `.`, `-`, `_`, `=`, `+`; everything else becomes `_`.
fn filesystem_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '=' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The short name of each key in folder names: the parameter name alone (`downsample`),
/// or the whole key where two keys share a parameter name.
fn short_names(keys: &[&str]) -> Vec<String> {
    let last = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for k in keys {
        *counts.entry(last(k)).or_default() += 1;
    }
    keys.iter()
        .map(|k| {
            let l = last(k);
            if counts[&l] > 1 || l == "seed" {
                k.to_string()
            } else {
                l
            }
        })
        .collect()
}

/// Every point of the grid, first key outermost, seeds innermost. With neither `sweep:` nor
/// `seeds:` there are no points (the experiment is not a sweep).
pub fn expand(grid: &SweepGrid, seeds: &[u64]) -> Vec<SweepPoint> {
    if grid.is_empty() && seeds.is_empty() {
        return Vec::new();
    }
    let keys = grid.keys();
    let short = short_names(&keys);
    let seed_list: Vec<Option<u64>> = if seeds.is_empty() {
        vec![None]
    } else {
        seeds.iter().copied().map(Some).collect()
    };
    // Mixed-radix counting over the value indices, last key fastest.
    let sizes: Vec<usize> = grid.0.iter().map(|(_, v)| v.len()).collect();
    let total: usize = sizes.iter().product();
    let combos = (0..total).map(|mut n| {
        let mut idx = vec![0usize; sizes.len()];
        for k in (0..sizes.len()).rev() {
            idx[k] = n % sizes[k];
            n /= sizes[k];
        }
        idx
    });
    let mut points = Vec::new();
    let mut used: HashSet<String> = HashSet::new();
    for combo in combos {
        for seed in &seed_list {
            let params: Vec<(String, Value)> = combo
                .iter()
                .enumerate()
                .map(|(k, &i)| (grid.0[k].0.clone(), grid.0[k].1[i].clone()))
                .collect();
            let mut parts: Vec<String> = params
                .iter()
                .zip(&short)
                .map(|((_, v), s)| format!("{s}={}", display_value(v)))
                .collect();
            if let Some(seed) = seed {
                parts.push(format!("seed={seed}"));
            }
            let mut name = filesystem_safe(&parts.join("__"));
            if name.len() > 200 {
                let hash = blake3::hash(name.as_bytes()).to_hex();
                name = format!("{}__{}", &name[..180], &hash[..12]);
            }
            // Values that differ only in unsafe characters would collide: number them.
            if !used.insert(name.clone()) {
                let mut n = 2;
                while !used.insert(format!("{name}__{n}")) {
                    n += 1;
                }
                name = format!("{name}__{n}");
            }
            points.push(SweepPoint {
                index: points.len(),
                name,
                params,
                seed: *seed,
            });
        }
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grid(entries: &[(&str, Vec<Value>)]) -> SweepGrid {
        SweepGrid(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn expands_the_cartesian_product_first_key_outermost_seeds_innermost() {
        let g = grid(&[
            ("sparse_map.downsample", vec![json!(1), json!(8)]),
            ("sample.tiles_per_slide", vec![json!(10), json!(20)]),
        ]);
        let points = expand(&g, &[0, 1]);
        let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "downsample=1__tiles_per_slide=10__seed=0",
                "downsample=1__tiles_per_slide=10__seed=1",
                "downsample=1__tiles_per_slide=20__seed=0",
                "downsample=1__tiles_per_slide=20__seed=1",
                "downsample=8__tiles_per_slide=10__seed=0",
                "downsample=8__tiles_per_slide=10__seed=1",
                "downsample=8__tiles_per_slide=20__seed=0",
                "downsample=8__tiles_per_slide=20__seed=1",
            ]
        );
        assert_eq!(
            points[5].sets(),
            [
                "sparse_map.downsample=8",
                "sample.tiles_per_slide=10",
                "seed=1"
            ]
        );
        assert!(points.iter().enumerate().all(|(i, p)| p.index == i));
    }

    #[test]
    fn seeds_alone_repeat_the_experiment_and_nothing_is_not_a_sweep() {
        let points = expand(&SweepGrid::default(), &[3, 4]);
        assert_eq!(points.len(), 2);
        assert_eq!(points[1].name, "seed=4");
        assert_eq!(points[1].sets(), ["seed=4"]);
        assert!(expand(&SweepGrid::default(), &[]).is_empty());
        let one = expand(&grid(&[("train.pooling", vec![json!("mean")])]), &[]);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "pooling=mean");
        assert_eq!(one[0].sets(), ["train.pooling=\"mean\""]);
    }

    #[test]
    fn names_are_filesystem_safe_unique_and_disambiguated() {
        let g = grid(&[
            (
                "a.size",
                vec![json!("x/y"), json!("x y"), json!({"k": [1, 2]})],
            ),
            ("b.size", vec![json!(0.5)]),
        ]);
        let names: Vec<String> = expand(&g, &[]).into_iter().map(|p| p.name).collect();
        assert_eq!(names[0], "a.size=x_y__b.size=0.5");
        assert_eq!(names[1], "a.size=x_y__b.size=0.5__2");
        assert_eq!(names[2], "a.size=__k___1_2____b.size=0.5");
    }

    #[test]
    fn grid_keeps_declaration_order_and_rejects_duplicates() {
        let g: SweepGrid =
            serde_yaml_ng::from_str("z.b: [1, 2]\na.c: [x]\n").expect("a valid grid");
        assert_eq!(g.keys(), ["z.b", "a.c"]);
        let back = serde_yaml_ng::to_string(&g).unwrap();
        assert!(back.find("z.b") < back.find("a.c"), "{back}");
        let dup = serde_yaml_ng::from_str::<SweepGrid>("a.b: [1]\na.b: [2]\n");
        assert!(dup.is_err());
    }
}
