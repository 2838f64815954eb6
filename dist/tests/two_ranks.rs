//! Two ranks over 127.0.0.1 with Gloo. Each test re-runs this test executable as the two workers
//! (selected by UNCLIP_DIST_TEST_WORKER, launched by unclip-dist's own local launcher); the parent
//! checks both exit codes and that each rank printed its success line, so a filter that matched no
//! test cannot pass for a worker.

use std::time::{Duration, Instant};

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use unclip_dist::{
    Backend, DistEnv, DistError, GradBuckets, LocalLaunch, Options, ProcessGroup, ReduceOp,
    WorkerExit, broadcast_params,
};

const ROLE: &str = "UNCLIP_DIST_TEST_WORKER";

/// Starts 2 copies of this executable running only `test`, as ranks 0 and 1.
fn launch(test: &str, envs: &[(&str, String)]) -> Vec<WorkerExit> {
    let exe = std::env::current_exe().expect("test executable path");
    let mut launch = LocalLaunch::new(2, exe);
    launch.args = ["--exact", test, "--nocapture", "--test-threads=1"].map(Into::into).to_vec();
    launch.envs.push((ROLE.into(), test.into()));
    launch.envs.extend(envs.iter().map(|(k, v)| ((*k).into(), v.into())));
    launch.capture = true;
    launch.stop_on_failure = false;
    launch.deadline = Some(Duration::from_secs(180));
    launch.run().expect("workers ran")
}

fn show(exits: &[WorkerExit]) -> String {
    exits
        .iter()
        .map(|e| format!("--- rank {} ({})\n{}\n{}", e.rank, e.status, e.stdout, e.stderr))
        .collect()
}

/// Asserts that `rank` finished, and echoes its "rank N..." report lines (for `--nocapture`).
fn assert_worker_ok(exits: &[WorkerExit], rank: usize, marker: &str) {
    let e = &exits[rank];
    // libtest prints "test NAME ... " without a newline before the test's own output.
    let reports = e.stdout.lines().filter(|l| !l.contains("-OK rank"));
    for line in reports.filter_map(|l| l.find("rank ").map(|i| &l[i..])) {
        println!("{line}");
    }
    let line = format!("{marker} rank {rank}");
    assert!(
        e.status.success() && e.stdout.contains(&line),
        "rank {rank} did not finish:\n{}",
        show(exits)
    );
}

fn is_worker(test: &str) -> bool {
    std::env::var(ROLE).is_ok_and(|r| r == test)
}

