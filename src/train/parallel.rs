//! Data parallelism. Across processes (`world`): every rank keeps its replica and optimizer and
//! takes its contiguous part of each global batch; after the backward pass one all-reduce sums
//! the gradients (with the step's loss and statistics in the same buffer), so every rank steps
//! from the same values. Within a process: each device takes a contiguous shard of the part, runs
//! forward and backward on its own replica of the model (one thread per device), and the
//! gradients are summed for the optimizer step on the first device: sent there by every other
//! device, or, with the `collective` feature and distinct devices, all-reduced in a ring by
//! burn's collective (see docs/backends.md, "Many devices"). Each shard's loss is weighted by its share of the batch, so the
//! sum is the gradient of the whole batch's mean loss: the step is the one a single device
//! would take on the full batch, up to floating-point order. Saliencies built from these
//! gradients use the averaged gradient too (METHOD.md).

use std::ops::Range;

use crate::data::shards;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};

use crate::model::Model;
use crate::world::World;

/// Where a step runs: this process's devices, and the ranks it is one of.
#[derive(Clone, Copy)]
pub struct Team<'a, D> {
    pub devices: &'a [D],
    pub world: &'a World,
}

impl<'a, D> Team<'a, D> {
    /// `devices` of this process alone.
    pub fn local(devices: &'a [D]) -> Self {
        Team { devices, world: &crate::world::SINGLE }
    }
}

/// What a shard's `work` adds up besides the loss (correct predictions, gate gradients): summed
/// over the shards of a process, then over the ranks through the step's all-reduce as values.
pub trait Summed: Sized + Send {
    fn add(self, other: Self) -> Self;
    fn values(&self) -> Vec<f32>;
    /// `self` with `values` (as many as `values()` gives) in place of its own.
    fn with_values(self, values: &[f32]) -> Self;
}

impl Summed for () {
    fn add(self, _: ()) {}
    fn values(&self) -> Vec<f32> {
        Vec::new()
    }
    fn with_values(self, _: &[f32]) {}
}

/// Counts (exact as f32 below 2^24, far above a batch).
impl Summed for usize {
    fn add(self, other: usize) -> usize {
        self + other
    }
    fn values(&self) -> Vec<f32> {
        vec![*self as f32]
    }
    fn with_values(self, values: &[f32]) -> usize {
        values[0].round() as usize
    }
}

impl Summed for crate::prune::Masks {
    fn add(mut self, other: Self) -> Self {
        crate::prune::Masks::add(&mut self, &other);
        self
    }
    fn values(&self) -> Vec<f32> {
        self.slots().into_iter().flat_map(|(s, b)| self.get(s, b).to_vec()).collect()
    }
    fn with_values(mut self, values: &[f32]) -> Self {
        let mut at = 0;
        for (s, b) in self.slots() {
            let slot = self.get_mut(s, b);
            let len = slot.len();
            slot.copy_from_slice(&values[at..at + len]);
            at += len;
        }
        self
    }
}


/// One step's result over all shards of all ranks.
pub struct Step<T> {
    /// The global batch's mean loss.
    pub loss: f64,
    /// Gradients of the global batch's mean loss, on the first device.
    pub grads: GradientsParams,
    /// What `work` returned, summed over the shards and the ranks.
    pub total: T,
}

/// What one shard's `work` returns: the weighted loss's value, its gradients (of the weighted
/// loss, on the shard's replica) and anything else the caller collects.
pub type ShardResult<B, T> = (f64, <B as AutodiffBackend>::Gradients, T);

/// A seed per shard for its drop-path masks (none without drop path), drawn from the backend's
/// generator on `main` before any shard starts, so that a step's masks depend on the
/// pipeline's seed alone, however the shards' threads interleave.
fn drop_path_seeds<B: AutodiffBackend>(model: &Model<B>, main: &B::Device, shards: usize) -> Vec<Option<u64>> {
    if model.drop_path() == 0.0 {
        return vec![None; shards];
    }
    let draws = Tensor::<B::InnerBackend, 1>::random([shards], Distribution::Uniform(0.0, (1u64 << 24) as f64), main);
    draws.into_data().iter::<f32>().map(|x| Some(x as u64)).collect()
}

