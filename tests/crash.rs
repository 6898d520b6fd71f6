//! Crash harness: runs the real `osp` binary for `sft`, `train --method osp`,
//! `train --method dpo` and `judge-train` on tiny models, SIGKILLs it at seeded random
//! moments (after a random delay, or as soon as a checkpoint or the final adapter is being
//! written), continues with `--resume` until the run finishes, and requires the finished
//! run folder to equal an uninterrupted run's byte for byte (metrics without their timings).
//!
//! CI runs a few kills per command. `OSP_CRASH_KILLS=N` sets the kills per command and
//! `OSP_CRASH_SEED=S` the seed; `scripts/crash-soak.sh` runs hundreds.
mod common;
use common::*;
use osp::demo::tasks::{JUDGE_ANSWER_A, JUDGE_ANSWER_B, JUDGE_TEMPLATE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills per command when `OSP_CRASH_KILLS` is not set (what CI runs).
const CI_KILLS: usize = 4;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a valid number")),
        Err(_) => default,
    }
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A command's arguments (without `--resume`) for a run into the given folder.
type ArgsFor = Box<dyn Fn(&Path) -> Vec<String>>;

/// One command under test.
struct Job {
    name: &'static str,
    args: ArgsFor,
}

fn jobs(dir: &Path) -> Vec<Job> {
    let RunFiles {
        model,
        sft,
        prefs,
        prompts,
    } = tiny_run_files(dir, 11);
    // Every setting is a --set, so the config file is empty.
    let config = dir.join("empty.toml");
    std::fs::write(&config, "").unwrap();

    let base = move |cmd: &[&str], out: &Path| -> Vec<String> {
        let mut a: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        a.extend(["--config".into(), config.display().to_string()]);
        for s in [
            format!("model.path={}", q(&model)),
            format!("train.out={}", q(out)),
            "train.steps=7".into(),
            "train.batch_size=4".into(),
            "train.save_every=2".into(),
            "train.eval_every=3".into(),
            "train.max_len=64".into(),
            "lora.r=4".into(),
            "lora.lora_dropout=0.1".into(),
            "optim.lr=0.01".into(),
            "optim.warmup_steps=1".into(),
        ] {
            a.extend(["--set".into(), s]);
        }
        a
    };
    let judge = || {
        [
            format!("judge.template={JUDGE_TEMPLATE:?}"),
            format!("judge.answer_a={JUDGE_ANSWER_A:?}"),
            format!("judge.answer_b={JUDGE_ANSWER_B:?}"),
        ]
    };
    let with = |mut a: Vec<String>, sets: Vec<String>| {
        for s in sets {
            a.extend(["--set".into(), s]);
        }
        a
    };
    let (b1, b2, b3, b4) = (base.clone(), base.clone(), base.clone(), base);
    vec![
        Job {
            name: "sft",
            args: Box::new(move |out| {
                with(
                    b1(&["sft"], out),
                    vec![
                        format!("data.train={}", q(&sft)),
                        "data.eval_fraction=0.25".into(),
                    ],
                )
            }),
        },
        Job {
            name: "train --method osp",
            args: Box::new(move |out| {
                let mut sets = judge().to_vec();
                sets.extend([
                    format!("data.prompts={}", q(&prompts)),
                    "train.batch_size=2".into(),
                    "pairing.k=3".into(),
                    "sampling.max_new_tokens=4".into(),
                    "data.eval_fraction=0".into(),
                ]);
                with(b2(&["train", "--method", "osp"], out), sets)
            }),
        },
        Job {
            name: "train --method dpo",
            args: {
                let prefs = prefs.clone();
                Box::new(move |out| {
                    with(
                        b3(&["train", "--method", "dpo"], out),
                        vec![format!("data.preferences={}", q(&prefs))],
                    )
                })
            },
        },
        Job {
            name: "judge-train",
            args: Box::new(move |out| {
                let mut sets = judge().to_vec();
                sets.extend([
                    format!("data.preferences={}", q(&prefs)),
                    "data.eval_fraction=0.25".into(),
                ]);
                with(b4(&["judge-train"], out), sets)
            }),
        },
    ]
}

