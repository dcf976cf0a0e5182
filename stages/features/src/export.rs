//! Writing tessera's embeddings out in other tools' layouts (`tessera export`), so that
//! embeddings computed here feed TRIDENT / CLAM-style MIL code.
//!
//! TRIDENT layout, one `SLIDE_ID.h5` per slide: `features` `[N, D]` float32 and `coords`
//! `[N, 2]` int64 (level-0 `x, y` of each tile's top-left corner), with the attributes TRIDENT
//! puts on `coords` that the embeddings table knows: `patch_size_level0` (the level-0 tile
//! size), `patch_size` with `patch_level: 0` (the same size, as CLAM reads it), `overlap: 0`
//! and `name` (the slide id). The magnification attributes (`level0_magnification`,
//! `target_magnification`) are not written: the embeddings table does not record them.

use crate::error::FeaturesResult;
use crate::features::features_err;
use arrow::array::{
    Array, FixedSizeListArray, Float16Array, Float32Array, Int64Array, RecordBatch,
};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use std::path::{Path, PathBuf};
use tessera_pipeline::schema::{EMBEDDING, TILE_SIZE, X, Y};

/// One slide's rows in plain vectors: what a per-slide file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SlideTable {
    pub coords: Vec<[i64; 2]>,
    pub tile_size: i64,
    pub dim: usize,
    pub features: Vec<f32>,
}

/// Gathers a slide's embeddings-table batches (`x, y, tile_size, embedding`), refusing a slide
/// whose tiles differ in size (one file records one tile size).
pub fn slide_table(path: &Path, batches: &[RecordBatch]) -> FeaturesResult<SlideTable> {
    let mut t = SlideTable {
        coords: Vec::new(),
        tile_size: 0,
        dim: 0,
        features: Vec::new(),
    };
    for b in batches {
        let int = |name: &str| -> FeaturesResult<Int64Array> {
            let col = b
                .column_by_name(name)
                .ok_or_else(|| features_err(path, format!("no column `{name}`")))?;
            let col = cast(col, &DataType::Int64)?;
            col.as_any()
                .downcast_ref::<Int64Array>()
                .cloned()
                .ok_or_else(|| features_err(path, format!("column `{name}` is not an integer")))
        };
        let (x, y, ts) = (int(X)?, int(Y)?, int(TILE_SIZE)?);
        let emb = b
            .column_by_name(EMBEDDING)
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
            .ok_or_else(|| features_err(path, "no fixed-size list column `embedding`"))?;
        t.dim = emb.value_length() as usize;
        let values = emb.values();
        let flat: Vec<f32> = if let Some(v) = values.as_any().downcast_ref::<Float32Array>() {
            v.values().to_vec()
        } else if let Some(v) = values.as_any().downcast_ref::<Float16Array>() {
            v.values().iter().map(|h| h.to_f32()).collect()
        } else {
            return Err(features_err(
                path,
                "`embedding` holds neither float32 nor float16",
            ));
        };
        let start = emb.offset() * t.dim;
        t.features
            .extend_from_slice(&flat[start..start + emb.len() * t.dim]);
        for i in 0..b.num_rows() {
            t.coords.push([x.value(i), y.value(i)]);
            let size = ts.value(i);
            if t.tile_size != 0 && size != t.tile_size {
                return Err(features_err(
                    path,
                    format!("tiles of {} and {size} level-0 px in one slide: a TRIDENT file records one tile size", t.tile_size),
                ));
            }
            t.tile_size = size;
        }
    }
    Ok(t)
}