/// Runs `work(replica, shard, payload, weight)` for each shard of this rank's part of a global
/// batch of `n` examples, one shard per local device, the devices in parallel (a GPU listed
/// twice runs its shards in turn; the CPU runs each in a thread of its own), then sums the ranks'
/// gradients with one all-reduce. `work` must scale its loss by `weight` (the shard's share of
/// the global batch) before `backward`. `payloads` holds one value per local device (its replica
/// of a teacher, say). With one device and one rank, `work` runs on `model` itself with weight 1
/// (an exact multiplication), as a loop without this would.
pub fn data_parallel<B, P, T>(
    model: &Model<B>,
    team: &Team<'_, B::Device>,
    n: usize,
    payloads: Vec<P>,
    work: impl Fn(&Model<B>, Range<usize>, P, f32) -> ShardResult<B, T> + Sync,
) -> anyhow::Result<Step<T>>
where
    B: AutodiffBackend,
    P: Send,
    T: Summed,
{
    let world = team.world;
    if n < world.ranks {
        anyhow::bail!("a batch of {n} examples cannot be shared by {} ranks: raise the batch size to at least {}", world.ranks, world.ranks);
    }
    if !world.is_single() && crate::world::checks_replicas() {
        crate::world::check_replicas::<B::InnerBackend>(world, &team.devices[0], &replica_digest(model))?;
    }
    let part = shards(n, world.ranks).swap_remove(world.rank);
    let reduce = team.devices.first().map_or(Reduce::Hub, Reduce::for_devices::<B>);
    if world.is_single() {
        return Ok(data_parallel_reducing(model, team.devices, part, n, None, payloads, work, reduce));
    }
    // Every rank draws the seeds of every rank's shards from its generator (the same on all),
    // and takes its own: the ranks' drop-path masks differ as the shards of one process do.
    let local = team.devices.len();
    let seeds = drop_path_seeds(model, &team.devices[0], world.ranks * local)[world.rank * local..(world.rank + 1) * local].to_vec();
    let step = data_parallel_reducing(model, team.devices, part, n, Some(seeds), payloads, work, reduce);
    all_reduce_step(model, world, step)
}

/// SHA-256 (hex) of every parameter's bytes, in the model's order.
fn replica_digest<B: AutodiffBackend>(model: &Model<B>) -> String {
    use burn::module::{ModuleVisitor, Param};
    use sha2::Digest;
    struct Hash(sha2::Sha256);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.update(param.val().into_data().as_bytes());
        }
    }
    let mut hash = Hash(sha2::Sha256::new());
    model.visit(&mut hash);
    hex::encode(hash.0.finalize())
}

/// The step's gradients, loss and totals summed over the ranks in one buffer: the gradients in
/// the model's order (the same on every rank; burn's own all-reduce orders by parameter id,
/// which differs between processes), then the loss, then the totals.
fn all_reduce_step<B: AutodiffBackend, T: Summed>(model: &Model<B>, world: &World, step: Step<T>) -> anyhow::Result<Step<T>> {
    use burn::module::{ModuleVisitor, Param, ParamId};
    struct Flatten<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        parts: Vec<Tensor<B::InnerBackend, 1>>,
        shapes: Vec<(ParamId, Vec<usize>)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.shapes.push((param.id, g.dims().to_vec()));
                self.parts.push(g.flatten(0, D - 1));
            }
        }
    }
    let mut flat = Flatten::<B> { grads: &step.grads, parts: Vec::new(), shapes: Vec::new() };
    model.visit(&mut flat);
    let Flatten { mut parts, shapes, .. } = flat;
    let device = parts.first().map(|p| p.device()).expect("a step has gradients");
    let mut extra = vec![step.loss as f32];
    extra.extend(step.total.values());
    let extras = extra.len();
    parts.push(Tensor::from_data(burn::tensor::TensorData::new(extra, [extras]), &device));
    let summed = crate::world::all_reduce::<B::InnerBackend>(world, Tensor::cat(parts, 0))?;
    let [len] = summed.dims();
    let tail: Vec<f32> = summed.clone().slice([len - extras..len]).into_data().to_vec().expect("f32 values");
    let mut grads = GradientsParams::new();
    let mut at = 0;
    for (id, shape) in shapes {
        let numel: usize = shape.iter().product();
        let g = summed.clone().slice([at..at + numel]);
        at += numel;
        register_reshaped::<B::InnerBackend>(&mut grads, id, g, &shape);
    }
    Ok(Step { loss: f64::from(tail[0]), grads, total: step.total.with_values(&tail[1..]) })
}

