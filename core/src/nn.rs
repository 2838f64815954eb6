//! Layers shared by several models (the prior and every UNet), written once.

use crate::Result;
use std::cell::Cell;
use tch::{Kind, Tensor, nn, nn::Module};

thread_local! {
    static BUILDING_FOR_LOAD: Cell<bool> = const { Cell::new(false) };
}

/// Builds a model whose every variable a checkpoint is about to overwrite: inside `build`, the
/// constructors below ([`linear`], [`conv2d`], [`embedding`], [`var`]) create zeros (a memset)
/// instead of random draws. Loading a Karlo-sized model this way skips billions of random
/// numbers, and leaves libtorch's global generator where the caller's seed put it.
pub fn for_loading<T>(build: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUILDING_FOR_LOAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(BUILDING_FOR_LOAD.with(|c| c.replace(true)));
    build()
}

/// `init`, or zeros inside [`for_loading`].
fn init(init: nn::Init) -> nn::Init {
    if BUILDING_FOR_LOAD.with(Cell::get) { nn::Init::Const(0.0) } else { init }
}

/// `tch::nn::linear`, initialized as configured (or zeros inside [`for_loading`]; the bias too,
/// which tch otherwise draws from a fan-in bound when `bs_init` is `None`).
pub fn linear(p: nn::Path, c_in: i64, c_out: i64, mut c: nn::LinearConfig) -> nn::Linear {
    c.ws_init = init(c.ws_init);
    if BUILDING_FOR_LOAD.with(Cell::get) {
        c.bs_init = Some(nn::Init::Const(0.0));
    }
    nn::linear(p, c_in, c_out, c)
}

/// `tch::nn::conv2d`, initialized as configured (or zeros inside [`for_loading`]).
pub fn conv2d(p: nn::Path, c_in: i64, c_out: i64, k: i64, mut c: nn::ConvConfig) -> nn::Conv2D {
    c.ws_init = init(c.ws_init);
    c.bs_init = init(c.bs_init);
    nn::conv2d(p, c_in, c_out, k, c)
}

/// `tch::nn::embedding`, initialized as configured (or zeros inside [`for_loading`]).
pub fn embedding(p: nn::Path, n: i64, dim: i64, mut c: nn::EmbeddingConfig) -> nn::Embedding {
    c.ws_init = init(c.ws_init);
    nn::embedding(p, n, dim, c)
}

/// `p.var(name, dims, init)` (or zeros inside [`for_loading`]).
pub fn var(p: &nn::Path, name: &str, dims: &[i64], i: nn::Init) -> Tensor {
    p.var(name, dims, init(i))
}

/// SiLU, computed in place when `x` is outside any autograd graph (sampling): one allocation
/// and one memory pass fewer per activation; a copy otherwise, so training is unaffected.
pub fn silu_(mut x: Tensor) -> Result<Tensor> {
    if x.requires_grad() { Ok(x.f_silu()?) } else { Ok(x.f_silu_()?) }
}

/// `x + y` (y broadcast to x's shape), in place in `x` under the same condition as [`silu_`].
pub fn add_(mut x: Tensor, y: &Tensor) -> Result<Tensor> {
    if x.requires_grad() || y.requires_grad() { Ok(x.f_add(y)?) } else { Ok(x.f_add_(y)?) }
}

/// `x` (B, C, H, W) stored channels-last (NHWC in memory, still indexed NCHW). oneDNN's CPU
/// convolutions run on this layout without reordering their input and output, and elementwise
/// ops and group norm keep it, so a UNet whose input and conv weights are channels-last stays so.
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])?)
}

/// Whether a 4-D tensor with more than one channel is stored channels-last.
pub fn is_channels_last(x: &Tensor) -> bool {
    let (size, stride) = (x.size(), x.stride());
    size.len() == 4 && size[1] > 1 && stride[1] == 1 && stride[3] == size[1]
}

