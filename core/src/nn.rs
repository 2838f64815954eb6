//! Layers shared by several models (the prior and every UNet), written once.

use crate::{Error, Result};
use std::cell::{Cell, RefCell};
use tch::{Kind, Tensor, nn, nn::Module};

/// How the constructors below create variables.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As configured (random draws): a model trained from scratch.
    Init,
    /// Zeros: a checkpoint is about to overwrite every variable.
    Load,
    /// Nothing real: count the elements each variable would have and hand back tiny stand-ins.
    Measure,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Init) };
    /// Elements counted in [`Mode::Measure`]; `None` once a size overflowed.
    static MEASURED: Cell<Option<u128>> = const { Cell::new(Some(0)) };
    /// The first problem met while measuring (a negative or overflowing shape).
    static PROBLEM: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Name and shape of every variable measured.
    static LAYOUT: RefCell<Vec<(String, Vec<i64>)>> = const { RefCell::new(Vec::new()) };
}

/// Most variables a measured model may have (Karlo's decoder has 716): a config asking for
/// millions of layers is refused rather than listed.
pub const MAX_VARIABLES: usize = 100_000;

/// Unwinds out of a [`measure`] that has seen enough (see `count`), without the panic hook.
struct StopMeasuring;

/// What [`measure`] found: every variable's checkpoint name and shape, and their total size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub tensors: Vec<(String, Vec<i64>)>,
    /// Elements of all tensors together.
    pub elements: u128,
}

fn mode() -> Mode {
    MODE.with(Cell::get)
}

/// Runs `f` with the constructors in `m`, restoring the previous mode even on panic.
fn with_mode<T>(m: Mode, f: impl FnOnce() -> T) -> T {
    struct Restore(Mode);
    impl Drop for Restore {
        fn drop(&mut self) {
            MODE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(MODE.with(|c| c.replace(m)));
    f()
}

/// Records the variable `name` of shape `dims` under `p` (name, shape, elements).
fn count(p: &nn::Path, name: &str, dims: &[i64]) {
    let n = crate::memory::elements(dims);
    let full = p.path(name);
    let problem = |m: String| {
        PROBLEM.with(|p| {
            p.borrow_mut().get_or_insert(m);
        })
    };
    if n.is_none() {
        problem(format!("{full} of shape {dims:?}, whose size overflows"));
    }
    MEASURED.with(|c| c.set(c.get().zip(n).and_then(|(a, b)| a.checked_add(b))));
    let stop = LAYOUT.with(|l| {
        let mut l = l.borrow_mut();
        if l.len() < MAX_VARIABLES {
            l.push((full, dims.to_vec()));
            false
        } else {
            problem(format!("more than {MAX_VARIABLES} variables"));
            true
        }
    });
    if stop {
        // A config with millions of layers: stop now rather than build stand-ins for all.
        std::panic::resume_unwind(Box::new(StopMeasuring));
    }
}

/// Turns a panic of a model constructor (tch unwraps its allocation errors) into an error.
fn guard<T, E: From<Error>>(
    what: &str,
    build: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)) {
        Ok(r) => r,
        Err(payload) if payload.is::<StopMeasuring>() => {
            let message = PROBLEM.with(|p| p.borrow().clone()).unwrap_or_default();
            Err(Error::InvalidArgument(format!("the config implies {message}")).into())
        }
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the constructor panicked".into());
            Err(Error::Allocation { what: what.to_string(), message }.into())
        }
    }
}

/// Builds a model whose every variable a checkpoint is about to overwrite: inside `build`, the
/// constructors below ([`linear`], [`conv2d`], [`embedding`], [`var`]) create zeros (a memset)
/// instead of random draws. Loading a Karlo-sized model this way skips billions of random
/// numbers, and leaves libtorch's global generator where the caller's seed put it. An allocation
/// that fails inside tch (which unwraps it) comes back as [`Error::Allocation`]. Size the model
/// first with [`measure`] when its config comes from a user.
pub fn for_loading<T, E: From<Error>>(
    build: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    with_mode(Mode::Load, || guard("the model's variables", build))
}

/// Builds a freshly initialised model, an allocation failure inside tch coming back as
/// [`Error::Allocation`] naming `what`.
pub fn guarded<T, E: From<Error>>(
    what: &str,
    build: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    guard(what, build)
}

