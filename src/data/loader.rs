//! Batches decoded and transformed on worker threads, a bounded number ahead of the consumer.
//!
//! Deterministic for a seed: the epoch's order comes from `(seed, epoch)` and each image's
//! augmentation from `(seed, epoch, index)`, so the result does not depend on thread timing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::{DataError, Dataset, OnBadImage, Transform};

/// One batch, images as `[batch, channels, size, size]` in row-major order.
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
    pub shape: [usize; 4],
}

impl Batch {
    /// Examples `range` of the batch: one data-parallel shard.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Batch {
        let [_, c, h, w] = self.shape;
        let per = c * h * w;
        Batch {
            images: self.images[range.start * per..range.end * per].to_vec(),
            labels: self.labels[range.clone()].to_vec(),
            shape: [range.len(), c, h, w],
        }
    }
}

#[derive(Clone)]
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    transform: Arc<Transform>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
    prefetch: usize,
    on_bad_image: OnBadImage,
    pool: Arc<rayon::ThreadPool>,
    skipped: Arc<AtomicUsize>,
    rank: Option<RankRows>,
}

/// The rows of every batch one rank of a job decodes: its part of the global batch and, when
/// Mixup or CutMix mixes each image with its mirror (`n - 1 - i`), those mirrors. The other
/// rows are left zero; their labels are kept (mixed targets need them).
#[derive(Debug, Clone, Copy)]
struct RankRows {
    ranks: usize,
    rank: usize,
    mirrored: bool,
}

impl RankRows {
    fn needed(&self, n: usize) -> impl Fn(usize) -> bool {
        let part = shards(n, self.ranks).get(self.rank).cloned().unwrap_or(0..0);
        let mirrored = self.mirrored;
        move |i| part.contains(&i) || (mirrored && part.contains(&(n - 1 - i)))
    }
}

pub struct LoaderOptions {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    pub workers: usize,
    pub prefetch: usize,
    pub on_bad_image: OnBadImage,
}

impl Loader {
    pub fn new(dataset: Arc<dyn Dataset>, transform: Transform, options: LoaderOptions) -> Self {
        let workers = if options.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.workers
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers)
            .thread_name(|i| format!("loader-{i}"))
            .build()
            .expect("thread pool");
        Self {
            dataset,
            transform: Arc::new(transform),
            batch_size: options.batch_size.max(1),
            shuffle: options.shuffle,
            drop_last: options.drop_last,
            seed: options.seed,
            prefetch: options.prefetch.max(1),
            on_bad_image: options.on_bad_image,
            pool: Arc::new(pool),
            skipped: Arc::new(AtomicUsize::new(0)),
            rank: None,
        }
    }

    /// A loader for rank `rank` of `ranks` that decodes only the rows of each batch that rank
    /// trains on (`mirrored`: and the images Mixup or CutMix mixes them with). Under
    /// `on_bad_image = "skip"` every rank still decodes the whole batch: which images remain,
    /// and so where the ranks' parts begin, is known only once all are read.
    pub fn for_rank(mut self, ranks: usize, rank: usize, mirrored: bool) -> Self {
        if ranks > 1 && self.on_bad_image != OnBadImage::Skip {
            self.rank = Some(RankRows { ranks, rank, mirrored });
        }
        self
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn batches_per_epoch(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// Images skipped so far because `on_bad_image = "skip"`.
    pub fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }

    /// The batches of one epoch, produced on a background thread.
    pub fn epoch(&self, epoch: u64) -> Receiver<Result<Batch, DataError>> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of one epoch after its first `skip`, which are never read: where a resumed
    /// run picks up.
    pub fn epoch_from(&self, epoch: u64, skip: usize) -> Receiver<Result<Batch, DataError>> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix(self.seed, epoch, u64::MAX)));
        }
        let mut chunks: Vec<Vec<usize>> = order.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        if self.drop_last && chunks.last().is_some_and(|c| c.len() < self.batch_size) {
            chunks.pop();
        }
        let (tx, rx) = sync_channel(self.prefetch);
        let this = self.clone();
        std::thread::spawn(move || {
            for chunk in chunks.into_iter().skip(skip) {
                let batch = this.pool.install(|| this.make_batch(&chunk, epoch));
                // A batch whose every image was skipped as unreadable is no batch.
                if batch.as_ref().is_ok_and(|b| b.labels.is_empty()) {
                    continue;
                }
                let stop = batch.is_err();
                if tx.send(batch).is_err() || stop {
                    return;
                }
            }
        });
        rx
    }

    fn make_batch(&self, indices: &[usize], epoch: u64) -> Result<Batch, DataError> {
        let needed = self.rank.map(|rows| rows.needed(indices.len()));
        let t = &self.transform;
        let items: Vec<Option<(Vec<f32>, i64)>> = indices
            .par_iter()
            .enumerate()
            .map(|(row, &i)| {
                if needed.as_ref().is_some_and(|needed| !needed(row)) {
                    return Ok(Some((vec![0.0; t.channels * (t.size * t.size) as usize], self.dataset.label(i) as i64)));
                }
                let img = match self.dataset.image(i) {
                    Ok(img) => img,
                    Err(e @ DataError::BadImage { .. }) if self.on_bad_image == OnBadImage::Skip => {
                        let _ = e;
                        self.skipped.fetch_add(1, Ordering::Relaxed);
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                };
                let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed, epoch, i as u64));
                let mut out = Vec::new();
                self.transform.apply(&img, &mut rng, &mut out);
                Ok(Some((out, self.dataset.label(i) as i64)))
            })
            .collect::<Result<_, DataError>>()?;
        let mut images = Vec::with_capacity(items.len() * t.channels * (t.size * t.size) as usize);
        let mut labels = Vec::with_capacity(items.len());
        for (pixels, label) in items.into_iter().flatten() {
            images.extend_from_slice(&pixels);
            labels.push(label);
        }
        let shape = [labels.len(), t.channels, t.size as usize, t.size as usize];
        Ok(Batch { images, labels, shape })
    }
}

