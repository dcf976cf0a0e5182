//! Writes PyTorch `.pth` checkpoints (the zip + pickle layout of `torch.save` since 1.6) without
//! PyTorch, so the `.pth` loading path is tested on files whose bytes we control.

use candle_core::Tensor;
use std::io::Write;
use std::path::Path;

/// Pickle protocol 2 opcodes used by `torch.save` for a state dict.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_DICT: u8 = b'}';
    pub const MARK: u8 = b'(';
    pub const SETITEMS: u8 = b'u';
    pub const SETITEM: u8 = b's';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const TUPLE: u8 = b't';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const NEWFALSE: u8 = 0x89;
    pub const STOP: u8 = b'.';
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }
    fn str(&mut self, s: &str) {
        self.op(op::BINUNICODE);
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn int(&mut self, v: usize) {
        self.op(op::BININT);
        self.0.extend((v as i32).to_le_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.op(op::GLOBAL);
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }
    fn int_tuple(&mut self, vs: &[usize]) {
        self.op(op::MARK);
        for &v in vs {
            self.int(v);
        }
        self.op(op::TUPLE);
    }
}

/// Writes f32 `tensors` as a `torch.save`d state dict, nested under `nest_key` when given
/// (`{"state_dict": {...}}`, as Lightning and many training scripts save them).
pub fn write_pth(path: &Path, tensors: &[(String, Tensor)], nest_key: Option<&str>) {
    let mut p = Pickle(vec![op::PROTO, 2]);
    if let Some(key) = nest_key {
        p.op(op::EMPTY_DICT);
        p.str(key);
    }
    p.op(op::EMPTY_DICT);
    p.op(op::MARK);
    for (i, (name, t)) in tensors.iter().enumerate() {
        let dims = t.dims().to_vec();
        let mut strides = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(op::MARK);
        // persistent id: ('storage', torch.FloatStorage, key, location, numel)
        p.op(op::MARK);
        p.str("storage");
        p.global("torch", "FloatStorage");
        p.str(&i.to_string());
        p.str("cpu");
        p.int(t.elem_count());
        p.op(op::TUPLE);
        p.op(op::BINPERSID);
        p.int(0); // storage offset
        p.int_tuple(&dims);
        p.int_tuple(&strides);
        p.op(op::NEWFALSE); // requires_grad
        p.op(op::EMPTY_DICT); // backward hooks
        p.op(op::TUPLE);
        p.op(op::REDUCE);
    }
    p.op(op::SETITEMS);
    if nest_key.is_some() {
        p.op(op::SETITEM);
    }
    p.op(op::STOP);

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(&p.0).unwrap();
    for (i, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), stored).unwrap();
        let vals = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for v in vals {
            zip.write_all(&v.to_le_bytes()).unwrap();
        }
    }
    zip.start_file("archive/version", stored).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}
