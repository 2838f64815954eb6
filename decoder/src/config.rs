//! The `config.json` files of the decoder components, as diffusers writes them.
//!
//! Only the subset of diffusers' options that Karlo uses (and that the tiny test models use) is
//! implemented; [`UNet2DConditionConfig::validate`] and friends refuse everything else with a
//! [`Error::Config`] naming the option, so an unsupported checkpoint fails loudly instead of
//! running a different network. Keys this crate does not know (`_class_name`, options of blocks it
//! never builds) are ignored.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// diffusers accepts either one value for every block or one value per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; errors when a list has the wrong length.
    pub fn expand(&self, n: usize, what: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(vs) if vs.len() == n => Ok(vs.clone()),
            PerBlock::Each(vs) => Err(Error::Config(format!(
                "{what} has {} entries but there are {n} blocks",
                vs.len()
            ))),
        }
    }
}

/// `sample_size`: an int or `[height, width]` (unused by the forward pass; kept for sampling).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(i64),
    Rect([i64; 2]),
}

/// A `sample_size` of zero or below is refused naming the key (sampling would otherwise fail
/// later with a bare "sample size 0x0").
fn check_sample_size(s: Option<SampleSize>) -> Result<()> {
    match s.map(SampleSize::hw) {
        Some((h, w)) if h <= 0 || w <= 0 => Err(Error::Config(format!(
            "sample_size must be positive, found {h}x{w} (key sample_size)"
        ))),
        _ => Ok(()),
    }
}

impl SampleSize {
    /// `(height, width)`.
    pub fn hw(self) -> (i64, i64) {
        match self {
            SampleSize::Square(s) => (s, s),
            SampleSize::Rect([h, w]) => (h, w),
        }
    }
}

/// Down-block kinds this crate builds.
pub const RESNET_DOWN: &str = "ResnetDownsampleBlock2D";
pub const CROSS_ATTN_DOWN: &str = "SimpleCrossAttnDownBlock2D";
/// Up-block kinds this crate builds.
pub const RESNET_UP: &str = "ResnetUpsampleBlock2D";
pub const CROSS_ATTN_UP: &str = "SimpleCrossAttnUpBlock2D";
/// Mid-block kinds.
pub const MID_CROSS_ATTN: &str = "UNetMidBlock2DSimpleCrossAttn";
pub const MID_PLAIN: &str = "UNetMidBlock2D";

/// How the time embedding enters a ResNet block (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeNorm {
    /// `h + proj(emb)` before the second norm (super-res UNets).
    Default,
    /// `norm2(h) * (1 + scale) + shift` (the decoder).
    ScaleShift,
}

impl TimeNorm {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "default" => Ok(TimeNorm::Default),
            "scale_shift" => Ok(TimeNorm::ScaleShift),
            other => Err(Error::Config(format!(
                "resnet_time_scale_shift {other:?} is not supported (only \"default\" and \"scale_shift\")"
            ))),
        }
    }
}

fn check_act(act: &str) -> Result<()> {
    match act {
        "silu" | "swish" => Ok(()),
        other => Err(Error::Config(format!("act_fn {other:?} is not supported (only silu)"))),
    }
}

fn unsupported<T: std::fmt::Debug>(name: &str, value: &Option<T>, bad: &mut Vec<String>) {
    if let Some(v) = value {
        bad.push(format!("{name} = {v:?}"));
    }
}

fn finish(bad: Vec<String>) -> Result<()> {
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!("unsupported option(s): {}", bad.join(", "))))
    }
}

fn check_groups(channels: &[i64], groups: i64, what: &str) -> Result<()> {
    if groups <= 0 {
        return Err(Error::Config(format!("{what} must be positive, got {groups}")));
    }
    for &c in channels {
        if c <= 0 || c % groups != 0 {
            return Err(Error::Config(format!(
                "block_out_channels {channels:?}: {c} is not divisible by {what} = {groups}"
            )));
        }
    }
    Ok(())
}

