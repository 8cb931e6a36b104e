//! What runners on one machine share, and how they time: the lock that keeps timing
//! measurements alone, and the median they report. A stage
//! that times the model (`evaluate`'s throughput, `profile_latency`) holds it exclusively;
//! every training step holds it shared. So the workers of a sweep never time one point while
//! another trains, and a waiting measurement is never starved: it first takes the `wanted`
//! lock, which stops new steps from starting.

use std::fs::File;
use std::path::{Path, PathBuf};

/// The median of timings: a run slowed by another process on a shared machine does not move
/// it. The mean of the middle two for an even count; NaN for none.
pub fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    match times.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => times[n / 2],
        n => (times[n / 2 - 1] + times[n / 2]) / 2.0,
    }
}

/// The median seconds of `repeats` calls of `run`, after `warmup` untimed ones (kernels
/// compile and memory pools grow on the first calls). `run` must wait for its result.
pub fn median_time(warmup: usize, repeats: usize, mut run: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        run();
    }
    let times = (0..repeats)
        .map(|_| {
            let start = std::time::Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}

/// The median, slowest and fastest of `pairs` ratios `time(a) / time(b)`, each pair one
/// timed call of each, the order alternating (a b, b a, ...) after `warmup` untimed calls of
/// each: a slow spell of the machine lands on both sides of a pair, where two medians taken
/// minutes apart each carry their own.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ratio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub pairs: usize,
}

pub fn paired_ratio(warmup: usize, pairs: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> Ratio {
    for _ in 0..warmup {
        a();
        b();
    }
    let time = |run: &mut dyn FnMut()| {
        let start = std::time::Instant::now();
        run();
        start.elapsed().as_secs_f64()
    };
    let ratios: Vec<f64> = (0..pairs)
        .map(|i| {
            let (ta, tb) = if i % 2 == 0 {
                let ta = time(&mut a);
                (ta, time(&mut b))
            } else {
                let tb = time(&mut b);
                (time(&mut a), tb)
            };
            ta / tb.max(f64::MIN_POSITIVE)
        })
        .collect();
    Ratio {
        min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        median: median(ratios),
        pairs,
    }
}

/// Held while it lives.
pub struct Guard(#[allow(dead_code)] Vec<File>);

/// `RUNNER_MACHINE_LOCK_DIR`, or the system's temporary directory: one per machine.
fn lock_dir() -> PathBuf {
    std::env::var_os("RUNNER_MACHINE_LOCK_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

fn lock_file(dir: &Path, name: &str) -> Option<File> {
    std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(dir.join(name)).ok()
}

/// The exclusive lock, for a measurement: waits for the training steps of other runners on
/// this machine to finish and keeps new ones from starting until dropped.
pub fn measuring() -> Guard {
    measuring_in(&lock_dir())
}

fn measuring_in(dir: &Path) -> Guard {
    let mut held = Vec::new();
    for name in ["nvit-measure-wanted.lock", "nvit-measure.lock"] {
        if let Some(f) = lock_file(dir, name) {
            if fs2::FileExt::lock_exclusive(&f).is_ok() {
                held.push(f);
            }
        }
    }
    Guard(held)
}

/// The shared lock, for one training step or evaluation batch. Best effort: where the lock file cannot be opened
/// (another user's, say) the step runs without it.
pub fn working() -> Guard {
    working_in(&lock_dir())
}

fn working_in(dir: &Path) -> Guard {
    if let Some(wanted) = lock_file(dir, "nvit-measure-wanted.lock") {
        // Waits while a measurement is pending, then lets it go.
        let _ = fs2::FileExt::lock_shared(&wanted);
        let _ = fs2::FileExt::unlock(&wanted);
    }
    let mut held = Vec::new();
    if let Some(f) = lock_file(dir, "nvit-measure.lock") {
        if fs2::FileExt::lock_shared(&f).is_ok() {
            held.push(f);
        }
    }
    Guard(held)
}

/// How throughput and latency are measured, for results tables.
pub const MEASURED_ALONE: &str = "alone: a machine-wide lock pauses other runners' training and evaluation while timing";

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn the_median_ignores_one_slow_run_and_averages_the_middle_pair() {
        assert_eq!(median(vec![3.0, 1.0, 100.0]), 3.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 100.0]), 3.0);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn a_paired_ratio_is_the_median_of_alternated_pairs() {
        let slow = || std::thread::sleep(Duration::from_millis(6));
        let fast = || std::thread::sleep(Duration::from_millis(2));
        let r = paired_ratio(1, 5, slow, fast);
        assert_eq!(r.pairs, 5);
        assert!(r.min <= r.median && r.median <= r.max, "{r:?}");
        assert!(r.median > 1.5 && r.median < 3.5, "6 ms against 2 ms: {r:?}");
    }

    #[test]
    fn a_measurement_waits_for_training_steps_and_holds_off_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let step = working_in(dir.path());
        let _other = working_in(dir.path()); // steps of two runners at once
        let measured = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _alone = measuring_in(dir.path());
                measured.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(300));
            });
            std::thread::sleep(Duration::from_millis(200));
            assert!(!measured.load(Ordering::SeqCst), "measured while a step ran");
            drop(step);
            drop(_other);
            let start = std::time::Instant::now();
            while !measured.load(Ordering::SeqCst) {
                assert!(start.elapsed() < Duration::from_secs(5), "the measurement never started");
                std::thread::sleep(Duration::from_millis(5));
            }
            // A new step waits for the measurement to finish.
            let start = std::time::Instant::now();
            let _next = working_in(dir.path());
            assert!(start.elapsed() >= Duration::from_millis(100), "a step started during the measurement");
        });
    }
}
