//! diffusers' `ResnetBlock2D`, the building block of every UNet here, including its down/up
//! sampling form (BigGAN-style: the resampling happens inside the block, on both paths).

use crate::Result;
use crate::config::TimeNorm;
use crate::layers::{Conv2d, GroupNorm, Linear};
use tch::{Tensor, nn};
use unclip_core::nn::{add_, silu_};

/// Resampling inside the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    None,
    /// Nearest-neighbour x2 (the `upsamplers.0` blocks).
    Up,
    /// 2x2 average pooling (the `downsamplers.0` blocks).
    Down,
}

/// Sizes and options of one block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub temb_channels: i64,
    pub groups: i64,
    pub eps: f64,
    pub time_norm: TimeNorm,
    pub skip_time_act: bool,
    pub output_scale_factor: f64,
    pub resample: Resample,
}

/// `ResnetBlock2D`: tensors `norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut?`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    cfg: ResnetConfig,
}

impl ResnetBlock2D {
    pub fn new(p: nn::Path, cfg: ResnetConfig) -> Self {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let temb_out = match cfg.time_norm {
            TimeNorm::Default => cout,
            TimeNorm::ScaleShift => 2 * cout,
        };
        Self {
            norm1: GroupNorm::new(&p / "norm1", cfg.groups, cin, cfg.eps),
            conv1: Conv2d::new(&p / "conv1", cin, cout, 3),
            time_emb_proj: Linear::new(&p / "time_emb_proj", cfg.temb_channels, temb_out),
            norm2: GroupNorm::new(&p / "norm2", cfg.groups, cout, cfg.eps),
            conv2: Conv2d::new(&p / "conv2", cout, cout, 3),
            conv_shortcut: (cin != cout).then(|| Conv2d::new(&p / "conv_shortcut", cin, cout, 1)),
            cfg,
        }
    }

    pub fn out_channels(&self) -> i64 {
        self.cfg.out_channels
    }

    fn resample(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.resample {
            Resample::None => x.shallow_clone(),
            Resample::Down => x.f_avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)?,
            Resample::Up => {
                let (h, w) = (x.size()[2], x.size()[3]);
                x.f_upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0)?
            }
        })
    }

    /// `x` (B, Cin, H, W), `temb` (B, temb_channels) -> (B, Cout, H', W').
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = silu_(self.norm1.forward(x)?)?;
        let (x, h) = (self.resample(x)?, self.resample(&h)?);
        let h = self.conv1.forward(&h)?;
        let temb = if self.cfg.skip_time_act { temb.shallow_clone() } else { temb.f_silu()? };
        let temb = self.time_emb_proj.forward(&temb)?.f_unsqueeze(-1)?.f_unsqueeze(-1)?;
        let h = match self.cfg.time_norm {
            TimeNorm::Default => self.norm2.forward(&add_(h, &temb)?)?,
            TimeNorm::ScaleShift => {
                let chunks = temb.f_chunk(2, 1)?;
                self.norm2.forward_scale_shift(&h, &chunks[0], &chunks[1])?
            }
        };
        let h = self.conv2.forward(&silu_(h)?)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(&x)?,
            None => x,
        };
        let out = add_(h, &x)?;
        if self.cfg.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok(out.f_div_scalar(self.cfg.output_scale_factor)?)
        }
    }
}