/// `flat` in `shape` (of 1 to 4 dimensions, as the models' parameters) as `id`'s gradient.
fn register_reshaped<B: burn::tensor::backend::Backend>(grads: &mut GradientsParams, id: burn::module::ParamId, flat: Tensor<B, 1>, shape: &[usize]) {
    match *shape {
        [a] => grads.register(id, flat.reshape([a])),
        [a, b] => grads.register(id, flat.reshape([a, b])),
        [a, b, c] => grads.register(id, flat.reshape([a, b, c])),
        [a, b, c, d] => grads.register(id, flat.reshape([a, b, c, d])),
        _ => unreachable!("a parameter of {} dimensions", shape.len()),
    }
}

/// How the groups' gradients are summed: each copied to the first device (a hub), or
/// all-reduced in a ring by burn's collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reduce {
    Hub,
    #[cfg(feature = "collective")]
    Ring,
}

impl Reduce {
    /// The ring where the `collective` feature is built and the devices are distinct. Shards in
    /// threads on one CPU share its memory: there a ring only adds a message round trip per
    /// parameter tensor (1% to 3% of a step, measured; docs/backends.md, "Many devices").
    fn for_devices<B: AutodiffBackend>(main: &B::Device) -> Self {
        #[cfg(feature = "collective")]
        if !crate::backend::concurrent_shards::<B>(main) {
            return Reduce::Ring;
        }
        let _ = main;
        Reduce::Hub
    }
}

/// The shards of examples `part` of a global batch of `n`, on `devices`.
#[allow(clippy::too_many_arguments)]
fn data_parallel_reducing<B, P, T>(
    model: &Model<B>,
    devices: &[B::Device],
    part: Range<usize>,
    n: usize,
    seeds: Option<Vec<Option<u64>>>,
    payloads: Vec<P>,
    work: impl Fn(&Model<B>, Range<usize>, P, f32) -> ShardResult<B, T> + Sync,
    reduce: Reduce,
) -> Step<T>
where
    B: AutodiffBackend,
    P: Send,
    T: Summed,
{
    // Another runner on this machine may be timing a model: it waits for this step.
    let _working = crate::machine::working();
    let ranges: Vec<Range<usize>> = shards(part.len(), devices.len()).into_iter().map(|r| r.start + part.start..r.end + part.start).collect();
    if ranges.len() == 1 {
        let payload = payloads.into_iter().next().expect("one payload per device");
        let range = ranges[0].clone();
        let weight = if range.len() == n { 1.0 } else { range.len() as f32 / n as f32 };
        let seed = seeds.and_then(|s| s.first().copied().flatten());
        let shard = || work(model, range, payload, weight);
        let (loss, grads, total) = match seed {
            Some(seed) => crate::model::with_drop_path_seed(seed, shard),
            None => shard(),
        };
        return Step { loss, grads: GradientsParams::from_grads(grads, model), total };
    }
    let main = &devices[0];
    // Shards that share a GPU run in turn on it: threads would only contend for it. On the CPU
    // each shard gets a thread of its own (see `backend::concurrent_shards`).
    let concurrent = crate::backend::concurrent_shards::<B>(main);
    let seeds = seeds.unwrap_or_else(|| drop_path_seeds(model, main, ranges.len()));
    let mut groups: Vec<Group<'_, B::Device, P>> = Vec::new();
    for (((range, device), payload), seed) in ranges.into_iter().zip(devices).zip(payloads).zip(seeds) {
        match groups.iter_mut().find(|(d, _)| *d == device && !concurrent) {
            Some((_, items)) => items.push((range, payload, seed)),
            None => groups.push((device, vec![(range, payload, seed)])),
        }
    }
    // A group's shards, in turn on its device: their first examples, losses and outputs, and the
    // sum of their gradients on that device.
    let run_group = |device: &B::Device, items: Vec<(Range<usize>, P, Option<u64>)>| -> (Vec<Shard<T>>, GradientsParams) {
        let mut sum = GradientsAccumulator::<Model<B>>::new();
        let outs = items
            .into_iter()
            .map(|(range, payload, seed)| {
                let replica = model.clone().fork(device);
                let (first, weight) = (range.start, range.len() as f32 / n as f32);
                let shard = || work(&replica, range, payload, weight);
                let (loss, grads, out) = match seed {
                    Some(seed) => crate::model::with_drop_path_seed(seed, shard),
                    None => shard(),
                };
                sum.accumulate(&replica, GradientsParams::from_grads(grads, &replica));
                (first, loss, out)
            })
            .collect();
        (outs, sum.grads())
    };
    let (mut outs, grads) = if groups.len() == 1 {
        let (device, items) = groups.pop().expect("one group");
        run_group(device, items)
    } else {
        match reduce {
            Reduce::Hub => sum_on_first_device(model, main, groups, run_group),
            #[cfg(feature = "collective")]
            Reduce::Ring => all_reduce_in_ring::<B, P, T>(groups, run_group),
        }
    };
    outs.sort_by_key(|(first, _, _)| *first);
    let loss = outs.iter().map(|(_, l, _)| l).sum();
    let total = outs.into_iter().map(|(_, _, out)| out).reduce(T::add).expect("at least one shard");
    Step { loss, grads, total }
}

