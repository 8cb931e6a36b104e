//! NViT's pruning machinery (METHOD.md sections 2 to 5): the prunable structures and masks
//! over them, the Hessian-aware saliency and its baselines, and the latency lookup table.

pub mod compact;
pub mod exact;
pub mod greedy;
pub mod latency_table;
pub mod saliency;
pub mod structures;

pub use compact::compact;
pub use latency_table::{Grid, LatencyTable, ModelLatency};
pub use saliency::{Criterion, Normalizers};
pub use structures::{gate, Masks, ParamSet, Structure};
