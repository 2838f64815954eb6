//! All-reduce bandwidth of c10d's Gloo backend between 2 local processes over 127.0.0.1.
//!
//! `cargo bench -p unclip-dist --bench allreduce` launches itself as 2 ranks (unclip-dist's local
//! launcher) and rank 0 prints a table. Bandwidths follow nccl-tests: algbw = bytes / time, busbw =
//! algbw * 2 (n - 1) / n (what each link carries in a ring all-reduce). A local copy of the same
//! buffer is printed for scale.

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use unclip_dist::{DistEnv, LocalLaunch, ProcessGroup};

const SIZES_MB: [usize; 3] = [1, 16, 128];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if DistEnv::launched() {
        return worker();
    }
    println!(
        "command: cargo bench -p unclip-dist --bench allreduce  (2 processes, gloo, 127.0.0.1, 1 intra-op thread each)"
    );
    let mut launch = LocalLaunch::new(2, std::env::current_exe()?);
    launch.args = std::env::args_os().skip(1).collect();
    launch.run()?;
    Ok(())
}

fn worker() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(1);
    let pg = ProcessGroup::from_env()?;
    let n = pg.world_size() as f64;
    if pg.is_main() {
        println!("| size | iters | ms / all-reduce | algbw GB/s | busbw GB/s | local copy GB/s |");
        println!("|---:|---:|---:|---:|---:|---:|");
    }
    for mb in SIZES_MB {
        let bytes = mb << 20;
        let numel = (bytes / 4) as i64;
        let iters = (256 / mb).clamp(5, 100);
        let mut t = [Tensor::ones([numel], (Kind::Float, Device::Cpu))];
        for _ in 0..2 {
            pg.all_reduce_sum(&mut t)?;
        }
        pg.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            pg.all_reduce_sum(&mut t)?;
        }
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        // Every element doubled at each of the (2 + iters) all-reduces: a wrong result shows here.
        let expect = 2f64.powi(2 + iters as i32);
        let got = t[0].double_value(&[numel - 1]);
        if got != expect {
            return Err(format!("{mb} MB: last element {got}, expected {expect}").into());
        }
        let dst = Tensor::empty([numel], (Kind::Float, Device::Cpu));
        let src = Tensor::ones([numel], (Kind::Float, Device::Cpu));
        let mut copy_dst = dst.shallow_clone();
        copy_dst.copy_(&src);
        let c0 = Instant::now();
        for _ in 0..iters {
            copy_dst.copy_(&src);
        }
        let copy_secs = c0.elapsed().as_secs_f64() / iters as f64;
        pg.barrier()?;
        if pg.is_main() {
            let algbw = bytes as f64 / secs / 1e9;
            println!(
                "| {mb} MB | {iters} | {:.3} | {algbw:.2} | {:.2} | {:.2} |",
                secs * 1e3,
                algbw * 2.0 * (n - 1.0) / n,
                bytes as f64 / copy_secs / 1e9
            );
        }
    }
    pg.barrier()?;
    Ok(())
}