/// `n` examples in at most `parts` contiguous, non-empty shards whose sizes differ by one at most.
pub fn shards(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let (base, extra) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|k| {
            let len = base + usize::from(k < extra);
            start += len;
            start - len..start
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// SplitMix64 of three words: independent streams per (seed, epoch, index).
fn mix(seed: u64, epoch: u64, index: u64) -> u64 {
    let mut z = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::transforms::Mode;
    use crate::data::Synthetic;

    fn loader(workers: usize) -> Loader {
        let transform = Transform {
            size: 8,
            channels: 3,
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
            mode: Mode::Train(crate::data::TrainAugment::basic([0.5, 1.0], true)),
        };
        Loader::new(
            Arc::new(Synthetic::new(4, 10, 12, 1)),
            transform,
            LoaderOptions { batch_size: 4, shuffle: true, drop_last: false, seed: 3, workers, prefetch: 2, on_bad_image: OnBadImage::Error },
        )
    }

    #[test]
    fn deterministic_whatever_the_thread_count() {
        let collect = |l: &Loader, epoch| -> Vec<(Vec<i64>, Vec<f32>)> {
            l.epoch(epoch).into_iter().map(|b| b.unwrap()).map(|b| (b.labels, b.images)).collect()
        };
        let (one, four) = (loader(1), loader(4));
        let a = collect(&one, 0);
        assert_eq!(a, collect(&four, 0));
        assert_eq!(a.len(), 3);
        assert_eq!(a[2].0.len(), 2);
        assert_eq!(a[0].1.len(), 4 * 3 * 8 * 8);
        assert_ne!(a, collect(&one, 1), "a new epoch reshuffles");
    }

    #[test]
    fn a_rank_decodes_its_part_and_the_mirrors_it_mixes_with() {
        let full: Vec<Batch> = loader(2).epoch(0).into_iter().map(|b| b.unwrap()).collect();
        let per = 3 * 8 * 8;
        let decoded = |batch: &Batch| -> Vec<usize> { (0..batch.labels.len()).filter(|&i| batch.images[i * per..(i + 1) * per].iter().any(|&v| v != 0.0)).collect() };
        for (mirrored, rows) in [(false, vec![2]), (true, vec![1, 2])] {
            let rank: Vec<Batch> = loader(2).for_rank(3, 1, mirrored).epoch(0).into_iter().map(|b| b.unwrap()).collect();
            // A batch of 4 in 3 parts: rank 1 trains on row 2, whose mirror is row 1.
            assert_eq!(decoded(&rank[0]), rows);
            for &i in &rows {
                assert_eq!(rank[0].images[i * per..(i + 1) * per], full[0].images[i * per..(i + 1) * per]);
            }
            assert_eq!(rank[0].labels, full[0].labels, "every row keeps its label");
        }
        let whole: Vec<Batch> = loader(2).for_rank(1, 0, false).epoch(0).into_iter().map(|b| b.unwrap()).collect();
        assert_eq!(whole[0].images, full[0].images, "one rank decodes everything");
    }

    #[test]
    fn bad_images_stop_with_their_name_or_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("a", 3), ("b", 3)] {
            let d = dir.path().join("train").join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                image::RgbImage::new(10, 10).save(d.join(format!("{i}.png"))).unwrap();
            }
        }
        std::fs::write(dir.path().join("train/b/1.png"), b"not a png").unwrap();
        // The audit's dangling link failed the dataset's opening even under "skip".
        std::os::unix::fs::symlink(dir.path().join("nowhere.png"), dir.path().join("train/b/9.png")).unwrap();
        let dataset: Arc<dyn Dataset> = Arc::new(crate::data::ImageFolder::open(dir.path(), crate::data::Split::Train).unwrap());
        let transform = Transform { size: 8, channels: 3, mean: vec![0.0; 3], std: vec![1.0; 3], mode: Mode::Eval { crop_pct: 1.0 } };
        let make = |on_bad_image| {
            let options = LoaderOptions { batch_size: 4, shuffle: false, drop_last: false, seed: 0, workers: 2, prefetch: 1, on_bad_image };
            Loader::new(dataset.clone(), transform.clone(), options)
        };
        let strict = make(OnBadImage::Error);
        let err = strict.epoch(0).into_iter().find_map(|b| b.err()).expect("an error").to_string();
        // Both are in the second batch; its threads may meet either first.
        assert!(err.contains("train/b/1.png: cannot decode image") || err.contains("train/b/9.png: cannot decode image"), "{err}");

        let lenient = make(OnBadImage::Skip);
        let seen: usize = lenient.epoch(0).into_iter().map(|b| b.unwrap().labels.len()).sum();
        assert_eq!((seen, lenient.skipped()), (5, 2));

        image::RgbImage::new(10, 10).save(dir.path().join("train/b/1.png")).unwrap();
        let err = make(OnBadImage::Error).epoch(0).into_iter().find_map(|b| b.err()).expect("the link's error").to_string();
        assert!(err.contains("train/b/9.png: cannot decode image"), "{err}");
    }
}
