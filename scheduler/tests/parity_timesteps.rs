//! Inference timesteps of every sampler and spacing against diffusers 0.42.1, for the listed
//! step counts exactly and for every count 1..=T through (len, sum, sum of squares).
//!
//! One documented deviation: where numpy's float `arange` gives `trailing` spacing a spurious
//! extra timestep −1 (n = 61, 103, …), diffusers keeps it and we drop it.

mod common;

use common::Fixture;
use unclip_scheduler::spacing::{ddpm_timesteps, dpm_timesteps, inverse_timesteps};
use unclip_scheduler::{Result, TimestepSpacing, UnCLIPScheduler};

fn ours(name: &str, n: usize) -> Result<Vec<i64>> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts[0] == "unclip" {
        return UnCLIPScheduler::spaced_timesteps(1000, n);
    }
    let spacing = match parts[1] {
        "linspace" => TimestepSpacing::Linspace,
        "leading" => TimestepSpacing::Leading,
        _ => TimestepSpacing::Trailing,
    };
    let offset: i64 = parts[2].parse().unwrap();
    match parts[0] {
        "ddpm" => ddpm_timesteps(spacing, 1000, n, offset),
        "dpm" => dpm_timesteps(spacing, 1000, 1000, n, offset),
        _ => inverse_timesteps(spacing, 1000, n, offset),
    }
}

fn summary(ts: &[i64]) -> [i64; 3] {
    [ts.len() as i64, ts.iter().sum(), ts.iter().map(|t| t * t).sum()]
}

#[test]
fn timesteps_match_diffusers() {
    let f = Fixture::load("timesteps");
    let mut names: Vec<String> =
        f.0.keys().filter_map(|k| k.strip_suffix(".summary").map(str::to_string)).collect();
    names.sort();
    assert_eq!(names.len(), 12, "{names:?}");
    let (mut exact, mut dropped, mut refused) = (0, 0, 0);
    for name in &names {
        // Full lists.
        for key in
            f.0.keys().filter(|k| k.starts_with(&format!("{name}.")) && !k.ends_with("summary"))
        {
            let n: usize = key.rsplit('.').next().unwrap().parse().unwrap();
            let reference = f.vec_i64(key);
            match ours(name, n) {
                Ok(v) if v == reference => {}
                Ok(v) => {
                    assert!(reference.contains(&-1), "{key}: ours {v:?} vs {reference:?}");
                    let kept: Vec<i64> = reference.iter().copied().filter(|&t| t >= 0).collect();
                    assert_eq!(v, kept, "{key}");
                }
                Err(e) => {
                    let mut s = reference.clone();
                    s.sort_unstable();
                    s.dedup();
                    let invalid =
                        s.len() < reference.len() || s.iter().any(|&t| !(0..1000).contains(&t));
                    assert!(invalid, "{key}: refused ({e}) a valid diffusers list {reference:?}");
                }
            }
        }
        // Every step count.
        let table = f.get(&format!("{name}.summary"));
        let rows = Vec::<i64>::try_from(table.flatten(0, -1)).unwrap();
        for r in rows.chunks(4) {
            let (n, reference) = (r[0] as usize, [r[1], r[2], r[3]]);
            match ours(name, n) {
                Ok(v) if summary(&v) == reference => exact += 1,
                Ok(v) => {
                    let s = summary(&v);
                    assert_eq!([s[0] + 1, s[1] - 1, s[2] + 1], reference, "{name} n={n}: {v:?}");
                    dropped += 1;
                }
                Err(e) => {
                    // Refused lists must be invalid: `len` unique timesteps in 0..1000 have at
                    // least the sum of squares of 0..len and at most the sum of 1000-len..1000.
                    let len = reference[0];
                    let min_sq: i64 = (0..len).map(|t| t * t).sum();
                    let big = reference[1] > (999 + (1000 - len)) * len / 2;
                    assert!(
                        reference[2] < min_sq || big,
                        "{name} n={n}: refused ({e}), reference {reference:?}"
                    );
                    refused += 1;
                }
            }
        }
    }
    println!(
        "timesteps: {exact} identical, {dropped} with diffusers' spurious -1 dropped, {refused} refused"
    );
    assert!(exact > 11_000);
}
