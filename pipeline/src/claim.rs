//! Claims on cache entries, so that processes sharing one cache (Slurm array tasks, a shard
//! and an unsharded run) never compute the same entry twice at the same time.
//!
//! A claim is a small file `.KEY.claim` next to the entry, created with `O_EXCL`
//! (`create_new`): exactly one process gets it. It holds the claimer's host, pid and start
//! time. Its holder touches it periodically (heartbeat) and removes it once the entry is
//! written. A claim is stale, and taken over, when its pid is dead on this host or when it
//! was not touched for longer than the TTL (a killed job on another node). Taking over goes
//! through a second `O_EXCL` file (`.KEY.claim.break`) so that two processes never both
//! remove a stale claim and both take it.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Suffix of claim files.
pub const CLAIM_SUFFIX: &str = ".claim";
/// Suffix of the short-lived lock taken while breaking a stale claim.
pub const BREAK_SUFFIX: &str = ".claim.break";
/// Default time after which an untouched claim is considered abandoned.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

static NONCE: AtomicU64 = AtomicU64::new(0);

/// Who holds a claim, as written in the claim file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimInfo {
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch when the claim was taken.
    pub started: u64,
    /// Tells this claim apart from a later one by the same process.
    pub nonce: String,
}

impl ClaimInfo {
    fn mine() -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        ClaimInfo {
            host: hostname(),
            pid: std::process::id(),
            started,
            nonce: format!(
                "{}-{nanos}-{}",
                std::process::id(),
                NONCE.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }
}

impl std::fmt::Display for ClaimInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} pid {}", self.host, self.pid)
    }
}

/// This machine's name, as claims record it.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Whether process `pid` exists on this host. Without `/proc` nothing can be told: alive.
fn pid_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    match fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        // A zombie has finished: its claim is abandoned.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The claim file of an entry path (`DIR/KEY.parquet` -> `DIR/.KEY.claim`).
pub fn claim_path(entry: &Path) -> PathBuf {
    let stem = entry
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    entry.with_file_name(format!(".{stem}{CLAIM_SUFFIX}"))
}

/// What trying to claim found.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// The claim is ours until released (or dropped).
    Acquired(Claim),
    /// Another live process holds it (`None`: its file is being written or unreadable).
    Busy(Option<ClaimInfo>),
}

/// A claim we hold. Dropping it removes the file, unless someone took it over meanwhile.
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    nonce: String,
}

impl Claim {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks the claim alive (updates its modification time).
    pub fn touch(&self) -> std::io::Result<()> {
        touch(&self.path)
    }
}

fn touch(path: &Path) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)?
        .set_modified(SystemTime::now())
}

impl Drop for Claim {
    fn drop(&mut self) {
        let ours = fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str::<ClaimInfo>(&t).ok())
            .is_some_and(|i| i.nonce == self.nonce);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Whether a claim found on disk is abandoned: its process is gone (same host) or it was not
/// touched for `ttl`.
pub fn is_stale(info: Option<&ClaimInfo>, age: Duration, ttl: Duration) -> bool {
    if age > ttl {
        return true;
    }
    match info {
        Some(i) if i.host == hostname() => !pid_alive(i.pid),
        _ => false,
    }
}

/// Reads a claim file: its text, parsed holder, and time since last touched.
fn read_claim(path: &Path) -> std::io::Result<(String, Option<ClaimInfo>, Duration)> {
    let text = fs::read_to_string(path)?;
    let age = fs::metadata(path)?
        .modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .unwrap_or_default();
    let info = serde_json::from_str(&text).ok();
    Ok((text, info, age))
}

/// Tries to claim the entry whose claim file is `path`, taking over a stale claim.
pub fn try_claim(path: &Path, ttl: Duration) -> std::io::Result<ClaimOutcome> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut last_seen = None;
    for _ in 0..4 {
        match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut f) => {
                let info = ClaimInfo::mine();
                let text = serde_json::to_string(&info).unwrap_or_default();
                f.write_all(text.as_bytes())?;
                return Ok(ClaimOutcome::Acquired(Claim {
                    path: path.to_path_buf(),
                    nonce: info.nonce,
                }));
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let (text, info, age) = match read_claim(path) {
                    Ok(x) => x,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue, // released meanwhile
                    Err(e) => return Err(e),
                };
                if !is_stale(info.as_ref(), age, ttl) {
                    return Ok(ClaimOutcome::Busy(info));
                }
                tracing::info!(claim = %path.display(), holder = ?info, "taking over an abandoned claim");
                last_seen = info.clone();
                if !break_stale(path, &text, ttl)? {
                    return Ok(ClaimOutcome::Busy(info));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ClaimOutcome::Busy(last_seen))
}

/// Removes a stale claim whose text is still `seen`, under the break lock. False when another
/// process is breaking it right now.
fn break_stale(path: &Path, seen: &str, ttl: Duration) -> std::io::Result<bool> {
    let mut breaker = path.as_os_str().to_owned();
    breaker.push(".break");
    let breaker = PathBuf::from(breaker);
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&breaker)
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            // A breaker lives for microseconds; one that outlived a TTL (capped to a minute)
            // was left by a process killed mid-break.
            let old = fs::metadata(&breaker)
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > ttl.min(Duration::from_secs(60)));
            if old {
                let _ = fs::remove_file(&breaker);
            }
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    let still_same = fs::read_to_string(path).is_ok_and(|t| t == seen);
    if still_same {
        let _ = fs::remove_file(path);
    }
    let _ = fs::remove_file(&breaker);
    Ok(true)
}