/// A device's share of a step: its shards (range, payload, drop-path seed).
type Group<'a, D, P> = (&'a D, Vec<(Range<usize>, P, Option<u64>)>);
/// A shard's first example, weighted loss and output.
type Shard<T> = (usize, f64, T);

/// `each(k, device, shards)` for every group `k` in a thread of its own; results in group order.
fn in_threads<D: Sync, P: Send, R: Send>(groups: Vec<Group<'_, D, P>>, each: impl Fn(usize, &D, Vec<(Range<usize>, P, Option<u64>)>) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let each = &each;
        let handles: Vec<_> = groups.into_iter().enumerate().map(|(k, (device, items))| s.spawn(move || each(k, device, items))).collect();
        handles.into_iter().map(|h| h.join().expect("a device's thread panicked")).collect()
    })
}

/// Groups in threads of their own; their gradients summed on the first device, each group's
/// copied there (a hub: `main` receives every other device's gradients).
fn sum_on_first_device<B: AutodiffBackend, P: Send, T: Send>(
    model: &Model<B>,
    main: &B::Device,
    groups: Vec<Group<'_, B::Device, P>>,
    run_group: impl Fn(&B::Device, Vec<(Range<usize>, P, Option<u64>)>) -> (Vec<Shard<T>>, GradientsParams) + Sync,
) -> (Vec<Shard<T>>, GradientsParams) {
    let mut total = GradientsAccumulator::<Model<B>>::new();
    let mut outs = Vec::new();
    for (group_outs, grads) in in_threads(groups, |_, device, items| run_group(device, items)) {
        total.accumulate(model, grads.to_device(main, model));
        outs.extend(group_outs);
    }
    (outs, total.grads())
}

