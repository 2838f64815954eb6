//! Training batches drawn from the captioned-shapes generator: every example is rendered on the
//! fly from its scene index, so the data needs no storage and a resumed run sees the same batches.

use tch::{Device, Kind, Tensor};
use unclip::clip::{ImageProcessor, ProcessorConfig};
use unclip::decoder::upsample::resize_bicubic_aa;
use unclip::shapes::{Scene, SceneGenerator, Split, caption, render};

/// The training split at two resolutions, and CLIP's view of it.
pub struct Shapes {
    generator: SceneGenerator,
    pub len: usize,
    high: i64,
    low: i64,
    processor: ImageProcessor,
}

/// One batch, on the training device.
pub struct Batch {
    pub captions: Vec<String>,
    /// (B, 3, high, high) in [-1, 1].
    pub high: Tensor,
    /// (B, 3, low, low) in [-1, 1]: `high` downsampled as the upsampler's input is.
    pub low: Tensor,
    /// (B, 3, low, low) CLIP pixel values (the image processor applied to the rendered images).
    pub pixels: Tensor,
}

impl Shapes {
    pub fn new(seed: u64, len: usize, high: i64, low: i64) -> Self {
        Self {
            generator: SceneGenerator::new(Split::Train, seed),
            len,
            high,
            low,
            processor: ImageProcessor::new(ProcessorConfig::clip(low as usize)),
        }
    }

    pub fn caption(&self, index: usize) -> String {
        caption(&self.generator.scene(index as u64))
    }

    /// Renders the examples `indices`.
    pub fn batch(&self, indices: &[usize], device: Device) -> anyhow::Result<Batch> {
        let scenes: Vec<Scene> = indices.iter().map(|&i| self.generator.scene(i as u64)).collect();
        self.render(&scenes, device)
    }

    /// A contrastive batch as large as `indices`: each example in turn, followed by up to
    /// `group - 1` of its counterparts (`Scene::pick_counterparts`, drawn from the example's
    /// index), so captions must be matched by shape, place, size and binding too.
    pub fn contrastive_batch(
        &self,
        indices: &[usize],
        group: usize,
        device: Device,
    ) -> anyhow::Result<Batch> {
        let mut scenes = Vec::with_capacity(indices.len());
        for &i in indices {
            if scenes.len() == indices.len() {
                break;
            }
            let scene = self.generator.scene(i as u64);
            let room = (indices.len() - scenes.len() - 1).min(group.saturating_sub(1));
            let parts = scene.pick_counterparts(room, i as u64);
            scenes.push(scene);
            scenes.extend(parts);
        }
        self.render(&scenes, device)
    }

    fn render(&self, scenes: &[Scene], device: Device) -> anyhow::Result<Batch> {
        let mut captions = Vec::with_capacity(scenes.len());
        let mut bytes = Vec::with_capacity(scenes.len() * (3 * self.high * self.high) as usize);
        for scene in scenes {
            captions.push(caption(scene));
            bytes.extend_from_slice(render(scene, self.high as u32).as_raw());
        }
        let b = scenes.len() as i64;
        let u8s = Tensor::f_from_slice(&bytes)?
            .f_view([b, self.high, self.high, 3])?
            .f_permute([0, 3, 1, 2])?
            .f_contiguous()?;
        let pixels = self.processor.preprocess_tensor(&u8s)?.f_to_device(device)?;
        let high = u8s.f_to_kind(Kind::Float)?.f_div_scalar(127.5)?.f_sub_scalar(1.0)?;
        let low = resize_bicubic_aa(&high, self.low, self.low)?;
        Ok(Batch {
            captions,
            high: high.f_to_device(device)?,
            low: low.f_to_device(device)?,
            pixels,
        })
    }
}
