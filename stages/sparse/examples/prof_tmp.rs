use std::time::Instant;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tessera_sparse::{kernels, CoordSet, RuleKey, SparseModule, SparseTensor, SubmanifoldConv2d};
const C: usize = 32;
fn lcg(s: &mut u64) -> u64 { *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); *s >> 33 }
fn med(mut v: Vec<f64>) -> f64 { v.sort_by(|a,b| a.total_cmp(b)); v[v.len()/2] }
fn t(runs: usize, mut f: impl FnMut()) -> f64 { f(); med((0..runs).map(|_| { let t = Instant::now(); f(); t.elapsed().as_secs_f64()*1e3 }).collect()) }
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let kind = a[1].as_str(); let n: usize = a[2].parse().unwrap(); let runs: usize = a[3].parse().unwrap();
    let mut s = 1u64;
    let mut coords: Vec<[i32;3]> = if kind == "r" {
        let mut seen = std::collections::HashSet::new(); let mut v = vec![];
        while v.len() < n { let c = [0, (lcg(&mut s)%2000) as i32, (lcg(&mut s)%2000) as i32]; if seen.insert(c) { v.push(c);} } v
    } else { let side = (n as f64).sqrt().round() as i32; (0..side).flat_map(|i| (0..side).map(move |j| [0, 500+i, 500+j])).collect() };
    for k in (1..coords.len()).rev() { let r = (lcg(&mut s) as usize) % (k+1); coords.swap(k, r); }
    let n = coords.len();
    let dev = Device::Cpu;
    let rbt = t(runs, || { let cs = CoordSet::new(coords.to_vec(), 1).unwrap(); cs.rulebook(RuleKey::submanifold(3)).unwrap(); });
    let vm = VarMap::new();
    let conv = SubmanifoldConv2d::new(C, C, 3, false, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let feats = Var::from_tensor(&Tensor::randn(0f32, 1., (n, C), &dev).unwrap()).unwrap();
    let x = SparseTensor::new(coords.to_vec(), feats.as_tensor().clone(), 1).unwrap();
    let fb = t(runs, || { let y = conv.forward(&x).unwrap(); y.features().backward().unwrap(); });
    let xc = SparseTensor::new(coords.to_vec(), feats.as_tensor().detach(), 1).unwrap();
    let fbc = t(runs, || { let y = conv.forward(&xc).unwrap(); y.features().backward().unwrap(); });
    let rb = x.rulebook(RuleKey::submanifold(3)).unwrap();
    let xv: Vec<f32> = feats.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let wv: Vec<f32> = conv.weight().flatten_all().unwrap().to_vec1().unwrap();
    let y = kernels::gather_conv(rb.forward_map(), &xv, C, &wv, C);
    let f = t(runs, || { kernels::gather_conv(rb.forward_map(), &xv, C, &wv, C); });
    let b = t(runs, || { kernels::gather_conv(rb.backward_map(), &y, C, &wv, C); });
    let w = t(runs, || { kernels::weight_grad(rb.forward_map(), &xv, C, &y, C); });
    let total = t(runs, || { let x = SparseTensor::new(coords.to_vec(), feats.as_tensor().clone(), 1).unwrap(); let y = conv.forward(&x).unwrap(); y.features().backward().unwrap(); });
    let fl = 2.0 * (rb.num_pairs()*C*C) as f64 / 1e6;
    println!("{kind} {n} rb {rbt:.2} fwdbwd {fb:.2} fwdbwd_nogx {fbc:.2} total {total:.2} | fwd {f:.2} ({:.1} GF/s) bwdx {b:.2} wgrad {w:.2} ({:.1} GF/s) pairs {}", fl/f, fl/w, rb.num_pairs());
}
