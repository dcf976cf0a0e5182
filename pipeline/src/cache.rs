//! The content-addressed Parquet cache: one plain Parquet file per (stage, slide), named by a
//! hash of everything that determines it, written under a temporary name and renamed when
//! complete, so an interrupted run loses nothing finished and never leaves a half file behind
//! under a real name.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The tool version written into every cache file's metadata.
pub const TOOL_VERSION: &str = concat!("tessera ", env!("CARGO_PKG_VERSION"));

/// Bytes hashed at each end of a slide file for its identity.
pub const IDENTITY_SPAN: u64 = 1 << 20;

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cache {path}: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("cache {path}: not a complete entry ({reason})")]
    Invalid { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything that determines one stage's output for one slide.
#[derive(Debug, Clone)]
pub struct KeyParts<'a> {
    pub kind: &'a str,
    pub version: &'a str,
    /// The stage's parameters, canonical JSON (sorted keys, defaults filled in).
    pub params: &'a str,
    /// Identity of things outside the parameters (weights file hash).
    pub salt: &'a str,
    pub slide_id: &'a str,
    /// For sources: the slide file's identity; otherwise empty.
    pub slide_identity: &'a str,
    /// The keys of the stage's inputs for this slide, in input order.
    pub input_keys: &'a [String],
}

/// Hashes key parts into a 32-hex-digit content key.
pub fn content_key(parts: &KeyParts<'_>) -> String {
    let mut h = blake3::Hasher::new();
    for field in [
        parts.kind,
        parts.version,
        parts.params,
        parts.salt,
        parts.slide_id,
        parts.slide_identity,
    ] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    for k in parts.input_keys {
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
    }
    h.finalize().to_hex()[..32].to_string()
}

/// Identity of a file that stays cheap on multi-GB slides: its size plus a BLAKE3 hash of its
/// first and last MiB. Edits that keep the size and touch neither end go unnoticed; slide
/// formats keep their headers and directories there, so re-scans and re-exports change it.
/// Remembered for the life of the process while the file's size, mtime and inode stay the same
/// (a sweep plans every point against the same slides). A folder (a DICOM slide's series) is
/// identified by the names and identities of the files in it, so adding, removing or
/// rewriting one instance changes it.
pub fn file_identity(path: &Path) -> Result<String, CacheError> {
    if path.is_dir() {
        return folder_identity(path);
    }
    memoized(path, "identity", || {
        let mut f = File::open(path).map_err(io_err(path))?;
        let len = f.metadata().map_err(io_err(path))?.len();
        let mut h = blake3::Hasher::new();
        h.update(&len.to_le_bytes());
        let mut buf = vec![0u8; IDENTITY_SPAN.min(len) as usize];
        f.read_exact(&mut buf).map_err(io_err(path))?;
        h.update(&buf);
        if len > IDENTITY_SPAN {
            let tail = IDENTITY_SPAN.min(len - IDENTITY_SPAN);
            f.seek(SeekFrom::Start(len - tail)).map_err(io_err(path))?;
            buf.resize(tail as usize, 0);
            f.read_exact(&mut buf).map_err(io_err(path))?;
            h.update(&buf);
        }
        Ok(format!("{len}:{}", &h.finalize().to_hex()[..32]))
    })
}

/// [`file_identity`] of a folder: its regular files (not its subfolders), sorted by name.
fn folder_identity(dir: &Path) -> Result<String, CacheError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let id = file_identity(f)?;
        for field in [name.as_ref(), id.as_str()] {
            h.update(&(field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
    }
    Ok(format!(
        "dir{}:{}",
        files.len(),
        &h.finalize().to_hex()[..32]
    ))
}

/// Hash of a whole file (model weights: small enough, and every byte matters). Remembered like
/// [`file_identity`].
pub fn file_hash(path: &Path) -> Result<String, CacheError> {
    memoized(path, "hash", || {
        let mut f = File::open(path).map_err(io_err(path))?;
        let mut h = blake3::Hasher::new();
        std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
        Ok(h.finalize().to_hex()[..32].to_string())
    })
}

/// What must not change for a remembered file digest to stay valid.
type FileStamp = (u64, Option<std::time::SystemTime>, u64);

fn file_stamp(path: &Path) -> Result<FileStamp, CacheError> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).map_err(io_err(path))?;
    Ok((m.len(), m.modified().ok(), m.ino()))
}