/// The claims one run holds, kept alive by a heartbeat thread while the run lasts.
#[derive(Debug)]
pub struct ClaimSet {
    ttl: Duration,
    held: Mutex<HashMap<PathBuf, Claim>>,
}

impl ClaimSet {
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(ClaimSet {
            ttl,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Claims `path` for this run. Ok(None) when we hold it (now or already); Ok(Some(holder))
    /// when another live process does.
    pub fn acquire(&self, path: &Path) -> std::io::Result<Option<Option<ClaimInfo>>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.contains_key(path) {
            return Ok(None);
        }
        match try_claim(path, self.ttl)? {
            ClaimOutcome::Acquired(c) => {
                held.insert(path.to_path_buf(), c);
                Ok(None)
            }
            ClaimOutcome::Busy(info) => Ok(Some(info)),
        }
    }

    /// Gives a claim up (its entry is written, or will not be).
    pub fn release(&self, path: &Path) {
        let claim = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
        drop(claim);
    }

    /// Gives up every claim whose path `keep` rejects.
    pub fn retain(&self, keep: impl Fn(&Path) -> bool) {
        let dropped: Vec<Claim> = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<PathBuf> = held.keys().filter(|p| !keep(p)).cloned().collect();
            gone.iter().filter_map(|p| held.remove(p)).collect()
        };
        drop(dropped);
    }

    /// Gives every claim up.
    pub fn release_all(&self) {
        let all: Vec<Claim> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        drop(all);
    }

    /// How many claims are held.
    pub fn len(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Whether no claim is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Touches every held claim every quarter TTL (at least once a second) until the returned
    /// guard is dropped.
    pub fn heartbeat(self: &Arc<Self>) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let interval = (self.ttl / 4).max(Duration::from_secs(1));
        let (set, flag) = (self.clone(), stop.clone());
        let handle = thread::Builder::new()
            .name("tessera-claims".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(100));
                    if last.elapsed() < interval {
                        continue;
                    }
                    last = std::time::Instant::now();
                    let paths: Vec<PathBuf> = set
                        .held
                        .lock()
                        .map(|h| h.keys().cloned().collect())
                        .unwrap_or_default();
                    for p in paths {
                        let _ = touch(&p);
                    }
                }
            })
            .ok();
        Heartbeat { stop, handle }
    }
}

/// Stops the heartbeat when dropped.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Whether a file name in the cache is a claim (or a claim's break lock).
pub fn is_claim_file(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(CLAIM_SUFFIX) || name.ends_with(BREAK_SUFFIX))
}