/// Re-lays every 4-D variable of `vs` (the conv kernels) channels-last, in place: the models
/// built on `vs` share the variables and see the new layout. Values are unchanged.
pub fn vars_to_channels_last(vs: &nn::VarStore) -> Result<()> {
    for (_, mut v) in vs.variables() {
        if v.dim() == 4 {
            let cl = channels_last(&v.detach())?;
            tch::no_grad(|| v.set_data(&cl));
        }
    }
    Ok(())
}

/// Sinusoidal timestep features as diffusers' `get_timestep_embedding` computes them (f32):
/// `freq_k = exp(-ln(max_period) * k / (half - shift))`, `emb = [sin(t f), cos(t f)]`, swapped to
/// `[cos, sin]` when `flip_sin_to_cos`. `timesteps` is a 1-D tensor (any numeric kind) of length B;
/// the result is (B, dim) f32 on the same device.
pub fn timestep_features(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    max_period: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent = Tensor::f_arange(half, (Kind::Float, device))?
        .f_mul_scalar(-(max_period.ln()))?
        .f_div_scalar(half as f64 - downscale_freq_shift)?;
    let freqs = exponent.f_exp()?;
    let args = timesteps.f_to_kind(Kind::Float)?.f_unsqueeze(1)?.f_mul(&freqs.f_unsqueeze(0)?)?;
    let (sin, cos) = (args.f_sin()?, args.f_cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::f_cat(&[cos, sin], -1)?
    } else {
        Tensor::f_cat(&[sin, cos], -1)?
    };
    if dim % 2 == 1 { Ok(emb.f_constant_pad_nd([0, 1])?) } else { Ok(emb) }
}

/// diffusers' `TimestepEmbedding`: `linear_1 -> SiLU -> linear_2`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    /// `p` is the module's path (e.g. `time_embedding`); tensors `linear_1.*`, `linear_2.*`.
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        let linear_1 = linear(&p / "linear_1", in_dim, out_dim, Default::default());
        let linear_2 = linear(&p / "linear_2", out_dim, out_dim, Default::default());
        Self { linear_1, linear_2 }
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}

/// Splits the last dim into heads: (B, L, H*D) -> (B, H, L, D).
pub fn split_heads(x: &Tensor, heads: i64) -> Result<Tensor> {
    let (b, l, c) = x.size3()?;
    Ok(x.f_reshape([b, l, heads, c / heads])?.f_transpose(1, 2)?)
}

/// Merges heads back: (B, H, L, D) -> (B, L, H*D).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.size4()?;
    Ok(x.f_transpose(1, 2)?.f_reshape([b, l, h * d])?)
}

