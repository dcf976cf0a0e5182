//! Independent f64 formulations of the attention-family models (ABMIL, CLAM-SB/MB, DSMIL) and
//! their training losses, written from the papers' equations with plain loops over
//! `Vec<f64>`, for the oracle tests: forward values, and gradients by central differences.

use std::collections::HashMap;

use candle_nn::VarMap;

use super::init::named_vars;

/// Parameters by name, as f64 (row-major, PyTorch layouts: `weight [out, in]`).
pub type Params = HashMap<String, Vec<f64>>;

/// The model's parameters as f64 values.
pub fn params_of(vars: &VarMap) -> Params {
    named_vars(vars)
        .into_iter()
        .map(|(name, var)| {
            let v = var
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("parameter values");
            (name, v.into_iter().map(f64::from).collect())
        })
        .collect()
}

/// `W x + b` for `W [out, in]`.
pub fn linear(p: &Params, name: &str, x: &[f64]) -> Vec<f64> {
    let w = &p[&format!("{name}.weight")];
    let b = &p[&format!("{name}.bias")];
    let out = b.len();
    let inp = x.len();
    assert_eq!(w.len(), out * inp, "{name}");
    (0..out)
        .map(|o| b[o] + (0..inp).map(|i| w[o * inp + i] * x[i]).sum::<f64>())
        .collect()
}

/// The shared head: `out(relu(hidden(x)))`, or `out(x)` without a hidden layer.
pub fn head(p: &Params, x: &[f64]) -> Vec<f64> {
    if p.contains_key("head.hidden.weight") {
        let h: Vec<f64> = linear(p, "head.hidden", x)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        linear(p, "head.out", &h)
    } else {
        linear(p, "head.out", x)
    }
}

/// Softmax of a vector.
pub fn softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// `-log softmax(logits)[target]`.
pub fn cross_entropy(logits: &[f64], target: usize) -> f64 {
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    lse - logits[target]
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// CLAM's gated attention logits of every instance, `[N][branches]`.
pub fn clam_attention(p: &Params, h: &[Vec<f64>]) -> Vec<Vec<f64>> {
    h.iter()
        .map(|x| {
            let a = linear(p, "clam.attention_a", x);
            let b = linear(p, "clam.attention_b", x);
            let g: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(a, b)| a.tanh() * sigmoid(*b))
                .collect();
            linear(p, "clam.attention_c", &g)
        })
        .collect()
}

/// Softmax over instances of column `branch`.
pub fn column_softmax(a: &[Vec<f64>], branch: usize) -> Vec<f64> {
    softmax(&a.iter().map(|r| r[branch]).collect::<Vec<_>>())
}

/// `sum_k w_k h_k`.
pub fn weighted_sum(w: &[f64], h: &[Vec<f64>]) -> Vec<f64> {
    let d = h[0].len();
    (0..d)
        .map(|j| w.iter().zip(h).map(|(w, x)| w * x[j]).sum())
        .collect()
}

/// CLAM bag logits: one branch (SB, ABMIL) or the head's output `c` on branch `c` (MB).
pub fn clam_logits(p: &Params, h: &[Vec<f64>], n_classes: usize, multi: bool) -> Vec<f64> {
    let a = clam_attention(p, h);
    if !multi {
        return head(p, &weighted_sum(&column_softmax(&a, 0), h));
    }
    (0..n_classes)
        .map(|c| head(p, &weighted_sum(&column_softmax(&a, c), h))[c])
        .collect()
}

/// Positions of the `k` largest / smallest values (ties to the earlier index).
fn ranked(values: &[f64], k: usize, largest: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&i, &j| {
        let o = values[i].partial_cmp(&values[j]).expect("finite");
        (if largest { o.reverse() } else { o }).then(i.cmp(&j))
    });
    idx.truncate(k);
    idx
}

/// CLAM's instance-clustering loss of one bag (cross-entropy, mean over the pseudo-labelled
/// instances of each evaluated classifier; with subtyping averaged over classes).
pub fn clam_instance_loss(
    p: &Params,
    h: &[Vec<f64>],
    label: usize,
    n_classes: usize,
    multi: bool,
    k: usize,
    subtyping: bool,
) -> f64 {
    let a = clam_attention(p, h);
    let k = k.min(h.len());
    let mut total = 0.0;
    for c in 0..n_classes {
        let w = column_softmax(&a, if multi { c } else { 0 });
        let name = format!("clam.instance_classifiers.{c}");
        let mut terms = Vec::new();
        if c == label {
            for i in ranked(&w, k, true) {
                terms.push(cross_entropy(&linear(p, &name, &h[i]), 1));
            }
            for i in ranked(&w, k, false) {
                terms.push(cross_entropy(&linear(p, &name, &h[i]), 0));
            }
        } else if subtyping {
            for i in ranked(&w, k, true) {
                terms.push(cross_entropy(&linear(p, &name, &h[i]), 0));
            }
        }
        if !terms.is_empty() {
            total += terms.iter().sum::<f64>() / terms.len() as f64;
        }
    }
    if subtyping {
        total / n_classes as f64
    } else {
        total
    }
}