type DigestMemo = std::collections::HashMap<(PathBuf, &'static str), (FileStamp, String)>;

static DIGESTS: std::sync::OnceLock<std::sync::Mutex<DigestMemo>> = std::sync::OnceLock::new();

/// `compute`'s digest of `path`, computed once per process while the file's stamp holds.
fn memoized(
    path: &Path,
    what: &'static str,
    compute: impl FnOnce() -> Result<String, CacheError>,
) -> Result<String, CacheError> {
    let stamp = file_stamp(path)?;
    let key = (path.to_path_buf(), what);
    let memo = DIGESTS.get_or_init(Default::default);
    if let Some((s, digest)) = memo.lock().ok().and_then(|m| m.get(&key).cloned()) {
        if s == stamp {
            return Ok(digest);
        }
    }
    let digest = compute()?;
    if let Ok(mut m) = memo.lock() {
        m.insert(key, (stamp, digest.clone()));
    }
    Ok(digest)
}

/// The cache folder.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the entry of `kind` with `key` lives: `ROOT/KIND/KE/KEY.parquet`.
    pub fn entry_path(&self, kind: &str, key: &str) -> PathBuf {
        self.root
            .join(kind)
            .join(&key[..2.min(key.len())])
            .join(format!("{key}.parquet"))
    }

    /// Whether a complete entry exists: its Parquet footer reads and names the same key.
    /// A truncated or foreign file is removed so it gets recomputed, never trusted.
    pub fn is_valid(&self, kind: &str, key: &str) -> bool {
        let path = self.entry_path(kind, key);
        if !path.exists() {
            return false;
        }
        match read_metadata(&path) {
            Ok(meta) if meta.get("tessera.key").map(String::as_str) == Some(key) => true,
            _ => {
                tracing::warn!(path = %path.display(), "cache entry is incomplete or corrupt; recomputing it");
                let _ = fs::remove_file(&path);
                false
            }
        }
    }

    /// Reads a whole entry. Any decoding error means the entry is corrupt: it is removed.
    pub fn read(&self, kind: &str, key: &str) -> Result<Vec<RecordBatch>, CacheError> {
        let path = self.entry_path(kind, key);
        let result = read_parquet(&path);
        if result.is_err() {
            let _ = fs::remove_file(&path);
        }
        result
    }

    /// Starts writing an entry; nothing appears under the entry's name until `finish`.
    pub fn begin(
        &self,
        kind: &str,
        key: &str,
        schema: SchemaRef,
        metadata: BTreeMap<String, String>,
    ) -> Result<PendingEntry, CacheError> {
        let final_path = self.entry_path(kind, key);
        let dir = final_path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp_path = dir.join(format!(
            ".{key}.{}.{}.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&tmp_path).map_err(io_err(&tmp_path))?;
        let mut kv: Vec<KeyValue> = metadata
            .into_iter()
            .map(|(k, v)| KeyValue::new(k, v))
            .collect();
        kv.push(KeyValue::new("tessera.key".to_string(), key.to_string()));
        kv.push(KeyValue::new(
            "tessera.tool".to_string(),
            TOOL_VERSION.to_string(),
        ));
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
            .set_key_value_metadata(Some(kv))
            .build();
        let writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(|source| {
            CacheError::Parquet {
                path: tmp_path.clone(),
                source,
            }
        })?;
        Ok(PendingEntry {
            tmp_path,
            final_path,
            writer: Some(writer),
            rows: 0,
        })
    }
}

/// An entry being written. Dropping it without `finish` removes the temporary file.
pub struct PendingEntry {
    tmp_path: PathBuf,
    final_path: PathBuf,
    writer: Option<ArrowWriter<File>>,
    rows: usize,
}

impl PendingEntry {
    /// Appends rows.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), CacheError> {
        self.rows += batch.num_rows();
        match self.writer.as_mut() {
            Some(w) => w.write(batch).map_err(|source| CacheError::Parquet {
                path: self.tmp_path.clone(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Closes the file, flushes it to disk and renames it to its real name.
    pub fn finish(mut self) -> Result<PathBuf, CacheError> {
        if let Some(w) = self.writer.take() {
            let file = w.into_inner().map_err(|source| CacheError::Parquet {
                path: self.tmp_path.clone(),
                source,
            })?;
            file.sync_all().map_err(io_err(&self.tmp_path))?;
        }
        fs::rename(&self.tmp_path, &self.final_path).map_err(io_err(&self.final_path))?;
        Ok(self.final_path.clone())
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

impl Drop for PendingEntry {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// Reads every batch of a Parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>, CacheError> {
    let file = File::open(path).map_err(io_err(path))?;
    let perr = |source| CacheError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(perr)?
        .build()
        .map_err(perr)?;
    reader
        .map(|b| {
            b.map_err(|e| CacheError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Reads a Parquet file's key-value metadata (footer only).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, CacheError> {
    let file = File::open(path).map_err(io_err(path))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|source| CacheError::Parquet {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .filter_map(|e| e.value.clone().map(|v| (e.key.clone(), v)))
                .collect()
        })
        .unwrap_or_default())
}

/// One cache file as listed by `tessera cache ls`.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub kind: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// A temporary file left by an interrupted write.
    pub temporary: bool,
    /// A claim file (a process computing the entry, or one that died doing so).
    pub claim: bool,
}

/// Every file in the cache, complete or not.
pub fn list_entries(root: &Path) -> Result<Vec<EntryInfo>, CacheError> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for kind_dir in fs::read_dir(root).map_err(io_err(root))? {
        let kind_dir = kind_dir.map_err(io_err(root))?;
        if !kind_dir.path().is_dir() {
            continue;
        }
        let kind = kind_dir.file_name().to_string_lossy().to_string();
        for shard in fs::read_dir(kind_dir.path()).map_err(io_err(root))? {
            let shard = shard.map_err(io_err(root))?;
            if !shard.path().is_dir() {
                continue;
            }
            for file in fs::read_dir(shard.path()).map_err(io_err(root))? {
                let file = file.map_err(io_err(root))?;
                let name = file.file_name().to_string_lossy().to_string();
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(EntryInfo {
                    kind: kind.clone(),
                    path: file.path(),
                    bytes,
                    temporary: name.ends_with(".tmp"),
                    claim: crate::claim::is_claim_file(&name),
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The key of a complete entry, from its file name.
pub fn entry_key(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".parquet")
        .filter(|k| !k.starts_with('.'))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {

    #[test]
    fn remembered_digests_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.bin");
        fs::write(&p, b"first").unwrap();
        let a = file_hash(&p).unwrap();
        assert_eq!(file_hash(&p).unwrap(), a);
        let ida = file_identity(&p).unwrap();
        // A rewrite (another size) is seen at once, not served from memory.
        fs::write(&p, b"second!").unwrap();
        let b = file_hash(&p).unwrap();
        assert_ne!(a, b);
        assert_ne!(file_identity(&p).unwrap(), ida);
        // Replaced by another file of the same size (new inode): seen too.
        let q = dir.path().join("w2.bin");
        fs::write(&q, b"third!!").unwrap();
        fs::rename(&q, &p).unwrap();
        assert_ne!(file_hash(&p).unwrap(), b);
    }

    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("slide_id", DataType::Utf8, false),
            Field::new("x", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a", "a"])),
                Arc::new(Int64Array::from(vec![1, 2])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn entries_appear_only_when_finished_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let b = batch();
        let mut pending = cache
            .begin("tile", "abcdef", b.schema(), BTreeMap::new())
            .unwrap();
        pending.write(&b).unwrap();
        assert!(!cache.is_valid("tile", "abcdef"));
        pending.finish().unwrap();
        assert!(cache.is_valid("tile", "abcdef"));
        let back = cache.read("tile", "abcdef").unwrap();
        assert_eq!(back.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        let meta = read_metadata(&cache.entry_path("tile", "abcdef")).unwrap();
        assert_eq!(meta["tessera.key"], "abcdef");
    }

    #[test]
    fn dropped_writes_leave_nothing_and_truncated_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let b = batch();
        let mut pending = cache
            .begin("tile", "k1k1", b.schema(), BTreeMap::new())
            .unwrap();
        pending.write(&b).unwrap();
        drop(pending);
        assert!(list_entries(dir.path()).unwrap().is_empty());

        let mut pending = cache
            .begin("tile", "k2k2", b.schema(), BTreeMap::new())
            .unwrap();
        pending.write(&b).unwrap();
        let path = pending.finish().unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(!cache.is_valid("tile", "k2k2"));
        assert!(!path.exists(), "a corrupt entry is removed");
    }

    #[test]
    fn keys_change_with_every_part() {
        let inputs = vec!["in".to_string()];
        let base = KeyParts {
            kind: "embed",
            version: "1",
            params: "{}",
            salt: "w",
            slide_id: "s",
            slide_identity: "",
            input_keys: &inputs,
        };
        let k = content_key(&base);
        assert_eq!(k.len(), 32);
        assert_ne!(
            k,
            content_key(&KeyParts {
                salt: "w2",
                ..base.clone()
            })
        );
        assert_ne!(
            k,
            content_key(&KeyParts {
                params: "{\"a\":1}",
                ..base.clone()
            })
        );
        assert_ne!(
            k,
            content_key(&KeyParts {
                input_keys: &[],
                ..base.clone()
            })
        );
    }

    #[test]
    fn a_folder_is_identified_by_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let slide = dir.path().join("series");
        fs::create_dir(&slide).unwrap();
        fs::write(slide.join("a.dcm"), b"level 0").unwrap();
        fs::write(slide.join("b.dcm"), b"level 1").unwrap();
        let a = file_identity(&slide).unwrap();
        assert!(a.starts_with("dir2:"), "{a}");
        assert_eq!(file_identity(&slide).unwrap(), a);
        // An instance rewritten in place (the folder's own mtime does not change).
        fs::write(slide.join("b.dcm"), b"level 1, cut").unwrap();
        let b = file_identity(&slide).unwrap();
        assert_ne!(a, b);
        // An instance missing.
        fs::remove_file(slide.join("a.dcm")).unwrap();
        assert_ne!(file_identity(&slide).unwrap(), b);
        // Renamed: another identity too.
        fs::rename(slide.join("b.dcm"), slide.join("c.dcm")).unwrap();
        let c = file_identity(&slide).unwrap();
        fs::rename(slide.join("c.dcm"), slide.join("d.dcm")).unwrap();
        assert_ne!(file_identity(&slide).unwrap(), c);
    }

    #[test]
    fn identity_covers_size_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, vec![1u8; 3 << 20]).unwrap();
        let a = file_identity(&p).unwrap();
        let mut bytes = fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 1] = 2;
        fs::write(&p, &bytes).unwrap();
        assert_ne!(a, file_identity(&p).unwrap());
    }
}