fn join(timeout: Duration) -> ProcessGroup {
    let env = DistEnv::from_env().expect("launcher variables");
    ProcessGroup::init(&env, &Options { backend: Backend::Gloo, timeout }).expect("rendezvous")
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

#[test]
fn collectives_give_the_right_values() {
    const NAME: &str = "collectives_give_the_right_values";
    if !is_worker(NAME) {
        let file =
            std::env::temp_dir().join(format!("unclip-dist-filestore-{}", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let exits = launch(NAME, &[("UNCLIP_DIST_TEST_FILE", file.display().to_string())]);
        let _ = std::fs::remove_file(&file);
        assert_worker_ok(&exits, 0, "COLLECTIVES-OK");
        assert_worker_ok(&exits, 1, "COLLECTIVES-OK");
        return;
    }
    tch::set_num_threads(1);
    let pg = join(Duration::from_secs(60));
    let r = pg.rank() as f64;
    assert_eq!((pg.world_size(), pg.backend(), pg.device()), (2, Backend::Gloo, Device::Cpu));

    // Sum and mean of floats: rank r holds (r+1) * [0, 1, 2, 3, 4].
    let base = Tensor::arange(5, (Kind::Float, Device::Cpu));
    let mut t = [&base * (r + 1.0), &base * (r + 1.0)];
    pg.all_reduce_sum(&mut t[..1]).unwrap();
    pg.all_reduce_mean(&mut t[1..]).unwrap();
    assert_eq!(values(&t[0]), vec![0.0, 3.0, 6.0, 9.0, 12.0]);
    assert_eq!(values(&t[1]), vec![0.0, 1.5, 3.0, 4.5, 6.0]);
    // Integers, min and max.
    let mut i = [Tensor::from_slice(&[10i64 * (pg.rank() as i64 + 1), -3])];
    pg.all_reduce_sum(&mut i).unwrap();
    assert_eq!(Vec::<i64>::try_from(&i[0]).unwrap(), vec![30, -6]);
    let mut m = [Tensor::from_slice(&[r, -r]), Tensor::from_slice(&[r, -r])];
    pg.all_reduce(&mut m[..1], ReduceOp::Min).unwrap();
    pg.all_reduce(&mut m[1..], ReduceOp::Max).unwrap();
    assert_eq!((values(&m[0]), values(&m[1])), (vec![0.0, -1.0], vec![1.0, 0.0]));
    // A mean of integers is refused before any communication (on both ranks alike).
    let err = pg.all_reduce_mean(&mut [Tensor::from_slice(&[1i64])]).unwrap_err();
    assert!(matches!(err, DistError::BadTensor { .. }), "{err}");

    // Broadcast from rank 1 (two tensors of different shapes).
    let mut b = [
        Tensor::full([2, 3], 10.0 * r + 7.0, (Kind::Float, Device::Cpu)),
        Tensor::from_slice(&[r]),
    ];
    pg.broadcast(&mut b, 1).unwrap();
    assert_eq!(values(&b[0]), vec![17.0; 6]);
    assert_eq!(values(&b[1]), vec![1.0]);
    assert!(pg.broadcast(&mut b, 2).is_err(), "root 2 of 2 must be refused");

    // All-gather: every rank's tensor, in rank order.
    let gathered = pg.all_gather(&Tensor::from_slice(&[r, 2.0 * r + 0.5]).view([1, 2])).unwrap();
    assert_eq!(gathered.len(), 2);
    assert_eq!(gathered[0].size(), vec![1, 2]);
    assert_eq!((values(&gathered[0]), values(&gathered[1])), (vec![0.0, 0.5], vec![1.0, 2.5]));

    // A non-contiguous tensor is refused with its index.
    let mut nc = [
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)).tr(),
    ];
    let err = pg.all_reduce_sum(&mut nc).unwrap_err().to_string();
    assert!(err.contains("tensor 1") && err.contains("contiguous"), "{err}");

    // Barrier: rank 0 cannot leave it before rank 1 arrives 400 ms late.
    let start = Instant::now();
    if pg.rank() == 1 {
        std::thread::sleep(Duration::from_millis(400));
    }
    pg.barrier().unwrap();
    if pg.rank() == 0 {
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "barrier returned after {:?}",
            start.elapsed()
        );
    }

    // The same through a FileStore rendezvous.
    let file = std::env::var("UNCLIP_DIST_TEST_FILE").unwrap();
    let opts = Options { backend: Backend::Gloo, timeout: Duration::from_secs(60) };
    let fpg = ProcessGroup::init_file(file.as_ref(), pg.rank(), 2, pg.rank(), &opts).unwrap();
    let mut f = [Tensor::from_slice(&[r + 1.0])];
    fpg.all_reduce_sum(&mut f).unwrap();
    assert_eq!(values(&f[0]), vec![3.0]);
    fpg.barrier().unwrap();
    pg.barrier().unwrap();
    println!("COLLECTIVES-OK rank {}", pg.rank());
}

#[test]
fn job_of_one_needs_no_launcher() {
    // Outside any launcher: rank 0 of 1 on a free loopback port; collectives are identities.
    let opts = Options { backend: Backend::Gloo, timeout: Duration::from_secs(60) };
    let pg = ProcessGroup::init(&DistEnv::single(), &opts).unwrap();
    let mut t = [Tensor::from_slice(&[1.5f32, -2.0])];
    pg.all_reduce_mean(&mut t).unwrap();
    assert_eq!(values(&t[0]), vec![1.5, -2.0]);
    let g = pg.all_gather(&t[0]).unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(values(&g[0]), vec![1.5, -2.0]);
    pg.barrier().unwrap();
}

