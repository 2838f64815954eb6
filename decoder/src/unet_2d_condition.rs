//! The decoder UNet: the `UNet2DConditionModel` subset Karlo uses (GLIDE's text-conditional
//! UNet with the CLIP image embedding added to the timestep embedding through `class_labels`).

use crate::attention::mask_to_bias;
use crate::blocks::{
    Context, CrossAttn, DownBlock, MidAttention, MidBlock, ResnetCommon, UNetTrunk, UpBlock,
};
use crate::config::UNet2DConditionConfig;
use crate::layers::{Conv2d, GroupNorm};
use crate::{Error, Result};
use tch::{Kind, Tensor, nn, nn::Module};
use unclip_core::nn::{TimestepEmbedding, timestep_features};

/// Conditioning of one batch, checked once and reused across sampling steps.
#[derive(Debug)]
pub struct Conditioning {
    /// Context tokens (B, L, cross_attention_dim).
    pub encoder_hidden_states: Option<Tensor>,
    /// Added to the time embedding (B, time_embed_dim) (Karlo: the text projection's output).
    pub class_labels: Option<Tensor>,
    /// Additive mask (B, 1, L) made from a keep-mask (B, L).
    bias: Option<Tensor>,
}

impl Conditioning {
    /// `attention_mask` (B, L): 1/true keeps a context token, 0/false drops it.
    pub fn new(
        cfg: &UNet2DConditionConfig,
        encoder_hidden_states: Option<&Tensor>,
        class_labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Self> {
        let mut batch = None;
        let mut same_batch = |what: &str, b: i64| -> Result<()> {
            match batch {
                Some(b0) if b0 != b => {
                    Err(Error::Input(format!("{what} has batch {b}, the other inputs have {b0}")))
                }
                _ => {
                    batch = Some(b);
                    Ok(())
                }
            }
        };
        let needs_context =
            cfg.down_block_types.iter().any(|t| t == crate::config::CROSS_ATTN_DOWN)
                || cfg.up_block_types.iter().any(|t| t == crate::config::CROSS_ATTN_UP)
                || cfg.mid_block_type.is_some();
        let mut context_len = None;
        match encoder_hidden_states {
            Some(e) => {
                let size = e.size();
                let dims: Vec<i64> = cfg.levels()?.iter().map(|l| l.cross_attention_dim).collect();
                if size.len() != 3 || !dims.iter().all(|&d| d == size[2]) {
                    return Err(Error::Input(format!(
                        "encoder_hidden_states must be (B, L, {}), got {size:?}",
                        dims[0]
                    )));
                }
                same_batch("encoder_hidden_states", size[0])?;
                context_len = Some(size[1]);
            }
            None if needs_context => {
                return Err(Error::Input(
                    "this UNet has cross-attention: encoder_hidden_states are required".into(),
                ));
            }
            None => {}
        }
        match (class_labels, cfg.has_class_embedding()) {
            (Some(c), true) => {
                let size = c.size();
                if size.len() != 2 || size[1] != cfg.time_embed_dim() {
                    return Err(Error::Input(format!(
                        "class_labels must be (B, {}), got {size:?}",
                        cfg.time_embed_dim()
                    )));
                }
                same_batch("class_labels", size[0])?;
            }
            (None, true) => {
                return Err(Error::Input(
                    "class_embed_type is \"identity\": class_labels are required".into(),
                ));
            }
            (Some(_), false) => {
                return Err(Error::Input("this UNet has no class embedding".into()));
            }
            (None, false) => {}
        }
        let bias = match attention_mask {
            Some(m) => {
                let size = m.size();
                let l = context_len.ok_or_else(|| {
                    Error::Input("attention_mask given without encoder_hidden_states".into())
                })?;
                if size.len() != 2 || size[1] != l {
                    return Err(Error::Input(format!(
                        "attention_mask must be (B, {l}) like the context tokens, got {size:?}"
                    )));
                }
                same_batch("attention_mask", size[0])?;
                let kind = encoder_hidden_states.map(|e| e.kind()).unwrap_or(Kind::Float);
                Some(mask_to_bias(m, kind)?)
            }
            None => None,
        };
        Ok(Self {
            encoder_hidden_states: encoder_hidden_states.map(|t| t.shallow_clone()),
            class_labels: class_labels.map(|t| t.shallow_clone()),
            bias,
        })
    }

    fn batch(&self) -> Option<i64> {
        self.encoder_hidden_states.as_ref().or(self.class_labels.as_ref()).map(|t| t.size()[0])
    }

    fn context(&self) -> Option<Context<'_>> {
        self.encoder_hidden_states.as_ref().map(|t| Context { tokens: t, bias: self.bias.as_ref() })
    }
}

