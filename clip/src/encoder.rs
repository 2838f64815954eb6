//! The pre-LayerNorm transformer layer that CLIP's text and vision towers share.

use crate::config::Activation;
use crate::{Error, Result};
use tch::{Kind, Tensor, nn, nn::Module};

/// Sizes of one encoder stack (the fields the text and vision configs have in common).
#[derive(Debug, Clone, Copy)]
pub struct EncoderDims {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_hidden_layers: i64,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

/// Initialisation close to transformers' `_init_weights`, so a freshly built model trains sensibly.
fn linear(p: nn::Path, i: i64, o: i64, std: f64) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    unclip_core::nn::linear(p, i, o, cfg)
}

pub(crate) fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    unclip_core::nn::layer_norm(p, dim, nn::LayerNormConfig { eps, ..Default::default() })
}

/// `self_attn`: q/k/v/out projections with bias; scaled-dot-product attention.
#[derive(Debug)]
pub struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
}

impl Attention {
    pub fn new(p: nn::Path, d: &EncoderDims) -> Self {
        let h = d.hidden_size;
        let in_std = (h as f64).powf(-0.5) * ((2 * d.num_hidden_layers) as f64).powf(-0.5);
        let out_std = (h as f64).powf(-0.5);
        Self {
            q_proj: linear(&p / "q_proj", h, h, in_std),
            k_proj: linear(&p / "k_proj", h, h, in_std),
            v_proj: linear(&p / "v_proj", h, h, in_std),
            out_proj: linear(&p / "out_proj", h, h, out_std),
            heads: d.num_attention_heads,
        }
    }

    /// `mask` is additive, broadcastable to (B, heads, L, L).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (q, k, v) = (self.q_proj.forward(x), self.k_proj.forward(x), self.v_proj.forward(x));
        let out = unclip_core::nn::multi_head_attention(&q, &k, &v, self.heads, mask)?;
        Ok(self.out_proj.forward(&out))
    }
}

/// `mlp`: fc1 -> activation -> fc2.
#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
    activation: Activation,
}

impl Mlp {
    pub fn new(p: nn::Path, d: &EncoderDims) -> Self {
        let h = d.hidden_size;
        let fc_std = ((2 * h) as f64).powf(-0.5);
        let in_std = (h as f64).powf(-0.5) * ((2 * d.num_hidden_layers) as f64).powf(-0.5);
        Self {
            fc1: linear(&p / "fc1", h, d.intermediate_size, fc_std),
            fc2: linear(&p / "fc2", d.intermediate_size, h, in_std),
            activation: d.activation,
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.activation.forward(&self.fc1.forward(x)))
    }
}

/// `encoder.layers.{i}`: `x += attn(LN1 x); x += mlp(LN2 x)`.
#[derive(Debug)]
pub struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: nn::LayerNorm,
    mlp: Mlp,
    layer_norm2: nn::LayerNorm,
}

impl EncoderLayer {
    pub fn new(p: nn::Path, d: &EncoderDims) -> Self {
        Self {
            self_attn: Attention::new(&p / "self_attn", d),
            layer_norm1: layer_norm(&p / "layer_norm1", d.hidden_size, d.layer_norm_eps),
            mlp: Mlp::new(&p / "mlp", d),
            layer_norm2: layer_norm(&p / "layer_norm2", d.hidden_size, d.layer_norm_eps),
        }
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x), mask)?;
        Ok(&x + self.mlp.forward(&self.layer_norm2.forward(&x)))
    }
}

/// `encoder`: the stack of layers.
#[derive(Debug)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub fn new(p: nn::Path, d: &EncoderDims) -> Self {
        let l = &p / "layers";
        Self { layers: (0..d.num_hidden_layers).map(|i| EncoderLayer::new(&l / i, d)).collect() }
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x, mask)?;
        }
        Ok(x)
    }
}

/// The most negative finite value of `kind`, as transformers fills masked logits.
pub(crate) fn mask_value(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// The bias-free projection of a tower's pooled output into the shared embedding space
/// (`text_projection` / `visual_projection`), initialised as transformers does.
pub fn projection(p: nn::Path, hidden_size: i64, projection_dim: i64) -> Result<nn::Linear> {
    if projection_dim <= 0 {
        return Err(Error::Config(format!(
            "projection_dim must be positive, found {projection_dim}"
        )));
    }
    let ws_init = nn::Init::Randn { mean: 0.0, stdev: (hidden_size as f64).powf(-0.5) };
    let lc = nn::LinearConfig { ws_init, bs_init: None, bias: false };
    Ok(unclip_core::nn::linear(p, hidden_size, projection_dim, lc))
}