/// Where a run's stderr goes (a file, not a pipe: a full pipe would block the run).
fn log_of(out: &Path) -> PathBuf {
    out.with_extension("stderr")
}

fn spawn(job: &Job, out: &Path, resume: bool) -> Child {
    let mut args = (job.args)(out);
    if resume {
        args.push("--resume".into());
    }
    let log = std::fs::File::create(log_of(out)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_osp"))
        .args(&args)
        // One thread: the machine may be shared, and each process then runs alike.
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the osp binary starts")
}

/// Waits for a run that was not killed, and requires that it succeeded.
fn finish(job: &Job, out: &Path, mut child: Child, what: &str) {
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}: {what} failed ({status}):\n{}",
        job.name,
        std::fs::read_to_string(log_of(out)).unwrap_or_default()
    );
}

/// The temporary folders in `out` of a checkpoint (`checkpoints/.step-N.tmp`) or of the
/// final adapter (`.adapter.tmp`, `.adapter.old`), with their inodes.
fn temporaries(out: &Path, checkpoint: bool) -> Vec<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    let candidates: Vec<PathBuf> = if checkpoint {
        std::fs::read_dir(out.join("checkpoints"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    } else {
        vec![out.join(".adapter.tmp"), out.join(".adapter.old")]
    };
    candidates
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp") || p.ends_with(".adapter.old"))
        .filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m.ino())))
        .collect()
}

#[derive(Debug, Default)]
struct Tally {
    random: usize,
    in_checkpoint: usize,
    in_adapter: usize,
    finished_first: usize,
}

/// How one attempt tries to kill the process.
enum Plan {
    After(Duration),
    WhileWriting { checkpoint: bool },
}

/// Runs one attempt (fresh, or `--resume` when the folder has a checkpoint) under `plan`.
/// Returns whether the process was killed; a process that ends first must have succeeded.
fn attempt(job: &Job, out: &Path, plan: &Plan, tally: &mut Tally) -> bool {
    let resume = out.join("checkpoints/latest").exists();
    // Left over by an earlier kill: being written means a temporary that is not one of these.
    let leftovers = match plan {
        Plan::WhileWriting { checkpoint } => temporaries(out, *checkpoint),
        Plan::After(_) => vec![],
    };
    let mut child = spawn(job, out, resume);
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            tally.finished_first += 1;
            finish(
                job,
                out,
                child,
                if resume { "a resumed run" } else { "a run" },
            );
            return false;
        }
        let now = match plan {
            Plan::After(d) => start.elapsed() >= *d,
            Plan::WhileWriting { checkpoint } => temporaries(out, *checkpoint)
                .iter()
                .any(|t| !leftovers.contains(t)),
        };
        if now {
            break;
        }
        match plan {
            Plan::After(_) => std::thread::sleep(Duration::from_millis(1)),
            // Short enough to land inside a write (each ends with an fsync).
            Plan::WhileWriting { .. } => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    // std's kill is SIGKILL on Unix. If the process ended meanwhile, it was not killed.
    let _ = child.kill();
    let status = child.wait().unwrap();
    if status.success() {
        tally.finished_first += 1;
        return false;
    }
    use std::os::unix::process::ExitStatusExt;
    if status.signal().is_none() {
        panic!(
            "{}: run failed before the kill ({status}):\n{}",
            job.name,
            std::fs::read_to_string(log_of(out)).unwrap_or_default()
        );
    }
    match plan {
        Plan::After(_) => tally.random += 1,
        Plan::WhileWriting { checkpoint: true } => tally.in_checkpoint += 1,
        Plan::WhileWriting { checkpoint: false } => tally.in_adapter += 1,
    }
    true
}

