//! Exact latency-constrained allocation (issue 15; the formulation of MDP, CVPR 2025): choose
//! every block's widths and the shared E that keep the most total saliency subject to the
//! latency table's estimate being at most a budget.
//!
//! Units of a structure are kept in score order, so a width's value is a prefix sum of its
//! sorted scores. For a fixed E the blocks are independent but for the budget they share: a
//! multiple-choice knapsack, solved by dynamic programming over the blocks on the budget cut
//! into `bins` steps, each block's options reduced to their (latency, value) Pareto frontier.
//! Latencies are rounded up to whole steps, so the choice never exceeds the budget, and it is
//! optimal among choices whose rounded latencies fit; an outer loop tries every E.

use super::latency_table::LatencyTable;
use super::structures::{Masks, Structure};
use crate::model::BlockDims;

/// A block's structures, in the order [`BlockDims`] lists their widths.
const IN_BLOCK: [Structure; 4] = [Structure::Head, Structure::Qk, Structure::V, Structure::Mlp];

/// One structure of one block (or EMB): its alive units best first, and the value of keeping
/// the best `k`, for each allowed width `k`.
struct Ranked {
    order: Vec<usize>,
    /// `(k, sum of the k best scores)`, widest first.
    widths: Vec<(usize, f64)>,
}

/// The widths a structure may keep: its alive count minus whole groups, at least `floor`.
fn rank(scores: &[f32], mask: &[f32], group: usize, floor: usize) -> Ranked {
    let mut order: Vec<usize> = (0..mask.len()).filter(|&u| mask[u] != 0.0).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let prefix: Vec<f64> = std::iter::once(0.0).chain(order.iter().scan(0.0, |sum, &u| Some(*sum += scores[u] as f64).map(|_| *sum))).collect();
    let n = order.len();
    let floor = floor.min(n).max(1);
    let widths = (0..).map(|j| n as isize - (j * group.max(1)) as isize).take_while(|&k| k >= floor as isize).map(|k| (k as usize, prefix[k as usize])).collect();
    Ranked { order, widths }
}

/// A block's choice: its widths, estimated latency and kept value.
#[derive(Clone, Copy)]
struct Choice {
    dims: BlockDims,
    latency: f64,
    value: f64,
}

/// The choices of one block at embedding width `e` that no other beats on both latency and value,
/// by ascending latency.
fn frontier(table: &LatencyTable, e: usize, block: [&Ranked; 4]) -> Vec<Choice> {
    let [head, qk, v, mlp] = block;
    let mut all = Vec::with_capacity(head.widths.len() * qk.widths.len() * v.widths.len() * mlp.widths.len());
    for &(h, hv) in &head.widths {
        for &(q, qv) in &qk.widths {
            for &(vw, vv) in &v.widths {
                for &(m, mv) in &mlp.widths {
                    let dims = BlockDims { heads: h, qk: q, v: vw, mlp: m };
                    all.push(Choice { dims, latency: table.lookup(e, &dims), value: hv + qv + vv + mv });
                }
            }
        }
    }
    all.sort_by(|a, b| a.latency.total_cmp(&b.latency).then(b.value.total_cmp(&a.value)));
    let mut out: Vec<Choice> = Vec::new();
    for c in all {
        if out.last().is_none_or(|best| c.value > best.value) {
            out.push(c);
        }
    }
    out
}