/// Whether the claim file at `path` is abandoned (for `cache gc`).
pub fn claim_file_is_stale(path: &Path, ttl: Duration) -> bool {
    if path.to_string_lossy().ends_with(BREAK_SUFFIX) {
        return fs::metadata(path)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > ttl.min(Duration::from_secs(60)));
    }
    match read_claim(path) {
        Ok((_, info, age)) => is_stale(info.as_ref(), age, ttl),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn claim_path_sits_next_to_the_entry() {
        let p = claim_path(Path::new("/c/embed/ab/abcdef.parquet"));
        assert_eq!(p, Path::new("/c/embed/ab/.abcdef.claim"));
        assert!(is_claim_file(".abcdef.claim"));
        assert!(is_claim_file(".abcdef.claim.break"));
        assert!(!is_claim_file("abcdef.parquet"));
    }

    #[test]
    fn racing_threads_get_exactly_one_claim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kind/ab/.abcd.claim");
        for _round in 0..20 {
            let n = 8;
            let barrier = Arc::new(Barrier::new(n));
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let (b, p) = (barrier.clone(), path.clone());
                    thread::spawn(move || {
                        b.wait();
                        try_claim(&p, DEFAULT_TTL).unwrap()
                    })
                })
                .collect();
            let outcomes: Vec<ClaimOutcome> =
                handles.into_iter().map(|h| h.join().unwrap()).collect();
            let won = outcomes
                .iter()
                .filter(|o| matches!(o, ClaimOutcome::Acquired(_)))
                .count();
            assert_eq!(won, 1, "{outcomes:?}");
            drop(outcomes);
            assert!(
                !path.exists(),
                "dropping the winner's claim removes the file"
            );
        }
    }

    #[test]
    fn racing_processes_get_exactly_one_claim() {
        // Child processes: re-run this test binary on a helper test that claims and reports.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".k.claim");
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..4)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "claim::tests::claim_helper_process",
                        "--nocapture",
                    ])
                    .env("TESSERA_CLAIM_TEST_PATH", &path)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outputs: Vec<String> = children
            .into_iter()
            .map(|c| String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).into_owned())
            .collect();
        let won = outputs.iter().filter(|o| o.contains("CLAIM=won")).count();
        let lost = outputs.iter().filter(|o| o.contains("CLAIM=busy")).count();
        assert_eq!((won, lost), (1, 3), "{outputs:?}");
    }

    /// Run only as a child of `racing_processes_get_exactly_one_claim`.
    #[test]
    fn claim_helper_process() {
        let Some(path) = std::env::var_os("TESSERA_CLAIM_TEST_PATH") else {
            return;
        };
        let path = PathBuf::from(path);
        // Everyone starts close together; hold a won claim long enough for the others to see it.
        match try_claim(&path, DEFAULT_TTL).unwrap() {
            ClaimOutcome::Acquired(c) => {
                println!("CLAIM=won");
                thread::sleep(Duration::from_millis(1500));
                drop(c);
            }
            ClaimOutcome::Busy(_) => println!("CLAIM=busy"),
        }
    }

    #[test]
    fn a_claim_of_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".k.claim");
        // A finished child's pid: dead (reaped) on this host.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = ClaimInfo {
            host: hostname(),
            pid: dead,
            started: 0,
            nonce: "old".into(),
        };
        fs::write(&path, serde_json::to_string(&stale).unwrap()).unwrap();
        let ClaimOutcome::Acquired(c) = try_claim(&path, DEFAULT_TTL).unwrap() else {
            panic!("a dead pid's claim must be taken over");
        };
        let now: ClaimInfo = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
        drop(c);
        assert!(!path.exists());
        assert!(!dir.path().join(".k.claim.break").exists());
    }

    #[test]
    fn a_live_claim_is_respected_until_its_ttl_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".k.claim");
        // Held by a live process on another host: only the TTL can free it.
        let other = ClaimInfo {
            host: "some-other-node".into(),
            pid: 1,
            started: 0,
            nonce: "n".into(),
        };
        fs::write(&path, serde_json::to_string(&other).unwrap()).unwrap();
        match try_claim(&path, Duration::from_secs(3600)).unwrap() {
            ClaimOutcome::Busy(Some(i)) => assert_eq!(i, other),
            o => panic!("{o:?}"),
        }
        let old = SystemTime::now() - Duration::from_secs(120);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(matches!(
            try_claim(&path, Duration::from_secs(60)).unwrap(),
            ClaimOutcome::Acquired(_)
        ));
    }

    #[test]
    fn a_taken_over_claim_is_not_removed_by_its_old_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".k.claim");
        let ClaimOutcome::Acquired(old) = try_claim(&path, DEFAULT_TTL).unwrap() else {
            panic!()
        };
        // Someone else broke it and claimed it.
        fs::remove_file(&path).unwrap();
        let ClaimOutcome::Acquired(new) = try_claim(&path, DEFAULT_TTL).unwrap() else {
            panic!()
        };
        drop(old);
        assert!(path.exists(), "the new holder's claim survives");
        drop(new);
        assert!(!path.exists());
    }

    #[test]
    fn heartbeat_keeps_claims_fresh_and_sets_release_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".k.claim");
        let set = ClaimSet::new(Duration::from_secs(2));
        assert!(set.acquire(&path).unwrap().is_none());
        assert!(
            set.acquire(&path).unwrap().is_none(),
            "re-acquiring our own is fine"
        );
        let old = SystemTime::now() - Duration::from_secs(100);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let hb = set.heartbeat();
        thread::sleep(Duration::from_millis(1500));
        let age = fs::metadata(&path)
            .unwrap()
            .modified()
            .unwrap()
            .elapsed()
            .unwrap();
        assert!(age < Duration::from_secs(2), "touched: {age:?}");
        drop(hb);
        assert_eq!(set.len(), 1);
        set.release_all();
        assert!(!path.exists());
    }
}