/// The number of parameter elements `build` would create, found without allocating them: the
/// constructors below count each variable's shape (overflow-checked) and hand back 1-element
/// stand-ins, so a config asking for 10^12 channels is sized, not allocated. `build` must create
/// its variables through this module's constructors (and its buffers through [`buffer`]); what
/// it returns is thrown away. A shape that overflows is an error naming it.
pub fn measure<T, E: From<Error>>(
    build: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<Layout, E> {
    MEASURED.with(|c| c.set(Some(0)));
    PROBLEM.with(|p| p.borrow_mut().take());
    LAYOUT.with(|l| l.borrow_mut().clear());
    let built = with_mode(Mode::Measure, || guard("a stand-in while sizing the model", build));
    let total = MEASURED.with(|c| c.replace(Some(0)));
    let problem = PROBLEM.with(|p| p.borrow_mut().take());
    let tensors = LAYOUT.with(|l| std::mem::take(&mut *l.borrow_mut()));
    drop(built?);
    match (total, problem) {
        (Some(elements), None) => Ok(Layout { tensors, elements }),
        (_, p) => Err(Error::InvalidArgument(format!(
            "the config implies {}",
            p.unwrap_or_else(|| "parameters whose total size overflows".into())
        ))
        .into()),
    }
}

/// Whether the constructors are sizing a model (see [`measure`]): a constructor that computes a
/// buffer itself skips it then.
pub fn measuring() -> bool {
    mode() == Mode::Measure
}

/// A buffer a model computes at construction (a mask, a table): refused with the memory it
/// would need when `dims` does not fit on `device`, a stand-in while [`measure`]-ing, else `make`.
pub fn buffer(
    what: &str,
    dims: &[i64],
    kind: Kind,
    device: tch::Device,
    make: impl FnOnce() -> std::result::Result<Tensor, tch::TchError>,
) -> Result<Tensor> {
    crate::memory::ensure_tensor_fits(what, dims, kind, device)?;
    if measuring() {
        return Ok(Tensor::f_zeros([], (kind, tch::Device::Cpu))?);
    }
    Ok(make()?)
}

/// `init`, or zeros inside [`for_loading`].
fn init(init: nn::Init) -> nn::Init {
    if mode() == Mode::Load { nn::Init::Const(0.0) } else { init }
}

/// `tch::nn::linear`, initialized as configured (or zeros inside [`for_loading`]; the bias too,
/// which tch otherwise draws from a fan-in bound when `bs_init` is `None`).
pub fn linear(p: nn::Path, c_in: i64, c_out: i64, mut c: nn::LinearConfig) -> nn::Linear {
    match mode() {
        Mode::Measure => {
            count(&p, "weight", &[c_out, c_in]);
            if c.bias {
                count(&p, "bias", &[c_out]);
            }
            let zero = nn::Init::Const(0.0);
            nn::linear(p, 1, 1, nn::LinearConfig { ws_init: zero, bs_init: Some(zero), ..c })
        }
        Mode::Load => {
            c.ws_init = nn::Init::Const(0.0);
            c.bs_init = Some(nn::Init::Const(0.0));
            nn::linear(p, c_in, c_out, c)
        }
        Mode::Init => nn::linear(p, c_in, c_out, c),
    }
}

/// `tch::nn::conv2d`, initialized as configured (or zeros inside [`for_loading`]).
pub fn conv2d(p: nn::Path, c_in: i64, c_out: i64, k: i64, mut c: nn::ConvConfig) -> nn::Conv2D {
    if mode() == Mode::Measure {
        count(&p, "weight", &[c_out, if c.groups > 0 { c_in / c.groups } else { c_in }, k, k]);
        if c.bias {
            count(&p, "bias", &[c_out]);
        }
        let zero = nn::Init::Const(0.0);
        return nn::conv2d(
            p,
            1,
            1,
            1,
            nn::ConvConfig { groups: 1, ws_init: zero, bs_init: zero, ..c },
        );
    }
    c.ws_init = init(c.ws_init);
    c.bs_init = init(c.bs_init);
    nn::conv2d(p, c_in, c_out, k, c)
}

/// `tch::nn::embedding`, initialized as configured (or zeros inside [`for_loading`]).
pub fn embedding(p: nn::Path, n: i64, dim: i64, mut c: nn::EmbeddingConfig) -> nn::Embedding {
    if mode() == Mode::Measure {
        count(&p, "weight", &[n, dim]);
        return nn::embedding(p, 1, 1, nn::EmbeddingConfig { ws_init: nn::Init::Const(0.0), ..c });
    }
    c.ws_init = init(c.ws_init);
    nn::embedding(p, n, dim, c)
}

/// `tch::nn::layer_norm` over the last `dim` features (weight and bias), sized by [`measure`].
pub fn layer_norm(p: nn::Path, dim: i64, c: nn::LayerNormConfig) -> nn::LayerNorm {
    if mode() == Mode::Measure {
        if c.elementwise_affine {
            count(&p, "weight", &[dim]);
            count(&p, "bias", &[dim]);
        }
        return nn::layer_norm(p, vec![1], c);
    }
    nn::layer_norm(p, vec![dim], c)
}

/// `tch::nn::group_norm`, sized by [`measure`].
pub fn group_norm(
    p: nn::Path,
    groups: i64,
    channels: i64,
    c: nn::GroupNormConfig,
) -> nn::GroupNorm {
    if mode() == Mode::Measure {
        if c.affine {
            count(&p, "weight", &[channels]);
            count(&p, "bias", &[channels]);
        }
        return nn::group_norm(p, 1, 1, c);
    }
    nn::group_norm(p, groups, channels, c)
}

/// A stand-in variable of shape `dims` that owns one element (a broadcast view), for [`measure`].
fn stand_in(p: &nn::Path, name: &str, dims: &[i64]) -> Tensor {
    count(p, name, dims);
    // One scalar (4 bytes); a shape libtorch refuses keeps the scalar (the count has the size).
    match Tensor::f_zeros([], (Kind::Float, tch::Device::Cpu)) {
        Ok(one) => match crate::memory::elements(dims) {
            Some(_) => one.f_expand(dims, false).unwrap_or(one),
            None => one,
        },
        Err(_) => Tensor::new(),
    }
}

/// `p.var(name, dims, init)` (or zeros inside [`for_loading`]).
pub fn var(p: &nn::Path, name: &str, dims: &[i64], i: nn::Init) -> Tensor {
    if mode() == Mode::Measure {
        return stand_in(p, name, dims);
    }
    p.var(name, dims, init(i))
}

/// A variable that is stored in checkpoints but not trained (statistics, running buffers):
/// `value` everywhere (zeros inside [`for_loading`], the checkpoint overwrites it).
pub fn var_no_train(p: &nn::Path, name: &str, dims: &[i64], value: f64) -> Tensor {
    match mode() {
        Mode::Measure => stand_in(p, name, dims),
        Mode::Load => p.zeros_no_train(name, dims),
        Mode::Init if value == 0.0 => p.zeros_no_train(name, dims),
        Mode::Init => {
            let t = p.ones_no_train(name, dims);
            if value != 1.0 {
                let _ = tch::no_grad(|| t.shallow_clone().fill_(value));
            }
            t
        }
    }
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
        let zeros = for_loading(|| Ok::<_, Error>(build(&vs))).unwrap();
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

    /// Every constructor of this module, as a model would call them.
    fn all_layers(p: &nn::Path, width: i64) -> Vec<Tensor> {
        let l = linear(p / "l", width, 3, Default::default());
        let nb = linear(p / "nb", 3, width, nn::LinearConfig { bias: false, ..Default::default() });
        let c = conv2d(p / "c", width, 4, 3, nn::ConvConfig { groups: 2, ..Default::default() });
        let e = embedding(p / "e", 5, width, Default::default());
        let ln = layer_norm(p / "ln", width, Default::default());
        let gn = group_norm(p / "gn", 2, width, Default::default());
        let v = var(p, "v", &[2, width], nn::Init::Const(0.0));
        let s = var_no_train(p, "s", &[1, width], 2.0);
        vec![l.ws, nb.ws, c.ws, e.ws, ln.ws.unwrap(), gn.ws.unwrap(), v, s]
    }

    #[test]
    fn measure_counts_exactly_without_allocating() {
        let vs = nn::VarStore::new(Device::Cpu);
        let built = all_layers(&vs.root(), 8);
        let real: i64 = vs.variables().values().map(Tensor::numel).map(|n| n as i64).sum();
        let vs2 = nn::VarStore::new(Device::Cpu);
        let layout = measure(|| Ok::<_, Error>(all_layers(&vs2.root(), 8))).unwrap();
        assert_eq!(layout.elements, real as u128);
        // Names and shapes as the real build has them.
        let mut names: Vec<(String, Vec<i64>)> =
            vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        names.sort();
        let mut measured = layout.tensors.clone();
        measured.sort();
        assert_eq!(measured, names);
        assert_eq!(built[7].double_value(&[0, 0]), 2.0, "var_no_train fills its value");
        // 10^12 features: sized, not allocated (it would take terabytes).
        let vs3 = nn::VarStore::new(Device::Cpu);
        let huge = 1_000_000_000_000i64;
        let n = measure(|| Ok::<_, Error>(all_layers(&vs3.root(), huge))).unwrap().elements;
        assert!(n > 10 * huge as u128, "{n}");
        // A shape whose size overflows is an error naming it.
        let vs4 = nn::VarStore::new(Device::Cpu);
        let err = measure(|| {
            Ok::<_, Error>(var(
                &vs4.root(),
                "x",
                &[i64::MAX, i64::MAX, i64::MAX],
                nn::Init::Const(0.0),
            ))
        })
        .unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        // A negative size too.
        let err = measure(|| Ok::<_, Error>(linear(vs4.root() / "n", -3, 2, Default::default())))
            .unwrap_err();
        assert!(err.to_string().contains("[2, -3]"), "{err}");
        // The mode is restored: constructors allocate again.
        let vs5 = nn::VarStore::new(Device::Cpu);
        let l = linear(vs5.root() / "l", 4, 3, Default::default());
        assert_eq!(l.ws.size(), vec![3, 4]);
    }

    #[test]
    fn a_panicking_constructor_is_an_error() {
        let r: Result<()> = for_loading(|| panic!("allocation failed"));
        let err = r.unwrap_err().to_string();
        assert!(err.contains("could not allocate") && err.contains("allocation failed"), "{err}");
        let r: Result<()> = guarded("a test model", || Err(Error::InvalidArgument("no".into())));
        assert!(r.unwrap_err().to_string().contains("no"));
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