/// Groups in threads of their own, each a peer of burn's collective: their gradients are
/// all-reduced in a ring (each device sends and receives 2(N-1)/N of the gradients' bytes,
/// instead of the first device receiving N-1 times them), and the first device's sum is the
/// step's.
#[cfg(feature = "collective")]
fn all_reduce_in_ring<B: AutodiffBackend, P: Send, T: Send>(
    groups: Vec<Group<'_, B::Device, P>>,
    run_group: impl Fn(&B::Device, Vec<(Range<usize>, P, Option<u64>)>) -> (Vec<Shard<T>>, GradientsParams) + Sync,
) -> (Vec<Shard<T>>, GradientsParams) {
    use burn::collective::{finish_collective, register, AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
    // burn's local collective server takes one set of peers at a time per backend: steps of
    // two trainings in one process (tests) take turns.
    static ONE_COLLECTIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_COLLECTIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let config = CollectiveConfig::default().with_num_devices(groups.len()).with_local_all_reduce_strategy(AllReduceStrategy::Ring);
    let results = in_threads(groups, |k, device, items| {
        let peer = PeerId(k as u32);
        let (outs, grads) = run_group(device, items);
        // The peers are this function's threads with one config: an error is a bug.
        let failed = |what: &str, e: burn::collective::CollectiveError| -> ! { panic!("collective {what} of peer {k}: {e:?}") };
        register::<B::InnerBackend>(peer, device.clone(), config.clone()).unwrap_or_else(|e| failed("register", e));
        let grads = grads.all_reduce::<B::InnerBackend>(peer, ReduceOperation::Sum).unwrap_or_else(|e| failed("all-reduce", e));
        finish_collective::<B::InnerBackend>(peer).unwrap_or_else(|e| failed("finish", e));
        (outs, grads)
    });
    let mut outs = Vec::new();
    let mut grads = None;
    for (group_outs, group_grads) in results {
        outs.extend(group_outs);
        grads.get_or_insert(group_grads);
    }
    (outs, grads.expect("at least two groups"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VitConfig;
    use crate::train::{classification_loss, scalar, targets_tensor};
    use burn::backend::{ndarray::NdArrayDevice, Autodiff, NdArray};
    use burn::tensor::Tensor;

    type B = Autodiff<NdArray>;

    /// The full batch's mean cross-entropy gradients, from `devices.len()` shards.
    fn grads(model: &Model<B>, devices: &[NdArrayDevice], images: &[f32], labels: &[i64], reduce: Reduce) -> (f64, Vec<f32>) {
        let n = labels.len();
        let per = images.len() / n;
        let step = data_parallel_reducing(model, devices, 0..n, n, None, vec![(); devices.len()], |m, range, (), weight| {
            let device = m.device();
            let x = crate::model::float_tensor::<B, 4>(images[range.start * per..range.end * per].to_vec(), [range.len(), 3, 16, 16], &device);
            let t = targets_tensor::<B>(crate::data::mix::soft_targets(&labels[range.clone()], 5, 0.0, 1.0), 5, &device);
            let loss = classification_loss(&m.forward(x), t).mul_scalar(weight);
            (scalar(loss.clone()), loss.backward(), ())
        }, reduce);
        let g: Tensor<NdArray, 2> = step.grads.get(model.as_deit().unwrap().blocks[0].mlp.fc1.weight.id).unwrap();
        (step.loss, g.into_data().to_vec().unwrap())
    }

    /// Three shards as three groups (threads) against one device's full batch, summed by `reduce`.
    fn sharded_gradients_are_the_full_batch_gradients(reduce: Reduce) {
        let device = NdArrayDevice::Cpu;
        let model = VitConfig::uniform(16, 4, 3, 12, 2, 2, 2.0, 5, true).into();
        let model = crate::model::ModelConfig::init::<B>(&model, &device);
        let labels: Vec<i64> = (0..7).map(|i| i % 5).collect();
        let images: Vec<f32> = (0..7 * 3 * 16 * 16).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let (loss1, one) = grads(&model, &[device], &images, &labels, reduce);
        let (loss3, three) = grads(&model, &[device; 3], &images, &labels, reduce);
        assert!((loss1 - loss3).abs() < 1e-6 * loss1.abs(), "{reduce:?}: loss {loss1} vs {loss3}");
        let scale = one.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = one.iter().zip(&three).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0 && worst <= 1e-5 * scale, "{reduce:?}: gradients differ by {worst} (scale {scale})");
    }

    #[test]
    fn sharded_gradients_summed_on_the_first_device_are_the_full_batch_gradients() {
        sharded_gradients_are_the_full_batch_gradients(Reduce::Hub);
    }

    #[cfg(feature = "collective")]
    #[test]
    fn sharded_gradients_all_reduced_in_a_ring_are_the_full_batch_gradients() {
        sharded_gradients_are_the_full_batch_gradients(Reduce::Ring);
    }

    #[test]
    fn shards_on_one_cpu_are_summed_on_it() {
        assert_eq!(Reduce::for_devices::<B>(&NdArrayDevice::Cpu), Reduce::Hub);
    }

    #[test]
    fn shards_cover_the_batch_in_order_and_differ_by_one_at_most() {
        assert_eq!(shards(10, 3), [0..4, 4..7, 7..10]);
        assert_eq!(shards(2, 4), [0..1, 1..2], "no empty shard when the batch is small");
        assert_eq!(shards(8, 1), [0..8]);
    }
}
