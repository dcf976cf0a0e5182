//! Helpers shared by the integration tests: model files and tile tables made on the spot.

#![allow(dead_code)]

pub mod pth;

use arrow::array::{ArrayRef, BinaryArray, Float64Array, Int32Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tessera_embed::{ResNet, ResNetDepth};

/// Writes a ResNet with random weights and non-trivial batch-norm statistics under
/// torchvision's names to `dir/name.safetensors`; returns the path.
pub fn write_resnet(dir: &Path, depth: ResNetDepth, seed: u64) -> PathBuf {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    ResNet::new(depth, vb).unwrap();
    // Deterministic values: kaiming-like weights, BN stats away from the identity.
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (k, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let fan: usize = shape.dims().iter().skip(1).product::<usize>().max(1);
        let vals: Vec<f32> = (0..n)
            .map(|i| {
                let h = (i as u64 * 2654435761 + k as u64 * 97 + seed * 7919) % 10007;
                let u = h as f32 / 10007.0 - 0.5;
                if name.ends_with("running_var") {
                    0.5 + u.abs()
                } else if name.ends_with("running_mean") {
                    0.1 * u
                } else if name.contains("bn")
                    || name.ends_with("downsample.1.weight")
                    || name.ends_with("downsample.1.bias")
                {
                    if name.ends_with("weight") {
                        0.8 + 0.4 * u
                    } else {
                        0.1 * u
                    }
                } else {
                    u * (6.0 / fan as f32).sqrt() * 2.0
                }
            })
            .collect();
        var.set(&Tensor::from_vec(vals, shape, &Device::Cpu).unwrap())
            .unwrap();
    }
    drop(data);
    let path = dir.join(format!("resnet-{seed}.safetensors"));
    varmap.save(&path).unwrap();
    path
}

/// Square RGB8 tiles with distinct content.
pub fn tiles(n: usize, px: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|t| {
            (0..px * px * 3)
                .map(|j| ((t * 53 + j * 7 + (j / (px * 3)) * 11) % 256) as u8)
                .collect()
        })
        .collect()
}

/// The tiling stage's table for `tiles` of one slide, with a pass-through column.
pub fn tile_table(slide: &str, tiles: &[Vec<u8>], px: usize, first_x: i64) -> RecordBatch {
    let n = tiles.len();
    let schema = tile_schema();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![slide; n])),
        Arc::new(Int64Array::from(
            (0..n as i64).map(|i| first_x + 512 * i).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(vec![1024; n])),
        Arc::new(Int64Array::from(vec![512; n])),
        Arc::new(BinaryArray::from_iter_values(tiles.iter())),
        Arc::new(Int32Array::from(vec![px as i32; n])),
        Arc::new(Float64Array::from(vec![0.75; n])),
    ];
    RecordBatch::try_new(schema, cols).unwrap()
}

pub fn tile_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, false),
        Field::new("x", DataType::Int64, false),
        Field::new("y", DataType::Int64, false),
        Field::new("tile_size", DataType::Int64, false),
        Field::new("pixels", DataType::Binary, false),
        Field::new("pixels_size", DataType::Int32, false),
        Field::new("tissue_fraction", DataType::Float64, false),
    ]))
}
