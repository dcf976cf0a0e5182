//! GeoJSON export for QuPath (File > Import objects): a `FeatureCollection` with one `Feature`
//! per tile, its square as a closed `Polygon` ring in level-0 pixel coordinates (origin at the
//! top-left of the full-resolution image, as QuPath expects), and properties
//! `objectType: "tile"`, `classification: {name, color}` (the class the tile speaks for) and
//! `measurements: {score_<class>: value, ...}` (QuPath's measurement maps colour tiles by any
//! of them). The scores are repeated as plain properties for other GeoJSON readers.

use serde_json::{json, Map, Value};

use crate::render::class_color;
use crate::scores::TileScores;
use crate::table::SCORE_PREFIX;

/// The GeoJSON document of a slide's tiles.
pub fn feature_collection(s: &TileScores) -> Value {
    let features: Vec<Value> = (0..s.len())
        .map(|i| {
            let (x, y, d) = (s.xs[i], s.ys[i], s.sizes[i]);
            let ring = json!([[x, y], [x + d, y], [x + d, y + d], [x, y + d], [x, y]]);
            let mut measurements = Map::new();
            for (c, name) in s.classes.iter().enumerate() {
                measurements.insert(format!("{SCORE_PREFIX}{name}"), json!(s.score(i, c)));
            }
            let class = s.tile_class(i);
            let mut properties = measurements.clone();
            properties.insert("objectType".into(), json!("tile"));
            properties.insert(
                "classification".into(),
                json!({"name": s.classes[class], "color": class_color(class)}),
            );
            properties.insert("measurements".into(), Value::Object(measurements));
            properties.insert("cell_tiles".into(), json!(s.cell_tiles[i]));
            json!({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": properties,
            })
        })
        .collect();
    json!({
        "type": "FeatureCollection",
        "features": features,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_mil::importance::Method;

    fn scores() -> TileScores {
        TileScores {
            slide_id: "s".into(),
            xs: vec![0, 100, 100],
            ys: vec![0, 0, 100],
            sizes: vec![100, 100, 100],
            classes: vec!["normal".into(), "tumor".into()],
            scores: vec![0.5, -0.2, 0.1, 0.9, -1.0, -2.0],
            cell_tiles: vec![1, 2, 2],
            method: Method::GradCam,
            probs: vec![0.3, 0.7],
        }
    }

    #[test]
    fn one_closed_polygon_feature_per_tile_with_qupath_properties() {
        let s = scores();
        let text = serde_json::to_string(&feature_collection(&s)).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["type"], "FeatureCollection");
        let features = doc["features"].as_array().unwrap();
        assert_eq!(features.len(), s.len());
        for (i, f) in features.iter().enumerate() {
            assert_eq!(f["type"], "Feature");
            assert_eq!(f["geometry"]["type"], "Polygon");
            let ring = f["geometry"]["coordinates"][0].as_array().unwrap();
            assert_eq!(ring.len(), 5);
            assert_eq!(ring[0], ring[4], "ring closed");
            assert_eq!(ring[0], json!([s.xs[i], s.ys[i]]));
            assert_eq!(ring[2], json!([s.xs[i] + 100, s.ys[i] + 100]));
            let p = &f["properties"];
            assert_eq!(p["objectType"], "tile");
            let m = p["measurements"].as_object().unwrap();
            assert_eq!(m.len(), 2);
            assert!((m["score_tumor"].as_f64().unwrap() - s.score(i, 1) as f64).abs() < 1e-6);
            assert_eq!(p["score_normal"], m["score_normal"]);
        }
        // Tile 0 speaks for `normal` (0.5 > -0.2), tile 1 for `tumor`, tile 2 for `normal`.
        let names: Vec<&str> = features
            .iter()
            .map(|f| f["properties"]["classification"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["normal", "tumor", "normal"]);
        assert_eq!(
            features[0]["properties"]["classification"]["color"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn attention_tiles_take_the_predicted_class() {
        let mut s = scores();
        s.method = Method::Attention;
        s.scores = vec![0.2, 0.2, 0.5, 0.5, 0.3, 0.3];
        let doc = feature_collection(&s);
        for f in doc["features"].as_array().unwrap() {
            assert_eq!(f["properties"]["classification"]["name"], "tumor");
        }
    }
}
