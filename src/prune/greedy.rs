//! Greedy selection (METHOD.md section 5): every unit's score is reduced by `eta` times the
//! latency it would save, units are grouped per structure and block, and each pruning step
//! removes the lowest groups. Three ways to choose them:
//! - global ranking (NViT): all groups of the network ranked together ([`prune_lowest`]);
//! - isomorphic ranking (Isomorphic Pruning, ECCV 2024): groups compete only with groups of
//!   the same structure type across blocks, every type losing the same fraction of its units
//!   ([`prune_isomorphic`]);
//! - uniform allocation, the ablation's baseline: the same fraction of every structure in
//!   every block ([`prune_uniform`]).

use super::latency_table::ModelLatency;
use super::structures::{Masks, Structure};
use crate::model::BlockDims;

/// The widths below which the latency reduction is no longer credited (METHOD.md section 4).
fn at_floor(s: Structure, d: &BlockDims) -> bool {
    match s {
        Structure::Head => d.heads <= 2,
        Structure::Qk => d.qk <= 8,
        Structure::V => d.v <= 8,
        Structure::Mlp => d.mlp <= 16,
        Structure::Emb => false,
    }
}

fn minus_one(s: Structure, d: &BlockDims) -> BlockDims {
    let mut d = *d;
    match s {
        Structure::Head => d.heads -= 1,
        Structure::Qk => d.qk -= 1,
        Structure::V => d.v -= 1,
        Structure::Mlp => d.mlp -= 1,
        Structure::Emb => {}
    }
    d
}

/// The latency one unit of `s` would save in `slot` (a block; for EMB a stream, summed over
/// its blocks), at the widths `stages` (per stream: its width and its blocks').
fn latency_saved(latency: &ModelLatency, stages: &[(usize, Vec<BlockDims>)], s: Structure, slot: usize) -> f64 {
    if s == Structure::Emb {
        let ((e, dims), table) = (&stages[slot], &latency.stages[slot]);
        return dims.iter().map(|d| table.lookup(*e, d) - table.lookup(e.saturating_sub(1), d)).sum();
    }
    let (mut stage, mut block) = (0, slot);
    while block >= stages[stage].1.len() {
        block -= stages[stage].1.len();
        stage += 1;
    }
    let ((e, dims), table) = (&stages[stage], &latency.stages[stage]);
    let d = &dims[block];
    if at_floor(s, d) {
        0.0
    } else {
        table.lookup(*e, d) - table.lookup(*e, &minus_one(s, d))
    }
}

/// A group of alive units of one structure in one block, and its score.
pub struct Group {
    pub structure: Structure,
    pub block: usize,
    pub units: Vec<usize>,
    pub score: f64,
}

/// The alive units of every structure and block, in groups of `group(structure)` units of
/// adjacent latency-adjusted score, by ascending group score.
pub fn groups(scores: &Masks, masks: &Masks, latency: &ModelLatency, eta: f64, group: impl Fn(Structure) -> usize) -> Vec<Group> {
    let stages = masks.surviving_dims();
    let mut out = Vec::new();
    for (structure, block) in masks.slots() {
        let saved = eta * latency_saved(latency, &stages, structure, block);
        let mask = masks.get(structure, block);
        let mut alive: Vec<(usize, f64)> = scores
            .get(structure, block)
            .iter()
            .enumerate()
            .filter(|(u, _)| mask[*u] != 0.0)
            .map(|(u, v)| (u, *v as f64 - saved))
            .collect();
        alive.sort_by(|a, b| a.1.total_cmp(&b.1));
        for chunk in alive.chunks(group(structure).max(1)) {
            out.push(Group { structure, block, units: chunk.iter().map(|u| u.0).collect(), score: chunk.iter().map(|u| u.1).sum() });
        }
    }
    out.sort_by(|a, b| a.score.total_cmp(&b.score));
    out
}