fn d_in4() -> i64 {
    4
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<i64> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_kernel() -> i64 {
    3
}
fn d_layers2() -> PerBlock<i64> {
    PerBlock::One(2)
}
fn d_cross() -> PerBlock<i64> {
    PerBlock::One(1280)
}
fn d_head8() -> PerBlock<i64> {
    PerBlock::One(8)
}
fn d_false_each() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_cond_down() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        .map(String::from)
        .to_vec()
}
fn d_cond_up() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        .map(String::from)
        .to_vec()
}
fn d_cond_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_cond_channels() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}

/// diffusers' `UNet2DConditionModel` config (the Karlo decoder). Defaults are diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    #[serde(default = "d_in4")]
    pub in_channels: i64,
    #[serde(default = "d_in4")]
    pub out_channels: i64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_cond_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_cond_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_cond_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_each")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_cond_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers2")]
    pub layers_per_block: PerBlock<i64>,
    #[serde(default = "d_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<i64>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<i64>,
    /// For the SimpleCrossAttn blocks this really is the per-head channel count.
    #[serde(default = "d_head8")]
    pub attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<serde_json::Value>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: i64,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: i64,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    // Options this crate does not implement: present only so a non-default value is refused.
    #[serde(default)]
    pub encoder_hid_dim: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<serde_json::Value>,
    #[serde(default)]
    pub addition_embed_type: Option<serde_json::Value>,
    #[serde(default)]
    pub num_class_embeds: Option<serde_json::Value>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<serde_json::Value>,
    #[serde(default)]
    pub timestep_post_act: Option<serde_json::Value>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<serde_json::Value>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<serde_json::Value>,
    #[serde(default)]
    pub cross_attention_norm: Option<serde_json::Value>,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// This crate's extension (diffusers ignores the key): the last `coordinate_channels` of
    /// `in_channels` are not sampled but filled by the model with the pixel coordinates (x, then
    /// y, from -1 to 1), so a small UNet knows where "top left" is without learning it from the
    /// zero padding. 0 (absent) or 2.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub coordinate_channels: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Everything about one UNet level that the builders need, resolved from a config.
#[derive(Debug, Clone)]
pub(crate) struct Level {
    pub out_channels: i64,
    pub layers: i64,
    pub cross_attention: bool,
    /// Channels per attention head (SimpleCrossAttn blocks).
    pub head_dim: i64,
    pub cross_attention_dim: i64,
}

impl UNet2DConditionConfig {
    /// Parses a config.json text and validates it.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Time embedding width (`time_embedding_dim` or 4 x the first block's channels).
    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    pub fn time_norm(&self) -> Result<TimeNorm> {
        TimeNorm::parse(&self.resnet_time_scale_shift)
    }

    pub fn groups(&self) -> i64 {
        self.norm_num_groups.unwrap_or(32)
    }

    /// Channels of the sample the UNet denoises: `in_channels` less the coordinate channels.
    pub fn sample_channels(&self) -> i64 {
        self.in_channels - self.coordinate_channels
    }