/// DSMIL's bag logits and max-instance logits of one bag.
pub fn dsmil_logits(p: &Params, h: &[Vec<f64>], n_classes: usize) -> (Vec<f64>, Vec<f64>) {
    let scores: Vec<Vec<f64>> = h.iter().map(|x| linear(p, "dsmil.instance", x)).collect();
    let max: Vec<f64> = (0..n_classes)
        .map(|c| {
            scores
                .iter()
                .map(|s| s[c])
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect();
    let queries: Vec<Vec<f64>> = h
        .iter()
        .map(|x| {
            let q: Vec<f64> = linear(p, "dsmil.q1", x)
                .into_iter()
                .map(|v| v.max(0.0))
                .collect();
            linear(p, "dsmil.q2", &q)
                .into_iter()
                .map(f64::tanh)
                .collect()
        })
        .collect();
    let q_dim = queries[0].len() as f64;
    let mut flat = Vec::new();
    for c in 0..n_classes {
        let critical = ranked(&scores.iter().map(|s| s[c]).collect::<Vec<_>>(), 1, true)[0];
        let logits: Vec<f64> = queries
            .iter()
            .map(|q| {
                q.iter()
                    .zip(&queries[critical])
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    / q_dim.sqrt()
            })
            .collect();
        flat.extend(weighted_sum(&softmax(&logits), h));
    }
    (head(p, &flat), max)
}

/// Central-difference gradient of `f` with respect to every parameter value.
pub fn numeric_gradient(p: &Params, f: impl Fn(&Params) -> f64) -> Params {
    let eps = 1e-6;
    let mut grads = Params::new();
    let mut q = p.clone();
    for (name, values) in p {
        let mut g = vec![0.0; values.len()];
        for (i, gi) in g.iter_mut().enumerate() {
            let v = values[i];
            q.get_mut(name).expect("name")[i] = v + eps;
            let up = f(&q);
            q.get_mut(name).expect("name")[i] = v - eps;
            let down = f(&q);
            q.get_mut(name).expect("name")[i] = v;
            *gi = (up - down) / (2.0 * eps);
        }
        grads.insert(name.clone(), g);
    }
    grads
}

/// Bags of a few instances with varied values (and `labels`), for the oracle tests.
pub fn test_bags(lengths: &[usize], dim: usize, labels: &[usize]) -> Vec<super::Bag> {
    lengths
        .iter()
        .zip(labels)
        .enumerate()
        .map(|(b, (&n, &label))| super::Bag {
            slide_id: format!("s{b}"),
            label_index: label,
            split: super::Split::Train,
            dim,
            embeddings: (0..n * dim)
                .map(|v| ((v * 7 + b * 13) as f32 * 0.61).sin() * 1.5)
                .collect(),
            positions: None,
            pixels: None,
        })
        .collect()
}

/// A bag's instances as f64 rows.
pub fn rows(bag: &super::Bag) -> Vec<Vec<f64>> {
    bag.embeddings
        .chunks(bag.dim)
        .map(|r| r.iter().map(|v| f64::from(*v)).collect())
        .collect()
}

/// Asserts candle's gradients of every parameter equal `numeric` (relative to the largest).
pub fn assert_gradients_match(
    vars: &VarMap,
    grads: &candle_core::backprop::GradStore,
    numeric: &Params,
) {
    for (name, var) in named_vars(vars) {
        let expected = &numeric[&name];
        let got: Vec<f32> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0.0; expected.len()],
        };
        let scale = expected.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!(
                (f64::from(*g) - e).abs() <= 2e-3 * scale,
                "{name}[{i}]: autograd {g} vs central difference {e}"
            );
        }
    }
}

/// A 4-wide model of `pooling` without encoder, standardisation or dropout (so a training
/// forward pass is deterministic), for the oracle tests.
pub fn config(
    pooling: super::Pooling,
    n_classes: usize,
    head_hidden: usize,
    clam_dsmil: super::ClamDsmilOptions,
) -> super::ModelConfig {
    super::ModelConfig {
        pooling,
        input_dim: 4,
        n_classes,
        head_hidden,
        dropout: 0.0,
        sparse_channels: vec![],
        sparse_kernel: 3,
        sparse_batch_norm: false,
        sparse_pool: super::GlobalPool::Avg,
        attention_hidden: 0,
        lse_r: 1.0,
        instance_encoder: vec![],
        encoder_dropout: 0.0,
        standardize: None,
        clam_dsmil,
    }
}
