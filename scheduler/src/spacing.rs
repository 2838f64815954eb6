//! Inference timesteps: the `linspace` / `leading` / `trailing` spacings, reproducing numpy's
//! float arithmetic (`linspace`, `arange`, `round` half to even) as diffusers runs it.

use crate::config::TimestepSpacing;
use crate::{Error, Result};

/// numpy's `linspace(start, stop, num)` (endpoint included).
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// numpy's float `arange(start, stop, step)`: length ceil((stop−start)/step), entries 0 and 1
/// computed directly, the rest as `start + i·(a[1] − a[0])`.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let mut y = Vec::with_capacity(len);
    if len > 0 {
        y.push(start);
    }
    if len > 1 {
        y.push(start + step);
    }
    let delta = if len > 1 { y[1] - y[0] } else { 0.0 };
    for i in 2..len {
        y.push(start + i as f64 * delta);
    }
    y
}

fn check_count(n: usize, num_train_timesteps: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Steps { steps: n, reason: "at least one step is needed".into() });
    }
    if n > num_train_timesteps {
        return Err(Error::Steps {
            steps: n,
            reason: format!("more than the {num_train_timesteps} training timesteps"),
        });
    }
    Ok(())
}

/// Checks that the timesteps lie in 0..T and do not repeat.
fn check_result(ts: Vec<i64>, n: usize, num_train_timesteps: usize) -> Result<Vec<i64>> {
    let t_max = num_train_timesteps as i64;
    if let Some(t) = ts.iter().find(|&&t| !(0..t_max).contains(&t)) {
        return Err(Error::Steps {
            steps: n,
            reason: format!(
                "the spacing gives timestep {t}, outside 0..{t_max} (check steps_offset)"
            ),
        });
    }
    let mut sorted = ts.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::Steps { steps: n, reason: "the spacing repeats a timestep".into() });
    }
    Ok(ts)
}

/// `arange(from, 0, −T/n)` rounded, minus 1. For some n (61, 103, …) numpy's float length
/// gives one spurious entry ≈ 0 past the end, i.e. timestep −1, which diffusers keeps (and then
/// indexes ᾱ[−1], the last one); we drop it.
fn trailing(from: usize, num_train_timesteps: usize, n: usize) -> Vec<i64> {
    let ratio = num_train_timesteps as f64 / n as f64;
    np_arange(from as f64, 0.0, -ratio)
        .iter()
        .map(|v| v.round_ties_even() as i64 - 1)
        .filter(|&t| t >= 0)
        .collect()
}

/// The `n` decreasing timesteps DDPM and DDIM sample at.
pub fn ddpm_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    check_count(n, num_train_timesteps)?;
    let t = num_train_timesteps;
    let ts = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (t / n) as i64;
            (0..n as i64).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => trailing(t, t, n),
    };
    check_result(ts, n, t)
}

/// The `n` increasing timesteps DDIM inversion walks up (`leading` or `trailing`).
pub fn inverse_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    check_count(n, num_train_timesteps)?;
    let t = num_train_timesteps;
    let ts = match spacing {
        TimestepSpacing::Linspace => {
            return Err(Error::Config(
                "DDIM inversion supports leading or trailing spacing".into(),
            ));
        }
        TimestepSpacing::Leading => {
            let ratio = (t / n) as i64;
            (0..n as i64).map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let mut ts = trailing(t, t, n);
            ts.reverse();
            ts
        }
    };
    check_result(ts, n, t)
}

/// The `n` decreasing timesteps of DPM-Solver, which spaces n+1 points over 0..`last` (T unless
/// `lambda_min_clipped` cuts the tail) and drops the final 0.
pub fn dpm_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last: usize,
    n: usize,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    check_count(n, num_train_timesteps)?;
    let ts = match spacing {
        TimestepSpacing::Linspace => {
            let y = np_linspace(0.0, last as f64 - 1.0, n + 1);
            y[1..].iter().rev().map(|v| v.round_ties_even() as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (last / (n + 1)) as i64;
            (1..=n as i64).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => trailing(last, num_train_timesteps, n),
    };
    check_result(ts, n, num_train_timesteps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_forms() {
        assert_eq!(np_linspace(0.0, 999.0, 1), [0.0]);
        assert_eq!(np_arange(10.0, 0.0, -2.5), [10.0, 7.5, 5.0, 2.5]);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn errors() {
        use TimestepSpacing::*;
        assert!(matches!(ddpm_timesteps(Leading, 1000, 0, 0), Err(Error::Steps { .. })));
        assert!(matches!(ddpm_timesteps(Leading, 1000, 1001, 0), Err(Error::Steps { .. })));
        assert!(matches!(ddpm_timesteps(Leading, 1000, 1000, 1), Err(Error::Steps { .. })));
        assert!(matches!(dpm_timesteps(Leading, 1000, 1000, 1000, 0), Err(Error::Steps { .. })));
        assert!(inverse_timesteps(Linspace, 1000, 10, 0).is_err());
    }
}