/// (B, 2, H, W) maps of each pixel's x and y (pixel centres, -1 at the left / top edge to 1 at
/// the right / bottom one), like `sample` in kind and device.
pub fn coordinate_maps(sample: &Tensor) -> Result<Tensor> {
    let size = sample.size();
    let (b, h, w) = (size[0], size[2], size[3]);
    let axis = |n: i64| -> Result<Tensor> {
        let opts = (sample.kind(), sample.device());
        // Centres of n equal cells of [-1, 1].
        Ok(Tensor::f_arange(n, opts)?
            .f_add_scalar(0.5)?
            .f_mul_scalar(2.0 / n as f64)?
            .f_sub_scalar(1.0)?)
    };
    let x = axis(w)?.f_view([1, 1, 1, w])?.f_expand([b, 1, h, w], false)?;
    let y = axis(h)?.f_view([1, 1, h, 1])?.f_expand([b, 1, h, w], false)?;
    Ok(Tensor::f_cat(&[x, y], 1)?)
}

/// Checks a (B, C, H, W) input against the UNet and turns `timestep` (0-d, (1) or (B)) into (B).
pub(crate) fn check_input(
    sample: &Tensor,
    timestep: &Tensor,
    in_channels: i64,
    factor: i64,
    weight: &Tensor,
) -> Result<Tensor> {
    if sample.kind() != weight.kind() || sample.device() != weight.device() {
        return Err(Error::Input(format!(
            "sample is {:?} on {:?} but the model is {:?} on {:?}",
            sample.kind(),
            sample.device(),
            weight.kind(),
            weight.device()
        )));
    }
    let size = sample.size();
    if size.len() != 4 || size[1] != in_channels {
        return Err(Error::Input(format!("sample must be (B, {in_channels}, H, W), got {size:?}")));
    }
    let (b, h, w) = (size[0], size[2], size[3]);
    if b == 0 || h <= 0 || w <= 0 || h % factor != 0 || w % factor != 0 {
        return Err(Error::Input(format!(
            "sample size {h}x{w} (batch {b}) must be non-empty and divisible by the UNet's total \
             downsampling {factor}"
        )));
    }
    if !sample.is_floating_point() {
        return Err(Error::Input(format!(
            "sample must be floating point, got {:?}",
            sample.kind()
        )));
    }
    let t = timestep.f_to_device(sample.device())?;
    match t.size().as_slice() {
        [] | [1] => Ok(t.f_reshape([1])?.f_expand([b], false)?),
        [n] if *n == b => Ok(t),
        other => Err(Error::Input(format!(
            "timestep must be a scalar or have one entry per sample ({b}), got shape {other:?}"
        ))),
    }
}

/// `UNet2DConditionModel` with Karlo's block types.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    time_embedding: TimestepEmbedding,
    trunk: UNetTrunk,
    cfg: UNet2DConditionConfig,
}