/// Whether `g` can go without emptying its structure in its block (one unit stays, and for
/// EMB one group of `emb_group`).
fn removable(g: &Group, masks: &Masks, emb_group: usize) -> bool {
    removable_units(g, g.units.len(), masks, emb_group)
}

/// Prunes `g` if it is [`removable`]; whether it did.
fn remove(g: &Group, masks: &mut Masks, emb_group: usize) -> bool {
    if !removable(g, masks, emb_group) {
        return false;
    }
    remove_units(g, g.units.len(), masks);
    true
}

/// Whether any of `groups` can still go.
pub fn any_removable(groups: &[Group], masks: &Masks, emb_group: usize) -> bool {
    groups.iter().any(|g| removable(g, masks, emb_group))
}

/// Where the last pruning step must end: at most `target` (the estimated latency as a fraction
/// of dense, `ratio`), and no more than `tolerance` of it below, so the model is not faster,
/// and less accurate, than asked for by up to a whole group.
pub struct Landing<'a> {
    pub target: f64,
    pub tolerance: f64,
    pub ratio: &'a dyn Fn(&Masks) -> f64,
}

impl Landing<'_> {
    fn floor(&self) -> f64 {
        self.target * (1.0 - self.tolerance)
    }

    /// Whether `ratio` is down to the target: a choice made to fit a budget of exactly the
    /// target can land a rounding error above it.
    pub fn reached(&self, ratio: f64) -> bool {
        ratio <= self.target * (1.0 + 1e-9)
    }

    /// The estimated ratio with the first `k` of `g`'s units pruned; `masks` is left as it was.
    fn ratio_without(&self, g: &Group, k: usize, masks: &mut Masks) -> f64 {
        let mask = masks.get_mut(g.structure, g.block);
        let kept: Vec<f32> = g.units[..k].iter().map(|&u| std::mem::replace(&mut mask[u], 0.0)).collect();
        let ratio = (self.ratio)(masks);
        let mask = masks.get_mut(g.structure, g.block);
        for (&u, v) in g.units[..k].iter().zip(kept) {
            mask[u] = v;
        }
        ratio
    }

    /// The fewest of `g`'s lowest units whose removal reaches the target, and the ratio then;
    /// `None` if even all of them do not, or `g` cannot go.
    fn piece(&self, g: &Group, masks: &mut Masks, emb_group: usize) -> Option<(usize, f64)> {
        for k in 1..=g.units.len() {
            if !removable_units(g, k, masks, emb_group) {
                break;
            }
            let r = self.ratio_without(g, k, masks);
            if self.reached(r) {
                return Some((k, r));
            }
        }
        None
    }
}

/// Prunes the first `k` of `g`'s units (the lowest scored: groups list them ascending).
fn remove_units(g: &Group, k: usize, masks: &mut Masks) {
    let mask = masks.get_mut(g.structure, g.block);
    for &u in &g.units[..k] {
        mask[u] = 0.0;
    }
}

/// Whether the first `k` of `g`'s units can go (see [`removable`]).
fn removable_units(g: &Group, k: usize, masks: &Masks, emb_group: usize) -> bool {
    let alive = masks.get(g.structure, g.block).iter().filter(|m| **m != 0.0).count();
    let floor = if g.structure == Structure::Emb { emb_group.min(alive) } else { 1 };
    alive >= k + floor
}

