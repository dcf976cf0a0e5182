//! `tessera slurm --submit` against a real Slurm: a single-node cluster on localhost
//! (munged, slurmctld, slurmd with a slurm.conf written here, everything in a temporary
//! folder), a 3-task array tiling and embedding three generated slides into one shared cache,
//! then the dependent full run training and evaluating from that cache.
//!
//! Needs root and Debian's `slurm-wlm` and `munge` (installed by scripts/setup.sh). Where Slurm
//! cannot start, the test prints `SKIPPED: <why>` and returns; it never passes silently.

mod common;

use common::{cache_files, count, tessera, tile_embed_stages, TRAIN_STAGES};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const SLIDES: usize = 3;
/// How long the jobs may take, start to end (CI: two cores, debug build).
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// The daemons, stopped (and their jobs cancelled) when dropped, also when the test fails.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
}

impl Cluster {
    /// A command with this cluster's configuration.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn stdout(&self, program: &str, args: &[&str]) -> String {
        self.cmd(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of each daemon log, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for name in ["slurmctld.log", "slurmd.log", "munged.log"] {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s.push_str(&format!("--- {name}\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// A daemon that already exited, with its status.
    fn exited(&mut self) -> Option<String> {
        for (name, child) in &mut self.daemons {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(format!("{name} exited ({status})"));
            }
        }
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .cmd("scancel")
            .args(["--user", "root"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // slurmd, then slurmctld, then munged.
        for (_, child) in self.daemons.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Finds a program on PATH or in the sbin folders (daemons live there).
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(16817)
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(program).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Starts munged, slurmctld and slurmd in `dir`; `Err(why)` when Slurm cannot run here.
fn start_cluster(dir: &Path) -> Result<Cluster, String> {
    if output_of("id", &["-u"]).as_deref() != Some("0") {
        return Err("not root: slurmd must run as root to start jobs".into());
    }
    let mut bins = Vec::new();
    for b in [
        "munged",
        "slurmctld",
        "slurmd",
        "sbatch",
        "scontrol",
        "sinfo",
    ] {
        bins.push(which(b).ok_or_else(|| {
            format!("`{b}` not found: install Debian's slurm-wlm and munge (scripts/setup.sh)")
        })?);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| output_of("hostname", &[]))
        .map(|h| h.trim().split('.').next().unwrap_or("").to_string())
        .filter(|h| !h.is_empty())
        .ok_or("no hostname")?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    // munge: a fresh key and socket of our own, whatever the system runs.
    let munge = dir.join("munge");
    std::fs::create_dir_all(&munge).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&munge, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    let key = munge.join("munge.key");
    let mut bytes = vec![0u8; 1024];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| e.to_string())?;
    std::fs::write(&key, &bytes).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400))
        .map_err(|e| e.to_string())?;
    let socket = munge.join("munge.socket");
    let log = |name: &str| -> Result<Stdio, String> {
        std::fs::File::create(dir.join(name))
            .map(Stdio::from)
            .map_err(|e| e.to_string())
    };

    let conf = dir.join("slurm.conf");
    let (ctld_port, d_port) = (free_port(), free_port());
    let d = dir.display();
    std::fs::create_dir_all(dir.join("state")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.join("spool")).map_err(|e| e.to_string())?;
    std::fs::write(
        &conf,
        format!(
            "\
ClusterName=tessera-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
DependencyParameters=kill_invalid_depend
ReturnToService=2
MinJobAge=3600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=500 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
",
            socket = socket.display()
        ),
    )
    .map_err(|e| e.to_string())?;

    let mut cluster = Cluster {
        dir: dir.to_path_buf(),
        conf: conf.clone(),
        daemons: Vec::new(),
    };
    let spawn = |program: &Path, args: Vec<String>, log_name: &str| -> Result<Child, String> {
        Command::new(program)
            .args(args)
            .env("SLURM_CONF", &conf)
            .stdin(Stdio::null())
            .stdout(log(log_name)?)
            .stderr(log(log_name)?)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))
    };
    let munged = spawn(
        &bins[0],
        vec![
            "-F".into(),
            "-f".into(),
            format!("--socket={}", socket.display()),
            format!("--key-file={}", key.display()),
            format!("--log-file={}", dir.join("munged.log").display()),
            format!("--pid-file={}", munge.join("munged.pid").display()),
            format!("--seed-file={}", munge.join("munged.seed").display()),
        ],
        "munged.out",
    )?;
    cluster.daemons.push(("munged", munged));
    let started = Instant::now();
    while !socket.exists() {
        if let Some(why) = cluster.exited() {
            return Err(format!("{why}\n{}", cluster.logs()));
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("munged made no socket in 10 s\n{}", cluster.logs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let conf_arg = conf.display().to_string();
    let ctld = spawn(
        &bins[1],
        vec!["-D".into(), "-c".into(), "-f".into(), conf_arg.clone()],
        "slurmctld.out",
    )?;
    cluster.daemons.push(("slurmctld", ctld));
    std::thread::sleep(Duration::from_millis(500));
    let slurmd = spawn(
        &bins[2],
        vec![
            "-D".into(),
            "-N".into(),
            host.clone(),
            "-f".into(),
            conf_arg,
        ],
        "slurmd.out",
    )?;
    cluster.daemons.push(("slurmd", slurmd));

    // Wait for the node to be idle.
    let started = Instant::now();
    loop {
        let state = cluster.stdout("sinfo", &["-h", "-o", "%T"]);
        if state.trim() == "idle" {
            return Ok(cluster);
        }
        if let Some(why) = cluster.exited() {
            return Err(format!("{why}\n{}", cluster.logs()));
        }
        if started.elapsed() > Duration::from_secs(45) {
            return Err(format!(
                "the node is not idle after 45 s (sinfo: `{}`)\n{}",
                state.trim(),
                cluster.logs()
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Three distinct small slides: crops of the real one, as tiled pyramidal JPEG TIFFs.
fn make_slides(dir: &Path) -> Vec<PathBuf> {
    let vips = which("vips").expect("`vips` not found: scripts/setup.sh installs libvips-tools");
    let src = common::cmu1();
    let run = |args: &[&str]| {
        let o = Command::new(&vips).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "vips {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let rgba = dir.join("rgba.v");
    let rgb = dir.join("rgb.v");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    run(&["openslideload", &s(&src), &s(&rgba), "--level", "0"]);
    run(&["extract_band", &s(&rgba), &s(&rgb), "0", "--n", "3"]);
    (0..SLIDES)
        .map(|i| {
            let crop = dir.join(format!("crop{i}.v"));
            let out = dir.join(format!("slide{i}.tif"));
            let (x, y, w) = (100 * i, 300 * i, 1400 + 200 * i);
            run(&[
                "crop",
                &s(&rgb),
                &s(&crop),
                &x.to_string(),
                &y.to_string(),
                &w.to_string(),
                &w.to_string(),
            ]);
            run(&[
                "tiffsave",
                &s(&crop),
                &s(&out),
                "--tile",
                "--tile-width",
                "256",
                "--tile-height",
                "256",
                "--pyramid",
                "--compression",
                "jpeg",
                "--Q",
                "85",
            ]);
            out
        })
        .collect()
}

/// Every `JobState=` of a job (one per array task).
fn job_states(cluster: &Cluster, id: &str) -> Vec<String> {
    cluster
        .stdout("scontrol", &["show", "job", id])
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("JobState="))
        .map(str::to_string)
        .collect()
}

fn finished(states: &[String]) -> bool {
    !states.is_empty()
        && states.iter().all(|s| {
            !matches!(
                s.as_str(),
                "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED"
            )
        })
}

/// Every file of a folder tree, as text, for failure messages.
fn dump_logs(dir: &Path) -> String {
    let mut s = String::new();
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(f.path()).unwrap_or_default();
        s.push_str(&format!("--- {}\n{text}\n", f.path().display()));
    }
    s
}

#[test]
fn slurm_array_then_dependent_full_run_share_one_cache() {
    let tmp = TempDir::new().unwrap();
    let slurm_dir = tmp.path().join("slurm");
    std::fs::create_dir_all(&slurm_dir).unwrap();
    let cluster = match start_cluster(&slurm_dir) {
        Ok(c) => c,
        Err(why) => {
            // Straight to the stderr stream: the test harness's capture would hide `eprintln!`.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED: Slurm cannot start here: {why}");
            return;
        }
    };

    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let slides = make_slides(&work);
    let mut csv = String::from("slide_id,path,label,split,mpp\n");
    for (i, (p, (label, split))) in slides
        .iter()
        .zip([("tumor", "train"), ("normal", "train"), ("tumor", "test")])
        .enumerate()
    {
        csv.push_str(&format!("s{i},{},{label},{split},0.499\n", p.display()));
    }
    std::fs::write(work.join("dataset.csv"), csv).unwrap();
    let exp = work.join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: cluster\ndataset: dataset.csv\ncache_dir: cache\nout_dir: out\n{}{TRAIN_STAGES}",
            tile_embed_stages(112, 1.0, 0.1)
        ),
    )
    .unwrap();

    let submitted = tessera()
        .args(["slurm", exp.to_str().unwrap(), "--array", "3", "--submit"])
        .args(["--time", "00:10:00", "--cpus-per-task", "1"])
        .env("SLURM_CONF", &cluster.conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&submitted.stdout).into_owned();
    assert!(
        submitted.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let id_after = |prefix: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no `{prefix}` in\n{stdout}"))
            .to_string()
    };
    let array_id = id_after("submitted shard array: job ");
    let full_id = id_after("submitted full run: job ");

    let out = work.join("out");
    let logs = out.join("slurm/logs");
    let started = Instant::now();
    let (array_states, full_states) = loop {
        let (a, f) = (
            job_states(&cluster, &array_id),
            job_states(&cluster, &full_id),
        );
        if finished(&a) && finished(&f) {
            break (a, f);
        }
        assert!(
            started.elapsed() < JOB_TIMEOUT,
            "jobs not done after {JOB_TIMEOUT:?}: array {a:?}, full {f:?}\n{}\n{}",
            dump_logs(&logs),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "slurm jobs done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let context = || format!("{}\n{}", dump_logs(&logs), cluster.logs());
    assert_eq!(
        array_states.len(),
        SLIDES,
        "{array_states:?}\n{}",
        context()
    );
    assert!(
        array_states.iter().all(|s| s == "COMPLETED"),
        "array tasks: {array_states:?}\n{}",
        context()
    );
    assert_eq!(full_states, ["COMPLETED"], "{}", context());

    // One complete entry per slide and per-slide stage; no claim or temporary file left.
    let cache = work.join("cache");
    for kind in ["tile", "embed"] {
        let (complete, other) = cache_files(&cache, kind);
        assert_eq!(complete, SLIDES, "{kind} entries\n{}", context());
        assert!(other.is_empty(), "leftover files: {other:?}");
    }
    // Each array task computed its own slide (balanced by size: one each of three).
    let mut computed = 0;
    for task in 0..SLIDES {
        let text = std::fs::read_to_string(out.join(format!("shards/{task}/run.json")))
            .unwrap_or_else(|e| panic!("shard {task} run.json: {e}\n{}", context()));
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(r["shard"]["shard"], format!("{task}/{SLIDES}"), "{r:#}");
        assert_eq!(r["shard"]["slides"].as_array().unwrap().len(), 1, "{r:#}");
        computed += count(&r, "embed", "cache_misses");
    }
    assert_eq!(computed, SLIDES as u64);
    // The follow-up trained and evaluated from the cache alone.
    assert!(out.join("metrics.json").exists(), "{}", context());
    let text = std::fs::read_to_string(out.join("run.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["status"], "ok", "{r:#}");
    assert_eq!(count(&r, "embed", "cache_misses"), 0, "{r:#}");
    assert_eq!(count(&r, "embed", "cache_hits"), SLIDES as u64, "{r:#}");
    assert_eq!(count(&r, "tile", "cache_misses"), 0, "{r:#}");
    drop(cluster);
}
