//! Checkpoints that a killed stage resumes from: the model, the optimizer's moments and the
//! loop's own state, written beside the previous checkpoint and swapped in, so a kill at any
//! moment leaves one complete checkpoint.

use std::path::Path;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{de::DeserializeOwned, Serialize};

use crate::files::atomic_write;
use crate::model::Model;
use crate::train::optim::AdamW;

type Rec = BinFileRecorder<FullPrecisionSettings>;

/// Writes `state` (last), the model and the optimizer into `ckpt`.
pub fn save<B: AutodiffBackend, S: Serialize>(ckpt: &Path, model: &Model<B>, optim: &AdamW<B>, state: &S) -> Result<()> {
    let tmp = ckpt.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    model.clone().save_file(tmp.join("model"), &Rec::new()).with_context(|| format!("saving the model checkpoint in {}", tmp.display()))?;
    Recorder::<B>::record(&Rec::new(), optim.to_record(), tmp.join("optim")).with_context(|| format!("saving the optimizer checkpoint in {}", tmp.display()))?;
    atomic_write(&tmp.join("state.json"), &serde_json::to_vec(state)?)?;
    let _ = std::fs::remove_dir_all(ckpt);
    std::fs::rename(&tmp, ckpt).with_context(|| format!("moving checkpoint into {}", ckpt.display()))?;
    Ok(())
}

/// The checkpoint in `ckpt`: `None` when there is none, or (after telling `warn` why) when it
/// is damaged, a file missing or truncated: the stage then starts over.
pub fn load<B: AutodiffBackend, S: DeserializeOwned>(
    ckpt: &Path,
    model: &Model<B>,
    optim: AdamW<B>,
    device: &B::Device,
    warn: impl FnOnce(String),
) -> (Option<(Model<B>, S)>, AdamW<B>) {
    // A kill between removing the old checkpoint and renaming the new one leaves only the new
    // one, complete (its state.json is written last).
    let tmp = ckpt.with_extension("tmp");
    if !ckpt.join("state.json").exists() && tmp.join("state.json").exists() {
        let _ = std::fs::rename(&tmp, ckpt);
    }
    if !ckpt.join("state.json").exists() {
        return (None, optim);
    }
    let restored = (|| -> Result<_> {
        let state: S = serde_json::from_slice(&std::fs::read(ckpt.join("state.json"))?)?;
        let model = model.clone().load_file(ckpt.join("model"), &Rec::new(), device)?;
        let record = Recorder::<B>::load(&Rec::new(), ckpt.join("optim"), device)?;
        Ok((model, state, record))
    })();
    match restored {
        Ok((model, state, record)) => (Some((model, state)), optim.load_record(record)),
        Err(e) => {
            warn(format!("the checkpoint in {} is damaged ({}); starting over", ckpt.display(), e.to_string().lines().next().unwrap_or_default()));
            (None, optim)
        }
    }
}