/// Global ranking: prunes the `n` lowest of `groups` (ascending) that can go, stopping once
/// the target is reached; how many went. A group that would take the model below the landing
/// floor goes in part (its fewest lowest units that reach the target) if that lands within
/// the tolerance, and is passed over if not, for the next one that fits. When nothing fits,
/// the piece of any group that lands nearest under the target goes.
pub fn prune_lowest(groups: &[Group], masks: &mut Masks, n: usize, emb_group: usize, landing: &Landing) -> usize {
    let mut pruned = 0;
    let mut passed_over = false;
    for g in groups {
        if pruned == n {
            break;
        }
        if !removable(g, masks, emb_group) {
            continue;
        }
        let after = landing.ratio_without(g, g.units.len(), masks);
        if after < landing.floor() {
            match landing.piece(g, masks, emb_group) {
                Some((k, r)) if r >= landing.floor() => {
                    remove_units(g, k, masks);
                    return pruned + 1;
                }
                _ => passed_over = true,
            }
            continue;
        }
        remove_units(g, g.units.len(), masks);
        pruned += 1;
        if landing.reached(after) {
            break;
        }
    }
    if pruned == 0 && passed_over {
        let nearest = groups.iter().filter_map(|g| landing.piece(g, masks, emb_group).map(|(k, r)| (g, k, r))).max_by(|a, b| a.2.total_cmp(&b.2));
        if let Some((g, k, _)) = nearest {
            remove_units(g, k, masks);
            return 1;
        }
    }
    pruned
}

/// Isomorphic ranking: each structure type (EMB, heads, QK, V, MLP) loses its lowest groups
/// across blocks until it is down to `keep` of its original units, so a head is only ever
/// ranked against heads. The target is cumulative and a type takes a group only when that
/// brings it nearer the target: with `keep = (1 - step)^k` at step k every type loses `step` of
/// its remaining units per step on average, and a type of few, large groups (EMB: 8 of 64) is
/// not rounded up to a whole group every step. The types' removals are interleaved by their
/// progress through their own quota and stop as soon as the latency target is reached, a
/// group that would overshoot the landing floor going in part or being passed over as in
/// [`prune_lowest`]. Returns how many groups went (0 may only mean that every type is at its
/// target for this step: see [`any_removable`]).
pub fn prune_isomorphic(groups: &[Group], masks: &mut Masks, keep: f64, emb_group: usize, landing: &Landing) -> usize {
    let mut queue: Vec<(f64, &Group)> = Vec::new();
    for s in Structure::ALL {
        // The types' masks are disjoint: which of a type's groups can go is decided on a copy.
        let mut trial = masks.clone();
        let slots: Vec<_> = trial.slots().into_iter().filter(|(t, _)| *t == s).collect();
        let original: usize = slots.iter().map(|(t, b)| trial.get(*t, *b).len()).sum();
        let alive: usize = slots.iter().map(|(t, b)| trial.get(*t, *b).iter().filter(|m| **m != 0.0).count()).sum();
        let quota = alive as f64 - keep * original as f64;
        let mut taken = 0usize;
        let mut chosen = Vec::new();
        for g in groups.iter().filter(|g| g.structure == s) {
            let size = g.units.len();
            // Nearer the target with the group gone than with it kept.
            if (taken + size) as f64 > quota + size as f64 / 2.0 {
                break;
            }
            if remove(g, &mut trial, emb_group) {
                taken += size;
                chosen.push(g);
            }
        }
        let n = chosen.len() as f64;
        queue.extend(chosen.into_iter().enumerate().map(|(k, g)| ((k as f64 + 0.5) / n, g)));
    }
    queue.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut pruned = 0;
    for (_, g) in queue {
        if !removable(g, masks, emb_group) {
            continue;
        }
        let after = landing.ratio_without(g, g.units.len(), masks);
        if after < landing.floor() {
            if let Some((k, _)) = landing.piece(g, masks, emb_group).filter(|(_, r)| *r >= landing.floor()) {
                remove_units(g, k, masks);
                return pruned + 1;
            }
            continue;
        }
        remove_units(g, g.units.len(), masks);
        pruned += 1;
        if landing.reached(after) {
            break;
        }
    }
    pruned
}