/// Every file under `dir` by relative path; metrics.jsonl without its timing fields, and
/// the folder's own path replaced by `RUN`.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let bytes = std::fs::read(&p).unwrap();
            let bytes = if rel == "metrics.jsonl" {
                untimed_metrics(&bytes)
            } else {
                bytes
            };
            // config.toml and the checkpoints' run record name the run folder itself.
            let bytes = match String::from_utf8(bytes) {
                Ok(text) => text
                    .replace(&root.display().to_string(), "RUN")
                    .into_bytes(),
                Err(e) => e.into_bytes(),
            };
            out.insert(rel, bytes);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The metrics lines with wall-clock fields removed (everything else is deterministic).
fn untimed_metrics(bytes: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(bytes).expect("metrics.jsonl is UTF-8");
    let mut out = String::new();
    for line in text.lines() {
        let mut v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("metrics.jsonl line {line:?} is not JSON: {e}"));
        if let Some(m) = v.as_object_mut() {
            m.retain(|k, _| !(k.ends_with("seconds") || k.ends_with("per_s")));
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

fn assert_same_run(job: &Job, reference: &Path, run: &Path, tally: &Tally) {
    let (a, b) = (snapshot(reference), snapshot(run));
    assert!(
        a.keys().any(|k| k.starts_with("adapter/")),
        "{}: the reference run wrote no adapter",
        job.name
    );
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{}: the run folders hold different files after {tally:?}",
        job.name
    );
    for (name, bytes) in &a {
        assert!(
            b[name] == *bytes,
            "{}: {name} differs from the uninterrupted run's after {tally:?} ({}):\n\
             uninterrupted:\n{}\nresumed:\n{}",
            job.name,
            run.display(),
            String::from_utf8_lossy(bytes),
            String::from_utf8_lossy(&b[name])
        );
    }
}

/// Kills `job` `kills` times across as many runs as it takes; checks every run it finishes.
fn crash_and_resume(job: &Job, tmp: &Path, kills: usize, rng: &mut ChaCha8Rng) -> Tally {
    let slug = job.name.replace([' ', '-'], "_");
    let reference = tmp.join(format!("{slug}-reference"));
    let start = Instant::now();
    finish(
        job,
        &reference,
        spawn(job, &reference, false),
        "the uninterrupted run",
    );
    // Random delays span a whole run (a little past it, to hit the final writes too).
    let span = start.elapsed().mul_f64(1.1);
    let mut tally = Tally::default();
    let mut round = 0;
    let mut out = tmp.join(format!("{slug}-0"));
    let mut landed = 0;
    while landed < kills {
        let plan = match rng.random_range(0..4) {
            0 => Plan::WhileWriting { checkpoint: true },
            1 => Plan::WhileWriting { checkpoint: false },
            _ => Plan::After(span.mul_f64(rng.random::<f64>())),
        };
        if attempt(job, &out, &plan, &mut tally) {
            landed += 1;
        } else {
            // The run finished: check it, and kill the next ones in a fresh folder.
            assert_same_run(job, &reference, &out, &tally);
            round += 1;
            out = tmp.join(format!("{slug}-{round}"));
        }
    }
    if out.exists() {
        let resume = out.join("checkpoints/latest").exists();
        finish(job, &out, spawn(job, &out, resume), "the last resumed run");
        assert_same_run(job, &reference, &out, &tally);
    }
    tally
}

#[test]
fn killed_runs_resume_to_the_same_bytes() {
    let kills: usize = env_or("OSP_CRASH_KILLS", CI_KILLS);
    let seed: u64 = env_or("OSP_CRASH_SEED", 0);
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for job in jobs(tmp.path()) {
        let tally = crash_and_resume(&job, tmp.path(), kills, &mut rng);
        eprintln!(
            "{}: {kills} kills (seed {seed}): {} at random moments, {} while a checkpoint was written, {} while the adapter was written; {} runs ended before their kill",
            job.name, tally.random, tally.in_checkpoint, tally.in_adapter, tally.finished_first
        );
    }
}