    /// Total spatial downsampling factor (2 per level but the last).
    pub fn downsampling_factor(&self) -> i64 {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// Whether this UNet takes an additive class embedding (Karlo: the CLIP embedding term).
    pub fn has_class_embedding(&self) -> bool {
        self.class_embed_type.is_some()
    }

    /// Refuses every option this crate does not implement, naming it.
    pub fn validate(&self) -> Result<()> {
        check_sample_size(self.sample_size)?;
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::Config(format!(
                "norm_eps must be finite and > 0, found {} (key norm_eps)",
                self.norm_eps
            )));
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::Config("block_out_channels is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "{} down_block_types and {} up_block_types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let mut bad = Vec::new();
        for t in &self.down_block_types {
            if t != RESNET_DOWN && t != CROSS_ATTN_DOWN {
                bad.push(format!("down block type {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if t != RESNET_UP && t != CROSS_ATTN_UP {
                bad.push(format!("up block type {t:?}"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some(MID_CROSS_ATTN) | None => {}
            Some(t) => bad.push(format!("mid_block_type {t:?}")),
        }
        match self.class_embed_type.as_deref() {
            None | Some("identity") => {}
            Some(t) => bad.push(format!("class_embed_type {t:?}")),
        }
        if self.time_embedding_type != "positional" {
            bad.push(format!("time_embedding_type {:?}", self.time_embedding_type));
        }
        if self.dropout != 0.0 {
            bad.push(format!("dropout = {}", self.dropout));
        }
        if self.norm_num_groups.is_none() {
            bad.push("norm_num_groups = null".into());
        }
        if self.only_cross_attention.expand(n, "only_cross_attention")?.iter().any(|&b| b)
            || self.mid_block_only_cross_attention == Some(true)
        {
            bad.push("only_cross_attention = true".into());
        }
        if self.class_embeddings_concat {
            bad.push("class_embeddings_concat = true".into());
        }
        if self.dual_cross_attention {
            bad.push("dual_cross_attention = true".into());
        }
        unsupported("num_attention_heads", &self.num_attention_heads, &mut bad);
        unsupported("encoder_hid_dim", &self.encoder_hid_dim, &mut bad);
        unsupported("encoder_hid_dim_type", &self.encoder_hid_dim_type, &mut bad);
        unsupported("addition_embed_type", &self.addition_embed_type, &mut bad);
        unsupported("num_class_embeds", &self.num_class_embeds, &mut bad);
        unsupported("time_embedding_act_fn", &self.time_embedding_act_fn, &mut bad);
        unsupported("timestep_post_act", &self.timestep_post_act, &mut bad);
        unsupported("time_cond_proj_dim", &self.time_cond_proj_dim, &mut bad);
        unsupported(
            "projection_class_embeddings_input_dim",
            &self.projection_class_embeddings_input_dim,
            &mut bad,
        );
        unsupported("cross_attention_norm", &self.cross_attention_norm, &mut bad);
        finish(bad)?;
        check_act(&self.act_fn)?;
        self.time_norm()?;
        check_groups(&self.block_out_channels, self.groups(), "norm_num_groups")?;
        for (name, k) in
            [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)]
        {
            if k <= 0 || k % 2 == 0 {
                return Err(Error::Config(format!("{name} must be odd and positive, got {k}")));
            }
        }
        if self.in_channels <= 0 || self.out_channels <= 0 || self.time_embed_dim() <= 0 {
            return Err(Error::Config("channel counts must be positive".into()));
        }
        if !matches!(self.coordinate_channels, 0 | 2) || self.sample_channels() <= 0 {
            return Err(Error::Config(format!(
                "coordinate_channels must be 0 or 2 and less than in_channels {}, got {}",
                self.in_channels, self.coordinate_channels
            )));
        }
        for level in self.levels()? {
            if level.layers <= 0 {
                return Err(Error::Config(format!(
                    "layers_per_block must be positive, got {}",
                    level.layers
                )));
            }
            if level.head_dim <= 0 || level.out_channels % level.head_dim != 0 {
                return Err(Error::Config(format!(
                    "attention_head_dim {} does not divide {} channels",
                    level.head_dim, level.out_channels
                )));
            }
            if level.cross_attention_dim <= 0 {
                return Err(Error::Config("cross_attention_dim must be positive".into()));
            }
        }
        // Up block i takes attention_head_dim[i] (not reversed, as diffusers does) for its
        // block_out_channels[n - 1 - i] channels.
        let levels = self.levels()?;
        for (i, t) in self.up_block_types.iter().enumerate() {
            let (d, c) = (levels[i].head_dim, self.block_out_channels[n - 1 - i]);
            if t == CROSS_ATTN_UP && c % d != 0 {
                return Err(Error::Config(format!(
                    "attention_head_dim {d} of up block {i} does not divide its {c} channels"
                )));
            }
        }
        Ok(())
    }

    /// Per-level settings, down-block order.
    pub(crate) fn levels(&self) -> Result<Vec<Level>> {
        let n = self.block_out_channels.len();
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let heads = self.attention_head_dim.expand(n, "attention_head_dim")?;
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        Ok((0..n)
            .map(|i| Level {
                out_channels: self.block_out_channels[i],
                layers: layers[i],
                cross_attention: self.down_block_types[i] == CROSS_ATTN_DOWN,
                head_dim: heads[i],
                cross_attention_dim: cross[i],
            })
            .collect())
    }
}

fn d_in3() -> i64 {
    3
}
fn d_layers2_int() -> i64 {
    2
}
fn d_head8_opt() -> Option<i64> {
    Some(8)
}
fn d_plain_down() -> Vec<String> {
    ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
        .map(String::from)
        .to_vec()
}
fn d_plain_up() -> Vec<String> {
    ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"].map(String::from).to_vec()
}
fn d_plain_mid() -> Option<String> {
    Some(MID_PLAIN.into())
}
fn d_plain_channels() -> Vec<i64> {
    vec![224, 448, 672, 896]
}
fn d_groups_int() -> i64 {
    32
}

/// diffusers' `UNet2DModel` config (Karlo's super-resolution UNets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConfig {
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    #[serde(default = "d_in3")]
    pub in_channels: i64,
    #[serde(default = "d_in3")]
    pub out_channels: i64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default = "d_plain_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_plain_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_plain_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_plain_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers2_int")]
    pub layers_per_block: i64,
    #[serde(default = "d_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_head8_opt")]
    pub attention_head_dim: Option<i64>,
    #[serde(default = "d_groups_int")]
    pub norm_num_groups: i64,
    #[serde(default)]
    pub attn_norm_num_groups: Option<i64>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_true")]
    pub add_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<serde_json::Value>,
}

impl UNet2DConfig {
    /// Parses a config.json text and validates it.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    pub fn time_norm(&self) -> Result<TimeNorm> {
        TimeNorm::parse(&self.resnet_time_scale_shift)
    }

    pub fn downsampling_factor(&self) -> i64 {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    pub fn has_class_embedding(&self) -> bool {
        self.class_embed_type.is_some()
    }

    /// Whether the mid block has its self-attention layer.
    pub fn mid_attention(&self) -> bool {
        self.mid_block_type.is_some() && self.add_attention
    }

    /// GroupNorm groups of the mid-block attention; `None`: no norm (diffusers' rule: the resnet
    /// groups with `default` time conditioning, none otherwise, unless set explicitly).
    pub fn mid_attention_groups(&self) -> Option<i64> {
        match self.attn_norm_num_groups {
            Some(g) => Some(g),
            None if self.resnet_time_scale_shift == "default" => Some(self.norm_num_groups),
            None => None,
        }
    }

    /// Channels per head of the mid-block attention.
    pub fn mid_head_dim(&self) -> i64 {
        self.attention_head_dim.unwrap_or(*self.block_out_channels.last().unwrap_or(&1))
    }

    pub fn validate(&self) -> Result<()> {
        check_sample_size(self.sample_size)?;
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::Config(format!(
                "norm_eps must be finite and > 0, found {} (key norm_eps)",
                self.norm_eps
            )));
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::Config("block_out_channels is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "{} down_block_types and {} up_block_types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let mut bad = Vec::new();
        for t in &self.down_block_types {
            if t != RESNET_DOWN {
                bad.push(format!("down block type {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if t != RESNET_UP {
                bad.push(format!("up block type {t:?}"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some(MID_PLAIN) | None => {}
            Some(t) => bad.push(format!("mid_block_type {t:?}")),
        }
        match self.class_embed_type.as_deref() {
            None | Some("identity") => {}
            Some(t) => bad.push(format!("class_embed_type {t:?}")),
        }
        if self.time_embedding_type != "positional" {
            bad.push(format!("time_embedding_type {:?}", self.time_embedding_type));
        }
        if self.dropout != 0.0 {
            bad.push(format!("dropout = {}", self.dropout));
        }
        unsupported("num_class_embeds", &self.num_class_embeds, &mut bad);
        finish(bad)?;
        check_act(&self.act_fn)?;
        self.time_norm()?;
        check_groups(&self.block_out_channels, self.norm_num_groups, "norm_num_groups")?;
        if self.layers_per_block <= 0 {
            return Err(Error::Config("layers_per_block must be positive".into()));
        }
        if self.in_channels <= 0 || self.out_channels <= 0 || self.time_embed_dim() <= 0 {
            return Err(Error::Config("channel counts must be positive".into()));
        }
        if self.mid_attention() {
            let c = *self.block_out_channels.last().unwrap_or(&0);
            let d = self.mid_head_dim();
            if d <= 0 || c % d != 0 {
                return Err(Error::Config(format!(
                    "attention_head_dim {d} does not divide the mid block's {c} channels"
                )));
            }
            if let Some(g) = self.mid_attention_groups() {
                check_groups(&[c], g, "attn_norm_num_groups")?;
            }
        }
        Ok(())
    }
}

fn d_extra_tokens() -> i64 {
    4
}
fn d_clip_dim() -> i64 {
    768
}

/// `UnCLIPTextProjModel` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextProjConfig {
    #[serde(default = "d_extra_tokens")]
    pub clip_extra_context_tokens: i64,
    #[serde(default = "d_clip_dim")]
    pub clip_embeddings_dim: i64,
    pub time_embed_dim: i64,
    pub cross_attention_dim: i64,
}

impl TextProjConfig {
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("clip_extra_context_tokens", self.clip_extra_context_tokens),
            ("clip_embeddings_dim", self.clip_embeddings_dim),
            ("time_embed_dim", self.time_embed_dim),
            ("cross_attention_dim", self.cross_attention_dim),
        ] {
            if v <= 0 {
                return Err(Error::Config(format!("{name} must be positive, got {v}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unsupported_blocks_and_options() {
        let base = r#"{"block_out_channels": [32, 64],
            "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "attention_head_dim": 4,
            "class_embed_type": "identity", "resnet_time_scale_shift": "scale_shift"}"#;
        let cfg = UNet2DConditionConfig::from_json_str(base).unwrap();
        assert_eq!(cfg.time_embed_dim(), 128);
        assert_eq!(cfg.downsampling_factor(), 2);

        let e = UNet2DConditionConfig::from_json_str(
            &base.replace("\"SimpleCrossAttnDownBlock2D\"", "\"CrossAttnDownBlock2D\""),
        )
        .unwrap_err();
        assert!(e.to_string().contains("CrossAttnDownBlock2D"), "{e}");

        let e = UNet2DConditionConfig::from_json_str(
            &base.replace("}", r#", "addition_embed_type": "text", "dropout": 0.1}"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("addition_embed_type") && e.to_string().contains("dropout"));

        let e = UNet2DConditionConfig::from_json_str(
            &base.replace("\"attention_head_dim\": 4", "\"attention_head_dim\": 5"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("attention_head_dim"), "{e}");

        let e = UNet2DConditionConfig::from_json_str(&base.replace("[32, 64]", "[32, 64, 96]"))
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)));

        let e = UNet2DConfig::from_json_str(r#"{"block_out_channels": [32], "down_block_types": ["AttnDownBlock2D"], "up_block_types": ["ResnetUpsampleBlock2D"]}"#).unwrap_err();
        assert!(e.to_string().contains("AttnDownBlock2D"), "{e}");
        assert!(
            TextProjConfig::from_json_str(r#"{"time_embed_dim": 0, "cross_attention_dim": 8}"#)
                .is_err()
        );
    }

    #[test]
    fn coordinate_channels_are_checked_and_only_written_when_used() {
        let base = r#"{"block_out_channels": [32, 64], "in_channels": 5,
            "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "attention_head_dim": 4,
            "class_embed_type": "identity", "resnet_time_scale_shift": "scale_shift"}"#;
        let plain = UNet2DConditionConfig::from_json_str(base).unwrap();
        assert_eq!((plain.coordinate_channels, plain.sample_channels()), (0, 5));
        // Karlo's configs are written back without the key.
        assert!(!serde_json::to_string(&plain).unwrap().contains("coordinate_channels"));
        let with = |n: &str| base.replace("}", &format!(r#", "coordinate_channels": {n}}}"#));
        let cfg = UNet2DConditionConfig::from_json_str(&with("2")).unwrap();
        assert_eq!(cfg.sample_channels(), 3);
        assert!(serde_json::to_string(&cfg).unwrap().contains(r#""coordinate_channels":2"#));
        for bad in ["1", "3", "-2"] {
            let e = UNet2DConditionConfig::from_json_str(&with(bad)).unwrap_err();
            assert!(e.to_string().contains("coordinate_channels"), "{bad}: {e}");
        }
        let e = UNet2DConditionConfig::from_json_str(
            &with("2").replace(r#""in_channels": 5"#, r#""in_channels": 2"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("coordinate_channels"), "{e}");
    }
}