/// Writes one slide's rows as `dir/SLIDE_ID.h5` in TRIDENT's layout (to a temporary name,
/// renamed when complete); returns the file.
pub fn write_trident(
    dir: &Path,
    slide_id: &str,
    batches: &[RecordBatch],
) -> FeaturesResult<PathBuf> {
    let path = dir.join(format!("{slide_id}.h5"));
    let t = slide_table(&path, batches)?;
    let tmp = dir.join(format!(".{slide_id}.h5.tmp"));
    let h5 = |e: hdf5::Error| features_err(&path, format!("writing HDF5: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| features_err(dir, e.to_string()))?;
    {
        let f = hdf5::File::create(&tmp).map_err(h5)?;
        f.new_dataset::<f32>()
            .shape([t.coords.len(), t.dim])
            .create("features")
            .map_err(h5)?
            .write_raw(&t.features)
            .map_err(h5)?;
        let flat: Vec<i64> = t.coords.iter().flatten().copied().collect();
        let c = f
            .new_dataset::<i64>()
            .shape([t.coords.len(), 2])
            .create("coords")
            .map_err(h5)?;
        c.write_raw(&flat).map_err(h5)?;
        for (name, v) in [
            ("patch_size_level0", t.tile_size),
            ("patch_size", t.tile_size),
            ("patch_level", 0),
            ("overlap", 0),
        ] {
            c.new_attr::<i64>()
                .create(name)
                .map_err(h5)?
                .write_scalar(&v)
                .map_err(h5)?;
        }
        let name: hdf5::types::VarLenUnicode = slide_id
            .parse()
            .map_err(|e| features_err(&path, format!("slide id as HDF5 string: {e}")))?;
        c.new_attr::<hdf5::types::VarLenUnicode>()
            .create("name")
            .map_err(h5)?
            .write_scalar(&name)
            .map_err(h5)?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| features_err(&path, e.to_string()))?;
    Ok(path)
}

/// [`write_trident`] with the error as text, the shape `tessera export` registers.
pub fn trident_exporter(
    dir: &Path,
    slide_id: &str,
    batches: &[RecordBatch],
) -> Result<PathBuf, String> {
    write_trident(dir, slide_id, batches).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h5_features::H5FeaturesParams;
    use arrow::array::{ArrayRef, StringArray};
    use std::sync::Arc;
    use tessera_pipeline::schema::embeddings_schema;

    fn batch(id: &str, xs: &[i64], size: i64, dim: usize) -> RecordBatch {
        let n = xs.len();
        let values: Vec<f32> = (0..n * dim).map(|i| i as f32 * 0.25 - 3.0).collect();
        let item = Arc::new(arrow::datatypes::Field::new(
            "item",
            DataType::Float32,
            true,
        ));
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![id; n])),
            Arc::new(Int64Array::from(xs.to_vec())),
            Arc::new(Int64Array::from(vec![7; n])),
            Arc::new(Int64Array::from(vec![size; n])),
            Arc::new(
                FixedSizeListArray::try_new(
                    item,
                    dim as i32,
                    Arc::new(Float32Array::from(values)),
                    None,
                )
                .unwrap(),
            ),
        ];
        RecordBatch::try_new(embeddings_schema(dim, false), cols).unwrap()
    }

    #[test]
    fn a_trident_export_reads_back_identically_with_h5_features() {
        let dir = tempfile::tempdir().unwrap();
        // Two batches, the second a slice (non-zero offset into its values).
        let whole = batch("s", &[0, 512, 1024, 1536], 512, 3);
        let batches = vec![whole.slice(0, 1), whole.slice(1, 3)];
        let file = write_trident(dir.path(), "s", &batches).unwrap();
        let back = H5FeaturesParams {
            path: dir.path().to_string_lossy().into_owned(),
            ..Default::default()
        }
        .read(&file, None)
        .unwrap();
        let want = slide_table(&file, &[whole]).unwrap();
        assert_eq!(back.coords, want.coords);
        assert_eq!((back.tile_size, back.dim), (512, 3));
        assert_eq!(back.features, want.features);
        assert!(!dir.path().join(".s.h5.tmp").exists());
    }

    #[test]
    fn mixed_tile_sizes_in_one_slide_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_trident(
            dir.path(),
            "m",
            &[batch("m", &[0], 256, 2), batch("m", &[256], 512, 2)],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("m.h5") && e.contains("one tile size"), "{e}");
    }
}
