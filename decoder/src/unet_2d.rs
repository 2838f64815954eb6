//! The super-resolution UNet: the `UNet2DModel` subset of Karlo's `super_res_first` /
//! `super_res_last` (ResNet-only down/up blocks, optional mid-block self-attention). Its input is
//! the noisy high-res image concatenated with the upscaled low-res image.

use crate::blocks::{DownBlock, MidAttention, MidBlock, ResnetCommon, UNetTrunk, UpBlock};
use crate::config::UNet2DConfig;
use crate::layers::{Conv2d, GroupNorm};
use crate::unet_2d_condition::check_input;
use crate::{Error, Result};
use tch::{Tensor, nn, nn::Module};
use unclip_core::nn::{TimestepEmbedding, timestep_features};

/// `UNet2DModel` with ResNet up/down blocks.
#[derive(Debug)]
pub struct UNet2DModel {
    time_embedding: TimestepEmbedding,
    trunk: UNetTrunk,
    cfg: UNet2DConfig,
}

impl UNet2DModel {
    pub fn new(p: nn::Path, cfg: &UNet2DConfig) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = cfg.time_embed_dim();
        let common = ResnetCommon {
            temb_channels: temb,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            time_norm: cfg.time_norm()?,
            skip_time_act: false,
            output_scale_factor: 1.0,
        };
        let layers = cfg.layers_per_block;
        let conv_in = Conv2d::new(&p / "conv_in", cfg.in_channels, ch[0], 3);
        let time_embedding = TimestepEmbedding::new(&p / "time_embedding", ch[0], temb);
        let down_blocks = (0..n)
            .map(|i| {
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                DownBlock::new(&p / "down_blocks" / i, cin, ch[i], layers, i + 1 < n, None, &common)
            })
            .collect();
        let mid_block = cfg.mid_block_type.as_ref().map(|_| {
            let attn = if cfg.mid_attention() {
                MidAttention::SelfAttn {
                    head_dim: cfg.mid_head_dim(),
                    groups: cfg.mid_attention_groups(),
                    rescale: cfg.mid_block_scale_factor,
                }
            } else {
                MidAttention::None
            };
            let mid_common =
                ResnetCommon { output_scale_factor: cfg.mid_block_scale_factor, ..common };
            MidBlock::new(&p / "mid_block", ch[n - 1], attn, &mid_common)
        });
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = ch[n - 1];
        for i in 0..n {
            let cout = ch[n - 1 - i];
            let skip_last = ch[(n - 1).saturating_sub(i + 1)];
            let pb = &p / "up_blocks" / i;
            up_blocks.push(UpBlock::new(
                pb,
                prev_out,
                cout,
                skip_last,
                layers + 1,
                i + 1 < n,
                None,
                &common,
            ));
            prev_out = cout;
        }
        let conv_norm_out =
            GroupNorm::new(&p / "conv_norm_out", cfg.norm_num_groups, ch[0], cfg.norm_eps);
        let conv_out = Conv2d::new(&p / "conv_out", ch[0], cfg.out_channels, 3);
        let trunk =
            UNetTrunk { conv_in, down_blocks, mid_block, up_blocks, conv_norm_out, conv_out };
        Ok(Self { time_embedding, trunk, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &UNet2DConfig {
        &self.cfg
    }

    /// `sample` (B, in, H, W) (H, W divisible by the total downsampling), `timestep` 0-d or (B),
    /// `class_labels` (B, time_embed_dim) only with `class_embed_type: "identity"`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t = check_input(
            sample,
            timestep,
            self.cfg.in_channels,
            self.cfg.downsampling_factor(),
            &self.trunk.conv_in.ws,
        )?;
        let (b, kind) = (sample.size()[0], sample.kind());
        let sample = if self.cfg.center_input_sample {
            sample.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?
        } else {
            sample.shallow_clone()
        };
        let ch0 = self.cfg.block_out_channels[0];
        let t_emb =
            timestep_features(&t, ch0, self.cfg.flip_sin_to_cos, self.cfg.freq_shift, 10000.0)?
                .f_to_kind(kind)?;
        let mut emb = self.time_embedding.forward(&t_emb);
        match (class_labels, self.cfg.has_class_embedding()) {
            (Some(c), true) => {
                if c.size() != [b, self.cfg.time_embed_dim()] {
                    return Err(Error::Input(format!(
                        "class_labels must be ({b}, {}), got {:?}",
                        self.cfg.time_embed_dim(),
                        c.size()
                    )));
                }
                emb = emb.f_add(&c.f_to_kind(kind)?)?;
            }
            (None, true) => return Err(Error::Input("class_labels are required".into())),
            (Some(_), false) => {
                return Err(Error::Input("this UNet has no class embedding".into()));
            }
            (None, false) => {}
        }
        self.trunk.forward(&sample, &emb, None)
    }
}