#[test]
fn nccl_without_a_gpu_is_an_error_not_an_abort() {
    if tch::Cuda::is_available() {
        return; // the NCCL path itself needs a GPU run (not available in CI)
    }
    let opts = Options { backend: Backend::Nccl, timeout: Duration::from_secs(10) };
    let err = ProcessGroup::init(&DistEnv::single(), &opts).unwrap_err();
    println!("{err}");
    if Backend::Nccl.available() {
        // Compiled in (libtorch_cuda present): libtorch's ProcessGroupNCCL refuses without GPUs.
        assert!(matches!(err, DistError::Init { backend: "nccl", .. }), "{err}");
    } else {
        assert!(matches!(err, DistError::NcclUnavailable), "{err}");
    }
}

fn mlp(p: &nn::Path) -> impl Module + use<> {
    nn::seq()
        .add(nn::linear(p / "l1", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(p / "l2", 16, 4, Default::default()))
}

const BATCH_PER_RANK: i64 = 4;
const STEPS: i64 = 6;

/// Trains the MLP from weights drawn with `init_seed`. With a group, rank 0's weights are
/// broadcast, each rank takes its own half of every global batch and gradients are averaged in
/// buckets; without one, the whole global batch is used. Returns (initial, trained) parameters,
/// flattened.
fn train(pg: Option<&ProcessGroup>, init_seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(init_seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let params = vs.trainable_variables();
    let mut buckets = None;
    if let Some(pg) = pg {
        broadcast_params(pg, &params, 0).unwrap();
        // tch creates each bias before its weight. 300 bytes: l1.bias alone (64 B), l1.weight
        // alone (512 B, over the size), l2.bias and l2.weight together (16 + 256 B).
        let b = GradBuckets::new(&params, 300).unwrap();
        assert_eq!(b.bucket_numels(), vec![16, 128, 68]);
        buckets = Some(b);
    }
    let flat = |ps: &[Tensor]| {
        Tensor::cat(&ps.iter().map(|p| p.detach().flatten(0, -1)).collect::<Vec<_>>(), 0)
    };
    let initial = flat(&params);
    let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05).unwrap();
    for step in 0..STEPS {
        tch::manual_seed(1000 + step);
        let world = pg.map_or(1, |p| p.world_size() as i64);
        let x = Tensor::randn([2 * BATCH_PER_RANK, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::randn([2 * BATCH_PER_RANK, 4], (Kind::Float, Device::Cpu));
        let (x, y) = match pg {
            Some(pg) => {
                assert_eq!(world, 2);
                let start = pg.rank() as i64 * BATCH_PER_RANK;
                (x.narrow(0, start, BATCH_PER_RANK), y.narrow(0, start, BATCH_PER_RANK))
            }
            None => (x, y),
        };
        let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        opt.zero_grad();
        loss.backward();
        if let (Some(pg), Some(b)) = (pg, buckets.as_mut()) {
            b.all_reduce_mean(pg, &params).unwrap();
        }
        opt.step();
    }
    (initial, flat(&params))
}

#[test]
fn data_parallel_training_matches_one_process() {
    const NAME: &str = "data_parallel_training_matches_one_process";
    if !is_worker(NAME) {
        let exits = launch(NAME, &[]);
        assert_worker_ok(&exits, 0, "DATA-PARALLEL-OK");
        assert_worker_ok(&exits, 1, "DATA-PARALLEL-OK");
        return;
    }
    tch::set_num_threads(1);
    let pg = join(Duration::from_secs(60));
    // Rank 1 draws different initial weights: the broadcast must replace them with rank 0's.
    let (initial, trained) = train(Some(&pg), pg.rank() as i64);
    let (ref_initial, reference) = train(None, 0);
    assert!(
        initial.equal(&ref_initial),
        "rank {}: broadcast did not give rank 0's weights",
        pg.rank()
    );

    let all = pg.all_gather(&trained).unwrap();
    let bits = |t: &Tensor| {
        Vec::<f32>::try_from(t).unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>()
    };
    assert_eq!(bits(&all[0]), bits(&all[1]), "ranks' parameters differ after training");

    let diff = (&trained - &reference).abs().max().double_value(&[]);
    let moved = (&trained - &initial).abs().max().double_value(&[]);
    println!(
        "rank {}: max |data-parallel - one process| = {diff:e}, max training change = {moved:e}",
        pg.rank()
    );
    assert!(
        diff <= 1e-5,
        "data-parallel training is {diff} away from one process on the whole batch"
    );
    assert!(moved > 1e-2, "training barely moved the parameters ({moved})");
    pg.barrier().unwrap();
    println!("DATA-PARALLEL-OK rank {}", pg.rank());
}

const TIMEOUT: Duration = Duration::from_secs(4);

#[test]
fn a_dead_rank_fails_the_other_within_the_timeout() {
    const NAME: &str = "a_dead_rank_fails_the_other_within_the_timeout";
    if !is_worker(NAME) {
        let exits = launch(NAME, &[]);
        assert_eq!(exits[1].status.code(), Some(7), "rank 1 should have died:\n{}", show(&exits));
        assert_worker_ok(&exits, 0, "DEAD-PEER-OK");
        return;
    }
    let pg = join(TIMEOUT);
    let mut t = [Tensor::ones([1000], (Kind::Float, Device::Cpu))];
    pg.all_reduce_sum(&mut t).unwrap();
    if pg.rank() == 1 {
        // Dies abruptly: no destructor, no goodbye; the OS closes its sockets.
        std::process::exit(7);
    }
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let err = pg.all_reduce_sum(&mut t).unwrap_err();
    let took = start.elapsed();
    println!("rank 0 got, after {took:?}: {err}");
    assert!(matches!(err, DistError::Collective { op: "all_reduce", rank: 0, .. }), "{err}");
    assert!(took < TIMEOUT + Duration::from_secs(3), "the error took {took:?}");
    // Dropping the broken group must not hang either.
    let t0 = Instant::now();
    drop(pg);
    assert!(t0.elapsed() < Duration::from_secs(5), "dropping the group took {:?}", t0.elapsed());
    println!("DEAD-PEER-OK rank 0");
}

#[test]
fn a_silent_rank_fails_the_other_at_the_timeout() {
    const NAME: &str = "a_silent_rank_fails_the_other_at_the_timeout";
    if !is_worker(NAME) {
        let exits = launch(NAME, &[]);
        assert_worker_ok(&exits, 0, "SILENT-PEER-OK");
        return;
    }
    let pg = join(TIMEOUT);
    pg.barrier().unwrap();
    if pg.rank() == 1 {
        // Alive, connected, but never joins the next collective.
        std::thread::sleep(TIMEOUT + Duration::from_secs(3));
        std::process::exit(0);
    }
    let mut t = [Tensor::ones([1000], (Kind::Float, Device::Cpu))];
    let start = Instant::now();
    let err = pg.all_reduce_sum(&mut t).unwrap_err();
    let took = start.elapsed();
    println!("rank 0 got, after {took:?}: {err}");
    assert!(matches!(err, DistError::Collective { op: "all_reduce", rank: 0, .. }), "{err}");
    assert!(took >= TIMEOUT - Duration::from_millis(500), "failed before the timeout: {took:?}");
    assert!(took < TIMEOUT + Duration::from_secs(3), "the error took {took:?}");
    // Dropping the broken group must not hang either.
    let t0 = Instant::now();
    drop(pg);
    assert!(t0.elapsed() < Duration::from_secs(5), "dropping the group took {:?}", t0.elapsed());
    println!("SILENT-PEER-OK rank 0");
}
