//! One runner per stage; each trains into `<run>/<stage>/` and, when finished, writes its
//! diffusers components into `<run>/<stage>/model/` (the completion marker is written after, by
//! the caller).

pub(crate) mod clip;
pub(crate) mod decoder;
pub(crate) mod prior;
pub(crate) mod upsampler;

use super::loop_::{Ctx, StageSteps};
use super::{Result, TrainError};
use std::path::{Path, PathBuf};

/// The held-out batch a validation grid shows (`validation.grid` items, the same every time), or
/// `None` without a held-out split or a grid.
pub(crate) fn grid_batch(
    ctx: &Ctx,
    needs: impl Fn(usize) -> super::source::Needs,
) -> Result<Option<crate::data::Batch>> {
    match &ctx.data.holdout {
        Some(h) if ctx.cfg.validation.grid > 0 => {
            let n = ctx.cfg.validation.grid.min(h.len());
            let l = super::source::loader(h.clone(), &ctx.cfg.data, ctx.seed(), 0x9e1d, needs(n))?;
            Ok(Some(l.batch(0)?))
        }
        _ => Ok(None),
    }
}

pub(crate) fn run(ctx: &Ctx, name: &str) -> Result<StageSteps> {
    match name {
        "tokenizer" => {
            // Rank 0 alone builds it in a data-parallel run; the others wait at the barrier.
            if ctx.is_main() {
                super::tokenizer::run(ctx)?;
            }
            Ok(StageSteps { steps: 0, finished: true })
        }
        "clip" => clip::run(ctx),
        "prior" => prior::run(ctx),
        "decoder" => decoder::run(ctx),
        "upsampler" => upsampler::run(ctx, "upsampler"),
        "upsampler2" => upsampler::run(ctx, "upsampler2"),
        other => Err(TrainError::stage(other, "no such stage")),
    }
}

/// `init` of a stage: a component folder (has `config.json`) or a model folder holding
/// `component/`.
pub(crate) fn component_dir(init: &Path, component: &str, key: &str) -> Result<PathBuf> {
    if init.join("config.json").is_file() {
        return Ok(init.to_path_buf());
    }
    let sub = init.join(component);
    if sub.join("config.json").is_file() {
        return Ok(sub);
    }
    Err(TrainError::stage(
        key.split('.').next().unwrap_or(key),
        format!(
            "{key} = {}: neither a component folder (config.json) nor a model folder with {component}/config.json",
            init.display()
        ),
    ))
}

/// The seed set before building a fresh model: same seed, same initial weights (a resumed run
/// loads its checkpoint over them).
pub(crate) fn seed_init(ctx: &Ctx) {
    tch::manual_seed(ctx.seed() as i64);
}