impl UNet2DConditionModel {
    /// Builds the UNet under `p` (tensor names as in the checkpoint). Validates the config.
    pub fn new(p: nn::Path, cfg: &UNet2DConditionConfig) -> Result<Self> {
        cfg.validate()?;
        let levels = cfg.levels()?;
        let n = levels.len();
        let ch = &cfg.block_out_channels;
        let temb = cfg.time_embed_dim();
        let common = ResnetCommon {
            temb_channels: temb,
            groups: cfg.groups(),
            eps: cfg.norm_eps,
            time_norm: cfg.time_norm()?,
            skip_time_act: cfg.resnet_skip_time_act,
            output_scale_factor: cfg.resnet_out_scale_factor,
        };
        let cross = |i: usize| CrossAttn {
            head_dim: levels[i].head_dim,
            context_dim: levels[i].cross_attention_dim,
        };
        let conv_in = Conv2d::new(&p / "conv_in", cfg.in_channels, ch[0], cfg.conv_in_kernel);
        let time_embedding = TimestepEmbedding::new(&p / "time_embedding", ch[0], temb);
        let down_blocks = (0..n)
            .map(|i| {
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                let attn = levels[i].cross_attention.then(|| cross(i));
                let pb = &p / "down_blocks" / i;
                DownBlock::new(pb, cin, ch[i], levels[i].layers, i + 1 < n, attn, &common)
            })
            .collect();
        let mid_block = cfg.mid_block_type.as_ref().map(|_| {
            let mid_common =
                ResnetCommon { output_scale_factor: cfg.mid_block_scale_factor, ..common };
            MidBlock::new(
                &p / "mid_block",
                ch[n - 1],
                MidAttention::Cross(cross(n - 1)),
                &mid_common,
            )
        });
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = ch[n - 1];
        for i in 0..n {
            let cout = ch[n - 1 - i];
            let skip_last = ch[(n - 1).saturating_sub(i + 1)];
            // diffusers indexes the per-block lists without reversing them here (up block i uses
            // attention_head_dim[i]); the layer count and context width are reversed.
            let attn = (cfg.up_block_types[i] == crate::config::CROSS_ATTN_UP).then(|| CrossAttn {
                head_dim: levels[i].head_dim,
                context_dim: levels[n - 1 - i].cross_attention_dim,
            });
            let layers = levels[n - 1 - i].layers + 1;
            let pb = &p / "up_blocks" / i;
            up_blocks.push(UpBlock::new(
                pb,
                prev_out,
                cout,
                skip_last,
                layers,
                i + 1 < n,
                attn,
                &common,
            ));
            prev_out = cout;
        }
        let conv_norm_out = GroupNorm::new(&p / "conv_norm_out", cfg.groups(), ch[0], cfg.norm_eps);
        let conv_out = Conv2d::new(&p / "conv_out", ch[0], cfg.out_channels, cfg.conv_out_kernel);
        let trunk =
            UNetTrunk { conv_in, down_blocks, mid_block, up_blocks, conv_norm_out, conv_out };
        Ok(Self { time_embedding, trunk, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.cfg
    }

    /// One forward pass. `sample` (B, in, H, W) with H, W divisible by
    /// [`UNet2DConditionConfig::downsampling_factor`]; `timestep` 0-d or (B);
    /// `encoder_hidden_states` (B, L, cross_attention_dim); `class_labels` (B, time_embed_dim);
    /// `attention_mask` (B, L) keep-mask over the context tokens. Returns (B, out, H, W).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        class_labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cond =
            Conditioning::new(&self.cfg, encoder_hidden_states, class_labels, attention_mask)?;
        self.forward_cond(sample, timestep, &cond)
    }

    /// [`forward`](Self::forward) with conditioning prepared by [`Conditioning::new`] (for loops).
    pub fn forward_cond(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        let t = check_input(
            sample,
            timestep,
            self.cfg.sample_channels(),
            self.cfg.downsampling_factor(),
            &self.trunk.conv_in.ws,
        )?;
        let b = sample.size()[0];
        if let Some(cb) = cond.batch() {
            if cb != b {
                return Err(Error::Input(format!(
                    "conditioning has batch {cb} but sample has batch {b}"
                )));
            }
        }
        let kind = sample.kind();
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
        if let Some(c) = &cond.class_labels {
            emb = emb.f_add(&c.f_to_kind(kind)?)?;
        }
        let ctx = cond.context();
        let sample = if self.cfg.coordinate_channels > 0 {
            Tensor::f_cat(&[sample.shallow_clone(), coordinate_maps(&sample)?], 1)?
        } else {
            sample
        };
        self.trunk.forward(&sample, &emb, ctx)
    }
}
