//! A one-machine launcher: starts N copies of a program as ranks 0..N with the variables torchrun
//! would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT on
//! a free port), so `--nproc N` needs no external launcher.

use std::ffi::OsString;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{DistError, Result};

/// What a worker left behind.
#[derive(Debug)]
pub struct WorkerExit {
    pub rank: usize,
    pub status: ExitStatus,
    /// Captured output (empty unless [`LocalLaunch::capture`] is set).
    pub stdout: String,
    pub stderr: String,
}

/// Settings of a local multi-process launch.
#[derive(Debug, Clone)]
pub struct LocalLaunch {
    pub nproc: usize,
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Extra variables for every worker.
    pub envs: Vec<(OsString, OsString)>,
    /// Capture the workers' stdout/stderr instead of inheriting the terminal.
    pub capture: bool,
    /// Stop the others as soon as one worker fails (torchrun's behaviour). When false, every
    /// worker is waited for and the exits are returned as they are.
    pub stop_on_failure: bool,
    /// Workers still running after this long are killed and reported as failed.
    pub deadline: Option<Duration>,
}

impl LocalLaunch {
    pub fn new(nproc: usize, program: impl Into<OsString>) -> Self {
        LocalLaunch {
            nproc,
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            capture: false,
            stop_on_failure: true,
            deadline: None,
        }
    }

    /// Starts the workers and waits for them. With `stop_on_failure`, the first failure stops the
    /// others and is returned as [`DistError::WorkerFailed`]; otherwise every exit is returned.
    pub fn run(&self) -> Result<Vec<WorkerExit>> {
        if self.nproc == 0 {
            return Err(DistError::InvalidArgument(
                "nproc 0: expected at least one process".into(),
            ));
        }
        let port = free_port()?;
        let mut children: Vec<Option<(Child, Option<Capture>)>> = Vec::with_capacity(self.nproc);
        for rank in 0..self.nproc {
            let mut cmd = Command::new(&self.program);
            cmd.args(&self.args)
                .envs(self.envs.iter().map(|(k, v)| (k, v)))
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", self.nproc.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", self.nproc.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdin(Stdio::null());
            if self.capture {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            match cmd.spawn() {
                Ok(mut child) => {
                    let capture = self.capture.then(|| Capture::start(&mut child));
                    children.push(Some((child, capture)));
                }
                Err(source) => {
                    stop_all(&mut children);
                    let program = self.program.to_string_lossy().into_owned();
                    return Err(DistError::Spawn { rank, program, source });
                }
            }
        }
        let start = Instant::now();
        let mut exits: Vec<Option<WorkerExit>> = (0..self.nproc).map(|_| None).collect();
        loop {
            let mut running = 0;
            for rank in 0..self.nproc {
                let Some((child, _)) = children[rank].as_mut() else { continue };
                match child.try_wait()? {
                    None => running += 1,
                    Some(status) => {
                        let (_, capture) = children[rank].take().expect("present");
                        let (stdout, stderr) = capture.map(Capture::finish).unwrap_or_default();
                        if !status.success() && self.stop_on_failure {
                            stop_all(&mut children);
                            return Err(DistError::WorkerFailed {
                                rank,
                                nproc: self.nproc,
                                status: describe(status, &stderr),
                            });
                        }
                        exits[rank] = Some(WorkerExit { rank, status, stdout, stderr });
                    }
                }
            }
            if running == 0 {
                break;
            }
            if let Some(deadline) = self.deadline.filter(|d| start.elapsed() > *d) {
                let stuck: Vec<usize> =
                    (0..self.nproc).filter(|&r| children[r].is_some()).collect();
                stop_all(&mut children);
                return Err(DistError::WorkerFailed {
                    rank: stuck[0],
                    nproc: self.nproc,
                    status: format!(
                        "was still running after {deadline:?} (ranks {stuck:?} killed)"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(exits.into_iter().map(|e| e.expect("every worker exited")).collect())
    }
}

/// Runs `program args` as `nproc` local ranks (inheriting the terminal) and waits for all of
/// them; the first failing worker stops the rest. What `--nproc N` does.
pub fn spawn_local(nproc: usize, program: impl Into<OsString>, args: &[OsString]) -> Result<()> {
    let mut launch = LocalLaunch::new(nproc, program);
    launch.args = args.to_vec();
    launch.run().map(|_| ())
}

/// Reader threads draining a child's pipes (a full pipe would block the child).
#[derive(Debug)]
struct Capture {
    out: JoinHandle<String>,
    err: JoinHandle<String>,
}

impl Capture {
    fn start(child: &mut Child) -> Self {
        fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        }
        Capture { out: drain(child.stdout.take()), err: drain(child.stderr.take()) }
    }

    fn finish(self) -> (String, String) {
        (self.out.join().unwrap_or_default(), self.err.join().unwrap_or_default())
    }
}

fn stop_all(children: &mut [Option<(Child, Option<Capture>)>]) {
    for slot in children.iter_mut() {
        if let Some((mut child, capture)) = slot.take() {
            let _ = child.kill();
            let _ = child.wait();
            drop(capture.map(Capture::finish));
        }
    }
}

fn describe(status: ExitStatus, stderr: &str) -> String {
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    if tail.is_empty() {
        format!("failed ({status})")
    } else {
        format!("failed ({status}); last lines of its stderr:\n{}", tail.join("\n"))
    }
}

/// A port the OS considers free right now (closed again before the workers bind it).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<OsString> {
        vec!["-c".into(), script.into()]
    }

    #[test]
    fn workers_get_torchrun_variables() {
        let script = r#"test "$WORLD_SIZE" = 3 && test "$LOCAL_WORLD_SIZE" = 3 && test "$LOCAL_RANK" = "$RANK" \
            && test "$MASTER_ADDR" = 127.0.0.1 && test "$MASTER_PORT" -gt 0 && echo "rank $RANK""#;
        let mut launch = LocalLaunch::new(3, "sh");
        launch.args = sh(script);
        launch.capture = true;
        let exits = launch.run().unwrap();
        for (r, e) in exits.iter().enumerate() {
            assert!(e.status.success(), "{e:?}");
            assert_eq!(e.stdout.trim(), format!("rank {r}"));
        }
        spawn_local(2, "sh", &sh("test -n \"$RANK\"")).unwrap();
    }

    #[test]
    fn a_failing_worker_stops_the_others() {
        let start = Instant::now();
        let err = spawn_local(2, "sh", &sh("if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 60"))
            .unwrap_err();
        assert!(matches!(err, DistError::WorkerFailed { rank: 1, nproc: 2, .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(30), "rank 0 was not stopped");
    }

    #[test]
    fn a_stuck_worker_is_killed_at_the_deadline() {
        let mut launch = LocalLaunch::new(2, "sh");
        launch.args = sh("sleep 60");
        launch.deadline = Some(Duration::from_millis(300));
        let err = launch.run().unwrap_err().to_string();
        assert!(err.contains("still running"), "{err}");
        let missing = spawn_local(1, "/nonexistent/program", &[]).unwrap_err();
        assert!(matches!(missing, DistError::Spawn { rank: 0, .. }), "{missing}");
    }
}