/// Uniform allocation: every structure of every block keeps `keep` of its original width
/// (at least one unit), its lowest-scored units going first.
pub fn prune_uniform(scores: &Masks, masks: &mut Masks, keep: f64) {
    for (structure, block) in masks.slots() {
        let score = scores.get(structure, block);
        let mask = masks.get_mut(structure, block);
        let target = ((mask.len() as f64 * keep).round() as usize).max(1);
        let mut alive: Vec<usize> = (0..mask.len()).filter(|&u| mask[u] != 0.0).collect();
        alive.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
        for &u in &alive[..alive.len().saturating_sub(target)] {
            mask[u] = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VitConfig;

    fn table() -> ModelLatency {
        let grid = crate::prune::Grid { emb: vec![8, 16], heads: vec![1, 4], qk: vec![1, 8], v: vec![1, 8], mlp: vec![1, 32] };
        let values = grid.points().iter().map(|(e, d)| 1e-3 * (*e * (d.heads * (d.qk + d.v) + d.mlp)) as f64).collect();
        ModelLatency { stages: vec![crate::prune::LatencyTable::new(grid, values).unwrap()] }
    }

    fn dense(_: &Masks) -> f64 {
        1.0
    }

    /// No latency target: every step prunes what its ranking chooses.
    fn unbounded() -> Landing<'static> {
        Landing { target: 0.0, tolerance: 0.0, ratio: &dense }
    }

    /// Groups of a quarter of EMB and half of each block's MLP, pruned two a step: whole groups
    /// would overshoot every target by far; the last step lands within 2% under it.
    #[test]
    fn the_last_step_lands_within_the_tolerance_under_the_target() {
        let c = VitConfig::uniform(16, 4, 3, 16, 2, 4, 2.0, 5, false);
        let config: crate::model::ModelConfig = c.clone().into();
        let latency = table();
        let scores = Masks::filled(&config, 1.0);
        let full = latency.model_latency(&config);
        let ratio = |m: &Masks| latency.model_latency(&m.surviving(&config)) / full;
        let size = |s: Structure| match s {
            Structure::Emb => 4,
            Structure::Mlp => 16,
            _ => 2,
        };
        for target in [0.7, 0.5, 0.3] {
            for isomorphic in [false, true] {
                let landing = Landing { target, tolerance: 0.02, ratio: &ratio };
                let mut masks = Masks::ones(&config);
                for step in 1..=100 {
                    let g = groups(&scores, &masks, &latency, 0.0, size);
                    if isomorphic {
                        prune_isomorphic(&g, &mut masks, 0.8f64.powi(step), 4, &landing);
                    } else {
                        prune_lowest(&g, &mut masks, 2, 4, &landing);
                    }
                    if landing.reached(ratio(&masks)) {
                        break;
                    }
                }
                let r = ratio(&masks);
                assert!(r <= target + 1e-12 && r >= target * 0.98, "target {target} (isomorphic: {isomorphic}): ended at {r}");
            }
        }
    }

    /// A DeiT's one stream: its width and its blocks'.
    fn widths(masks: &Masks) -> (usize, Vec<BlockDims>) {
        masks.surviving_dims().remove(0)
    }

    /// Group sizes: EMB 4, heads 2, QK 2, V 2, MLP 8.
    fn sizes(s: Structure) -> usize {
        match s {
            Structure::Emb => 4,
            Structure::Mlp => 8,
            _ => 2,
        }
    }

    #[test]
    fn uniform_allocation_keeps_the_same_fraction_everywhere_lowest_scores_first() {
        let config = VitConfig { blocks: vec![BlockDims { heads: 4, qk: 8, v: 8, mlp: 40 }; 3], embed_dim: 20, ..VitConfig::preset("deit-tiny").unwrap() };
        let mut scores = Masks::filled(&config.clone().into(), 1.0);
        scores.get_mut(Structure::Mlp, 1)[7] = 0.0;
        let mut masks = Masks::ones(&config.clone().into());
        prune_uniform(&scores, &mut masks, 0.75);
        let (e, dims) = widths(&masks);
        assert_eq!(e, 15);
        assert!(dims.iter().all(|d| *d == BlockDims { heads: 3, qk: 6, v: 6, mlp: 30 }), "{dims:?}");
        assert_eq!(masks.get(Structure::Mlp, 1)[7], 0.0, "the lowest-scored unit went first");
        prune_uniform(&scores, &mut masks, 0.0);
        assert!(widths(&masks).1.iter().all(|d| *d == BlockDims { heads: 1, qk: 1, v: 1, mlp: 1 }));
    }

    #[test]
    fn never_prunes_a_structure_below_one_group() {
        let c = VitConfig::uniform(16, 4, 3, 16, 2, 4, 2.0, 5, false);
        let mut masks = Masks::ones(&c.clone().into());
        let scores = Masks::filled(&c.clone().into(), 0.0);
        for _ in 0..200 {
            let g = groups(&scores, &masks, &table(), 0.0, sizes);
            prune_lowest(&g, &mut masks, 3, 4, &unbounded());
        }
        // Groups are pruned whole, so exactly one group of each structure stays.
        let (e, dims) = widths(&masks);
        assert_eq!(e, 4, "one EMB group stays");
        for d in dims {
            assert_eq!(d, BlockDims { heads: 2, qk: 2, v: 2, mlp: 8 }, "one group of each structure stays");
        }
    }

    #[test]
    fn the_lowest_adjusted_groups_go_first_across_the_whole_network() {
        let c = VitConfig::uniform(16, 4, 3, 16, 2, 4, 2.0, 5, false);
        let mut scores = Masks::filled(&c.clone().into(), 10.0);
        for u in [3, 9, 17, 30] {
            scores.get_mut(Structure::Mlp, 1)[u] = 0.01;
        }
        let mut masks = Masks::ones(&c.clone().into());
        let g = groups(&scores, &masks, &table(), 0.0, |s| if s == Structure::Mlp { 4 } else { sizes(s) });
        assert_eq!((g[0].structure, g[0].block), (Structure::Mlp, 1));
        assert_eq!(g[0].units, [3, 9, 17, 30]);
        prune_lowest(&g, &mut masks, 1, 4, &unbounded());
        assert_eq!(widths(&masks).1[1].mlp, 28);
        assert_eq!(widths(&masks).1[0].mlp, 32);
    }

    /// Heads scored far below everything else: a global ranking takes only heads, an
    /// isomorphic one the same fraction of every type, each type's lowest blocks first.
    #[test]
    fn isomorphic_ranking_prunes_every_type_by_the_same_fraction_within_the_type() {
        // Two blocks of 4 heads (qk 4, v 4), MLP 32, E 16.
        let c = VitConfig::uniform(16, 4, 3, 16, 2, 4, 2.0, 5, false);
        let mut scores = Masks::filled(&c.clone().into(), 10.0);
        for b in 0..2 {
            scores.get_mut(Structure::Head, b).iter_mut().for_each(|v| *v = 0.0);
        }
        // Block 1's MLP units are the least salient MLP units of the network.
        scores.get_mut(Structure::Mlp, 1).iter_mut().for_each(|v| *v = 1.0);
        let g = groups(&scores, &Masks::ones(&c.clone().into()), &table(), 0.0, |_| 1);
        let mut global = Masks::ones(&c.clone().into());
        prune_lowest(&g, &mut global, 4, 1, &unbounded());
        let (e, dims) = widths(&global);
        assert_eq!((e, dims.iter().map(|d| d.heads).sum::<usize>()), (16, 4), "global: four heads, nothing else");
        assert!(dims.iter().all(|d| d.mlp == 32 && d.qk == 4));

        let mut iso = Masks::ones(&c.clone().into());
        let n = prune_isomorphic(&g, &mut iso, 0.75, 1, &unbounded());
        let (e, dims) = widths(&iso);
        let total = |f: fn(&BlockDims) -> usize| dims.iter().map(f).sum::<usize>();
        assert_eq!(e, 12, "a quarter of EMB");
        assert_eq!(total(|d| d.heads), 6, "a quarter of the heads");
        assert_eq!((total(|d| d.qk), total(|d| d.v)), (6, 6), "a quarter of QK and of V");
        assert_eq!((dims[0].mlp, dims[1].mlp), (32, 16), "a quarter of the MLP units, all from block 1");
        assert_eq!(n, 4 + 2 + 2 + 2 + 16);

        // Stopped by the target after the first group.
        let mut once = Masks::ones(&c.clone().into());
        assert_eq!(prune_isomorphic(&g, &mut once, 0.75, 1, &Landing { target: 1.0, tolerance: 1.0, ratio: &dense }), 1);
    }

    /// EMB in groups of 8 of 16 channels pruned 5% a step: a per-step quota rounded up to a
    /// group would take half of it at once; the cumulative target takes a group only once
    /// half a group is due, and no type goes past its target.
    #[test]
    fn isomorphic_targets_are_cumulative_and_rounded_to_the_nearest_group() {
        let c = VitConfig::uniform(16, 4, 3, 16, 2, 4, 2.0, 5, false);
        let scores = Masks::filled(&c.clone().into(), 1.0);
        let size = |s: Structure| if s == Structure::Emb { 8 } else { 1 };
        let mut masks = Masks::ones(&c.clone().into());
        let mut emb = Vec::new();
        for k in 1..=20 {
            let keep = 0.95f64.powi(k);
            let g = groups(&scores, &masks, &table(), 0.0, size);
            prune_isomorphic(&g, &mut masks, keep, 8, &unbounded());
            let (e, dims) = widths(&masks);
            emb.push(e);
            // Heads: 8 in all, one unit per group, so within half a unit of the target.
            let heads: usize = dims.iter().map(|d| d.heads).sum();
            assert!((heads as f64 - 8.0 * keep).abs() <= 0.5 + 1e-9, "step {k}: {heads} heads for {}", 8.0 * keep);
        }
        // 16 * 0.95^k falls below 12 (half a group gone) at k = 6; EMB never drops to 0.
        assert_eq!(emb[..5], [16; 5]);
        assert!(emb[5..].iter().all(|&e| e == 8), "{emb:?}");
    }

    #[test]
    fn latency_credit_favours_units_that_save_time_and_stops_at_the_floors() {
        let latency = table();
        let t = &latency.stages[0];
        let d = BlockDims { heads: 4, qk: 8, v: 8, mlp: 32 };
        assert!(latency_saved(&latency, &[(16, vec![d])], Structure::Mlp, 0) > 0.0);
        let floor = BlockDims { heads: 2, qk: 8, v: 8, mlp: 16 };
        for s in [Structure::Head, Structure::Qk, Structure::V, Structure::Mlp] {
            assert_eq!(latency_saved(&latency, &[(16, vec![floor])], s, 0), 0.0, "{s:?}");
        }
        let emb = latency_saved(&latency, &[(16, vec![d, d])], Structure::Emb, 0);
        assert!((emb - 2.0 * (t.lookup(16, &d) - t.lookup(15, &d))).abs() < 1e-15);
        // Two streams, each with its own table: a block of the second reads the second's, at
        // the second's width, and its EMB sums over the second's blocks only.
        let doubled = ModelLatency { stages: vec![t.clone(), crate::prune::LatencyTable::new(t.grid.clone(), t.grid.points().iter().map(|(e, d)| 2e-3 * (*e * (d.heads * (d.qk + d.v) + d.mlp)) as f64).collect()).unwrap()] };
        let stages = [(8, vec![d]), (16, vec![d, d])];
        let second = latency_saved(&doubled, &stages, Structure::Mlp, 2);
        assert!((second - 2.0 * (t.lookup(16, &d) - t.lookup(16, &BlockDims { mlp: 31, ..d }))).abs() < 1e-15);
        let emb = latency_saved(&doubled, &stages, Structure::Emb, 1);
        assert!((emb - 4.0 * (t.lookup(16, &d) - t.lookup(15, &d))).abs() < 1e-15);
    }
}