/// The most valuable widths under `budget` seconds of estimated latency, as masks that keep
/// each structure's best-scored alive units (pruned units stay pruned); `None` when even the
/// narrowest allowed model is over the budget. `group(s)` is the step in which structure `s`
/// shrinks; EMB keeps at least one group, every other structure at least one unit. With a
/// `floor` (seconds; 0 for none: the last step's landing), each E's choice is filled with
/// block units up to the budget ([`fill`]) and the most valuable of those that come to at
/// least `floor` wins: a narrower E can win on value far under the budget.
pub fn select(scores: &Masks, masks: &Masks, table: &LatencyTable, budget: f64, floor: f64, group: impl Fn(Structure) -> usize, bins: usize) -> Option<Masks> {
    let depth = masks.blocks.len();
    let ranked = |s: Structure, b: usize| rank(scores.get(s, b), masks.get(s, b), group(s), if s == Structure::Emb { group(s) } else { 1 });
    assert_eq!(masks.emb.len(), 1, "exact selection solves for one embedding width");
    let emb = ranked(Structure::Emb, 0);
    let blocks: Vec<[Ranked; 4]> = (0..depth).map(|b| IN_BLOCK.map(|s| ranked(s, b))).collect();
    let bins = bins.max(1);
    let step = budget / bins as f64;
    // Every E is its own knapsack: they run in parallel, and the most valuable wins.
    use rayon::prelude::*;
    let solve = |&(e, emb_value): &(usize, f64)| -> Option<(f64, usize, Vec<BlockDims>, f64)> {
        let options: Vec<Vec<Choice>> = blocks.iter().map(|b| frontier(table, e, [&b[0], &b[1], &b[2], &b[3]])).collect();
        let cost = |o: &Choice| (o.latency / step - 1e-9).ceil().max(0.0) as usize;
        // value[c]: the best value of the blocks so far within c steps; picks[b][c]: block b's
        // option there.
        let mut value = vec![0.0f64; bins + 1];
        let mut picks: Vec<Vec<Option<usize>>> = Vec::with_capacity(depth);
        for opts in &options {
            let mut next = vec![f64::NEG_INFINITY; bins + 1];
            let mut pick = vec![None; bins + 1];
            for (i, o) in opts.iter().enumerate() {
                let cost = cost(o);
                if cost > bins {
                    break; // by ascending latency: the rest cost more
                }
                for c in cost..=bins {
                    let v = value[c - cost] + o.value;
                    if v > next[c] {
                        next[c] = v;
                        pick[c] = Some(i);
                    }
                }
            }
            value = next;
            picks.push(pick);
        }
        if !value[bins].is_finite() {
            return None;
        }
        let mut dims = vec![BlockDims { heads: 0, qk: 0, v: 0, mlp: 0 }; depth];
        let (mut c, mut latency) = (bins, 0.0);
        for b in (0..depth).rev() {
            let o = options[b][picks[b][c].expect("a finite value has a pick")];
            dims[b] = o.dims;
            latency += o.latency;
            c -= cost(&o);
        }
        Some((value[bins] + emb_value, e, dims, latency))
    };
    let solved: Vec<_> = emb.widths.par_iter().filter_map(solve).collect();
    let keep = |mask: &mut Vec<f32>, ranked: &Ranked, k: usize| {
        for &u in &ranked.order[k..] {
            mask[u] = 0.0;
        }
    };
    let to_masks = |e: usize, dims: &[BlockDims]| {
        let mut out = masks.clone();
        keep(out.get_mut(Structure::Emb, 0), &emb, e);
        for (b, d) in dims.iter().enumerate() {
            for (i, k) in [d.heads, d.qk, d.v, d.mlp].into_iter().enumerate() {
                keep(out.get_mut(IN_BLOCK[i], b), &blocks[b][i], k);
            }
        }
        out
    };
    if floor <= 0.0 {
        let (_, e, dims, _) = solved.into_iter().max_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))?;
        return Some(to_masks(e, &dims));
    }
    // Landing: each E's choice filled up to the budget, those at or above `floor` preferred.
    let filled: Vec<(f64, f64, Masks)> = solved
        .iter()
        .map(|(_, e, dims, _)| {
            let m = fill(scores, masks, to_masks(*e, dims), table, budget);
            (kept_value(scores, &m), latency(table, &m), m)
        })
        .collect();
    let landed = filled.iter().any(|f| f.1 >= floor);
    filled.into_iter().filter(|f| !landed || f.1 >= floor).max_by(|a, b| a.0.total_cmp(&b.0)).map(|f| f.2)
}

/// The estimated latency of the widths `m` keeps.
fn latency(table: &LatencyTable, m: &Masks) -> f64 {
    let (e, dims) = m.surviving_dims().remove(0);
    dims.iter().map(|d| table.lookup(e, d)).sum()
}

/// The scores of the units `m` keeps, summed.
fn kept_value(scores: &Masks, m: &Masks) -> f64 {
    m.slots().iter().map(|&(s, b)| scores.get(s, b).iter().zip(m.get(s, b)).map(|(x, k)| (*x * *k) as f64).sum::<f64>()).sum()
}