/// Multi-head scaled-dot-product attention on (B, L, H*D) projections, with an optional additive
/// mask broadcastable to (B, H, Lq, Lk). Uses libtorch's fused SDPA kernels.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (q, k, v) = (split_heads(q, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
    let mask = match mask {
        Some(m) => Some(m.f_to_kind(q.kind())?),
        None => None,
    };
    let out = Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false)?;
    merge_heads(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn for_loading_builds_zeros_without_drawing_and_restores() {
        let build = |vs: &nn::VarStore| {
            let p = vs.root();
            let l = linear(&p / "l", 4, 3, Default::default());
            let c = conv2d(&p / "c", 2, 3, 3, Default::default());
            let e = embedding(&p / "e", 5, 2, Default::default());
            let v = var(&p, "v", &[2], nn::Init::Randn { mean: 0.0, stdev: 1.0 });
            [l.ws, l.bs.unwrap(), c.ws, c.bs.unwrap(), e.ws, v]
        };
        tch::manual_seed(3);
        let before = Tensor::randn([4], (Kind::Float, Device::Cpu));
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let zeros = for_loading(|| build(&vs));
        // No draw was taken from the global generator, and every tensor is zero.
        assert!(Tensor::randn([4], (Kind::Float, Device::Cpu)).equal(&before));
        assert!(zeros.iter().all(|t| t.abs().sum(Kind::Float).double_value(&[]) == 0.0));
        // Outside, random initialisation is back.
        let vs = nn::VarStore::new(Device::Cpu);
        let random = build(&vs);
        let nonzero = |t: &Tensor| t.abs().sum(Kind::Float).double_value(&[]) > 0.0;
        // (tch initializes conv biases to zero: index 3 is zero either way.)
        assert!(random.iter().enumerate().all(|(i, t)| i == 3 || nonzero(t)));
    }

    #[test]
    fn timestep_features_match_formula() {
        let t = Tensor::from_slice(&[0i64, 10, 999]);
        let emb = timestep_features(&t, 8, true, 0.0, 10000.0).unwrap();
        assert_eq!(emb.size(), vec![3, 8]);
        // t = 10, k = 1: freq = exp(-ln(1e4) * 1 / 4) = 0.1; flip puts cos first.
        let cos = emb.double_value(&[1, 1]);
        let sin = emb.double_value(&[1, 5]);
        assert!((cos - (1.0f64).cos()).abs() < 1e-6 && (sin - (1.0f64).sin()).abs() < 1e-6);
        let odd = timestep_features(&t, 7, false, 1.0, 10000.0).unwrap();
        assert_eq!(odd.size(), vec![3, 7]);
    }

    #[test]
    fn attention_matches_naive_softmax() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let (q, k, v) = (
            Tensor::randn([2, 3, 8], opts),
            Tensor::randn([2, 5, 8], opts),
            Tensor::randn([2, 5, 8], opts),
        );
        let mask = Tensor::zeros([2, 1, 1, 5], opts);
        let _ = mask.narrow(3, 4, 1).fill_(-10000.0);
        let out = multi_head_attention(&q, &k, &v, 2, Some(&mask)).unwrap();
        let (qh, kh, vh) =
            (split_heads(&q, 2).unwrap(), split_heads(&k, 2).unwrap(), split_heads(&v, 2).unwrap());
        let w = (qh.matmul(&kh.transpose(-1, -2)) / 2f64 + &mask).softmax(-1, Kind::Float);
        let naive = merge_heads(&w.matmul(&vh)).unwrap();
        assert!(out.allclose(&naive, 1e-5, 1e-5, false));
    }

    #[test]
    fn channels_last_keeps_values_and_conv_results() {
        let opts = (Kind::Float, Device::Cpu);
        let vs = nn::VarStore::new(Device::Cpu);
        let conv =
            conv2d(vs.root() / "c", 4, 8, 3, nn::ConvConfig { padding: 1, ..Default::default() });
        let bias = vs.root().var("b", &[8], nn::Init::Const(0.5));
        let x = Tensor::randn([2, 4, 6, 6], opts);
        let before = x.conv2d(&conv.ws, conv.bs.as_ref(), [1, 1], [1, 1], [1, 1], 1);
        let w0 = conv.ws.copy();
        assert!(!is_channels_last(&conv.ws));
        vars_to_channels_last(&vs).unwrap();
        // The model's handle sees the new layout; 1-D variables are left alone.
        assert!(is_channels_last(&conv.ws) && conv.ws.equal(&w0));
        assert_eq!(bias.stride(), [1]);
        let xc = channels_last(&x).unwrap();
        assert!(is_channels_last(&xc) && xc.equal(&x));
        let after = xc.conv2d(&conv.ws, conv.bs.as_ref(), [1, 1], [1, 1], [1, 1], 1);
        assert!(after.allclose(&before, 1e-5, 1e-5, false));
        // Without autograd the in-place helpers give the plain results.
        let y = Tensor::randn([2, 8, 6, 6], opts);
        assert!(silu_(y.copy()).unwrap().equal(&y.silu()));
        assert!(
            add_(y.copy(), &bias.detach().view([1, 8, 1, 1]))
                .unwrap()
                .equal(&(&y + bias.detach().view([1, 8, 1, 1])))
        );
    }
}
