//! Where this process sits in the job, read the way torchrun and Slurm publish it.
//!
//! torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under `srun` without
//! torchrun, SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID stand in for the first three and the
//! master address defaults to the first host of SLURM_JOB_NODELIST. With none of them set the
//! process is a job of one. In an sbatch script's own shell the SLURM_* variables describe the
//! whole allocation: start the ranks with `srun` (or torchrun), not by running the program there.

use crate::error::{DistError, Result};

/// torchrun's default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Rank, world size and rendezvous address of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, 0..world_size.
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this machine: the CUDA device a rank uses.
    pub local_rank: usize,
    /// Host of rank 0's TCPStore.
    pub master_addr: String,
    /// Its port; 0 lets a job of one pick a free port.
    pub master_port: u16,
    /// torchrun's agent already serves the TCPStore at that address
    /// (TORCHELASTIC_USE_AGENT_STORE=True): every rank, rank 0 included, connects as a client.
    pub agent_store: bool,
}

impl DistEnv {
    /// A job of one process (rendezvous on a free loopback port).
    pub fn single() -> Self {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            agent_store: false,
        }
    }

    /// Reads the process environment (see the module doc).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Whether a launcher (torchrun, Slurm, [`crate::spawn_local`]) started this process, i.e. it
    /// must not spawn workers of its own.
    pub fn launched() -> bool {
        ["RANK", "WORLD_SIZE", "SLURM_PROCID"].iter().any(|v| std::env::var_os(v).is_some())
    }

    /// [`DistEnv::from_env`] over any variable lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let first = |names: &[&'static str]| -> Option<(&'static str, String)> {
            names.iter().find_map(|n| get(n).map(|v| (*n, v)))
        };
        let rank = first(&["RANK", "SLURM_PROCID"]);
        let world = first(&["WORLD_SIZE", "SLURM_NTASKS"]);
        let (rank, world_size) = match (rank, world) {
            (None, None) => return Ok(Self::single()),
            (Some((name, _)), None) => {
                return Err(env_err("WORLD_SIZE", format!("unset while {name} is set")));
            }
            (None, Some((name, _))) => {
                return Err(env_err("RANK", format!("unset while {name} is set")));
            }
            (Some((rn, rv)), Some((wn, wv))) => {
                (parse::<usize>(rn, &rv)?, parse::<usize>(wn, &wv)?)
            }
        };
        if world_size == 0 {
            return Err(env_err("WORLD_SIZE", "is 0, expected at least 1".into()));
        }
        if rank >= world_size {
            return Err(env_err(
                "RANK",
                format!("is {rank}, expected below WORLD_SIZE {world_size}"),
            ));
        }
        let local_rank = match first(&["LOCAL_RANK", "SLURM_LOCALID"]) {
            Some((name, v)) => parse::<usize>(name, &v)?,
            None if world_size == 1 => 0,
            None => return Err(env_err("LOCAL_RANK", "unset (and no SLURM_LOCALID)".into())),
        };
        let master_addr = match get("MASTER_ADDR") {
            Some(addr) if !addr.trim().is_empty() => addr.trim().to_string(),
            _ => match first(&["SLURM_JOB_NODELIST", "SLURM_NODELIST"]) {
                Some((name, list)) => first_slurm_host(&list)
                    .ok_or_else(|| env_err(name, format!("cannot read a host out of {list:?}")))?,
                None if world_size == 1 => "127.0.0.1".into(),
                None => {
                    return Err(env_err("MASTER_ADDR", "unset (and no SLURM_JOB_NODELIST)".into()));
                }
            },
        };
        let master_port = match get("MASTER_PORT") {
            Some(v) => parse::<u16>("MASTER_PORT", &v)?,
            None if world_size == 1 => 0,
            None => DEFAULT_MASTER_PORT,
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True");
        Ok(DistEnv { rank, world_size, local_rank, master_addr, master_port, agent_store })
    }

    /// Whether this is rank 0 (the one that writes checkpoints and logs).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

fn env_err(name: &str, problem: String) -> DistError {
    DistError::Env { name: name.into(), problem }
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| {
        env_err(name, format!("{value:?} is not a valid {}", std::any::type_name::<T>()))
    })
}

/// The first host of a Slurm node list: `node[03-05,9],gpu1` -> `node03`, `a,b` -> `a`.
pub fn first_slurm_host(list: &str) -> Option<String> {
    let mut depth = 0usize;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = list[..end].trim();
    if entry.is_empty() {
        return None;
    }
    let Some(open) = entry.find('[') else {
        return Some(entry.to_string());
    };
    let close = open + entry[open..].find(']')?;
    let first = entry[open + 1..close].split(',').next()?.split('-').next()?.trim();
    if first.is_empty() {
        return None;
    }
    Some(format!("{}{}{}", &entry[..open], first, &entry[close + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                master_addr: "10.0.0.7".into(),
                master_port: 29400,
                agent_store: false,
            }
        );
        assert!(!e.is_main());
        let under_torchrun = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]);
        assert!(under_torchrun.unwrap().agent_store);
    }

    #[test]
    fn nothing_set_is_a_job_of_one() {
        assert_eq!(env(&[]).unwrap(), DistEnv::single());
    }

    #[test]
    fn slurm_fallbacks_and_torchrun_precedence() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[12-13,20]"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("gpu12", DEFAULT_MASTER_PORT));
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "2"),
            ("MASTER_ADDR", "h"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size), (2, 4));
    }

    #[test]
    fn errors_name_the_variable() {
        let msg = |r: Result<DistEnv>| r.unwrap_err().to_string();
        assert!(msg(env(&[("RANK", "0")])).contains("WORLD_SIZE"));
        assert!(msg(env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).contains("RANK"));
        assert!(msg(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).contains("\"x\""));
        let no_addr = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
        assert!(msg(no_addr).contains("MASTER_ADDR"));
        let bad_port = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ]);
        assert!(msg(bad_port).contains("MASTER_PORT"));
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_slurm_host("node[03-05,9],gpu1").as_deref(), Some("node03"));
        assert_eq!(first_slurm_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_slurm_host("single").as_deref(), Some("single"));
        assert_eq!(first_slurm_host("r[7]-ib").as_deref(), Some("r7-ib"));
        assert_eq!(first_slurm_host(""), None);
        assert_eq!(first_slurm_host("bad[,x"), None);
    }
}