/// `kept` (a selection from `masks` under `budget`) with block units it pruned given back, the
/// best-scored first, each that still fits the budget: the widths the dynamic program chooses
/// move in whole groups, so the last step can end up to a group's latency under the budget.
/// Units pruned before this step stay pruned, and E stays as chosen.
fn fill(scores: &Masks, masks: &Masks, mut kept: Masks, table: &LatencyTable, budget: f64) -> Masks {
    let mut back: Vec<(Structure, usize, usize, f32)> = Vec::new();
    for (s, b) in kept.slots().into_iter().filter(|(s, _)| *s != Structure::Emb) {
        let (was, now, score) = (masks.get(s, b), kept.get(s, b), scores.get(s, b));
        back.extend((0..was.len()).filter(|&u| was[u] != 0.0 && now[u] == 0.0).map(|u| (s, b, u, score[u])));
    }
    back.sort_by(|a, b| b.3.total_cmp(&a.3));
    for (s, b, u, _) in back {
        kept.get_mut(s, b)[u] = masks.get(s, b)[u];
        if latency(table, &kept) > budget {
            kept.get_mut(s, b)[u] = 0.0;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VitConfig;
    use crate::prune::latency_table::Grid;
    use rand::{Rng, SeedableRng};

    /// A table whose latency grows with every width, with a fixed cost per block.
    fn table(config: &VitConfig) -> LatencyTable {
        let grid = Grid::spanning(config.embed_dim, &config.blocks);
        let values = grid
            .points()
            .into_iter()
            .map(|(e, d)| 1e-5 + 1e-6 * e as f64 * (d.heads as f64 * (d.qk + d.v) as f64 + 1.5 * d.mlp as f64) + 2e-7 * (d.heads * e) as f64)
            .collect();
        LatencyTable::new(grid, values).unwrap()
    }

    fn random_scores(config: &VitConfig, seed: u64) -> Masks {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut m = Masks::ones(&config.clone().into());
        for (s, b) in m.slots() {
            m.get_mut(s, b).iter_mut().for_each(|x| *x = rng.random::<f32>());
        }
        m
    }

    fn value(scores: &Masks, kept: &Masks) -> f64 {
        kept.slots().iter().map(|&(s, b)| scores.get(s, b).iter().zip(kept.get(s, b)).map(|(x, k)| (*x * *k) as f64).sum::<f64>()).sum()
    }

    /// Every allowed width combination, scored with its true latency.
    fn brute_force(scores: &Masks, masks: &Masks, table: &LatencyTable, budget: f64, group: &dyn Fn(Structure) -> usize) -> f64 {
        let emb = rank(scores.get(Structure::Emb, 0), masks.get(Structure::Emb, 0), group(Structure::Emb), group(Structure::Emb));
        let blocks: Vec<Vec<Choice>> = (0..masks.blocks.len())
            .map(|b| {
                let r = IN_BLOCK.map(|s| rank(scores.get(s, b), masks.get(s, b), group(s), 1));
                let mut all = Vec::new();
                for &(h, hv) in &r[0].widths {
                    for &(q, qv) in &r[1].widths {
                        for &(v, vv) in &r[2].widths {
                            for &(m, mv) in &r[3].widths {
                                all.push((BlockDims { heads: h, qk: q, v, mlp: m }, hv + qv + vv + mv));
                            }
                        }
                    }
                }
                all.into_iter().map(|(dims, value)| Choice { dims, latency: 0.0, value }).collect()
            })
            .collect();
        let mut best = f64::NEG_INFINITY;
        for &(e, ev) in &emb.widths {
            let mut idx = vec![0usize; blocks.len()];
            loop {
                let lat: f64 = idx.iter().enumerate().map(|(b, &i)| table.lookup(e, &blocks[b][i].dims)).sum();
                if lat <= budget {
                    best = best.max(ev + idx.iter().enumerate().map(|(b, &i)| blocks[b][i].value).sum::<f64>());
                }
                let mut b = 0;
                while b < idx.len() {
                    idx[b] += 1;
                    if idx[b] < blocks[b].len() {
                        break;
                    }
                    idx[b] = 0;
                    b += 1;
                }
                if b == idx.len() {
                    break;
                }
            }
        }
        best
    }

    #[test]
    fn equals_brute_force_up_to_the_budget_steps_and_never_exceeds_the_budget() {
        let config = VitConfig::uniform(16, 4, 3, 12, 2, 3, 1.0, 5, false); // E 12, 2 blocks of 3 heads of 4
        let group = |s: Structure| if s == Structure::Emb { 2 } else { 1 };
        let table = table(&config);
        let dense = config.blocks.iter().map(|d| table.lookup(config.embed_dim, d)).sum::<f64>();
        for seed in 0..2 {
            let scores = random_scores(&config, seed);
            let mut masks = Masks::ones(&config.clone().into());
            if seed % 2 == 1 {
                masks.blocks[0].mlp[3] = 0.0; // a unit pruned at an earlier step stays pruned
                masks.emb[0][5] = 0.0;
            }
            for ratio in [0.9, 0.6, 0.35] {
                let budget = ratio * dense;
                let bins = 2000;
                let kept = select(&scores, &masks, &table, budget, 0.0, group, bins).expect("feasible");
                let (e, dims) = kept.surviving_dims().remove(0);
                let lat: f64 = dims.iter().map(|d| table.lookup(e, d)).sum();
                assert!(lat <= budget, "seed {seed} ratio {ratio}: {lat} over {budget}");
                for (s, b) in kept.slots() {
                    assert!(kept.get(s, b).iter().zip(masks.get(s, b)).all(|(k, m)| *m != 0.0 || *k == 0.0), "nothing grows back");
                }
                let ours = value(&scores, &kept);
                let upper = brute_force(&scores, &masks, &table, budget, &group);
                // Rounding each block's latency up costs at most one step per block.
                let lower = brute_force(&scores, &masks, &table, budget - 2.0 * budget / bins as f64, &group);
                assert!(ours <= upper + 1e-9 && ours >= lower - 1e-9, "seed {seed} ratio {ratio}: {lower} <= {ours} <= {upper}");
            }
        }
    }

    /// MLP in groups of 8 units, EMB of 4 of 12: the program alone moves in those steps; with
    /// the embedding widths that land preferred and then filled, the selection ends within 2%
    /// under its budget, and filling only adds value.
    #[test]
    fn filling_brings_the_last_step_to_its_budget() {
        let config = VitConfig::uniform(16, 4, 3, 12, 2, 3, 4.0, 5, false);
        let group = |s: Structure| match s {
            Structure::Emb => 4,
            Structure::Mlp => 8,
            _ => 2,
        };
        let table = table(&config);
        let dense = config.blocks.iter().map(|d| table.lookup(config.embed_dim, d)).sum::<f64>();
        let scores = random_scores(&config, 3);
        let masks = Masks::ones(&config.clone().into());
        let latency = |m: &Masks| {
            let (e, dims) = m.surviving_dims().remove(0);
            dims.iter().map(|d| table.lookup(e, d)).sum::<f64>()
        };
        for ratio in [0.8, 0.55, 0.3] {
            let budget = ratio * dense;
            let kept = select(&scores, &masks, &table, budget, 0.0, group, 1000).unwrap();
            let landed = select(&scores, &masks, &table, budget, 0.98 * budget, group, 1000).unwrap();
            let (before, after) = (latency(&kept), latency(&landed));
            assert!(after <= budget && after >= 0.98 * budget, "ratio {ratio}: landed at {} of the budget (the program alone at {})", after / budget, before / budget);
            let refilled = fill(&scores, &masks, kept.clone(), &table, budget);
            assert!(value(&scores, &refilled) >= value(&scores, &kept), "filling only adds value");
        }
    }

    #[test]
    fn an_impossible_budget_is_none_and_a_full_one_keeps_everything() {
        let config = VitConfig::uniform(16, 4, 3, 8, 2, 2, 1.0, 5, false);
        let table = table(&config);
        let scores = random_scores(&config, 7);
        let masks = Masks::ones(&config.clone().into());
        assert!(select(&scores, &masks, &table, 1e-9, 0.0, |_| 1, 100).is_none());
        let all = select(&scores, &masks, &table, 1.01 * config.blocks.iter().map(|d| table.lookup(config.embed_dim, d)).sum::<f64>(), 0.0, |_| 1, 1000).unwrap();
        assert_eq!(all, masks);
    }
}
